"""Latency of every read tool of `oppen.api` against a stack with history, and the CLI's cold start.

    .venv/bin/python -m bench.tools [--calls 30] [--trained 1000] [--cold-runs 5]
    .venv/bin/python bench/tools.py ...          (the same)

One real `prefect server start` (SQLite) with the pools applied and prefect.yaml deployed, MLflow on
SQLite and the SQLite ledger, all under a temporary directory; no worker. The history is seeded
without training, through the same clients the flows use:

- Prefect: `--trained` flow runs of train-mnist/local created in Completed (85%),
  Failed (10%) or Cancelled (5%), 4% more refused (Failed/OverBudget, never trained), and 10% more
  left Scheduled across the local pool's urgent/normal/background queues (no worker takes them, so
  they turn Late: what the health and queue tools must read past). Four of the completed runs are the
  jobs of a batch, under a completed `train-batch/local` parent.
- MLflow: one run per trained flow run in the `mnist` experiment, with the params, tags and metrics
  (per epoch and final: quote_*, cost_*, util_*, val_*, test_*, shape_steps_per_epoch) a real
  train-mnist run logs, over the last 14 days, three request shapes (batch 64/128/256, 1-3 epochs),
  so the speed history quotes jobs and the recommender has peers.
- Ledger: each trained run reserved and settled (team `default`, experiment `mnist`, the shipped
  budgets), each refused run refused, each scheduled run held in its queue with its quote.

Each tool then runs in this process `--calls` times after 2 warm-up calls, rotating over 30 runs of
the history where it takes a run, in two passes side by side: first as the process stands after its
imports and the seeding (a REPL or a notebook calling the API), then with all of that frozen out of the
garbage collector (`gc.freeze()`), as `oppen mcp` runs. Reported for each: p50 and p95 (nearest rank)
in ms against the 200 ms p95 target, and the full collections that fell inside the timed calls. Then the cold start of `oppen --help`, `prefect --help`, `mlflow --help` and one real
command, `oppen quota default --json`, `--cold-runs` times each, interleaved.

The server runs at normal priority (the embedded stack nices its servers, which only matters while
training shares the machine). A full run takes about 10 minutes on a 2-core machine, most of it
seeding Prefect one flow run at a time (see `seed_prefect`). `--profile a,b` runs the named tools
under cProfile afterwards, on the same history.

Exits 1 when the seeding failed (the figures would be about a smaller history) or a tool raised.
Needs no dataset. `--trained 10 --calls 1 --cold-runs 1` is a smoke run (a couple of minutes: the stack's start
and `prefect deploy` dominate); its figures say nothing about a real history.
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as a file (python bench/x.py): the repository root in bench/'s place, see bench/__init__.py
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import importlib  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import datetime, timedelta, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

from bench.common import ROOT, table  # noqa: E402
from tests.stack import BIN, PrefectStack  # noqa: E402

TARGET_P95_MS = 200.0
WARM_UP_CALLS = 2
ROTATION = 30  # distinct runs a run-taking tool is asked about, in turn
DEPLOYMENT = "train-mnist/local"
BATCH_DEPLOYMENT = "train-batch/local"
BATCH_ID = "bench-batch"
TEAM, EXPERIMENT = "default", "mnist"
QUEUES = ("urgent", "normal", "background")
SHAPES = [(64, 3), (128, 2), (256, 2), (256, 1)]  # (batch size, epochs): three speed keys, runs of 1-3 epochs
HISTORY_DAYS = 14
TRAIN_SAMPLES = 55_000  # MNIST's 60,000 less the default 5,000 held out for validation
CPU_CORE_SECOND_USD = 0.05 / 3600  # the shipped price book, 2 cores (CostPolicy's default resources)
CLIENT_RETRIES = "10"  # Prefect's client retries a 503 with backoff (default 5 times): seeding rides out a busy spell


# --- the history --------------------------------------------------------------------------------


@dataclass
class Planned:
    """One flow run of the history and what becomes of it."""

    outcome: str  # completed, failed, cancelled, refused, scheduled
    batch_size: int
    epochs: int
    started: datetime
    queue: str = "normal"
    tags: list[str] = field(default_factory=list)
    flow_run_id: str = ""
    name: str = ""
    mlflow_run_id: str = ""
    ended: datetime | None = None
    cost_micros: int = 0
    quote_micros: int = 0
    settle_detail: dict = field(default_factory=dict)


@dataclass
class History:
    planned: list[Planned]
    seconds: dict[str, float] = field(default_factory=dict)

    def of(self, *outcomes: str) -> list[Planned]:
        return [p for p in self.planned if p.outcome in outcomes]


def plan_history(trained: int, rng: random.Random) -> list[Planned]:
    now = datetime.now(timezone.utc)
    planned = []
    for index in range(trained):
        draw = rng.random()
        outcome = "completed" if draw < 0.85 or index < 4 else "failed" if draw < 0.95 else "cancelled"
        batch, epochs = SHAPES[index % len(SHAPES)]
        started = now - timedelta(seconds=rng.uniform(600, HISTORY_DAYS * 86400))
        planned.append(Planned(outcome, batch, epochs, started))
    from flows.batch import child_tags

    for index, run in enumerate(planned[:4]):  # a batch's four jobs, completed
        run.tags = child_tags(BATCH_ID, index, 1)
    for index in range(max(1, trained // 25)):
        batch, epochs = SHAPES[index % len(SHAPES)]
        planned.append(Planned("refused", batch, epochs, now - timedelta(seconds=rng.uniform(600, 86400))))
    for index in range(max(3, trained // 10)):
        batch, epochs = SHAPES[index % len(SHAPES)]
        planned.append(Planned("scheduled", batch, epochs, now, queue=QUEUES[index % len(QUEUES)]))
    return planned


def parameters(run: Planned) -> dict:
    return {"run": {"epochs": run.epochs, "batch_size": run.batch_size, "learning_rate": 8e-3}}


def seed_prefect(history: History) -> None:
    """Create every flow run from the deployment, the finished ones in their final state, one at a time.

    A flow run created with a state is forced into it by the server (the same `set_flow_run_state(...,
    force=True)` a second request would make): one write per run. So they never pass through Running,
    and no tool reads a finished run's start time for more than display. One at a time: the server's
    SQLite database takes one writer at a time and its own services (event persister, late runs,
    scheduler) write too; two or eight requests in flight, on a busy 2-core machine, failed on its lock
    ("database is locked", answered 503) through all of the client's retries.
    """
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Completed, Failed

    from flows.batch import batch_tag

    finals = {
        "completed": lambda: Completed(),
        "failed": lambda: Failed(message="Flow run encountered an exception: RuntimeError: the loss is nan at step 212"),
        "cancelled": lambda: Cancelled(message="cancelled by an operator: superseded by a newer config"),
        "refused": lambda: Failed(name="OverBudget", message="over budget: default/mnist would reach 101% of $10.00"),
    }
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        for run in history.planned:
            flow_run = client.create_flow_run_from_deployment(
                deployment.id, parameters=parameters(run), tags=run.tags or None,
                state=finals[run.outcome]() if run.outcome in finals else None,
                work_queue_name=run.queue if run.outcome == "scheduled" else None,
            )
            run.flow_run_id, run.name = str(flow_run.id), flow_run.name
        jobs = [{"deployment": DEPLOYMENT, "parameters": parameters(run)} for run in history.planned[:4]]
        client.create_flow_run_from_deployment(
            client.read_deployment_by_name(BATCH_DEPLOYMENT).id,
            parameters={"request": {"batch_id": BATCH_ID, "jobs": jobs, "mode": "sequential"}},
            tags=[batch_tag(BATCH_ID)], state=Completed(message="4 jobs completed"),
        )


def speed_keys() -> dict[int, str]:
    """The speed key the flow computes for each batch size, so the seeded history quotes these jobs."""
    from oppen.api import context
    from oppen.api.quoting import TrainingJob, resolve

    with context.prefect() as client:
        return {batch: resolve(client, TrainingJob(workload="mnist", run={"batch_size": batch})).speed_key
                for batch, _ in SHAPES}


@dataclass(frozen=True)
class Figures:
    """What one seeded training run measured and cost, as its metrics would say."""

    steps_per_epoch: int
    seconds_per_sample: float
    epoch_seconds: list[float]
    fixed_overhead_s: float
    tail_s: float
    seconds: float
    cost_usd: float
    quote_usd: float
    val_accuracy: list[float]
    test_accuracy: float
    cpu_cores_mean: float


def figures(run: Planned, rng: random.Random) -> Figures:
    steps = math.ceil(TRAIN_SAMPLES / run.batch_size)
    per_sample = {64: 0.00031, 128: 0.00024, 256: 0.00019}[run.batch_size] * rng.uniform(0.9, 1.15)
    epoch_seconds = [TRAIN_SAMPLES * per_sample + rng.uniform(0.3, 0.6) for _ in range(run.epochs)]
    fixed, tail = rng.uniform(4.0, 7.0), rng.uniform(1.5, 3.0)
    if run.outcome != "completed":  # stopped partway through its last epoch
        epoch_seconds[-1] *= rng.uniform(0.1, 0.9)
    seconds = fixed + sum(epoch_seconds) + tail
    val = [min(0.995, 0.955 + 0.018 * epoch + rng.uniform(-0.004, 0.004)) for epoch in range(run.epochs)]
    return Figures(steps, per_sample, epoch_seconds, fixed, tail, seconds, 2 * CPU_CORE_SECOND_USD * seconds,
                   2 * CPU_CORE_SECOND_USD * seconds * rng.uniform(0.9, 1.2), val,
                   val[-1] + rng.uniform(-0.003, 0.003), rng.uniform(1.2, 1.9))


def mlflow_payload(run: Planned, fig: Figures, key: str, rng: random.Random):
    """Params, metrics and tags as the train-mnist flow logs them, under the names of oppen/tracking_keys.py."""
    from mlflow.entities import Metric, Param, RunTag

    from flows.train_mnist import MNIST_RUN
    from oppen import tracking_keys as keys
    from oppen.cost.policy import CostPolicy
    from tasks.tracking import flatten
    from training.mnist.workload import MnistConfig

    start_ms = int(run.started.timestamp() * 1000)
    rate = 2 * CPU_CORE_SECOND_USD
    quote = keys.QUOTE_PARAM_PREFIX
    config = {"config": MnistConfig().model_dump(mode="json"),
              "run": MNIST_RUN.model_copy(update=parameters(run)["run"]).model_dump(mode="json"),
              "cost": CostPolicy().model_dump(mode="json")}
    # The quote and the run's shape are constants of the run: params, as tasks/cost_tasks.quote_params logs them.
    constants = flatten(config) | {
        keys.QUOTE_EXPECTED_PARAM: str(fig.quote_usd), keys.QUOTE_P90_PARAM: str(fig.quote_usd * 1.13),
        f"{quote}cheapest_usd": str(fig.quote_usd * 0.5),
        f"{quote}expected_seconds": str(round(fig.quote_usd / rate, 1)),
        f"{quote}cost_per_epoch_usd": str(fig.quote_usd / run.epochs),
        keys.STEPS_PER_EPOCH_PARAM: str(fig.steps_per_epoch),
    }
    params = [Param(k, v) for k, v in sorted(constants.items())]
    metrics: list[Metric] = []

    def log(values: dict[str, float], step: int, at: float) -> None:
        metrics.extend(Metric(k, float(v), start_ms + int(at * 1000), step) for k, v in values.items())

    at, loss = fig.fixed_overhead_s, 2.3
    for epoch, seconds in enumerate(fig.epoch_seconds, start=1):
        for step in range(50, fig.steps_per_epoch + 1, 50):  # the smoothed step loss, every log_every_steps
            loss *= 0.93
            log({keys.TRAIN_LOSS: loss + rng.uniform(0, 0.02)}, (epoch - 1) * fig.steps_per_epoch + step,
                at + seconds * step / fig.steps_per_epoch)
        at += seconds
        log({keys.EPOCHS_DONE: epoch, keys.TRAIN_EPOCH_LOSS: loss, keys.EPOCH_SECONDS: seconds,
             keys.SAMPLES_PER_SECOND: TRAIN_SAMPLES / seconds,
             keys.metric_key("val_accuracy"): fig.val_accuracy[epoch - 1],
             keys.metric_key("val_loss"): 0.45 / epoch, keys.COST_EPOCH: rate * seconds, keys.COST_ACCRUED: rate * at,
             keys.COST_FORECAST: fig.cost_usd * rng.uniform(0.95, 1.05)},
            epoch * fig.steps_per_epoch, at)
    last = run.epochs * fig.steps_per_epoch
    final = {
        keys.TRAIN_SECONDS: sum(fig.epoch_seconds), keys.CALLBACK_SECONDS: 0.01 * run.epochs,
        keys.STEPS_COMPLETED: last, keys.RESUMED_FROM_STEP: 0,
        keys.CPU_CORES_MEAN: fig.cpu_cores_mean, keys.CPU_CORES_PEAK: min(2.0, fig.cpu_cores_mean + 0.3),
        keys.MEMORY_PEAK_GIB: rng.uniform(0.7, 0.9),
        keys.COST_TOTAL: fig.cost_usd, keys.COST_TRAINING: rate * sum(fig.epoch_seconds),
        keys.COST_ON_DEMAND: fig.cost_usd, keys.COST_SAVING: 0.0, keys.COST_ATTEMPT: fig.cost_usd,
        keys.COST_ATTEMPTS: 1, keys.COST_AT_TRAINING_END: rate * (fig.seconds - fig.tail_s),
        keys.COST_LIMIT: 0.01, keys.COST_MAX_STEP: rate * fig.seconds_per_sample * run.batch_size,
        keys.PEAK_SECONDS: fig.seconds, keys.OFF_PEAK_SECONDS: 0.0, keys.COST_TAIL_RESERVE: 0.0,
        keys.COST_QUOTE_ERROR: (fig.cost_usd - fig.quote_usd) / fig.quote_usd,
        keys.COST_FORECAST_EPOCH1: fig.cost_usd * rng.uniform(0.95, 1.08),
        keys.COST_FORECAST_ERROR: rng.uniform(-0.08, 0.08),
        keys.CPU_CORE_HOURS: 2 * fig.seconds / 3600, keys.GPU_HOURS: 0.0, keys.MEMORY_GIB_HOURS: 0.0,
        keys.SPOT_INTERRUPTIONS: 0, keys.SPOT_LOST_SECONDS: 0.0, keys.SPOT_LOST_USD: 0.0,
    }
    if run.outcome == "completed":  # evaluated, and the speed history: only from runs that trained to their end
        final |= {keys.metric_key("test_accuracy"): fig.test_accuracy,
                  keys.metric_key("test_loss"): 0.04 + (1 - fig.test_accuracy),
                  keys.COST_PER_POINT: fig.cost_usd / (100 * (fig.test_accuracy - 0.1)),
                  keys.SECONDS_PER_SAMPLE: fig.seconds_per_sample, keys.EPOCH_OVERHEAD_SECONDS: 0.45,
                  keys.FIXED_OVERHEAD_SECONDS: fig.fixed_overhead_s, keys.TAIL_SECONDS: fig.tail_s}
    log(final, last, fig.seconds)
    tags = {"oppen.workload": "mnist", "prefect.flow_run_id": run.flow_run_id, "oppen.team": TEAM,
            "oppen.speed_key": key, "oppen.attempt": "1", "mlflow.runName": run.name,
            "oppen.cost_status": "settled", "oppen.settlement": "booked"}
    return params, metrics, [RunTag(k, v) for k, v in tags.items()]


def metrics_of(metrics: list) -> dict[str, float]:
    """The latest value of each metric of a seeded run (what its settlement books of them)."""
    return {metric.key: metric.value for metric in sorted(metrics, key=lambda metric: metric.step)}


def seed_mlflow_and_ledger(history: History, keys: dict[int, str], rng: random.Random) -> None:
    from mlflow import MlflowClient

    from oppen.api import context
    from oppen.cost.ledger import month_of
    from oppen.cost.money import to_micros
    from tasks.tracking import ensure_experiment

    settings = context.settings()
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    experiment_id = ensure_experiment(client, EXPERIMENT, settings.artifact_root)
    status = {"completed": ("FINISHED", "settled"), "failed": ("FAILED", "failed"), "cancelled": ("KILLED", "stopped")}
    started = time.perf_counter()
    trained = history.of("completed", "failed", "cancelled")
    for run in trained:
        fig = figures(run, rng)
        params, metrics, tags = mlflow_payload(run, fig, keys[run.batch_size], rng)
        created = client.create_run(experiment_id, start_time=int(run.started.timestamp() * 1000), run_name=run.name)
        run.mlflow_run_id = created.info.run_id
        client.log_batch(run.mlflow_run_id, metrics=metrics, params=params, tags=tags, synchronous=True)
        client.set_terminated(run.mlflow_run_id, status[run.outcome][0],
                              end_time=int((run.started.timestamp() + fig.seconds) * 1000))
        run.cost_micros, run.quote_micros = to_micros(fig.cost_usd), to_micros(fig.quote_usd)
        run.ended = run.started + timedelta(seconds=fig.seconds)
        evaluated = run.outcome == "completed"
        run.settle_detail = {"gpu_hours": 0.0, "cpu_hours": 2 * fig.seconds / 3600,
                             "metric": "test_accuracy" if evaluated else None,
                             "value": fig.test_accuracy if evaluated else None, "attempt": 1, "seconds": fig.seconds,
                             "resources": {"gpus": 0, "gpu_type": None, "cpu_cores": 2.0, "memory_gib": 0.0},
                             "utilization": {name: value for name, value in metrics_of(metrics).items()
                                             if name.startswith("utilization/")}}
    history.seconds["mlflow"] = time.perf_counter() - started
    started = time.perf_counter()
    with context.ledger(settings) as ledger:
        for run in trained:
            attempt = f"{run.flow_run_id}:1:{uuid.uuid4().hex[:8]}"
            ledger.reserve(team=TEAM, experiment=EXPERIMENT, run_key=run.flow_run_id, attempt_id=attempt,
                           quote_micros=run.quote_micros, hold_micros=run.quote_micros * 2, hold_for=timedelta(hours=1),
                           workload="mnist", mlflow_run_id=run.mlflow_run_id, now=run.started)
            ledger.settle(attempt, charges_by_month={month_of(run.ended): run.cost_micros},
                          status=status[run.outcome][1], mlflow_run_id=run.mlflow_run_id, now=run.ended,
                          detail=run.settle_detail)  # as oppen/cost/run_budget.py books it
        for run in history.of("refused"):
            ledger.refuse(team=TEAM, experiment=EXPERIMENT, run_key=run.flow_run_id,
                          attempt_id=f"{run.flow_run_id}:1:{uuid.uuid4().hex[:8]}", workload="mnist",
                          reason="over budget: default/mnist would reach 101% of $10.00", now=run.started)
        for run in history.of("scheduled"):
            quote = to_micros(2 * CPU_CORE_SECOND_USD * 30 * run.epochs)
            ledger.hold_queued(team=TEAM, experiment=EXPERIMENT, run_key=run.flow_run_id, hold_micros=quote * 113 // 100,
                               quote_micros=quote, expected_seconds=30.0 * run.epochs, hold_for=timedelta(hours=6),
                               workload="mnist", queue=run.queue)
    history.seconds["ledger"] = time.perf_counter() - started


def check_seeded(history: History, trained: int) -> list[str]:
    """What the servers hold, counted back: a history smaller than asked for makes the figures lie."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    from oppen.api import context

    with context.prefect() as client:
        flow_runs = client.count_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["local"])))
    mlflow = context.mlflow()
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    mlflow_runs = len(mlflow.search_runs([experiment.experiment_id], max_results=50_000)) if experiment else 0
    with context.ledger() as ledger:
        booked, held = len(ledger.rows(team=TEAM)), len(ledger.queue_holds(team=TEAM))
    problems = []
    for what, have, want in (("flow runs", flow_runs, len(history.planned)), ("MLflow runs", mlflow_runs, trained),
                             ("ledger runs", booked, len(history.of("completed", "failed", "cancelled", "refused"))),
                             ("queue holds", held, len(history.of("scheduled")))):
        print(f"  {what}: {have}", flush=True)
        if have < want:
            problems.append(f"{what}: {have} of {want}")
    return problems


