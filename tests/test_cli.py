"""The `oppen` CLI: rendering, exit codes and one-line errors (fast), and `--json` output through a real server."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from pydantic import BaseModel

from oppen.cli import main
from oppen.cli.app import pairs
from oppen.cli.render import cell, table

BIN = Path(sys.executable).parent
TINY = ["-r", "epochs=1", "-r", "max_steps=20", "-r", "batch_size=64"]


def test_amounts_show_every_micro_dollar_and_fractions_as_percent():
    assert cell("held_micros", 91) == "$0.000091" and cell("budget_micros", 25_000_000) == "$25.00"
    assert cell("expected_usd", 0.000291) == "$0.000291" and cell("cap_usd", None) == "-"
    assert cell("used_fraction", 0.4567) == "45.7%" and cell("fits", True) == "yes"
    assert cell("eta", datetime(2026, 11, 23, 12, 0, 5, tzinfo=timezone.utc)) == "2026-11-23 12:00:05 UTC"


def test_a_micros_field_hides_its_usd_twin():
    class Row(BaseModel):
        spent_micros: int
        spent_usd: float

    grid = table([Row(spent_micros=5, spent_usd=5e-6)])
    assert [column.header for column in grid.columns] == ["spent"]


def test_pairs_parse_json_values_and_nest_dotted_keys():
    assert pairs(["epochs=2", "resources.gpus=1", "team=vision", "spot=true"]) == {
        "epochs": 2, "resources": {"gpus": 1}, "team": "vision", "spot": True}


@pytest.mark.parametrize("argv, code, message", [
    (["train", "mnist", "-r", "epochs=0"], 2, "run.epochs: Input should be greater than 0"),
    (["train", "mnist", "--cost", "max_cost_usd=1e400"], 2, "cost.max_cost_usd: Input should be a finite number"),
    (["train", "mnist", "-r", "epochs"], 2, "expects key=value"),
    (["cancel", "not-a-run", "-m", "x"], 2, "is not a flow run id"),
    (["queue"], 5, "no Prefect server is set"),
    (["nonsense"], 2, "No such command"),
])
def test_mistakes_are_one_line_and_an_exit_code(argv, code, message, monkeypatch, capsys):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def _oppen(stack, *argv: str) -> tuple[int, dict | list, str]:
    done = subprocess.run([str(BIN / "oppen"), *argv, "--json"], env=stack.env, cwd=stack.root, capture_output=True,
                          text=True, timeout=300)
    return done.returncode, json.loads(done.stdout) if done.stdout.strip() else {}, done.stderr


@pytest.mark.slow
@pytest.mark.integration
def test_json_output_through_a_real_server(stack, shoestring_team):
    code, queued, err = _oppen(stack, "train", "mnist", *TINY, "-r", "seed=31", "--cost", "max_cost_usd=0.5")
    assert code == 0, err
    flow_run_id = queued["flow_run_id"]
    assert queued["queue"] == "normal" and queued["quote"]["hold_micros"] > 0
    assert stack.final_state(flow_run_id).is_completed()

    code, status, err = _oppen(stack, "status", flow_run_id)
    assert code == 0 and status["state"]["name"] == "Completed" and status["progress"]["step"] == 20, err
    code, cost, err = _oppen(stack, "cost", flow_run_id)
    assert code == 0 and cost["spent_micros"] > 0, err
    code, quota, err = _oppen(stack, "quota", "default")
    assert code == 0 and quota["team"] == "default", err
    code, queue, err = _oppen(stack, "queue")
    assert code == 0 and {q["queue"] for q in queue["queues"]} >= {"urgent", "normal", "background"}, err
    code, experiments, err = _oppen(stack, "experiments")
    assert code == 0 and "mnist" in {e["name"] for e in experiments}, err
    code, _, err = _oppen(stack, "cost", "0f1e2d3c-0000-4000-8000-000000000000")
    assert code == 3 and err.startswith("oppen: ") and "Traceback" not in err
    code, _, err = _oppen(stack, "train", "mnist", *TINY, "--cost", f"team={shoestring_team}", "--cost", "max_cost_usd=0.5")
    assert code == 4 and "over budget: team shoestring" in err


@pytest.mark.slow
@pytest.mark.integration
def test_train_wait_tells_the_runs_story_then_its_summary(stack):
    """What a person sees following a run from the CLI: the lines that matter, as the run writes them, then the
    summary the main command ends with; stdout holds no event feed and no traceback."""
    done = subprocess.run([str(BIN / "oppen"), "train", "mnist", *TINY, "-r", "seed=41", "--cost", "max_cost_usd=0.5",
                           "--wait"], env=stack.env, cwd=stack.root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    story = [line for line in out.splitlines() if " · " in line[:12]]
    assert any("quote $" in line for line in story), out
    assert any("reserved $" in line and "cap $0.50" in line for line in story), out
    assert any("epoch 1/1 · loss " in line and "cost so far $" in line for line in story), out
    assert any("test accuracy" in line and "held-out samples" in line for line in story), out
    assert any(line.split(" · ", 1)[1].startswith("settled $") for line in story), out
    assert "▸ Completed" in out and "prefect.task-run" not in out and "Traceback" not in out
    for label in ("cost ", "quote ", "budget used ", "Prefect UI "):  # this stack has no MLflow UI
        assert f"\n  {label}" in out, (label, out)
