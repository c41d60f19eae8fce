"""Tests of inversion/attacks/gifd.py and the DCGAN of inversion/gan.py (tiny, untrained)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fljax import federated as fed
from fljax import models
from fljax.partitions import Batch
from inversion import engine
from inversion import gan as gan_lib
from inversion import objectives
from inversion import observation as ob
from inversion.attacks import gifd
from inversion.specs import AttackPlan

SHAPE = (32, 32, 1)
TINY = gan_lib.GANConfig(latent_dim=8, base=4, channels=1)


@pytest.fixture(scope="module")
def gan():
  """The tiny untrained generator, its batch-norm statistics set from a batch of latents
  (at the initial statistics its images are constant to 1e-6 and no search moves them)."""
  variables, _ = gan_lib.init(TINY, key=jax.random.key(0))
  z = jax.random.normal(jax.random.key(5), (64, TINY.latent_dim))
  generator = gan_lib.Generator(TINY)
  for _ in range(60):
    _, stats = generator.apply(variables, z, train=True, mutable=["batch_stats"])
    variables = {**variables, **stats}
  return gan_lib.GAN(TINY, variables)


@pytest.fixture(scope="module")
def victim():
  model = models.make("mlp", num_classes=10, input_shape=SHAPE)
  params = model.init(jax.random.key(1))
  threat = ob.ThreatModel(batch_size=1, input_shape=SHAPE)
  client_update = fed.make_client_update(fed.make_loss_fn(model.apply),
                                         fed.FedConfig(algorithm="fedsgd"))
  x = jax.random.uniform(jax.random.key(2), (1,) + SHAPE)
  obs = ob.observe(client_update, params, Batch(x=x, y=jnp.array([4]), mask=jnp.ones(1)),
                   jax.random.key(3), threat)
  return model, threat, obs


def test_generator_stages_compose_to_the_whole_network(gan):
  z = jax.random.normal(jax.random.key(0), (2, TINY.latent_dim))
  whole = gan_lib.generate(gan, gan.variables, z)
  f = z
  for k in range(gan_lib.NUM_STAGES - 1):
    f = gan_lib.generate(gan, gan.variables, f, start=k, upto=k + 1)
    assert f.shape[1:] == TINY.stage_shape(k + 1)
  np.testing.assert_allclose(gan_lib.generate(gan, gan.variables, f, start=3), whole, atol=1e-5)
  assert whole.shape == (2,) + SHAPE and float(jnp.abs(whole).max()) <= 1


def test_save_and_load_round_trip(gan, tmp_path):
  gan_lib.save(gan, tmp_path / "g")
  loaded = gan_lib.load(tmp_path / "g")
  assert loaded.config == TINY
  for a, b in zip(jax.tree.leaves(gan.variables), jax.tree.leaves(loaded.variables)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(gan_lib.GANError, match="train_gan.py"):
    gan_lib.load(tmp_path / "missing")


def _run(attack, obs, key):
  state = attack.init(key, obs)
  trace = []
  for step, n, _ in attack.phases:
    state, metrics = jax.lax.scan(lambda s, _: step(s, obs), state, None, length=n)
    trace.append(metrics["loss"])
  return state, trace


def test_stage_zero_loss_decreases_and_the_best_stage_is_selected(gan, victim):
  model, threat, obs = victim
  cfg = gifd.GIFDConfig(latent_steps=60, feature_steps=20, stages=2, radii=(0.5, 0.5),
                        labels="idlg")
  attack = gifd.make(model.apply, threat, gan, cfg)
  state, trace = jax.jit(lambda k: _run(attack, obs, k))(jax.random.key(0))
  stage0 = np.asarray(trace[0])
  assert stage0.min() < 0.999 * stage0[0]  # the latent search moves the images
  # The stage scores are the losses the transition steps closed each stage with.
  closed = [float(trace[i][0]) for i in (1, 3)] + [float(trace[-1][0])]
  assert float(state.loss) <= min(closed[:-1]) + 1e-6
  match = objectives.matching("cosine")
  update_of = ob.forward(model.apply, threat)
  recomputed = match(update_of(obs.params, state.x, jax.nn.one_hot(state.y, 10)), obs.update)
  np.testing.assert_allclose(recomputed, state.loss, rtol=1e-4)
  assert int(state.counts[1]) == 60 + 2 * 20


def test_the_last_stage_is_scored_when_the_budget_ends(gan, victim):
  model, threat, obs = victim
  # Kernels 10x DCGAN's N(0, 0.02) init, whose untrained image barely depends on its input.
  gan = gan_lib.GAN(TINY, {**gan.variables, "params": jax.tree.map(
      lambda w: 10 * w if w.ndim > 1 else w, gan.variables["params"])})
  cfg = gifd.GIFDConfig(latent_steps=12, feature_steps=6, stages=1, radii=(0.5,), lr=0.3,
                        labels="idlg")
  attack = gifd.make(model.apply, threat, gan, cfg)
  key = jax.random.key(4)
  rows = ob.Observation(update=jax.tree.map(lambda a: a[None], obs.update), params=obs.params,
                        labels=None)
  update_of, match = ob.forward(model.apply, threat), objectives.matching("cosine")

  def score(state, k):  # stage k's final iterate, rendered and matched afresh
    x = (gan_lib.generate(gan, gan.variables, state.domains[k], start=k) + 1) / 2
    return float(match(update_of(obs.params, x, jax.nn.one_hot(state.y, 10)), obs.update))

  initial = float(attack.init(key, obs).loss)
  # The budget ends with the last optimisation step, then inside stage 0.
  for budget in (cfg.latent_steps + cfg.feature_steps, 3):
    plan = AttackPlan(attack, gifd.labels, cfg.num_steps, budget)
    state = jax.tree.map(lambda a: a[0], engine.attack_batched(plan, rows, key[None], mode="map"))
    assert int(state.counts[1]) == budget and int(state.stage) == cfg.stages
    scores = [score(state, k) for k in range(cfg.stages + 1)]
    # The last stage's final iterate was scored, and the best of all stages kept.
    np.testing.assert_allclose(float(state.current_loss), scores[-1], rtol=1e-5)
    np.testing.assert_allclose(float(state.loss), min([initial] + scores), rtol=1e-5)
    best = int(state.best_stage)  # stage 0 is best when nothing beat the initial image
    assert np.isclose(float(state.loss), scores[best], rtol=1e-5) or (
        best == 0 and np.isclose(float(state.loss), initial, rtol=1e-5))


def test_feature_deviation_stays_in_its_l1_ball(gan, victim):
  model, threat, obs = victim
  cfg = gifd.GIFDConfig(latent_steps=5, feature_steps=10, stages=1, radii=(0.05,), lr=1.0,
                        labels="idlg")
  attack = gifd.make(model.apply, threat, gan, cfg)
  state, _ = jax.jit(lambda k: _run(attack, obs, k))(jax.random.key(1))
  start, now = state.anchors[0], state.domains[1]
  assert float(jnp.sum(jnp.abs(now - start))) <= 0.05 * float(jnp.sum(jnp.abs(start))) * (1 + 1e-4)
  assert float(jnp.sum(jnp.abs(now - start))) > 0


def test_bad_configurations_are_refused():
  with pytest.raises(ValueError, match="stages"):
    gifd.GIFDConfig(stages=4)
  with pytest.raises(ValueError, match="radii"):
    gifd.GIFDConfig(stages=3, radii=(0.1,))


def test_matching_losses_noise_aware_and_adaptive():
  a = {"w": jnp.array([1.0, 2.0, 0.0])}
  b = {"w": jnp.array([1.0, 0.0, 3.0])}
  np.testing.assert_allclose(objectives.matching("l2_noise_aware", noise_std=2.0)(a, b),
                             objectives.l2(a, b) / 8.0)
  pruned = objectives.matching("l2", adapt_to="prune")(a, b)  # entry 1 is zero in b: ignored
  np.testing.assert_allclose(pruned, 9.0)
  big = {"w": 10.0 * b["w"]}
  np.testing.assert_allclose(objectives.matching("l2", adapt_to="clip")(big, b), 0.0, atol=1e-5)
  with pytest.raises(ValueError, match="noise std"):
    objectives.matching("l2_noise_aware")



@pytest.mark.parametrize("steps", [1, 2, 5, 100])
def test_every_step_of_a_stage_has_a_positive_learning_rate(steps):
  """GIFD's ramp read at i / steps gave every stage's first step a rate of 0: an evaluation
  charged to the budget that moved nothing (at one step per stage lr had no effect)."""
  rates = [float(gifd.learning_rate(0.1, steps)(i)) for i in range(steps)]
  assert min(rates) > 0 and max(rates) <= 0.1 + 1e-7
  if steps == 100:  # the ILO shape: 5 % warm-up, then flat, cosine decay over the last 75 %
    assert rates[1] < rates[10] and rates[10] == pytest.approx(0.1) and rates[-1] < 0.01