def seed(trained: int, rng: random.Random) -> History:
    history = History(plan_history(trained, rng))
    started = time.perf_counter()
    seed_prefect(history)
    history.seconds["prefect"] = time.perf_counter() - started
    print(f"  prefect: {len(history.planned) + 1} flow runs in {history.seconds['prefect']:.1f} s", flush=True)
    seed_mlflow_and_ledger(history, speed_keys(), rng)
    print(f"  mlflow: {history.seconds['mlflow']:.1f} s, ledger: {history.seconds['ledger']:.1f} s", flush=True)
    return history


# --- the tools ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tool:
    name: str  # of the function in `oppen.api`
    args: Callable[[int], tuple]  # call number -> positional arguments


def tools(history: History) -> list[Tool]:
    done = history.of("completed")
    recent = sorted(done, key=lambda run: run.started, reverse=True)
    sample = [recent[i * len(recent) // ROTATION] for i in range(ROTATION)]  # newest to oldest
    flow_run = lambda i: (sample[i % ROTATION].flow_run_id,)  # noqa: E731
    mlflow_run = lambda i: (sample[i % ROTATION].mlflow_run_id,)  # noqa: E731
    job = {"workload": "mnist", "run": {"epochs": 2, "batch_size": 256}}
    other = {"workload": "mnist", "run": {"epochs": 3, "batch_size": 64}}
    return [
        Tool("list_experiments", lambda i: ()),
        Tool("get_experiment_metrics", mlflow_run),
        Tool("get_training_status", flow_run),
        Tool("calculate_training_cost", flow_run),
        Tool("get_gpu_availability", lambda i: ()),
        Tool("validate_job_resources", lambda i: (job,)),
        Tool("check_training_quota", lambda i: (TEAM,)),
        Tool("recommend_cost_optimization", mlflow_run),
        Tool("forecast_training_cost", flow_run),
        Tool("compare_training_configs", lambda i: ([job, other],)),
        Tool("get_job_queue_status", lambda i: ()),
        Tool("get_training_health_status", lambda i: ()),
        Tool("generate_cost_report", lambda i: ()),
        Tool("get_resource_utilization_report", lambda i: ()),
        Tool("get_batch_status", lambda i: (BATCH_ID,)),
    ]


def nearest_rank(values: list[float], q: float) -> float:
    """p95 of 30 calls is the 29th smallest: a value that was measured."""
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)] if ordered else math.nan


