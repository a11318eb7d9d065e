"""One typed settings object, read from the environment when asked for (never at import time)."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def _port_or_off(value: object) -> object:
    # The environment only gives strings: OPPEN_METRICS_PORT=off switches the run exporter off.
    return None if isinstance(value, str) and value.strip().lower() == "off" else value


class OppenSettings(BaseSettings):
    """Everything Oppen reads from the environment (OPPEN_* variables), with local defaults."""

    model_config = SettingsConfigDict(env_prefix="OPPEN_", extra="ignore", frozen=True)

    home: Path = Field(Path(".oppen"), description="State of the embedded stack: databases, artifacts, checkpoints, logs.")
    mlflow_tracking_uri: str | None = Field(
        None, description="None: $MLFLOW_TRACKING_URI, else a SQLite file under home."
    )
    mlflow_artifact_root: str | None = Field(
        None, description="Artifact location of experiments Oppen creates; None: under home (file store) or the server's."
    )
    checkpoint_root: Path | None = Field(None, description="Where runs checkpoint; None: home/checkpoints.")
    mlflow_ui_url: str | None = Field(None, description="Shown in summaries; None: derived from an http tracking URI.")
    ledger_url: str | None = Field(
        None, description="SQLAlchemy URL of the budget ledger (postgresql+psycopg://... in production); None: SQLite under home."
    )
    budgets_file: Path | None = Field(None, description="Teams and budgets applied to an empty ledger; None: the shipped file.")
    price_book: Path | None = Field(None, description="Price book YAML; None: $OPPEN_PRICE_BOOK, else the shipped one.")
    settlement_journal: Path | None = Field(
        None, description="Where settlements wait when the ledger is down; None: .settlements under the checkpoint "
        "root (on Kubernetes, the checkpoint volume, so they outlive the pod).",
    )

    # Slack. A bot token (chat.postMessage, one channel per team from the budgets file) or an incoming
    # webhook. Unset here, they are read from the Prefect Secret blocks named below; unset there too,
    # nothing is posted (and the run says so once in its log).
    slack_bot_token: SecretStr | None = Field(None, description="xoxb-... bot token; never logged.")
    slack_webhook_url: SecretStr | None = Field(None, description="Incoming-webhook URL; never logged.")
    slack_channel: str = Field("#ml-runs", description="Bot-token channel of teams that name none.")
    slack_api_url: str | None = Field(
        None, description="Slack Web API base URL (e.g. an egress proxy); None: slack-sdk's https://slack.com/api/."
    )
    slack_token_block: str = Field("oppen-slack-bot-token", description="Secret block read when the token is unset.")
    slack_webhook_block: str = Field("oppen-slack-webhook-url", description="Secret block read when the URL is unset.")
    slack_deadline_s: float = Field(
        10.0, gt=0, le=120, description="The most a message may delay a run, retries and Retry-After included."
    )
    mlflow_webhook_secret: SecretStr | None = Field(
        None, description="HMAC secret shared with MLflow's registry webhook; never logged."
    )

    # Monitoring (README, "Monitoring"): each training run serves its own Prometheus metrics while it trains.
    metrics_port: Annotated[int | None, BeforeValidator(_port_or_off)] = Field(
        0, ge=0, le=65535, description="Port a training run serves its Prometheus metrics on while it trains; 0: a "
        "free one (Prometheus finds it through the run's file_sd target); off: no run metrics.")
    metrics_host: str = Field("127.0.0.1", description="Address the run exporter listens on: loopback on one machine; "
                              "0.0.0.0 in a pod (the GPU job template sets it), where Prometheus scrapes the pod.")
    metrics_targets_dir: Path | None = Field(None, description="Where runs publish their Prometheus file_sd targets; "
                                             "None: home/metrics-targets.")
    alert_receiver_token: SecretStr | None = Field(
        None, description="Bearer token Alertmanager sends to the alert receiver (at least 16 characters); never logged.")

    @cached_property
    def tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return f"sqlite:///{(self.home / 'mlflow.db').resolve()}"

    @cached_property
    def artifact_root(self) -> str | None:
        """Explicit for file-backed stores so artifacts never land in whatever directory a worker runs in."""
        if self.mlflow_artifact_root:
            return self.mlflow_artifact_root
        if self.tracking_uri.startswith("sqlite:") or self.tracking_uri.startswith("file:"):
            return (self.home / "mlartifacts").resolve().as_uri()
        return None  # an MLflow server decides (its --default-artifact-root)

    @cached_property
    def ui_url(self) -> str | None:
        if self.mlflow_ui_url:
            return self.mlflow_ui_url
        return self.tracking_uri if self.tracking_uri.startswith("http") else None

    @cached_property
    def ledger(self) -> str:
        if self.ledger_url:
            return self.ledger_url
        self.home.mkdir(parents=True, exist_ok=True)  # SQLite creates the file, not its directory
        return f"sqlite:///{(self.home / 'ledger.db').resolve()}"

    def reports_dir(self) -> Path:
        return (self.home / "reports").resolve()

    def checkpoint_base(self) -> Path:
        return Path(self.checkpoint_root or self.home / "checkpoints").resolve()

    def checkpoint_dir_for(self, *parts: str) -> Path:
        """A directory under the checkpoint root; a part that would lead outside it is refused."""
        base = self.checkpoint_base()
        target = base.joinpath(*parts).resolve()
        if not target.is_relative_to(base):
            raise ValueError(f"checkpoint directory {'/'.join(parts)!r} leads outside the checkpoint root {base}")
        return target

    def metrics_targets(self) -> Path:
        return Path(self.metrics_targets_dir or self.home / "metrics-targets").resolve()

    def journal_dir(self) -> Path:
        return Path(self.settlement_journal or self.checkpoint_base() / ".settlements").resolve()


def load_settings() -> OppenSettings:
    return OppenSettings()
