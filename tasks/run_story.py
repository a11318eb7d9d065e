"""The run's story lines (oppen/story.py), logged on their own logger with the flow run's context."""

from __future__ import annotations

import logging

from oppen.cost.meter import CostMeter
from oppen.story import STORY_LOGGER, epoch_line, stopped_line
from training.callbacks import Callback, LoopControl, RunInfo
from training.results import EpochRecord, TrainResult


def story_logger() -> logging.LoggerAdapter:
    """The story logger, attached to the current flow run (also from a task: the lines belong to the run).

    Prefect's API handler ships a record only when it names its flow run; outside a flow run the lines
    still reach the console.
    """
    from prefect.context import FlowRunContext
    from prefect.logging.loggers import PrefectLogAdapter

    base = logging.getLogger(STORY_LOGGER)
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return logging.LoggerAdapter(base, {})
    run = context.flow_run
    return PrefectLogAdapter(base, extra={"flow_run_name": run.name, "flow_run_id": str(run.id),
                                          "flow_name": context.flow.name if context.flow else "<unknown>"})


class StoryCallback(Callback):
    """One line per epoch: loss, validation metrics, time, cost so far and the forecast against the cap.

    Placed after the cost meter among the callbacks, so the meter's forecast at this epoch's end exists.
    """

    def __init__(self, logger: logging.LoggerAdapter, meter: CostMeter) -> None:
        self.logger, self.meter = logger, meter
        self.total_epochs: int | None = None
        self.total_steps = 0

    def on_train_start(self, info: RunInfo, control: LoopControl) -> None:
        self.total_steps = info.total_steps
        self.total_epochs = -(-info.total_steps // info.steps_per_epoch)  # max_steps may end it early

    def on_epoch_end(self, epoch: EpochRecord, control: LoopControl) -> None:
        point = self.meter.forecasts[-1] if self.meter.forecasts else None
        fresh = point is not None and point.step == epoch.step
        self.logger.info(epoch_line(
            epoch.epoch, self.total_epochs, epoch.train_loss, epoch.metrics, epoch.epoch_seconds,
            accrued_usd=self.meter.run_usd, forecast_usd=point.forecast_usd if fresh else None,
            cap_usd=self.meter.cap_usd,
        ))

    def on_train_end(self, result: TrainResult, control: LoopControl) -> None:
        if result.stopped_early and result.stop_reason:
            self.logger.warning(stopped_line(result.steps, result.total_steps, result.stop_reason))
