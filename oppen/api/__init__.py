"""`oppen.api`: one typed, synchronous function per operator tool, pydantic in and out.

    from oppen import api
    job = api.trigger_training("mnist", run={"epochs": 1, "max_steps": 100}, cost={"max_cost_usd": 0.01})
    api.get_training_status(job.flow_run_id)

The CLI (`oppen ...`) and the MCP server (`oppen mcp`) are thin layers over these functions. Each
calls Prefect (PREFECT_API_URL), MLflow, the ledger and the cost engine directly; a refusal is an
`oppen.api.errors.ApiError` whose message is one sentence. Modules load on first use, so importing
this package is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

FUNCTIONS = {
    # experiments
    "list_experiments": "experiments", "get_experiment_metrics": "experiments",
    # training
    "trigger_training": "jobs", "get_training_status": "status", "calculate_training_cost": "run_cost",
    # resources and budgets
    "get_gpu_availability": "resources", "validate_job_resources": "planning", "check_training_quota": "reports",
    # cost
    "recommend_cost_optimization": "recommendations", "forecast_training_cost": "forecasting",
    "compare_training_configs": "comparison",
    # queue
    "queue_training_job": "jobs", "get_job_queue_status": "queue_status", "cancel_training_job": "jobs",
    # health and reports
    "get_training_health_status": "health", "generate_cost_report": "reports",
    "get_resource_utilization_report": "reports",
    # batch
    "submit_batch_training": "batch", "get_batch_status": "batch",
    # registry
    "register_model": "registry", "promote_model": "registry",
}

__all__ = sorted(FUNCTIONS)


def __getattr__(name: str) -> Any:
    if name in FUNCTIONS:
        return getattr(importlib.import_module(f"oppen.api.{FUNCTIONS[name]}"), name)
    raise AttributeError(f"module 'oppen.api' has no attribute {name!r}")
