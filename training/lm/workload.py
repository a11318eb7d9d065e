"""Causal language modelling on WikiText-2 as a Workload (DistilGPT2 online, a small GPT-2 offline)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, PositiveInt, model_validator
from torch import nn

from training.config import DataDir, FrozenConfig, OptionalPositiveInt, optional_number, RunConfig
from training.errors import TrainingRequestError
from training.lm.data import LmTexts, TextDataError, load_wikitext, local_directory, local_splits, split_file
from training.lm.tokenizer import encode_corpus, hub_tokenizer, train_bpe
from training.results import EvalResult
from training.workload import Workload

PRETRAINED = "distilgpt2"
PRETRAINED_POSITIONS = 1024  # n_positions in distilgpt2's config: it has no embedding for a later position


class LmConfig(FrozenConfig):
    """The language-model workload. Architecture fields apply to the from-scratch ('scratch') model only."""

    model: Literal["distilgpt2", "scratch"] | None = Field(
        None, description="None: 'scratch' when the text is local (offline), 'distilgpt2' when downloaded."
    )
    data_dir: DataDir = Field(None, description="Directory with wiki.*.tokens; None: $OPPEN_WIKITEXT_DIR, else download.")
    block_size: PositiveInt = Field(
        128, le=4096, description="Tokens per training sequence (attention memory grows with its square)."
    )
    vocab_size: PositiveInt = Field(
        4096, ge=260, le=1_000_000, description="BPE vocabulary trained offline (>= 256 bytes + specials)."
    )
    n_layer: PositiveInt = Field(2, le=48, description="Small enough to train on a CPU in minutes.")
    n_head: PositiveInt = Field(4, le=64)
    n_embd: PositiveInt = Field(128, le=8192)
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="0 for short runs from scratch; try 0.1 when fine-tuning.")
    max_train_tokens: OptionalPositiveInt = optional_number(
        le=10**9, description="Truncate the training text (tests, quick runs); left out: all of it."
    )
    max_eval_tokens: PositiveInt = Field(
        65_536, le=10**9, description="Perplexity on at most this many eval tokens (10**9: all of WikiText-2's)."
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> LmConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        return self

    @model_validator(mode="after")
    def _limits_hold_a_block(self) -> LmConfig:
        for name in ("max_train_tokens", "max_eval_tokens"):
            limit = getattr(self, name)
            if limit is not None and limit < self.block_size:
                raise ValueError(f"{name} ({limit}) is smaller than block_size ({self.block_size}): no block fits")
        return self


def _model_kind(config: LmConfig, text_is_local: bool) -> str:
    # Offline there is no pretrained model to fetch, so the default is the one trained from scratch.
    return config.model or ("scratch" if text_is_local else PRETRAINED)


def _check_positions(model_kind: str, block_size: int) -> None:
    # The scratch model is built with block_size positions; the pretrained one has a fixed number.
    if model_kind == PRETRAINED and block_size > PRETRAINED_POSITIONS:
        raise TrainingRequestError(
            f"block_size {block_size} is longer than {PRETRAINED}'s {PRETRAINED_POSITIONS} positions"
        )


def _blocks(ids: list[int], block_size: int, limit: int | None, origin: str) -> torch.Tensor:
    if len(ids) < block_size:  # the limit is never below block_size (LmConfig checks), so only the text can be
        raise TextDataError(f"{origin} is too short: {len(ids)} tokens, fewer than block_size {block_size}")
    ids = ids[:limit] if limit else ids
    n_blocks = len(ids) // block_size
    return torch.tensor(ids[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)


def _check_batch_fits(config: LmConfig, run: RunConfig, train_file: Path) -> None:
    size = train_file.stat().st_size
    tokens = min(size, config.max_train_tokens or size)  # a byte-level BPE makes at most one token per byte
    most_blocks = tokens // config.block_size
    if run.batch_size > most_blocks:
        cap = f", capped at max_train_tokens {config.max_train_tokens}" if tokens < size else ""
        raise TrainingRequestError(
            f"batch_size {run.batch_size} is larger than the training split can be: {train_file} ({size} bytes{cap}) "
            f"makes at most {most_blocks} blocks of block_size {config.block_size}"
        )


class LmWorkload(Workload):
    name = "lm"
    primary_metric = "val_perplexity"
    higher_is_better = False

    def __init__(self, config: LmConfig, texts: LmTexts) -> None:
        self.config = config
        self.texts = texts
        self.model_kind = _model_kind(config, texts.is_local)
        _check_positions(self.model_kind, config.block_size)  # before the tokenizer: it is the slow part
        if self.model_kind == "scratch":
            encode, self.vocab_size = train_bpe(texts.train, config.vocab_size)
        else:
            encode, self.vocab_size = hub_tokenizer(PRETRAINED)
        block = config.block_size
        train_ids, eval_ids = encode_corpus(encode, texts.train), encode_corpus(encode, texts.eval)
        self.train_blocks = _blocks(train_ids, block, config.max_train_tokens, texts.origin(texts.train_split))
        self.eval_blocks = _blocks(eval_ids, block, config.max_eval_tokens, texts.origin(texts.eval_split))

    @classmethod
    def load(cls, config: LmConfig) -> LmWorkload:
        return cls(config, load_wikitext(config.data_dir))

    @classmethod
    def check_request(cls, config: LmConfig, run: RunConfig, data_dir: Path | None = None) -> None:
        """Refuse, before tokenizing, a request that cannot work (reads only file sizes, never the text).

        `data_dir` overrides `config.data_dir`; with neither and no $OPPEN_WIKITEXT_DIR the text is
        downloaded at load time, so only the model's positions can be checked yet.
        """
        directory = local_directory(data_dir or config.data_dir)
        _check_positions(_model_kind(config, directory is not None), config.block_size)
        if directory is None:
            return
        train_split, eval_split = local_splits(directory)
        # A byte-level BPE never makes more tokens than the text has bytes, so sizes bound the blocks.
        for split in (eval_split, train_split):
            size = split_file(directory, split).stat().st_size
            if size < config.block_size:
                raise TextDataError(
                    f"{split_file(directory, split)} is too short: {size} bytes cannot make one block of "
                    f"block_size {config.block_size}"
                )
        _check_batch_fits(config, run, split_file(directory, train_split))

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
