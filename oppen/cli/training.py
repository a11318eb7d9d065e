"""Training commands: train, queue, cancel, status, and batches."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Annotated

import typer

from oppen.cli.app import JsonFlag, app, pairs
from oppen.cli.progress import following, waiting
from oppen.cli.render import console, show

Workload = Annotated[str, typer.Argument(help="mnist or lm.")]
Config = Annotated[list[str] | None, typer.Option("--config", "-c", help="Workload config k=v; repeatable.")]
Run = Annotated[list[str] | None, typer.Option("--run", "-r", help="Run config k=v (epochs, batch_size, max_steps, ...).")]
Cost = Annotated[list[str] | None, typer.Option("--cost", help="Cost policy k=v (team, max_cost_usd, spot, resources.gpus, ...).")]
Deployment = Annotated[str, typer.Option(help="Deployment of the workload's flow: local, gpu, gpu-urgent, gpu-spot.")]

POLL_SECONDS = 2.0  # how often a followed run's status is read: each read asks Prefect, the ledger and MLflow

queue_app = typer.Typer(help="The work queues: what waits, in which order, and what it will cost.",
                        invoke_without_command=True)
app.add_typer(queue_app, name="queue", rich_help_panel="Training")
batch_app = typer.Typer(help="Batches of training jobs run by one parent flow (resumable by batch id).",
                        no_args_is_help=True)
app.add_typer(batch_app, name="batch", rich_help_panel="Training")


def quoting(workload: str, deployment: str) -> str:
    """The spinner's words while a job is quoted: from its request's history in MLflow, against its budgets."""
    return f"Quoting {workload} on {deployment} from its run history, against its budgets…"


def _job(workload: str, deployment: str, config, run, cost, experiment, model_name, name) -> dict:
    return {"workload": workload, "deployment": deployment, "config": pairs(config, "--config"),
            "run": pairs(run, "--run"), "cost": pairs(cost, "--cost"), "experiment": experiment,
            "model_name": model_name, "name": name}


@app.command(rich_help_panel="Training")
def train(
    workload: Workload,
    config: Config = None, run: Run = None, cost: Cost = None, deployment: Deployment = "local",
    queue: Annotated[str, typer.Option(help="urgent, normal or background.")] = "normal",
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment (default: the deployment's).")] = None,
    model_name: Annotated[str | None, typer.Option(help="Registered model name (default: the deployment's).")] = None,
    name: Annotated[str | None, typer.Option(help="Flow run name.")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Follow the run until it ends.")] = False,
    json_output: JsonFlag = False,
) -> None:
    """Quote a training job, refuse it when it does not fit its budget, else start it through its deployment."""
    with waiting(quoting(workload, deployment), json_output):
        from oppen.api.jobs import describe, queue_training_job

        job = queue_training_job(_job(workload, deployment, config, run, cost, experiment, model_name, name),
                                 priority=queue)
    if not wait:
        if json_output:
            show(job, json_output, title="queued")
        else:
            console.print(describe(job), highlight=False, soft_wrap=True)
        return
    if not json_output:
        console.print(describe(job), highlight=False, soft_wrap=True)
    _follow(job.flow_run_id, json_output)


def _follow(flow_run_id: str, json_output: bool) -> None:
    """Follow the run to its end: its story lines as they reach Prefect and a bar on a terminal, then its summary
    (as the main command ends); with --json, only the final status."""
    with following(flow_run_id, json_output) as update:
        from oppen.api.status import get_training_status

        with _story(flow_run_id, json_output) as story:
            while True:
                story.poll()
                status = get_training_status(flow_run_id, log_lines=0)
                update(status)
                if status.state.final:
                    break
                time.sleep(POLL_SECONDS)
            story.finish()
    if json_output:
        show(get_training_status(flow_run_id), json_output, title=f"flow run {flow_run_id}")
    else:
        _summary(flow_run_id)
    if status.state.type != "COMPLETED":
        raise typer.Exit(1)


class _Silent:
    def poll(self) -> None: ...

    def finish(self) -> None: ...


class _Story:
    """The run's story lines (oppen/terminal/follow.py) printed above the bar."""

    def __init__(self, client, flow_run_id: str) -> None:
        from oppen.terminal.follow import RunFollower

        self.client = client
        self.follower = RunFollower(
            client, flow_run_id, lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True))

    def poll(self) -> None:
        self.follower.poll()

    def finish(self) -> None:
        self.follower.finish(self.client.read_flow_run(self.follower.flow_run_id))


@contextlib.contextmanager
def _story(flow_run_id: str, json_output: bool):
    if json_output:
        yield _Silent()
        return
    from oppen.api import context

    with context.prefect() as client:
        yield _Story(client, flow_run_id)


def _summary(flow_run_id: str) -> None:
    from oppen.terminal.watch import print_summary

    print_summary(flow_run_id, console)


