"""A run's money as the exporter serves it, read from the cost meter without touching it.

The exporter reads on its own thread, so it only reads what the meter already worked out: it never
calls `tick()` (that would bill from a second thread, racing the loop's own ticks). The accrued cost
is therefore the meter's as of its latest step, and stays put between the end of training and the
settlement, where the meter ticks no more until it settles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from oppen.metrics.families import Families

if TYPE_CHECKING:
    from oppen.cost.meter import CostMeter
    from oppen.cost.quote import Quote
    from oppen.cost.run_budget import RunBudget


@dataclass(frozen=True)
class CostReading:
    accrued_usd: float  # the run so far, earlier attempts included
    forecast_usd: float | None  # the run's expected total; None before anything can be said
    cap_usd: float | None  # the run's max_cost_usd; None without one

    def collect(self, families: Families, labels: dict[str, str]) -> None:
        families.add("oppen_run_cost_accrued_usd", self.accrued_usd, **labels)
        if self.forecast_usd is not None:
            families.add("oppen_run_cost_forecast_usd", self.forecast_usd, **labels)
        if self.cap_usd is not None:
            families.add("oppen_run_cost_cap_usd", self.cap_usd, **labels)


def meter_reading(meter: CostMeter | None, quote: Quote | None = None) -> CostReading | None:
    """What the meter says: accrued over all attempts, its latest forecast (else the quote's, until the
    meter has timed a few steps) and the cap. None before there is a meter (the run is not reserved yet)."""
    if meter is None:
        return None
    forecasts = meter.forecasts
    if forecasts:
        forecast = forecasts[-1].forecast_usd
    else:
        forecast = meter.prior_usd + quote.expected_usd if quote is not None else None
    return CostReading(accrued_usd=meter.run_usd, forecast_usd=forecast, cap_usd=meter.cap_usd)


def budget_reading(budget: RunBudget) -> CostReading | None:
    """The reading of an attempt's `RunBudget`: what the training pipeline passes to the run exporter."""
    return meter_reading(budget.meter, budget.quote)
