"""The recommender's strategies (each from data, hidden without it) and the cost report's frame and trend."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from oppen.cost.price_book import PriceBook, Rates, Resources
from oppen.cost.recommend import RunRecord, recommend
from oppen.cost.report import build_frame, markdown_table, summarize, trend

BOOK = PriceBook(rates=Rates(gpu_type_hour_usd={"nvidia-a100": 2.0, "nvidia-t4": 0.35}))
NOON = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)


def _run(**overrides) -> RunRecord:
    base = dict(
        run_id="a" * 32, workload="mnist", started_at=NOON, batch_size=256, learning_rate=8e-3, epochs=5,
        resources=Resources(cpu_cores=2), cost_usd=0.05, seconds=1800.0, peak_seconds=1800.0,
        samples_per_second=5000.0, metric_name="test_accuracy", metric_value=0.990,
        val_history=[0.970, 0.985, 0.9900, 0.9902, 0.9903], epoch_costs=[0.01, 0.02, 0.03, 0.04, 0.05],
        cpu_cores_mean=1.9, cpu_cores_peak=1.95, memory_peak_gib=0.8,
    )
    return RunRecord(**(base | overrides))


def _by_strategy(run, history=()):
    return {item.strategy: item for item in recommend(run, list(history), BOOK)}


def test_early_stopping_prices_the_epochs_after_the_plateau():
    found = _by_strategy(_run())
    item = found["early_stopping"]
    assert "after epoch 3 of 5" in item.action and item.saving_usd == pytest.approx(0.02)


def test_off_peak_and_spot_are_priced_from_the_run():
    found = _by_strategy(_run())
    assert found["off_peak"].saving_usd == pytest.approx(0.025)  # 50% of a run entirely at peak
    spot = found["spot"]
    assert 0.6 * 0.05 < spot.saving_usd < 0.7 * 0.05  # 70% off, minus expected lost work
    assert "off_peak" not in _by_strategy(_run(peak_seconds=0.0))


def test_batch_size_uses_measured_throughput_of_runs_that_reached_the_same_quality():
    faster = _run(run_id="b" * 32, batch_size=512, samples_per_second=8000.0, metric_value=0.9895)
    worse = _run(run_id="c" * 32, batch_size=1024, samples_per_second=12000.0, metric_value=0.97)
    item = _by_strategy(_run(), [faster, worse])["batch_size"]
    assert "batch size 512" in item.action and item.saving_usd == pytest.approx(0.05 * (1 - 5000 / 8000))


def test_learning_rate_from_a_run_that_got_there_in_fewer_epochs():
    quicker = _run(run_id="d" * 32, learning_rate=2e-2, val_history=[0.980, 0.9905, 0.991])
    item = _by_strategy(_run(), [quicker])["learning_rate"]
    assert "0.02" in item.action and item.saving_usd == pytest.approx(0.05 - 0.02)


def test_low_gpu_utilization_suggests_cpu_or_a_cheaper_gpu():
    gpu = Resources(gpus=1, gpu_type="nvidia-a100", cpu_cores=4)
    idle = _by_strategy(_run(resources=gpu, gpu_util_mean=0.08))["low_utilization"]
    assert idle.action == "run on CPU" and idle.saving_usd == pytest.approx(2.0 * 0.5)
    half = _by_strategy(_run(resources=gpu, gpu_util_mean=0.3))["low_utilization"]
    assert "nvidia-t4" in half.action and half.saving_usd == pytest.approx((2.0 - 0.35) * 0.5)
    assert "low_utilization" not in _by_strategy(_run(resources=gpu, gpu_util_mean=0.9))


def test_right_sizing_against_measured_peaks():
    big = Resources(cpu_cores=8, memory_gib=16)
    item = _by_strategy(_run(resources=big, cpu_cores_peak=1.6, memory_peak_gib=0.9))["right_sizing"]
    assert "cpu 8 -> 2 cores" in item.action and "memory 16 -> 1.25 GiB" in item.action
    assert item.saving_usd == pytest.approx(6 * 0.05 * 0.5)


def test_strategies_without_data_are_not_shown():
    bare = _run(val_history=[], epoch_costs=[], samples_per_second=None, cpu_cores_peak=None, memory_peak_gib=None)
    assert set(_by_strategy(bare)) == {"off_peak", "spot"}  # only what the run's own time and price support
    assert set(_by_strategy(bare.model_copy(update={"spot": True, "peak_seconds": 0.0}))) == set()


def _ledger_row(i: int, usd: float, status: str = "settled") -> dict:
    return {"id": f"r{i}", "created_at": NOON + timedelta(days=i), "team": "ml", "experiment": "mnist",
            "workload": "mnist", "status": status, "quote_usd": usd, "actual_usd": usd, "mlflow_run_id": f"m{i}"}


def test_report_frame_skips_refused_runs_and_reads_the_trend():
    rows = [_ledger_row(i, 0.05 - 0.01 * i) for i in range(4)] + [_ledger_row(9, 0.0, "refused")]
    quality = {f"m{i}": ("test_accuracy", 0.99, (0.05 - 0.01 * i) / 99) for i in range(4)}
    frame = build_frame(rows, quality)
    assert len(frame) == 4 and frame["actual_usd"].sum() == pytest.approx(0.14)
    assert trend(frame)[0] == "improving"
    assert trend(frame.iloc[::-1].assign(created_at=frame["created_at"].to_numpy()))[0] == "degrading"
    assert trend(frame.head(2))[0].startswith("not enough runs")
    totals = summarize(frame)
    assert totals.loc[0, "runs"] == 4
    assert markdown_table(totals).startswith("| team | experiment | runs |")
