"""Which failures a task retries: what may pass next time, never the user's mistake or a budget's refusal."""

from __future__ import annotations

import pytest
from prefect.states import Failed

from oppen.cost.ledger import UnknownTeamError
from oppen.cost.run_budget import BudgetRefused
from tasks.retry import transient_only
from training.errors import DataError, DataUnavailable, TrainingRequestError


@pytest.mark.parametrize("error, retried", [
    (DataError("train-images-idx3-ubyte.gz is truncated"), False),
    (TrainingRequestError("batch_size 70000 is larger than the training split"), False),
    (UnknownTeamError("unknown team 'nobody'"), False),
    (BudgetRefused("over budget: team ml"), False),
    (DataUnavailable("downloading ylecun/mnist failed"), True),
    (OSError("disk hiccup"), True),
])
def test_only_what_may_pass_next_time_is_retried(error, retried):
    assert transient_only(None, None, Failed(data=error)) is retried
