"""Savings recommendations for one run, each computed from that run's data and its history.

Every strategy returns None when the data it needs is missing or shows no saving, so a
recommendation on screen always has a measurement behind it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field

from oppen.cost.price_book import PriceBook, Resources, on_demand_hourly_usd
from oppen.cost.pricing import price_interval
from oppen.cost.windows import next_off_peak_start

# Below these a metric change is noise, not an improvement worth paying an epoch for.
ACCURACY_TOLERANCE = 0.001  # 0.1 percentage point
RELATIVE_TOLERANCE = 0.01  # 1% of a lower-is-better metric (perplexity)
LOW_GPU_UTILIZATION = 0.15  # move to CPU below this
SMALLER_GPU_UTILIZATION = 0.40  # a cheaper GPU type below this
HEADROOM = 1.25  # requests recommended at measured peak x this


class RunRecord(BaseModel):
    """What the recommender knows about a run (read from MLflow by tasks.recommend_tasks)."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    workload: str
    started_at: datetime
    batch_size: int
    learning_rate: float
    epochs: int
    resources: Resources
    spot: bool = False
    checkpointed: bool = True
    cost_usd: float
    seconds: float
    peak_seconds: float
    samples_per_second: float | None = None
    metric_name: str | None = None
    metric_value: float | None = None
    higher_is_better: bool = True
    val_history: list[float] = Field(default_factory=list)  # primary validation metric per epoch
    epoch_costs: list[float] = Field(default_factory=list)  # cumulative USD at each epoch's end
    cpu_cores_mean: float | None = None
    cpu_cores_peak: float | None = None
    memory_peak_gib: float | None = None
    gpu_util_mean: float | None = None
    checkpoint_interval_seconds: float | None = None


class Recommendation(BaseModel):
    model_config = ConfigDict(frozen=True)

    strategy: str
    action: str
    evidence: str
    saving_usd: float
    saving_seconds: float = 0.0


def _close_enough(candidate: float, reference: float, higher_is_better: bool) -> bool:
    if higher_is_better:
        return candidate >= reference - ACCURACY_TOLERANCE
    return candidate <= reference * (1 + RELATIVE_TOLERANCE)


def _improves(new: float, old: float, higher_is_better: bool) -> bool:
    if higher_is_better:
        return new > old + ACCURACY_TOLERANCE
    return new < old * (1 - RELATIVE_TOLERANCE)


def early_stopping(run: RunRecord, **_) -> Recommendation | None:
    history, costs = run.val_history, run.epoch_costs
    if len(history) < 3 or len(costs) != len(history):
        return None
    best_epoch = 1
    for epoch in range(2, len(history) + 1):
        if _improves(history[epoch - 1], history[best_epoch - 1], run.higher_is_better):
            best_epoch = epoch
    if best_epoch == len(history):
        return None
    saved = costs[-1] - costs[best_epoch - 1]
    seconds = run.seconds * saved / run.cost_usd if run.cost_usd else 0.0
    return Recommendation(
        strategy="early_stopping",
        action=f"stop after epoch {best_epoch} of {len(history)} (patience on the validation metric)",
        evidence=f"validation metric plateaued: epochs {best_epoch + 1}-{len(history)} moved it less than the "
                 f"noise tolerance ({', '.join(f'{v:.4f}' for v in history)})",
        saving_usd=saved, saving_seconds=seconds,
    )


