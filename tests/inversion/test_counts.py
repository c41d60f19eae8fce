"""The evaluation counters of the generative attacks (`inversion.attacks.COUNTERS`) count what
runs: the victim's client update and the prior network are wrapped so that every evaluation
executed passes through a `jax.debug.callback` tally, and each attack runs by the driver's
engine under a budget that stops it partway (lax.map: a step skipped is not executed)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import schedules
from fljax import federated as fed
from fljax import models
from fljax.partitions import Batch
from inversion import engine
from inversion import gan as gan_lib
from inversion import observation as ob
from inversion.attacks import diffusion_guided as dg
from inversion.attacks import gifd
from inversion.specs import AttackPlan
from tests.inversion.counting import counting_forward


class Tally:
  """Counts executed evaluations by name, from inside compiled code."""

  def __init__(self):
    self.counts = {"victim": 0, "prior": 0}

  def __call__(self, name):
    def bump():
      self.counts[name] += 1
    return lambda: jax.debug.callback(bump)


@pytest.fixture
def tally(monkeypatch):
  """Wraps the attacks' forward operator (the victim's client update) in a tally."""
  t = Tally()

  def bump(x):
    t.counts["victim"] += 1

  counting = counting_forward(bump)
  monkeypatch.setattr(dg, "forward", counting)
  monkeypatch.setattr(gifd, "forward", counting)
  return t


def _observation(apply_fn, params, shape):
  threat = ob.ThreatModel(batch_size=1, input_shape=shape, num_classes=10)
  client_update = fed.make_client_update(fed.make_loss_fn(apply_fn),
                                         fed.FedConfig(algorithm="fedsgd"))
  x = jax.random.uniform(jax.random.key(2), (1,) + shape)
  o = ob.observe(client_update, params, Batch(x=x, y=jnp.array([3]), mask=jnp.ones(1)),
                 jax.random.key(3), threat)
  rows = ob.Observation(update=jax.tree.map(lambda a: jnp.stack([a, 0.5 * a]), o.update),
                        params=params, labels=None)  # two victims
  return threat, rows


def _run(plan, rows):
  states = engine.attack_batched(plan, rows, jax.random.split(jax.random.key(0), 2), mode="map")
  return np.asarray(states.counts).sum(axis=0)


@dataclasses.dataclass(frozen=True)
class CountedPrior:
  """N(0, 0.36 I) images: the exact denoiser, each call tallied."""

  seen: object
  image_shape: tuple = (4, 4, 1)
  num_classes: int = 0
  prediction: str = "epsilon"
  schedule: schedules.Schedule = dataclasses.field(default_factory=lambda: schedules.linear(1000))

  def denoiser(self, labels=None, *, guidance_weight=0.0):
    def eps(x, t):
      self.seen()
      abar = self.schedule.alpha_bars[t].reshape((-1, 1, 1, 1))
      x0 = jnp.sqrt(abar) * 0.36 / (abar * 0.36 + 1 - abar) * x
      return (x - jnp.sqrt(abar) * x0) / jnp.sqrt(1 - abar)
    return eps


def _linear(params, x):
  return x.reshape(x.shape[0], -1) @ params["out"]["kernel"] + params["out"]["bias"]


@pytest.mark.parametrize("variant", [
    dict(mode="dps"), dict(mode="dps_nojac"), dict(mode="ggdm"), dict(mode="dps", refine_steps=4),
    dict(mode="dps", gradient_weight=0.0)])
def test_diffusion_attacks_count_every_evaluation_once(tally, variant):
  shape = (4, 4, 1)
  params = {"out": {"kernel": 0.1 * jax.random.normal(jax.random.key(1), (16, 10)),
                    "bias": jnp.zeros(10)}}
  threat, rows = _observation(_linear, params, shape)
  cfg = dg.DiffusionAttackConfig(num_steps=6, feature_weight=0.0, **variant)
  attack = dg.make(_linear, threat, CountedPrior(tally("prior")), cfg)
  budget = 7  # stops inside the refinement, or (without one) leaves the sampler whole
  grad, double, nfe = _run(AttackPlan(attack, dg.labels, 6 + cfg.refine_steps, budget), rows)
  planned = 6 * (cfg.gradient_weight > 0) + cfg.refine_steps  # a prior-only sampler spends none
  assert double == 2 * min(budget, planned)
  assert grad + double == tally.counts["victim"]
  assert nfe == tally.counts["prior"] == 2 * 6


def test_gifd_counts_every_evaluation_once(tally, monkeypatch):
  shape = (32, 32, 1)
  model = models.make("mlp", num_classes=10, input_shape=shape)
  threat, rows = _observation(model.apply, model.init(jax.random.key(1)), shape)
  config = gan_lib.GANConfig(latent_dim=8, base=4, channels=1)
  gan = gan_lib.GAN(config, gan_lib.init(config, key=jax.random.key(0))[0])
  generate, seen = gan_lib.generate, tally("prior")

  def counted_generate(*args, **kwargs):
    seen()
    return generate(*args, **kwargs)
  monkeypatch.setattr(gan_lib, "generate", counted_generate)
  cfg = gifd.GIFDConfig(latent_steps=3, feature_steps=2, stages=1, radii=(0.5,), labels="idlg")
  attack = gifd.make(model.apply, threat, gan, cfg)
  grad, double, nfe = _run(AttackPlan(attack, gifd.labels, cfg.num_steps, 4), rows)
  assert double == 2 * 4  # the budget ends inside the feature stage
  assert grad + double == tally.counts["victim"]
  assert nfe == tally.counts["prior"]
