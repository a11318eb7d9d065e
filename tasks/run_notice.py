"""The notify stage: every training run's ending, posted to its team's Slack channel by the flow itself.

A user hears about a run without configuring any automation. The flow's own named endings
(Completed, Deferred, OverBudget, InvalidRequest, LedgerUnavailable, DataUnavailable) are posted
here; a run that fails unexpectedly or crashes is posted by the `oppen: training run failed`
automation, which sees Prefect's own events when no flow code is left to run.
"""

from __future__ import annotations

import logging

from prefect.states import State

from oppen.cost.budgets import open_ledger
from oppen.events import RunEventContext
from oppen.notify.blocks import MetricValue, RegisteredModel, RunFacts, run_message
from oppen.settings import OppenSettings
from tasks.slack import notify_slack, record_failure
from tasks.summary import TrainingSummary

log = logging.getLogger(__name__)

STATUS_OF_STATE = {
    "Completed": "completed", "SettlementPending": "completed", "Deferred": "deferred", "OverBudget": "refused",
    "InvalidRequest": "invalid", "LedgerUnavailable": "failed", "DataUnavailable": "failed",
}


def budget_fraction(settings: OppenSettings, team: str, experiment: str) -> float | None:
    """The fullest budget this run answers to, after it (None when the ledger cannot say)."""
    try:
        ledger = open_ledger(settings.ledger, settings.budgets_file)
    except Exception:  # the ledger is down: the message goes out without the figure
        return None
    try:
        uses = ledger.budget_uses(team, experiment)
    except Exception:
        return None
    finally:
        ledger.dispose()
    fractions = [use.used_micros / use.amount_micros for use in uses if use.amount_micros]
    return max(fractions) if fractions else None


def run_facts(settings: OppenSettings, request, events: RunEventContext, state: State) -> RunFacts:
    summary = state.data if isinstance(state.data, TrainingSummary) else None
    status = STATUS_OF_STATE.get(state.name or "", "failed")
    cost = summary.cost if summary else None
    if cost is not None and cost.status == "stopped":
        status = "stopped"
    evaluation = summary.evaluation if summary else None
    registered = summary.registered if summary else None
    return RunFacts(
        workload=request.plan.name, run_name=events.flow_run_name or request.plan.name,
        flow_run_id=events.flow_run_id, status=status, headline=state.message or state.name or status,
        team=request.cost.team, experiment=request.experiment,
        cost_usd=cost.cost_usd if cost else None,
        cap_usd=request.cost.max_cost_usd, quote_usd=cost.quote_expected_usd if cost else None,
        # Not asked again of a ledger the run just found unreachable (each try may wait its 5 s connect timeout).
        budget_fraction=None if state.name == "LedgerUnavailable" else budget_fraction(
            settings, request.cost.team, request.experiment),
        metric=MetricValue(name=evaluation.primary_metric, value=evaluation.primary_value) if evaluation else None,
        registered=RegisteredModel(name=registered.name, version=registered.version, alias=registered.alias)
        if registered else None,
        prefect_url=events.links.get("prefect"), mlflow_url=events.links.get("mlflow"),
    )


def notify_run(settings: OppenSettings, request, events: RunEventContext, state: State) -> None:
    """Post the run's ending; never raises, and delays the run by at most settings.slack_deadline_s."""
    try:
        message = run_message(run_facts(settings, request, events, state))
    except Exception as error:  # a summary we cannot render must not change how the run ended
        log.warning("run summary for Slack could not be built: %s", error)
        return
    notify_slack(message, request.cost.team, on_failure=lambda delivery: record_failure(events, delivery, "run"))
