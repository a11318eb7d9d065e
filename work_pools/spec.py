"""The typed form of pools.yaml (unknown keys and bad values are errors, not silently ignored)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, model_validator

HERE = Path(__file__).parent
DEFAULT_POOLS_FILE = HERE / "pools.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class QueueSpec(_Strict):
    name: str = Field(min_length=1)
    priority: PositiveInt
    description: str | None = None
    concurrency_limit: NonNegativeInt | None = None


class PoolSpec(_Strict):
    name: str = Field(min_length=1)
    type: Literal["process", "kubernetes"]
    base_job_template: str
    description: str | None = None
    concurrency_limit: NonNegativeInt | None = None
    queues: list[QueueSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_queues(self) -> PoolSpec:
        names = [q.name for q in self.queues]
        priorities = [q.priority for q in self.queues]
        if len(set(names)) != len(names):
            raise ValueError(f"pool {self.name}: queue names repeat: {names}")
        if len(set(priorities)) != len(priorities):
            raise ValueError(f"pool {self.name}: queue priorities repeat: {priorities}")
        return self

    def template(self, base_dir: Path = HERE) -> dict:
        return json.loads((base_dir / self.base_job_template).read_text())


class GlobalLimitSpec(_Strict):
    """A Prefect global concurrency limit; a flow takes `occupy=n` slots (one per GPU it uses)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:/-]*$")
    limit: NonNegativeInt
    description: str | None = None


class PoolsFile(_Strict):
    pools: list[PoolSpec] = Field(min_length=1)
    concurrency_limits: list[GlobalLimitSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> PoolsFile:
        for kind, names in (("pool", [p.name for p in self.pools]), ("limit", [c.name for c in self.concurrency_limits])):
            if len(set(names)) != len(names):
                raise ValueError(f"{kind} names repeat: {names}")
        return self

    def limit_named(self, name: str) -> GlobalLimitSpec | None:
        return next((limit for limit in self.concurrency_limits if limit.name == name), None)


def load_pools(path: Path = DEFAULT_POOLS_FILE) -> PoolsFile:
    return PoolsFile.model_validate(yaml.safe_load(Path(path).read_text()))
