"""Settings resolution, param flattening and the summary markdown (pure)."""

from oppen.settings import OppenSettings
from tasks.registry import RegisteredVersion
from tasks.summary import TrainingSummary, render_markdown
from tasks.tracking import flatten
from training.results import EpochRecord, EvalResult, TrainResult


def test_default_tracking_is_sqlite_under_home_with_explicit_artifacts(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = OppenSettings(home=tmp_path)
    assert settings.tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert settings.artifact_root == (tmp_path / "mlartifacts").resolve().as_uri()
    assert settings.ui_url is None


def test_environment_overrides_and_http_server_decides_artifacts(monkeypatch):
    monkeypatch.setenv("OPPEN_MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    settings = OppenSettings()
    assert settings.tracking_uri == "http://127.0.0.1:5000"
    assert settings.artifact_root is None and settings.ui_url == "http://127.0.0.1:5000"


def test_flatten_nests_with_dots():
    assert flatten({"run": {"epochs": 2, "ckpt": None}, "config": {"model": "default"}}) == {
        "run.epochs": "2", "run.ckpt": "None", "config.model": "default"}


def test_summary_markdown_has_the_headline_figures():
    record = EpochRecord(epoch=1, step=10, train_loss=0.5, metrics={"val_accuracy": 0.9},
                         epoch_seconds=1.0, samples_per_second=100.0)
    train = TrainResult(workload="mnist", device="cpu", steps=10, total_steps=10, samples_seen=1000,
                        epochs_completed=1, resumed_from_step=0, stopped_early=False, stop_reason=None,
                        train_seconds=1.0, samples_per_second=1000.0, final_train_loss=0.4, history=[record],
                        val_metrics={"val_accuracy": 0.9}, checkpoint_path=None, num_parameters=1234)
    evaluation = EvalResult(split="test", metrics={"test_accuracy": 0.91}, primary_metric="test_accuracy",
                            higher_is_better=True, samples=100, seconds=0.1)
    summary = TrainingSummary(workload="mnist", flow_run_id="f", experiment="mnist", mlflow_run_id="abc",
                              mlflow_run_url="http://ui/#/runs/abc", model_uri="models:/m-1", train=train,
                              evaluation=evaluation, duration_seconds=3.0,
                              registered=RegisteredVersion(name="m", version=2, alias="development",
                                                           metric="test_accuracy", value=0.91))
    text = render_markdown(summary)
    assert text.startswith("# test accuracy 91.00%\n")  # no cost settled: the result alone
    assert "| figure | value |" in text  # a header that says something, never an empty one
    assert "| result | test accuracy 91.00% on 100 held-out samples (test split) |" in text
    assert "`m` version 2, alias `development`" in text
    assert "[abc](http://ui/#/runs/abc)" in text
    assert "| 1 | 10 | 0.5000 | 90.00% | 1.0 s | 100 |" in text