def batch_size(run: RunRecord, history: Sequence[RunRecord] = (), **_) -> Recommendation | None:
    if run.samples_per_second is None or run.metric_value is None:
        return None
    peers = [
        other for other in history
        if other.workload == run.workload and other.batch_size != run.batch_size and other.samples_per_second
        and other.metric_value is not None and other.resources == run.resources
        and _close_enough(other.metric_value, run.metric_value, run.higher_is_better)
    ]
    if not peers:
        return None
    best = max(peers, key=lambda other: other.samples_per_second)
    if best.samples_per_second <= run.samples_per_second * 1.05:
        return None
    fraction = 1 - run.samples_per_second / best.samples_per_second
    return Recommendation(
        strategy="batch_size",
        action=f"use batch size {best.batch_size} instead of {run.batch_size}",
        evidence=f"run {best.run_id[:8]} measured {best.samples_per_second:,.0f} samples/s vs {run.samples_per_second:,.0f} "
                 f"here, reaching {best.metric_name}={best.metric_value:.4f} (this run {run.metric_value:.4f})",
        saving_usd=run.cost_usd * fraction, saving_seconds=run.seconds * fraction,
    )


def _epochs_to_reach(history: Sequence[float], target: float, higher_is_better: bool) -> int | None:
    for epoch, value in enumerate(history, start=1):
        if (value >= target) if higher_is_better else (value <= target):
            return epoch
    return None


def learning_rate(run: RunRecord, history: Sequence[RunRecord] = (), **_) -> Recommendation | None:
    if not run.val_history or not run.epoch_costs:
        return None
    target = run.val_history[-1]
    best: tuple[int, RunRecord] | None = None
    for other in history:
        if other.workload != run.workload or other.batch_size != run.batch_size:
            continue
        if math.isclose(other.learning_rate, run.learning_rate, rel_tol=1e-9) or not other.val_history:
            continue
        reached = _epochs_to_reach(other.val_history, target, run.higher_is_better)
        if reached is not None and reached < len(run.val_history) and (best is None or reached < best[0]):
            best = (reached, other)
    if best is None:
        return None
    epochs, other = best
    saved = run.epoch_costs[-1] - run.epoch_costs[epochs - 1]
    return Recommendation(
        strategy="learning_rate",
        action=f"use learning rate {other.learning_rate:g} instead of {run.learning_rate:g}",
        evidence=f"run {other.run_id[:8]} reached this run's final validation metric ({target:.4f}) after "
                 f"{epochs} epoch(s) instead of {len(run.val_history)}",
        saving_usd=saved, saving_seconds=run.seconds * saved / run.cost_usd if run.cost_usd else 0.0,
    )


def low_utilization(run: RunRecord, book: PriceBook, **_) -> Recommendation | None:
    if not run.resources.gpus or run.gpu_util_mean is None:
        return None
    return gpu_advice(run.resources, run.gpu_util_mean, run.seconds, book)


def gpu_advice(resources: Resources, gpu_util_mean: float, seconds: float, book: PriceBook) -> Recommendation | None:
    """CPU below 15% GPU utilisation, a cheaper GPU type below 40%; None when no cheaper device applies."""
    hours = seconds / 3600
    now_hourly = on_demand_hourly_usd(book, resources)
    if gpu_util_mean < LOW_GPU_UTILIZATION:
        target = resources.model_copy(update={"gpus": 0, "gpu_type": None})
        action = "run on CPU"
    elif gpu_util_mean < SMALLER_GPU_UTILIZATION:
        current = book.rates.gpu_type_hour_usd.get(resources.gpu_type or "", book.rates.gpu_hour_usd)
        cheaper = sorted((rate, name) for name, rate in book.rates.gpu_type_hour_usd.items() if rate < current)
        if not cheaper:
            return None
        target = resources.model_copy(update={"gpu_type": cheaper[-1][1]})
        action = f"use the cheaper GPU type {cheaper[-1][1]}"
    else:
        return None
    saving = (now_hourly - on_demand_hourly_usd(book, target)) * hours
    return Recommendation(
        strategy="low_utilization", action=action,
        evidence=f"GPU utilisation averaged {gpu_util_mean:.0%} over the run (on-demand rate, same duration "
                 "assumed: an upper bound when the smaller device is slower)",
        saving_usd=saving,
    )


