"""Tests of fljax/datasets.py: every loader, the options, and the missing-data errors."""

import gzip

import numpy as np
import pytest

from fljax import datasets


def test_mnist_embedded_split():
  ds = datasets.load("mnist")
  assert ds.x_train.shape == (4000, 28, 28, 1) and ds.x_test.shape == (1000, 28, 28, 1)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0 and ds.x_train.max() > 0.99
  np.testing.assert_array_equal(np.bincount(ds.y_train), [400] * 10)
  np.testing.assert_array_equal(np.bincount(ds.y_test), [100] * 10)
  again = datasets.load("mnist")
  np.testing.assert_array_equal(ds.x_train, again.x_train)
  np.testing.assert_array_equal(ds.y_test, again.y_test)


def test_digits():
  ds = datasets.load("digits")
  assert ds.image_shape == (8, 8, 1) and ds.num_classes == 10
  assert len(ds.y_train) + len(ds.y_test) == 1797
  assert 0.0 <= ds.x_train.min() and ds.x_train.max() == 1.0


def test_pad_channels_and_subsets():
  base = datasets.load("mnist")
  ds = datasets.load("mnist", image_size=32, channels=3, train_subset=50, test_subset=20)
  assert ds.x_train.shape == (50, 32, 32, 3) and ds.x_test.shape == (20, 32, 32, 3)
  np.testing.assert_array_equal(np.bincount(ds.y_train), [5] * 10)  # stratified
  # Padding keeps the digit in the centre and adds a zero border; channels are copies.
  keep = datasets.stratified_subset(base.y_train, 50)
  np.testing.assert_array_equal(ds.x_train[:, 2:30, 2:30, 0], base.x_train[keep, :, :, 0])
  assert ds.x_train[:, :2].max() == 0 and ds.x_train[:, 30:].max() == 0
  np.testing.assert_array_equal(ds.x_train[..., 0], ds.x_train[..., 2])


def test_shrink_resizes():
  ds = datasets.load("mnist", image_size=14, test_subset=10, train_subset=10)
  assert ds.x_train.shape == (10, 14, 14, 1)
  assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0 + 1e-6


def test_bad_names_and_options():
  with pytest.raises(datasets.DatasetError, match="unknown dataset"):
    datasets.load("imagenet")
  with pytest.raises(datasets.DatasetError, match="subset"):
    datasets.load("digits", train_subset=10**6)
  with pytest.raises(datasets.DatasetError, match="channels"):
    datasets.load("digits", channels=0, train_subset=10, test_subset=10)
  with pytest.raises(datasets.DatasetError, match="image_size"):
    datasets.load("digits", image_size=0)


def _write_idx(path, array):
  codes = {np.dtype(np.uint8): 0x08}
  header = bytes([0, 0, codes[array.dtype], array.ndim])
  header += b"".join(int(s).to_bytes(4, "big") for s in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.tobytes())


def test_fashion_mnist_from_idx_files(tmp_path):
  rng = np.random.default_rng(0)
  for prefix, n in (("train", 12), ("t10k", 5)):
    _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz",
               rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
    _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz",
               rng.integers(0, 10, (n,), dtype=np.uint8))
  ds = datasets.load("fashion_mnist", data_dir=str(tmp_path))
  assert ds.x_train.shape == (12, 28, 28, 1) and ds.x_test.shape == (5, 28, 28, 1)
  raw = datasets.read_idx(tmp_path / "train-images-idx3-ubyte.gz")
  np.testing.assert_allclose(ds.x_train[..., 0], raw / 255.0, rtol=1e-6)


def test_fashion_mnist_missing_names_the_package(tmp_path):
  with pytest.raises(datasets.DatasetError, match="apt-get install dataset-fashion-mnist"):
    datasets.load("fashion_mnist", data_dir=str(tmp_path))


def test_idx_bad_magic(tmp_path):
  (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
  with pytest.raises(datasets.DatasetError, match="not an IDX file"):
    datasets.read_idx(tmp_path / "bad")


@pytest.mark.skipif(not (datasets.Path(datasets.FASHION_MNIST_DIR)
                         / "train-images-idx3-ubyte.gz").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_debian_package():
  ds = datasets.load("fashion_mnist", train_subset=100, test_subset=100)
  assert ds.x_train.shape == (100, 28, 28, 1) and ds.num_classes == 10
  np.testing.assert_array_equal(np.bincount(ds.y_train), [10] * 10)
