"""What a run will cost by the end of its plan, or with N more epochs: forecast_training_cost.

From the run's own logged speed (else its request's speed history), priced by the book from now,
with the meter's formula for the time left.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from mlflow import MlflowClient
from mlflow.entities import Run
from pydantic import BaseModel, ConfigDict, Field

from oppen import tracking_keys as keys
from oppen.api import context
from oppen.api.errors import InvalidInput, NotFound
from oppen.api.recommendations import FLOW_RUN_ID, MLFLOW_RUN_ID, find_run
from oppen.api.run_cost import ledger_run
from oppen.cost.forecast import remaining_seconds
from oppen.cost.ledger import RESERVED
from oppen.cost.money import Micros, format_usd, format_usd_amount, to_micros, usd_float
from oppen.cost.price_book import PriceBook, Resources, on_demand_hourly_usd
from oppen.cost.pricing import price_interval
from oppen.cost.speed import SpeedEstimate, from_history
from oppen.cost.windows import next_off_peak_start, regime_at
from tasks.cost_history import SPEED_KEY_TAG, past_runs


FLOW_RUN_TAG = "prefect.flow_run_id"
RUNNING_STATUSES = ("RUNNING", "SCHEDULED")  # MLflow's; the others (FINISHED, FAILED, KILLED) have ended


@dataclass(frozen=True)
class RunFigures:
    """What a run logged that a forecast needs, read from its MLflow run (parsed apart from MLflow for tests)."""

    status: str  # MLflow's: RUNNING, FINISHED, FAILED, KILLED
    batch_size: int
    epochs: int
    max_steps: int | None
    steps_per_epoch: int
    steps_done: int
    accrued_usd: float
    step_seconds: float | None
    step_source: str
    epoch_overhead_s: float | None
    fixed_overhead_s: float | None
    tail_s: float | None

    @property
    def running(self) -> bool:
        return self.status in RUNNING_STATUSES

    @property
    def planned_steps(self) -> int:
        total = self.epochs * self.steps_per_epoch
        return min(total, self.max_steps) if self.max_steps else total

    @property
    def epoch_ends_done(self) -> int:
        # A run ends its last (partial) epoch too: a finished run has every epoch end of its plan behind it.
        if self.status == "FINISHED" and self.steps_done >= self.planned_steps:
            return -(-self.steps_done // self.steps_per_epoch)
        return self.steps_done // self.steps_per_epoch


@dataclass(frozen=True)
class Work:
    """The time still to pay for: the epochs' steps and epoch ends, and what every attempt pays besides."""

    epochs: float  # epochs of work priced
    epoch_seconds: float  # one full epoch: its steps and its validation/checkpoint
    training_seconds: float  # the steps and epoch ends still to come
    overhead_seconds: float  # loading again (an ended run) and the test pass + model logging (a run not yet done)


def work_ahead(figures: RunFigures, speed: SpeedEstimate, remaining_epochs: int | None) -> Work:
    """The meter's own formula (oppen.cost.forecast.remaining_seconds) applied to what is left.

    Default: the rest of the run's plan. With `remaining_epochs`: that many full epochs more; a run
    that has ended (finished, stopped, failed) would start again, so it also pays its loading.
    """
    step_seconds = speed.seconds_per_sample * figures.batch_size
    per_epoch = figures.steps_per_epoch * step_seconds + speed.epoch_overhead_seconds
    if remaining_epochs is None:
        steps_left = max(0, figures.planned_steps - figures.steps_done)
        training = remaining_seconds(
            steps_done=figures.steps_done, total_steps=figures.planned_steps, steps_per_epoch=figures.steps_per_epoch,
            step_seconds=step_seconds, epoch_overhead_seconds=speed.epoch_overhead_seconds,
            epoch_ends_done=figures.epoch_ends_done,
        ) if steps_left else 0.0
        epochs = steps_left / figures.steps_per_epoch
    else:
        epochs = float(remaining_epochs)
        training = remaining_epochs * per_epoch
    if figures.running:
        overhead = speed.tail_seconds  # it still has its test pass and model logging ahead
    elif training > 0:
        overhead = speed.fixed_overhead_seconds + speed.tail_seconds  # a new attempt: load, train, evaluate, log
    else:
        overhead = 0.0
    return Work(epochs=epochs, epoch_seconds=per_epoch, training_seconds=training, overhead_seconds=overhead)


