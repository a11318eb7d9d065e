"""WikiText-2 text: local `wiki.*.tokens` files, or `wikitext-2-raw-v1` through `datasets`.

Local split choice: train on `wiki.train.tokens` and evaluate on `wiki.valid.tokens` when both
are there (the standard protocol). A copy without the train file (the offline snapshot this
project is tested on) trains on valid and evaluates on test; the chosen splits are reported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "OPPEN_WIKITEXT_DIR"
HUB_DATASET, HUB_CONFIG = "wikitext", "wikitext-2-raw-v1"
_FILE = "wiki.{split}.tokens"


class TextDataError(RuntimeError):
    """WikiText could not be found locally nor downloaded."""


@dataclass(frozen=True)
class LmTexts:
    train: str
    eval: str
    train_split: str
    eval_split: str
    source: str

    @property
    def is_local(self) -> bool:
        return not self.source.startswith("hf:")


def _pick_local_splits(directory: Path) -> tuple[str, str]:
    present = {split for split in ("train", "valid", "test") if (directory / _FILE.format(split=split)).is_file()}
    if {"train", "valid"} <= present:
        return "train", "valid"
    if {"valid", "test"} <= present:
        return "valid", "test"
    raise TextDataError(
        f"{directory} needs wiki.train.tokens + wiki.valid.tokens, or wiki.valid.tokens + wiki.test.tokens; "
        f"found {sorted(present) or 'none'}"
    )


def read_local(directory: Path) -> LmTexts:
    directory = Path(directory)
    if not directory.is_dir():
        raise TextDataError(f"WikiText directory {directory} does not exist")
    train_split, eval_split = _pick_local_splits(directory)
    read = lambda split: (directory / _FILE.format(split=split)).read_text(encoding="utf-8")  # noqa: E731
    return LmTexts(read(train_split), read(eval_split), train_split, eval_split, str(directory.resolve()))


def download() -> LmTexts:
    import datasets  # only the online path needs it

    loaded = datasets.load_dataset(HUB_DATASET, HUB_CONFIG)
    join = lambda split: "".join(loaded[split]["text"])  # noqa: E731  (rows keep their own newlines)
    return LmTexts(join("train"), join("validation"), "train", "validation", f"hf:{HUB_DATASET}/{HUB_CONFIG}")


def load_wikitext(data_dir: Path | None = None) -> LmTexts:
    """Local copy when one is given (argument, then $OPPEN_WIKITEXT_DIR), else a download."""
    local = data_dir or os.environ.get(ENV_VAR)
    if local:
        return read_local(Path(local))
    try:
        return download()
    except Exception as error:  # offline, hub unreachable: one clear message either way
        raise TextDataError(
            f"WikiText-2 is not available: no local copy was given and downloading {HUB_DATASET}/{HUB_CONFIG} "
            f"failed ({type(error).__name__}: {error}). Set {ENV_VAR} (or the data_dir parameter) to a "
            f"directory holding wiki.*.tokens files."
        ) from error
