"""The price of a stretch of time on given resources: rates x real seconds, off-peak and spot applied."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict

from oppen.cost.price_book import PriceBook, Resources, on_demand_hourly_usd
from oppen.cost.windows import off_peak_seconds


class IntervalCost(BaseModel):
    model_config = ConfigDict(frozen=True)

    usd: float
    peak_seconds: float
    off_peak_seconds: float
    on_demand_usd: float  # what the same interval costs at the full peak price

    @property
    def saving_usd(self) -> float:
        return self.on_demand_usd - self.usd


def price_interval(book: PriceBook, resources: Resources, start: datetime, end: datetime, spot: bool = False) -> IntervalCost:
    """Cost of holding `resources` over [start, end): off-peak seconds get the window's discount."""
    discounted = off_peak_seconds(book.off_peak, start, end)  # also rejects naive datetimes
    seconds = max(0.0, end.timestamp() - start.timestamp())  # real seconds, DST included
    hourly = on_demand_hourly_usd(book, resources)
    spot_factor = (1.0 - book.spot.discount) if spot else 1.0
    peak = seconds - discounted
    usd = hourly / 3600 * spot_factor * (peak + discounted * (1.0 - book.off_peak.discount))
    return IntervalCost(usd=usd, peak_seconds=peak, off_peak_seconds=discounted, on_demand_usd=hourly * seconds / 3600)
