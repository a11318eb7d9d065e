"""A run's resumable state: one typed object that saves itself atomically and loads itself safely.

It holds everything needed to resume exactly: model, optimizer, scheduler, RNG states, position
in the data (the step; epoch and batch follow from it), the history so far and the config that
produced them. Everything in it is a tensor or a plain value (dict, list, tuple, str, int, float,
bool, None), so `torch.load(weights_only=True)` reads it: a crafted file is refused, never run.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from training.errors import TrainingRequestError
from training.results import EpochRecord

CHECKPOINT_NAME = "last.pt"
#: Bumped when the layout changes, so an old file is refused with a reason, not misread.
FORMAT_VERSION = 1


class CheckpointError(TrainingRequestError):
    """A checkpoint file is unreadable, unsafe, or not a training checkpoint."""


class CheckpointMismatchError(TrainingRequestError):
    """A checkpoint exists but was written by a different configuration."""


def checkpoint_path(directory: Path) -> Path:
    return Path(directory) / CHECKPOINT_NAME


@dataclass
class TrainingState:
    """Everything a run needs to continue where it stopped."""

    fingerprint: str  # of the config that wrote it; a resume needs the same one
    workload: str
    workload_config: dict
    run_config: dict
    step: int
    samples_seen: int
    history: list[dict]  # EpochRecord dumps, oldest first
    model: dict
    optimizer: dict
    scheduler: dict
    rng: dict  # as `runtime.capture_rng_state` gives it
    reason: str  # why it was written: "interval", "epoch" or "stopped: ..."

    def epoch_records(self) -> list[EpochRecord]:
        return [EpochRecord.model_validate(record) for record in self.history]

    def save(self, directory: Path) -> Path:
        """Write `last.pt` in `directory` atomically: a SIGTERM mid-save leaves the previous file whole."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = checkpoint_path(directory)
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=".last-", suffix=".tmp")
        os.close(fd)
        try:
            torch.save(self._as_dict(), tmp_name)
            os.replace(tmp_name, target)
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
        return target

    @classmethod
    def load(cls, directory: Path) -> TrainingState | None:
        """The state saved in `directory`, or None when there is none yet; `CheckpointError` if it is bad."""
        path = checkpoint_path(directory)
        if not path.exists():
            return None
        return cls._from_dict(_safe_load(path), path)

    def _as_dict(self) -> dict[str, Any]:
        # Flat: "step" and "reason" stay top-level keys that tools can peek at.
        return {"format": FORMAT_VERSION} | {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def _from_dict(cls, raw: object, path: Path) -> TrainingState:
        _check_layout(raw, path)
        state = cls(**{f.name: raw[f.name] for f in fields(cls)})
        try:
            state.epoch_records()
        except ValidationError as error:
            raise CheckpointError(f"{path} is not a training checkpoint: its history is malformed ({error})") from error
        return state


#: The type of every field of TrainingState (checked on load: a safe pickle may still hold nonsense).
_FIELD_TYPES: dict[str, type] = {
    "fingerprint": str,
    "workload": str,
    "workload_config": dict,
    "run_config": dict,
    "step": int,
    "samples_seen": int,
    "history": list,
    "model": dict,
    "optimizer": dict,
    "scheduler": dict,
    "rng": dict,
    "reason": str,
}


def _safe_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} was refused by the safe loader: it holds objects other than tensors and plain values "
            f"({_refusal_detail(error)}); this version of the trainer never writes such a file, so delete it "
            "or use another checkpoint_subdir"
        ) from None
    except (EOFError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"{path} is truncated or corrupt ({type(error).__name__}: {error})") from None


def _refusal_detail(error: pickle.UnpicklingError) -> str:
    # torch wraps what it refused ("Trying to load unsupported GLOBAL posix.system ...") in boilerplate
    # that suggests retrying with weights_only=False: keep the finding, drop that advice.
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(error).splitlines()]
    return " ".join(line for line in lines if line and not line.startswith(boilerplate)) or "unpickling refused"


def _check_layout(raw: object, path: Path) -> None:
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is not a training checkpoint: it holds a {type(raw).__name__}, not a dict")
    expected_types = {"format": int} | _FIELD_TYPES
    missing = [name for name in expected_types if name not in raw]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint: it lacks {', '.join(missing)}")
    wrong = [
        f"{name} is {type(raw[name]).__name__}, not {expected.__name__}"
        for name, expected in expected_types.items()
        # bool is an int to Python, but never a step count
        if not isinstance(raw[name], expected) or (expected is int and isinstance(raw[name], bool))
    ]
    if wrong:
        raise CheckpointError(f"{path} is not a training checkpoint: {'; '.join(wrong)}")
    if raw["format"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {raw['format']}; this trainer reads format {FORMAT_VERSION}"
        )
