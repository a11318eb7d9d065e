"""The training loop shared by every workload: `train(workload, run, callbacks) -> TrainResult`."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

import torch

from training.callbacks import Callback, CallbackList, LoopControl, RunInfo, StepInfo
from training.checkpoint import load_checkpoint, save_checkpoint
from training.config import RunConfig
from training.results import EpochRecord, TrainResult
from training.runtime import (
    capture_rng_state,
    epoch_generator,
    restore_rng_state,
    seed_everything,
    select_device,
)
from training.workload import Workload

# Run settings that change where or how often things happen, not the arithmetic of training;
# a checkpoint may be resumed with different values for these.
_OPERATIONAL_FIELDS = {"checkpoint_dir", "checkpoint_every_steps", "log_every_steps", "num_threads", "device"}


class CheckpointMismatchError(ValueError):
    """A checkpoint exists but was written by a different configuration."""


def config_fingerprint(workload: Workload, run: RunConfig) -> str:
    """Stable hash of everything that determines the training arithmetic (used for resume and history)."""
    payload = {
        "workload": workload.name,
        "config": workload.config_dict(),
        "run": run.model_dump(mode="json", exclude=_OPERATIONAL_FIELDS),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_total_steps(workload: Workload, run: RunConfig) -> int:
    total = workload.steps_per_epoch(run.batch_size) * run.epochs
    return min(total, run.max_steps) if run.max_steps else total


@dataclass
class _Progress:
    step: int = 0
    samples_seen: int = 0
    history: list[EpochRecord] = field(default_factory=list)


@dataclass(frozen=True)
class Trained:
    """The serialisable result plus the trained model object itself."""

    result: TrainResult
    model: torch.nn.Module


def train(workload: Workload, run: RunConfig, callbacks: list[Callback] | None = None) -> Trained:
    """Train `workload` as `run` says, resuming from `run.checkpoint_dir` when a checkpoint is there."""
    hooks = CallbackList(callbacks)
    control = LoopControl()
    if run.num_threads:
        torch.set_num_threads(run.num_threads)
    device = select_device(run.device)
    seed_everything(run.seed)
    model = workload.build_model().to(device)
    optimizer = workload.make_optimizer(model, run)
    steps_per_epoch = workload.steps_per_epoch(run.batch_size)
    total_steps = plan_total_steps(workload, run)
    scheduler = workload.make_scheduler(optimizer, run, total_steps)
    fingerprint = config_fingerprint(workload, run)
    progress = _Progress()

    checkpoint = load_checkpoint(run.checkpoint_dir) if run.checkpoint_dir else None
    if checkpoint is not None:
        if checkpoint["fingerprint"] != fingerprint:
            raise CheckpointMismatchError(
                f"checkpoint in {run.checkpoint_dir} was written by config {checkpoint['fingerprint']}, "
                f"this run is {fingerprint}; use another checkpoint_dir or the same config"
            )
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        restore_rng_state(checkpoint["rng"])
        progress = _Progress(
            step=checkpoint["step"],
            samples_seen=checkpoint["samples_seen"],
            history=[EpochRecord(**record) for record in checkpoint["history"]],
        )
    resumed_from = progress.step

    def save(reason: str) -> str | None:
        if not run.checkpoint_dir:
            return None
        path = save_checkpoint(
            run.checkpoint_dir,
            {
                "fingerprint": fingerprint,
                "workload": workload.name,
                "workload_config": workload.config_dict(),
                "run_config": run.model_dump(mode="json"),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": capture_rng_state(),
                "step": progress.step,
                "samples_seen": progress.samples_seen,
                "history": [record.model_dump() for record in progress.history],
                "reason": reason,
            },
        )
        hooks.on_checkpoint(str(path), progress.step, control)
        return str(path)

    hooks.on_train_start(
        RunInfo(
            workload=workload.name,
            device=str(device),
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            epochs=run.epochs,
            batch_size=run.batch_size,
            start_step=resumed_from,
            config={"workload": workload.config_dict(), "run": run.model_dump(mode="json")},
        ),
        control,
    )

    started = time.perf_counter()
    samples_this_process = 0
    last_loss = float("nan")
    last_checkpoint: str | None = None
    model.train()
    while progress.step < total_steps and not control.should_stop:
        epoch = progress.step // steps_per_epoch + 1
        start_batch = progress.step % steps_per_epoch
        epoch_started = time.perf_counter()
        epoch_loss_sum, epoch_steps, epoch_samples = 0.0, 0, 0
        batches = workload.train_batches(epoch_generator(run.seed, epoch), run.batch_size, start_batch, device)
        for batch_index, batch in enumerate(batches, start=start_batch + 1):
            if progress.step >= total_steps or batch_index > steps_per_epoch:
                break
            step_number = progress.step + 1
            planned = StepInfo(step_number, epoch, batch_index, steps_per_epoch, total_steps, run.batch_size)
            hooks.on_step_begin(planned, control)
            if control.should_stop:
                break
            step_started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss, samples = workload.train_step(model, batch)
            loss.backward()
            optimizer.step()
            scheduler.step()
            last_loss = loss.item()  # also synchronises CUDA, so step timing below is real
            step_seconds = time.perf_counter() - step_started
            progress.step = step_number
            progress.samples_seen += samples
            samples_this_process += samples
            epoch_loss_sum += last_loss
            epoch_steps += 1
            epoch_samples += samples
            hooks.on_step_end(
                StepInfo(step_number, epoch, batch_index, steps_per_epoch, total_steps, samples, last_loss, step_seconds),
                control,
            )
            if run.checkpoint_every_steps and progress.step % run.checkpoint_every_steps == 0:
                last_checkpoint = save("interval")
            if control.should_stop:
                break

        epoch_finished = progress.step % steps_per_epoch == 0 or progress.step >= total_steps
        if epoch_steps and epoch_finished and not control.should_stop:
            epoch_seconds = time.perf_counter() - epoch_started
            metrics = workload.evaluate(model, "val", device)
            model.train()
            record = EpochRecord(
                epoch=epoch,
                step=progress.step,
                train_loss=epoch_loss_sum / epoch_steps,
                metrics=metrics,
                epoch_seconds=epoch_seconds,
                samples_per_second=epoch_samples / max(epoch_seconds, 1e-9),
            )
            progress.history.append(record)
            last_checkpoint = save("epoch")
            hooks.on_epoch_end(record, control)

    if control.should_stop:
        last_checkpoint = save(f"stopped: {control.stop_reason}")
    train_seconds = time.perf_counter() - started
    last_record = progress.history[-1] if progress.history else None
    result = TrainResult(
        workload=workload.name,
        device=str(device),
        steps=progress.step,
        total_steps=total_steps,
        samples_seen=progress.samples_seen,
        epochs_completed=progress.step // steps_per_epoch,
        resumed_from_step=resumed_from,
        stopped_early=control.should_stop,
        stop_reason=control.stop_reason,
        train_seconds=train_seconds,
        samples_per_second=samples_this_process / max(train_seconds, 1e-9),
        final_train_loss=last_loss if samples_this_process else (last_record.train_loss if last_record else last_loss),
        history=progress.history,
        val_metrics=last_record.metrics if last_record else {},
        checkpoint_path=last_checkpoint,
        num_parameters=sum(p.numel() for p in model.parameters()),
    )
    hooks.on_train_end(result, control)
    return Trained(result=result, model=model)
