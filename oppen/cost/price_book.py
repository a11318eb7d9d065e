"""The price book: resource rates, the off-peak window and the spot model (typed, validated)."""

from __future__ import annotations

import os
from datetime import time
from pathlib import Path
from typing import TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    field_validator,
    model_validator,
)

ENV_VAR = "OPPEN_PRICE_BOOK"
DEFAULT_FILE = Path(__file__).with_name("price_book.yaml")
M = TypeVar("M", bound=BaseModel)
MAX_GPUS_PER_RUN = 16  # the largest single nodes (e.g. 16x A100 40GB) carry 16


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class Rates(_Strict):
    gpu_hour_usd: NonNegativeFloat = 0.25
    gpu_type_hour_usd: dict[str, NonNegativeFloat] = Field(default_factory=dict)
    cpu_core_hour_usd: NonNegativeFloat = 0.05
    memory_gib_hour_usd: NonNegativeFloat = 0.0


class OffPeak(_Strict):
    start: time = time(22, 0)
    end: time = time(6, 0)
    discount: float = Field(0.5, ge=0.0, lt=1.0)
    timezone: str = "UTC"

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as error:
            raise ValueError(f"unknown timezone {value!r} (use an IANA name such as 'Europe/Berlin')") from error
        return value

    @field_validator("end")
    @classmethod
    def _not_empty(cls, value: time, info) -> time:
        if info.data.get("start") == value:
            raise ValueError("off-peak start and end are equal: the window would be empty")
        return value

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


class Spot(_Strict):
    discount: float = Field(0.7, ge=0.0, lt=1.0)
    interruptions_per_hour: NonNegativeFloat = Field(0.05, le=60.0)


class PriceBook(_Strict):
    rates: Rates = Rates()
    off_peak: OffPeak = OffPeak()
    spot: Spot = Spot()


class Resources(_Strict):
    """What a run holds while it runs."""

    # Upper bounds catch typos before money is spent: no single node offers more than these.
    gpus: NonNegativeInt = Field(0, le=MAX_GPUS_PER_RUN)
    gpu_type: str | None = None
    cpu_cores: PositiveFloat = Field(1.0, le=512)
    memory_gib: NonNegativeFloat = Field(0.0, le=4096)

    @model_validator(mode="after")
    def _type_needs_gpus(self) -> Resources:
        if self.gpu_type and not self.gpus:
            raise ValueError(f"gpu_type {self.gpu_type!r} is set but gpus is 0")
        return self


def load_yaml_model(model: type[M], label: str, path: Path | None, env_var: str, default: Path) -> M:
    """`model` validated from the YAML at `path`, else at $`env_var`, else `default`; one clear error if unreadable."""
    source = Path(path or os.environ.get(env_var) or default)
    try:
        data = yaml.safe_load(source.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"{label} {source} cannot be read: {error}") from error
    return model.model_validate(data or {})


def load_price_book(path: Path | None = None) -> PriceBook:
    """The book at `path`, else at $OPPEN_PRICE_BOOK, else the default shipped beside this module."""
    return load_yaml_model(PriceBook, "price book", path, ENV_VAR, DEFAULT_FILE)


def on_demand_hourly_usd(book: PriceBook, resources: Resources) -> float:
    """The undiscounted price of one hour of `resources`."""
    gpu_rate = book.rates.gpu_type_hour_usd.get(resources.gpu_type or "", book.rates.gpu_hour_usd)
    return (
        resources.gpus * gpu_rate
        + resources.cpu_cores * book.rates.cpu_core_hour_usd
        + resources.memory_gib * book.rates.memory_gib_hour_usd
    )
