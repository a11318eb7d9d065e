"""The final cost of a run, built from the meter (pure), and its markdown report."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from oppen.cost.forecast import relative_error
from oppen.cost.meter import CostMeter
from oppen.cost.price_book import Resources
from oppen.cost.quote import Quote
from oppen.cost.utilization import Utilization


class RunCost(BaseModel):
    model_config = ConfigDict(frozen=True)

    status: str  # settled | stopped | failed | preempted
    cost_usd: float  # everything this run was billed, loading to logging
    training_usd: float  # from training's start to its end
    at_training_end_usd: float  # everything spent up to the end of training (loading and quoting included)
    tail_reserve_usd: float  # what the cap kept back for the work after training (test pass, model logging)
    on_demand_usd: float  # the same seconds at the full on-demand price
    seconds: float
    peak_seconds: float
    off_peak_seconds: float
    gpu_hours: float
    cpu_hours: float  # core-hours
    memory_gib_hours: float
    cap_usd: float | None
    cap_overshoot_usd: float | None  # > 0 when the cap was crossed (bounded by one step)
    max_step_usd: float  # the most expensive step, the unit the overshoot bound is stated in
    quote_expected_usd: float | None
    quote_p90_usd: float | None
    quote_error: float | None  # (quote - actual) / actual
    forecast_after_epoch1_usd: float | None
    forecast_error: float | None  # after epoch 1: (forecast - actual) / actual
    metric_name: str | None
    metric_value: float | None
    cost_per_point_usd: float | None
    spot: bool
    spot_interruptions: int
    spot_lost_seconds: float
    spot_lost_usd: float
    epoch_costs: list[tuple[int, float]]
    utilization: dict[str, float]
    stop_reason: str | None

    def mlflow_metrics(self) -> dict[str, float]:
        values: dict[str, float | None] = {
            "cost_usd": self.cost_usd,
            "cost_training_usd": self.training_usd,
            "cost_on_demand_usd": self.on_demand_usd,
            "cost_saving_usd": self.on_demand_usd - self.cost_usd,
            "gpu_hours": self.gpu_hours,
            "cpu_hours": self.cpu_hours,
            "memory_gib_hours": self.memory_gib_hours,
            "cost_off_peak_seconds": self.off_peak_seconds,
            "cost_peak_seconds": self.peak_seconds,
            "cost_quote_expected_usd": self.quote_expected_usd,
            "cost_quote_error": self.quote_error,
            "cost_forecast_epoch1_usd": self.forecast_after_epoch1_usd,
            "cost_forecast_error": self.forecast_error,
            "cost_per_point_usd": self.cost_per_point_usd,
            "cost_cap_overshoot_usd": self.cap_overshoot_usd,
            "cost_cap_usd": self.cap_usd,
            "cost_at_training_end_usd": self.at_training_end_usd,
            "cost_tail_reserve_usd": self.tail_reserve_usd,
            "cost_max_step_usd": self.max_step_usd,
            "spot_interruptions": float(self.spot_interruptions),
            "spot_lost_seconds": self.spot_lost_seconds,
            "spot_lost_usd": self.spot_lost_usd,
            **self.utilization,
        }
        return {key: float(value) for key, value in values.items() if value is not None}


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


def settle_from_meter(
    meter: CostMeter,
    *,
    status: str,
    resources: Resources,
    quote: Quote | None,
    metric_name: str | None,
    metric_value: float | None,
    higher_is_better: bool = True,
    baseline: float | None = None,
    lost_seconds: float = 0.0,
    interruptions: int = 0,
    utilization: Utilization | None = None,
    stop_reason: str | None = None,
) -> RunCost:
    meter.tick()
    totals = meter.totals
    hours = totals.seconds / 3600
    training = (meter.training_usd_at_end or totals.usd) - (meter.training_usd_at_start or 0.0)
    epoch1 = next((p for p in meter.forecasts if p.basis == "epochs"), None)
    forecast_error = relative_error(epoch1.forecast_usd, totals.usd) if epoch1 and status == "settled" else None
    points = points_of(metric_name, metric_value, higher_is_better, baseline) if metric_value is not None else None
    # Only meaningful when the cap actually stopped the run; otherwise it is just unused headroom.
    overshoot = (totals.usd - meter.cap_usd) if meter.cap_usd is not None and meter.stopped_for_cap else None
    mean_price = totals.usd / totals.seconds if totals.seconds else 0.0
    return RunCost(
        status=status,
        cost_usd=totals.usd,
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
        cap_overshoot_usd=overshoot,
        max_step_usd=max(meter.step_costs, default=0.0),
        quote_expected_usd=quote.expected_usd if quote else None,
        quote_p90_usd=quote.p90_usd if quote else None,
        quote_error=relative_error(quote.expected_usd, totals.usd) if quote and status == "settled" else None,
        forecast_after_epoch1_usd=epoch1.forecast_usd if epoch1 else None,
        forecast_error=forecast_error,
        metric_name=metric_name,
        metric_value=metric_value,
        cost_per_point_usd=(totals.usd / points) if points else None,
        spot=meter.spot,
        spot_interruptions=interruptions,
        spot_lost_seconds=lost_seconds,
        spot_lost_usd=lost_seconds * mean_price,
        epoch_costs=meter.epoch_costs,
        utilization=utilization.as_metrics() if utilization else {},
        stop_reason=stop_reason,
    )


def render_cost_markdown(cost: RunCost, title: str) -> str:
    def usd(value: float | None) -> str:
        return "n/a" if value is None else f"${value:,.6f}"

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{value:+.1%}"

    lines = [
        f"# Cost of {title}",
        "",
        "| | |",
        "| --- | --- |",
        f"| status | {cost.status}{' (' + cost.stop_reason + ')' if cost.stop_reason else ''} |",
        f"| cost | **{usd(cost.cost_usd)}** (training {usd(cost.training_usd)}) |",
        f"| at on-demand prices | {usd(cost.on_demand_usd)} (saved {usd(cost.on_demand_usd - cost.cost_usd)}) |",
        f"| time | {cost.seconds:.1f} s ({cost.off_peak_seconds:.1f} s off-peak) |",
        f"| GPU-hours / CPU core-hours / GiB-hours | {cost.gpu_hours:.6f} / {cost.cpu_hours:.6f} / {cost.memory_gib_hours:.6f} |",
        f"| quote (expected / p90) | {usd(cost.quote_expected_usd)} / {usd(cost.quote_p90_usd)}, error {pct(cost.quote_error)} |",
        f"| forecast after epoch 1 | {usd(cost.forecast_after_epoch1_usd)}, error {pct(cost.forecast_error)} |",
        f"| cap | {usd(cost.cap_usd)}{', overshoot ' + usd(cost.cap_overshoot_usd) if cost.cap_usd else ''} "
        f"(largest step {usd(cost.max_step_usd)}) |",
        f"| {cost.metric_name or 'metric'} | {'n/a' if cost.metric_value is None else f'{cost.metric_value:.4f}'} |",
        f"| cost per quality point | {usd(cost.cost_per_point_usd)} |",
    ]
    if cost.spot:
        lines.append(
            f"| spot | {cost.spot_interruptions} interruptions, {cost.spot_lost_seconds:.1f} s lost "
            f"({usd(cost.spot_lost_usd)}) |"
        )
    if cost.epoch_costs:
        lines += ["", "| epoch | cumulative cost |", "| --- | --- |"]
        lines += [f"| {epoch} | {usd(value)} |" for epoch, value in cost.epoch_costs]
    return "\n".join(lines) + "\n"
