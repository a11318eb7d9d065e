"""What a command shows while it waits: a spinner with what it waits for, or a bar for a training run it follows.

Both go to stderr, and only to a person: stdout carries the result (the JSON that scripts parse), so
progress never goes there; with `--json`, or when stderr is not a terminal (CI logs, `2> file`), nothing
is drawn at all, so a log never fills with spinner frames. Rich clears either when the wait ends
(transient), so the result prints where the spinner was.

A spinner starts before the command imports the API: those imports (Prefect, MLflow, the cost engine)
are most of a cold command's wait.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from oppen.cli import render

if TYPE_CHECKING:
    from oppen.api.status import TrainingStatus


def shown(json_output: bool) -> bool:
    """Whether to draw progress: for a person at a terminal, never for a script."""
    return not json_output and render.errors.is_terminal


@contextmanager
def waiting(label: str, json_output: bool) -> Iterator[Callable[[str], None]]:
    """A spinner saying `label` until the block ends; the callable it yields changes the label."""
    if not shown(json_output):
        yield lambda _label: None
        return
    with render.errors.status(label, spinner="dots") as status:
        yield lambda new_label: status.update(new_label)


def run_line(status: TrainingStatus) -> str:
    """`brave-fox: Running, epoch 1/2, $0.000123 so far` (the bar beside it shows the step)."""
    parts = [status.state.name]
    progress = status.progress
    if progress.epoch is not None and progress.total_epochs:
        # As the API's own summary counts it: 1.5 is the second epoch, 1.0 the end of the first.
        parts.append(f"epoch {min(progress.total_epochs, max(1, math.ceil(progress.epoch)))}/{progress.total_epochs}")
    if status.cost.accrued_usd is not None:
        parts.append(f"{render.cell('accrued_usd', status.cost.accrued_usd)} so far")
    return f"{status.flow_run_name}: " + ", ".join(parts)


@contextmanager
def following(flow_run_id: str, json_output: bool) -> Iterator[Callable[[TrainingStatus], None]]:
    """A bar for a run followed to its end; give each polled status to the callable it yields."""
    if not shown(json_output):
        yield lambda _status: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("steps"), TimeElapsedColumn(), console=render.errors, transient=True)
    with bar:
        # No total until the run has loaded its data: rich draws a pulsing bar and "0/?" until then.
        task = bar.add_task(f"Waiting for flow run {flow_run_id}", total=None)

        def update(status: TrainingStatus) -> None:
            # refresh=True: a poll comes every few seconds, so draw each one rather than wait for the next tick.
            bar.update(task, description=run_line(status), completed=status.progress.step,
                       total=status.progress.total_steps, refresh=True)

        yield update
