"""Time a few training steps and one validation pass on a throwaway model: the speed a quote needs.

Runs before the real training and leaves nothing behind (its model and optimizer are discarded;
the real run re-seeds everything), so the run it calibrates for is unchanged by it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from training.config import RunConfig
from training.errors import TrainingRequestError
from training.runtime import epoch_generator, select_device
from training.workload import Workload

WARMUP_STEPS = 5  # first steps pay for kernel selection and allocator warm-up (measured ~2 s cold on CPU)


@dataclass(frozen=True)
class Calibration:
    step_seconds: list[float]
    eval_seconds: float
    batch_size: int
    device: str


def calibrate(workload: Workload, run: RunConfig, steps: int) -> Calibration:
    workload.check_run(run)
    if run.num_threads:
        torch.set_num_threads(run.num_threads)
    device = select_device(run.device)
    model = workload.build_model().to(device)
    timings = _time_steps(workload, run, model, device, steps)
    eval_started = time.perf_counter()
    workload.evaluate(model, "val", device)
    return Calibration(timings, time.perf_counter() - eval_started, run.batch_size, str(device))


def _time_steps(
    workload: Workload, run: RunConfig, model: torch.nn.Module, device: torch.device, steps: int
) -> list[float]:
    """Seconds of each of up to `steps` training steps after the warm-up."""
    optimizer = workload.make_optimizer(model, run)
    model.train()
    timings: list[float] = []
    batches = workload.train_batches(epoch_generator(run.seed + 7919, 1), run.batch_size, 0, device)
    started = time.perf_counter()
    for index, batch in enumerate(batches):
        if index >= steps + WARMUP_STEPS:
            break
        optimizer.zero_grad(set_to_none=True)
        loss, _ = workload.train_step(model, batch)
        loss.backward()
        optimizer.step()
        loss.item()  # synchronises CUDA
        now = time.perf_counter()
        if index >= WARMUP_STEPS:
            timings.append(now - started)
        started = now
    if not timings:
        # An epoch no longer than the warm-up leaves nothing to time, so no honest quote can be made.
        raise TrainingRequestError(
            f"calibration timed no steps: an epoch of batch_size {run.batch_size} has only "
            f"{workload.steps_per_epoch(run.batch_size)} steps and the first {WARMUP_STEPS} are warm-up; "
            "use a smaller batch_size"
        )
    return timings
