"""What the flow, cost engine included, costs on top of the bare training loop, side by side in one run.

    .venv/bin/python -m bench.overhead [--repeats 3] [--max-steps N]     (or: .venv/bin/python bench/overhead.py)

Both paths run the same MNIST training config (the flow's defaults) and the same test
evaluation. The flow path is the full train-mnist flow against a real `prefect server start`
(SQLite), MLflow on SQLite and the SQLite ledger: the request's checks, the budget precheck and
quote from the speed history, the reservation, the MLflow run and its params, per-step metering
and metrics, the progress artifact, model logging, registration, settlement, the cost and
summary artifacts. One warm-up of each path first, so one-time costs (imports, database
migrations, first connections) are reported separately, and so the measured flow runs are
quoted from history (no calibration), as every run after a request's first is.

Outside the training loop: (wall - training) of the flow minus the same for the bare loop.
Inside it: what the loop's callbacks took (the loop times them), and the difference in training
seconds, which also catches indirect effects (background threads) but is noisy on this machine.

MNIST comes from $OPPEN_MNIST_DIR, else ../shared/datasets/mnist. `--repeats 1 --max-steps 20` is a smoke
run (a few minutes at most: the server's start and the warm-up dominate); its figures mean nothing.
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as a file (python bench/x.py): the repository root in bench/'s place, see bench/__init__.py
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from bench.common import mnist_dir, positive_int, table  # noqa: E402
from oppen.local_stack import free_port, lower_priority, prefect_server_argv, wait_prefect_healthy  # noqa: E402


def bare(run) -> tuple[float, float, float]:
    import torch

    from training.loop import train
    from training.mnist.workload import MnistConfig, MnistWorkload

    started = time.perf_counter()
    workload = MnistWorkload.load(MnistConfig(), run.seed)
    trained = train(workload, run)
    workload.test(trained.model, torch.device(trained.result.device))
    return time.perf_counter() - started, trained.result.train_seconds, trained.result.callback_seconds


TEARDOWN: list[float] = []  # Prefect's own end of a flow run: from the pipeline's last line to the call's return


def through_flow(run) -> tuple[float, float, float]:
    import flows.pipeline
    from flows.train_mnist import train_mnist

    final_state, marks = flows.pipeline._final_state, []

    def marked(*args):  # instrumentation only: notes when the pipeline hands its final state to Prefect
        marks.append(time.perf_counter())
        return final_state(*args)

    flows.pipeline._final_state = marked
    try:
        started = time.perf_counter()
        summary = train_mnist(run=run, experiment="overhead-bench", model_name="overhead-bench")
        ended = time.perf_counter()
    finally:
        flows.pipeline._final_state = final_state
    TEARDOWN.append(ended - marks[-1])
    print("callbacks:", {name: round(s, 4) for name, s in summary.train.callback_seconds_by.items()}, flush=True)
    return ended - started, summary.train.train_seconds, summary.train.callback_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive_int, default=3, help="measured runs of each path")
    parser.add_argument("--max-steps", type=positive_int, default=None,
                        help="stop each measured run here (default: the flow's full run)")
    args = parser.parse_args()
    if data := mnist_dir():  # the flow reads it through the same variable, in this process
        os.environ["OPPEN_MNIST_DIR"] = str(data)
    root = Path(tempfile.mkdtemp(prefix="oppen-overhead-"))
    port = free_port()
    env = os.environ | {"PREFECT_HOME": str(root / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = subprocess.Popen(prefect_server_argv(port), env=env, stdout=open(root / "server.log", "wb"),
                              stderr=subprocess.STDOUT, start_new_session=True,
                              preexec_fn=lower_priority)  # as the embedded stack starts it
    try:
        wait_prefect_healthy(port, server, root / "server.log")
        os.environ.update(PREFECT_API_URL=f"http://127.0.0.1:{port}/api", OPPEN_HOME=str(root / "oppen"),
                          OPPEN_MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}")
        from flows.train_mnist import MNIST_RUN

        measured = MNIST_RUN.model_copy(update={"max_steps": args.max_steps}) if args.max_steps else MNIST_RUN
        warm = MNIST_RUN.model_copy(update={"max_steps": 5})
        cold_bare, cold_flow = bare(warm), through_flow(warm)
        bare_times, flow_times = [], []
        TEARDOWN.clear()
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits both paths alike
            bare_times.append(bare(measured))
            flow_times.append(through_flow(measured))
    finally:
        os.killpg(server.pid, 15)
    b, f = (statistics.median(t for t, _, _ in times) for times in (bare_times, flow_times))
    bt, ft = (statistics.median(t for _, t, _ in times) for times in (bare_times, flow_times))
    bc, fc = (statistics.median(c for _, _, c in times) for times in (bare_times, flow_times))
    # Per run, then the median: wall and training seconds of one run move together with machine noise.
    bo, fo = (statistics.median(w - t for w, t, _ in times) for times in (bare_times, flow_times))
    runs = lambda times: ", ".join(f"{t:.1f}" for t, _, _ in times)  # noqa: E731
    print(table(
        ["path", "runs", "median wall s", "median training s", "in callbacks s", "median outside training s",
         "all runs s"],
        [["bare loop", len(bare_times), b, bt, f"{bc:.3f}", f"{bo:.2f}", runs(bare_times)],
         ["train-mnist flow", len(flow_times), f, ft, f"{fc:.3f}", f"{fo:.2f}", runs(flow_times)]],
    ))
    print(f"\nflow overhead: {f - b:+.2f} s ({100 * (f - b) / b:+.1f}%), ratio {f / b:.3f}")
    teardown = statistics.median(TEARDOWN)
    print(f"  outside the training loop: {fo - bo:+.2f} s; per run: "
          + ", ".join(f"{(w - t):.2f}" for w, t, _ in flow_times) + " s vs "
          + ", ".join(f"{(w - t):.2f}" for w, t, _ in bare_times) + " s bare")
    print(f"    of which Prefect's flow teardown (its heartbeat thread sleeps in whole seconds): {teardown:.2f} s "
          f"(runs: {', '.join(f'{t:.2f}' for t in TEARDOWN)}); the rest, ours: {fo - bo - teardown:+.2f} s "
          f"(target <= 1.0 s)")
    print(f"  inside it: callbacks {fc - bc:.3f} s = {100 * (fc - bc) / ft:.2f}% of training (target <= 1%); "
          f"training seconds differ by {ft - bt:+.2f} s ({100 * (ft - bt) / bt:+.1f}%, noise included)")
    print(f"warm-up (5 steps, one-time costs included): bare {cold_bare[0]:.1f} s, flow {cold_flow[0]:.1f} s")


if __name__ == "__main__":
    main()
