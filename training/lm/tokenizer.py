"""Tokenizers: GPT-2's own from the hub, or a byte-level BPE trained on the local text (offline)."""

from __future__ import annotations

from collections.abc import Callable

END_OF_TEXT = "<|endoftext|>"

Encode = Callable[[str], list[int]]


def train_bpe(text: str, vocab_size: int) -> tuple[Encode, int]:
    """A byte-level BPE (GPT-2's scheme) trained on `text`; returns (encode, vocabulary size)."""
    from tokenizers import ByteLevelBPETokenizer

    tokenizer = ByteLevelBPETokenizer()
    # Train line by line: the iterator form avoids writing the corpus to a temp file.
    tokenizer.train_from_iterator(
        text.splitlines(), vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=[END_OF_TEXT]
    )
    return (lambda chunk: tokenizer.encode(chunk).ids), tokenizer.get_vocab_size()


def hub_tokenizer(name: str) -> tuple[Encode, int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    return (lambda chunk: tokenizer(chunk, add_special_tokens=False)["input_ids"]), len(tokenizer)


def encode_corpus(encode: Encode, text: str, lines_per_chunk: int = 2000) -> list[int]:
    """Encode a large text in chunks of whole lines (tokenizers are slow on one multi-MB string)."""
    lines = text.splitlines(keepends=True)
    ids: list[int] = []
    for start in range(0, len(lines), lines_per_chunk):
        ids.extend(encode("".join(lines[start : start + lines_per_chunk])))
    return ids
