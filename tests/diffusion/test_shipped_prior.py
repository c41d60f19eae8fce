"""The MNIST prior that ships in the repository (see docs/diffusion.md: how it was trained)."""

import jax
import jax.numpy as jnp

from diffusion import prior as prior_lib
from diffusion import schedules, training
from fljax import datasets


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
