"""The ledger under load: many OS processes spending one budget at once, with faults injected; both halves.

    run_stress(url, workdir, StressConfig()) -> StressResult     the parent (tests, bench)
    child_main(plan, gen, start_run, start_step, log)             one child process (the parent starts them)

The children are OS processes forked from a multiprocessing forkserver that has imported this
module once: as clean as spawn (no thread, engine or lock inherited from the parent), without 20
interpreters importing SQLAlchemy and MLflow at once on a 2-core machine.

Each child works through its slot's runs one after the other. A run is a real RunBudget with a
real CostMeter. Steps are real sleeps (~10 ms, some runs slower than quoted), so the children's
holds really overlap in time and contend for the budget, and a SIGTERM really lands in the middle
of a step. The meter's monotonic clock counts those sleeps as they really took, but not the time
spent waiting for the ledger: 20 writers on SQLite wait up to seconds for its lock, and billing
that wait (which no hold covers) would overspend by what the meter cannot stop, a property of
the meter, not of the ledger this checks. Faults (seeded):
- preemption: the parent sends SIGTERM to random children; the child's handler raises
  `Preempted` (which `is_preemption` recognises) so RunBudget settles the attempt as preempted,
  and the parent starts a new process that resumes the run from its last step as a new attempt;
- SIGKILL: a few children kill themselves mid-step, after recording the hold they were granted:
  that attempt never settles, so at the end its hold expires and is charged (truth = the hold);
- retried settles: after a run, the child settles the attempt again with another amount and
  status, which must be a no-op (`replayed`);
- MLflow down: some children publish to an MlflowClient on a closed port; publishing fails,
  and the ledger must not notice;
- injected training errors (settled as failed), and refusals when the budget is used up.

The handler raises only while a step's compute sleeps, where a reclaim lands in practice; a
SIGTERM at any other moment is noted and acted on at the next step (or, between runs, by
exiting), so the child's own records, the truth this test checks against, are never cut in half.
RunBudget itself defers SIGTERM around the ledger's reserve and settle (tests/test_run_budget.py).

Every attempt leaves one record (JSON, written atomically) of what the child really metered; the
parent then checks the ledger against the records to the micro-dollar.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

from oppen.cost.journal import SettlementJournal
from oppen.cost.ledger import SETTLE_STATUSES, Ledger, month_of, utcnow
from oppen.cost.ledger_schema import attempts, charges, runs
from oppen.cost.policy import CostPolicy
from oppen.cost.price_book import OffPeak, PriceBook, Rates, Resources
from oppen.cost.quote import Quote, make_quote
from oppen.cost.reconcile import reconcile
from oppen.cost.run_budget import BudgetRefused, Outcome, RunBudget
from oppen.cost.speed import RunShape, from_calibration
from training.callbacks import LoopControl, RunInfo, StepInfo
from training.results import EpochRecord, TrainResult

TEAM, EXPERIMENT = "stress", "fake"
# $80 an hour (~22 micro-dollars a millisecond), one price all day: a run of 60 10-ms steps costs
# ~$0.016 and holds ~$0.04, so a $1.00 budget holds ~25 runs at once (fewer as it is spent), and
# the 80 runs want more than it has: the last ones are refused.
BOOK = PriceBook(rates=Rates(cpu_core_hour_usd=40.0), off_peak=OffPeak(discount=0.0))
RESOURCES = Resources(cpu_cores=2)
PREEMPTED_EXIT = 3  # a child that stopped for a SIGTERM; the parent starts its successor
REFUSAL_TRIES = 3  # a refused run tries again twice (a hold may have been released meanwhile)
MLFLOW_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}  # fail fast


@dataclass(frozen=True)
class StressConfig:
    processes: int = 20  # at once; successors of preempted or killed ones come on top
    runs_per_process: int = 4
    steps: int = 60
    steps_per_epoch: int = 20
    step_s: float = 0.01
    budget_usd: float = 1.00  # the team's total budget: 80 runs want ~$1.3 of it
    # Each run's max_cost_usd: room for a preempted and a killed attempt and the one that finishes. A
    # tighter cap leaves a successor a hold smaller than the tail it pays even when it stops before
    # its first step (the ledger records that as over_hold; tests/test_run_budget.py covers cap stops).
    cap_usd: float = 0.15
    slow_fraction: float = 0.25  # runs whose steps take 1.6x the quoted time: they need top-ups, which may be refused
    sigterms: int = 16
    kills: int = 3
    fail_fraction: float = 0.05
    replay_fraction: float = 0.3
    mlflow_every: int = 4  # every 4th slot publishes its costs to an MLflow that is down
    seed: int = 7
    deadline_s: float = 300.0


@dataclass
class StressResult:
    backend: str
    processes: int  # started in all, successors included
    runs: int
    attempts: int  # reservations that held money
    reservations: int  # attempts + refusals
    settles: int
    wall_s: float
    reserve_latency_s: list[float]
    overspend_micros: int  # the most spent + held ever exceeded the budget by (sampled, and at the end)
    double_counts: int  # attempts charged more than they cost, or charged twice
    mismatches: int  # attempts whose ledger charge differs from the child's record
    run_mismatches: int  # runs whose spent differs from the sum of their attempts
    preemptions: int
    sigterms: int
    kills: int
    expired: int
    refused: int
    failed: int
    stopped: int
    replays: int
    publish_failures: int
    over_hold_micros: int
    spent_micros: int
    recorded_micros: int
    budget_micros: int
    peak_used_micros: int
    samples: int
    problems: list[str] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        values = sorted(self.reserve_latency_s)
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


class Preempted(Exception):
    """What the child's SIGTERM handler raises: the node is being reclaimed."""


