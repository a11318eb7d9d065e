"""Check a run's pool, queue and job variables before a flow run exists.

Prefect validates job variables against the pool's schema only when the flow run is created on
the server, accepts variable names the template never uses, and creates any queue name it is
given. Here the same schema is applied strictly (unknown names are errors), the queue must be one
the pools file declares, and every problem is reported at once, one line each.
"""

from __future__ import annotations

from typing import Any

import jsonschema

from work_pools.spec import PoolsFile, PoolSpec


class JobVariablesError(ValueError):
    """The request names an unknown pool or queue, or its job variables do not fit the template."""


def pool_named(pools: PoolsFile, name: str) -> PoolSpec:
    for pool in pools.pools:
        if pool.name == name:
            return pool
    raise JobVariablesError(f"unknown work pool {name!r}; the pools file declares {[p.name for p in pools.pools]}")


def check_queue(pool: PoolSpec, queue: str | None) -> None:
    if queue is None:
        return
    names = [q.name for q in pool.queues]
    if queue not in names:
        raise JobVariablesError(f"unknown queue {queue!r} in pool {pool.name!r}; use one of {names}")


def _describe(error: jsonschema.ValidationError) -> str:
    where = ".".join(str(part) for part in error.absolute_path) or "(job variables)"
    message = error.message
    if error.validator == "anyOf":
        # A nullable variable is anyOf [a constrained string, null]: "not valid under any of the
        # given schemas" says nothing, so say what the string should have been.
        near = [branch for branch in error.context if branch.validator != "type"]
        if len(near) == 1 and near[0].validator == "pattern" and "description" in near[0].schema:
            message = f"{error.instance!r} is not {near[0].schema['description']}"
    return f"job variable {where}: {message}"


def template_defaults(template: dict[str, Any]) -> dict[str, Any]:
    """Each variable's default: what a run gets for the variables it does not set."""
    return {name: spec.get("default") for name, spec in template["variables"]["properties"].items()}


def check_job_variables(pool_name: str, template: dict[str, Any], variables: dict[str, Any]) -> None:
    """Raise JobVariablesError listing every variable that the pool's template would reject."""
    schema = dict(template["variables"])
    schema["additionalProperties"] = False  # a misspelt variable would otherwise be ignored silently
    validator = jsonschema.Draft202012Validator(schema)
    problems = sorted(validator.iter_errors(variables), key=lambda e: [str(p) for p in e.absolute_path])
    if problems:
        known = ", ".join(sorted(schema["properties"]))
        lines = [_describe(error) for error in problems]
        if any(error.validator == "additionalProperties" and not error.absolute_path for error in problems):
            lines.append(f"variables of pool {pool_name!r}: {known}")
        raise JobVariablesError("\n".join(lines))


def check_platform_tolerations(template: dict[str, Any], variables: dict[str, Any]) -> None:
    """A tolerations list replaces the template's default; without the GPU taint's toleration the
    pod would wait Pending forever, so the defaults must stay in it."""
    if not isinstance(variables.get("tolerations"), list):
        return
    required = template_defaults(template).get("tolerations") or []
    missing = [toleration for toleration in required if toleration not in variables["tolerations"]]
    if missing:
        raise JobVariablesError(
            f"job variable tolerations: keep the platform tolerations {missing} and add yours after them"
        )


def check_priority_matches_queue(template: dict[str, Any], queue: str | None, variables: dict[str, Any]) -> None:
    """On Kubernetes the queue decides when a run starts and the priority class whom it may evict:
    they must agree, or an urgent run admitted first could be the one preempted."""
    if queue is None:
        return
    schema = template["variables"]["properties"].get("priority_class_name", {})
    expected = f"oppen-{queue}"
    if expected not in schema.get("enum", []):
        return
    chosen = variables.get("priority_class_name", schema.get("default"))
    if chosen != expected:
        raise JobVariablesError(
            f"job variable priority_class_name: {chosen!r} does not match queue {queue!r}; runs in {queue!r} use {expected!r}"
        )


def check_request(
    pools: PoolsFile, pool_name: str, queue: str | None, variables: dict[str, Any]
) -> tuple[PoolSpec, dict[str, Any]]:
    """Every check for one request; returns the pool and its base job template (read once)."""
    pool = pool_named(pools, pool_name)
    check_queue(pool, queue)
    template = pool.template()
    check_job_variables(pool.name, template, variables)
    if pool.type == "kubernetes":
        check_platform_tolerations(template, variables)
        check_priority_matches_queue(template, queue, variables)
    return pool, template