@dataclass
class Timed:
    """One pass over a tool: milliseconds per call, and the full collections that fell inside them."""
    timings: list[float] = field(default_factory=list)
    full_gc_ms: list[float] = field(default_factory=list)
    error: str | None = None


class FullCollections:
    """Times every full (generation 2) garbage collection while it is installed.

    A full collection walks every object the process holds: Prefect's, MLflow's and pydantic's modules
    alone are about 230,000 (95 ms a pass here). It stops whichever call happens to trigger it, which is
    what a p95 of 30 calls catches.
    """

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self._started: float | None = None

    def __call__(self, phase: str, info: dict) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.pauses.append((time.perf_counter() - self._started) * 1000)
            self._started = None

    def __enter__(self) -> FullCollections:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *_exc) -> None:
        gc.callbacks.remove(self)


def time_tool(tool: Tool, calls: int) -> Timed:
    """Milliseconds per call and the full collections among them, or why the tool could not be timed."""
    try:
        fn = getattr(importlib.import_module("oppen.api"), tool.name)
    except (ImportError, AttributeError) as error:
        return Timed(error=f"missing: {error}")
    timed = Timed()
    try:
        for i in range(WARM_UP_CALLS):
            fn(*tool.args(i))
        with FullCollections() as full:
            for i in range(calls):
                started = time.perf_counter()
                fn(*tool.args(i))
                timed.timings.append((time.perf_counter() - started) * 1000)
        timed.full_gc_ms = full.pauses
    except Exception as error:  # reported in the table: one broken tool must not hide the others' figures
        timed.error = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
    return timed


