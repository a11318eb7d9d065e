"""Every benchmark starts the way its docstring says, from the repository root, with the project's Python.

`python bench/x.py` puts bench/ first on sys.path, so a file there named like a standard module stands in for
it (bench/queue.py made `import torch` fail), and `bench` itself is not importable unless the file fixes its
path (bench/__init__.py). These run each benchmark's `--help` as a subprocess, which imports all it imports
at the top, so either mistake fails here; and a smoke run of the quickest one.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def _benchmarks() -> list[str]:
    """Every bench/*.py that runs as a program (helpers such as common.py have no main)."""
    return sorted(path.stem for path in BENCH.glob("*.py") if 'if __name__ == "__main__":' in path.read_text())


BENCHMARKS = _benchmarks()


def _run(argv: list[str], timeout: float, unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    # As from a fresh shell: no PYTHONPATH, so only the benchmark's own guard can make `bench` importable.
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", *unset)}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _docstring(name: str) -> str:
    return ast.get_docstring(ast.parse((BENCH / f"{name}.py").read_text())) or ""


def test_the_benchmarks_are_found():
    # A glob that silently found nothing would make every test below pass vacuously.
    assert {"mnist_speed", "queue_priority", "tools", "ledger_stress"} <= set(BENCHMARKS)


def test_no_file_in_bench_shadows_a_standard_module():
    shadowing = sorted(path.name for path in BENCH.glob("*.py") if path.stem in sys.stdlib_module_names)
    assert shadowing == [], "Prefect loads bench/queue_probe.py by path, which puts bench/ on the worker's sys.path"


@pytest.mark.parametrize("name", BENCHMARKS)
def test_the_docstring_says_how_to_run_it_by_a_name_that_exists(name):
    # A renamed benchmark (bench/queue.py became bench/queue_priority.py) must not leave its old command behind.
    named = re.findall(r"python (?:-m bench\.(\w+)|bench/(\w+)\.py)", _docstring(name))
    assert named, f"bench/{name}.py's docstring shows no `.venv/bin/python -m bench.{name}` line"
    assert {module or file for module, file in named} <= set(BENCHMARKS)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_help_runs_as_a_file(name):
    done = _run([f"bench/{name}.py", "--help"], timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("usage:")


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHMARKS)
def test_help_runs_as_a_module(name):
    done = _run(["-m", f"bench.{name}", "--help"], timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("usage:")


def test_a_mistyped_setting_is_one_line_of_usage():
    done = _run(["bench/ledger_stress.py", "--runs", "0"], timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--runs: expected a whole number of at least 1, got '0'" in done.stderr


def test_ledger_stress_smoke_run_as_a_file():
    """The smallest stress run, SQLite only: the harness, its processes and its checks, end to end."""
    done = _run(["bench/ledger_stress.py", "--processes", "3", "--runs", "1"], timeout=300,
                unset=("OPPEN_TEST_POSTGRES_URL",))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]  # 1: overspend or a double count
    assert re.search(r"^\|\s+sqlite \|", done.stdout, re.MULTILINE), done.stdout
    assert "postgresql: skipped" in done.stdout


@pytest.mark.slow
def test_mnist_speed_smoke_run_as_a_file(mnist_dir):
    done = _run(["bench/mnist_speed.py", "--data-dir", str(mnist_dir), "--skip-reference", "--max-steps", "10"],
                timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "default (ours):" in done.stdout and "test accuracy" in done.stdout
