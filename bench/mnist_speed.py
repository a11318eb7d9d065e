"""The seed's reference MNIST setup against our default, side by side in one run.

    python bench/mnist_speed.py [--data-dir DIR] [--skip-reference]

Reference: the seed's CNN, 2 epochs, batch 64, Adam 1e-3 (constant). Ours: the fast CNN,
2 epochs, batch 256, AdamW one-cycle to 8e-3. Wall time covers what a user waits for: reading
the data, training (with per-epoch validation) and the 10,000-image test evaluation.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import run_cost_usd, table  # noqa: E402
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
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", type=Path, default=None, help="default: $OPPEN_MNIST_DIR")
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args()
    rows = []
    for name, (config, run) in SETUPS.items():
        if args.skip_reference and name.startswith("reference"):
            continue
        rows.append([name, *measure(config, run, args.data_dir)])
        print(f"{name}: {rows[-1][1]:.1f}s, test accuracy {rows[-1][2]:.4f}", flush=True)
    print()
    print(table(["setup", "wall s", "test accuracy", "samples/s", "cost USD", "parameters"], rows))
    if len(rows) == 2:
        print(f"\nspeed-up (wall): {rows[0][1] / rows[1][1]:.1f}x; cost ratio: {rows[0][4] / rows[1][4]:.1f}x")


if __name__ == "__main__":
    main()
