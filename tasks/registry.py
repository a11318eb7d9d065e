"""MLflow model registry adapter: versions with their scores, and alias moves."""

from __future__ import annotations

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict

from oppen.promotion import VersionScore
from oppen.settings import OppenSettings
from tasks.tracking import client_for, use_process_uris

# Each version carries the score it was registered with, so promotion can compare versions.
METRIC_TAG, VALUE_TAG, DIRECTION_TAG = "oppen.metric", "oppen.metric_value", "oppen.higher_is_better"


class RegisteredVersion(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    version: int
    alias: str
    metric: str
    value: float


def register_version(
    settings: OppenSettings, name: str, model_uri: str, metric: str, value: float, higher_is_better: bool, alias: str,
    description: str | None = None,
) -> RegisteredVersion:
    # register_model creates the registered model when missing and resolves a logged model's
    # URI (models:/m-...) to its source and model id.
    use_process_uris(settings)
    version = mlflow.register_model(
        model_uri,
        name,
        tags={METRIC_TAG: metric, VALUE_TAG: repr(value), DIRECTION_TAG: str(higher_is_better).lower()},
    )
    client = client_for(settings)
    if description:
        client.update_model_version(name, version.version, description=description)
        if not client.get_registered_model(name).description:
            client.update_registered_model(name, description="Trained and registered by Oppen's training flows. "
                                                             "Each version's description says what it scored and "
                                                             "what its run cost; aliases move development → staging "
                                                             "→ production.")
    client.set_registered_model_alias(name, alias, version.version)
    return RegisteredVersion(name=name, version=int(version.version), alias=alias, metric=metric, value=value)


def version_score(client: MlflowClient, name: str, version: int) -> VersionScore:
    mv = client.get_model_version(name, str(version))
    value = mv.tags.get(VALUE_TAG)
    return VersionScore(
        version=int(mv.version),
        metric=mv.tags.get(METRIC_TAG),
        value=float(value) if value is not None else None,
        higher_is_better=mv.tags.get(DIRECTION_TAG, "true") == "true",
        aliases=tuple(mv.aliases),
    )


def holder_of(client: MlflowClient, name: str, alias: str) -> VersionScore | None:
    try:
        mv = client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
    return version_score(client, name, int(mv.version))
