"""Tests of fljax/datasets.py: every loader, the options, and the missing-data errors."""

import gzip

import numpy as np
import pytest

from fljax import datasets
from tests.fashion import needs_fashion_mnist


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


def test_photos_are_deterministic_crops_with_a_disjoint_split():
  ds = datasets.load("photos")
  assert ds.image_shape == (32, 32, 3) and ds.num_classes == 10
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  assert 0.0 <= min(ds.x_train.min(), ds.x_test.min())
  assert max(ds.x_train.max(), ds.x_test.max()) <= 1.0
  assert len(ds.y_train) > 3 * len(ds.y_test) > 600  # about a fifth is test
  # Every photo in both splits; labels 0-7 of 10 classes.
  np.testing.assert_array_equal(np.unique(ds.y_train), np.arange(len(datasets.PHOTOS)))
  np.testing.assert_array_equal(np.unique(ds.y_test), np.arange(len(datasets.PHOTOS)))
  # No test crop is (nearly) a training crop: the split is by region, at every scale.
  a, b = ds.x_test.reshape(len(ds.y_test), -1), ds.x_train.reshape(len(ds.y_train), -1)
  mse = ((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T) / a.shape[1]
  assert mse.min() > 1e-4  # 40 dB (the rocket's clear sky is left out: near-copies)
  again = datasets.load("photos")
  np.testing.assert_array_equal(ds.x_test, again.x_test)
  np.testing.assert_array_equal(ds.y_train, again.y_train)


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


@needs_fashion_mnist
def test_fashion_mnist_debian_package():
  ds = datasets.load("fashion_mnist", train_subset=100, test_subset=100)
  assert ds.x_train.shape == (100, 28, 28, 1) and ds.num_classes == 10
  np.testing.assert_array_equal(np.bincount(ds.y_train), [10] * 10)


def _png(path, size, value):
  from PIL import Image
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full(size, value, np.uint8)).save(path)


def test_image_folder_reads_class_folders_in_sorted_order_and_names_what_it_skips(tmp_path):
  root = tmp_path / "imgs"
  _png(root / "cat" / "a.png", (12, 20), 255)           # mixed sizes: all resized to 8x8
  _png(root / "cat" / "deep" / "b.png", (30, 30), 0)    # nested inside a class: that class
  _png(root / "ant" / "c.png", (8, 8), 128)
  (root / "bee").mkdir()                                # an empty class still takes index 1
  _png(root / "loose.png", (8, 8), 0)                   # beside the class folders
  (root / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
  (root / "cat" / "notes.txt").write_text("not an image")
  (root / ".DS_Store").write_bytes(b"")
  folder = datasets.load_image_folder(root, (8, 8, 1))
  assert folder.classes == ["ant", "bee", "cat"]
  assert folder.names == ["ant/c.png", "cat/a.png", "cat/deep/b.png"]
  assert folder.labels.tolist() == [0, 2, 2]
  assert folder.images.shape == (3, 8, 8, 1)
  np.testing.assert_allclose(folder.images[1], 1.0)
  assert sorted(name for name, _ in folder.skipped) == ["cat/broken.png", "cat/notes.txt",
                                                        "loose.png"]


def test_image_folder_without_class_folders_labels_zero_and_refuses_empty(tmp_path):
  _png(tmp_path / "flat" / "x.jpg", (5, 9), 10)
  folder = datasets.load_image_folder(tmp_path / "flat", (4, 4, 3))
  assert folder.labels.tolist() == [0] and folder.images.shape == (1, 4, 4, 3)
  assert folder.classes == [] and folder.skipped == []
  (tmp_path / "empty").mkdir()
  with pytest.raises(datasets.DatasetError, match="no readable PNG/JPEG image"):
    datasets.load_image_folder(tmp_path / "empty", (4, 4, 1))
  with pytest.raises(datasets.DatasetError, match="not a folder"):
    datasets.load_image_folder(tmp_path / "missing", (4, 4, 1))
