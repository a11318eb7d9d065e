"""Forecast accuracy: the meter's forecast of a run's cost after epoch 1, against what it finally cost.

Several MNIST configs (batch sizes, epochs) and a small LM run, each trained for real with the
meter attached. Target: median |error| <= 5%, max <= 10%.

    .venv/bin/python -m bench.forecast_accuracy
"""

from __future__ import annotations

import statistics

from bench.common import table
from bench.cost_common import WIKITEXT_DIR, metered_run, mnist
from training.config import RunConfig

CONFIGS = [
    ("mnist b128 x2", RunConfig(epochs=2, batch_size=128, learning_rate=4e-3)),
    ("mnist b256 x3", RunConfig(epochs=3, batch_size=256, learning_rate=8e-3)),
    ("mnist b512 x3", RunConfig(epochs=3, batch_size=512, learning_rate=1e-2)),
    ("mnist b1024 x4", RunConfig(epochs=4, batch_size=1024, learning_rate=1.5e-2)),
]


def lm_workload():
    from training.lm.workload import LmConfig, LmWorkload

    return LmWorkload.load(LmConfig(data_dir=WIKITEXT_DIR, max_train_tokens=120_000, max_eval_tokens=16_384))


def main() -> None:
    rows, errors = [], []
    workload = mnist()
    cases = [(name, workload, run) for name, run in CONFIGS]
    cases.append(("lm scratch x3", lm_workload(), RunConfig(epochs=3, batch_size=16, learning_rate=5e-4)))
    for name, work, run in cases:
        metered = metered_run(work, run)
        meter = metered.meter
        after_epoch_1 = next(point for point in meter.forecasts if point.basis == "epochs")
        actual = meter.training_usd_at_end
        error = (after_epoch_1.forecast_usd - actual) / actual
        errors.append(abs(error))
        rows.append([name, f"{metered.seconds:.1f}", f"${after_epoch_1.forecast_usd:.7f}", f"${actual:.7f}",
                     f"{error:+.2%}"])
        print(f"{name}: {error:+.2%}", flush=True)
    print()
    print(table(["run", "seconds", "forecast after epoch 1", "actual", "error"], rows))
    print(f"\nmedian |error| {statistics.median(errors):.2%} (target <= 5%), max {max(errors):.2%} (target <= 10%)")


if __name__ == "__main__":
    main()
