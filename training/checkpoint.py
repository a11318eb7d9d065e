"""Checkpoints: one plain dict with everything needed to resume exactly.

Model, optimizer, scheduler, RNG states, position in the data (step, epoch, batch), the
history so far and the config that produced them. Writes are atomic (temp file + rename) so a
SIGTERM during a save never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

CHECKPOINT_NAME = "last.pt"


def checkpoint_path(directory: Path) -> Path:
    return Path(directory) / CHECKPOINT_NAME


def save_checkpoint(directory: Path, state: dict) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = checkpoint_path(directory)
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=".last-", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp_name)
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return target


def load_checkpoint(directory: Path) -> dict | None:
    """The last checkpoint in `directory`, or None when there is none yet."""
    path = checkpoint_path(Path(directory))
    if not path.exists():
        return None
    # weights_only=False: the checkpoint holds RNG states and plain config dicts, written by us.
    return torch.load(path, map_location="cpu", weights_only=False)
