"""Forecast and quote accuracy where users are: through the real `train-mnist/local` and `train-lm/local`
deployments, each config twice in one fresh stack, cold (no history: the quote calibrates) then warm
(the quote comes from the first run's history).

    .venv/bin/python -m bench.forecast_accuracy [--only NAME]     (or: .venv/bin/python bench/forecast_accuracy.py)

For every run it reads from MLflow what the flow recorded: the quote made before training, the
meter's forecast of the final cost after epoch 1, and the settled cost. Target after epoch 1:
median |error| <= 5%, max <= 10%.

Data: $OPPEN_MNIST_DIR and $OPPEN_WIKITEXT_DIR, else ../shared/datasets/mnist and wikitext-2. All twelve runs
take about 12 minutes on a 2-core machine; `--only "b256 x1"` is the shortest (two 1-epoch runs and the stack's
start: a few minutes).
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as a file (python bench/x.py): the repository root in bench/'s place, see bench/__init__.py
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from mlflow import MlflowClient  # noqa: E402

from bench.common import mnist_dir, table, wikitext_dir  # noqa: E402
from oppen import tracking_keys as keys  # noqa: E402
from tests.stack import PrefectStack  # noqa: E402

# The LM's text is cut so one run takes about a minute; its data_dir is left to $OPPEN_WIKITEXT_DIR (set in main).
LM_CONFIG = {"max_train_tokens": 120_000, "max_eval_tokens": 16_384}

# (name, deployment, parameters): MNIST at batch 64, 256 and 1024, the seed's reference model, 1 epoch and
# 3 epochs, and the language model.
CONFIGS = [
    ("mnist b64 x2", "train-mnist/local", {"run": {"epochs": 2, "batch_size": 64, "learning_rate": 3e-3}}),
    ("mnist b256 x1", "train-mnist/local", {"run": {"epochs": 1, "batch_size": 256, "learning_rate": 8e-3}}),
    ("mnist b256 x3", "train-mnist/local", {"run": {"epochs": 3, "batch_size": 256, "learning_rate": 8e-3}}),
    ("mnist b1024 x3", "train-mnist/local", {"run": {"epochs": 3, "batch_size": 1024, "learning_rate": 1.5e-2}}),
    ("mnist reference b64 x1", "train-mnist/local",
     {"config": {"model": "reference"}, "run": {"epochs": 1, "batch_size": 64, "learning_rate": 1e-3}}),
    ("lm scratch x3", "train-lm/local", {"config": LM_CONFIG, "run": {"epochs": 3, "batch_size": 16,
                                                                       "learning_rate": 5e-4}}),
]


def run_deployment(stack: PrefectStack, deployment: str, params: dict) -> tuple[str, float]:
    argv = ["deployment", "run", deployment, "--watch", "--watch-timeout", "1200"]
    for key, value in params.items():
        argv += ["--param", f"{key}={json.dumps(value)}"]
    argv += ["--param", "min_test_accuracy=0.0" if "mnist" in deployment else "max_perplexity=1e6"]
    started = time.perf_counter()
    result = stack.prefect(*argv, check=False, timeout=1500)
    seconds = time.perf_counter() - started
    if "Completed" not in result.stdout:
        sys.exit(f"{deployment} did not complete:\n{result.stdout[-3000:]}\n{stack.log('worker')}")
    return re.search(r"UUID:\s*([0-9a-f-]{36})", result.stdout).group(1), seconds


def figures(stack: PrefectStack, flow_run_id: str) -> dict[str, float]:
    """What the flow recorded in MLflow: the settled cost and both errors (metrics), the quote (a param)."""
    client = MlflowClient(tracking_uri=stack.tracking_uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()],
                               f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    metrics, params = run.data.metrics, run.data.params
    return {"cost": metrics[keys.COST_TOTAL], "quote": float(params[keys.QUOTE_EXPECTED_PARAM]),
            "quote_error": metrics[keys.COST_QUOTE_ERROR], "forecast": metrics[keys.COST_FORECAST_EPOCH1],
            "forecast_error": metrics[keys.COST_FORECAST_ERROR]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run only the configs whose name contains this: "
                        + ", ".join(repr(name) for name, _, _ in CONFIGS))
    args = parser.parse_args()
    chosen = [config for config in CONFIGS if not args.only or args.only in config[0]]
    if not chosen:
        parser.error(f"no config's name contains {args.only!r}")
    stack = PrefectStack(Path(tempfile.mkdtemp(prefix="oppen-forecast-")))
    data = {"OPPEN_MNIST_DIR": mnist_dir(), "OPPEN_WIKITEXT_DIR": wikitext_dir()}
    stack.env |= {variable: str(path) for variable, path in data.items() if path}  # none: the flows download
    rows, forecast_errors, quote_errors = [], [], []
    try:
        stack.start_server()
        stack.run(sys.executable, "-m", "work_pools.apply")
        stack.prefect("--no-prompt", "deploy", "--all")
        stack.start_worker()
        for name, deployment, params in chosen:
            for phase in ("cold", "warm"):
                flow_run_id, seconds = run_deployment(stack, deployment, params)
                found = figures(stack, flow_run_id)
                forecast, quote = found["forecast_error"], found["quote_error"]
                forecast_errors.append(abs(forecast))
                quote_errors.append(abs(quote))
                rows.append([name, phase, f"{seconds:.1f}", f"${found['cost']:.6f}", f"${found['quote']:.6f}",
                             f"{quote:+.1%}", f"${found['forecast']:.6f}", f"{forecast:+.1%}"])
                print(f"{name} ({phase}): quote {quote:+.1%}, forecast after epoch 1 {forecast:+.1%}", flush=True)
    finally:
        stack.stop()
    print()
    print(table(["run", "history", "wall s", "cost", "quote", "quote error", "forecast after epoch 1",
                 "forecast error"], rows))
    print(f"\nforecast after epoch 1: median |error| {statistics.median(forecast_errors):.1%} (target <= 5%), "
          f"max {max(forecast_errors):.1%} (target <= 10%)")
    print(f"quote before training: median |error| {statistics.median(quote_errors):.1%}, "
          f"max {max(quote_errors):.1%}")


if __name__ == "__main__":
    main()