def off_peak(run: RunRecord, book: PriceBook, **_) -> Recommendation | None:
    if run.peak_seconds <= 0 or book.off_peak.discount <= 0:
        return None
    start = next_off_peak_start(book.off_peak, run.started_at)
    later = price_interval(book, run.resources, start, start + timedelta(seconds=run.seconds), spot=run.spot).usd
    saving = run.cost_usd - later
    if saving <= 0:
        return None
    return Recommendation(
        strategy="off_peak",
        action=f"schedule it in the off-peak window ({book.off_peak.start:%H:%M}-{book.off_peak.end:%H:%M} "
               f"{book.off_peak.timezone}, next at {start:%Y-%m-%d %H:%M %Z})",
        evidence=f"{run.peak_seconds:.0f} of {run.seconds:.0f} s ran at the peak price; off-peak is "
                 f"{book.off_peak.discount:.0%} cheaper",
        saving_usd=saving,
    )


def spot(run: RunRecord, book: PriceBook, **_) -> Recommendation | None:
    if run.spot or not run.checkpointed or book.spot.discount <= 0:
        return None
    hours = run.seconds / 3600
    interval = run.checkpoint_interval_seconds or run.seconds
    restart = 30.0  # pod rescheduling + checkpoint load, seconds; a conservative figure for a small image
    lost_seconds = book.spot.interruptions_per_hour * hours * (interval / 2 + restart)
    spot_cost = run.cost_usd * (1 - book.spot.discount) * (run.seconds + lost_seconds) / run.seconds
    saving = run.cost_usd - spot_cost
    if saving <= 0:
        return None
    return Recommendation(
        strategy="spot",
        action="run on spot capacity; it checkpoints, so a reclaim only loses the work since the last checkpoint",
        evidence=f"spot is {book.spot.discount:.0%} cheaper; at {book.spot.interruptions_per_hour:g} reclaims/hour "
                 f"this run expects {lost_seconds:.0f} s of lost work and restarts",
        saving_usd=saving, saving_seconds=-lost_seconds,
    )


def right_sizing(run: RunRecord, book: PriceBook, **_) -> Recommendation | None:
    if run.cpu_cores_peak is None or run.memory_peak_gib is None:
        return None
    cores = max(1.0, math.ceil(run.cpu_cores_peak * HEADROOM))
    memory = math.ceil(run.memory_peak_gib * HEADROOM * 4) / 4  # quarter-GiB steps
    requested = run.resources
    changes, target = [], requested
    if cores < requested.cpu_cores:
        changes.append(f"cpu {requested.cpu_cores:g} -> {cores:g} cores (peak {run.cpu_cores_peak:.2f})")
        target = target.model_copy(update={"cpu_cores": cores})
    if requested.memory_gib and memory < requested.memory_gib:
        changes.append(f"memory {requested.memory_gib:g} -> {memory:g} GiB (peak {run.memory_peak_gib:.2f})")
        target = target.model_copy(update={"memory_gib": memory})
    if not changes:
        return None
    saving = (on_demand_hourly_usd(book, requested) - on_demand_hourly_usd(book, target)) * run.seconds / 3600
    return Recommendation(
        strategy="right_sizing",
        action="request " + "; ".join(changes),
        evidence=f"measured peaks x{HEADROOM} headroom; freed requests also let more runs share a node",
        saving_usd=saving,
    )


STRATEGIES: tuple[Callable[..., Recommendation | None], ...] = (
    early_stopping, batch_size, learning_rate, low_utilization, off_peak, spot, right_sizing,
)


def recommend(run: RunRecord, history: Sequence[RunRecord], book: PriceBook) -> list[Recommendation]:
    """Every strategy with data behind it, largest saving first."""
    peers = [other for other in history if other.run_id != run.run_id]
    found = [strategy(run, history=peers, book=book) for strategy in STRATEGIES]
    return sorted((item for item in found if item is not None), key=lambda item: -item.saving_usd)
