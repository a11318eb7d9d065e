"""Budget cap: caps at 30% and 60% of a run's expected cost; how far past the cap did it go?

The expected cost is measured by an uncapped run of the same config in the same process (so
the comparison sees the same machine state). Overshoot is reported in dollars and in steps
(of the most expensive step the run took). Target: <= 1 step.

    .venv/bin/python -m bench.budget_cap [--max-steps N]     (or: .venv/bin/python bench/budget_cap.py)

Reads MNIST from $OPPEN_MNIST_DIR, else ../shared/datasets/mnist. `--max-steps 30` is a smoke run (three
short runs instead of three 2-epoch ones); its figures say nothing about the cap.
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
from training.config import RunConfig  # noqa: E402

RUN = RunConfig(epochs=2, batch_size=256, learning_rate=8e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=positive_int, default=None,
                        help="stop each run here (default: 2 full epochs)")
    args = parser.parse_args()
    run = RUN.model_copy(update={"max_steps": args.max_steps})
    workload = mnist()
    full = metered_run(workload, run)
    expected = full.meter.training_usd_at_end
    step_s = full.trained.result.train_seconds / max(1, full.trained.result.steps)
    overhead = full.meter.epoch_overhead_estimate()
    rows = [["uncapped", "-", f"${expected:.7f}", f"{full.trained.result.steps}/{full.trained.result.total_steps}",
             "-", "-"]]
    for fraction in (0.3, 0.6):
        cap = fraction * expected
        capped = metered_run(workload, run, cap_usd=cap, expected_step_seconds=step_s,
                             expected_epoch_overhead_seconds=overhead)
        meter, result = capped.meter, capped.trained.result
        spent = meter.training_usd_at_end
        overshoot = spent - cap
        step_usd = max(meter.step_costs)
        rows.append([f"cap {fraction:.0%}", f"${cap:.7f}", f"${spent:.7f}", f"{result.steps}/{result.total_steps}",
                     f"${overshoot:+.8f}", f"{overshoot / step_usd:+.2f}"])
        print(f"cap {fraction:.0%}: overshoot {overshoot / step_usd:+.2f} steps", flush=True)
    print()
    print(table(["run", "cap", "spent", "steps", "overshoot $", "overshoot (steps)"], rows))
    print("\nnegative overshoot: stopped below the cap (it stops before the step that would cross it)")


if __name__ == "__main__":
    main()
