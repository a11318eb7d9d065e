"""Checkpoints load with the safe unpickler: a crafted file is refused and never runs; real ones round-trip."""

import os
import pickle
import random
from dataclasses import fields

import numpy as np
import pytest
import torch

from training.callbacks import Callback
from training.config import RunConfig
from training.lm.data import LmTexts
from training.lm.workload import LmConfig, LmWorkload
from training.loop import train
from training.mnist.data import MnistSplits
from training.mnist.workload import MnistConfig, MnistWorkload
from training.runtime import capture_rng_state, restore_rng_state
from training.state import _FIELD_TYPES, CheckpointError, TrainingState, checkpoint_path


class _Exploit:
    """Unpickling this runs a shell command: what a hostile `last.pt` would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_begin(self, step, control):
        if step.step == self.step:
            control.request_stop("test stop")


def _mnist(model: str) -> MnistWorkload:
    # Random images: checkpoint mechanics do not depend on what the pixels show, and this stays fast.
    generator = torch.Generator().manual_seed(0)
    images = lambda n: torch.randn(n, 1, 28, 28, generator=generator)  # noqa: E731
    labels = lambda n: torch.randint(0, 10, (n,), generator=generator)  # noqa: E731
    splits = MnistSplits(images(96), labels(96), images(32), labels(32), images(32), labels(32), "synthetic")
    return MnistWorkload(MnistConfig(model=model, val_size=32), splits)


@pytest.fixture(scope="module")
def tiny_lm(wikitext_dir):
    text = (wikitext_dir / "wiki.valid.tokens").read_text(encoding="utf-8")
    texts = LmTexts(text[:20_000], text[20_000:26_000], "valid", "test", str(wikitext_dir))
    # dropout > 0 so that exact resume also depends on torch's RNG state coming back.
    config = LmConfig(block_size=16, vocab_size=300, n_layer=1, n_head=2, n_embd=16, dropout=0.1, max_eval_tokens=256)
    return LmWorkload(config, texts)


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# -- a hostile or broken file is refused ---------------------------------------------------------


def _real_checkpoint(tmp_path) -> dict:
    train(_mnist("default"), RunConfig(epochs=1, batch_size=32, max_steps=2), checkpoint_dir=tmp_path)
    return torch.load(checkpoint_path(tmp_path), weights_only=True)


def test_a_crafted_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    state = _real_checkpoint(tmp_path) | {"reason": _Exploit(marker)}
    torch.save(state, checkpoint_path(tmp_path))
    with pytest.raises(CheckpointError, match=r"refused by the safe loader.*system"):
        TrainingState.load(tmp_path)
    with pytest.raises(CheckpointError, match=str(checkpoint_path(tmp_path))):
        train(_mnist("default"), RunConfig(epochs=1, batch_size=32, max_steps=2), checkpoint_dir=tmp_path)
    assert not marker.exists()
    # The file really is hostile: the unsafe loader the trainer used to call runs it.
    torch.load(checkpoint_path(tmp_path), weights_only=False)
    assert marker.exists()


def test_a_plain_pickle_is_refused_too(tmp_path):
    marker = tmp_path / "pwned"
    checkpoint_path(tmp_path).write_bytes(pickle.dumps(_Exploit(marker), protocol=2))
    with pytest.raises(CheckpointError, match="refused by the safe loader"):
        TrainingState.load(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: [1, 2, 3], "holds a list, not a dict"),
        (lambda s: {k: v for k, v in s.items() if k not in ("model", "rng")}, "lacks model, rng"),
        (lambda s: s | {"step": "5"}, "step is str, not int"),
        (lambda s: s | {"step": True}, "step is bool, not int"),
        (lambda s: s | {"optimizer": [1]}, "optimizer is list, not dict"),
        (lambda s: s | {"format": 99}, "format 99"),
        (lambda s: s | {"history": [{"epoch": "first"}]}, "history is malformed"),
    ],
)
def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path, change, message):
    torch.save(change(_real_checkpoint(tmp_path)), checkpoint_path(tmp_path))
    with pytest.raises(CheckpointError, match=message) as refused:
        TrainingState.load(tmp_path)
    assert str(checkpoint_path(tmp_path)) in str(refused.value)


@pytest.mark.parametrize("cut", [0, 7, 300])
def test_a_truncated_file_is_refused(tmp_path, cut):
    _real_checkpoint(tmp_path)
    path = checkpoint_path(tmp_path)
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(CheckpointError, match=str(path)):
        TrainingState.load(tmp_path)


def test_no_checkpoint_yet_is_none(tmp_path):
    assert TrainingState.load(tmp_path) is None


def test_field_types_cover_every_field():
    assert set(_FIELD_TYPES) == {f.name for f in fields(TrainingState)}


# -- real checkpoints round-trip through the safe loader --------------------------------------------


def test_rng_state_survives_the_safe_loader(tmp_path):
    torch.save(capture_rng_state(), tmp_path / "rng.pt")
    draws = lambda: (random.random(), np.random.rand(), torch.rand(1).item())  # noqa: E731
    expected = draws()
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws() == expected


@pytest.mark.parametrize("model", ["default", "reference"])  # AdamW + OneCycleLR, Adam + LambdaLR
def test_mnist_state_round_trips(tmp_path, model):
    workload = _mnist(model)
    trained = train(workload, RunConfig(epochs=1, batch_size=32, max_steps=2), checkpoint_dir=tmp_path)
    state = TrainingState.load(tmp_path)
    assert (state.step, state.reason, state.workload) == (2, "epoch", "mnist")
    _assert_same_tensors(state.model, trained.model.state_dict())
    optimizer = workload.make_optimizer(trained.model, RunConfig())
    optimizer.load_state_dict(state.optimizer)
    workload.make_scheduler(optimizer, RunConfig(), 3).load_state_dict(state.scheduler)


@pytest.mark.parametrize("model", ["default", "reference"])
def test_mnist_resume_is_exact(tmp_path, model):
    run = RunConfig(epochs=2, batch_size=16, seed=5)  # 2 x 6 steps; the reference model's dropout uses the RNG
    whole = train(_mnist(model), run, checkpoint_dir=tmp_path / "whole").model
    assert train(_mnist(model), run, [_StopAt(8)], checkpoint_dir=tmp_path / "parts").result.steps == 7
    resumed = train(_mnist(model), run, checkpoint_dir=tmp_path / "parts")
    assert resumed.result.resumed_from_step == 7
    _assert_same_tensors(whole.state_dict(), resumed.model.state_dict())


def test_lm_state_round_trips_and_resumes_exactly(tmp_path, tiny_lm):
    run = RunConfig(epochs=1, batch_size=8, max_steps=6, seed=1)
    whole = train(tiny_lm, run, checkpoint_dir=tmp_path / "whole").model
    train(tiny_lm, run, [_StopAt(4)], checkpoint_dir=tmp_path / "parts")
    state = TrainingState.load(tmp_path / "parts")
    assert (state.step, state.reason) == (3, "stopped: test stop")
    resumed = train(tiny_lm, run, checkpoint_dir=tmp_path / "parts")
    assert resumed.result.resumed_from_step == 3
    _assert_same_tensors(whole.state_dict(), resumed.model.state_dict())
