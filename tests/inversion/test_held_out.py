"""Tests of inversion/held_out.py: what the shipped priors were trained on, what the trainers
record, and the check that refuses victims from a prior's training data."""

import json

import jax
import numpy as np
import pytest

from diffusion import prior as prior_lib
from diffusion import training
from fljax import config as config_lib
from fljax import datasets
from inversion import gan as gan_lib
from inversion import held_out


@pytest.mark.parametrize("folder", [prior_lib.MNIST_PRIOR, gan_lib.MNIST_GAN])
def test_both_shipped_priors_saw_all_of_the_embedded_mnist_training_split(folder):
  seen = held_out.training_data(folder)
  assert seen == held_out.TrainingData(name="mnist", split="train", image_size=32, channels=1,
                                       subset=None)
  held_out.check(seen, dataset="mnist", split="test")
  held_out.check(seen, dataset="fashion_mnist", split="train")
  with pytest.raises(held_out.HeldOutError) as e:
    held_out.check(seen, dataset="mnist", split="train")
  assert str(e.value) == ("the victims would come from mnist's train split, which the prior "
                          "was trained on (all of it); draw the victims from the test split")


def test_the_fashion_mnist_gan_loads_samples_and_saw_its_training_split_only():
  gan = gan_lib.load(gan_lib.FASHION_MNIST_GAN)
  images = gan_lib.to_unit(gan_lib.generate(
      gan, gan.variables, jax.random.normal(jax.random.key(0), (4, gan.config.latent_dim))))
  assert images.shape == (4, 32, 32, 1) and bool(np.isfinite(images).all())
  assert float(images.std()) > 0.05  # not a constant image
  seen = held_out.training_data(gan_lib.FASHION_MNIST_GAN)
  assert seen == held_out.TrainingData(name="fashion_mnist", split="train", image_size=32,
                                       channels=1, subset=None)
  held_out.check(seen, dataset="fashion_mnist", split="test")
  with pytest.raises(held_out.HeldOutError):
    held_out.check(seen, dataset="fashion_mnist", split="train")


def test_what_the_trainers_write_is_what_is_read(tmp_path):
  diffusion_run = training.TrainConfig(data=training.DataConfig(name="digits", image_size=16,
                                                                train_subset=500))
  (tmp_path / "d").mkdir()
  (tmp_path / "d" / "config.json").write_text(json.dumps(config_lib.to_dict(diffusion_run)))
  seen = held_out.training_data(tmp_path / "d")
  assert seen == held_out.TrainingData(name="digits", image_size=16, channels=1, subset=500)
  with pytest.raises(held_out.HeldOutError, match=r"\(a 500-image subset\); draw"):
    held_out.check(seen, dataset="digits", split="train")

  gan_run = gan_lib.GANTrainConfig(data=datasets.Source(name="fashion_mnist"), channels=3)
  shape = gan_lib.GANConfig(latent_dim=4, base=4, channels=3)
  gan = gan_lib.GAN(shape, gan_lib.init(shape, key=jax.random.key(0))[0])
  gan_lib.save(gan, tmp_path / "g", run_config=config_lib.to_dict(gan_run))
  assert held_out.training_data(tmp_path / "g") == held_out.TrainingData(
      name="fashion_mnist", image_size=32, channels=3)


def test_unrecorded_priors_are_not_checked_and_broken_records_are_named(tmp_path):
  assert held_out.training_data(tmp_path) is None  # e.g. a diffusers checkpoint
  held_out.check(None, dataset="mnist", split="train")
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(held_out.HeldOutError, match="config.json cannot be read"):
    held_out.training_data(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"steps": 5}))
  with pytest.raises(held_out.HeldOutError, match="names no training dataset"):
    held_out.training_data(tmp_path)


def test_the_tuning_and_evaluation_splits_partition_the_test_split():
  tuning, evaluation = (held_out.split_indices(1000, s) for s in ("tuning", "evaluation"))
  assert len(tuning) == 250 and len(evaluation) == 750
  assert sorted(np.concatenate([tuning, evaluation]).tolist()) == list(range(1000))
  held_out.check_disjoint(tuning, evaluation)
  with pytest.raises(held_out.HeldOutError, match="overlap the evaluation victims at 1 test images"):
    held_out.check_disjoint([3, 5], evaluation)
  with pytest.raises(ValueError, match="'tuning' or 'evaluation'"):
    held_out.split_indices(10, "train")


def test_shipped_priors_are_named_by_their_dataset(monkeypatch, tmp_path):
  from inversion import specs
  assert specs.prior_folder(specs.AttackSpec(name="gifd", gan="fashion_mnist")) == \
      gan_lib.FASHION_MNIST_GAN
  assert specs.prior_folder(specs.AttackSpec(name="dps", prior="mnist")) == prior_lib.MNIST_PRIOR
  monkeypatch.setitem(prior_lib.SHIPPED, "fashion_mnist", tmp_path / "untrained")
  with pytest.raises(prior_lib.PriorError, match="fashion_mnist diffusion prior is not trained "
                                                 "yet: python scripts/train_diffusion.py"):
    specs.prior_folder(specs.AttackSpec(name="dps", prior="fashion_mnist"))
  with pytest.raises(prior_lib.PriorError, match="no shipped diffusion prior for 'cifar10'"):
    prior_lib.shipped("cifar10")
