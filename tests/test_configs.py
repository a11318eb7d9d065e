"""Configs reject bad input with a clear message before anything runs."""

import pytest
from pydantic import ValidationError

from training.config import RunConfig
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
