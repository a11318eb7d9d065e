"""The final cost of a run, built from the meter (pure), and its markdown report."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from oppen import tracking_keys as keys
from oppen.cost.forecast import relative_error
from oppen.cost.meter import CostMeter
from oppen.cost.money import to_micros, usd_float
from oppen.cost.price_book import Resources
from oppen.cost.quote import Quote
from oppen.cost.utilization import Utilization


class RunCost(BaseModel):
    """One attempt's cost and the run's total, in exact micro-dollars, with the figures behind them.

    `cost_usd` is the run's total over all its attempts (what the ledger, MLflow and the artifacts
    all show); `attempt_cost_usd` is this attempt's part. The float fields describe this attempt.
    """

    model_config = ConfigDict(frozen=True)

    status: str  # settled | stopped | failed | preempted
    attempt: int  # 1 for most runs; n for the n-th attempt of a rescheduled run
    charges_micros: dict[str, int]  # this attempt, per UTC month it ran in
    prior_micros: int  # what the run's earlier attempts spent (as the ledger knew it)
    run_cost_micros: int  # the run's total: prior + this attempt (the ledger's figure once settled)
    training_usd: float  # from training's start to its end
    at_training_end_usd: float  # everything this attempt spent up to the end of training (a stop at the limit ends it)
    tail_reserve_usd: float  # what the limit kept back for the work after training (test pass, model logging)
    on_demand_usd: float  # this attempt's seconds at the full on-demand price
    seconds: float
    peak_seconds: float
    off_peak_seconds: float
    gpu_hours: float
    cpu_hours: float  # core-hours
    memory_gib_hours: float
    cap_usd: float | None  # the run's max_cost_usd
    limit_usd: float | None  # what this attempt was allowed to spend (its hold, after any top-ups)
    cap_overshoot_usd: float | None  # > 0 when the limit was crossed (bounded by one step)
    max_step_usd: float  # the most expensive step, the unit the overshoot bound is stated in
    quote_expected_usd: float | None
    quote_p90_usd: float | None
    quote_error: float | None  # (quote - actual) / actual, for an uninterrupted run
    forecast_after_epoch1_usd: float | None
    forecast_error: float | None  # after epoch 1: (forecast - actual) / actual
    metric_name: str | None
    metric_value: float | None
    cost_per_point_usd: float | None
    spot: bool
    spot_interruptions: int
    spot_lost_seconds: float
    spot_lost_usd: float
    epoch_costs: list[tuple[int, float]]  # (epoch, the run's cumulative USD at its end)
    utilization: dict[str, float]
    stop_reason: str | None

    @property
    def attempt_cost_micros(self) -> int:
        return sum(self.charges_micros.values())

    @property
    def cost_usd(self) -> float:
        return usd_float(self.run_cost_micros)

    @property
    def attempt_cost_usd(self) -> float:
        return usd_float(self.attempt_cost_micros)

    def with_run_total(self, run_cost_micros: int) -> RunCost:
        """The same attempt with the ledger's total for the run (it may know of attempts this one did not)."""
        per_point = None
        if self.cost_per_point_usd and self.run_cost_micros:
            per_point = self.cost_per_point_usd * run_cost_micros / self.run_cost_micros
        return self.model_copy(update={"run_cost_micros": run_cost_micros, "cost_per_point_usd": per_point})

    @property
    def before_training_usd(self) -> float:
        """This attempt's cost before its first step: waiting for data, loading, quoting (a calibration)."""
        return max(0.0, self.at_training_end_usd - self.training_usd)

    @property
    def after_training_usd(self) -> float:
        """This attempt's cost after its last step: the test pass, logging and registering the model, settling."""
        return max(0.0, self.attempt_cost_usd - self.at_training_end_usd)

    def mlflow_metrics(self) -> dict[str, float]:
        """The settlement's figures under their MLflow keys (cost/...); the cap and the quote are params."""
        values: dict[str, float | None] = {
            keys.COST_TOTAL: self.cost_usd,
            keys.COST_ATTEMPT: self.attempt_cost_usd,
            keys.COST_ATTEMPTS: float(self.attempt),
            keys.COST_TRAINING: self.training_usd,
            keys.COST_ON_DEMAND: self.on_demand_usd,
            keys.COST_SAVING: self.on_demand_usd - self.attempt_cost_usd,
            keys.GPU_HOURS: self.gpu_hours,
            keys.CPU_CORE_HOURS: self.cpu_hours,
            keys.MEMORY_GIB_HOURS: self.memory_gib_hours,
            keys.OFF_PEAK_SECONDS: self.off_peak_seconds,
            keys.PEAK_SECONDS: self.peak_seconds,
            keys.COST_QUOTE_ERROR: self.quote_error,
            keys.COST_FORECAST_EPOCH1: self.forecast_after_epoch1_usd,
            keys.COST_FORECAST_ERROR: self.forecast_error,
            keys.COST_PER_POINT: self.cost_per_point_usd,
            keys.COST_CAP_OVERSHOOT: self.cap_overshoot_usd,
            keys.COST_LIMIT: self.limit_usd,
            keys.COST_AT_TRAINING_END: self.at_training_end_usd,
            keys.COST_TAIL_RESERVE: self.tail_reserve_usd,
            keys.COST_MAX_STEP: self.max_step_usd,
            **({keys.SPOT_INTERRUPTIONS: float(self.spot_interruptions), keys.SPOT_LOST_SECONDS: self.spot_lost_seconds,
                keys.SPOT_LOST_USD: self.spot_lost_usd} if self.spot else {}),
            **self.utilization,
        }
        # Money to the nano-dollar: the meter's floats carry 17 digits of noise (0.00022166193055555558) that
        # MLflow prints as they are; the run's total and each attempt's part are exact micro-dollars already.
        # Not the cost per point: a ratio of a few micro-dollars, which comparisons need whole.
        return {key: round(float(value), 9) if key.endswith("_usd") and key != keys.COST_PER_POINT else float(value)
                for key, value in values.items() if value is not None}


