"""Commands that wait show it on stderr, to a person at a terminal only: never on stdout, never with --json.

The API calls are replaced by fakes (the commands are thin adapters, so nothing else is being tested);
stderr is a rich Console forced to act as a terminal, writing into a buffer the tests read.
"""

from __future__ import annotations

import contextlib

import io
import json

import pytest
from pydantic import BaseModel
from rich.console import Console

from oppen.cli import main, render, training


class Quota(BaseModel):
    team: str
    remaining_micros: int


@pytest.fixture
def terminal(monkeypatch) -> io.StringIO:
    """stderr as a terminal: what the commands draw there lands in this buffer."""
    buffer = io.StringIO()
    monkeypatch.setattr(render, "errors", Console(file=buffer, force_terminal=True, color_system=None, width=160))
    return buffer


@pytest.fixture
def quota(monkeypatch):
    import oppen.api.reports

    asked = []

    def fake(team: str) -> Quota:
        asked.append(team)
        return Quota(team=team, remaining_micros=1_250_000)

    monkeypatch.setattr(oppen.api.reports, "check_training_quota", fake)
    return asked


def test_a_waiting_command_shows_what_it_waits_for_on_a_terminal(terminal, quota, capsys):
    assert main(["quota", "vision"]) == 0
    assert "Reading the budgets of vision from the ledger…" in terminal.getvalue()
    out = capsys.readouterr().out
    assert "vision" in out and "$1.25" in out and "Reading" not in out  # the result on stdout, the wait never


def test_json_output_stays_clean_and_draws_nothing_even_on_a_terminal(terminal, quota, capsys):
    assert main(["quota", "vision", "--json"]) == 0
    assert terminal.getvalue() == ""
    assert json.loads(capsys.readouterr().out) == {"team": "vision", "remaining_micros": 1_250_000}


def test_nothing_is_drawn_when_stderr_is_not_a_terminal(quota, capsys):
    assert main(["quota", "vision"]) == 0  # pytest's captured stderr is a file, not a terminal
    captured = capsys.readouterr()
    assert captured.err == "" and "vision" in captured.out


def test_a_mistake_inside_the_wait_is_still_one_line(terminal, monkeypatch):
    import oppen.api.reports
    from oppen.api.errors import NotFound

    def refuse(team: str):
        raise NotFound(f"no team {team}; `oppen budgets list` lists them")

    monkeypatch.setattr(oppen.api.reports, "check_training_quota", refuse)
    assert main(["quota", "nobody"]) == 3
    drawn = terminal.getvalue()
    assert "oppen: no team nobody" in drawn and "Traceback" not in drawn
    # The spinner was cleared before the sentence was printed, so the sentence stands alone on its line.
    assert drawn.rindex("Reading the budgets of nobody") < drawn.index("oppen: no team nobody")


# --- following a run: `oppen status ID --follow`, `oppen train ... --wait` ---------------------------------------


def _status(state: str, step: int, total: int | None, final: bool = False):
    from oppen.api.status import CostForecast, CostSoFar, Progress, RunState, StatusLinks, TrainingStatus

    return TrainingStatus(
        flow_run_id="0f1e2d3c-0000-4000-8000-000000000001", flow_run_name="brave-fox", deployment="train-mnist/local",
        work_queue="normal", state=RunState(type=state.upper(), name=state, message=None, timestamp=None, final=final),
        expected_start_at=None, started_at=None, ended_at=None, experiment="mnist", mlflow_run_id=None,
        progress=Progress(step=step, total_steps=total, epoch=step / 214 if total else None, epochs_completed=0,
                          total_epochs=2 if total else None, fraction=step / total if total else None, train_loss=None,
                          source="mlflow" if total else "none"),
        cost=CostSoFar(spent_micros=0, spent_usd=0.0, held_micros=500, held_usd=0.0005,
                       accrued_usd=0.000123 if step else None, accrued_at_step=step or None, quote_micros=None,
                       quote_usd=None, attempts=[]),
        forecast=CostForecast(forecast_usd=None, at_step=None, cap_micros=None, cap_usd=None, fraction_of_cap=None,
                              quote_p90_usd=None),
        logs=[], links=StatusLinks(prefect=None, mlflow=None), summary=f"{state}; step {step}",
    )


@pytest.fixture
def a_run(monkeypatch):
    """A run read four times: queued, training at step 120 of 429, then Completed (twice: the last read has logs)."""
    import oppen.api.status

    reads = iter([_status("Scheduled", 0, None), _status("Running", 120, 429),
                  _status("Completed", 429, 429, final=True), _status("Completed", 429, 429, final=True)])
    monkeypatch.setattr(oppen.api.status, "get_training_status", lambda flow_run_id, log_lines=20: next(reads))
    monkeypatch.setattr(training, "POLL_SECONDS", 0)
    # The story lines and the summary read a real server (tests/test_cli.py follows a run through one).
    monkeypatch.setattr(training, "_story", lambda flow_run_id, json_output: contextlib.nullcontext(training._Silent()))
    monkeypatch.setattr(training, "_summary", lambda flow_run_id: training.console.print("summary: Completed"))


def test_following_a_run_draws_its_step_and_state(terminal, a_run, capsys):
    assert main(["status", "0f1e2d3c-0000-4000-8000-000000000001", "--follow"]) == 0
    drawn = terminal.getvalue()
    assert "Waiting for flow run 0f1e2d3c-0000-4000-8000-000000000001" in drawn
    assert "brave-fox: Running, epoch 1/2, $0.000123 so far" in drawn and "120/429" in drawn
    assert "summary: Completed" in capsys.readouterr().out  # then the summary the main command ends with too


def test_following_with_json_prints_only_the_final_status(terminal, a_run, capsys):
    assert main(["status", "0f1e2d3c-0000-4000-8000-000000000001", "--follow", "--json"]) == 0
    assert terminal.getvalue() == ""
    assert json.loads(capsys.readouterr().out)["state"]["name"] == "Completed"
