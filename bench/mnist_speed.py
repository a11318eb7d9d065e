"""The seed's reference MNIST setup against our default, side by side in one run.

    .venv/bin/python bench/mnist_speed.py [--data-dir DIR] [--skip-reference] [--max-steps N]
    .venv/bin/python -m bench.mnist_speed ...          (the same)

Reference: the seed's CNN, 2 epochs, batch 64, Adam 1e-3 (constant). Ours: the fast CNN,
2 epochs, batch 256, AdamW one-cycle to 8e-3. Wall time covers what a user waits for: reading
the data, training (with per-epoch validation) and the 10,000-image test evaluation.
MNIST comes from --data-dir, else $OPPEN_MNIST_DIR, else ../shared/datasets/mnist. About 3.5 minutes on a
2-core machine, most of it the reference; `--skip-reference --max-steps 20` is a smoke run (under a minute).
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as a file (python bench/x.py): the repository root in bench/'s place, see bench/__init__.py
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from bench.common import mnist_dir, positive_int, run_cost_usd, table  # noqa: E402
from flows.train_mnist import MNIST_RUN  # noqa: E402
from training.config import RunConfig  # noqa: E402
from training.loop import train  # noqa: E402
from training.mnist.workload import MnistConfig, MnistWorkload  # noqa: E402

SETUPS = {
    "reference (seed)": (MnistConfig(model="reference"), RunConfig(epochs=2, batch_size=64, learning_rate=1e-3)),
    "default (ours)": (MnistConfig(model="default"), MNIST_RUN),
}


def measure(config: MnistConfig, run: RunConfig, data_dir: Path | None) -> list[object]:
    started = time.perf_counter()
    workload = MnistWorkload.load(config.model_copy(update={"data_dir": data_dir}), run.seed)
    trained = train(workload, run)
    evaluation = workload.test(trained.model, torch.device(trained.result.device))
    wall = time.perf_counter() - started
    result = trained.result
    return [wall, evaluation.metrics["test_accuracy"], result.samples_per_second,
            run_cost_usd(wall, result.device), result.num_parameters]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=mnist_dir(),
                        help="MNIST's four .gz files (default: $OPPEN_MNIST_DIR, else ../shared/datasets/mnist)")
    parser.add_argument("--skip-reference", action="store_true", help="only our default setup")
    parser.add_argument("--max-steps", type=positive_int, default=None, help="stop each setup's training here")
    args = parser.parse_args()
    rows = []
    for name, (config, run) in SETUPS.items():
        if args.skip_reference and name.startswith("reference"):
            continue
        run = run.model_copy(update={"max_steps": args.max_steps}) if args.max_steps else run
        rows.append([name, *measure(config, run, args.data_dir)])
        print(f"{name}: {rows[-1][1]:.1f}s, test accuracy {rows[-1][2]:.4f}", flush=True)
    print()
    print(table(["setup", "wall s", "test accuracy", "samples/s", "cost USD", "parameters"], rows))
    if len(rows) == 2:
        print(f"\nspeed-up (wall): {rows[0][1] / rows[1][1]:.1f}x; cost ratio: {rows[0][4] / rows[1][4]:.1f}x")


if __name__ == "__main__":
    main()
