"""The `tfds:<name>` loader on a dataset this test builds itself (array_record, no TF)."""

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from fljax import datasets  # noqa: E402


class FljaxTinyDigits(tfds.core.GeneratorBasedBuilder):
  """Eight 8x8 uint8 images per split, labels 0..2."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=3),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(0, 9), "test": self._generate_examples(100, 6)}

  def _generate_examples(self, offset, n):
    for i in range(n):
      image = np.full((8, 8, 1), (offset + i) % 256, np.uint8)
      yield i, {"image": image, "label": i % 3}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  builder = FljaxTinyDigits(data_dir=str(root), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  return str(root)


def test_reads_prepared_array_record(data_dir):
  ds = datasets.load("tfds:fljax_tiny_digits", data_dir=data_dir)
  assert ds.name == "tfds:fljax_tiny_digits" and ds.num_classes == 3
  assert ds.x_train.shape == (9, 8, 8, 1) and ds.x_test.shape == (6, 8, 8, 1)
  assert ds.x_train.dtype == np.float32
  # Every generated image is constant; its value identifies the record.
  values = sorted(np.round(ds.x_train[:, 0, 0, 0] * 255).astype(int).tolist())
  assert values == list(range(9))
  np.testing.assert_array_equal(np.bincount(ds.y_test), [2, 2, 2])


def test_options_apply_to_tfds(data_dir):
  ds = datasets.load("tfds:fljax_tiny_digits", data_dir=data_dir, image_size=12, channels=3)
  assert ds.x_train.shape == (9, 12, 12, 3)


def test_unprepared_dataset_is_a_clear_error(tmp_path):
  with pytest.raises(datasets.DatasetError, match="not prepared"):
    datasets.load("tfds:fljax_tiny_digits", data_dir=str(tmp_path))
  with pytest.raises(datasets.DatasetError, match="tfds:no_such_dataset_xyz"):
    datasets.load("tfds:no_such_dataset_xyz", data_dir=str(tmp_path))
