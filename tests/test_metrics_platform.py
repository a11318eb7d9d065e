"""The platform collector: what it serves from each poll, what it leaves out when a source fails, and
that its outcome counter never goes down. Readers are given here; the real ones run against a real
Prefect server in test_integration_metrics_platform.py."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from oppen.api.errors import Unavailable
from oppen.api.reports import BudgetStatus
from oppen.metrics.platform_collector import PlatformCollector
from oppen.metrics.platform_exporter import main
from oppen.metrics.platform_readings import QueueReading

QUEUES = [QueueReading(pool="local", queue="urgent", pending=0, late=0, running=1, oldest_wait_s=0.0,
                       queued_cost_usd=0.0, held_usd=0.0),
          QueueReading(pool="local", queue="background", pending=3, late=2, running=0, oldest_wait_s=75.5,
                       queued_cost_usd=0.0012, held_usd=0.003)]


def budget(experiment: str | None, period: str, limit: float, spent: float, held: float) -> BudgetStatus:
    micros = lambda usd: round(usd * 1e6)  # noqa: E731
    used = spent + held
    return BudgetStatus(team="vision", experiment=experiment, period=period, month=None, limit_micros=micros(limit),
                        limit_usd=limit, spent_micros=micros(spent), spent_usd=spent, held_micros=micros(held),
                        held_usd=held, used_micros=micros(used), used_usd=used, remaining_micros=micros(limit - used),
                        remaining_usd=limit - used, fraction_used=used / limit, state="ok")


BUDGETS = [budget(None, "monthly", 100.0, 12.5, 0.5), budget("mnist", "total", 10.0, 1.0, 0.0)]


class Readers:
    """Each source's next reading, or an exception to raise."""

    def __init__(self) -> None:
        self.outcomes: object = {("train-mnist/local", "COMPLETED", "Completed"): 5,
                                 ("train-mnist/local", "FAILED", "OverBudget"): 2}
        self.queues: object = QUEUES

    def as_dict(self) -> dict:
        return {"queues": lambda: self._give(self.queues), "workers": lambda: {"local": 1, "kubernetes-gpu": 0},
                "budgets": lambda: BUDGETS, "outcomes": lambda: self._give(self.outcomes)}

    @staticmethod
    def _give(value):
        if isinstance(value, Exception):
            raise value
        return value


def exposition(collector: PlatformCollector) -> dict:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(families: dict, name: str) -> dict[tuple, float]:
    family = families[name.removesuffix("_total")]
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples if s.name == name}


def test_a_poll_becomes_the_catalogs_series_with_configuration_labels_only():
    readers = Readers()
    collector = PlatformCollector(readers.as_dict(), wall_clock=lambda: 1_700_000_000.0)
    assert list(exposition(collector)) == []  # nothing before the first poll
    collector.poll()
    families = exposition(collector)
    pending = samples(families, "oppen_queue_pending_runs")
    assert pending == {(("pool", "local"), ("queue", "urgent")): 0, (("pool", "local"), ("queue", "background")): 3}
    assert samples(families, "oppen_queue_late_runs")[(("pool", "local"), ("queue", "background"))] == 2
    assert samples(families, "oppen_queue_oldest_wait_seconds")[(("pool", "local"), ("queue", "background"))] == 75.5
    assert samples(families, "oppen_queue_held_usd")[(("pool", "local"), ("queue", "background"))] == 0.003
    assert samples(families, "oppen_pool_online_workers") == {(("pool", "kubernetes-gpu"),): 0, (("pool", "local"),): 1}
    spent = samples(families, "oppen_budget_spent_usd")
    # The team-wide budget carries an empty experiment, which PromQL reads as no experiment label.
    assert spent == {(("experiment", ""), ("period", "monthly"), ("team", "vision")): 12.5,
                     (("experiment", "mnist"), ("period", "total"), ("team", "vision")): 1.0}
    assert samples(families, "oppen_budget_amount_usd")[(("experiment", ""), ("period", "monthly"), ("team", "vision"))] == 100
    assert families["oppen_flow_runs_finished"].type == "counter"
    assert samples(families, "oppen_flow_runs_finished_total")[
        (("deployment", "train-mnist/local"), ("state_name", "OverBudget"), ("state_type", "FAILED"))] == 2
    assert samples(families, "oppen_exporter_poll_success") == {(("source", s),): 1
                                                               for s in ("queues", "workers", "budgets", "outcomes")}
    assert set(samples(families, "oppen_exporter_last_success_timestamp_seconds").values()) == {1_700_000_000.0}
    for family in families.values():
        for sample in family.samples:
            assert "flow_run_id" not in sample.labels


