"""A request that cannot be trained as asked gets a typed error naming the file, before or after the load."""

import pytest
import torch

from training.calibrate import calibrate
from training.config import RunConfig
from training.errors import DataError, TrainingRequestError
from training.lm.data import ENV_VAR as WIKITEXT_ENV
from training.lm.data import LmTexts, TextDataError, read_local
from training.lm.workload import LmConfig, LmWorkload
from training.mnist.data import ENV_VAR as MNIST_ENV
from training.mnist.data import FILES, MnistDataError, MnistSplits, split
from training.mnist.workload import MnistConfig, MnistWorkload
from training.state import CheckpointError, CheckpointMismatchError


def test_error_hierarchy():
    assert issubclass(TrainingRequestError, ValueError) and issubclass(DataError, TrainingRequestError)
    assert issubclass(MnistDataError, DataError) and issubclass(TextDataError, DataError)
    assert issubclass(CheckpointError, TrainingRequestError)
    assert issubclass(CheckpointMismatchError, TrainingRequestError)


# -- MNIST -----------------------------------------------------------------------------------------


def test_check_run_refuses_a_batch_larger_than_the_loaded_split(mnist_arrays):
    workload = MnistWorkload(MnistConfig(), split(mnist_arrays, val_size=5000, seed=0))
    message = r"^batch_size 60000 is larger than the training split \(55000 samples\)$"
    with pytest.raises(TrainingRequestError, match=message):
        workload.check_run(RunConfig(batch_size=60_000))
    workload.check_run(RunConfig(batch_size=55_000))


def test_check_request_passes_a_request_the_files_can_serve(mnist_dir):
    assert MnistWorkload.check_request(MnistConfig(data_dir=mnist_dir), RunConfig(batch_size=55_000)) is None


def test_check_request_refuses_a_batch_larger_than_the_split_before_loading(mnist_dir):
    images = mnist_dir / FILES["train_images"]
    message = rf"batch_size 55001 is larger than the training split \(55000 samples: 60000 in {images} less val_size"
    with pytest.raises(TrainingRequestError, match=message):
        MnistWorkload.check_request(MnistConfig(data_dir=mnist_dir), RunConfig(batch_size=55_001))


def test_check_request_uses_the_argument_then_the_environment(monkeypatch, tmp_path, mnist_dir):
    monkeypatch.setenv(MNIST_ENV, str(tmp_path))  # empty: the check must read it
    with pytest.raises(MnistDataError, match=f"{tmp_path} lacks"):
        MnistWorkload.check_request(MnistConfig(), RunConfig())
    MnistWorkload.check_request(MnistConfig(), RunConfig(), data_dir=mnist_dir)
    monkeypatch.delenv(MNIST_ENV)
    MnistWorkload.check_request(MnistConfig(), RunConfig(batch_size=65_536))  # a download: nothing local to check


def test_check_request_refuses_a_damaged_copy(tmp_path, mnist_dir):
    for name in FILES.values():
        (tmp_path / name).write_bytes((mnist_dir / name).read_bytes())
    (tmp_path / FILES["train_labels"]).write_bytes(b"")
    with pytest.raises(MnistDataError, match=f"{tmp_path / FILES['train_labels']} is empty"):
        MnistWorkload.check_request(MnistConfig(data_dir=tmp_path), RunConfig())
    (tmp_path / FILES["train_labels"]).write_bytes(b"not gzip")
    with pytest.raises(MnistDataError, match=f"{tmp_path / FILES['train_labels']} is truncated or corrupt"):
        MnistWorkload.check_request(MnistConfig(data_dir=tmp_path), RunConfig())


def _small_mnist(samples: int) -> MnistWorkload:
    x, y = torch.zeros(samples, 1, 28, 28), torch.zeros(samples, dtype=torch.long)
    return MnistWorkload(MnistConfig(), MnistSplits(x, y, x[:8], y[:8], x[:8], y[:8], "synthetic"))


def test_calibration_refuses_a_batch_larger_than_the_split():
    with pytest.raises(TrainingRequestError, match=r"larger than the training split \(64 samples\)"):
        calibrate(_small_mnist(64), RunConfig(batch_size=128), steps=3)


def test_calibration_with_nothing_to_time_says_why():
    # 64 samples in batches of 16: 4 steps an epoch, all of them warm-up.
    with pytest.raises(TrainingRequestError, match="calibration timed no steps: an epoch of batch_size 16 has only 4"):
        calibrate(_small_mnist(64), RunConfig(batch_size=16), steps=3)