def time_all(tools: list[Tool], calls: int, label: str) -> list[tuple[Tool, Timed]]:
    """One pass over every tool, each line printed as it is timed."""
    results = []
    for tool in tools:
        timed = time_tool(tool, calls)
        results.append((tool, timed))
        print(f"  {tool.name}{label}: " + (timed.error or f"p95 {nearest_rank(timed.timings, 0.95):.1f} ms, "
                                           f"{len(timed.full_gc_ms)} full collections"), flush=True)
    return results


def profile(tool: Tool, calls: int = 5) -> None:
    """Where a tool's time goes, by cumulative time: overall, then in this repository's own functions.

    This thread only: work a tool hands to a thread pool shows as the wait for it.
    """
    import cProfile
    import pstats

    fn = getattr(importlib.import_module("oppen.api"), tool.name)
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(calls):
        fn(*tool.args(i))
    profiler.disable()
    print(f"\n--- profile of {tool.name}, {calls} calls ---", flush=True)
    stats = pstats.Stats(profiler, stream=sys.stdout).strip_dirs().sort_stats("cumulative")
    stats.print_stats(12)
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(
        re.escape(str(ROOT)) + r"/(oppen|tasks|flows|work_pools|training)/", 15)


def cold_starts(env: dict[str, str], runs: int) -> dict[str, list[float]]:
    """Wall seconds of each command from a fresh process, interleaved so machine drift hits all alike."""
    commands = {
        "oppen --help": [str(BIN / "oppen"), "--help"],
        "prefect --help": [str(BIN / "prefect"), "--help"],
        "mlflow --help": [str(BIN / "mlflow"), "--help"],
        "oppen quota default --json": [str(BIN / "oppen"), "quota", TEAM, "--json"],
    }
    walls: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, argv in commands.items():
            started = time.perf_counter()
            done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
            walls[name].append(time.perf_counter() - started)
            if done.returncode != 0:
                raise RuntimeError(f"`{name}` exited {done.returncode}: {done.stderr.strip()[-400:]}")
    return walls


