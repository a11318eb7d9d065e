"""The MNIST loader on the real files in ../shared/datasets/mnist."""

import gzip

import numpy as np
import pytest
import torch

from training.mnist.data import ENV_VAR, FILES, MEAN, STD, MnistDataError, count_local, load_mnist, read_idx, split


def test_reads_all_splits(mnist_arrays):
    assert mnist_arrays.train_images.shape == (60_000, 28, 28)
    assert mnist_arrays.test_images.shape == (10_000, 28, 28)
    assert mnist_arrays.train_labels.shape == (60_000,)
    assert mnist_arrays.train_images.dtype == np.uint8
    assert set(np.unique(mnist_arrays.test_labels)) == set(range(10))


def test_pixel_statistics_match_published_figures(mnist_arrays):
    pixels = mnist_arrays.train_images.astype(np.float64) / 255.0
    assert pixels.mean() == pytest.approx(MEAN, abs=1e-3)
    assert pixels.std() == pytest.approx(STD, abs=1e-3)


def test_validation_split_is_held_out_of_training(mnist_arrays):
    splits = split(mnist_arrays, val_size=5000, seed=0)
    assert len(splits.train_y) == 55_000 and len(splits.val_y) == 5000 and len(splits.test_y) == 10_000
    assert splits.train_x.shape[1:] == (1, 28, 28)
    # Same seed, same split; another seed, another split.
    assert torch.equal(split(mnist_arrays, 5000, 0).val_y, splits.val_y)
    assert not torch.equal(split(mnist_arrays, 5000, 1).val_y, splits.val_y)
    # Train and val come from disjoint images: no val image appears among the training images.
    train_rows = {bytes(row) for row in splits.train_x[:, 0].flatten(1).numpy()[:2000]}
    assert not any(bytes(row) in train_rows for row in splits.val_x[:, 0].flatten(1).numpy())


def test_environment_variable_is_the_user_default(monkeypatch, mnist_dir):
    monkeypatch.setenv(ENV_VAR, str(mnist_dir))
    assert load_mnist().source == str(mnist_dir.resolve())


def test_missing_files_give_one_clear_error(tmp_path):
    with pytest.raises(MnistDataError, match="lacks train-images-idx3-ubyte.gz"):
        load_mnist(tmp_path)


def test_no_local_copy_and_no_download_says_what_to_set(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(MnistDataError, match=ENV_VAR):
        load_mnist(allow_download=False)


def test_corrupt_idx_header_is_rejected(tmp_path):
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as handle:
        handle.write(b"\x00\x00\x0d\x01" + b"\x00" * 8)  # element type 0x0d (float) is not MNIST's
    with pytest.raises(MnistDataError, match="unsigned-byte IDX"):
        read_idx(bad)


def test_a_truncated_file_names_itself(tmp_path, mnist_dir):
    name = "t10k-labels-idx1-ubyte.gz"
    truncated = tmp_path / name
    truncated.write_bytes((mnist_dir / name).read_bytes()[:2000])
    with pytest.raises(MnistDataError, match=rf"{truncated} is truncated or corrupt \(EOFError"):
        read_idx(truncated)


def test_a_corrupt_file_names_itself(tmp_path, mnist_dir):
    name = "t10k-labels-idx1-ubyte.gz"
    corrupt = tmp_path / name
    data = bytearray((mnist_dir / name).read_bytes())
    data[100:200] = bytes(100)  # damage the deflate stream, keep the gzip header
    corrupt.write_bytes(bytes(data))
    with pytest.raises(MnistDataError, match=rf"{corrupt} is truncated or corrupt"):
        read_idx(corrupt)


def test_a_file_that_is_not_gzip_names_itself(tmp_path):
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(b"<html>not found</html>")
    with pytest.raises(MnistDataError, match=rf"{bad} is truncated or corrupt \(BadGzipFile"):
        read_idx(bad)


def _copy(mnist_dir, target):
    target.mkdir()
    for name in FILES.values():
        (target / name).write_bytes((mnist_dir / name).read_bytes())
    return target


def test_a_truncated_file_in_a_directory_names_itself(tmp_path, mnist_dir):
    directory = _copy(mnist_dir, tmp_path / "mnist")
    labels = directory / FILES["train_labels"]
    labels.write_bytes(labels.read_bytes()[:-100])
    with pytest.raises(MnistDataError, match=rf"{labels} is truncated or corrupt"):
        load_mnist(directory)


def test_an_empty_file_names_itself(tmp_path, mnist_dir):
    directory = _copy(mnist_dir, tmp_path / "mnist")
    (directory / FILES["test_images"]).write_bytes(b"")
    with pytest.raises(MnistDataError, match=rf"{directory / FILES['test_images']} is empty"):
        count_local(directory)


def test_count_local_reads_the_counts_from_the_headers(mnist_dir):
    assert count_local(mnist_dir) == {"train": 60_000, "test": 10_000}


def test_count_local_decompresses_only_the_headers(tmp_path, mnist_dir):
    directory = _copy(mnist_dir, tmp_path / "mnist")
    images = directory / FILES["train_images"]
    images.write_bytes(images.read_bytes()[:5000])  # the header survives, the pixels do not
    assert count_local(directory)["train"] == 60_000
