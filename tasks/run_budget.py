"""The cost engine's RunBudget, wired to Prefect: its logger, its events, its publishing, its SIGTERM."""

from __future__ import annotations

from prefect import get_run_logger
from prefect.exceptions import TerminationSignal

from oppen.cost.journal import SettlementJournal
from oppen.cost.ledger import Ledger
from oppen.cost.policy import CostPolicy
from oppen.cost.price_book import PriceBook
from oppen.cost.run_budget import RunBudget, SettledCost
from oppen.events import COST_SETTLED, RunEventContext, emit_run_event
from oppen.settings import OppenSettings
from oppen.story import settled_line
from tasks.cost_tasks import PrefectCostReporter, publish_cost, publish_cost_artifacts
from tasks.mlflow_tasks import TrackingRun
from tasks.run_events import tag_cost
from tasks.run_story import story_logger


def is_preemption(error: BaseException) -> bool:
    """Prefect turns SIGTERM (eviction, preemption, spot reclaim) into TerminationSignal and reschedules the run."""
    return isinstance(error, TerminationSignal)


def open_run_budget(
    settings: OppenSettings, ledger: Ledger, book: PriceBook, policy: CostPolicy, *, experiment: str, workload: str,
    run_key: str, attempt_id: str, billing_from: float, tracking: TrackingRun, title: str, events: RunEventContext,
) -> RunBudget:
    """A RunBudget whose forecasts and events reach MLflow and Prefect, and whose settlement is published there."""
    reporter = PrefectCostReporter(tracking, events)

    def publish(settled: SettledCost) -> None:
        cost = settled.cost
        story_logger().info(settled_line(cost.cost_usd, cost.cap_usd, cost.status, cost.quote_error, not settled.pending,
                                         cost.attempt, cost.attempt_cost_usd))
        # Each view of the money on its own: MLflow being down must not keep the figure out of Prefect.
        failures = []
        for step in (lambda: publish_cost(settings, settled, tracking.run_id, title),
                     lambda: publish_cost_artifacts(settled, title), lambda: tag_cost(events.flow_run_id, cost.cost_usd)):
            try:
                step()
            except Exception as error:
                failures.append(error)
        if failures:
            raise failures[0]
        emit_run_event(events, COST_SETTLED, {
            "status": cost.status, "cost_usd": cost.attempt_cost_usd, "run_cost_usd": cost.cost_usd,
            "cap_usd": cost.cap_usd, "quote_usd": cost.quote_expected_usd, "attempt": cost.attempt,
            "metric": cost.metric_name, "metric_value": cost.metric_value, "booked": not settled.pending,
        })

    return RunBudget(
        ledger=ledger, book=book, policy=policy, experiment=experiment, workload=workload, run_key=run_key,
        attempt_id=attempt_id, journal=SettlementJournal(settings.journal_dir()), billing_from=billing_from,
        on_event=reporter.event, on_forecast=reporter.forecast, publish=publish, is_preemption=is_preemption,
        logger=get_run_logger(),
    )