# -- WikiText and the language model ---------------------------------------------------------------


@pytest.fixture
def text_dir(tmp_path, wikitext_dir):
    """A local copy with real training text (valid) and an eval file (test) the test writes."""
    text = (wikitext_dir / "wiki.valid.tokens").read_text(encoding="utf-8")[:20_000]
    (tmp_path / "wiki.valid.tokens").write_text(text, encoding="utf-8")
    (tmp_path / "wiki.test.tokens").write_text(text[:4000], encoding="utf-8")
    return tmp_path


TINY = {"vocab_size": 300, "n_layer": 1, "n_head": 2, "n_embd": 16}


def test_an_empty_tokens_file_names_itself(text_dir):
    (text_dir / "wiki.test.tokens").write_text("")
    with pytest.raises(TextDataError, match=f"^{text_dir / 'wiki.test.tokens'} is empty$"):
        read_local(text_dir)
    with pytest.raises(TextDataError, match=f"{text_dir / 'wiki.test.tokens'} is empty"):
        LmWorkload.check_request(LmConfig(data_dir=text_dir), RunConfig())


def test_text_too_short_for_one_block_names_the_file_tokens_and_block_size(text_dir):
    (text_dir / "wiki.test.tokens").write_text(" = Valkyria = \n", encoding="utf-8")
    eval_file = text_dir / "wiki.test.tokens"
    with pytest.raises(TextDataError, match=rf"{eval_file} is too short: \d+ tokens, fewer than block_size 64"):
        LmWorkload.load(LmConfig(data_dir=text_dir, block_size=64, **TINY))


def test_block_size_longer_than_the_eval_text_is_refused_before_loading(text_dir):
    eval_file = text_dir / "wiki.test.tokens"
    eval_file.write_text("x" * 100)
    message = rf"{eval_file} is too short: 100 bytes cannot make one block of block_size 128"
    with pytest.raises(TextDataError, match=message):
        LmWorkload.check_request(LmConfig(data_dir=text_dir, block_size=128), RunConfig(batch_size=1))
    LmWorkload.check_request(LmConfig(data_dir=text_dir, block_size=100), RunConfig(batch_size=1))


def test_block_size_beyond_the_pretrained_positions_is_refused(text_dir, monkeypatch):
    config = LmConfig(model="distilgpt2", data_dir=text_dir, block_size=2048)
    message = "block_size 2048 is longer than distilgpt2's 1024 positions"
    with pytest.raises(TrainingRequestError, match=message):
        LmWorkload.check_request(config, RunConfig(batch_size=1))
    texts = LmTexts("text", "text", "valid", "test", str(text_dir))
    with pytest.raises(TrainingRequestError, match=message):  # refused before the tokenizer is fetched
        LmWorkload(config, texts)
    # Without a local copy the default model is the pretrained one; with one it is built to fit.
    monkeypatch.delenv(WIKITEXT_ENV, raising=False)
    with pytest.raises(TrainingRequestError, match=message):
        LmWorkload.check_request(LmConfig(block_size=2048), RunConfig(batch_size=1))
    (text_dir / "wiki.test.tokens").write_text("x" * 4096)
    LmWorkload.check_request(LmConfig(data_dir=text_dir, block_size=2048), RunConfig(batch_size=1))


def test_a_batch_no_local_text_can_fill_is_refused_before_loading(wikitext_dir):
    train_file = wikitext_dir / "wiki.valid.tokens"
    config = LmConfig(data_dir=wikitext_dir, block_size=128, max_train_tokens=40_000)
    message = (
        rf"batch_size 313 is larger than the training split can be: {train_file} "
        rf"\(\d+ bytes, capped at max_train_tokens 40000\) makes at most 312 blocks of block_size 128"
    )
    with pytest.raises(TrainingRequestError, match=message):
        LmWorkload.check_request(config, RunConfig(batch_size=313))
    LmWorkload.check_request(config, RunConfig(batch_size=312))


def test_a_batch_larger_than_the_loaded_lm_split_is_refused(text_dir):
    workload = LmWorkload.load(LmConfig(data_dir=text_dir, block_size=64, **TINY))
    too_many = workload.num_train_samples() + 1
    with pytest.raises(TrainingRequestError, match=f"batch_size {too_many} is larger than the training split"):
        workload.check_run(RunConfig(batch_size=too_many))