class CostForecast(BaseModel):
    """What a run will have cost by the end of its plan, or with N more epochs, priced from now."""

    model_config = ConfigDict(frozen=True)

    mlflow_run_id: str = Field(description="The MLflow run read.")
    flow_run_id: str | None = Field(description="Its Prefect flow run (the ledger's run key).")
    workload: str | None = Field(description="mnist or lm.")
    status: str = Field(description="MLflow's status: RUNNING, FINISHED, FAILED or KILLED (preempted).")
    steps_done: int = Field(description="Optimizer steps it has done.")
    steps_per_epoch: int = Field(description="Steps in one full epoch of its data at its batch size.")
    epochs_done: float = Field(description="Epochs done (fractional: a max_steps run may end mid-epoch).")
    epochs_planned: int = Field(description="Epochs its run config asks for.")
    planned_steps: int = Field(description="Steps its plan asks for (epochs x steps per epoch, at most max_steps).")
    remaining_epochs: float = Field(description="Epochs priced: the rest of its plan, or the number asked for.")
    accrued_micros: Micros = Field(description="What it has cost so far: the ledger's booked figure for an ended run, "
                                   "the meter's latest reading for a running one.")
    accrued_usd: float = Field(description="The same, in dollars.")
    per_epoch_usd: float = Field(description="One full epoch (steps and validation) at the price from now.")
    epochs_usd: float = Field(description="The epochs priced, without the overhead below.")
    overhead_usd: float = Field(description="Loading again (a run that ended) and the test pass and model logging.")
    additional_usd: float = Field(description="Expected cost still to come: epochs and overhead.")
    additional_p90_usd: float = Field(description="The same at p90 of its speed.")
    forecast_usd: float = Field(description="accrued + additional: the run's expected total.")
    forecast_p90_usd: float = Field(description="accrued + additional at p90.")
    remaining_seconds: float = Field(description="Expected wall time still to come.")
    step_seconds: float = Field(description="Seconds per optimizer step used.")
    speed_source: str = Field(description="Where the speed comes from (this run's measurement, its latest epoch, "
                              "its steps so far, or earlier runs of the same config).")
    resources: Resources = Field(description="What it is billed for.")
    spot: bool = Field(description="Billed at the spot price.")
    hourly_usd: float = Field(description="On-demand price of its resources per hour (before off-peak and spot).")
    off_peak_now: bool = Field(description="The off-peak window is open now.")
    peak_seconds: float = Field(description="Of remaining_seconds from now, those at the peak price.")
    off_peak_seconds: float = Field(description="Of remaining_seconds from now, those at the off-peak price.")
    cheapest_start: datetime = Field(description="When the additional work costs least (the next off-peak window, "
                                     "or now).")
    cheapest_additional_usd: float = Field(description="additional_usd when started then.")
    saving_usd: float = Field(description="additional_usd - cheapest_additional_usd.")
    cap_micros: Micros | None = Field(description="Its max_cost_usd over all attempts, in micro-dollars.")
    cap_usd: float | None = Field(description="The same, in dollars.")
    within_cap: bool | None = Field(description="forecast_usd stays within the cap; None: no cap.")
    meter_forecast_usd: float | None = Field(description="The run's own latest forecast of its plan (while running).")
    notes: list[str] = Field(description="What the forecast assumes.")
    summary: str = Field(description="One line for a person.")


def forecast_training_cost(run: str, remaining_epochs: int | None = None) -> CostForecast:
    """The forecast total of a run (flow run id or MLflow run id): by the end of its plan, or with N more epochs."""
    if remaining_epochs is not None and (isinstance(remaining_epochs, bool) or not isinstance(remaining_epochs, int)
                                         or not 0 <= remaining_epochs <= 1000):
        raise InvalidInput(f"remaining_epochs must be a whole number from 0 to 1000, got {remaining_epochs!r}")
    value = str(run).strip().lower()
    if not (FLOW_RUN_ID.match(value) or MLFLOW_RUN_ID.match(value)):  # refused before any store is opened
        raise InvalidInput(f"{run!r} is neither a flow run id (a UUID) nor an MLflow run id (32 hex digits)")
    settings, book = context.settings(), context.price_book()
    client = context.mlflow(settings)
    tracked = find_run(client, value)
    flow_run_id = tracked.data.tags.get(FLOW_RUN_TAG)
    with context.ledger(settings) as ledger:
        booked = ledger_run(ledger, run_key=flow_run_id) if flow_run_id else None
    figures = run_figures(client, tracked)
    speed, source, notes = speed_of(client, tracked, figures)
    work = work_ahead(figures, speed, remaining_epochs)
    accrued = _accrued_micros(figures, booked)
    cap_micros = booked["cap_micros"] if booked and booked["cap_micros"] is not None else _cap_param(tracked)
    return _forecast(tracked, flow_run_id, figures, speed, source, work, accrued, cap_micros, book, notes)


