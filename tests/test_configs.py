"""Configs reject bad input with a clear message before anything runs."""

from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from training.config import RunConfig
from training.loop import config_fingerprint
from training.lm.workload import LmConfig
from training.mnist.workload import MnistConfig


def test_defaults_are_valid_and_frozen():
    run = RunConfig()
    with pytest.raises(ValidationError):
        run.epochs = 5  # frozen


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"epochs": 0}, "greater than 0"),
        ({"epochs": -1}, "greater than 0"),
        ({"learning_rate": 0.0}, "greater than 0"),
        ({"learning_rate": -1e-3}, "greater than 0"),
        ({"batch_size": 0}, "greater than 0"),
        ({"device": "tpu"}, "'auto', 'cpu' or 'cuda'"),
        ({"epochs": 1, "lr": 0.1}, "Extra inputs are not permitted"),
    ],
)
def test_run_config_rejects(fields, message):
    with pytest.raises(ValidationError, match=message):
        RunConfig(**fields)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"learning_rate": float("inf")}, "finite number"),
        ({"learning_rate": float("nan")}, "finite number"),
        ({"learning_rate": "inf"}, "finite number"),
        ({"learning_rate": 11.0}, "less than or equal to 10"),
        ({"epochs": 10**9}, "less than or equal to 1000"),
        ({"batch_size": 65_537}, "less than or equal to 65536"),
        ({"max_steps": 10_000_001}, "less than or equal to 10000000"),
        ({"log_every_steps": 1_000_001}, "less than or equal to 1000000"),
        ({"checkpoint_every_steps": 10_000_001}, "less than or equal to 10000000"),
        ({"num_threads": 513}, "less than or equal to 512"),
        ({"seed": 2**32}, "less than or equal to 4294967295"),
        ({"seed": -1}, "greater than or equal to 0"),
    ],
)
def test_run_config_numbers_are_finite_and_bounded(fields, message):
    with pytest.raises(ValidationError, match=message):
        RunConfig(**fields)


def test_run_config_bounds_are_inclusive():
    edges = {"epochs": 1000, "batch_size": 65_536, "learning_rate": 10, "max_steps": 10_000_000, "seed": 2**32 - 1}
    assert RunConfig(**edges, num_threads=512).model_dump(include=set(edges)) == edges


@pytest.mark.parametrize(
    "config, fields, message",
    [
        (MnistConfig, {"val_size": 60_000}, "less than or equal to 59999"),
        (LmConfig, {"dropout": float("nan")}, "finite number"),
        (LmConfig, {"block_size": 4097}, "less than or equal to 4096"),
        (LmConfig, {"vocab_size": 1_000_001}, "less than or equal to 1000000"),
        (LmConfig, {"n_layer": 49}, "less than or equal to 48"),
        (LmConfig, {"n_head": 65}, "less than or equal to 64"),
        (LmConfig, {"n_embd": 8193}, "less than or equal to 8192"),
        (LmConfig, {"max_train_tokens": 10**9 + 1}, "less than or equal to 1000000000"),
        (LmConfig, {"max_eval_tokens": 10**9 + 1}, "less than or equal to 1000000000"),
        (LmConfig, {"block_size": 128, "max_eval_tokens": 100}, r"max_eval_tokens \(100\) is smaller than block_size"),
        (LmConfig, {"block_size": 128, "max_train_tokens": 64}, r"max_train_tokens \(64\) is smaller than block_size"),
    ],
)
def test_workload_configs_are_bounded(config, fields, message):
    with pytest.raises(ValidationError, match=message):
        config(**fields)


@pytest.mark.parametrize("subdir", ["a", "team/exp-1", "a/b/c/d", "Run_2.v1", "x" * 64])
def test_checkpoint_subdir_accepts_relative_names(subdir):
    assert RunConfig(checkpoint_subdir=subdir).checkpoint_subdir == subdir


@pytest.mark.parametrize(
    "subdir, message",
    [
        ("../x", r"contains '\.\.'"),
        ("a/../../b", r"contains '\.\.'"),
        ("/etc", "is absolute"),
        ("a\\b", "backslash"),
        ("a/b/c/d/e", "has 5 folders; at most 4"),
        ("", "invalid folder name"),
        ("a//b", "invalid folder name"),
        ("a/", "invalid folder name"),
        ("./a", "invalid folder name"),
        (".hidden", "invalid folder name"),
        ("a b", "invalid folder name"),
        ("x" * 65, "invalid folder name"),
        ("C:", "invalid folder name"),
    ],
)
def test_checkpoint_subdir_refuses_anything_that_could_leave_the_root(subdir, message):
    with pytest.raises(ValidationError, match=message):
        RunConfig(checkpoint_subdir=subdir)


def test_checkpoint_dir_is_refused_with_one_sentence(tmp_path):
    with pytest.raises(ValidationError) as refused:
        RunConfig(checkpoint_dir=str(tmp_path))
    (error,) = refused.value.errors()
    assert error["msg"] == (
        "Value error, checkpoint_dir is not accepted: checkpoints always go under the platform's checkpoint root; "
        "use checkpoint_subdir to name a sub-folder"
    )


def test_checkpoint_subdir_is_not_part_of_the_fingerprint():
    workload = SimpleNamespace(name="w", config_dict=lambda: {})
    fingerprint = lambda **fields: config_fingerprint(workload, RunConfig(**fields))  # noqa: E731
    assert fingerprint(checkpoint_subdir="team/a") == fingerprint()
    assert fingerprint(seed=1) != fingerprint()


def test_unknown_model_kind_is_rejected():
    with pytest.raises(ValidationError, match="'default' or 'reference'"):
        MnistConfig(model="resnet50")


def test_missing_data_directory_is_rejected(tmp_path):
    with pytest.raises(ValidationError, match="does not exist"):
        MnistConfig(data_dir=tmp_path / "nope")
    with pytest.raises(ValidationError, match="does not exist"):
        LmConfig(data_dir=tmp_path / "nope")


def test_unknown_key_is_rejected():
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        MnistConfig(modle="default")


def test_lm_heads_must_divide_width():
    with pytest.raises(ValidationError, match="divisible"):
        LmConfig(n_embd=130, n_head=4)