# --- the run ------------------------------------------------------------------------------------


def stop_on_signals() -> None:
    """SIGTERM/SIGHUP end the run through its `finally`, so the server never outlives the benchmark."""
    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=30, help="timed calls per tool (after 2 warm-up calls)")
    parser.add_argument("--trained", type=int, default=1000, help="flow runs that trained (each with an MLflow run)")
    parser.add_argument("--cold-runs", type=int, default=5, help="runs of each CLI command for its cold start")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated history")
    parser.add_argument("--profile", default="", help="comma-separated tool names to run under cProfile afterwards, "
                        "on the same history (5 calls each; the top functions by cumulative time, overall and ours)")
    args = parser.parse_args()
    if args.calls < 1 or args.cold_runs < 1 or args.trained < 10:
        parser.error("--calls and --cold-runs must be at least 1, --trained at least 10")
    stop_on_signals()
    root = Path(tempfile.mkdtemp(prefix="oppen-tools-bench-"))
    stack = PrefectStack(root)
    # This process is a client of that stack, as bench/overhead.py is: set before Prefect is imported.
    for key in ("PREFECT_API_URL", "PREFECT_HOME", "OPPEN_HOME", "OPPEN_MLFLOW_TRACKING_URI"):
        os.environ[key] = stack.env[key]
    os.environ["PREFECT_CLIENT_MAX_RETRIES"] = CLIENT_RETRIES
    rng = random.Random(args.seed)
    try:
        started = time.perf_counter()
        stack.start_server()
        stack.run(sys.executable, "-m", "work_pools.apply")
        stack.prefect("--no-prompt", "deploy", "--all")
        print(f"stack up in {time.perf_counter() - started:.1f} s ({root})", flush=True)
        try:
            history = seed(args.trained, rng)
            problems = check_seeded(history, args.trained)
        except Exception as error:
            print(f"seeding failed: {type(error).__name__}: {error}\n--- server log, last lines ---\n"
                  f"{stack.log('server')}", file=sys.stderr)
            return 1
        if problems:
            print(f"seeding fell short: {'; '.join(problems)}", file=sys.stderr)
            return 1
        counts = {outcome: len(history.of(outcome)) for outcome in
                  ("completed", "failed", "cancelled", "refused", "scheduled")}
        print("seeded " + ", ".join(f"{n} {outcome}" for outcome, n in counts.items()) + " flow runs; "
              + ", ".join(f"{what} {s:.1f} s" for what, s in history.seconds.items()), flush=True)
        # Two passes, side by side. First as a process that has only imported and seeded (a REPL, a
        # notebook); then with what it holds frozen out of the collector (gc.freeze), as `oppen mcp`
        # does once it is built, so a full collection walks only what the calls themselves made.
        results = time_all(tools(history), args.calls, "")
        gc.collect()
        gc.freeze()
        frozen = time_all(tools(history), args.calls, " (frozen)")
        walls = cold_starts(stack.env, args.cold_runs)
        print(report(results, frozen, walls, args, len(history.planned) + 1,  # the batch's parent too
                     len(history.of("completed", "failed", "cancelled"))),
              flush=True)
        for tool, timed in frozen:
            if tool.name in args.profile.split(",") and not timed.error:
                profile(tool)
    finally:
        stack.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 1 if any(timed.error for _, timed in results + frozen) else 0


