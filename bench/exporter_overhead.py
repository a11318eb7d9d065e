"""What the run exporter costs a training run, side by side with the same run without it, in one process.

    .venv/bin/python bench/exporter_overhead.py [--repeats 5] [--max-steps 200] [--scrape-every 1]

Both arms train the train-mnist flow's default run (fast CNN, batch 256, AdamW one-cycle) on the real
MNIST data, with the cost meter attached as in the flow. The exporter arm adds everything the run
exporter does in production: its HTTP server, the resource sampler thread (every 5 s), the training
callback, and the cost read from the meter; a scraper thread asks for /metrics every `--scrape-every`
seconds (Prometheus' usual 15-30 s makes the real load lighter than this). The arms alternate, after
one warm-up of each, so drift in the machine's load hits both alike.

Reported: the callback's own seconds inside the training loop (the loop times each callback), as a
share of training (target <= 1%); the CPU seconds the exporter's work beside the loop took (resource
samples, and each scrape's collection and formatting, timed on their own threads with thread_time), as a
share of the CPU training used; and the difference of the arms' median training seconds, which catches
anything else but carries this machine's noise (on a shared 2-core machine, seconds).
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/exporter_overhead.py` puts bench/ first on sys.path, where bench/queue.py would stand in for
# the standard library's `queue` (imported by concurrent.futures, logging, asyncio...): the repository root instead.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
import uuid  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from bench.common import table  # noqa: E402


@dataclass(frozen=True)
class Timing:
    train_seconds: float
    train_cpu_seconds: float  # the whole process while training (torch's threads), less the scraper's
    exporter_callback_seconds: float
    beside_cpu_seconds: float  # the exporter's own threads: samples and scrapes
    steps: int
    scrapes: int = 0


class CpuTally:
    """CPU seconds of the calls it wraps, on whichever thread makes them (instrumentation for this bench only)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:
            self.seconds += seconds

    def call(self, function):
        def timed(*args, **kwargs):
            started = time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                self.add(time.thread_time() - started)
        return timed

    def generator(self, function):
        def timed(*args, **kwargs):  # a scrape formats between the collector's yields, on the same thread
            started = time.thread_time()
            try:
                yield from function(*args, **kwargs)
            finally:
                self.add(time.thread_time() - started)
        return timed


class Scraper:
    """Asks the exporter for /metrics every `every` seconds on its own thread, as Prometheus would."""

    def __init__(self, address: str, every: float) -> None:
        self.url, self.every = f"http://{address}/metrics", every
        self.scrapes = 0
        self.cpu_seconds = 0.0  # the scraper stands in for Prometheus, another process: not the run's cost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            started = time.thread_time()
            with urllib.request.urlopen(self.url, timeout=10) as response:
                response.read()
            self.cpu_seconds += time.thread_time() - started
            self.scrapes += 1


def train_once(workload, run, with_exporter: bool, scrape_every: float, targets: Path) -> Timing:
    from oppen.cost.meter import CostMeter
    from oppen.cost.price_book import Resources, load_price_book
    from oppen.metrics.run_cost import meter_reading
    from oppen.metrics.run_exporter import RunExporter, RunIdentity
    from training.loop import train

    resources = Resources(cpu_cores=2)
    meter = CostMeter(load_price_book(), resources)
    if not with_exporter:
        cpu = time.process_time()
        result = train(workload, run, [meter]).result
        return Timing(result.train_seconds, time.process_time() - cpu, 0.0, 0.0, result.steps)
    identity = RunIdentity(flow_run_id=str(uuid.uuid4()), workload="mnist", experiment="bench", team="default")
    beside = CpuTally()
    exporter = RunExporter(identity, resources, targets_dir=targets, cost=lambda: meter_reading(meter))
    exporter.sampler.sample = beside.call(exporter.sampler.sample)
    exporter.registry.collect = beside.generator(exporter.registry.collect)
    with exporter, Scraper(exporter.address, scrape_every) as scraper:
        cpu = time.process_time()
        result = train(workload, run, [meter, *exporter.callbacks(expected_epoch_seconds=None)]).result
        cpu = time.process_time() - cpu - scraper.cpu_seconds
    return Timing(result.train_seconds, cpu, result.callback_seconds_by["TrainingMetrics"], beside.seconds,
                  result.steps, scraper.scrapes)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-steps", type=int, default=200, help="steps per run (an epoch is 215 steps)")
    parser.add_argument("--scrape-every", type=float, default=1.0, help="seconds between scrapes")
    args = parser.parse_args()
    data = os.environ.get("OPPEN_MNIST_DIR") or str(ROOT.parent / "shared" / "datasets" / "mnist")

    from training.config import RunConfig
    from training.mnist.workload import MnistConfig, MnistWorkload

    workload = MnistWorkload.load(MnistConfig(data_dir=Path(data)), seed=0)
    # The flow's default run (flows/train_mnist.py MNIST_RUN), cut to --max-steps.
    run = RunConfig(epochs=2, batch_size=256, learning_rate=8e-3, max_steps=args.max_steps)
    targets = Path(tempfile.mkdtemp(prefix="oppen-exporter-bench-"))
    warm = run.model_copy(update={"max_steps": 10})
    train_once(workload, warm, False, args.scrape_every, targets)
    train_once(workload, warm, True, args.scrape_every, targets)
    bare, exported = [], []
    for _ in range(args.repeats):  # interleaved
        bare.append(train_once(workload, run, False, args.scrape_every, targets))
        exported.append(train_once(workload, run, True, args.scrape_every, targets))

    def row(name: str, timings: list[Timing]) -> list[object]:
        train_s = statistics.median(t.train_seconds for t in timings)
        callback = statistics.median(t.exporter_callback_seconds for t in timings)
        share = statistics.median(100 * t.exporter_callback_seconds / t.train_seconds for t in timings)
        beside = statistics.median(100 * t.beside_cpu_seconds / t.train_cpu_seconds for t in timings)
        cpu = statistics.median(t.train_cpu_seconds for t in timings)
        return [name, len(timings), timings[0].steps, f"{train_s:.2f}", f"{cpu:.2f}", f"{callback:.4f}",
                f"{share:.3f}%", f"{beside:.3f}%", sum(t.scrapes for t in timings),
                ", ".join(f"{t.train_seconds:.2f}" for t in timings)]

    print(table(["arm", "runs", "steps", "median training s", "median training CPU s", "exporter callback s",
                 "callback % of training", "exporter threads % of training CPU", "scrapes", "all runs s"],
                [row("meter only", bare), row("meter + run exporter", exported)]))
    share = statistics.median(100 * t.exporter_callback_seconds / t.train_seconds for t in exported)
    beside = statistics.median(100 * t.beside_cpu_seconds / t.train_cpu_seconds for t in exported)
    b, e = (statistics.median(t.train_seconds for t in timings) for timings in (bare, exported))
    print(f"\ninside the loop: the exporter's callback takes {share:.3f}% of training (target <= 1%)")
    print(f"beside the loop: the sampler and {args.scrape_every:g}-second scrapes take {beside:.3f}% of the CPU "
          "training used")
    print(f"training seconds, exporter arm minus bare arm (medians): {e - b:+.3f} s ({100 * (e - b) / b:+.2f}%, "
          "this machine's noise included)")
    leftover = sorted(path.name for path in targets.iterdir())
    print(f"targets left behind: {leftover or 'none'}")


if __name__ == "__main__":
    main()
