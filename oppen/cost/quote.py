"""A quote before any compute: expected cost and p90, cost per epoch, and the cheapest start."""

from __future__ import annotations

from datetime import datetime, timedelta

from pydantic import BaseModel, ConfigDict

from oppen.cost.money import format_usd_amount
from oppen.cost.price_book import PriceBook, Resources, on_demand_hourly_usd
from oppen.cost.pricing import price_interval
from oppen.cost.speed import RunShape, SpeedEstimate, epoch_seconds, expected_seconds
from oppen.cost.windows import next_off_peak_start


class Quote(BaseModel):
    model_config = ConfigDict(frozen=True)

    start: datetime
    expected_seconds: float
    p90_seconds: float
    expected_usd: float
    p90_usd: float
    cost_per_epoch_usd: float
    hourly_usd: float  # on-demand, undiscounted
    spot: bool
    spot_interruption_overhead_seconds: float  # expected lost work + restarts, already in expected_seconds
    cheapest_start: datetime
    cheapest_usd: float
    saving_usd: float  # expected_usd - cheapest_usd
    speed: SpeedEstimate
    shape: RunShape
    # The steady part of this run's calibration (timed steps, one evaluation): a run quoted from history
    # will not pay it, so it is kept out of the loading time this run records in the speed history.
    calibration_seconds: float = 0.0

    def summary(self) -> str:
        when = "now" if self.cheapest_start <= self.start else self.cheapest_start.isoformat(timespec="minutes")
        return (
            f"expected {format_usd_amount(self.expected_usd)} (p90 {format_usd_amount(self.p90_usd)}) for "
            f"{self.expected_seconds:.0f}s ({self.speed.source}, {self.speed.observations} obs); "
            f"{format_usd_amount(self.cost_per_epoch_usd)}/epoch; cheapest start {when}: "
            f"{format_usd_amount(self.cheapest_usd)} (saves {format_usd_amount(self.saving_usd)})"
        )


def spot_overhead_seconds(book: PriceBook, rate_per_hour: float, seconds: float, checkpoint_interval_s: float,
                          restart_s: float) -> float:
    """Expected extra wall time from reclaims: each loses half a checkpoint interval plus a restart."""
    interruptions = rate_per_hour * seconds / 3600
    return interruptions * (checkpoint_interval_s / 2 + restart_s)


def make_quote(
    book: PriceBook,
    resources: Resources,
    speed: SpeedEstimate,
    shape: RunShape,
    start: datetime,
    *,
    spot: bool = False,
    spot_rate_per_hour: float | None = None,
    checkpoint_interval_s: float | None = None,
) -> Quote:
    seconds = expected_seconds(speed, shape)
    per_epoch = epoch_seconds(speed, shape)
    overhead = 0.0
    if spot:
        rate = book.spot.interruptions_per_hour if spot_rate_per_hour is None else spot_rate_per_hour
        interval = checkpoint_interval_s if checkpoint_interval_s is not None else per_epoch
        overhead = spot_overhead_seconds(book, rate, seconds, interval, speed.fixed_overhead_seconds)
        seconds += overhead
    p90 = seconds * speed.p90_factor

    def cost(begin: datetime, duration: float) -> float:
        return price_interval(book, resources, begin, begin + timedelta(seconds=duration), spot=spot).usd

    expected = cost(start, seconds)
    cheapest_start = next_off_peak_start(book.off_peak, start)
    cheapest = cost(cheapest_start, seconds)
    if cheapest >= expected:  # already off-peak, or no discount: starting now is the cheapest
        cheapest_start, cheapest = start, expected
    return Quote(
        start=start,
        expected_seconds=seconds,
        p90_seconds=p90,
        expected_usd=expected,
        p90_usd=cost(start, p90),
        cost_per_epoch_usd=cost(start, per_epoch),
        hourly_usd=on_demand_hourly_usd(book, resources),
        spot=spot,
        spot_interruption_overhead_seconds=overhead,
        cheapest_start=cheapest_start,
        cheapest_usd=cheapest,
        saving_usd=expected - cheapest,
        speed=speed,
        shape=shape,
    )