@queue_app.callback()
def queue_status(
    ctx: typer.Context,
    pool: Annotated[str | None, typer.Option(help="Only this work pool.")] = None,
    json_output: JsonFlag = False,
) -> None:
    """Pending runs per queue in the order they will start, with ETAs, queued cost and holds."""
    if ctx.invoked_subcommand is not None:
        return
    with waiting(f"Reading the queues of {pool or 'every pool'} and simulating their ETAs…", json_output):
        from oppen.api.queue_status import get_job_queue_status

        status = get_job_queue_status(pool=pool)
    if json_output:
        show(status, True)
        return
    show(status.queues, False, title="queues", columns=["pool", "queue", "priority", "pending", "running",
                                                         "queued_cost_micros", "held_micros", "unquoted", "oldest_wait_s"])
    show(status.pending, False, title="pending, in start order", columns=[
        "position", "name", "pool", "queue", "state", "eta", "team", "expected_micros", "held_micros", "flow_run_id"])
    if status.running:
        show(status.running, False, title="running", columns=["name", "pool", "queue", "started", "expected_end",
                                                               "flow_run_id"])
    from oppen.cli.render import money

    console.print(f"queued cost {money(status.total_queued_cost_micros)} · held {money(status.total_held_micros)}",
                  highlight=False)


@queue_app.command("add")
def queue_add(
    workload: Workload,
    priority: Annotated[str, typer.Option(help="urgent, normal or background.")] = "normal",
    config: Config = None, run: Run = None, cost: Cost = None, deployment: Deployment = "local",
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment.")] = None,
    model_name: Annotated[str | None, typer.Option(help="Registered model name.")] = None,
    name: Annotated[str | None, typer.Option(help="Flow run name.")] = None,
    job_variable: Annotated[list[str] | None, typer.Option("--job-variable", "-j", help="Job variable k=v.")] = None,
    json_output: JsonFlag = False,
) -> None:
    """Queue a training job with a priority: quoted, refused over budget, else held until it starts."""
    with waiting(quoting(workload, deployment), json_output):
        from oppen.api.jobs import queue_training_job

        job = queue_training_job(_job(workload, deployment, config, run, cost, experiment, model_name, name),
                                 priority=priority, job_variables=pairs(job_variable, "--job-variable") or None)
    show(job, json_output, title="queued")


@app.command(rich_help_panel="Training")
def cancel(
    flow_run_id: Annotated[str, typer.Argument(help="The flow run to cancel.")],
    reason: Annotated[str, typer.Option("--reason", "-m", help="Why: recorded in its state and the ledger.")],
    json_output: JsonFlag = False,
) -> None:
    """Cancel a queued or running job; its queue hold is released and the reason recorded."""
    with waiting(f"Cancelling flow run {flow_run_id} and releasing its hold…", json_output):
        from oppen.api.jobs import cancel_training_job

        cancelled = cancel_training_job(flow_run_id, reason)
    show(cancelled, json_output, title="cancelled")


@app.command(rich_help_panel="Training")
def status(
    flow_run_id: Annotated[str, typer.Argument(help="The flow run.")],
    logs: Annotated[int, typer.Option(min=0, max=500, help="Log lines to show.")] = 10,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Follow it until it ends.")] = False,
    json_output: JsonFlag = False,
) -> None:
    """A run's state, progress, cost so far, forecast and latest log lines."""
    if follow:
        _follow(flow_run_id, json_output)
        return
    with waiting(f"Reading flow run {flow_run_id} from Prefect, the ledger and MLflow…", json_output):
        from oppen.api.status import get_training_status

        status = get_training_status(flow_run_id, log_lines=logs)
    show(status, json_output, title=f"flow run {flow_run_id}")


@batch_app.command("submit")
def batch_submit(
    file: Annotated[Path, typer.Argument(help="JSON or YAML: a list of jobs {deployment, parameters, name?}.",
                                         exists=True, dir_okay=False)],
    mode: Annotated[str, typer.Option(help="sequential or parallel.")] = "sequential",
    batch_id: Annotated[str | None, typer.Option("--id", help="Batch id; the same id resumes a batch.")] = None,
    keep_going: Annotated[bool, typer.Option(help="Sequential: go on after a failed job.")] = False,
    json_output: JsonFlag = False,
) -> None:
    """Run a batch of training jobs as one parent flow; submitting the same id again skips completed jobs."""
    import yaml

    jobs = yaml.safe_load(file.read_text())
    jobs = jobs.get("jobs", jobs) if isinstance(jobs, dict) else jobs
    count = f"{len(jobs)} jobs" if isinstance(jobs, list) else "the jobs"
    with waiting(f"Quoting {count} of the batch together, then submitting it…", json_output):
        from oppen.api.batch import submit_batch_training

        submitted = submit_batch_training(jobs, mode=mode, batch_id=batch_id, stop_on_failure=not keep_going)
    show(submitted, json_output, title="batch")


@batch_app.command("status")
def batch_status(batch_id: Annotated[str, typer.Argument(help="The batch id.")], json_output: JsonFlag = False) -> None:
    """Each job of a batch with its latest attempt's state."""
    with waiting(f"Reading batch {batch_id} and its jobs' runs…", json_output):
        from oppen.api.batch import get_batch_status

        status = get_batch_status(batch_id)
    show(status, json_output, title=f"batch {batch_id}")
