"""register_model and promote_model: the model registry's lifecycle, called directly (no flow run).

A version carries the score it was registered with (tasks.registry's tags), and promotion follows
oppen.promotion's rule, as the promote-model flow does: development → staging → production, and a
version never takes an alias from one that scores better unless forced. A refusal by that rule is an
answer (`promoted=False` and the reason), not an error. Each change emits the event the flows emit
(oppen.model.registered / oppen.model.promoted, with the same deterministic ids), so the automations
that follow a registration run whoever made it.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime, timezone
from typing import Literal

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict, Field

from oppen import tracking_keys as keys
from oppen.api import context
from oppen.api.errors import InvalidInput, NotFound, Refused
from oppen.api.recommendations import find_run
from oppen.events import MODEL_PROMOTED, MODEL_REGISTERED, emit, model_event_id, model_resource
from oppen.promotion import decide_promotion, previous_stage
from oppen.settings import OppenSettings
from tasks.registry import DIRECTION_TAG, METRIC_TAG, VALUE_TAG, holder_of, register_version, version_score
from tasks.run_records import TEST_METRICS
from tasks.tracking import client_for, use_process_uris

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # oppen.names.ModelName: MLflow refuses '/' and ':'
# MLflow's alias rule: letters, digits, '_' and '-', and never `latest` or `v<digits>` (those name versions).
ALIAS = re.compile(r"^(?!latest$)(?!v\d+$)[A-Za-z][A-Za-z0-9_-]{0,254}$")
SOURCE = "oppen-api"  # the events' `source`: the flows say oppen-flow / promote-model
MISSING = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")

log = logging.getLogger(__name__)


class ModelVersionInfo(BaseModel):
    """One registered model version: where it came from, the score it was registered with, its aliases."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(description="Registered model name.")
    version: int = Field(description="Version number within the model.")
    aliases: list[str] = Field(description="Aliases it holds (development, staging, production).")
    run_id: str | None = Field(description="The MLflow run it was made from.")
    source: str | None = Field(description="The model's URI in the tracking store.")
    status: str = Field(description="MLflow's registration status (READY once its files are in place).")
    metric: str | None = Field(description="The score it was registered with (test_accuracy, eval_perplexity).")
    metric_value: float | None = Field(description="That score's value.")
    higher_is_better: bool = Field(description="Whether a higher value of the metric is better.")
    created_at: datetime = Field(description="When the version was registered (UTC).")
    created: bool = Field(description="True when this call registered it; False for a version that already existed.")
    mlflow_url: str | None = Field(description="The version's page in the MLflow UI (when OPPEN_MLFLOW_UI_URL or an "
                                   "http tracking URI is set).")


class PromotionResult(BaseModel):
    """What a promotion did: the alias moved, or the rule's reason for not moving it."""

    model_config = ConfigDict(frozen=True)

    model_name: str = Field(description="Registered model name.")
    version: int = Field(description="The version offered the alias.")
    target: str = Field(description="The alias offered: staging or production.")
    promoted: bool = Field(description="True when the version now holds `target`.")
    reason: str = Field(description="Why it was or was not promoted, in one sentence.")
    replaced_version: int | None = Field(description="The version that held `target` before, when it was replaced.")


def register_model(run_id: str, name: str, alias: str | None = "development") -> ModelVersionInfo:
    """Register the model a run logged under `name`, with its test score, and give it `alias` (None: no alias).

    `run_id` is an MLflow run id or the flow run id of a training run. Registering the same run under the
    same name again returns the existing version (and gives it the alias), rather than a duplicate.
    """
    if not MODEL_NAME.match(str(name)):
        raise InvalidInput(f"model name {name!r} is not valid: letters, digits, '.', '_' or '-', at most 128, "
                           "starting with a letter or digit")
    if alias is not None and not ALIAS.match(str(alias)):
        raise InvalidInput(f"alias {alias!r} is not valid: letters, digits, '_' or '-', starting with a letter "
                           "(not 'latest' or 'v<number>')")
    settings = context.settings()
    client = client_for(settings)
    run = find_run(client, run_id)
    metric, value, higher_is_better = _score_of(run)
    existing = _versions(client, f"name = '{name}' and run_id = '{run.info.run_id}'")
    if existing:
        latest = max(existing, key=lambda mv: int(mv.version))
        number, created = int(latest.version), False
        alias_added = alias is not None and alias not in latest.aliases
        if alias_added:
            client.set_registered_model_alias(name, alias, str(number))
    else:
        number = _register(settings, name, _model_uri(client, run), metric, value, higher_is_better, alias)
        created, alias_added = True, alias is not None
    info = version_info(client.get_model_version(name, str(number)), settings, created=created)
    if created or alias_added:
        _announce_registration(info, run, alias if alias_added else None, created)
    return info


def promote_model(name: str, target: Literal["staging", "production"], version: int | None = None,
                  force: bool = False) -> PromotionResult:
    """Give `version` (default: the holder of the stage before `target`) the `target` alias, if the rule allows.

    The rule (oppen.promotion): the version must hold the previous stage, and must not score worse than the
    version holding `target`; `force` overrides both. A refusal returns promoted=False with the reason.
    """
    if target not in ("staging", "production"):
        raise InvalidInput(f"target {target!r} is not one of staging, production")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
        raise InvalidInput(f"version must be a positive whole number, got {version!r}")
    settings = context.settings()
    client = client_for(settings)
    _require_model(client, name)
    if version is None:
        source = previous_stage(target)
        holder = holder_of(client, name, source)
        if holder is None:
            raise NotFound(f"no version of {name!r} holds {source!r}; name the version to promote")
        version = holder.version
    try:
        candidate = version_score(client, name, version)
    except MlflowException as error:
        if error.error_code in MISSING:
            raise NotFound(f"model {name!r} has no version {version}; `get_experiment_metrics` lists a run's "
                           "versions") from None
        raise
    incumbent = holder_of(client, name, target)
    decision = decide_promotion(candidate, target, incumbent, force)
    if decision.allowed:
        client.set_registered_model_alias(name, target, str(version))
    result = PromotionResult(
        model_name=name, version=version, target=target, promoted=decision.allowed, reason=decision.reason,
        replaced_version=incumbent.version if incumbent is not None and decision.allowed else None,
    )
    if result.promoted:
        _emit(MODEL_PROMOTED, name, version, target, [], {
            "name": name, "version": version, "alias": target, "replaced_version": result.replaced_version,
            "source": SOURCE, "reason": result.reason, "links": {}})
    return result


