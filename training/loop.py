"""The training loop shared by every workload: `train(workload, run, callbacks) -> Trained`.

`train` reads as its stages (set up, resume, loop, finish); `_TrainingRun` owns what they share:
the model, the optimizer, the progress so far and where checkpoints go.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.callbacks import Callback, CallbackList, LoopControl, RunInfo, StepInfo
from training.config import RunConfig
from training.results import EpochRecord, TrainResult
from training.runtime import (
    capture_rng_state,
    epoch_generator,
    restore_rng_state,
    seed_everything,
    select_device,
)
from training.state import CheckpointError, CheckpointMismatchError, TrainingState, checkpoint_path
from training.workload import Workload

__all__ = ["CheckpointMismatchError", "Trained", "config_fingerprint", "plan_total_steps", "train"]

# Run settings that change where or how often things happen, not the arithmetic of training;
# a checkpoint may be resumed with different values for these.
_OPERATIONAL_FIELDS = {"checkpoint_subdir", "checkpoint_every_steps", "log_every_steps", "num_threads", "device"}


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


@dataclass(frozen=True)
class Trained:
    """The serialisable result plus the trained model object itself."""

    result: TrainResult
    model: torch.nn.Module


def train(
    workload: Workload, run: RunConfig, callbacks: list[Callback] | None = None, *, checkpoint_dir: Path | None = None
) -> Trained:
    """Train `workload` as `run` says.

    Checkpoints go to `checkpoint_dir`, which the caller (the platform) chooses; None keeps none.
    A checkpoint already there, written by the same config, is resumed from.
    """
    workload.check_run(run)
    training_run = _TrainingRun(workload, run, CallbackList(callbacks), checkpoint_dir)
    training_run.resume()
    training_run.announce()
    training_run.loop()
    return training_run.finish()


@dataclass
class _Progress:
    """Where the run is; the part of its state that a checkpoint carries besides the tensors."""

    step: int = 0
    samples_seen: int = 0
    history: list[EpochRecord] = field(default_factory=list)


@dataclass
class _EpochTally:
    """What this process saw of one epoch (a resumed epoch counts only the steps run here)."""

    epoch: int
    started: float = field(default_factory=time.perf_counter)
    loss_sum: float = 0.0
    steps: int = 0
    samples: int = 0

    def add(self, loss: float, samples: int) -> None:
        self.loss_sum += loss
        self.steps += 1
        self.samples += samples


class _TrainingRun:
    """One call of `train`: owns the model, the optimizer, the progress and the checkpoints."""

    def __init__(self, workload: Workload, run: RunConfig, hooks: CallbackList, checkpoint_dir: Path | None) -> None:
        self.workload, self.run, self.hooks = workload, run, hooks
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.control = LoopControl()
        if run.num_threads:
            torch.set_num_threads(run.num_threads)
        self.device = select_device(run.device)
        seed_everything(run.seed)  # before building the model: initial weights depend only on the seed
        self.model = workload.build_model().to(self.device)
        self.optimizer = workload.make_optimizer(self.model, run)
        self.steps_per_epoch = workload.steps_per_epoch(run.batch_size)
        self.total_steps = plan_total_steps(workload, run)
        self.scheduler = workload.make_scheduler(self.optimizer, run, self.total_steps)
        self.fingerprint = config_fingerprint(workload, run)
        self.progress = _Progress()
        self.resumed_from = 0
        self.last_checkpoint: str | None = None
        self.last_loss = float("nan")
        self.samples_this_process = 0
        self.started = time.perf_counter()

    # -- resume -------------------------------------------------------------------------------

    def resume(self) -> None:
        """Continue from the checkpoint in `checkpoint_dir`, when there is one."""
        state = TrainingState.load(self.checkpoint_dir) if self.checkpoint_dir is not None else None
        if state is None:
            return
        if state.fingerprint != self.fingerprint:
            raise CheckpointMismatchError(
                f"checkpoint in {self.checkpoint_dir} was written by config {state.fingerprint}, "
                f"this run is {self.fingerprint}; use another checkpoint_subdir or the same config"
            )
        self._restore(state)
        self.progress = _Progress(state.step, state.samples_seen, state.epoch_records())
        self.resumed_from = state.step

    def _restore(self, state: TrainingState) -> None:
        try:
            self.model.load_state_dict(state.model)
            self.optimizer.load_state_dict(state.optimizer)
            self.scheduler.load_state_dict(state.scheduler)
            restore_rng_state(state.rng)
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            # Same fingerprint but unusable contents: the file was edited, not written by this config.
            raise CheckpointError(
                f"{checkpoint_path(self.checkpoint_dir)} does not fit this run ({type(error).__name__}: {error})"
            ) from error

    # -- loop ---------------------------------------------------------------------------------

    def announce(self) -> None:
        self.hooks.on_train_start(
            RunInfo(
                workload=self.workload.name,
                device=str(self.device),
                total_steps=self.total_steps,
                steps_per_epoch=self.steps_per_epoch,
                epochs=self.run.epochs,
                batch_size=self.run.batch_size,
                start_step=self.resumed_from,
                config={"workload": self.workload.config_dict(), "run": self.run.model_dump(mode="json")},
            ),
            self.control,
        )

    def loop(self) -> None:
        """Epochs until the planned steps are done or a callback stops the run; a stop is checkpointed."""
        self.started = time.perf_counter()
        self.model.train()
        while self.progress.step < self.total_steps and not self.control.should_stop:
            tally = self._train_epoch()
            if tally.steps and self._at_epoch_end() and not self.control.should_stop:
                self._end_epoch(tally)
        if self.control.should_stop:
            self._save(f"stopped: {self.control.stop_reason}")

    def _train_epoch(self) -> _EpochTally:
        """The rest of the current epoch (all of it, unless resuming mid-epoch) or until a stop."""
        tally = _EpochTally(epoch=self.progress.step // self.steps_per_epoch + 1)
        start_batch = self.progress.step % self.steps_per_epoch
        generator = epoch_generator(self.run.seed, tally.epoch)
        batches = self.workload.train_batches(generator, self.run.batch_size, start_batch, self.device)
        for batch_in_epoch, batch in enumerate(batches, start=start_batch + 1):
            if self.progress.step >= self.total_steps or batch_in_epoch > self.steps_per_epoch:
                break
            self._step(tally, batch_in_epoch, batch)
            if self.control.should_stop:
                break
        return tally

    def _step(self, tally: _EpochTally, batch_in_epoch: int, batch: Any) -> None:
        """One optimizer step, unless a callback stops the run just before it (a budget cap)."""
        step = self.progress.step + 1
        shape = (step, tally.epoch, batch_in_epoch, self.steps_per_epoch, self.total_steps)
        self.hooks.on_step_begin(StepInfo(*shape, self.run.batch_size), self.control)
        if self.control.should_stop:
            return
        loss, samples, seconds = self._optimize(batch)
        self.progress.step = step
        self.progress.samples_seen += samples
        self.samples_this_process += samples
        tally.add(loss, samples)
        self.hooks.on_step_end(StepInfo(*shape, samples, loss, seconds), self.control)
        if self.run.checkpoint_every_steps and step % self.run.checkpoint_every_steps == 0:
            self._save("interval")

    def _optimize(self, batch: Any) -> tuple[float, int, float]:
        """Forward, backward and update; returns (loss, samples, seconds)."""
        started = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss, samples = self.workload.train_step(self.model, batch)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.last_loss = loss.item()  # also synchronises CUDA, so the step time is real
        return self.last_loss, samples, time.perf_counter() - started

    def _at_epoch_end(self) -> bool:
        return self.progress.step % self.steps_per_epoch == 0 or self.progress.step >= self.total_steps

    def _end_epoch(self, tally: _EpochTally) -> None:
        seconds = time.perf_counter() - tally.started  # before validation: throughput is training's
        metrics = self.workload.evaluate(self.model, "val", self.device)
        self.model.train()
        record = EpochRecord(
            epoch=tally.epoch,
            step=self.progress.step,
            train_loss=tally.loss_sum / tally.steps,
            metrics=metrics,
            epoch_seconds=seconds,
            samples_per_second=tally.samples / max(seconds, 1e-9),
        )
        self.progress.history.append(record)
        self._save("epoch")
        self.hooks.on_epoch_end(record, self.control)

    # -- checkpoints and the result -------------------------------------------------------------

    def _save(self, reason: str) -> None:
        if self.checkpoint_dir is None:
            return
        path = str(self._state(reason).save(self.checkpoint_dir))
        self.last_checkpoint = path
        self.hooks.on_checkpoint(path, self.progress.step, self.control)

    def _state(self, reason: str) -> TrainingState:
        return TrainingState(
            fingerprint=self.fingerprint,
            workload=self.workload.name,
            workload_config=self.workload.config_dict(),
            run_config=self.run.model_dump(mode="json"),
            step=self.progress.step,
            samples_seen=self.progress.samples_seen,
            history=[record.model_dump() for record in self.progress.history],
            model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            rng=capture_rng_state(),
            reason=reason,
        )

    def finish(self) -> Trained:
        seconds = time.perf_counter() - self.started
        history = self.progress.history
        result = TrainResult(
            workload=self.workload.name,
            device=str(self.device),
            steps=self.progress.step,
            total_steps=self.total_steps,
            samples_seen=self.progress.samples_seen,
            epochs_completed=self.progress.step // self.steps_per_epoch,
            resumed_from_step=self.resumed_from,
            stopped_early=self.control.should_stop,
            stop_reason=self.control.stop_reason,
            train_seconds=seconds,
            samples_per_second=self.samples_this_process / max(seconds, 1e-9),
            final_train_loss=self._final_train_loss(),
            history=history,
            val_metrics=history[-1].metrics if history else {},
            checkpoint_path=self.last_checkpoint,
            num_parameters=sum(p.numel() for p in self.model.parameters()),
            callback_seconds=self.hooks.seconds,
            callback_seconds_by=dict(self.hooks.seconds_by),
        )
        self.hooks.on_train_end(result, self.control)
        return Trained(result=result, model=self.model)

    def _final_train_loss(self) -> float:
        # A resumed run that had nothing left to do reports the loss of its last recorded epoch.
        if self.samples_this_process or not self.progress.history:
            return self.last_loss
        return self.progress.history[-1].train_loss
