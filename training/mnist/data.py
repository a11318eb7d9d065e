"""MNIST: the canonical IDX .gz files from a local directory, or `ylecun/mnist` through `datasets`.

Where the data comes from, in order:
1. the `data_dir` argument;
2. the `OPPEN_MNIST_DIR` environment variable (the user-level default);
3. a download through `datasets` into its cache (needs the internet once);
otherwise one error that says what to set.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training.errors import DataError, DataUnavailable

ENV_VAR = "OPPEN_MNIST_DIR"
HUB_DATASET = "ylecun/mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# The published MNIST training-set statistics; normalising with them is what the reference did.
MEAN, STD = 0.1307, 0.3081
_IDX_DTYPE = 0x08  # unsigned byte, the only element type MNIST uses
_MAX_HEADER = 4 + 4 * 255  # a 4-byte magic, then one 4-byte size per dimension (at most 255)


class MnistDataError(DataError):
    """MNIST is missing, unreadable or too small for the request (or could not be downloaded)."""


@dataclass(frozen=True)
class MnistArrays:
    """Raw uint8 images (N, 28, 28) and int64 labels (N,), train and test."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str  # where they came from, for the run's params


@dataclass(frozen=True)
class MnistSplits:
    """Normalised float tensors, with a validation split held out of the 60,000 training images."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str


def _read_gzip(path: Path, size: int = -1) -> bytes:
    """The first `size` decompressed bytes of `path` (all with -1); a damaged file is a `MnistDataError`."""
    with open(path, "rb") as raw:  # opened outside the try: a missing or unreadable file is not a damaged one
        try:
            with gzip.GzipFile(fileobj=raw) as handle:
                return handle.read(size)
        except (EOFError, zlib.error, OSError) as error:  # gzip.BadGzipFile is an OSError
            raise MnistDataError(
                f"{path} is truncated or corrupt ({type(error).__name__}: {error}); replace it with a fresh copy"
            ) from error


def _parse_header(path: Path, data: bytes) -> tuple[tuple[int, ...], int]:
    """(shape, offset of the first value) from an IDX header."""
    if len(data) < 4:
        raise MnistDataError(f"{path} is truncated: {len(data)} bytes, shorter than an IDX header")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != _IDX_DTYPE:
        raise MnistDataError(f"{path} is not an unsigned-byte IDX file (header {data[:4].hex()})")
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise MnistDataError(f"{path} is truncated: its header promises {ndim} dimensions, the file ends first")
    return struct.unpack(f">{ndim}I", data[4:offset]), offset


def read_idx(path: Path) -> np.ndarray:
    """Read one gzip-compressed IDX file (the format of the original MNIST distribution)."""
    data = _read_gzip(path)
    shape, offset = _parse_header(path, data)
    array = np.frombuffer(data, dtype=np.uint8, offset=offset)
    if array.size != int(np.prod(shape)):
        raise MnistDataError(f"{path} holds {array.size} values, its header promises {shape}")
    return array.reshape(shape)


def _require_files(directory: Path) -> None:
    if not directory.is_dir():
        raise MnistDataError(f"MNIST data directory {directory} does not exist")
    missing = [name for name in FILES.values() if not (directory / name).is_file()]
    if missing:
        raise MnistDataError(f"MNIST data directory {directory} lacks {', '.join(missing)}")
    for name in FILES.values():
        if (directory / name).stat().st_size == 0:
            raise MnistDataError(f"{directory / name} is empty")


def _check_pairs(lengths: dict[str, int], directory: Path) -> None:
    for split_name in ("train", "test"):
        if lengths[f"{split_name}_images"] != lengths[f"{split_name}_labels"]:
            raise MnistDataError(f"{split_name} images and labels in {directory} differ in length")


def count_local(directory: Path) -> dict[str, int]:
    """Images per split, {"train": n, "test": n}, read from the IDX headers alone (cheap: no full decompress)."""
    directory = Path(directory)
    _require_files(directory)
    counts = {}
    for key, name in FILES.items():
        shape, _ = _parse_header(directory / name, _read_gzip(directory / name, _MAX_HEADER))
        counts[key] = shape[0]  # the first dimension is the number of items, images and labels alike
    _check_pairs(counts, directory)
    return {"train": counts["train_images"], "test": counts["test_images"]}


def read_local(directory: Path) -> MnistArrays:
    directory = Path(directory)
    _require_files(directory)
    arrays = {key: read_idx(directory / name) for key, name in FILES.items()}
    _check_pairs({key: len(value) for key, value in arrays.items()}, directory)
    return MnistArrays(
        **{key: (value.astype(np.int64) if "labels" in key else value) for key, value in arrays.items()},
        source=str(directory.resolve()),
    )


def download(cache_dir: Path | None = None) -> MnistArrays:
    """Fetch `ylecun/mnist` through `datasets` (cached after the first time)."""
    import datasets  # imported here: only the online path needs it, and it is slow to import

    loaded = datasets.load_dataset(HUB_DATASET, cache_dir=str(cache_dir) if cache_dir else None)

    def to_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
        images = np.stack([np.asarray(image, dtype=np.uint8) for image in loaded[split]["image"]])
        return images, np.asarray(loaded[split]["label"], dtype=np.int64)

    train_images, train_labels = to_arrays("train")
    test_images, test_labels = to_arrays("test")
    return MnistArrays(train_images, train_labels, test_images, test_labels, source=f"hf:{HUB_DATASET}")


def local_directory(data_dir: Path | None = None) -> Path | None:
    """The local copy to read: the argument, else $OPPEN_MNIST_DIR; None means download."""
    local = data_dir or os.environ.get(ENV_VAR)
    return Path(local) if local else None


def load_mnist(data_dir: Path | None = None, allow_download: bool = True) -> MnistArrays:
    """Local copy when one is given (argument, then $OPPEN_MNIST_DIR), else a download."""
    local = local_directory(data_dir)
    if local is not None:
        return read_local(local)
    if not allow_download:
        raise MnistDataError(f"no MNIST directory given: pass data_dir or set {ENV_VAR}")
    try:
        return download()
    except Exception as error:  # no internet, hub down, datasets misconfigured: all end the same way
        raise DataUnavailable(
            f"MNIST is not available: no local copy was given and downloading {HUB_DATASET} failed "
            f"({type(error).__name__}: {error}). Set {ENV_VAR} (or the data_dir parameter) to a directory "
            f"holding {', '.join(FILES.values())}."
        ) from error


def _normalise(images: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(images.copy()).float().div_(255.0).sub_(MEAN).div_(STD)
    return tensor.unsqueeze(1)  # (N, 1, 28, 28)


def split(arrays: MnistArrays, val_size: int, seed: int) -> MnistSplits:
    """Hold `val_size` training images out for validation, chosen by `seed`; the test set stays untouched."""
    n_train = len(arrays.train_images)
    if not 0 < val_size < n_train:
        raise MnistDataError(f"val_size must be between 1 and {n_train - 1}, got {val_size}")
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed)).numpy()
    val_index, train_index = order[:val_size], order[val_size:]
    return MnistSplits(
        train_x=_normalise(arrays.train_images[train_index]),
        train_y=torch.from_numpy(arrays.train_labels[train_index]),
        val_x=_normalise(arrays.train_images[val_index]),
        val_y=torch.from_numpy(arrays.train_labels[val_index]),
        test_x=_normalise(arrays.test_images),
        test_y=torch.from_numpy(arrays.test_labels),
        source=arrays.source,
    )
