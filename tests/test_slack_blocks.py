"""Block Kit builders: what a run's message says, and that no input can break Slack's limits."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

from oppen.events import CATALOG, COST_SETTLED, MODEL_PROMOTED, RunEventContext, model_resource
from oppen.notify.blocks import (
    MAX_BLOCKS,
    MAX_FIELD_TEXT,
    MAX_FIELDS,
    MAX_HEADER_TEXT,
    MAX_TEXT,
    RunFacts,
    SlackMessage,
    clip,
    cost_report_message,
    escape,
    event_message,
    metric_text,
    percent,
    run_message,
    usd,
)

FACTS = dict(
    workload="train-mnist", run_name="brisk-otter", flow_run_id="0b7c-run", status="completed",
    headline="Reached 99.12% test accuracy.", team="vision", experiment="mnist", cost_usd=0.000532,
    cap_usd=0.5, quote_usd=0.0004, budget_fraction=0.123, metric={"name": "test_accuracy", "value": 0.9912},
    registered={"name": "mnist-cnn", "version": 3, "alias": "development"},
    prefect_url="http://127.0.0.1:4200/runs/flow-run/0b7c-run",
    mlflow_url="http://127.0.0.1:5000/#/experiments/1/runs/abc",
)


def texts(message: SlackMessage) -> str:
    return json.dumps(message.blocks)


def check_limits(message: SlackMessage) -> None:
    """Slack's limits, checked independently of the builders' own constants where Slack documents them."""
    assert 1 <= len(message.text) <= 3000
    assert len(message.blocks) <= 50
    for block in message.blocks:
        if block["type"] == "header":
            assert len(block["text"]["text"]) <= 150
        if block["type"] == "section":
            assert "text" in block or "fields" in block
            assert len(block.get("text", {}).get("text", "")) <= 3000
            assert len(block.get("fields", [])) <= 10
            assert all(len(field["text"]) <= 2000 for field in block.get("fields", []))
        if block["type"] == "context":
            assert 1 <= len(block["elements"]) <= 10
        if block["type"] == "actions":
            for button in block["elements"]:
                assert len(button["text"]["text"]) <= 75 and button["url"].startswith(("http://", "https://"))
            assert len({button["action_id"] for button in block["elements"]}) == len(block["elements"])


@pytest.mark.parametrize("value, text", [
    (0.000532, "$0.000532"), (0.5, "$0.50"), (0.0, "$0.00"), (0.0000004, "$0.00"), (0.0000005, "$0.000001"),
    (0.999999, "$0.999999"), (12.5, "$12.50"), (1250.0, "$1,250.00"), (None, "n/a"), (math.nan, "n/a"),
    (-0.25, "-$0.25"),
])
def test_dollars_show_every_micro_dollar_under_one_and_cents_above(value, text):
    assert usd(value) == text


@pytest.mark.parametrize("name, value, text", [
    ("test_accuracy", 0.9912, "99.12%"), ("val_perplexity", 45.2345, "45.2"), ("test_loss", 0.123456, "0.1235"),
    ("test_perplexity", math.inf, "inf"), ("test_loss", math.nan, "nan"), (None, 1.5, "1.5000"),
])
def test_metrics_are_formatted_by_kind(name, value, text):
    assert metric_text(name, value) == text


@pytest.mark.parametrize("fraction, text", [(0.123, "12.3%"), (0.0004, "<0.1%"), (0.0, "0.0%"), (1.25, "125.0%"),
                                            (None, "n/a")])
def test_budget_fractions_read_as_percentages(fraction, text):
    assert percent(fraction) == text


def test_clipping_ends_in_an_ellipsis_and_never_in_half_an_entity():
    assert clip("short", 10) == "short"
    assert clip("abcdefghijk", 5) == "abcd…"
    clipped = clip(escape("a" * 8 + "<b>"), 11)  # "aaaaaaaa&lt;b&gt;" cut inside "&lt;"
    assert clipped == "aaaaaaaa…" and len(clipped) <= 11


def test_a_completed_run_shows_status_cost_against_cap_budget_metric_model_and_both_links():
    message = run_message(RunFacts(**FACTS))
    check_limits(message)
    header, headline, fields, about, actions = message.blocks
    assert header["text"]["text"] == ":white_check_mark: train-mnist: brisk-otter completed"
    assert headline["text"]["text"] == "Reached 99.12% test accuracy."
    shown = [field["text"] for field in fields["fields"]]
    assert shown == ["*Status*\ncompleted", "*Team / experiment*\nvision / mnist", "*Cost*\n$0.000532 of $0.50 cap",
                     "*Quote*\n$0.0004", "*Budget*\n12.3% used", "*test_accuracy*\n99.12%",
                     "*Model*\nmnist-cnn v3 `development`"]
    assert "flow run 0b7c-run" in json.dumps(about)
    assert [(b["text"]["text"], b["url"]) for b in actions["elements"]] == [
        ("Prefect run", FACTS["prefect_url"]), ("MLflow run", FACTS["mlflow_url"])]
    assert message.text == "train-mnist: brisk-otter completed ($0.000532): Reached 99.12% test accuracy."


@pytest.mark.parametrize("status, emoji, words", [
    ("completed", ":white_check_mark:", "completed"), ("stopped", ":octagonal_sign:", "stopped at its cap"),
    ("refused", ":no_entry:", "refused: over budget"), ("invalid", ":warning:", "refused: invalid request"),
    ("failed", ":x:", "failed"), ("deferred", ":hourglass_flowing_sand:", "deferred to off-peak"),
])
def test_every_status_has_its_emoji_and_words(status, emoji, words):
    message = run_message(RunFacts(**{**FACTS, "status": status}))
    check_limits(message)
    assert message.blocks[0]["text"]["text"].startswith(f"{emoji} train-mnist: brisk-otter {words}")
    assert f"*Status*\\n{words}" in texts(message)


def test_a_refused_run_has_no_cost_but_shows_its_quote_and_cap_and_no_missing_links():
    facts = RunFacts(workload="train-lm", run_name="r", status="refused", headline="Quote $3.20 exceeds the cap.",
                     team="nlp", experiment="gpt", cap_usd=2.0, quote_usd=3.2)
    message = run_message(facts)
    check_limits(message)
    shown = texts(message)
    assert "*Cap*\\n$2.00" in shown and "*Quote*\\n$3.20" in shown
    assert "Cost" not in shown and "Budget" not in shown and "Model" not in shown
    assert all(block["type"] != "actions" for block in message.blocks)


def test_a_perplexity_and_a_run_without_cap():
    message = run_message(RunFacts(**{**FACTS, "cap_usd": None, "metric": {"name": "test_perplexity", "value": 45.24}}))
    assert "*Cost*\\n$0.000532 (no cap)" in texts(message) and "*test_perplexity*\\n45.2" in texts(message)


def test_user_text_cannot_ping_a_channel_or_break_the_markup():
    message = run_message(RunFacts(**{**FACTS, "run_name": "<!channel>", "headline": "a <@U123> & <http://x|y>"}))
    shown = texts(message) + message.text
    assert "<!channel>" not in message.text and "<@U123>" not in shown and "<http" not in shown
    assert "&lt;@U123&gt; &amp; &lt;http://x|y&gt;" in message.blocks[1]["text"]["text"]


def test_huge_inputs_are_clipped_to_slacks_limits():
    long = "x" * 10_000
    message = run_message(RunFacts(**{**FACTS, "run_name": long, "headline": "<" * 5000, "team": long,
                                      "metric": {"name": long, "value": 1.0},
                                      "registered": {"name": long, "version": long, "alias": long}}))
    check_limits(message)
    assert len(message.blocks[0]["text"]["text"]) == MAX_HEADER_TEXT
    assert message.blocks[1]["text"]["text"].endswith("…") and len(message.blocks[1]["text"]["text"]) <= MAX_TEXT
    assert all(len(f["text"]) <= MAX_FIELD_TEXT for f in message.blocks[2]["fields"])


def test_links_slack_cannot_open_are_dropped_rather_than_breaking_the_message():
    message = run_message(RunFacts(**{**FACTS, "prefect_url": "javascript:alert(1)",
                                      "mlflow_url": "http://x/" + "a" * 3000}))
    assert all(block["type"] != "actions" for block in message.blocks)


def test_run_facts_refuse_unknown_fields_and_statuses():
    with pytest.raises(ValidationError):
        RunFacts(**{**FACTS, "colour": "red"})
    with pytest.raises(ValidationError):
        RunFacts(**{**FACTS, "status": "crashed"})
    with pytest.raises(ValidationError):
        RunFacts(**{**FACTS, "cost_usd": -1.0})


def test_a_message_outside_slacks_limits_is_refused_whoever_builds_it():
    with pytest.raises(ValidationError):
        SlackMessage(text="x", blocks=[{"type": "divider"}] * (MAX_BLOCKS + 1))
    with pytest.raises(ValidationError):
        SlackMessage(text="x", blocks=[{"type": "section", "fields": [{"type": "mrkdwn", "text": "y" * 3001}]}])
    with pytest.raises(ValidationError):
        SlackMessage(text="", blocks=[])


def test_the_cost_report_lists_the_ten_costliest_and_counts_the_rest():
    rows = [{"team": f"team-{i:02d}", "experiment": f"exp-{i}", "runs": i + 1, "cost_usd": float(i)} for i in range(14)]
    message = cost_report_message("Weekly cost", rows, total_usd=91.0, period="2026-11-16 to 2026-11-22",
                                  links={"Prefect": "http://127.0.0.1:4200", "bad": "ftp://x"})
    check_limits(message)
    table = next(b["text"]["text"] for b in message.blocks if b.get("text", {}).get("text", "").startswith("```"))
    lines = table.strip("`").splitlines()
    assert lines[0].split() == ["team", "experiment", "runs", "cost"]
    assert [line.split()[0] for line in lines[1:]] == [f"team-{i:02d}" for i in range(13, 3, -1)]
    assert lines[1].split() == ["team-13", "exp-13", "14", "$13.00"]
    assert "and 4 more ($6.00)" in texts(message)  # teams 0-3: 0+1+2+3
    assert "$91.00 over 105 runs" in texts(message)
    assert [b["url"] for b in message.blocks[-1]["elements"]] == ["http://127.0.0.1:4200"]


def test_an_empty_cost_report_still_reads():
    message = cost_report_message("Weekly cost", [], total_usd=0.0, period="last week")
    check_limits(message)
    assert "$0.00 over 0 runs" in texts(message) and "```" not in texts(message)


def _figures(name: str) -> dict:
    """A plausible value for every payload key of a catalogued event."""
    values = {"fraction": 0.72, "budget_fraction": 0.95, "gpu_utilization": 0.12, "threshold": 0.4, "ratio": 2.37,
              "epoch_seconds": 61.2, "expected_seconds": 25.8, "epoch": 3, "gpus": 2, "attempt": 1, "version": 4,
              "metric": "test_accuracy", "metric_value": 0.9912, "links": {"prefect": "http://127.0.0.1:4200/r"}}
    return {key: values.get(key, 1.234567 if key.endswith("_usd") else f"{key}-value") for key in CATALOG[name].payload}


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_every_catalogued_event_renders_with_its_figures_and_links(name):
    spec = CATALOG[name]
    context = RunEventContext("0b7c-run", "vision", "mnist", "train-mnist", flow_run_name="brisk-otter")
    resource = model_resource("mnist-cnn", 4, "staging") if spec.resource == "model" else context.resource()
    message = event_message(name, resource, _figures(name))
    check_limits(message)
    shown = texts(message)
    title = message.blocks[0]["text"]["text"]
    assert name.split(".")[1].capitalize() in title
    assert ("mnist-cnn v4 (staging)" if spec.resource == "model" else "brisk-otter train-mnist (vision/mnist)") in shown
    labels = [key.replace("_", " ") for key in spec.payload if key != "links"]
    assert all(f"*{label}*" in shown for label in labels)
    assert "http://127.0.0.1:4200/r" in shown and spec.when in shown
    assert message.blocks[-1]["elements"][0]["text"]["text"] == "Prefect"  # the flows' "prefect" key, as a label


def test_event_figures_are_formatted_by_key():
    message = event_message(COST_SETTLED, {"prefect.resource.id": "oppen.run.x"}, {
        "status": "completed", "cost_usd": 0.000532, "cap_usd": 0.5, "metric": "test_accuracy",
        "metric_value": 0.9912, "attempt": 2, "links": {}})
    fields = [f["text"] for f in message.blocks[2]["fields"]]
    assert fields == ["*status*\ncompleted", "*cost usd*\n$0.000532", "*cap usd*\n$0.50", "*attempt*\n2",
                      "*metric*\ntest_accuracy", "*metric value*\n99.12%"]
    assert message.blocks[1]["text"]["text"] == "oppen.run.x"


def test_an_event_outside_the_catalog_or_with_a_huge_payload_still_fits():
    payload = {f"figure_{i:03d}": i * 1.5 for i in range(200)} | {"nested": {"a": [1, 2]}, "none": None}
    message = event_message("oppen.custom.thing-happened", {}, payload)
    check_limits(message)
    assert message.blocks[0]["text"]["text"] == ":bell: Custom thing happened"
    assert sum(len(b.get("fields", [])) for b in message.blocks) == 30 and len(message.blocks) <= MAX_FIELDS
    assert "and 171 more figures" in texts(message)  # 201 shown-worthy figures (None is left out), 30 shown


def test_a_model_promotion_names_the_model_and_the_alias():
    message = event_message(MODEL_PROMOTED, model_resource("mnist-cnn", 7, "production"),
                            {"name": "mnist-cnn", "version": 7, "alias": "production", "replaced_version": 5})
    assert message.text == "Model promoted: model mnist-cnn v7 (production)"
    assert message.blocks[0]["text"]["text"] == ":rocket: Model promoted"
