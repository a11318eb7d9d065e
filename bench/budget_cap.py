"""Budget cap: caps at 30% and 60% of a run's expected cost; how far past the cap did it go?

The expected cost is measured by an uncapped run of the same config in the same process (so
the comparison sees the same machine state). Overshoot is reported in dollars and in steps
(of the most expensive step the run took). Target: <= 1 step.

    .venv/bin/python -m bench.budget_cap
"""

from __future__ import annotations

from bench.common import table
from bench.cost_common import metered_run, mnist
from training.config import RunConfig

RUN = RunConfig(epochs=2, batch_size=256, learning_rate=8e-3)


def main() -> None:
    workload = mnist()
    full = metered_run(workload, RUN)
    expected = full.meter.training_usd_at_end
    step_s = full.trained.result.train_seconds / max(1, full.trained.result.steps)
    overhead = full.meter.epoch_overhead_estimate()
    rows = [["uncapped", "-", f"${expected:.7f}", f"{full.trained.result.steps}/{full.trained.result.total_steps}",
             "-", "-"]]
    for fraction in (0.3, 0.6):
        cap = fraction * expected
        capped = metered_run(workload, RUN, cap_usd=cap, expected_step_seconds=step_s,
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