def report(results, frozen, walls: dict[str, list[float]], args, flow_runs: int, mlflow_runs: int) -> str:
    def gc_cell(timed: Timed) -> str:
        return f"{len(timed.full_gc_ms)} / {sum(timed.full_gc_ms):.0f}" if timed.full_gc_ms else "0"

    rows = []
    for (tool, timed), (_, cold) in zip(results, frozen):
        if timed.error or cold.error:
            rows.append([tool.name, 0, "-", "-", "-", "-", "-", "-", "failed (below)"])
            continue
        p95 = nearest_rank(cold.timings, 0.95)
        rows.append([tool.name, len(cold.timings),
                     f"{nearest_rank(timed.timings, 0.5):.1f}", f"{nearest_rank(timed.timings, 0.95):.1f}",
                     gc_cell(timed),
                     f"{nearest_rank(cold.timings, 0.5):.1f}", f"{p95:.1f}", gc_cell(cold),
                     "yes" if p95 <= TARGET_P95_MS else "NO"])
    lines = [f"\nRead tools in-process, {flow_runs} flow runs and {mlflow_runs} MLflow runs of history, "
             f"{args.calls} calls each after {WARM_UP_CALLS} warm-up (target p95 <= {TARGET_P95_MS:.0f} ms).",
             "Left: as imported and seeded; right: with that frozen out of the collector (gc.freeze), as "
             "`oppen mcp` runs. full GCs: how many full collections fell inside the calls / their ms.",
             table(["tool", "calls", "p50 ms", "p95 ms", "full GCs", "frozen p50 ms", "frozen p95 ms",
                    "frozen full GCs", "frozen p95 <= 200 ms"], rows)]
    lines += [f"{tool.name} failed: {timed.error}" for tool, timed in results + frozen if timed.error]
    prefect_median = statistics.median(walls["prefect --help"])
    cli = [[name, len(w), f"{statistics.median(w):.2f}", f"{nearest_rank(w, 0.95):.2f}",
            f"{statistics.median(w) / prefect_median:.2f}"] for name, w in walls.items()]
    lines += [f"\nCLI cold start, {args.cold_runs} runs each, interleaved (p95 of {args.cold_runs} is the slowest):",
              table(["command", "runs", "median s", "p95 s", "median / prefect --help"], cli)]
    return "\n".join(lines)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