def run_figures(client: MlflowClient, tracked: Run) -> RunFigures:
    """The run's plan and progress from its params and metrics; NotFound when it never reached training."""
    params, metrics = tracked.data.params, tracked.data.metrics
    run_id = tracked.info.run_id
    steps_per_epoch = _param(params, keys.STEPS_PER_EPOCH_PARAM, int) or 0
    if steps_per_epoch < 1:
        raise NotFound(f"MLflow run {run_id} has no quote logged ({keys.STEPS_PER_EPOCH_PARAM}): it never reached "
                       "training, so there is nothing to forecast from")
    batch = _param(params, "run.batch_size", int) or 1
    accrued_points = client.get_metric_history(run_id, keys.COST_ACCRUED)
    # A resumed run still carries the steps of its earlier attempt; the meter's readings are this attempt's.
    steps_done = max([int(metrics.get(keys.STEPS_COMPLETED, 0))] + [point.step for point in accrued_points])
    running = tracked.info.status in RUNNING_STATUSES
    # The meter's reading includes earlier attempts; cost/total_usd is the total at the last settle.
    accrued = metrics.get(keys.COST_ACCRUED if running else keys.COST_TOTAL,
                          metrics.get(keys.COST_TOTAL if running else keys.COST_ACCRUED, 0.0))
    step_seconds, source = _step_seconds(metrics, accrued_points, batch)
    return RunFigures(
        status=tracked.info.status, batch_size=batch, epochs=_param(params, "run.epochs", int) or 1,
        max_steps=_param(params, "run.max_steps", int), steps_per_epoch=steps_per_epoch, steps_done=steps_done,
        accrued_usd=accrued,
        step_seconds=step_seconds, step_source=source,
        epoch_overhead_s=metrics.get(keys.EPOCH_OVERHEAD_SECONDS),
        fixed_overhead_s=metrics.get(keys.FIXED_OVERHEAD_SECONDS), tail_s=metrics.get(keys.TAIL_SECONDS),
    )


def _step_seconds(metrics: dict[str, float], accrued_points: list, batch: int) -> tuple[float | None, str]:
    """The run's own speed, best first: the steady speed it settled with, its latest epoch, its steps so far."""
    if metrics.get(keys.SECONDS_PER_SAMPLE, 0) > 0:
        return metrics[keys.SECONDS_PER_SAMPLE] * batch, "this run's measured steady speed"
    if metrics.get(keys.SAMPLES_PER_SECOND, 0) > 0:
        return batch / metrics[keys.SAMPLES_PER_SECOND], "this run's latest epoch"
    # In each epoch the meter logs cost/accrued_usd every tenth of the epoch: steps over time between
    # them, within this attempt only (a resumed run's earlier points are separated by the time it was down).
    points = sorted(accrued_points, key=lambda point: point.timestamp)
    first = len(points) - 1
    while first > 0 and points[first - 1].step < points[first].step:
        first -= 1
    start, end = points[first] if points else None, points[-1] if points else None
    if start is not None and end.step > start.step and end.timestamp > start.timestamp:
        return (end.timestamp - start.timestamp) / 1000 / (end.step - start.step), "this run's steps so far"
    return None, ""


def speed_of(client: MlflowClient, tracked: Run, figures: RunFigures) -> tuple[SpeedEstimate, str, list[str]]:
    """The run's own figures where it logged them, the speed history of its config for the rest."""
    key = tracked.data.tags.get(SPEED_KEY_TAG)
    history = from_history(past_runs(client, key)) if key else None
    notes = []
    if figures.step_seconds is not None:
        per_sample, source, observations = figures.step_seconds / figures.batch_size, figures.step_source, 1
    elif history is not None:
        per_sample, observations = history.seconds_per_sample, history.observations
        source = f"{history.observations} earlier run(s) of the same config"
    else:
        raise NotFound(f"MLflow run {tracked.info.run_id} has logged no step times yet and its config has no speed "
                       "history: nothing to forecast from; ask again after its first steps")

    def part(own: float | None, from_history_: float, what: str) -> float:
        if own is not None:
            return max(0.0, own)
        if history is not None:
            return from_history_
        notes.append(f"{what} unknown (not logged yet, no history): counted as 0 s")
        return 0.0

    speed = SpeedEstimate(
        seconds_per_sample=per_sample,
        epoch_overhead_seconds=part(figures.epoch_overhead_s, history.epoch_overhead_seconds if history else 0.0,
                                    "validation and checkpoint time per epoch"),
        fixed_overhead_seconds=part(figures.fixed_overhead_s, history.fixed_overhead_seconds if history else 0.0,
                                    "loading time"),
        tail_seconds=part(figures.tail_s, history.tail_seconds if history else 0.0, "test pass and model logging time"),
        source="history", observations=observations, spread=history.spread if history else 0.0,
    )
    return speed, source, notes