def points_of(metric: str, value: float, higher_is_better: bool, baseline: float | None) -> float | None:
    """Quality points bought: accuracy in percentage points; for lower-is-better metrics (perplexity),
    the points gained below the untrained baseline. None when nothing was gained."""
    if higher_is_better:
        points = value * 100 if value <= 1.0 else value
    elif baseline is not None:
        points = baseline - value
    else:
        return None
    return points if points > 0 else None


def charges_of(meter: CostMeter) -> dict[str, int]:
    """The meter's charges per month, each rounded once to whole micro-dollars."""
    return {month: to_micros(usd) for month, usd in sorted(meter.totals.usd_by_month.items()) if usd > 0}


def settle_from_meter(
    meter: CostMeter,
    *,
    status: str,
    resources: Resources,
    quote: Quote | None,
    metric_name: str | None,
    metric_value: float | None,
    attempt: int = 1,
    prior_micros: int = 0,
    higher_is_better: bool = True,
    baseline: float | None = None,
    lost_seconds: float = 0.0,
    interruptions: int = 0,
    utilization: Utilization | None = None,
    stop_reason: str | None = None,
) -> RunCost:
    """This attempt's cost from its meter, read now, and the run's total."""
    meter.tick()
    totals = meter.totals
    charges = charges_of(meter)
    run_micros = prior_micros + sum(charges.values())
    run_usd = usd_float(run_micros)
    hours = totals.seconds / 3600
    training = (meter.training_usd_at_end or totals.usd) - (meter.training_usd_at_start or 0.0)
    epoch1 = next((p for p in meter.forecasts if p.basis == "epochs"), None)
    complete = status == "settled"
    forecast_error = relative_error(epoch1.forecast_usd, run_usd) if epoch1 and complete else None
    # A quote prices the whole run from its start: only an uninterrupted run can be compared with it.
    quote_error = relative_error(quote.expected_usd, run_usd) if quote and complete and attempt == 1 else None
    points = points_of(metric_name, metric_value, higher_is_better, baseline) if metric_value is not None else None
    # Only meaningful when the limit actually stopped the run; otherwise it is just unused headroom.
    limit = meter.limit_usd
    overshoot = (totals.usd - limit) if limit is not None and meter.stopped_for_cap else None
    mean_price = totals.usd / totals.seconds if totals.seconds else 0.0
    return RunCost(
        status=status,
        attempt=attempt,
        charges_micros=charges,
        prior_micros=prior_micros,
        run_cost_micros=run_micros,
        training_usd=training,
        at_training_end_usd=meter.training_usd_at_end if meter.training_usd_at_end is not None else totals.usd,
        tail_reserve_usd=meter.tail_reserve_usd,
        on_demand_usd=totals.on_demand_usd,
        seconds=totals.seconds,
        peak_seconds=totals.peak_seconds,
        off_peak_seconds=totals.off_peak_seconds,
        gpu_hours=resources.gpus * hours,
        cpu_hours=resources.cpu_cores * hours,
        memory_gib_hours=resources.memory_gib * hours,
        cap_usd=meter.cap_usd,
        limit_usd=limit,
        cap_overshoot_usd=overshoot,
        max_step_usd=max(meter.step_costs, default=0.0),
        quote_expected_usd=quote.expected_usd if quote else None,
        quote_p90_usd=quote.p90_usd if quote else None,
        quote_error=quote_error,
        forecast_after_epoch1_usd=epoch1.forecast_usd if epoch1 else None,
        forecast_error=forecast_error,
        metric_name=metric_name,
        metric_value=metric_value,
        cost_per_point_usd=(run_usd / points) if points else None,
        spot=meter.spot,
        spot_interruptions=interruptions,
        spot_lost_seconds=lost_seconds,
        spot_lost_usd=lost_seconds * mean_price,
        epoch_costs=meter.epoch_costs,
        utilization=utilization.as_metrics() if utilization else {},
        stop_reason=stop_reason,
    )