def versions_of_run(client: MlflowClient, run_id: str, settings: OppenSettings) -> list[ModelVersionInfo]:
    """Every registered version made from the run, any model name."""
    found = _versions(client, f"run_id = '{run_id}'")
    return [version_info(mv, settings) for mv in sorted(found, key=lambda mv: (mv.name, int(mv.version)))]


def version_info(mv: ModelVersion, settings: OppenSettings, created: bool = False) -> ModelVersionInfo:
    value = mv.tags.get(VALUE_TAG)
    url = f"{settings.ui_url.rstrip('/')}/#/models/{mv.name}/versions/{mv.version}" if settings.ui_url else None
    return ModelVersionInfo(
        name=mv.name, version=int(mv.version), aliases=sorted(mv.aliases), run_id=mv.run_id or None,
        source=mv.source or None, status=str(mv.status), metric=mv.tags.get(METRIC_TAG),
        metric_value=float(value) if value is not None else None,
        higher_is_better=mv.tags.get(DIRECTION_TAG, "true") == "true",
        created_at=datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=timezone.utc), created=created,
        mlflow_url=url,
    )


def _score_of(run: Run) -> tuple[str, float, bool]:
    """The run's test score, as the training flow registers it (test_accuracy for mnist, eval_perplexity for lm)."""
    workload = run.data.tags.get("oppen.workload", "")
    known = [TEST_METRICS[workload]] if workload in TEST_METRICS else list(TEST_METRICS.values())
    for metric, higher_is_better in known:
        if keys.metric_key(metric) in run.data.metrics:
            return metric, run.data.metrics[keys.metric_key(metric)], higher_is_better
    wanted = " or ".join(metric for metric, _ in known)
    raise Refused(f"run {run.info.run_id} has no {wanted} metric (its test pass did not run), so its version would "
                  "carry no score to promote by; register a run that finished training")


def _model_uri(client: MlflowClient, run: Run) -> str:
    """The model the run logged (the flows log one, named after the model: mnist-cnn), as a models:/ URI."""
    logged = client.search_logged_models([run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run.info.run_id}'")
    ready = [model for model in logged if str(model.status).endswith("READY")] or list(logged)
    if not ready:
        raise NotFound(f"run {run.info.run_id} logged no model (it failed or stopped before saving one); "
                       "there is nothing to register")
    chosen = next((model for model in ready if model.name == "model"), ready[0])
    return chosen.model_uri


def _register(settings: OppenSettings, name: str, model_uri: str, metric: str, value: float,
              higher_is_better: bool, alias: str | None) -> int:
    if alias is not None:
        return register_version(settings, name, model_uri, metric, value, higher_is_better, alias).version
    use_process_uris(settings)  # register_model reads the process-wide registry URI
    mv = mlflow.register_model(model_uri, name, tags={METRIC_TAG: metric, VALUE_TAG: repr(value),
                                                      DIRECTION_TAG: str(higher_is_better).lower()})
    return int(mv.version)


def _versions(client: MlflowClient, filter_string: str) -> list[ModelVersion]:
    """The matching versions, each read whole: MLflow's search results leave out their aliases."""
    return [client.get_model_version(found.name, found.version) for found in client.search_model_versions(filter_string)]


def _require_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code in MISSING:
            raise NotFound(f"no registered model {name!r}; `register_model` registers a run's model") from None
        raise


def _announce_registration(info: ModelVersionInfo, run: Run, alias: str | None, created: bool) -> None:
    """`registered` (a new version), then `promoted` to its alias: the payloads and ids the training flow uses."""
    related = [{"prefect.resource.id": f"mlflow.run.{run.info.run_id}", "prefect.resource.role": "mlflow-run"}]
    if flow_run_id := run.data.tags.get("prefect.flow_run_id"):
        related.insert(0, {"prefect.resource.id": f"prefect.flow-run.{flow_run_id}",
                           "prefect.resource.role": "flow-run"})
    links = {"mlflow": info.mlflow_url} if info.mlflow_url else {}
    common = {"name": info.name, "version": info.version, "run_id": run.info.run_id, "source": SOURCE,
              "metric": info.metric, "metric_value": info.metric_value, "links": links}
    if created:
        _emit(MODEL_REGISTERED, info.name, info.version, None, related, common | {"alias": None})
    if alias is not None:
        _emit(MODEL_PROMOTED, info.name, info.version, alias, related, common | {"alias": alias,
                                                                                "replaced_version": None})


def _emit(event: str, name: str, version: int, alias: str | None, related: list[dict[str, str]], payload: dict) -> None:
    # The registry has changed by now: an event that cannot be sent is logged, never a failed call.
    try:
        emit(event, model_resource(name, version, alias), related, payload,
             event_id=model_event_id(event, name, version, alias))
    except Exception as error:
        log.warning("could not emit %s for %s version %s: %s", event, name, version, error)
