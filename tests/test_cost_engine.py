"""Pure cost logic: speed model, quote, forecast math, the stop rule, the meter, spot draws, the request edge."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from oppen.cost.forecast import crossed_thresholds, remaining_seconds, would_cross_cap
from oppen.cost.meter import CostMeter
from oppen.cost.policy import CostPolicy
from oppen.cost.price_book import PriceBook, Resources
from oppen.cost.quote import make_quote
from oppen.cost.speed import PastRun, RunShape, expected_seconds, from_calibration, from_history
from oppen.cost.spot import InterruptionSchedule, SimulatedInterruption, SpotSimulator
from training.callbacks import LoopControl, RunInfo, StepInfo
from training.results import EpochRecord, TrainResult

BOOK = PriceBook()
CPU2 = Resources(cpu_cores=2)  # $0.10 per hour at the seed's rates
GPU = Resources(gpus=1, cpu_cores=4)  # $0.45 per hour
NOON = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)


class FakeClock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


# --- speed model and quote ---------------------------------------------------------------

def test_expected_seconds_adds_steps_epoch_ends_and_overheads():
    speed = from_calibration([0.1, 0.1, 0.1], batch_size=100, eval_seconds=2.0, fixed_overhead_seconds=5.0,
                             tail_seconds=3.0)
    shape = RunShape(total_steps=250, steps_per_epoch=100, batch_size=100)  # 2.5 epochs: 3 epoch ends
    assert expected_seconds(speed, shape) == pytest.approx(250 * 0.1 + 3 * 2.0 + 5.0 + 3.0)


def test_history_uses_the_median_and_its_spread():
    runs = [PastRun(seconds_per_sample=v, epoch_overhead_seconds=1.0) for v in (1e-4, 1.1e-4, 5e-4)]
    speed = from_history(runs)
    assert speed.source == "history" and speed.seconds_per_sample == pytest.approx(1.1e-4)  # the outlier is ignored
    assert speed.p90_factor > 1.0 + 1.28 * 0.05
    assert from_history([]) is None


def test_quote_prices_cost_per_epoch_and_the_cheapest_start():
    speed = from_calibration([3.6] * 5, batch_size=1, eval_seconds=0.0, fixed_overhead_seconds=0.0)
    shape = RunShape(total_steps=1000, steps_per_epoch=500, batch_size=1)  # 3600 s: exactly one hour
    quote = make_quote(BOOK, GPU, speed, shape, NOON)
    assert quote.expected_usd == pytest.approx(0.45)
    assert quote.cost_per_epoch_usd == pytest.approx(0.225)
    assert quote.p90_usd > quote.expected_usd
    assert quote.cheapest_start == datetime(2026, 11, 23, 22, 0, tzinfo=timezone.utc)
    assert quote.cheapest_usd == pytest.approx(0.225) and quote.saving_usd == pytest.approx(0.225)


def test_quote_inside_the_window_says_start_now():
    speed = from_calibration([3.6] * 5, batch_size=1, eval_seconds=0.0, fixed_overhead_seconds=0.0)
    shape = RunShape(total_steps=1000, steps_per_epoch=1000, batch_size=1)
    night = datetime(2026, 11, 23, 23, 0, tzinfo=timezone.utc)
    quote = make_quote(BOOK, GPU, speed, shape, night)
    assert quote.cheapest_start == night and quote.saving_usd == 0.0


def test_spot_quote_includes_expected_lost_work():
    speed = from_calibration([3.6] * 5, batch_size=1, eval_seconds=0.0, fixed_overhead_seconds=60.0)
    shape = RunShape(total_steps=10_000, steps_per_epoch=1000, batch_size=1)  # 10 h
    quote = make_quote(BOOK, GPU, speed, shape, NOON, spot=True, checkpoint_interval_s=600)
    # 0.05/h x 10 h = 0.5 reclaims, each losing 300 s + a 60 s restart
    assert quote.spot_interruption_overhead_seconds == pytest.approx(0.5 * (300 + 60), rel=0.01)
    on_demand = make_quote(BOOK, GPU, speed, shape, NOON)
    assert quote.expected_usd < 0.35 * on_demand.expected_usd


# --- forecast math and the stop rule -----------------------------------------------------

def test_remaining_seconds_counts_steps_and_unfinished_epoch_ends():
    left = remaining_seconds(steps_done=150, total_steps=400, steps_per_epoch=100, step_seconds=0.5,
                             epoch_overhead_seconds=4.0, epoch_ends_done=1)
    assert left == pytest.approx(250 * 0.5 + 3 * 4.0)


def test_stop_rule_refuses_work_that_would_end_above_the_cap():
    assert not would_cross_cap(0.90, 0.10, 1.00)  # ends exactly at the cap: allowed
    assert would_cross_cap(0.95, 0.06, 1.00)


def test_thresholds_fire_once_each():
    assert crossed_thresholds(0.4, 0.75, (0.5, 0.7, 0.9, 1.0)) == [0.5, 0.7]
    assert crossed_thresholds(0.75, 0.8, (0.5, 0.7, 0.9, 1.0)) == []


# --- the meter, driven like the loop drives it -------------------------------------------

def _info(total_steps: int, steps_per_epoch: int) -> RunInfo:
    return RunInfo("w", "cpu", total_steps, steps_per_epoch, total_steps // steps_per_epoch, 32, 0, {})


def _drive(meter: CostMeter, clock: FakeClock, total: int, per_epoch: int, step_s: float, overhead_s: float,
           stop_s: float = 0.0) -> int:
    """Run the callbacks as train() would (a stop writes a checkpoint for `stop_s`); returns the steps completed."""
    control = LoopControl()
    meter.on_train_start(_info(total, per_epoch), control)
    done = 0
    for step in range(1, total + 1):
        epoch, batch = (step - 1) // per_epoch + 1, (step - 1) % per_epoch + 1
        meter.on_step_begin(StepInfo(step, epoch, batch, per_epoch, total, 32), control)
        if control.should_stop:
            break
        clock.advance(step_s)
        meter.on_step_end(StepInfo(step, epoch, batch, per_epoch, total, 32, 1.0, step_s), control)
        done = step
        if batch == per_epoch:
            clock.advance(overhead_s)
            meter.on_epoch_end(EpochRecord(epoch=epoch, step=step, train_loss=1.0, metrics={}, epoch_seconds=1,
                                           samples_per_second=1), control)
    if control.should_stop:
        clock.advance(stop_s)
    meter.on_train_end(_result(done, total), control)
    return done


def _result(done: int, total: int) -> TrainResult:
    return TrainResult(workload="w", device="cpu", steps=done, total_steps=total, samples_seen=done, epochs_completed=0,
                       resumed_from_step=0, stopped_early=done < total, stop_reason=None, train_seconds=1,
                       samples_per_second=1, final_train_loss=1, history=[], val_metrics={}, checkpoint_path=None,
                       num_parameters=1)


def test_meter_charges_elapsed_time_and_forecasts_the_total_exactly_for_steady_steps():
    clock = FakeClock(NOON)
    meter = CostMeter(BOOK, GPU, clock=clock)
    _drive(meter, clock, total=300, per_epoch=100, step_s=6.0, overhead_s=60.0)
    hours = (300 * 6.0 + 3 * 60.0) / 3600
    assert meter.accrued_usd == pytest.approx(0.45 * hours)
    after_epoch_1 = next(p for p in meter.forecasts if p.basis == "epochs")
    assert after_epoch_1.forecast_usd == pytest.approx(meter.accrued_usd, rel=1e-6)
    during_epoch_1 = [p for p in meter.forecasts if p.basis == "steps"]
    assert len(during_epoch_1) >= 5  # forecasts from steps before the first epoch ends


def test_meter_gives_the_off_peak_discount_from_22_00():
    clock = FakeClock(datetime(2026, 11, 23, 21, 0, tzinfo=timezone.utc))
    meter = CostMeter(BOOK, GPU, clock=clock)
    _drive(meter, clock, total=2, per_epoch=2, step_s=3600.0, overhead_s=0.0)  # 21:00-23:00
    assert meter.accrued_usd == pytest.approx(0.45 + 0.225)
    assert meter.totals.off_peak_seconds == pytest.approx(3600)


def test_meter_stops_before_the_step_that_would_cross_the_cap_with_one_step_to_spare():
    clock = FakeClock(NOON)
    step_usd = 0.45 * 8.0 / 3600
    cap = 0.45 * (100 * 8.0) / 3600 * 0.5 + step_usd / 3  # mid-step: the hard case
    meter = CostMeter(BOOK, GPU, cap_usd=cap, clock=clock, expected_step_seconds=8.0)
    done = _drive(meter, clock, total=100, per_epoch=100, step_s=8.0, overhead_s=0.0)
    assert 0 < done < 100 and meter.stopped_for_cap
    # One step of margin: even a step twice as long as expected would have ended inside the cap.
    assert meter.accrued_usd + step_usd <= cap
    assert cap - meter.accrued_usd < 2 * step_usd  # and it did not stop more than a step early
    assert [e.payload["fraction"] for e in meter.events if e.name == "oppen.cost.threshold"] == [0.5, 0.7, 0.9]
    assert any(e.name == "oppen.budget.stopped" for e in meter.events)


def test_meter_keeps_the_epoch_end_and_the_tail_inside_the_cap():
    clock = FakeClock(NOON)
    cap = 0.45 * (10 * 6.0 + 30.0) / 3600  # exactly ten steps + one validation pass
    meter = CostMeter(BOOK, GPU, cap_usd=cap, clock=clock, expected_step_seconds=6.0,
                      expected_epoch_overhead_seconds=30.0, tail_reserve_seconds=12.0)
    done = _drive(meter, clock, total=40, per_epoch=10, step_s=6.0, overhead_s=30.0)
    # Step 9 (48 s spent + 6 + a 6 s margin + 12 s tail = 72 s of 90) fits; step 10 ends the epoch: its 30 s
    # validation pass would leave no room for the tail, so the meter stops before it.
    assert done == 9
    assert meter.accrued_usd + 0.45 * 12.0 / 3600 <= cap + 1e-12


def test_training_ends_where_the_limit_stops_it_and_the_checkpoint_after_is_tail():
    clock = FakeClock(NOON)
    cap = 0.45 * (10 * 6.0 + 30.0) / 3600
    meter = CostMeter(BOOK, GPU, cap_usd=cap, clock=clock, expected_step_seconds=6.0,
                      expected_epoch_overhead_seconds=30.0, tail_reserve_seconds=12.0)
    done = _drive(meter, clock, total=40, per_epoch=10, step_s=6.0, overhead_s=30.0, stop_s=4.0)
    assert done == 9
    # What the stop rule guarantees, at the point it applied it: what training spent plus the reserve fits.
    assert meter.training_usd_at_end == pytest.approx(0.45 * 9 * 6.0 / 3600)
    assert meter.training_usd_at_end + meter.tail_reserve_usd <= cap + 1e-12
    # The checkpoint the stop writes is billed, after training, out of the reserve.
    assert meter.accrued_usd == pytest.approx(0.45 * (9 * 6.0 + 4.0) / 3600)
    assert meter.seconds_at_train_end == pytest.approx(9 * 6.0)


def test_training_resumed_after_a_reclaim_ends_at_its_last_segment():
    clock = FakeClock(NOON)
    meter = CostMeter(BOOK, GPU, clock=clock)
    _drive(meter, clock, total=4, per_epoch=4, step_s=6.0, overhead_s=0.0)
    clock.advance(60.0)  # the reclaim and the restore, before training goes on
    _drive(meter, clock, total=4, per_epoch=4, step_s=6.0, overhead_s=0.0)
    assert meter.training_usd_at_start == 0.0
    assert meter.training_usd_at_end == pytest.approx(meter.accrued_usd)


def test_a_rescheduled_attempt_may_spend_only_what_the_cap_has_left():
    clock = FakeClock(NOON)
    step_usd = 0.45 * 8.0 / 3600
    cap = 100.5 * step_usd  # off a step boundary: float sums do not decide the outcome
    meter = CostMeter(BOOK, GPU, cap_usd=cap, prior_usd=60 * step_usd, clock=clock, expected_step_seconds=8.0)
    done = _drive(meter, clock, total=100, per_epoch=100, step_s=8.0, overhead_s=0.0)
    assert done == 39  # 40 steps are left under the cap, one is kept as margin
    assert meter.run_usd + step_usd <= cap + 1e-12
    assert "earlier attempts spent" in meter.stopped_for_cap


def test_the_hold_is_topped_up_when_the_run_needs_more_and_stops_where_no_more_is_granted():
    clock = FakeClock(NOON)
    step_usd = 0.45 * 8.0 / 3600
    granted = []

    def extend(wanted: float) -> tuple[float, str | None]:
        new = min(wanted, 30.5 * step_usd)  # the budget has room for 30.5 steps in all
        granted.append(new)
        return new, "team ml" if new < wanted else None

    meter = CostMeter(BOOK, GPU, hold_usd=10 * step_usd, extend=extend, clock=clock, expected_step_seconds=8.0)
    done = _drive(meter, clock, total=100, per_epoch=100, step_s=8.0, overhead_s=0.0)
    assert granted and granted[-1] == pytest.approx(30.5 * step_usd)
    assert done == 29 and meter.accrued_usd + step_usd <= 30.5 * step_usd
    assert "limited by team ml" in meter.stopped_for_cap


def test_threshold_events_cover_the_run_cap_and_every_budget_with_both_in_the_payload():
    from oppen.cost.meter import BudgetGauge

    clock = FakeClock(NOON)
    step_usd = 0.45 * 8.0 / 3600
    team = BudgetGauge("team ml", "monthly", amount_usd=20 * step_usd, used_usd=7.5 * step_usd)
    meter = CostMeter(BOOK, GPU, cap_usd=10.5 * step_usd, hold_usd=10.5 * step_usd, budgets=[team], clock=clock,
                      expected_step_seconds=8.0, safety_steps=0.0)
    _drive(meter, clock, total=100, per_epoch=100, step_s=8.0, overhead_s=0.0)
    crossed = [(e.payload["of"], e.payload["fraction"]) for e in meter.events if e.name == "oppen.cost.threshold"]
    # The team budget reaches 50% after 2.5 steps, the cap after 5.25; the run stops after 10 of its 10.5.
    assert crossed == [("team ml", 0.5), ("cap", 0.5), ("team ml", 0.7), ("cap", 0.7), ("cap", 0.9)]
    last = [e for e in meter.events if e.name == "oppen.cost.threshold"][-1].payload
    assert last["cap_fraction"] == pytest.approx(10 / 10.5) and last["budgets"][0]["fraction"] == pytest.approx(17.5 / 20)


def test_durations_come_from_the_monotonic_clock_and_the_wall_clock_only_prices_them():
    wall = FakeClock(NOON)
    mono = [0.0]
    meter = CostMeter(BOOK, GPU, clock=wall, monotonic=lambda: mono[0])
    mono[0] += 3600.0
    wall.advance(3600.0 + 7200.0)  # NTP stepped the wall clock two hours forward meanwhile
    meter.tick()
    assert meter.totals.seconds == pytest.approx(3600.0) and meter.accrued_usd == pytest.approx(0.45)


def test_each_month_gets_what_ran_in_it():
    clock = FakeClock(datetime(2026, 11, 30, 23, 30, tzinfo=timezone.utc))
    meter = CostMeter(BOOK, GPU, clock=clock)
    clock.advance(3600.0)  # 23:30 -> 00:30, off-peak throughout
    meter.tick()
    assert meter.totals.usd_by_month == pytest.approx({"2026-11": 0.1125, "2026-12": 0.1125})


def test_the_forecast_uses_the_expected_tail_and_the_stop_rule_the_padded_one():
    clock = FakeClock(NOON)
    meter = CostMeter(BOOK, GPU, clock=clock, tail_seconds=20.0, tail_reserve_seconds=31.0)
    _drive(meter, clock, total=300, per_epoch=100, step_s=6.0, overhead_s=60.0)
    after_epoch_1 = next(p for p in meter.forecasts if p.basis == "epochs")
    hours = (300 * 6.0 + 3 * 60.0 + 20.0) / 3600  # the run plus its expected tail
    assert after_epoch_1.forecast_usd == pytest.approx(0.45 * hours, rel=1e-6)


# --- spot draws ----------------------------------------------------------------------------

def test_interruption_draws_are_seeded_and_follow_the_rate():
    a = [InterruptionSchedule(60.0, seed=3).next_gap_seconds() for _ in range(1)]
    b = [InterruptionSchedule(60.0, seed=3).next_gap_seconds() for _ in range(1)]
    assert a == b
    schedule = InterruptionSchedule(36.0, seed=1)  # mean gap 100 s
    gaps = [schedule.next_gap_seconds() for _ in range(4000)]
    assert sum(gaps) / len(gaps) == pytest.approx(100, rel=0.06)
    assert InterruptionSchedule(0.0, seed=1).next_gap_seconds() == float("inf")


def test_spot_simulator_loses_the_work_since_the_last_checkpoint():
    clock = FakeClock(NOON)
    simulator = SpotSimulator(InterruptionSchedule(3600.0, seed=5), clock=clock)  # mean gap 1 s
    control = LoopControl()
    simulator.on_train_start(_info(1000, 1000), control)
    simulator.on_checkpoint("ckpt", 0, control)
    with pytest.raises(SimulatedInterruption):
        for step in range(1, 1000):
            simulator.on_step_begin(StepInfo(step, 1, step, 1000, 1000, 1), control)
            clock.advance(0.25)
    lost = simulator.interruptions[0]
    assert lost.resumed_from_step == 0 and lost.lost_seconds == pytest.approx((lost.step - 1) * 0.25)


# --- the request edge ----------------------------------------------------------------------

@pytest.mark.parametrize(
    "policy, message",
    [
        ({"max_cost_usd": -1}, "greater than 0"),
        ({"max_cost_usd": 1e12}, "less than or equal to 1000000"),
        ({"team": "Data Science"}, "should match pattern"),
        ({"resources": {"gpus": 64}}, "less than or equal to 16"),
        ({"resources": {"gpus": -1}}, "greater than or equal to 0"),
        ({"resources": {"gpu_type": "nvidia-a100"}}, "gpus is 0"),
        ({"spot_interruptions_per_hour": 1.0}, "spot is false"),
        ({"budget": 5}, "Extra inputs are not permitted"),
        ({"max_cost_usd": None}, "must be a finite number"),  # what JSON makes of 1e400
        ({"max_cost_usd": float("inf")}, "finite number"),
        ({"max_cost_usd": float("nan")}, "finite number"),
        ({"resources": {"cpu_cores": float("inf")}}, "finite number"),
        ({"spot": True, "spot_interruptions_per_hour": None}, "must be a finite number"),
    ],
)
def test_bad_cost_requests_are_rejected(policy, message):
    with pytest.raises(ValidationError, match=message):
        CostPolicy.model_validate(policy)
