"""What a training run asks of the cost engine: who pays, on what resources, under which cap.

`CostPolicy` is a flow parameter of every training deployment, so Prefect validates it against
its schema when the run is created (before anything is spent); the checks that need the
environment (GPUs actually present, the team known to the ledger) run first thing in the flow.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, model_validator

from oppen.cost.price_book import Resources
from training.config import OptionalFloat, optional_number

# Beyond this a budget is a typo (an extra zero or a pasted account number), not a plan.
MAX_BUDGET_USD = 1_000_000.0
NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"  # DNS-label-like: also a valid k8s namespace suffix


def check_name(kind: str, value: str) -> str:
    if not re.fullmatch(NAME_PATTERN, value):
        raise ValueError(f"{kind} {value!r} must be lowercase letters, digits, '.', '_' or '-' (1-63 chars)")
    return value


class CostPolicy(BaseModel):
    """The cost side of a training request (a flow parameter)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    team: str = Field("default", pattern=NAME_PATTERN, description="Whose budget pays; must exist in the ledger.")
    resources: Resources = Field(
        Resources(cpu_cores=2.0), description="What the run is billed for while it runs (its request)."
    )
    max_cost_usd: OptionalFloat = optional_number(
        gt=0.0, le=MAX_BUDGET_USD,
        description="Hard cap for this run over all its attempts: training stops cleanly before the step that "
        "would cross it. Left out: no cap of its own (the budgets still apply).",
    )
    spot: bool = Field(False, description="Bill at the spot price; on the local pool, interruptions are simulated.")
    spot_seed: int = Field(0, description="Seed of the simulated interruption times (reproducible runs).")
    spot_interruptions_per_hour: OptionalFloat = optional_number(
        ge=0.0, le=3600.0,
        description="Override the price book's interruption rate for the simulation (left out: the book's rate).",
    )
    calibration_steps: int = Field(
        20, ge=3, le=200, description="Steps timed to estimate speed when MLflow has no history for this config."
    )
    warn_fraction: float = Field(0.7, gt=0.0, lt=1.0, description="Budget use at which a warning event is emitted.")
    defer_to_off_peak: bool = Field(
        False, description="Outside the price book's off-peak window, a deployment run reschedules itself to the "
        "window's next start and ends Deferred, stating the saving; inside the window it runs at once.",
    )

    @model_validator(mode="after")
    def _spot_rate_needs_spot(self) -> CostPolicy:
        if self.spot_interruptions_per_hour is not None and not self.spot:
            raise ValueError("spot_interruptions_per_hour is set but spot is false")
        return self
