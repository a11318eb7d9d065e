"""WikiText-2 text: local `wiki.*.tokens` files, or `wikitext-2-raw-v1` through `datasets`.

Local split choice: train on `wiki.train.tokens` and evaluate on `wiki.valid.tokens` when both
are there (the standard protocol). A copy without the train file (the offline snapshot this
project is tested on) trains on valid and evaluates on test; the chosen splits are reported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from training.errors import DataError, DataUnavailable

ENV_VAR = "OPPEN_WIKITEXT_DIR"
HUB_DATASET, HUB_CONFIG = "wikitext", "wikitext-2-raw-v1"
_FILE = "wiki.{split}.tokens"


class TextDataError(DataError):
    """WikiText is missing, empty or too short for the request (or could not be downloaded)."""


def split_file(directory: Path, split: str) -> Path:
    return Path(directory) / _FILE.format(split=split)


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

    def origin(self, split: str) -> str:
        """Where a split's text came from, for messages: its file, or the hub dataset and split."""
        if self.is_local:
            return str(split_file(Path(self.source), split))
        return f"{self.source} ({split} split)"


def _pick_local_splits(directory: Path) -> tuple[str, str]:
    present = {split for split in ("train", "valid", "test") if split_file(directory, split).is_file()}
    if {"train", "valid"} <= present:
        return "train", "valid"
    if {"valid", "test"} <= present:
        return "valid", "test"
    raise TextDataError(
        f"{directory} needs wiki.train.tokens + wiki.valid.tokens, or wiki.valid.tokens + wiki.test.tokens; "
        f"found {sorted(present) or 'none'}"
    )


def local_splits(directory: Path) -> tuple[str, str]:
    """(train split, eval split) of a local copy; both files must exist and hold something."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TextDataError(f"WikiText directory {directory} does not exist")
    splits = _pick_local_splits(directory)
    for split in splits:
        if split_file(directory, split).stat().st_size == 0:
            raise TextDataError(f"{split_file(directory, split)} is empty")
    return splits


def read_local(directory: Path) -> LmTexts:
    directory = Path(directory)
    train_split, eval_split = local_splits(directory)
    read = lambda split: split_file(directory, split).read_text(encoding="utf-8")  # noqa: E731
    return LmTexts(read(train_split), read(eval_split), train_split, eval_split, str(directory.resolve()))


def download() -> LmTexts:
    import datasets  # only the online path needs it

    loaded = datasets.load_dataset(HUB_DATASET, HUB_CONFIG)
    join = lambda split: "".join(loaded[split]["text"])  # noqa: E731  (rows keep their own newlines)
    return LmTexts(join("train"), join("validation"), "train", "validation", f"hf:{HUB_DATASET}/{HUB_CONFIG}")


def local_directory(data_dir: Path | None = None) -> Path | None:
    """The local copy to read: the argument, else $OPPEN_WIKITEXT_DIR; None means download."""
    local = data_dir or os.environ.get(ENV_VAR)
    return Path(local) if local else None


def load_wikitext(data_dir: Path | None = None) -> LmTexts:
    """Local copy when one is given (argument, then $OPPEN_WIKITEXT_DIR), else a download."""
    local = local_directory(data_dir)
    if local is not None:
        return read_local(local)
    try:
        return download()
    except Exception as error:  # offline, hub unreachable: one clear message either way
        raise DataUnavailable(
            f"WikiText-2 is not available: no local copy was given and downloading {HUB_DATASET}/{HUB_CONFIG} "
            f"failed ({type(error).__name__}: {error}). Set {ENV_VAR} (or the data_dir parameter) to a "
            f"directory holding wiki.*.tokens files."
        ) from error
