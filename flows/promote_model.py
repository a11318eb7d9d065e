"""Move a registered version along development → staging → production, refusing to replace a better one."""

from __future__ import annotations

from typing import Annotated, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.runtime import flow_run
from prefect.states import Completed, State
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from oppen.events import MODEL_PROMOTED, emit, model_event_id, model_resource
from oppen.promotion import decide_promotion, previous_stage
from oppen.settings import load_settings
from tasks.registry import holder_of, version_score
from tasks.tracking import client_for


class PromotionResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    model_name: str
    version: int
    target: str
    promoted: bool
    reason: str
    replaced_version: int | None


class PromotionRefused(RuntimeError):
    """The registry rules refused the move; the message says why."""


@task(cache_policy=NONE)
def promote(model_name: str, target: str, version: int | None, force: bool) -> PromotionResult:
    client = client_for(load_settings())
    if version is None:
        source = previous_stage(target)
        holder = holder_of(client, model_name, source)
        if holder is None:
            raise PromotionRefused(f"no version of {model_name!r} holds {source!r}; name a version to promote")
        version = holder.version
    candidate = version_score(client, model_name, version)
    incumbent = holder_of(client, model_name, target)
    decision = decide_promotion(candidate, target, incumbent, force)
    if decision.allowed:
        client.set_registered_model_alias(model_name, target, str(version))
    get_run_logger().info("%s: %s", "promoted" if decision.allowed else "refused", decision.reason)
    result = PromotionResult(
        model_name=model_name, version=version, target=target, promoted=decision.allowed, reason=decision.reason,
        replaced_version=incumbent.version if incumbent and decision.allowed else None,
    )
    if result.promoted:
        _announce(result)
    return result


def _announce(result: PromotionResult) -> None:
    """The hook for what follows a promotion (a serving-image build, a canary): the event, with MLflow's id for it."""
    related = []
    if run_id := flow_run.get_id():
        related.append({"prefect.resource.id": f"prefect.flow-run.{run_id}", "prefect.resource.role": "flow-run"})
    emit(MODEL_PROMOTED, model_resource(result.model_name, result.version, result.target), related,
         {"name": result.model_name, "version": result.version, "alias": result.target,
          "replaced_version": result.replaced_version, "source": "promote-model", "reason": result.reason, "links": {}},
         event_id=model_event_id(MODEL_PROMOTED, result.model_name, result.version, result.target))


# Persisted: if the final state is retried, the server's copy comes back, and only a stored result survives.
@flow(name="promote-model", validate_parameters=True, persist_result=True)
def promote_model(
    model_name: Annotated[str, Field(min_length=1)],
    target: Literal["staging", "production"] = "staging",
    version: PositiveInt | None = None,
    force: bool = False,
    only_if_better: bool = False,
) -> PromotionResult | State:
    """Give `version` (default: the holder of the previous stage) the `target` alias; fail with the reason if refused.

    With `only_if_better` (the event-driven path: every new `development` version is offered to
    `staging`), a refusal is an expected outcome: the run ends `NotPromoted` with the reason, not Failed.
    """
    result = promote(model_name, target, version, force)
    if not result.promoted:
        if only_if_better:
            return Completed(name="NotPromoted", message=result.reason, data=result)
        raise PromotionRefused(result.reason)
    return result
