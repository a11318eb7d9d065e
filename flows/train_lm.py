"""The language-model flow: DistilGPT2 on WikiText-2 online, a small GPT-2 from scratch offline."""

from __future__ import annotations

from typing import Annotated

from prefect import flow
from prefect.states import State
from pydantic import Field

from flows.pipeline import training_pipeline
from oppen.cost.policy import CostPolicy
from tasks.summary import TrainingSummary
from tasks.training_tasks import load_wikitext
from training.config import RunConfig
from training.lm.workload import LmConfig

# 5e-4 is a safe peak for both fine-tuning DistilGPT2 and the small model from scratch at batch 16.
LM_RUN = RunConfig(epochs=1, batch_size=16, learning_rate=5e-4, log_every_steps=20)


@flow(name="train-lm", log_prints=True, validate_parameters=True)
def train_lm(
    config: LmConfig = LmConfig(),
    run: RunConfig = LM_RUN,
    experiment: Annotated[str, Field(min_length=1)] = "wikitext-lm",
    model_name: Annotated[str, Field(min_length=1)] = "wikitext-lm",
    max_perplexity: Annotated[float, Field(gt=1.0)] = 2000.0,
    cost: CostPolicy = CostPolicy(),
) -> TrainingSummary | State:
    """Train or fine-tune a causal LM, log it to MLflow and register it when its perplexity is low enough."""
    return training_pipeline(
        workload_name="lm",
        load=lambda: load_wikitext(config),
        run=run,
        params={"config": config.model_dump(mode="json")},
        experiment=experiment,
        model_name=model_name,
        threshold=max_perplexity,
        cost=cost,
    )
