"""Metered training runs for the cost benchmarks: the real loop and the real meter, no Prefect.

A clock offset moves the run's wall clock to a chosen time of day (noon for peak, 23:00 for
off-peak) so both are measured now, side by side, on the same noisy machine.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.common import mnist_dir
from oppen.cost.meter import CostMeter
from oppen.cost.price_book import PriceBook, Resources, load_price_book
from oppen.cost.quote import make_quote
from oppen.cost.speed import RunShape, from_calibration
from oppen.cost.spot import SpotSimulator, run_through_reclaims
from training.calibrate import calibrate
from training.config import RunConfig
from training.loop import Trained, plan_total_steps, train
from training.mnist.workload import MnistConfig, MnistWorkload

RESOURCES = Resources(cpu_cores=2)


def shifted_clock(to_hour: float | None):
    """A UTC clock running at real speed, starting at `to_hour` today (None: the real time)."""
    if to_hour is None:
        return lambda: datetime.now(UTC)
    now = datetime.now(UTC)
    target = now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(hours=to_hour)
    offset = target - now
    return lambda: datetime.now(UTC) + offset


@dataclass
class Metered:
    meter: CostMeter
    trained: Trained
    seconds: float
    spot: SpotSimulator | None = None


def mnist(seed: int = 0) -> MnistWorkload:
    return MnistWorkload.load(MnistConfig(data_dir=mnist_dir()), seed)


def calibrated_quote(book: PriceBook, workload, run: RunConfig, start: datetime, spot: bool = False):
    measured = calibrate(workload, run, 20)
    speed = from_calibration(measured.step_seconds, run.batch_size, measured.eval_seconds, 0.0)
    shape = RunShape(total_steps=plan_total_steps(workload, run), steps_per_epoch=workload.steps_per_epoch(run.batch_size),
                     batch_size=run.batch_size)
    return make_quote(book, RESOURCES, speed, shape, start, spot=spot)


def metered_run(workload, run: RunConfig, *, book: PriceBook | None = None, cap_usd: float | None = None,
                hour: float | None = None, spot: SpotSimulator | None = None, expected_step_seconds=None,
                expected_epoch_overhead_seconds: float = 0.0) -> Metered:
    book = book or load_price_book()
    clock = shifted_clock(hour)
    meter = CostMeter(book, RESOURCES, spot=spot is not None, cap_usd=cap_usd, clock=clock,
                      expected_step_seconds=expected_step_seconds,
                      expected_epoch_overhead_seconds=expected_epoch_overhead_seconds)
    callbacks = [meter] + ([spot] if spot else [])
    with tempfile.TemporaryDirectory() as checkpoints:
        started = time.perf_counter()
        trained = run_through_reclaims(lambda: train(workload, run, callbacks, checkpoint_dir=Path(checkpoints)))
    return Metered(meter, trained, time.perf_counter() - started, spot)
