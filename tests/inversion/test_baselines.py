"""Tests of inversion/baselines.py on tiny shapes: hand-computed PSNRs, the exact nearest
image, and the prior-only sample of a tiny exact class-conditional prior."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import schedules
from fljax import federated as fed
from fljax.partitions import Batch
from inversion import baselines, gan as gan_lib, observation as ob
from inversion.attacks import diffusion_guided as dg

SHAPE = (4, 4, 1)
K = 10


def _images(n, seed=0):
  return np.random.default_rng(seed).uniform(0.0, 1.0, (n,) + SHAPE).astype(np.float32)


def test_blank_and_mean_image_scores_equal_hand_computed_psnr():
  x = np.full((2, 1) + SHAPE, 0.5, np.float32)
  x[1] = 0.25
  train = np.stack([np.full(SHAPE, 0.2, np.float32), np.full(SHAPE, 0.4, np.float32)])
  out = baselines.evaluate(x, train)
  # blank: MSE = 0.25 and 0.0625; mean image 0.3: MSE = 0.04 and 0.0025
  assert np.allclose(out["blank"]["psnr"], [10 * np.log10(4), 10 * np.log10(16)], atol=1e-4)
  assert np.allclose(out["mean_image"]["psnr"], [10 * np.log10(25), 10 * np.log10(400)],
                     atol=1e-4)
  assert np.allclose(baselines.mean_image(train), 0.3)
  assert all(len(v) == 2 for name in ("blank", "mean_image") for v in out[name].values())


def test_nearest_training_finds_a_victim_that_is_in_the_set_and_caps_its_psnr():
  train = _images(50)
  x = np.stack([train[[7, 31]], _images(2, seed=1)])  # victim 0's two images are in the set
  for chunk in (1, 8, 1024):
    nearest, index = baselines.nearest_training(x, train, chunk=chunk)
    assert index[0].tolist() == [7, 31]
    assert np.array_equal(nearest[0], x[0])
  brute = ((x.reshape(4, 1, -1) - train.reshape(1, 50, -1)) ** 2).mean(-1).argmin(-1)
  assert index.ravel().tolist() == brute.tolist()
  out = baselines.evaluate(x, train, chunk=8)
  # per image, victim by victim: victim 0's two images are exact, victim 1's are not
  assert out["nearest_training"]["psnr"][:2] == [baselines.PSNR_CAP] * 2
  assert out["nearest_training"]["ssim"][:2] == pytest.approx([1.0, 1.0])
  assert max(out["nearest_training"]["psnr"][2:]) < baselines.PSNR_CAP
  assert out["nearest_training"]["index"] == index.tolist()
  json.loads(json.dumps(out, allow_nan=False))  # plain, finite JSON


def test_score_matches_each_victims_batch_before_scoring():
  x = _images(4).reshape((2, 2) + SHAPE)
  swapped = x[:, ::-1]
  out = baselines.score(swapped, x)
  assert out["psnr"] == [baselines.PSNR_CAP] * 4  # one per image, victim by victim
  assert np.allclose(out["ssim"], 1.0)


def test_cap_psnr():
  assert baselines.cap_psnr([np.inf, 150.0, 12.5]).tolist() == [100.0, 100.0, 12.5]


@pytest.mark.parametrize("call, message", [
    (lambda: baselines.evaluate(_images(2), _images(3)), r"\[V, B, H, W, C\]"),
    (lambda: baselines.nearest_training(_images(2)[None], _images(3)[..., :2, :]), "image shape"),
    (lambda: baselines.nearest_training(_images(2)[None], _images(3), chunk=0), "chunk"),
    (lambda: baselines.score(_images(2)[None], _images(3)[None]), "differ in shape"),
])
def test_input_errors(call, message):
  with pytest.raises(ValueError, match=message):
    call()


@dataclasses.dataclass(frozen=True)
class ClassGaussianPrior:
  """x0 ~ N(mu_y, s^2 I) with a mean per class: the exact denoiser of a conditional prior."""

  s: float = 0.05
  image_shape: tuple = SHAPE
  num_classes: int = K
  prediction: str = "epsilon"
  schedule: schedules.Schedule = dataclasses.field(default_factory=lambda: schedules.linear(1000))

  @staticmethod
  def mean(labels):
    return -0.8 + 0.16 * labels  # in the prior's [-1, 1] range

  def denoiser(self, labels=None, *, guidance_weight=0.0):
    def eps(x, t):
      abar = self.schedule.alpha_bars[t].reshape((-1,) + (1,) * (x.ndim - 1))
      mu = self.mean(labels).reshape((-1,) + (1,) * (x.ndim - 1))
      gain = jnp.sqrt(abar) * self.s ** 2 / (abar * self.s ** 2 + 1 - abar)
      x0 = mu + gain * (x - jnp.sqrt(abar) * mu)
      return (x - jnp.sqrt(abar) * x0) / jnp.sqrt(1 - abar)
    return eps


def linear_apply(params, x):
  return x.reshape(x.shape[0], -1) @ params["kernel"] + params["bias"]


def test_prior_only_samples_at_the_inferred_labels_and_spends_no_double_backward():
  params = {"kernel": 0.1 * jax.random.normal(jax.random.key(0), (int(np.prod(SHAPE)), K)),
            "bias": jnp.zeros(K)}
  threat = ob.ThreatModel(batch_size=1, input_shape=SHAPE, num_classes=K)
  client_update = fed.make_client_update(fed.make_loss_fn(linear_apply),
                                         fed.FedConfig(algorithm="fedsgd"))
  y = jnp.asarray([[3], [8], [0]])
  x = jnp.asarray(_images(3)[:, None])

  def observe(xi, yi, k):
    return ob.observe(client_update, params, Batch(x=xi, y=yi, mask=jnp.ones(1)), k,
                      threat).update

  updates = jax.vmap(observe)(x, y, jax.random.split(jax.random.key(1), 3))
  obs = ob.Observation(update=updates, params=params)
  cfg = dg.DiffusionAttackConfig(num_steps=6, labels="idlg", scale=50.0, refine_steps=3)
  out = baselines.prior_only(linear_apply, threat, ClassGaussianPrior(), obs,
                             key=jax.random.key(2), cfg=cfg, mode="vmap")
  assert out.x.shape == (3, 1) + SHAPE
  assert out.y.tolist() == y.tolist()  # iDLG's labels, as the attack infers them
  expected = (ClassGaussianPrior.mean(np.asarray(y, np.float32)) + 1) / 2
  assert np.allclose(out.x.mean(axis=(2, 3, 4)), expected, atol=0.05)
  assert out.counts[:, 1].tolist() == [0, 0, 0]  # no double-backward evaluation
  assert out.counts[:, 2].tolist() == [6, 6, 6]  # one prior evaluation per step, no refinement
  again = baselines.prior_only(linear_apply, threat, ClassGaussianPrior(), obs,
                               key=jax.random.key(2), cfg=cfg, mode="map")
  assert np.allclose(again.x, out.x, atol=1e-5)
  scores = baselines.evaluate(np.asarray(x), _images(5), samples={"prior_only": out.x})
  assert len(scores["prior_only"]["psnr"]) == 3


def test_gan_sample_shapes_and_range():
  gan = gan_lib.GAN(gan_lib.GANConfig(latent_dim=8, base=4, channels=1),
                    gan_lib.init(gan_lib.GANConfig(latent_dim=8, base=4, channels=1),
                                 key=jax.random.key(0))[0])
  threat = ob.ThreatModel(batch_size=2, input_shape=(32, 32, 3), num_classes=K)
  out = baselines.gan_sample(gan, threat, 3, key=jax.random.key(1))
  assert out.shape == (3, 2, 32, 32, 3)
  assert out.min() >= 0 and out.max() <= 1
  assert np.array_equal(out[..., 0], out[..., 2])  # grayscale replicated to RGB
  assert not np.allclose(out[0, 0], out[1, 0])
