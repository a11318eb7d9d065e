"""An unexpected failure of a training run, said in one line before any traceback.

Left to itself, a task that raises is logged with its traceback by Prefect's task engine, and the
flow that re-raises it is logged with the same traceback again, and only then comes the state's
message. The pipeline instead ends such a run in a Failed state whose message is one line (what
failed, where, and what was kept), logs that line, and adds the traceback only when no task logged
it already: one traceback at most, under the line that explains it.
"""

from __future__ import annotations

import traceback
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
_TASK_ENGINE = ("prefect", "task_engine.py")


def where(error: BaseException) -> str | None:
    """The innermost frame of this project's code the error passed through: "log_model (tasks/training_tasks.py:136)"."""
    found = None
    for frame in traceback.extract_tb(error.__traceback__):
        path = Path(frame.filename).resolve()
        if PROJECT in path.parents and ".venv" not in path.parts:
            found = f"{frame.name} ({path.relative_to(PROJECT)}:{frame.lineno})"
    return found


def logged_by_a_task(error: BaseException) -> bool:
    """True when the error came out of a Prefect task, whose engine has already logged its traceback."""
    return any(Path(frame.filename).parts[-2:] == _TASK_ENGINE for frame in traceback.extract_tb(error.__traceback__))


def failure_line(error: BaseException) -> str:
    """"the run failed in log_model (tasks/training_tasks.py:136): OSError: artifact store unreachable"."""
    text = " ".join(str(error).split()) or "(no message)"
    place = where(error)
    return f"the run failed{' in ' + place if place else ''}: {type(error).__name__}: {text}"
