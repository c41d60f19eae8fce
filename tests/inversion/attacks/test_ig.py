"""Tests of inversion/attacks/ig.py and the restart selector."""

import jax
import numpy as np
import jax.numpy as jnp
import pytest

from fljax import federated as fed
from fljax import models
from fljax.partitions import Batch
from inversion import metrics
from inversion import observation as ob
from inversion.attacks import best, ig
from tests.inversion.counting import counting_forward

SHAPE = (8, 8, 1)


def _observation(batch_size, labels_known=False):
  model = models.make("lenet", num_classes=10, input_shape=SHAPE, init="uniform")
  params = model.init(jax.random.key(0))
  threat = ob.ThreatModel(batch_size=batch_size, input_shape=SHAPE, labels_known=labels_known)
  client_update = fed.make_client_update(fed.make_loss_fn(model.apply),
                                         fed.FedConfig(algorithm="fedsgd"))
  x = jax.random.uniform(jax.random.key(5), (batch_size,) + SHAPE)
  y = jnp.arange(batch_size) + 3
  obs = ob.observe(client_update, params, Batch(x=x, y=y, mask=jnp.ones(batch_size)),
                   jax.random.key(1), threat)
  return model, threat, x, obs


def _run(attack, obs, keys, steps):
  def run(key):
    state = attack.init(key, obs)
    state, _ = jax.lax.scan(lambda s, _: attack.step(s, obs), state, None, length=steps)
    return state
  return jax.jit(jax.vmap(run))(keys)


def test_inverting_gradients_with_restarts_recovers_one_image():
  model, threat, x, obs = _observation(1)
  states = _run(ig.make(model.apply, threat, ig.IGConfig(steps=400)), obs,
                jax.random.split(jax.random.key(3), 3), 400)
  chosen = best(states, states.loss)
  assert float(chosen.loss) == float(states.loss.min())  # chosen by the matching loss only
  assert int(chosen.y[0]) == 3
  assert float(metrics.psnr(chosen.x, x)[0]) > 25
  assert float(chosen.x.min()) >= 0 and float(chosen.x.max()) <= 1  # box constraint


def test_inverting_gradients_with_known_labels_on_a_batch():
  model, threat, x, obs = _observation(2, labels_known=True)
  states = _run(ig.make(model.apply, threat, ig.IGConfig(steps=300, labels="known")), obs,
                jax.random.split(jax.random.key(3), 1), 300)
  first = ig.make(model.apply, threat, ig.IGConfig(steps=300, labels="known")).init(
      jax.random.key(3), obs)
  assert float(states.loss[0]) < 0.2 * float(first.loss)
  scores = metrics.score(states.x[0], x)
  assert scores["mean_psnr"] > 12


def test_best_skips_non_finite_losses():
  states = {"x": jnp.arange(3.0)}
  assert float(best(states, jnp.array([jnp.nan, 2.0, 1.0]))["x"]) == 2.0
  with pytest.raises(ValueError, match="labels='known'"):
    ig.make(lambda p, x: x, ob.ThreatModel(batch_size=2))


def test_every_evaluation_is_charged_once(monkeypatch):
  model, threat, _, obs = _observation(1)
  calls = []
  monkeypatch.setattr(ig, "forward", counting_forward(lambda x: calls.append(np.asarray(x).tobytes())))
  attack = ig.make(model.apply, threat, ig.IGConfig(steps=5))
  state = attack.init(jax.random.key(3), obs)
  step = jax.jit(attack.step)
  for _ in range(5):
    state, _ = step(state, obs)
  jax.effects_barrier()
  grad, double_backward, prior = (int(c) for c in state.counts)
  assert (grad, double_backward, prior) == (1, 5, 0)  # the initial loss, one per step
  assert len(calls) == grad + double_backward