def test_the_outcome_counter_never_goes_down_while_the_exporter_runs():
    readers = Readers()
    collector = PlatformCollector(readers.as_dict())
    collector.poll()
    # A Failed run retried by hand leaves FAILED; old runs deleted leave COMPLETED: Prefect's counts drop.
    readers.outcomes = {("train-mnist/local", "COMPLETED", "Completed"): 4,
                        ("train-mnist/local", "FAILED", "OverBudget"): 1,
                        ("train-lm/gpu", "CRASHED", "Crashed"): 1}
    collector.poll()
    finished = samples(exposition(collector), "oppen_flow_runs_finished_total")
    assert finished == {(("deployment", "train-mnist/local"), ("state_name", "Completed"), ("state_type", "COMPLETED")): 5,
                        (("deployment", "train-mnist/local"), ("state_name", "OverBudget"), ("state_type", "FAILED")): 2,
                        (("deployment", "train-lm/gpu"), ("state_name", "Crashed"), ("state_type", "CRASHED")): 1}


def test_a_failing_source_is_left_out_and_said_once_and_the_others_still_served(caplog):
    readers = Readers()
    clock = iter([100.0, 200.0, 300.0, 400.0, 500.0, 600.0, 700.0, 800.0, 900.0, 1000.0, 1100.0, 1200.0])
    collector = PlatformCollector(readers.as_dict(), wall_clock=lambda: next(clock))
    collector.poll()
    readers.queues = Unavailable("the Prefect server at http://127.0.0.1:4200/api did not answer (ConnectError)")
    readers.outcomes = RuntimeError("unexpected")
    with caplog.at_level(logging.WARNING, logger="oppen.metrics"):
        collector.poll()
        collector.poll()
    families = exposition(collector)
    assert "oppen_queue_pending_runs" not in families and "oppen_flow_runs_finished" not in families
    assert "oppen_budget_spent_usd" in families and "oppen_pool_online_workers" in families
    success = samples(families, "oppen_exporter_poll_success")
    assert success[(("source", "queues"),)] == 0 and success[(("source", "outcomes"),)] == 0
    assert success[(("source", "budgets"),)] == 1
    # The last success stays what it was: an alert can say how long the source has been unreadable.
    last = samples(families, "oppen_exporter_last_success_timestamp_seconds")
    assert last[(("source", "queues"),)] == 100.0 and last[(("source", "budgets"),)] > 100.0
    assert caplog.text.count("polling queues failed") == 1 and caplog.text.count("polling outcomes failed") == 1
    assert "did not answer" in caplog.text

    readers.queues, readers.outcomes = QUEUES, {("train-mnist/local", "COMPLETED", "Completed"): 6}
    collector.poll()
    families = exposition(collector)
    assert samples(families, "oppen_queue_pending_runs") and samples(families, "oppen_flow_runs_finished_total")[
        (("deployment", "train-mnist/local"), ("state_name", "Completed"), ("state_type", "COMPLETED"))] == 6


@pytest.mark.parametrize("argv, message", [
    (["serve", "--port", "70000"], "error: --port: Input should be less than or equal to 65535"),
    (["serve", "--interval", "0.1"], "error: --interval: Input should be greater than or equal to 1"),
])
def test_a_bad_option_is_one_sentence_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == message


def test_without_a_prefect_server_set_it_says_so_instead_of_starting_one(capsys, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["serve", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: PREFECT_API_URL is unset") and err.count("\n") == 1
