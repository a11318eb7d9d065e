"""Typed run configuration shared by every workload.

Model-architecture settings live in each workload's own config; this holds how a run is driven.
Every number is finite and bounded: a request is untrusted input, and an absurd value should be
refused here, not discovered as a bill or an out-of-memory kill.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PositiveInt, model_validator


def _existing_directory(value: Path | None) -> Path | None:
    # Checked when the config is built, so a typo fails before any compute is reserved.
    if value is not None and not Path(value).is_dir():
        raise ValueError(f"data directory {value} does not exist")
    return value


#: An optional data directory that must exist when given.
DataDir = Annotated[Path | None, AfterValidator(_existing_directory)]

_SUBDIR_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MAX_SUBDIR_SEGMENTS = 4


def _relative_subdir(value: str | None) -> str | None:
    # The platform joins this onto its checkpoint root: it must not be able to name anything outside it.
    if value is None:
        return None
    if "\\" in value:
        raise ValueError(f"checkpoint_subdir {value!r} contains a backslash; separate folders with '/'")
    if value.startswith("/"):
        raise ValueError(f"checkpoint_subdir {value!r} is absolute; give a path relative to the checkpoint root")
    segments = value.split("/")
    if ".." in segments:
        raise ValueError(f"checkpoint_subdir {value!r} contains '..'; it must stay under the checkpoint root")
    if len(segments) > _MAX_SUBDIR_SEGMENTS:
        raise ValueError(f"checkpoint_subdir {value!r} has {len(segments)} folders; at most {_MAX_SUBDIR_SEGMENTS}")
    bad = [segment for segment in segments if not _SUBDIR_SEGMENT.fullmatch(segment)]
    if bad:
        raise ValueError(
            f"checkpoint_subdir {value!r} has invalid folder name(s) {bad}: each is 1-64 letters, digits, "
            "'.', '_' or '-', starting with a letter or digit"
        )
    return value


#: A relative path of 1-4 safe folder names under the platform's checkpoint root.
CheckpointSubdir = Annotated[str | None, AfterValidator(_relative_subdir)]


def _refuse_null(value: Any) -> Any:
    # JSON has no infinity: a client serialising 1e400 sends null, which must not read as "no limit".
    if value is None:
        raise ValueError("must be a finite number; leave the field out to get its default")
    return value


def _schema_without_null(schema: dict[str, Any]) -> None:
    """The flow-parameter schema Prefect's server checks: a number, never null, so null is refused at creation."""
    for option in schema.pop("anyOf", []):
        if option.get("type") != "null":
            schema.update(option)
    if schema.get("default", 0) is None:
        del schema["default"]  # a form would fill it in, and send back the null it must not


def optional_number(default: Any = None, **constraints: Any) -> Any:
    """A Field for an optional number: left out it is `default`; given, it must be a finite number in range.

    Left out of dumps when None, so schemas' defaults never carry a null that a form would send back.
    """
    return Field(default, exclude_if=lambda value: value is None, json_schema_extra=_schema_without_null,
                 **constraints)


#: An optional positive int that refuses an explicit null (use with `optional_number`).
OptionalPositiveInt = Annotated[PositiveInt | None, BeforeValidator(_refuse_null)]
#: An optional float that refuses an explicit null (use with `optional_number`).
OptionalFloat = Annotated[float | None, BeforeValidator(_refuse_null)]


class FrozenConfig(BaseModel):
    """Base for every config: immutable, an unknown key is an error, and NaN or infinity is refused."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class RunConfig(FrozenConfig):
    """How a training run is driven, independent of the workload."""

    epochs: PositiveInt = Field(
        2, le=1000, description="Full passes over the training split (beyond 1000 is a typo, not a plan)."
    )
    batch_size: PositiveInt = Field(
        128, le=65_536, description="Samples per optimizer step (bounded so a typo is refused, not allocated)."
    )
    learning_rate: float = Field(
        3e-3, gt=0, le=10, description="Peak learning rate of the schedule (above 10 is a typo: training diverges)."
    )
    max_steps: OptionalPositiveInt = optional_number(
        le=10_000_000, description="Fast mode: stop after this many optimizer steps (smoke tests, CI)."
    )
    seed: int = Field(
        0, ge=0, le=2**32 - 1,
        description="Seeds Python, NumPy and torch; data order derives from it (NumPy takes at most 32 bits).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present, else CPU.")
    checkpoint_subdir: CheckpointSubdir = Field(
        None,
        # The same rule as a schema pattern, so Prefect's server refuses a bad path when the run is created
        # (in Python the validator above says what exactly is wrong).
        json_schema_extra={"pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}(/[A-Za-z0-9][A-Za-z0-9._-]{0,63}){0,3}$"},
        description=(
            "A sub-folder of the platform's checkpoint root to keep this run's checkpoints in (None: one per flow "
            "run); a run started where a checkpoint of the same config exists resumes from it. 1-4 folder names "
            "separated by '/', each letters, digits, '.', '_' or '-'."
        ),
    )
    checkpoint_every_steps: OptionalPositiveInt = optional_number(
        le=10_000_000, description="Also checkpoint every N steps (bounds the work lost to a preemption)."
    )
    log_every_steps: PositiveInt = Field(50, le=1_000_000, description="Step callbacks see a smoothed loss this often.")
    num_threads: OptionalPositiveInt = optional_number(
        le=512, description="torch intra-op threads on CPU; left out: torch's default (one per core)."
    )

    @model_validator(mode="before")
    @classmethod
    def _no_checkpoint_dir(cls, data: Any) -> Any:
        # Said in one sentence, not "extra inputs": older clients sent this field, and should learn what replaced it.
        if isinstance(data, dict) and "checkpoint_dir" in data:
            raise ValueError(
                "checkpoint_dir is not accepted: checkpoints always go under the platform's checkpoint root; "
                "use checkpoint_subdir to name a sub-folder"
            )
        return data
