"""The language-model flow: DistilGPT2 on WikiText-2 online, a small GPT-2 from scratch offline."""

from __future__ import annotations

from typing import Annotated

from prefect import flow
from prefect.states import State
from pydantic import Field

from flows.pipeline import TrainingRequest, WorkloadPlan, training_pipeline
from oppen.cost.policy import CostPolicy
from oppen.names import ExperimentName, ModelName
from tasks.training_tasks import load_wikitext
from training.config import RunConfig
from training.lm.data import local_directory
from training.lm.workload import LmConfig, LmWorkload

# 5e-4 is a safe peak for both fine-tuning DistilGPT2 and the small model from scratch at batch 16.
LM_RUN = RunConfig(epochs=1, batch_size=16, learning_rate=5e-4, log_every_steps=20)


# Persisted: if the final state is retried, the server's copy comes back, and only a stored result survives.
@flow(name="train-lm", log_prints=True, validate_parameters=True, persist_result=True)
def train_lm(
    config: LmConfig = LmConfig(),
    run: RunConfig = LM_RUN,
    experiment: ExperimentName = "wikitext-lm",
    model_name: ModelName = "wikitext-lm",
    max_perplexity: Annotated[float, Field(gt=1.0, le=1e9, allow_inf_nan=False)] = 2000.0,
    cost: CostPolicy = CostPolicy(),
) -> State:
    """Train or fine-tune a causal LM, log it to MLflow and register it when its perplexity is low enough."""
    local = local_directory(config.data_dir)
    plan = WorkloadPlan(
        name="lm", config=config, data_source=str(local) if local else "hub",
        check=lambda: LmWorkload.check_request(config, run), load=lambda: load_wikitext(config),
    )
    return training_pipeline(TrainingRequest(plan, run, experiment, model_name, max_perplexity, cost))
