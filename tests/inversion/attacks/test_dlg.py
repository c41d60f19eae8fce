"""Tests of inversion/attacks/dlg.py and inversion/observation.py: DLG/iDLG converge on a
tiny model, batched equals looped, divergence is flagged, bad observations are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fljax import federated as fed
from fljax import models
from fljax.partitions import Batch
from inversion import engine, metrics, specs
from inversion import observation as ob
from inversion.attacks import dlg
from tests.inversion.counting import counting_forward

SHAPE = (8, 8, 1)


def _setup(batch_size=1, victims=1):
  model = models.make("lenet", num_classes=10, input_shape=SHAPE, init="uniform")
  params = model.init(jax.random.key(0))
  threat = ob.ThreatModel(batch_size=batch_size, input_shape=SHAPE, num_classes=10)
  client_update = fed.make_client_update(fed.make_loss_fn(model.apply),
                                         fed.FedConfig(algorithm="fedsgd"))
  xs = jax.random.uniform(jax.random.key(5), (victims, batch_size) + SHAPE)
  ys = jnp.arange(victims * batch_size).reshape(victims, batch_size) % 10
  obs = [ob.observe(client_update, params, Batch(x=x, y=y, mask=jnp.ones(batch_size)),
                    jax.random.key(1), threat) for x, y in zip(xs, ys)]
  return model, threat, xs, ys, obs


@pytest.mark.parametrize("optimizer,steps", [("adam", 300), ("lbfgs", 60), ("lbfgs_zoom", 60)])
def test_idlg_converges_to_the_victim(optimizer, steps):
  model, threat, xs, ys, (obs,) = _setup()
  attack = dlg.make(model.apply, threat, dlg.DLGConfig(optimizer=optimizer))
  state = attack.init(jax.random.key(2), obs)
  step = jax.jit(attack.step)
  for _ in range(steps):
    state, m = step(state, obs)
  assert int(dlg.labels(state)[0]) == int(ys[0, 0])
  assert float(metrics.psnr(jnp.clip(state.x, 0, 1), xs[0])[0]) > 30
  assert not bool(m["diverged"])


def test_dlg_with_optimised_labels_reduces_the_matching_loss():
  model, threat, _, _, (obs,) = _setup(batch_size=2)
  attack = dlg.make(model.apply, threat, dlg.DLGConfig(labels="optimise"))
  state = attack.init(jax.random.key(2), obs)
  first = float(state.loss)
  step = jax.jit(attack.step)
  for _ in range(100):
    state, _ = step(state, obs)
  assert float(state.loss) < 0.1 * first


@pytest.mark.parametrize("mode,optimizer,steps",
                         [("vmap", "adam", 20), ("map", "adam", 20), ("vmap", "lbfgs", 5)])
def test_batched_victims_equal_one_at_a_time(mode, optimizer, steps):
  model, threat, _, _, obs = _setup(victims=3)
  attack = dlg.make(model.apply, threat, dlg.DLGConfig(optimizer=optimizer))
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *obs)
  keys = jax.random.split(jax.random.key(7), 3)

  def run(key, o):
    state = attack.init(key, o)
    state, _ = jax.lax.scan(lambda s, _: attack.step(s, o), state, None, length=steps)
    return state.x

  batched = jax.jit(fed.batch_over(run, mode))(keys, stacked)
  single = jax.jit(run)
  for i in range(3):
    np.testing.assert_allclose(batched[i], single(keys[i], obs[i]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])  # lbfgs_zoom's line search steps 0
def test_divergence_is_flagged_the_iterate_kept_and_not_stepped_again(optimizer):
  model, threat, _, _, (obs,) = _setup()
  attack = dlg.make(model.apply, threat, dlg.DLGConfig(optimizer=optimizer))
  state = attack.init(jax.random.key(2), obs)
  bad = ob.Observation(update=jax.tree.map(lambda u: u * jnp.nan, obs.update), params=obs.params)
  new, m = attack.step(state, bad)
  assert bool(m["diverged"])
  np.testing.assert_array_equal(new.x, state.x)
  again, _ = attack.step(new, obs)
  np.testing.assert_array_equal(again.counts, new.counts)


@pytest.mark.parametrize("labels", ["idlg", "optimise"])
@pytest.mark.parametrize("optimizer", dlg.OPTIMIZERS)
def test_every_evaluation_is_charged_once_and_none_repeated(monkeypatch, optimizer, labels):
  model, threat, _, _, (obs,) = _setup()
  calls = []
  monkeypatch.setattr(dlg, "forward", counting_forward(lambda x: calls.append(np.asarray(x).tobytes())))
  attack = dlg.make(model.apply, threat, dlg.DLGConfig(optimizer=optimizer, labels=labels))
  state = attack.init(jax.random.key(2), obs)
  step = jax.jit(attack.step)
  for _ in range(6):
    state, _ = step(state, obs)
  jax.effects_barrier()
  grad, double_backward, prior = (int(c) for c in state.counts)
  assert len(calls) == grad + double_backward >= 7  # init's and at least one per step
  assert len(set(calls)) == len(calls)  # no point evaluated twice (a recomputation)
  assert prior == 0


def test_a_budget_is_spent_exactly_in_budget_minus_one_steps():
  model, threat, _, _, obs = _setup(victims=2)
  stacked = ob.Observation(update=jax.tree.map(lambda *a: jnp.stack(a), *[o.update for o in obs]),
                           params=obs[0].params)
  plan = specs.ATTACKS["idlg"](model, threat, specs.AttackSpec(optimizer="lbfgs", budget=12),
                               specs.DefenseSpec())
  assert (plan.steps, plan.budget) == (11, 12)  # the first evaluation is init's
  states = engine.attack_batched(plan, stacked, jax.random.split(jax.random.key(2), 2),
                                 mode="map")
  np.testing.assert_array_equal(np.asarray(states.counts)[:, 1], [12, 12])
  with pytest.raises(ValueError, match="needs --attack.budget >= 2 .* first evaluation and "):
    specs.ATTACKS["idlg"](model, threat, specs.AttackSpec(budget=1), specs.DefenseSpec())


def test_restart_starts_again_where_lbfgs_ends_and_reports_the_best_start():
  """An update made by the attack's own first guess: the loss and gradient are 0 there,
  so L-BFGS ends at init. Without restart the run idles; with it the next step is a fresh
  start (one evaluation), L-BFGS runs on from there, and the best start (the first, at
  loss 0) stays reported."""
  model, threat, _, ys, (obs,) = _setup()
  idle = dlg.make(model.apply, threat, dlg.DLGConfig())
  guess = idle.init(jax.random.key(2), obs).x
  client_update = fed.make_client_update(fed.make_loss_fn(model.apply),
                                         fed.FedConfig(algorithm="fedsgd"))
  own = ob.observe(client_update, obs.params, Batch(x=guess, y=ys[0], mask=jnp.ones(1)),
                   jax.random.key(1), threat)
  state, idle_step = idle.init(jax.random.key(2), own), jax.jit(idle.step)
  assert bool(state.opt_state.done) and float(state.loss) == 0.0
  assert int(idle_step(state, own)[0].counts[1]) == 1  # ended: nothing more is evaluated
  attack = dlg.make(model.apply, threat, dlg.DLGConfig(restart=True))
  state, step = attack.init(jax.random.key(2), own), jax.jit(attack.step)
  np.testing.assert_array_equal(state.x, guess)  # the same first guess as without restart
  for i in range(4):
    state, _ = step(state, own)
    assert int(state.counts[1]) == i + 2 and not bool(state.diverged)
  assert int(state.opt_state.iteration) == 3  # a fresh start, then 3 L-BFGS iterations
  assert float(jnp.max(jnp.abs(state.opt_state.params - guess))) > 0.1
  np.testing.assert_array_equal(state.x, guess)  # the best start is still reported
  assert float(state.loss) == 0.0 < float(state.opt_state.value)
  # on an ordinary update it steps exactly as the original until L-BFGS ends
  plain, again = idle.init(jax.random.key(3), obs), attack.init(jax.random.key(3), obs)
  for _ in range(3):
    plain, again = idle_step(plain, obs)[0], step(again, obs)[0]
  np.testing.assert_allclose(again.opt_state.params, plain.x, rtol=1e-6)
  with pytest.raises(ValueError, match="restart applies to optimizer lbfgs"):
    dlg.DLGConfig(optimizer="adam", restart=True)


def test_restart_after_starts_again_once_a_start_has_spent_its_evaluations():
  model, threat, _, _, (obs,) = _setup()
  attack = dlg.make(model.apply, threat, dlg.DLGConfig(restart=True, restart_after=3))
  state, step = attack.init(jax.random.key(4), obs), jax.jit(attack.step)
  starts = [state.opt_state.params]
  for i in range(6):  # evaluations 2..7: a start spends 3 (its init and two steps)
    state, _ = step(state, obs)
    assert int(state.counts[1]) == i + 2
    if int(state.opt_state.iteration) == 0:
      starts.append(state.opt_state.params)
  assert len(starts) == 3  # fresh starts at evaluations 4 and 7, each a new image
  assert all(float(jnp.max(jnp.abs(a - b))) > 0.1 for a, b in zip(starts, starts[1:]))
  assert float(state.loss) <= float(state.opt_state.value)  # the best start is reported
  for bad in (dict(restart_after=10), dict(restart=True, restart_after=1)):
    with pytest.raises(ValueError, match="restart_after needs restart"):
      dlg.DLGConfig(**bad)


def test_bad_observations_are_refused():
  model, threat, xs, ys, (obs,) = _setup()
  nan = ob.Observation(update=jax.tree.map(lambda u: u * jnp.nan, obs.update), params=obs.params)
  with pytest.raises(ValueError, match="NaN or inf"):
    ob.check(nan, threat)
  wrong = ob.Observation(update={"w": jnp.zeros(3)}, params=obs.params)
  with pytest.raises(ValueError, match="not shaped like"):
    ob.check(wrong, threat)
  client_update = fed.make_client_update(fed.make_loss_fn(model.apply),
                                         fed.FedConfig(algorithm="fedsgd"))
  two = Batch(x=jnp.concatenate([xs[0], xs[0]]), y=jnp.array([1, 2]), mask=jnp.ones(2))
  with pytest.raises(ValueError, match="declares batch size 1"):
    ob.observe(client_update, obs.params, two, jax.random.key(0), threat)
  with pytest.raises(ValueError, match="iDLG reads the label of a single example"):
    dlg.make(model.apply, ob.ThreatModel(batch_size=2, input_shape=SHAPE))


@pytest.mark.parametrize("local_batch_size", [4, 2])
def test_multi_step_objective_equals_fljax_fedavg_update(local_batch_size):
  model = models.make("lenet", num_classes=10, input_shape=SHAPE, init="uniform")
  params = model.init(jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (4,) + SHAPE)
  y = jnp.array([1, 5, 7, 2])
  threat = ob.ThreatModel(algorithm="fedavg", batch_size=4, input_shape=SHAPE, local_epochs=2,
                          local_batch_size=local_batch_size, local_lr=0.05)
  predicted = ob.forward(model.apply, threat)(params, x, jax.nn.one_hot(y, 10))
  if local_batch_size == 4:  # one batch per epoch: the client's shuffle does not matter
    cfg = fed.FedConfig(local_epochs=2, local_batch_size=4, local_lr=0.05)
    client_update = fed.make_client_update(fed.make_loss_fn(model.apply), cfg)
    sent, _ = client_update(params, Batch(x=x, y=y, mask=jnp.ones(4)), jax.random.key(3))
  else:  # several batches: compare with the same local SGD written out by hand
    loss_fn = fed.make_loss_fn(model.apply)
    p = params
    for _ in range(2):
      for s in (0, 2):
        g, _ = jax.grad(loss_fn, has_aux=True)(p, Batch(x=x[s:s + 2], y=y[s:s + 2],
                                                        mask=jnp.ones(2)), None)
        p = jax.tree.map(lambda w, d: w - 0.05 * d, p, g)
    sent = jax.tree.map(jnp.subtract, p, params)
  for a, b in zip(jax.tree.leaves(predicted), jax.tree.leaves(sent)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_idlg_on_a_one_step_fedavg_delta():
  model = models.make("lenet", num_classes=10, input_shape=SHAPE, init="uniform")
  params = model.init(jax.random.key(0))
  threat = ob.ThreatModel(algorithm="fedavg", batch_size=1, input_shape=SHAPE,
                          local_batch_size=1, local_lr=0.1)
  cfg = fed.FedConfig(local_epochs=1, local_batch_size=1, local_lr=0.1)
  client_update = fed.make_client_update(fed.make_loss_fn(model.apply), cfg)
  x = jax.random.uniform(jax.random.key(5), (1,) + SHAPE)
  obs = ob.observe(client_update, params, Batch(x=x, y=jnp.array([6]), mask=jnp.ones(1)),
                   jax.random.key(1), threat)
  attack = dlg.make(model.apply, threat)
  state = attack.init(jax.random.key(2), obs)
  assert int(dlg.labels(state)[0]) == 6
  step = jax.jit(attack.step)
  for _ in range(300):
    state, _ = step(state, obs)
  assert float(metrics.psnr(jnp.clip(state.x, 0, 1), x)[0]) > 30
