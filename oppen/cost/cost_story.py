"""A run's cost told to a person: the markdown report and the table behind it (pure, no I/O).

The report answers, in order: what did it cost and is that booked; against what cap; where did the
money go (before training, training, after); how good were the quote and the forecast; what did it
buy. Every amount is in Oppen's dollar format, every error a signed percentage, every name in words.
The epoch table separates what each epoch cost from what the run had cost by its end, which includes
loading and quoting: without that, "run so far" reads as if it contradicted "training".
"""

from __future__ import annotations

from oppen.cost.settlement import RunCost
from oppen.display import duration, metric_phrase, percent, signed_percent, usd

STATUS_WORDS = {
    "settled": "completed", "stopped": "stopped at its cap", "failed": "failed", "preempted": "preempted (rescheduled)",
}


def headline(cost: RunCost) -> str:
    """"$0.000351 of $0.0005 cap (70.2%)": the amount first, as artifact descriptions and messages start."""
    cap = f" of {usd(cost.cap_usd)} cap ({percent(cost.cost_usd / cost.cap_usd)})" if cost.cap_usd else ""
    return f"{usd(cost.cost_usd)}{cap}"


def cost_rows(cost: RunCost) -> list[tuple[str, str]]:
    """(figure, value) pairs, in the order a person reads them; both the markdown and the table artifact use them."""
    status = STATUS_WORDS.get(cost.status, cost.status) + (f": {cost.stop_reason}" if cost.stop_reason else "")
    rows = [("Cost of the run", f"{headline(cost)}, {status}")]
    if cost.attempt > 1:
        rows.append(("Attempts", f"{cost.attempt}: this one {usd(cost.attempt_cost_usd)}, earlier ones "
                                 f"{usd(cost.cost_usd - cost.attempt_cost_usd)}"))
    rows += [
        ("Before training (data, quote)", usd(cost.before_training_usd)),
        ("Training (first step to last)", usd(cost.training_usd)),
        ("After training (test, model, registry)", usd(cost.after_training_usd)),
        ("Booked to", ", ".join(f"{month}: {usd(micros / 1e6)}" for month, micros in cost.charges_micros.items())
         or "nothing"),
        ("Quote before training", f"{usd(cost.quote_expected_usd)} (p90 {usd(cost.quote_p90_usd)}), "
                                  f"error {signed_percent(cost.quote_error)}"),
        ("Forecast after epoch 1", f"{usd(cost.forecast_after_epoch1_usd)}, error {signed_percent(cost.forecast_error)}"),
        ("Billed time", f"{duration(cost.seconds)} ({duration(cost.off_peak_seconds)} off-peak at its discount)"),
        ("At on-demand prices", f"{usd(cost.on_demand_usd)} (saved {usd(cost.on_demand_usd - cost.attempt_cost_usd)})"),
        ("GPU-hours · CPU core-hours · memory GiB-hours",
         f"{cost.gpu_hours:.4f} · {cost.cpu_hours:.4f} · {cost.memory_gib_hours:.4f}"),
    ]
    if cost.limit_usd is not None:
        overshoot = f", over it by {usd(cost.cap_overshoot_usd)}" if cost.cap_overshoot_usd else ""
        rows.append(("This attempt's limit", f"{usd(cost.limit_usd)} (largest step {usd(cost.max_step_usd)}{overshoot})"))
    if cost.metric_name and cost.metric_value is not None:
        rows.append(("Result", metric_phrase(cost.metric_name, cost.metric_value)))
        rows.append(("Cost per quality point", usd(cost.cost_per_point_usd)))
    if cost.spot:
        rows.append(("Spot", f"{cost.spot_interruptions} interruptions, {duration(cost.spot_lost_seconds)} lost "
                             f"({usd(cost.spot_lost_usd)})"))
    return rows


def render_cost_markdown(cost: RunCost, title: str, booking: str) -> str:
    """The cost report artifact (Prefect) and run artifact (MLflow)."""
    lines = [f"# {usd(cost.cost_usd)} for {title}", "", f"_{booking}_", "", "| figure | value |", "| --- | --- |"]
    lines += [f"| {figure} | {value} |" for figure, value in cost_rows(cost)]
    if cost.epoch_costs:
        lines += ["", "| epoch | cost of the epoch | run so far, loading included |", "| ---: | ---: | ---: |"]
        previous = cost.epoch_costs[0][1] - _first_epoch_cost(cost)
        for epoch, cumulative in cost.epoch_costs:
            lines.append(f"| {epoch} | {usd(max(0.0, cumulative - previous))} | {usd(cumulative)} |")
            previous = cumulative
    return "\n".join(lines) + "\n"


def _first_epoch_cost(cost: RunCost) -> float:
    """Epoch 1 began when training began: the run had cost its earlier attempts and this one's loading by then."""
    started_at = cost.prior_micros / 1e6 + cost.before_training_usd
    return max(0.0, cost.epoch_costs[0][1] - started_at)
