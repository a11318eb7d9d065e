"""A training run's story: the few log lines a person follows, in words and dollars (pure, no I/O).

The flow logs these lines on their own logger, `STORY_LOGGER`, beside Prefect's own lines; the
terminal follows a run by reading exactly them from the flow run's logs (oppen/terminal/follow.py),
so what a user watches is what the Prefect UI keeps, and nothing is parsed out of free text.
"""

from __future__ import annotations

from collections.abc import Mapping

from oppen.display import duration, metric_phrase, percent, signed_percent, usd

# A child of Prefect's flow-run logger, so Prefect's API handler ships the lines with the flow run's logs.
STORY_LOGGER = "prefect.flow_runs.story"
SEPARATOR = " · "


def quote_line(expected_usd: float, p90_usd: float, seconds: float, basis: str, cheapest_start: str | None,
               saving_usd: float) -> str:
    """"quote $0.000342 (p90 $0.000390) for ~21 s, from history (4 runs) · cheapest start now"."""
    cheapest = (f"cheapest start {cheapest_start}: saves {usd(saving_usd)}" if cheapest_start and saving_usd > 0
                else "cheapest start now")
    return SEPARATOR.join([f"quote {usd(expected_usd)} (p90 {usd(p90_usd)}) for ~{duration(seconds)}, {basis}",
                           cheapest])


def reserved_line(held_usd: float, attempt: int, cap_usd: float | None, prior_usd: float) -> str:
    """"reserved $0.000378 for attempt 1 · cap $0.0005"."""
    parts = [f"reserved {usd(held_usd)} for attempt {attempt}"]
    if prior_usd:
        parts.append(f"earlier attempts spent {usd(prior_usd)}")
    parts.append(f"cap {usd(cap_usd)}" if cap_usd is not None else "no cap")
    return SEPARATOR.join(parts)


def epoch_line(epoch: int, total_epochs: int | None, train_loss: float, metrics: Mapping[str, float], seconds: float,
               accrued_usd: float | None, forecast_usd: float | None, cap_usd: float | None) -> str:
    """"epoch 1/2 · loss 0.1312 · val accuracy 98.62% · 10.4 s · cost so far $0.000180 · forecast $0.000351 of $0.0005 cap"."""
    of = f"/{total_epochs}" if total_epochs else ""
    parts = [f"epoch {epoch}{of}", f"loss {train_loss:.4f}"]
    parts += [metric_phrase(name, value) for name, value in sorted(metrics.items()) if not name.endswith("_loss")]
    parts.append(duration(seconds))
    if accrued_usd is not None:
        parts.append(f"cost so far {usd(accrued_usd)}")
    if forecast_usd is not None:
        cap = f" of {usd(cap_usd)} cap ({percent(forecast_usd / cap_usd)})" if cap_usd else ""
        parts.append(f"forecast {usd(forecast_usd)}{cap}")
    return SEPARATOR.join(parts)


def stopped_line(step: int, total_steps: int, reason: str) -> str:
    return f"stopped at step {step}/{total_steps}: {reason}"


def evaluated_line(metric: str, value: float, split: str, samples: int) -> str:
    """"test accuracy 99.15% on 10,000 held-out samples (test split)"."""
    return f"{metric_phrase(metric, value)} on {samples:,} held-out samples ({split} split)"


def registered_line(name: str, version: int, alias: str) -> str:
    return f"registered {name} version {version} as {alias}"


def not_registered_line(metric: str, value: float, threshold: float, higher_is_better: bool) -> str:
    need = "at least" if higher_is_better else "at most"
    return f"not registered: {metric_phrase(metric, value)}, the threshold is {need} {threshold:g}"


def settled_line(cost_usd: float, cap_usd: float | None, status: str, quote_error: float | None, booked: bool,
                 attempt: int = 1, attempt_usd: float | None = None) -> str:
    """"settled $0.000351 of $0.0005 cap (70.2%) · quote error +2.6% · booked in the ledger"."""
    cap = f" of {usd(cap_usd)} cap ({percent(cost_usd / cap_usd)})" if cap_usd else ""
    parts = [f"settled {usd(cost_usd)}{cap}" + ("" if status == "settled" else f" ({status})")]
    if attempt > 1 and attempt_usd is not None:
        parts.append(f"attempt {attempt} {usd(attempt_usd)}, earlier attempts {usd(cost_usd - attempt_usd)}")
    if quote_error is not None:
        parts.append(f"quote error {signed_percent(quote_error)}")
    parts.append("booked in the ledger" if booked else "waiting for the ledger (oppen reconcile books it)")
    return SEPARATOR.join(parts)
