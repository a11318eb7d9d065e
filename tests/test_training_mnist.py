"""Training on real MNIST: the loss goes down, stops are clean, and resume is exact."""

import pytest
import torch

from training.callbacks import Callback
from training.config import RunConfig
from training.errors import TrainingRequestError
from training.loop import CheckpointMismatchError, train
from training.mnist.data import split
from training.mnist.workload import MnistConfig, MnistWorkload

pytestmark = pytest.mark.slow

SMALL = 2048  # training images: enough for the loss to fall in a few steps, small enough for CI


@pytest.fixture(scope="module")
def workload(mnist_arrays):
    splits = split(mnist_arrays, val_size=1000, seed=0)
    # A small real subset, so each test trains in a second or two.
    small = type(splits)(
        train_x=splits.train_x[:SMALL], train_y=splits.train_y[:SMALL], val_x=splits.val_x, val_y=splits.val_y,
        test_x=splits.test_x[:2000], test_y=splits.test_y[:2000], source=splits.source,
    )
    return MnistWorkload(MnistConfig(val_size=1000), small)


class Recorder(Callback):
    def __init__(self, stop_at: int | None = None):
        self.losses, self.began, self.epochs, self.stop_at = [], [], [], stop_at

    def on_step_begin(self, step, control):
        self.began.append(step.step)
        if self.stop_at and step.step == self.stop_at:
            control.request_stop(f"asked to stop before step {step.step}")

    def on_step_end(self, step, control):
        self.losses.append(step.loss)

    def on_epoch_end(self, epoch, control):
        self.epochs.append(epoch)


def test_loss_goes_down_within_a_few_steps(workload):
    recorder = Recorder()
    trained = train(workload, RunConfig(epochs=1, batch_size=64, learning_rate=5e-3, max_steps=24), [recorder])
    first, last = sum(recorder.losses[:4]) / 4, sum(recorder.losses[-4:]) / 4
    assert last < 0.6 * first, recorder.losses
    assert trained.result.steps == 24 and trained.result.val_metrics["val_accuracy"] > 0.5


def test_reference_model_trains_too(mnist_arrays, workload):
    reference = MnistWorkload(MnistConfig(model="reference", val_size=1000), workload.splits)
    recorder = Recorder()
    train(reference, RunConfig(epochs=1, batch_size=64, learning_rate=1e-3, max_steps=16), [recorder])
    assert sum(recorder.losses[-4:]) < sum(recorder.losses[:4])


def test_epoch_callbacks_report_metrics_and_throughput(workload):
    recorder = Recorder()
    result = train(workload, RunConfig(epochs=2, batch_size=256, learning_rate=5e-3), [recorder]).result
    assert [e.epoch for e in recorder.epochs] == [1, 2]
    assert all("val_accuracy" in e.metrics and e.samples_per_second > 0 for e in recorder.epochs)
    assert result.epochs_completed == 2 and result.steps == 2 * (SMALL // 256)
    assert len(result.history) == 2


def test_a_callback_can_stop_the_run_cleanly(workload, tmp_path):
    recorder = Recorder(stop_at=6)
    run = RunConfig(epochs=1, batch_size=64, learning_rate=5e-3)
    result = train(workload, run, [recorder], checkpoint_dir=tmp_path).result
    assert result.stopped_early and result.steps == 5  # step 6 never ran
    assert "before step 6" in result.stop_reason
    assert result.checkpoint_path and (tmp_path / "last.pt").exists()
    saved = torch.load(tmp_path / "last.pt", weights_only=True)  # the safe loader reads it
    assert saved["step"] == 5 and saved["reason"].startswith("stopped: asked to stop")


def test_resume_reproduces_an_uninterrupted_run_exactly(workload, tmp_path):
    run = RunConfig(epochs=2, batch_size=128, learning_rate=5e-3, seed=3)
    uninterrupted = train(workload, run, checkpoint_dir=tmp_path / "a")
    # Stop mid-epoch (step 21 of 2x16), then resume in a fresh call from the checkpoint.
    first = train(workload, run, [Recorder(stop_at=21)], checkpoint_dir=tmp_path / "b")
    assert first.result.steps == 20
    resumed = train(workload, run, checkpoint_dir=tmp_path / "b")
    assert resumed.result.resumed_from_step == 20 and resumed.result.steps == uninterrupted.result.steps
    for (name, a), b in zip(uninterrupted.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert [h.metrics for h in resumed.result.history] == [h.metrics for h in uninterrupted.result.history]


def test_resume_with_another_config_is_refused(workload, tmp_path):
    train(workload, RunConfig(epochs=1, batch_size=128, learning_rate=5e-3, max_steps=2), checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointMismatchError, match="written by config"):
        train(workload, RunConfig(epochs=1, batch_size=64, learning_rate=5e-3, max_steps=2), checkpoint_dir=tmp_path)


def test_resume_with_other_operational_settings_is_allowed(workload, tmp_path):
    run = RunConfig(epochs=1, batch_size=128, learning_rate=5e-3, max_steps=4)
    train(workload, run, [Recorder(stop_at=3)], checkpoint_dir=tmp_path)
    # Where and how often things happen is not the arithmetic: the checkpoint still fits.
    moved = run.model_copy(update={"log_every_steps": 1, "checkpoint_subdir": "elsewhere", "checkpoint_every_steps": 1})
    assert train(workload, moved, checkpoint_dir=tmp_path).result.resumed_from_step == 2


def test_a_batch_larger_than_the_split_is_refused_before_training(workload):
    message = rf"batch_size 4096 is larger than the training split \({SMALL} samples\)"
    with pytest.raises(TrainingRequestError, match=message):
        train(workload, RunConfig(batch_size=4096))


def test_same_seed_same_result(workload):
    run = RunConfig(epochs=1, batch_size=128, learning_rate=5e-3, max_steps=5, seed=7)
    a, b = train(workload, run).model, train(workload, run).model
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