def _forecast(tracked: Run, flow_run_id: str | None, figures: RunFigures, speed: SpeedEstimate, source: str,
              work: Work, accrued: Micros, cap_micros: Micros | None, book: PriceBook, notes: list[str]) -> CostForecast:
    resources, spot = _resources(tracked.data.params), tracked.data.params.get("cost.spot") == "True"
    now = datetime.now(timezone.utc)

    def price(seconds: float, start: datetime = now):
        return price_interval(book, resources, start, start + timedelta(seconds=seconds), spot=spot)

    seconds = work.training_seconds + work.overhead_seconds
    additional, p90, epochs = price(seconds), price(seconds * speed.p90_factor), price(work.training_seconds)
    cheapest_start = next_off_peak_start(book.off_peak, now)
    cheapest = price(seconds, cheapest_start).usd
    if cheapest >= additional.usd:  # already off-peak, or no discount
        cheapest_start, cheapest = now, additional.usd
    accrued_usd = usd_float(accrued)
    forecast_usd = accrued_usd + additional.usd
    forecast = CostForecast(
        mlflow_run_id=tracked.info.run_id, flow_run_id=flow_run_id, workload=tracked.data.tags.get("oppen.workload"),
        status=figures.status, steps_done=figures.steps_done, steps_per_epoch=figures.steps_per_epoch,
        epochs_done=figures.steps_done / figures.steps_per_epoch, epochs_planned=figures.epochs,
        planned_steps=figures.planned_steps, remaining_epochs=work.epochs, accrued_micros=accrued,
        accrued_usd=accrued_usd, per_epoch_usd=price(work.epoch_seconds).usd,
        epochs_usd=epochs.usd, overhead_usd=max(0.0, additional.usd - epochs.usd),
        additional_usd=additional.usd, additional_p90_usd=p90.usd, forecast_usd=forecast_usd,
        forecast_p90_usd=accrued_usd + p90.usd, remaining_seconds=seconds,
        step_seconds=speed.seconds_per_sample * figures.batch_size, speed_source=source,
        resources=resources, spot=spot, hourly_usd=on_demand_hourly_usd(book, resources),
        off_peak_now=regime_at(book.off_peak, now)[2], peak_seconds=additional.peak_seconds,
        off_peak_seconds=additional.off_peak_seconds, cheapest_start=cheapest_start,
        cheapest_additional_usd=cheapest, saving_usd=additional.usd - cheapest, cap_micros=cap_micros,
        cap_usd=usd_float(cap_micros) if cap_micros is not None else None,
        within_cap=(to_micros(forecast_usd) <= cap_micros) if cap_micros is not None else None,
        meter_forecast_usd=tracked.data.metrics.get(keys.COST_FORECAST) if figures.running else None,
        notes=notes, summary="",
    )
    return forecast.model_copy(update={"summary": _describe_forecast(forecast)})


def _describe_forecast(forecast: CostForecast) -> str:
    if forecast.additional_usd == 0:
        return (f"{forecast.status.lower()}: {format_usd(forecast.accrued_micros)} so far and nothing left of its plan; "
                "ask with remaining_epochs=N for N more epochs")
    text = (f"{forecast.remaining_epochs:g} more epoch(s): +{format_usd_amount(forecast.additional_usd)} (p90 "
            f"{format_usd_amount(forecast.additional_p90_usd)}) on {format_usd(forecast.accrued_micros)} so far = "
            f"{format_usd_amount(forecast.forecast_usd)}")
    if forecast.saving_usd > 0:
        text += f"; from {forecast.cheapest_start:%Y-%m-%d %H:%M} UTC it saves {format_usd_amount(forecast.saving_usd)}"
    if forecast.within_cap is False:
        text += f"; over its cap of {format_usd(forecast.cap_micros)}"
    return text


def _accrued_micros(figures: RunFigures, booked: dict | None) -> Micros:
    """The ledger's exact figure once the run's money is settled; the meter's latest reading while it runs."""
    if booked is not None and booked["status"] != RESERVED and not figures.running:
        return int(booked["spent_micros"] or 0)
    return to_micros(max(0.0, figures.accrued_usd))


def _cap_param(tracked: Run) -> Micros | None:
    cap = _param(tracked.data.params, "cost.max_cost_usd", float)
    return to_micros(cap, ceiling=True) if cap is not None else None


def _resources(params: dict[str, str]) -> Resources:
    return Resources(
        gpus=_param(params, "cost.resources.gpus", int) or 0,
        gpu_type=_param(params, "cost.resources.gpu_type", str),
        cpu_cores=_param(params, "cost.resources.cpu_cores", float) or 1.0,
        memory_gib=_param(params, "cost.resources.memory_gib", float) or 0.0,
    )


def _param(params: dict[str, str], key: str, cast):
    """MLflow keeps params as strings; an unset optional field is absent (or "None" in older runs)."""
    value = params.get(key)
    return None if value in (None, "", "None") else cast(value)
