"""The priors that ship in the repository (see docs/diffusion.md: how it was trained)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import prior as prior_lib
from diffusion import schedules, training
from fljax import datasets
from tests.fashion import needs_fashion_mnist


def test_shipped_prior_loads_and_denoises():
  files = {p.name: p.stat().st_size for p in prior_lib.MNIST_PRIOR.iterdir()}
  assert {"unet.json", "schedule.json", "params.msgpack", "config.json"} <= set(files)
  assert files["params.msgpack"] <= 20 * 2 ** 20
  p = prior_lib.load()
  assert p.unet_config.input_shape == (32, 32, 1) and p.num_classes == 10
  assert p.unet_config.num_class_embeds == 11 and p.prediction == "epsilon"
  # Held-out test digits, noised: the prior predicts the noise far better than chance (1.0).
  ds = datasets.load("mnist", image_size=32, channels=1, test_subset=20)
  x0 = training.to_model_range(jnp.asarray(ds.x_test[:4]))
  noise = jax.random.normal(jax.random.key(0), x0.shape)
  t = jnp.array([100, 300, 500, 700])
  x_t = schedules.q_sample(p.schedule, x0, t, noise)
  eps = jax.jit(p.denoiser(jnp.asarray(ds.y_test[:4])))(x_t, t)
  assert float(jnp.mean((eps - noise) ** 2)) < 0.1


def test_the_fashion_mnist_prior_loads_samples_and_saw_its_training_split_only():
  from diffusion import evaluation
  from inversion import held_out
  folder = prior_lib.shipped("fashion_mnist")
  assert (folder / "params.msgpack").stat().st_size <= 20 * 2 ** 20
  p = prior_lib.load(folder)
  assert p.unet_config.input_shape == (32, 32, 1) and p.num_classes == 10
  images = evaluation.generate(p, np.arange(4), key=jax.random.key(0), num=4, num_steps=5)
  assert images.shape == (4, 32, 32, 1) and bool(np.isfinite(images).all())
  assert images.min() >= 0.0 and images.max() <= 1.0 and float(images.std()) > 0.05
  seen = held_out.training_data(folder)
  assert seen == held_out.TrainingData(name="fashion_mnist", split="train", image_size=32,
                                       channels=1, subset=None)
  held_out.check(seen, dataset="fashion_mnist", split="test")


@needs_fashion_mnist
def test_the_fashion_mnist_prior_denoises_held_out_test_images():
  p = prior_lib.load(prior_lib.shipped("fashion_mnist"))
  ds = datasets.load("fashion_mnist", image_size=32, channels=1, train_subset=10,
                     test_subset=20)
  x0 = training.to_model_range(jnp.asarray(ds.x_test[:4]))
  noise = jax.random.normal(jax.random.key(0), x0.shape)
  t = jnp.array([100, 300, 500, 700])
  eps = jax.jit(p.denoiser(jnp.asarray(ds.y_test[:4])))(
      schedules.q_sample(p.schedule, x0, t, noise), t)
  assert float(jnp.mean((eps - noise) ** 2)) < 0.1


def test_a_missing_prior_names_the_command_that_trained_the_shipped_one(tmp_path, monkeypatch):
  readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
  assert set(prior_lib.SHIPPED_STEPS) == set(prior_lib.SHIPPED)
  for name, steps in prior_lib.SHIPPED_STEPS.items():
    monkeypatch.setitem(prior_lib.SHIPPED, name, tmp_path / name)
    with pytest.raises(prior_lib.PriorError, match=rf"{name} diffusion prior is not trained "
                                                   rf"yet: python .*--steps {steps}, then"):
      prior_lib.shipped(name)
    # the README's table of shipped weights gives the same number of steps
    assert any(f"--steps {steps}`" in line for line in readme.splitlines()
               if f"diffusion UNet | `diffusion/priors/{name}32`" in line)
