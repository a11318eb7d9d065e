"""What users read about a run: the terminal summary, the story lines, the cost report, the state message."""

from __future__ import annotations

import re
from datetime import datetime, timezone

import pytest

from oppen.cost.cost_story import cost_rows, headline, render_cost_markdown
from oppen.cost.settlement import RunCost
from oppen.display import metric_phrase, percent, usd
from oppen.story import epoch_line, quote_line, settled_line
from oppen.terminal.summary import BudgetLine, RunSummaryFacts, render
from oppen.tracking_keys import metric_key, section_of
from tasks.failures import failure_line, logged_by_a_task


def _cost(**changes) -> RunCost:
    fields = dict(
        status="settled", attempt=1, charges_micros={"2026-12": 351}, prior_micros=0, run_cost_micros=351,
        training_usd=0.000194, at_training_end_usd=0.000300, tail_reserve_usd=0.00003, on_demand_usd=0.000351,
        seconds=12.6, peak_seconds=12.6, off_peak_seconds=0.0, gpu_hours=0.0, cpu_hours=0.007, memory_gib_hours=0.0,
        cap_usd=0.0005, limit_usd=0.0005, cap_overshoot_usd=None, max_step_usd=0.0000009, quote_expected_usd=0.000342,
        quote_p90_usd=0.00039, quote_error=-0.0256, forecast_after_epoch1_usd=0.000355, forecast_error=0.0114,
        metric_name="test_accuracy", metric_value=0.9915, cost_per_point_usd=0.0000035, spot=False,
        spot_interruptions=0, spot_lost_seconds=0.0, spot_lost_usd=0.0,
        epoch_costs=[(1, 0.000203), (2, 0.000290)], utilization={}, stop_reason=None,
    )
    return RunCost(**(fields | changes))


def _facts(**changes) -> RunSummaryFacts:
    fields = dict(
        flow_run_id="0f1e2d3c-0000-4000-8000-000000000001", flow_run_name="stoic-dragon", workload="mnist",
        state="Completed", state_message="$0.000351 of $0.0005 cap (70.2%) · test accuracy 99.15%", final=True,
        duration_seconds=26.04, result="test accuracy 99.15%", registered=["mnist-cnn version 3 (development)"],
        cost_usd=0.000351, cap_usd=0.0005, booked=True, quote_usd=0.000342, quote_error=-0.0256,
        forecast_usd=0.000355, forecast_error=0.0114,
        budgets=[BudgetLine(scope="team default", period="in 2026-12", used_usd=0.004964, limit_usd=25.0,
                            fraction=0.0001986),
                 BudgetLine(scope="experiment mnist", period="in 2026-12", used_usd=0.004964, limit_usd=10.0,
                            fraction=0.0004964)],
        cheapest_start=datetime(2026, 12, 5, 22, 0, tzinfo=timezone.utc), cheapest_usd=0.000171, saving_usd=0.000171,
        prefect_url="http://127.0.0.1:4200/runs/flow-run/0f1e", mlflow_url="http://127.0.0.1:5000/#/x?workflowType=machine_learning",
    )
    return RunSummaryFacts(**(fields | changes))


def test_the_terminal_summary_says_cost_errors_budgets_cheapest_start_and_links():
    text = "\n".join(render(_facts()))
    assert text.splitlines()[0] == "mnist run stoic-dragon: Completed"
    for expected in [
        "result         test accuracy 99.15%",
        "registered     mnist-cnn version 3 (development)",
        "cost           $0.000351 of $0.0005 cap (70.2%), booked in the ledger",
        "quote          $0.000342 before training, error -2.6%",
        "forecast       $0.000355 after epoch 1, error +1.1%",
        "budget used    team default: $0.004964 of $25.00 in 2026-12 (<0.1%)",
        "               experiment mnist: $0.004964 of $10.00 in 2026-12 (<0.1%)",
        "cheapest start 2026-12-05 22:00 UTC (off-peak): $0.000171, saves $0.000171",
        "took           26.0 s",
        "Prefect UI     http://127.0.0.1:4200/runs/flow-run/0f1e",
        "MLflow UI      http://127.0.0.1:5000/#/x?workflowType=machine_learning",
    ]:
        assert expected in text, expected


def test_a_refused_run_says_why_and_shows_no_money_it_did_not_spend():
    text = "\n".join(render(_facts(
        state="OverBudget", state_message="refused before loading: budget exhausted", result=None, registered=[],
        cost_usd=None, quote_usd=None, quote_error=None, forecast_usd=None, forecast_error=None, budgets=[],
        cheapest_start=None, cheapest_usd=None, saving_usd=None, mlflow_url=None)))
    assert "mnist run stoic-dragon: OverBudget" in text
    assert "why            refused before loading: budget exhausted" in text
    assert "cost " not in text and "quote " not in text and "MLflow UI" not in text


