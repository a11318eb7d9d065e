"""Helpers shared by the benchmarks: the seed's rates and a plain-text table."""

from __future__ import annotations

import torch

# The seed's rates: $0.05 per core-hour on CPU, $0.25 per GPU-hour.
CPU_CORE_HOUR_USD = 0.05
GPU_HOUR_USD = 0.25


def run_cost_usd(wall_seconds: float, device: str) -> float:
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
