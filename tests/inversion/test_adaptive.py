"""The adaptive attacker's processing of forward-noised updates, and its place in the
experiment: rescaling undoes the forward step, averaging k rounds divides the noise
variance by k, A0 at z = 0 reproduces the undefended attack, bad pipelines are rejected."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fljax import federated as fed
from fljax import models
from inversion import adaptive, engine, experiment, specs
from privacy import forward_noise as fn

TINY = dict(data=specs.DataSpec(name="digits", image_size=None, channels=None),
            victims=specs.VictimsConfig(num=2),
            attack=specs.AttackSpec(name="idlg", optimizer="adam", steps=5), chunk=5,
            feature_metric=False)


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def test_parse_reads_pipelines_and_rejects_unknown_steps():
  assert adaptive.parse("none") == () and adaptive.parse("rescale+wiener") == ("rescale", "wiener")
  with pytest.raises(ValueError, match="unknown denoising step"):
    adaptive.parse("rescale+blur")
  with pytest.raises(ValueError, match="unknown denoising step"):
    specs.AttackSpec(name="dps", denoise="median")


def test_rescale_undoes_the_forward_step_and_average_divides_the_variance():
  z, c, k, d = 0.5, 1.0, 8, 4000
  u = {"w": jnp.full((d,), 0.01)}  # norm 0.63 < C: unclipped
  raw = fn.ForwardNoise(clip_norm=c, schedule=fn.constant(z, 1), rescale=False).defense()
  keys = jax.random.split(jax.random.key(0), k)
  ys = jax.vmap(lambda key: jax.tree.map(lambda a: a[None], raw(u, key, 0)))(keys)  # [k, 1, d]
  noise = adaptive.DeclaredNoise(sigma=z * c, clip_norm=c, scale=math.sqrt(fn.alpha_bar_of(z)))
  one, sigma1 = adaptive.process(ys, ("rescale",), noise, batch_size=1)
  assert sigma1 == z * c
  assert np.std(_flat(one) - 0.01) == pytest.approx(z * c, rel=0.05)
  avg, sigma_k = adaptive.process(ys, ("rescale", "average"), noise, batch_size=1)
  assert sigma_k == pytest.approx(z * c / math.sqrt(k))
  assert np.var(_flat(avg) - 0.01) == pytest.approx((z * c) ** 2 / k, rel=0.1)
  with pytest.raises(ValueError, match="surrogate"):
    adaptive.process(ys, ("wiener",), noise, batch_size=1)


def test_a0_at_z0_reproduces_the_undefended_attack():
  # z = 0 with a clip norm that never binds sends the update unchanged, so the naive attack
  # (same victims, same keys) sees exactly the undefended observation.
  cfg = specs.InversionConfig(**TINY, defense=specs.DefenseSpec(name="forward_noise",
                                                          noise_multiplier=0.0, clip_norm=1e6))
  ds, x, y, *_ = engine.load_victims(cfg.data, cfg.victims.num, 1, key=jax.random.key(0))
  model = models.make("lenet", num_classes=ds.num_classes, input_shape=ds.image_shape)
  params = model.init(jax.random.key(1))
  threat = engine.threat_model(cfg.threat, ds, "forward_noise")
  key = jax.random.key(2)
  plain = engine.observe_all(model, params, x, y, threat, fed.identity_defense, key=key)
  defense = specs.DEFENSES["forward_noise"](cfg.defense)
  z0 = engine.observe_all(model, params, x, y, threat, defense, key=key)
  np.testing.assert_array_equal(_flat(z0.update), _flat(plain.update))
  processed, extra = experiment.adaptive_processing(cfg, model, params, ds, x, y, threat,
                                                    defense, z0, key=key)
  np.testing.assert_array_equal(_flat(processed.update), _flat(plain.update))
  assert extra["update_cosine"] == pytest.approx(1.0, abs=1e-6) and "mu_per_upload" not in extra


def test_adaptive_pipeline_runs_in_the_experiment_and_reports_the_ceiling(tmp_path):
  cfg = specs.InversionConfig(
      **{**TINY, "attack": specs.AttackSpec(name="idlg", optimizer="adam", steps=5,
                                         denoise="rescale+average+pca", rounds=3, surrogates=8,
                                         pca_rank=4)},
      defense=specs.DefenseSpec(name="forward_noise", noise_multiplier=0.5, clip_norm=1.0))
  summary = experiment.run(cfg, tmp_path / "run", progress=False)
  assert summary["mu_per_upload"] == pytest.approx(2 * math.sqrt(3) / 0.5)
  assert summary["rero_bound_kappa_1e-3"] == pytest.approx(
      fn.rero_bound(summary["mu_per_upload"], 1e-3))
  assert -1 <= summary["update_cosine"] <= 1 and summary["denoise"] == "rescale+average+pca"
