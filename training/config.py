"""Typed run configuration shared by every workload.

Model-architecture settings live in each workload's own config; this holds how a run is driven.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt


def _existing_directory(value: Path | None) -> Path | None:
    # Checked when the config is built, so a typo fails before any compute is reserved.
    if value is not None and not Path(value).is_dir():
        raise ValueError(f"data directory {value} does not exist")
    return value


#: An optional data directory that must exist when given.
DataDir = Annotated[Path | None, AfterValidator(_existing_directory)]


class FrozenConfig(BaseModel):
    """Base for every config: immutable, and an unknown key is an error, not a silent default."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class RunConfig(FrozenConfig):
    """How a training run is driven, independent of the workload."""

    epochs: PositiveInt = Field(2, description="Full passes over the training split.")
    batch_size: PositiveInt = Field(128, description="Samples per optimizer step.")
    learning_rate: PositiveFloat = Field(3e-3, description="Peak learning rate of the schedule.")
    max_steps: PositiveInt | None = Field(
        None, description="Fast mode: stop after this many optimizer steps (smoke tests, CI)."
    )
    seed: int = Field(0, ge=0, description="Seeds Python, NumPy and torch; data order derives from it.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present, else CPU.")
    checkpoint_dir: Path | None = Field(
        None, description="Where checkpoints go; a run started with an existing checkpoint resumes from it."
    )
    checkpoint_every_steps: PositiveInt | None = Field(
        None, description="Also checkpoint every N steps (bounds the work lost to a preemption)."
    )
    log_every_steps: PositiveInt = Field(50, description="Step callbacks see a smoothed loss this often.")
    num_threads: PositiveInt | None = Field(
        None, description="torch intra-op threads on CPU; None keeps torch's default (one per core)."
    )
