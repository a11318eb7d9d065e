"""Savings: one MNIST job priced at peak, off-peak and spot (with interruptions and checkpoint resume).

All three are real training runs in one process; the meter's clock is set to noon (peak) or
23:00 (off-peak). The spot run uses simulated reclaims with checkpoints every 50 steps. At the
book's 5%/h a 25-second job would never be reclaimed, so the spot run is also repeated with the
rate scaled so the job sees the interruptions a 10-hour job would (0.5 expected), and the
expected loss for a 10-hour job at 5%/h is computed from the measured step times.
Targets: off-peak >= 45% saved, spot >= 60% net.

    .venv/bin/python -m bench.savings [--max-steps N]     (or: .venv/bin/python bench/savings.py)

Reads MNIST from $OPPEN_MNIST_DIR, else ../shared/datasets/mnist. Six runs of 2 epochs (about 75 s of training
on an idle 2-core machine); `--max-steps 30` is a smoke run (six short runs); its figures say nothing about savings.
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as a file (python bench/x.py): the repository root in bench/'s place, see bench/__init__.py
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse  # noqa: E402

from bench.common import positive_int, table  # noqa: E402
from bench.cost_common import metered_run, mnist  # noqa: E402
from oppen.cost.price_book import load_price_book  # noqa: E402
from oppen.cost.spot import InterruptionSchedule, SpotSimulator  # noqa: E402
from training.config import RunConfig  # noqa: E402

RUN = RunConfig(epochs=2, batch_size=256, learning_rate=8e-3, checkpoint_every_steps=50)
EQUIVALENT_JOB_HOURS = 10.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=positive_int, default=None,
                        help="stop each run here (default: 2 full epochs)")
    args = parser.parse_args()
    run = RUN.model_copy(update={"max_steps": args.max_steps})
    book = load_price_book()
    workload = mnist()
    peak = metered_run(workload, run, hour=12.0)
    base = peak.meter.accrued_usd
    rows = [["peak (12:00)", f"{peak.seconds:.1f}", f"${base:.7f}", "-", "-", "-"]]

    def add(label: str, metered) -> None:
        cost = metered.meter.accrued_usd
        spot = metered.spot
        rows.append([label, f"{metered.seconds:.1f}", f"${cost:.7f}", f"{1 - cost / base:.1%}",
                     str(len(spot.interruptions)) if spot else "-", f"{spot.lost_seconds:.1f}" if spot else "-"])
        print(f"{label}: saved {1 - cost / base:.1%}", flush=True)

    add("off-peak (23:00)", metered_run(workload, run, hour=23.0))
    rate = book.spot.interruptions_per_hour
    add(f"spot, {rate:g}/h", metered_run(workload, run, hour=12.0, spot=SpotSimulator(InterruptionSchedule(rate, 1))))
    job_hours = peak.seconds / 3600
    scaled = rate * EQUIVALENT_JOB_HOURS / job_hours  # the reclaims per job of a 10 h run
    for seed in (1, 2, 3):
        add(f"spot, {EQUIVALENT_JOB_HOURS:g}h-job rate, seed {seed}",
            metered_run(workload, run, hour=12.0, spot=SpotSimulator(InterruptionSchedule(scaled, seed))))
    print()
    print(table(["run", "seconds", "cost", "saved vs peak", "reclaims", "lost s"], rows))
    step_s = peak.trained.result.train_seconds / peak.trained.result.steps
    interval = run.checkpoint_every_steps * step_s
    lost_fraction = rate * (interval / 2 + 30.0) / 3600  # per hour of work: half an interval + a 30 s restart
    net = 1 - (1 - book.spot.discount) * (1 + lost_fraction)
    print(f"\nexpected for a {EQUIVALENT_JOB_HOURS:g} h job at {rate:g}/h, checkpoint every {interval:.1f} s, 30 s restarts: "
          f"net spot saving {net:.1%} (target >= 60%)")


if __name__ == "__main__":
    main()
