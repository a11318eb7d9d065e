"""Bad requests through a real Prefect server and worker: each is refused before anything exists.

Either Prefect's server refuses to create the flow run (the deployment's parameter schema or the
pool's job-variable schema), or the flow ends `InvalidRequest` in one sentence. Either way there
is no MLflow run, no ledger row and no training step (no checkpoint) for the request.
"""

from __future__ import annotations

import gzip
import json
import shutil

import pytest
from mlflow import MlflowClient

from oppen.cost.ledger import Ledger
from tests.test_integration_local_pool import _deployment_run, _read_flow_run

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _nothing_exists(stack, flow_run_id: str | None, workload: str = "mnist") -> None:
    if flow_run_id is None:
        return  # the server refused to create the flow run: nothing can exist
    client = MlflowClient(tracking_uri=stack.tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert runs == [], "an MLflow run was opened for a bad request"
    ledger = Ledger(f"sqlite:///{stack.root / 'oppen' / 'ledger.db'}")
    try:
        assert [r for r in ledger.rows() if r["run_key"] == flow_run_id] == [], "the ledger recorded a bad request"
    finally:
        ledger.dispose()
    assert not (stack.root / "oppen" / "checkpoints" / workload / flow_run_id).exists(), "a training step ran"


@pytest.mark.parametrize(
    "params, needle",
    [
        # JSON has no infinity: 1e400 arrives as null, which the schema refuses (it once meant "no cap").
        (['cost={"max_cost_usd": 1e400}'], "max_cost_usd"),
        (['run={"learning_rate": NaN}'], "learning_rate"),
        (['run={"epochs": 1000000000}'], "epochs"),
        (['run={"max_steps": 1e400}'], "max_steps"),
        (['run={"checkpoint_dir": "/etc"}'], "checkpoint_dir"),
        (['run={"checkpoint_subdir": "../../etc"}'], "checkpoint_subdir"),
        (["model_name=team/cnn"], "model_name"),
        ([f"experiment={'x' * 300}"], "experiment"),
    ],
    ids=["infinite-cap", "nan", "absurd-epochs", "infinite-steps", "any-path", "escaping-subdir", "model-slash",
         "long-experiment"],
)
def test_a_malformed_request_is_refused_before_anything_exists(stack, params, needle):
    """Mostly by Prefect's server, from the parameter schema. A null (what JSON makes of 1e400 or NaN) passes the
    server's validator, which reads null as "not given"; the flow's own validation then refuses it, first thing."""
    result, flow_run_id = _deployment_run(stack, *params, check=False)
    if flow_run_id is None:
        assert result.returncode != 0 and needle in result.stdout + result.stderr, result.stdout[-2000:]
        return
    state = _read_flow_run(stack, flow_run_id).state
    assert state.is_failed() and needle in state.message and "Traceback" not in state.message, state.message
    _nothing_exists(stack, flow_run_id)


def test_a_bad_gpu_memory_quantity_is_refused_before_a_run_exists(stack):
    result = stack.prefect("deployment", "run", "train-mnist/gpu", "--job-variable", "memory_request=16GB",
                           check=False)
    assert result.returncode != 0 and "memory_request" in result.stdout + result.stderr


@pytest.fixture(scope="module")
def truncated_mnist(tmp_path_factory, mnist_dir):
    """A copy of MNIST whose training images stop halfway: the header is fine, the data is not."""
    copy = tmp_path_factory.mktemp("truncated-mnist")
    for source in mnist_dir.iterdir():
        shutil.copy(source, copy / source.name)
    images = copy / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(images.read_bytes())
    images.write_bytes(gzip.compress(raw[: len(raw) // 2])[:-100])
    return copy


@pytest.mark.parametrize(
    "case",
    ["batch-larger-than-split", "truncated-data", "unknown-team"],
)
def test_the_flow_refuses_a_request_it_cannot_train_in_one_sentence(stack, truncated_mnist, case):
    params, needle = {
        "batch-larger-than-split": (['run={"batch_size": 60000}'], "larger than the training split"),
        "truncated-data": ([f'config={{"data_dir": "{truncated_mnist}"}}'], "train-images-idx3-ubyte.gz"),
        "unknown-team": (['cost={"team": "nobody"}'], "unknown team 'nobody'"),
    }[case]
    result, flow_run_id = _deployment_run(stack, *params, check=False)
    state = _read_flow_run(stack, flow_run_id).state
    assert state.is_failed() and state.name == "InvalidRequest", f"{state.name}: {state.message}"
    assert needle in state.message and "Traceback" not in state.message and "\n" not in state.message
    _nothing_exists(stack, flow_run_id)


def test_an_lm_block_longer_than_its_eval_text_is_refused_naming_the_file(stack, tmp_path, wikitext_dir):
    small = tmp_path / "wikitext-small"
    small.mkdir()
    for name in ("wiki.valid.tokens", "wiki.test.tokens"):
        text = (wikitext_dir / name).read_text(encoding="utf-8")
        (small / name).write_text(text[:50_000] if name == "wiki.valid.tokens" else text[:100], encoding="utf-8")
    result = stack.prefect("deployment", "run", "train-lm/local", "--watch", "--watch-timeout", "240",
                           "--param", f'config={json.dumps({"data_dir": str(small), "block_size": 128})}', check=False)
    flow_run_id = result.stdout.split("UUID:")[1].split()[0].strip()
    state = _read_flow_run(stack, flow_run_id).state
    assert state.name == "InvalidRequest" and "wiki.test.tokens" in state.message, state.message
    _nothing_exists(stack, flow_run_id, workload="lm")
