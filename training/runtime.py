"""Device selection, seeding and RNG state capture (for exact resume)."""

from __future__ import annotations

import random
from typing import Literal

import numpy as np
import torch


def select_device(preference: Literal["auto", "cpu", "cuda"] = "auto") -> torch.device:
    """CUDA when present (or asked for), else CPU. Asking for CUDA on a machine without it is an error."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was requested but torch sees no CUDA device on this machine")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def capture_rng_state() -> dict:
    """Every RNG's state as tensors and plain values, so a checkpoint loads with `weights_only=True`."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": {
            "version": version,
            "internal": torch.tensor(internal, dtype=torch.int64),  # 624 words and a position
            "gauss_next": gauss_next,
        },
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),  # uint32 words; int64 holds them exactly
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state`."""
    python, numpy = state["python"], state["numpy"]
    random.setstate((python["version"], tuple(python["internal"].tolist()), python["gauss_next"]))
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state((numpy["name"], keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Data order of an epoch depends only on (seed, epoch), so a resumed run can skip to its batch."""
    generator = torch.Generator()
    generator.manual_seed(seed * 100_003 + epoch)
    return generator
