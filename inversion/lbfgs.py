"""L-BFGS as torch.optim.LBFGS runs it (Liu and Nocedal, Math. Programming 1989), one loss
evaluation per iteration: the optimiser of the original DLG code (Zhu et al., NeurIPS 2019).

DLG calls `torch.optim.LBFGS(params)` with torch's defaults: lr = 1, history of 100 pairs,
tolerance_grad = 1e-7, tolerance_change = 1e-9 and no line search: every iteration moves
by a fixed step t along the two-loop direction d, t = min(1, 1 / |g|_1) lr on the very first
iteration and lr afterwards, then evaluates the loss and its gradient once at the new point
(a pair (s, y) enters the history only when y.s > 1e-10; the initial inverse Hessian is
(y.s) / (y.y) of the newest pair). torch groups max_iter = 20 such iterations per
`step()`; its last one does not evaluate, and the next `step()` evaluates that very point
first, so over a run it too makes one evaluation per iteration. Here one `update` is one
iteration.

torch's tests end a `step()` early; the two after which torch can never move again end
the run here (`done`: the iterate is kept and nothing more is evaluated): every gradient
entry at most tolerance_grad in magnitude (also checked at `init`; torch's next `step()`
returns at once), and a direction whose slope g.d > -tolerance_change (tested before
moving, so nothing is evaluated; the next `step()` finds the same gradient, adds no pair
and takes the same direction). After the other two, a step |t d| or a loss change below
tolerance_change, torch's next `step()` evaluates the same point again and goes on with the
same history: here the run goes on without that repeated evaluation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

ValueAndGrad = Callable[[Any], tuple[jax.Array, Any]]  # params -> (loss, grad like params)

CURVATURE_EPS = 1e-10  # torch: a pair enters the history only when y.s exceeds this


@dataclasses.dataclass(frozen=True, kw_only=True)
class LBFGSConfig:
  """torch.optim.LBFGS's settings (its defaults, DLG's).

  Attributes:
    lr: the fixed step along the direction (the first scaled by min(1, 1 / |g|_1)).
    history_size: the (s, y) pairs kept.
    tolerance_grad: converged when every gradient entry is at most this in magnitude.
    tolerance_change: the run ends when the slope along the direction is above
      -tolerance_change.
  """

  lr: float = 1.0
  history_size: int = 100
  tolerance_grad: float = 1e-7
  tolerance_change: float = 1e-9

  def __post_init__(self):
    if self.lr <= 0 or self.history_size < 1:
      raise ValueError(f"L-BFGS needs lr > 0 and history_size >= 1, got lr={self.lr}, "
                       f"history_size={self.history_size}")


class LBFGSState(NamedTuple):
  """The iterate, the loss and gradient there, and the history (newest pair last).

  Attributes:
    params: the iterate (a pytree).
    value: the loss at `params`.
    grad: its gradient, shaped like `params`.
    s, y: `[m, n]` steps and gradient differences (flattened), empty rows first.
    rho: `[m]` 1 / (y.s), 0 for empty rows.
    h_diag: the scale of the initial inverse Hessian.
    iteration: iterations made.
    evaluations: loss evaluations made, `init`'s included.
    done: a convergence test fired; `update` leaves the state unchanged.
  """

  params: Any
  value: jax.Array
  grad: Any
  s: jax.Array
  y: jax.Array
  rho: jax.Array
  h_diag: jax.Array
  iteration: jax.Array
  evaluations: jax.Array
  done: jax.Array


def init(params: Any, value: jax.Array, grad: Any, cfg: LBFGSConfig = LBFGSConfig()
         ) -> LBFGSState:
  """The state at `params`, given the loss and gradient there (one evaluation, counted)."""
  flat, _ = ravel_pytree(params)
  g, _ = ravel_pytree(grad)
  m, n = cfg.history_size, flat.shape[0]
  return LBFGSState(params=params, value=jnp.asarray(value, flat.dtype), grad=grad,
                    s=jnp.zeros((m, n), flat.dtype), y=jnp.zeros((m, n), flat.dtype),
                    rho=jnp.zeros(m, flat.dtype), h_diag=jnp.ones((), flat.dtype),
                    iteration=jnp.zeros((), jnp.int32), evaluations=jnp.ones((), jnp.int32),
                    done=jnp.max(jnp.abs(g)) <= cfg.tolerance_grad)


def direction(g: jax.Array, s: jax.Array, y: jax.Array, rho: jax.Array, h_diag: jax.Array
              ) -> jax.Array:
  """The two-loop recursion: -H g for the inverse Hessian H of the history (torch's order)."""
  def newest_first(q, row):
    si, yi, ri = row
    a = ri * jnp.vdot(si, q)
    return q - a * yi, a

  q, alphas = jax.lax.scan(newest_first, -g, (s, y, rho), reverse=True)

  def oldest_first(r, row):
    si, yi, ri, a = row
    return r + (a - ri * jnp.vdot(yi, r)) * si, None

  r, _ = jax.lax.scan(oldest_first, q * h_diag, (s, y, rho, alphas))
  return r


def update(state: LBFGSState, value_and_grad: ValueAndGrad,
           cfg: LBFGSConfig = LBFGSConfig()) -> LBFGSState:
  """One iteration: move by t d and evaluate `value_and_grad` there once (none when done,
  or when the slope test ends the run)."""
  x, unravel = ravel_pytree(state.params)
  g, _ = ravel_pytree(state.grad)
  d = direction(g, state.s, state.y, state.rho, state.h_diag)
  t = jnp.where(state.iteration == 0,
                jnp.minimum(1.0, 1.0 / jnp.sum(jnp.abs(g))) * cfg.lr, cfg.lr).astype(x.dtype)
  flat_slope = jnp.vdot(g, d) > -cfg.tolerance_change

  def stop(state):
    return state._replace(done=jnp.asarray(True))

  def move(state):
    step = t * d
    params = unravel(x + step)
    value, grad = value_and_grad(params)
    g_new, _ = ravel_pytree(grad)
    dg = g_new - g
    ys = jnp.vdot(dg, step)
    keep = ys > CURVATURE_EPS
    push = lambda h, row: jnp.where(keep, jnp.roll(h, -1, axis=0).at[-1].set(row), h)  # noqa: E731
    return LBFGSState(
        params=params, value=jnp.asarray(value, x.dtype), grad=grad,
        s=push(state.s, step), y=push(state.y, dg),
        rho=push(state.rho, 1.0 / jnp.where(keep, ys, 1.0)),
        h_diag=jnp.where(keep, ys / jnp.vdot(dg, dg), state.h_diag),
        iteration=state.iteration + 1, evaluations=state.evaluations + 1,
        done=jnp.max(jnp.abs(g_new)) <= cfg.tolerance_grad)

  return jax.lax.cond(state.done, lambda s: s,
                      lambda s: jax.lax.cond(flat_slope, stop, move, s), state)
