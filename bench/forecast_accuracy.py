"""Forecast and quote accuracy where users are: through the real `train-mnist/local` and `train-lm/local`
deployments, each config twice in one fresh stack, cold (no history: the quote calibrates) then warm
(the quote comes from the first run's history).

    .venv/bin/python -m bench.forecast_accuracy [--only NAME]

For every run it reads from MLflow what the flow recorded: the quote made before training, the
meter's forecast of the final cost after epoch 1, and the settled cost. Target after epoch 1:
median |error| <= 5%, max <= 10%.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient

from bench.common import table
from tests.stack import PrefectStack

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets"
LM_CONFIG = {"data_dir": str(DATA / "wikitext-2"), "max_train_tokens": 120_000, "max_eval_tokens": 16_384}

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
    client = MlflowClient(tracking_uri=stack.tracking_uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()],
                               f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    return run.data.metrics


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", help="run only the configs whose name contains this")
    args = parser.parse_args()
    stack = PrefectStack(Path(tempfile.mkdtemp(prefix="oppen-forecast-")))
    stack.env |= {"OPPEN_MNIST_DIR": str(DATA / "mnist"), "OPPEN_WIKITEXT_DIR": str(DATA / "wikitext-2")}
    rows, forecast_errors, quote_errors = [], [], []
    try:
        stack.start_server()
        stack.run(sys.executable, "-m", "work_pools.apply")
        stack.prefect("--no-prompt", "deploy", "--all")
        stack.start_worker()
        for name, deployment, params in CONFIGS:
            if args.only and args.only not in name:
                continue
            for phase in ("cold", "warm"):
                flow_run_id, seconds = run_deployment(stack, deployment, params)
                metrics = figures(stack, flow_run_id)
                forecast, quote = metrics.get("cost_forecast_error"), metrics.get("cost_quote_error")
                forecast_errors.append(abs(forecast))
                quote_errors.append(abs(quote))
                rows.append([name, phase, f"{seconds:.1f}", f"${metrics['cost_usd']:.6f}",
                             f"${metrics['cost_quote_expected_usd']:.6f}", f"{quote:+.1%}",
                             f"${metrics['cost_forecast_epoch1_usd']:.6f}", f"{forecast:+.1%}"])
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