def test_a_settlement_waiting_for_the_ledger_says_so():
    assert "waiting for the ledger (`oppen reconcile` books it)" in "\n".join(render(_facts(booked=False)))


def test_each_epoch_is_one_line_with_its_loss_metric_time_cost_and_forecast_against_the_cap():
    line = epoch_line(1, 2, 0.13121, {"val_accuracy": 0.9862, "val_loss": 0.044}, 10.42, 0.000180, 0.000351, 0.0005)
    assert line == ("epoch 1/2 · loss 0.1312 · val accuracy 98.62% · 10.4 s · cost so far $0.00018 · "
                    "forecast $0.000351 of $0.0005 cap (70.2%)")


def test_quote_and_settlement_lines_lead_with_the_money():
    assert quote_line(0.000342, 0.00039, 21.0, "from history (4 runs)", None, 0.0) == \
        "quote $0.000342 (p90 $0.00039) for ~21.0 s, from history (4 runs) · cheapest start now"
    assert "cheapest start 2026-12-05 22:00 UTC: saves $0.000171" in quote_line(
        0.000342, 0.00039, 21.0, "from a 20-step calibration", "2026-12-05 22:00 UTC", 0.000171)
    assert settled_line(0.000351, 0.0005, "stopped", -0.0256, True) == \
        "settled $0.000351 of $0.0005 cap (70.2%) (stopped) · quote error -2.6% · booked in the ledger"


def test_the_cost_report_explains_where_the_money_went_with_human_names():
    cost = _cost()
    text = render_cost_markdown(cost, "mnist run stoic-dragon", "booked in the ledger")
    assert text.startswith("# $0.000351 for mnist run stoic-dragon\n")
    assert "| figure | value |" in text and "| | |" not in text
    assert "| Cost of the run | $0.000351 of $0.0005 cap (70.2%), completed |" in text
    assert "| Before training (data, quote) | $0.000106 |" in text
    assert "| Training (first step to last) | $0.000194 |" in text
    assert "| After training (test, model, registry) | $0.000051 |" in text
    assert "| Quote before training | $0.000342 (p90 $0.00039), error -2.6% |" in text
    assert "| Result | test accuracy 99.15% |" in text
    # Epoch 1 began after loading ($0.000106): it cost $0.000097, and the run stood at $0.000203 by its end.
    assert "| 1 | $0.000097 | $0.000203 |" in text and "| 2 | $0.000087 | $0.00029 |" in text
    assert not re.search(r"\de-\d|\d\.\d{7,}", text)  # no float noise: no exponents, no 8-digit fractions
    assert dict(cost_rows(cost))["Cost per quality point"] == "$0.000004"


def test_the_headline_is_the_amount_then_the_cap():
    assert headline(_cost()) == "$0.000351 of $0.0005 cap (70.2%)"
    assert headline(_cost(cap_usd=None)) == "$0.000351"


@pytest.mark.parametrize(("value", "text"), [(0.000291, "$0.000291"), (10.0, "$10.00"), (0.0005, "$0.0005"),
                                               (12.41301, "$12.413"), (None, "n/a")])
def test_money_shows_every_micro_dollar_under_a_dollar_and_cents_above(value, text):
    assert usd(value) == text


def test_fractions_and_metrics_read_as_words():
    assert percent(0.702) == "70.2%" and percent(0.0002) == "<0.1%" and percent(1252.74) == "1,253x"
    assert metric_phrase("test_accuracy", 0.99151) == "test accuracy 99.15%"
    assert metric_phrase("eval_perplexity", 245.0446) == "eval perplexity 245.0"


def test_mlflow_keys_are_grouped_in_sections():
    assert metric_key("val_accuracy") == "val/accuracy" and metric_key("test_accuracy") == "test/accuracy"
    assert metric_key("eval_perplexity") == "eval/perplexity" and metric_key("custom") == "custom"
    assert section_of("cost/total_usd") == "cost" and section_of("custom") == ""


def test_an_unexpected_failure_is_one_line_naming_where_it_happened():
    def store_model():
        raise OSError("artifact store\n unreachable")

    with pytest.raises(OSError) as caught:
        store_model()
    line = failure_line(caught.value)
    assert line.startswith("the run failed in store_model (tests/test_run_story.py:")
    assert line.endswith("): OSError: artifact store unreachable") and "\n" not in line
    assert not logged_by_a_task(caught.value)  # raised here, not in a Prefect task: the pipeline logs the traceback
