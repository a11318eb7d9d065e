"""Retry what may pass next time (a disk hiccup, a dropped connection), never the user's mistake."""

from __future__ import annotations

from oppen.errors import RequestError
from training.errors import TrainingRequestError

DETERMINISTIC = (RequestError, TrainingRequestError)


def transient_only(task, task_run, state) -> bool:
    """A task's `retry_condition_fn`: no retry for a bad request or bad data; it would fail the same way."""
    return not isinstance(state.data, DETERMINISTIC)
