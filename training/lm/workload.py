"""Causal language modelling on WikiText-2 as a Workload (DistilGPT2 online, a small GPT-2 offline)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any, Literal

import torch
from pydantic import Field, PositiveInt, model_validator
from torch import nn

from training.config import DataDir, FrozenConfig
from training.lm.data import LmTexts, load_wikitext
from training.lm.tokenizer import encode_corpus, hub_tokenizer, train_bpe
from training.results import EvalResult
from training.workload import Workload

PRETRAINED = "distilgpt2"


class LmConfig(FrozenConfig):
    """The language-model workload. Architecture fields apply to the from-scratch ('scratch') model only."""

    model: Literal["distilgpt2", "scratch"] | None = Field(
        None, description="None: 'scratch' when the text is local (offline), 'distilgpt2' when downloaded."
    )
    data_dir: DataDir = Field(None, description="Directory with wiki.*.tokens; None: $OPPEN_WIKITEXT_DIR, else download.")
    block_size: PositiveInt = Field(128, description="Tokens per training sequence.")
    vocab_size: PositiveInt = Field(4096, ge=260, description="BPE vocabulary trained offline (>= 256 bytes + specials).")
    n_layer: PositiveInt = Field(2, description="Small enough to train on a CPU in minutes.")
    n_head: PositiveInt = 4
    n_embd: PositiveInt = 128
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="0 for short runs from scratch; try 0.1 when fine-tuning.")
    max_train_tokens: PositiveInt | None = Field(None, description="Truncate the training text (tests, quick runs).")
    max_eval_tokens: PositiveInt | None = Field(65_536, description="Perplexity on this many eval tokens; None: all.")


    @model_validator(mode="after")
    def _heads_divide_width(self) -> LmConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        return self


def _blocks(ids: list[int], block_size: int, limit: int | None) -> torch.Tensor:
    ids = ids[:limit] if limit else ids
    n_blocks = len(ids) // block_size
    if n_blocks == 0:
        raise ValueError(f"text too short: {len(ids)} tokens make no block of {block_size}")
    return torch.tensor(ids[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)


class LmWorkload(Workload):
    name = "lm"
    primary_metric = "val_perplexity"
    higher_is_better = False

    def __init__(self, config: LmConfig, texts: LmTexts) -> None:
        self.config = config
        self.texts = texts
        self.model_kind = config.model or ("scratch" if texts.is_local else PRETRAINED)
        if self.model_kind == "scratch":
            encode, self.vocab_size = train_bpe(texts.train, config.vocab_size)
        else:
            encode, self.vocab_size = hub_tokenizer(PRETRAINED)
        block = config.block_size
        self.train_blocks = _blocks(encode_corpus(encode, texts.train), block, config.max_train_tokens)
        self.eval_blocks = _blocks(encode_corpus(encode, texts.eval), block, config.max_eval_tokens)

    @classmethod
    def load(cls, config: LmConfig) -> LmWorkload:
        return cls(config, load_wikitext(config.data_dir))

    def config_dict(self) -> dict[str, Any]:
        fields = self.config.model_dump(mode="json", exclude={"data_dir"})
        return fields | {"model": self.model_kind, "train_split": self.texts.train_split, "eval_split": self.texts.eval_split}

    def metric_baseline(self) -> float | None:
        # An untrained model guesses uniformly over the vocabulary: perplexity = vocabulary size.
        return float(self.vocab_size)

    def build_model(self) -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        if self.model_kind == PRETRAINED:
            return GPT2LMHeadModel.from_pretrained(PRETRAINED)
        c = self.config
        return GPT2LMHeadModel(
            GPT2Config(
                vocab_size=self.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                n_head=c.n_head, resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
            )
        )

    def num_train_samples(self) -> int:
        return len(self.train_blocks)

    def train_batches(
        self, generator: torch.Generator, batch_size: int, start_batch: int, device: torch.device
    ) -> Iterator[torch.Tensor]:
        order = torch.randperm(len(self.train_blocks), generator=generator)
        for batch in range(start_batch, self.steps_per_epoch(batch_size)):
            yield self.train_blocks[order[batch * batch_size : (batch + 1) * batch_size]].to(device)

    def train_step(self, model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
        return model(input_ids=batch, labels=batch).loss, len(batch)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, device: torch.device) -> dict[str, float]:
        was_training = model.training
        model.eval()
        total_loss, total_blocks = 0.0, 0
        for start in range(0, len(self.eval_blocks), 32):
            batch = self.eval_blocks[start : start + 32].to(device)
            total_loss += model(input_ids=batch, labels=batch).loss.item() * len(batch)
            total_blocks += len(batch)
        model.train(was_training)
        loss = total_loss / total_blocks
        return {f"{split}_loss": loss, f"{split}_perplexity": math.exp(min(loss, 50.0))}

    def test(self, model: nn.Module, device: torch.device) -> EvalResult:
        """Perplexity on the eval split (the held-out text the loop's validation also uses)."""
        started = time.perf_counter()
        metrics = self.evaluate(model, "eval", device)
        return EvalResult(
            split=self.texts.eval_split, metrics=metrics, primary_metric="eval_perplexity", higher_is_better=False,
            samples=len(self.eval_blocks), seconds=time.perf_counter() - started,
        )
