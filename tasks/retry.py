"""Retry what may pass next time (a disk hiccup, a dropped connection), never the user's mistake."""

from __future__ import annotations

from oppen.cost.run_budget import BudgetRefused
from oppen.errors import RequestError
from training.errors import TrainingRequestError

DETERMINISTIC = (RequestError, TrainingRequestError, BudgetRefused)


def transient_only(task, task_run, state) -> bool:
    """A task's `retry_condition_fn`: no retry for a bad request, bad data or a budget's refusal; it would
    end the same way."""
    return not isinstance(state.data, DETERMINISTIC)
