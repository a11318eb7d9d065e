"""Helpers shared by the benchmarks: the seed's rates, where the data is, and a plain-text table."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The seed's rates: $0.05 per core-hour on CPU, $0.25 per GPU-hour.
CPU_CORE_HOUR_USD = 0.05
GPU_HOUR_USD = 0.25


def dataset_dir(variable: str, name: str) -> Path | None:
    """$OPPEN_MNIST_DIR-style data: the variable, else ../shared/datasets/NAME beside the clone (the same default
    as scripts/test.sh), else None, which makes the loader download it (needs the internet once)."""
    if os.environ.get(variable):
        return Path(os.environ[variable])
    shared = ROOT.parent / "shared" / "datasets" / name
    return shared if shared.is_dir() else None


def mnist_dir() -> Path | None:
    return dataset_dir("OPPEN_MNIST_DIR", "mnist")


def wikitext_dir() -> Path | None:
    return dataset_dir("OPPEN_WIKITEXT_DIR", "wikitext-2")


def positive_int(text: str) -> int:
    """An argparse type: a mistyped setting is one line of usage, never a traceback from deep in a run."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def run_cost_usd(wall_seconds: float, device: str) -> float:
    import torch  # here, not at the top: bench/ledger_stress.py and the processes it starts import this module

    hours = wall_seconds / 3600
    if device.startswith("cuda"):
        return hours * GPU_HOUR_USD
    return hours * torch.get_num_threads() * CPU_CORE_HOUR_USD


def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[f"{c:.4f}" if isinstance(c, float) and abs(c) < 1 else
                                            f"{c:.1f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    line = lambda row: "| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])])
