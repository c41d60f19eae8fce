"""The `tfds:<name>` loader on datasets these tests build themselves, without TensorFlow:
uint8 tensors and PNG images in array_record, and the same records in tfrecord."""

import io
import json
import shutil

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


class FljaxTinyPng(tfds.core.GeneratorBasedBuilder):
  """PNG-encoded `Image` features, as real prepared MNIST/CIFAR-10/CelebA folders hold."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(6, 6, 3)),
            "label": tfds.features.ClassLabel(num_classes=2),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(0, 4), "test": self._generate_examples(10, 2)}

  def _generate_examples(self, offset, n):
    from PIL import Image
    for i in range(n):
      pixels = np.zeros((6, 6, 3), np.uint8)
      pixels[..., 0] = offset + i
      pixels[..., 2] = 200
      buffer = io.BytesIO()
      Image.fromarray(pixels).save(buffer, format="PNG")  # encoded here: TFDS would need TF
      yield i, {"image": io.BytesIO(buffer.getvalue()), "label": i % 2}


def _prepare(builder_cls, root):
  builder = builder_cls(data_dir=str(root), file_format="array_record")
  builder.download_and_prepare()
  return str(root)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return _prepare(FljaxTinyDigits, tmp_path_factory.mktemp("tfds"))


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


def test_png_image_features(tmp_path):
  root = _prepare(FljaxTinyPng, tmp_path)
  ds = datasets.load("tfds:fljax_tiny_png", data_dir=root)
  assert ds.x_train.shape == (4, 6, 6, 3) and ds.num_classes == 2
  assert sorted(np.round(ds.x_train[:, 0, 0, 0] * 255).astype(int).tolist()) == [0, 1, 2, 3]
  np.testing.assert_allclose(ds.x_test[..., 2], 200 / 255, rtol=1e-6)
  ds1 = datasets.load("tfds:fljax_tiny_png", data_dir=root, channels=1)
  assert ds1.x_train.shape == (4, 6, 6, 1)


def _as_tfrecord(array_record_root, tmp_path, name):
  """Copies a prepared dataset and rewrites its shards in TFRecord framing."""
  from array_record.python import array_record_module
  root = tmp_path / "tfrecord"
  shutil.copytree(array_record_root, root)
  version_dir = root / name / "1.0.0"
  for shard in version_dir.glob("*.array_record-*"):
    records = array_record_module.ArrayRecordReader(str(shard)).read_all()
    datasets.write_tfrecord(str(shard).replace(".array_record-", ".tfrecord-"), records)
    shard.unlink()
  info_path = version_dir / "dataset_info.json"
  info = json.loads(info_path.read_text())
  info["fileFormat"] = "tfrecord"
  info_path.write_text(json.dumps(info))
  return str(root)


def test_tfrecord_reads_the_same_records(data_dir, tmp_path):
  root = _as_tfrecord(data_dir, tmp_path, "fljax_tiny_digits")
  from_tfrecord = datasets.load("tfds:fljax_tiny_digits", data_dir=root)
  from_array_record = datasets.load("tfds:fljax_tiny_digits", data_dir=data_dir)
  for split in ("train", "test"):
    a = {(float(x[0, 0, 0]), int(y)) for x, y in zip(getattr(from_tfrecord, f"x_{split}"),
                                                     getattr(from_tfrecord, f"y_{split}"))}
    b = {(float(x[0, 0, 0]), int(y)) for x, y in zip(getattr(from_array_record, f"x_{split}"),
                                                     getattr(from_array_record, f"y_{split}"))}
    assert a == b and len(a) == (9 if split == "train" else 6)


def test_tfrecord_framing(tmp_path):
  path = tmp_path / "r.tfrecord"
  records = [b"", b"abc", bytes(range(256)) * 3]
  datasets.write_tfrecord(path, records)
  assert list(datasets.read_tfrecord(path)) == records
  # CRC-32C of b"123456789" is 0xE3069283 (the standard check value); masked as TFRecord does.
  crc = 0xE3069283
  assert datasets._masked_crc32c(b"123456789") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
  corrupt = bytearray(path.read_bytes())
  corrupt[8] ^= 1
  path.write_bytes(bytes(corrupt))
  with pytest.raises(datasets.DatasetError, match="corrupt TFRecord"):
    list(datasets.read_tfrecord(path))
  path.write_bytes(path.read_bytes()[:5])
  with pytest.raises(datasets.DatasetError, match="truncated"):
    list(datasets.read_tfrecord(path))