class InjectedFailure(RuntimeError):
    """A training error the plan asked for (the run settles as failed)."""


# --- the child ---------------------------------------------------------------------------


class Interrupts:
    """The SIGTERM handler: raises Preempted inside `window()` (a step's compute), otherwise notes it for later."""

    def __init__(self) -> None:
        self.pending = False
        self._armed = False

    def __call__(self, signum, frame) -> None:
        self.pending = True
        if self._armed:
            self._armed = False
            raise Preempted("SIGTERM")

    @contextmanager
    def window(self) -> Iterator[None]:
        if self.pending:
            raise Preempted("SIGTERM (received between steps)")
        self._armed = True
        try:
            yield
        finally:
            self._armed = False


class TrackingLedger(Ledger):
    """The real ledger, remembering the hold it last granted each attempt: what an attempt that dies is charged."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.held: dict[str, int] = {}

    def reserve(self, **kw):
        reservation = super().reserve(**kw)
        self.held[reservation.attempt_id] = reservation.held_micros
        return reservation

    def extend(self, attempt_id, to_micros, **kw):
        grant = super().extend(attempt_id, to_micros, **kw)
        self.held[attempt_id] = grant.held_micros
        return grant


def write_json(path: Path, data: dict) -> None:
    """Atomically: the parent reads either nothing or the whole record, even after a SIGKILL."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class Child:
    def __init__(self, plan: dict, gen: int, interrupts: Interrupts) -> None:
        self.plan, self.gen, self.interrupts = plan, gen, interrupts
        self.slot, self.work = plan["slot"], Path(plan["workdir"])
        self.ledger = TrackingLedger(plan["url"])
        self.journal = SettlementJournal(self.work / "journal")
        self.rng = random.Random(f"{plan['seed']}-{self.slot}-{gen}")
        self.step_s = plan["step_s"]
        self.billed = 1000.0  # the meter's monotonic clock: advanced by the simulated compute only
        self.speed = from_calibration([self.step_s] * 5, batch_size=1, eval_seconds=self.step_s,
                                      fixed_overhead_seconds=0.0, tail_seconds=2 * self.step_s)
        # A real client on a closed port: with MLFLOW_ENV every request is refused at once, never retried.
        self.mlflow = self.mlflow_client() if any(run["mlflow"] for run in plan["runs"]) else None

    def main(self, start_run: int, start_step: int) -> int:
        runs = self.plan["runs"]
        for index in range(start_run, len(runs)):
            reached = self.run(index, runs[index], start_step if index == start_run else 0)
            if reached is not None:  # preempted at this step: a successor resumes the run there
                write_json(self.work / "progress" / f"{self.slot}.g{self.gen}.json", {"run": index, "step": reached})
                return PREEMPTED_EXIT
            if self.interrupts.pending and index + 1 < len(runs):  # SIGTERM between runs
                write_json(self.work / "progress" / f"{self.slot}.g{self.gen}.json", {"run": index + 1, "step": 0})
                return PREEMPTED_EXIT
        return 0

    def run(self, index: int, spec: dict, step: int) -> int | None:
        """One run (with retries when refused); the step it was preempted at, or None when it ended."""
        for attempt_try in range(REFUSAL_TRIES):
            record = self.attempt(index, spec, f"{spec['run_key']}.g{self.gen}.t{attempt_try}", step)
            write_json(self.work / "records" / f"{record['attempt_id']}.json", record)
            if record["status"] == "preempted":
                return record["to_step"]
            if record["status"] != "refused":
                return None
            time.sleep(self.rng.uniform(0.1, 0.3))
            if self.interrupts.pending:
                return step
        return None

    def attempt(self, index: int, spec: dict, attempt_id: str, step: int) -> dict:
        record = {"attempt_id": attempt_id, "run_key": spec["run_key"], "slot": self.slot, "gen": self.gen,
                  "status": None, "charges": {}, "cost_micros": 0, "held_micros": 0, "from_step": step,
                  "to_step": step, "reserve_s": None, "pending": False, "replays": 0, "replays_ok": True,
                  "publish_failed": False, "over_hold_micros": 0}
        budget = RunBudget(
            ledger=self.ledger, book=BOOK, policy=CostPolicy(team=TEAM, resources=RESOURCES, max_cost_usd=spec["cap_usd"]),
            experiment=EXPERIMENT, workload="fake", run_key=spec["run_key"], attempt_id=attempt_id,
            journal=self.journal, publish=self.publisher(spec, record),
            is_preemption=lambda error: isinstance(error, Preempted), retry_delays=(0.05, 0.1, 0.2, 0.4),
            billing_from=self.billed, monotonic=lambda: self.billed,
        )
        try:
            with budget:
                started = time.perf_counter()
                try:
                    budget.reserve(self.quote(step))
                finally:
                    record["reserve_s"] = time.perf_counter() - started
                control = self.train(budget, index, spec, step, record)
                budget.complete(Outcome(stopped=control.should_stop, metric_name="accuracy", metric_value=0.9,
                                        stop_reason=control.stop_reason))
        except BudgetRefused:
            record["status"] = "refused"
            return record
        except (Preempted, InjectedFailure):
            pass  # RunBudget settled it (preempted, failed) on the way out
        settled = budget.settled
        record.update(status=settled.cost.status, charges=settled.cost.charges_micros,
                      cost_micros=settled.cost.attempt_cost_micros, pending=settled.pending,
                      over_hold_micros=settled.settlement.over_hold_micros if settled.settlement else 0)
        if spec["replays"] and not settled.pending:
            self.replay(record, spec["replays"])
        return record

    def quote(self, step: int) -> Quote:
        """The work left from `step`: a resumed attempt holds for what it still has to do."""
        shape = RunShape(total_steps=max(1, self.plan["steps"] - step), steps_per_epoch=self.plan["steps_per_epoch"],
                         batch_size=1)
        return make_quote(BOOK, RESOURCES, self.speed, shape, utcnow())

    def train(self, budget: RunBudget, index: int, spec: dict, start: int, record: dict) -> LoopControl:
        """The callbacks as train() calls them; each step and eval is a sleep a SIGTERM may interrupt."""
        meter, total, per_epoch = budget.meter, self.plan["steps"], self.plan["steps_per_epoch"]
        control = LoopControl()
        meter.on_train_start(RunInfo("fake", "cpu", total, per_epoch, total // per_epoch, 1, start, {}), control)
        for step in range(start + 1, total + 1):
            epoch, batch = (step - 1) // per_epoch + 1, (step - 1) % per_epoch + 1
            meter.on_step_begin(StepInfo(step, epoch, batch, per_epoch, total, 1), control)
            if control.should_stop:
                break
            if step == spec["fail_at"]:
                raise InjectedFailure(f"injected failure at step {step}")
            seconds = self.compute(self.rng.uniform(0.5, 1.5) * self.step_s * spec["slowdown"])
            meter.on_step_end(StepInfo(step, epoch, batch, per_epoch, total, 1, 1.0, seconds), control)
            record["to_step"] = step
            if batch == per_epoch:
                self.compute(self.step_s)  # validation and checkpoint
                meter.on_epoch_end(EpochRecord(epoch=epoch, step=step, train_loss=1.0, metrics={}, epoch_seconds=1.0,
                                               samples_per_second=1.0), control)
            if spec["kill_at"] is not None and step >= spec["kill_at"]:
                self.die(index, budget.attempt_id, record)
        done = record["to_step"]
        meter.on_train_end(TrainResult(
            workload="fake", device="cpu", steps=done, total_steps=total, samples_seen=done, epochs_completed=done // per_epoch,
            resumed_from_step=start, stopped_early=done < total, stop_reason=control.stop_reason, train_seconds=1.0,
            samples_per_second=1.0, final_train_loss=1.0, history=[], val_metrics={}, checkpoint_path=None,
            num_parameters=1), control)
        self.compute(2 * self.step_s)  # the tail: test pass, model logging
        return control

    def compute(self, seconds: float) -> float:
        """Work that a SIGTERM may interrupt: really slept, and billed for as long as it really took."""
        started = time.perf_counter()
        try:
            with self.interrupts.window():
                time.sleep(seconds)
        finally:
            self.billed += time.perf_counter() - started
        return seconds

    def die(self, index: int, attempt_id: str, record: dict) -> None:
        """SIGKILL mid-run, once per planned kill: the attempt never settles; its hold expires and is charged."""
        marker = self.work / "killed" / record["run_key"]
        if marker.exists():
            return  # the successor resuming this run does not die again
        marker.touch()
        record.update(status="killed", held_micros=self.ledger.held[attempt_id])
        write_json(self.work / "records" / f"{attempt_id}.json", record)
        write_json(self.work / "progress" / f"{self.slot}.g{self.gen}.json", {"run": index, "step": record["to_step"]})
        os.kill(os.getpid(), signal.SIGKILL)

    def replay(self, record: dict, times: int) -> None:
        """Settle the attempt again, with another amount and status: the ledger must return what it booked."""
        for _ in range(times):
            again = self.ledger.settle(
                record["attempt_id"], charges_by_month={month_of(utcnow()): self.rng.randint(0, 10**6)},
                status=self.rng.choice(SETTLE_STATUSES),
            )
            record["replays"] += 1
            if not (again.replayed and again.cost_micros == record["cost_micros"] and again.status == record["status"]):
                record["replays_ok"] = False

    def mlflow_client(self):
        from mlflow import MlflowClient  # here: importing this module (test collection) stays cheap

        return MlflowClient(tracking_uri=self.plan["mlflow_uri"])

    def publisher(self, spec: dict, record: dict):
        """Publishes the cost to an MLflow that is down (a real client, a closed port); None for most slots."""
        if not spec["mlflow"]:
            return None

        def publish(settled) -> None:
            from mlflow.entities import Metric

            now_ms = int(time.time() * 1000)
            try:
                self.mlflow.log_batch(uuid.uuid4().hex, metrics=[Metric(key, value, now_ms, 0) for key, value
                                                                  in settled.cost.mlflow_metrics().items()],
                                       synchronous=True)
            except Exception:
                record["publish_failed"] = True
                raise

        return publish


def child_main(plan_path: str, gen: int, start_run: int, start_step: int, log_path: str) -> None:
    interrupts = Interrupts()
    signal.signal(signal.SIGTERM, interrupts)
    with open(log_path, "w") as log:  # what RunBudget logs (publish failures) goes here
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    os.environ.update(MLFLOW_ENV)
    plan = json.loads(Path(plan_path).read_text())
    child = Child(plan, gen, interrupts)
    child.ledger.usage(TEAM)  # connect now: the first reservation should not pay for it
    work = Path(plan["workdir"])
    (work / "ready" / f"{plan['slot']}.g{gen}").touch()  # the parent signals only from now on
    while not (work / "go").exists():  # the first children start together, once all have imported and connected
        time.sleep(0.01)
    try:
        code = child.main(start_run, start_step)
    finally:
        # Nothing left to stop: a SIGTERM from now on must not kill the interpreter while it shuts down
        # (finalisation puts SIGTERM back to its default action, and the parent would see -15).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child.ledger.dispose()
    sys.exit(code)


# --- the parent --------------------------------------------------------------------------


def closed_port_uri() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there now: every request is refused at once


def make_plans(config: StressConfig, url: str, work: Path) -> list[Path]:
    rng = random.Random(config.seed)
    killed = {(slot, 0) for slot in rng.sample(range(config.processes), config.kills)}  # first runs always start
    mlflow_uri = closed_port_uri()
    paths = []
    for slot in range(config.processes):
        specs = []
        for run in range(config.runs_per_process):
            fail = rng.random() < config.fail_fraction
            specs.append({
                "run_key": f"slot{slot:02d}-run{run}", "cap_usd": config.cap_usd,
                "fail_at": rng.randint(5, config.steps - 5) if fail else None,
                "kill_at": rng.randint(5, config.steps - 5) if (slot, run) in killed and not fail else None,
                "replays": rng.choice([1, 2]) if rng.random() < config.replay_fraction else 0,
                "mlflow": slot % config.mlflow_every == 1,
                "slowdown": 1.6 if rng.random() < config.slow_fraction else 1.0,
            })
        path = work / "plan" / f"slot{slot:02d}.json"
        write_json(path, {"slot": slot, "workdir": str(work), "url": url, "seed": config.seed, "steps": config.steps,
                          "steps_per_epoch": config.steps_per_epoch, "step_s": config.step_s, "mlflow_uri": mlflow_uri,
                          "runs": specs})
        paths.append(path)
    return paths


class UsageSampler(threading.Thread):
    """Reads the team's spent + held (`Ledger.usage`) while the children run: the peak must fit the budget."""

    def __init__(self, url: str, interval_s: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.ledger, self.interval_s = Ledger(url), interval_s
        self.peak, self.samples = 0, 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.interval_s):
            self.peak = max(self.peak, sum(self.ledger.usage(TEAM)))
            self.samples += 1

    def stop(self) -> None:
        self.stopping.set()
        self.join()
        self.ledger.dispose()


@dataclass
class _Slot:
    index: int
    plan: Path
    gen: int = 0
    proc: multiprocessing.Process | None = None
    signalled: bool = False


def run_stress(url: str, work: Path, config: StressConfig = StressConfig()) -> StressResult:
    """Run the children against `url` until every run ended, then check the ledger against their records."""
    for sub in ("plan", "records", "progress", "ready", "killed", "journal", "logs"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    ledger = Ledger(url)
    ledger.create_schema()
    ledger.upsert_team(TEAM)
    ledger.set_budget(TEAM, config.budget_usd, "total")
    slots = [_Slot(index, plan) for index, plan in enumerate(make_plans(config, url, work))]
    forkserver = multiprocessing.get_context("forkserver")
    forkserver.set_forkserver_preload([__name__, "mlflow"])  # imported once, by the server
    rng = random.Random(f"{config.seed}-sigterm")
    sampler = UsageSampler(url)
    started = time.monotonic()
    processes = sigterms = 0

    def start(slot: _Slot, run: int, step: int) -> None:
        nonlocal processes
        log = work / "logs" / f"{slot.index}.g{slot.gen}.log"
        slot.proc = forkserver.Process(target=child_main, args=(str(slot.plan), slot.gen, run, step, str(log)),
                                       name=f"stress-{slot.index}.g{slot.gen}")
        slot.proc.start()
        slot.signalled = False
        processes += 1

    try:
        for slot in slots:
            start(slot, 0, 0)
        while not all((work / "ready" / f"{slot.index}.g0").exists() for slot in slots):
            if any(slot.proc.exitcode is not None for slot in slots) or time.monotonic() - started > config.deadline_s:
                raise RuntimeError(f"a child did not start; see {work / 'logs'}")
            time.sleep(0.02)
        sampler.start()
        (work / "go").touch()
        started = time.monotonic()
        next_sigterm = started + rng.uniform(0.1, 0.3)
        while any(slot.proc for slot in slots):
            if time.monotonic() - started > config.deadline_s:
                raise TimeoutError(f"the stress run took more than {config.deadline_s:.0f} s")
            for slot in slots:
                code = slot.proc.exitcode if slot.proc else None
                if code is None:
                    continue
                slot.proc.join()
                if code == 0:
                    slot.proc = None
                    continue
                if code not in (PREEMPTED_EXIT, -signal.SIGKILL):
                    log = (work / "logs" / f"{slot.index}.g{slot.gen}.log").read_text()
                    raise RuntimeError(f"slot {slot.index} gen {slot.gen} exited {code}:\n{log[-3000:]}")
                progress = json.loads((work / "progress" / f"{slot.index}.g{slot.gen}.json").read_text())
                slot.gen += 1
                start(slot, progress["run"], progress["step"])
            now = time.monotonic()
            if sigterms < config.sigterms and now >= next_sigterm:
                ready = [slot for slot in slots if slot.proc and not slot.signalled and
                         (work / "ready" / f"{slot.index}.g{slot.gen}").exists()]
                if ready:
                    target = rng.choice(ready)
                    os.kill(target.proc.pid, signal.SIGTERM)
                    target.signalled = True
                    sigterms += 1
                next_sigterm = now + rng.uniform(0.1, 0.4)
            time.sleep(0.01)
    finally:
        for slot in slots:
            if slot.proc and slot.proc.exitcode is None:
                slot.proc.kill()  # only after a failure: ours, by handle
                slot.proc.join()
        if sampler.is_alive():
            sampler.stop()
    wall = time.monotonic() - started
    try:
        return _check(ledger, work, config, url, wall, processes, sigterms, sampler)
    finally:
        ledger.dispose()


def _check(ledger: Ledger, work: Path, config: StressConfig, url: str, wall: float, processes: int, sigterms: int,
           sampler: UsageSampler) -> StressResult:
    leftover = reconcile(ledger, SettlementJournal(work / "journal"), expire=False)  # settles the ledger missed
    expired = set(ledger.expire_stale(now=utcnow() + timedelta(days=2)))  # the killed attempts' holds
    records = [json.loads(path.read_text()) for path in (work / "records").glob("*.json")]
    by_status: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_status[record["status"]].append(record)
    truth = {r["attempt_id"]: r["held_micros"] if r["status"] == "killed" else r["cost_micros"]
             for r in records if r["status"] != "refused"}
    with ledger.engine.connect() as c:
        rows = c.execute(select(attempts.c.id, attempts.c.status, runs.c.run_key)
                         .join(runs, attempts.c.run_id == runs.c.id).where(runs.c.team == TEAM)).all()
        charge_rows = c.execute(select(charges.c.attempt_id, charges.c.amount_micros, charges.c.kind)).all()
    charged: dict[str, int] = defaultdict(int)
    kinds: dict[str, set] = defaultdict(set)
    for row in charge_rows:
        charged[row.attempt_id] += int(row.amount_micros)
        kinds[row.attempt_id].add(row.kind)
    problems = []
    ledger_ids, recorded_ids = {row.id for row in rows}, {r["attempt_id"] for r in records}
    if ledger_ids != recorded_ids:
        problems.append(f"attempts in the ledger but not recorded: {sorted(ledger_ids - recorded_ids)[:5]}; "
                        f"recorded but not in the ledger: {sorted(recorded_ids - ledger_ids)[:5]}")
    still_running = [row.id for row in rows if row.status == "running"]
    if still_running:
        problems.append(f"attempts still holding money at the end: {still_running[:5]}")
    killed = {r["attempt_id"] for r in by_status["killed"]}
    if expired != killed:
        problems.append(f"expired {sorted(expired)} but killed {sorted(killed)}")
    mismatched = sorted(a for a in ledger_ids | recorded_ids if charged.get(a, 0) != truth.get(a, 0))
    doubled = [a for a in ledger_ids if charged.get(a, 0) > truth.get(a, 0) or len(kinds.get(a, ())) > 1]
    if mismatched:
        problems.append("ledger vs record: " + ", ".join(f"{a} {charged.get(a, 0)} != {truth.get(a, 0)}"
                                                        for a in mismatched[:5]))
    per_run: dict[str, int] = defaultdict(int)
    for record in records:
        per_run[record["run_key"]] += truth.get(record["attempt_id"], 0)
    run_rows = {row["run_key"]: row["spent_micros"] for row in ledger.rows(team=TEAM)}
    run_mismatches = [key for key in per_run.keys() | run_rows.keys() if run_rows.get(key, 0) != per_run.get(key, 0)]
    if run_mismatches:
        problems.append(f"runs whose spent is not the sum of their attempts: {sorted(run_mismatches)[:5]}")
    spent, held = ledger.usage(TEAM)
    recorded = sum(truth.values())
    if (spent, held) != (recorded, 0):
        problems.append(f"ledger spent {spent} + held {held}, the children recorded {recorded}")
    budget = ledger.budgets_of(TEAM)[0]["amount_micros"]
    overspend = max(0, sampler.peak - budget, spent + held - budget)
    if overspend:
        problems.append(f"spent + held exceeded the budget by {overspend} micro-dollars")
    bad_replays = [r["attempt_id"] for r in records if not r["replays_ok"]]
    if bad_replays:
        problems.append(f"a repeated settle changed something: {bad_replays[:5]}")
    if any(item.outcome not in ("already booked",) for item in leftover):
        problems.append(f"the journal held settlements the ledger lacked: {[asdict(item) for item in leftover][:3]}")
    settled = [r for r in records if r["status"] in SETTLE_STATUSES]
    return StressResult(
        backend=url.split(":", 1)[0].split("+")[0], processes=processes, runs=len(per_run),
        attempts=len(truth), reservations=len(records), settles=len(settled), wall_s=wall,
        reserve_latency_s=[r["reserve_s"] for r in records if r["reserve_s"] is not None],
        overspend_micros=overspend, double_counts=len(doubled), mismatches=len(mismatched),
        run_mismatches=len(run_mismatches), preemptions=len(by_status["preempted"]), sigterms=sigterms,
        kills=len(killed), expired=len(expired), refused=len(by_status["refused"]), failed=len(by_status["failed"]),
        stopped=len(by_status["stopped"]), replays=sum(r["replays"] for r in records),
        publish_failures=sum(r["publish_failed"] for r in records),
        over_hold_micros=sum(r["over_hold_micros"] for r in records), spent_micros=spent, recorded_micros=recorded,
        budget_micros=budget, peak_used_micros=sampler.peak, samples=sampler.samples, problems=problems,
    )

