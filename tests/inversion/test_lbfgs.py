"""Tests of inversion/lbfgs.py: the iterates of torch.optim.LBFGS (transcribed in NumPy
below, `step()` by `step()` as torch runs it), one evaluation per iteration, the
convergence tests, and a tiny DLG problem solved."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fljax import federated as fed
from fljax import models
from fljax.partitions import Batch
from inversion import lbfgs, metrics, objectives
from inversion import observation as ob


def torch_lbfgs(f_grad, x0, steps, *, lr=1.0, max_iter=20, history_size=100,
                tolerance_grad=1e-7, tolerance_change=1e-9):
  """torch.optim.LBFGS(line_search_fn=None).step(closure) called `steps` times, in float64:
  the iterate after every iteration, and the closure calls made."""
  x = np.array(x0, np.float64)
  iterates, calls = [], 0
  n_iter_total, d, t, old_dirs, old_stps, ro, h_diag, prev_g = 0, None, None, [], [], [], 1.0, None
  for _ in range(steps):
    loss, g = f_grad(x)
    calls += 1
    if np.abs(g).max() <= tolerance_grad:
      continue  # step() returns at once
    n_iter = 0
    while n_iter < max_iter:
      n_iter += 1
      n_iter_total += 1
      if n_iter_total == 1:
        d, old_dirs, old_stps, ro, h_diag = -g, [], [], [], 1.0
      else:
        y, s = g - prev_g, d * t
        ys = y @ s
        if ys > 1e-10:
          if len(old_dirs) == history_size:
            old_dirs.pop(0), old_stps.pop(0), ro.pop(0)
          old_dirs.append(y), old_stps.append(s), ro.append(1.0 / ys)
          h_diag = ys / (y @ y)
        al = [0.0] * len(old_dirs)
        q = -g
        for i in range(len(old_dirs) - 1, -1, -1):
          al[i] = (old_stps[i] @ q) * ro[i]
          q = q - al[i] * old_dirs[i]
        r = q * h_diag
        for i in range(len(old_dirs)):
          r = r + (al[i] - (old_dirs[i] @ r) * ro[i]) * old_stps[i]
        d = r
      prev_g, prev_loss = g, loss
      t = min(1.0, 1.0 / np.abs(g).sum()) * lr if n_iter_total == 1 else lr
      if g @ d > -tolerance_change:
        break
      x = x + t * d
      iterates.append(x.copy())
      opt_cond = False
      if n_iter != max_iter:
        loss, g = f_grad(x)
        calls += 1
        opt_cond = np.abs(g).max() <= tolerance_grad
      if n_iter == max_iter or opt_cond or np.abs(d * t).max() <= tolerance_change \
          or abs(loss - prev_loss) < tolerance_change:
        break
  return iterates, calls


A = np.array([[3.0, 0.5, 0.0, 0.2], [0.5, 2.0, 0.3, 0.0], [0.0, 0.3, 1.5, 0.1],
              [0.2, 0.0, 0.1, 1.0]])
B = np.array([1.0, -2.0, 0.5, 3.0])


def quadratic_np(x):
  return 0.5 * x @ A @ x - B @ x, A @ x - B


def quadratic(p):
  x = jnp.concatenate([p["a"], p["b"]])
  return 0.5 * x @ jnp.asarray(A, jnp.float32) @ x - jnp.asarray(B, jnp.float32) @ x


def run(value_and_grad, params, iterations, cfg, jit=True):
  value, grad = value_and_grad(params)
  state = lbfgs.init(params, value, grad, cfg)
  update = lambda s: lbfgs.update(s, value_and_grad, cfg)  # noqa: E731
  update = jax.jit(update) if jit else update
  states = [state]
  for _ in range(iterations):
    states.append(update(states[-1]))
  return states


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("history_size", [100, 2])
def test_iterates_equal_torch_on_a_quadratic(history_size, jit):
  cfg = lbfgs.LBFGSConfig(lr=0.7, history_size=history_size)
  x0 = np.array([4.0, -3.0, 2.0, 5.0])
  expected, _ = torch_lbfgs(quadratic_np, x0, 3, lr=0.7, history_size=history_size)
  params = {"a": jnp.asarray(x0[:2], jnp.float32), "b": jnp.asarray(x0[2:], jnp.float32)}
  states = run(jax.value_and_grad(quadratic), params, 12, cfg, jit)
  for k in range(12):
    got = np.concatenate([states[k + 1].params["a"], states[k + 1].params["b"]])
    np.testing.assert_allclose(got, expected[k], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got, np.linalg.solve(A, B), atol=1e-3)


def rosenbrock_np(x):
  a, b = x[0], x[1]
  return ((1 - a) ** 2 + 100 * (b - a * a) ** 2,
          np.array([-2 * (1 - a) - 400 * a * (b - a * a), 200 * (b - a * a)]))


def test_iterates_equal_torch_on_rosenbrock_across_its_steps():
  """Past torch's 20 iterations per step() (its history carries over), with a small lr."""
  cfg = lbfgs.LBFGSConfig(lr=0.05, history_size=5)
  x0 = np.array([-1.2, 1.0])
  expected, calls = torch_lbfgs(rosenbrock_np, x0, 3, lr=0.05, history_size=5)
  assert len(expected) == 60 and calls == 60  # torch too makes one call per iteration
  f = lambda x: (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2  # noqa: E731
  states = run(jax.value_and_grad(f), jnp.asarray(x0, jnp.float32), 45, cfg)
  for k in range(45):
    np.testing.assert_allclose(states[k + 1].params, expected[k], rtol=2e-3, atol=2e-3)
  assert int(states[-1].evaluations) == 46  # init's and one per iteration


def test_one_evaluation_per_iteration_and_none_after_convergence():
  calls = []

  def value_and_grad(p):
    jax.debug.callback(lambda: calls.append(1))
    return jax.value_and_grad(quadratic)(p)

  params = {"a": jnp.array([4.0, -3.0]), "b": jnp.array([2.0, 5.0])}
  states = run(value_and_grad, params, 60, lbfgs.LBFGSConfig())
  assert bool(states[-1].done)  # converged (a gradient or a slope below torch's tolerances)
  done_at = next(k for k, s in enumerate(states) if bool(s.done))
  assert len(calls) == int(states[-1].evaluations) == int(states[done_at].evaluations)
  assert int(states[-1].iteration) == int(states[done_at].iteration) < 60
  np.testing.assert_array_equal(states[-1].params["a"], states[done_at].params["a"])


def test_an_unchanged_loss_ends_torchs_step_not_the_run():
  """The first step jumps across the bowl to a point of the same loss: torch's step() ends
  there (a loss change below 1e-9) and the next one evaluates that point again, adds the
  pair and lands on the minimum. The same iterates here, without the repeated evaluation."""
  f_np = lambda x: (np.sum((x - 3.0) ** 2), 2.0 * (x - 3.0))  # noqa: E731
  expected, calls = torch_lbfgs(f_np, np.full(2, 2.8), 5)
  np.testing.assert_allclose(expected, [[3.2, 3.2], [3.0, 3.0]])
  assert calls == 7  # 2 in each of the first two step()s, then 1 per step() at the minimum
  f = lambda x: jnp.sum((x - 3.0) ** 2)  # noqa: E731
  states = run(jax.value_and_grad(f), jnp.full(2, 2.8), 5, lbfgs.LBFGSConfig())
  np.testing.assert_allclose(states[1].params, expected[0], rtol=1e-6)
  np.testing.assert_allclose(states[-1].params, expected[1], rtol=1e-6)
  assert bool(states[2].done) and int(states[-1].evaluations) == 3


def test_a_zero_gradient_is_converged_at_init():
  state = lbfgs.init(jnp.zeros(3), 0.0, jnp.zeros(3))
  assert bool(state.done)
  new = lbfgs.update(state, lambda p: (jnp.sum(p), jnp.ones(3)))
  assert int(new.evaluations) == 1 and int(new.iteration) == 0


def test_bad_settings_are_refused():
  with pytest.raises(ValueError, match="lr > 0 and history_size >= 1"):
    lbfgs.LBFGSConfig(lr=0.0)
  with pytest.raises(ValueError, match="lr > 0 and history_size >= 1"):
    lbfgs.LBFGSConfig(history_size=0)


def test_solves_a_tiny_gradient_inversion():
  shape = (8, 8, 1)
  model = models.make("lenet", num_classes=10, input_shape=shape, init="uniform")
  params = model.init(jax.random.key(0))
  threat = ob.ThreatModel(input_shape=shape)
  client_update = fed.make_client_update(fed.make_loss_fn(model.apply),
                                         fed.FedConfig(algorithm="fedsgd"))
  x = jax.random.uniform(jax.random.key(5), (1,) + shape)
  obs = ob.observe(client_update, params, Batch(x=x, y=jnp.array([3]), mask=jnp.ones(1)),
                   jax.random.key(1), threat)
  update_of = ob.forward(model.apply, threat)
  probs = jax.nn.one_hot(jnp.array([3]), 10)
  loss = lambda z: objectives.l2(update_of(params, z, probs), obs.update)  # noqa: E731
  states = run(jax.value_and_grad(loss), jax.random.uniform(jax.random.key(2), x.shape),
               300, lbfgs.LBFGSConfig())
  assert float(metrics.psnr(jnp.clip(states[-1].params, 0, 1), x)[0]) > 30
  assert int(states[-1].evaluations) <= 301
