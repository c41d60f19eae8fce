"""Inverting Gradients (Geiping et al., NeurIPS 2020).

The reconstruction minimises the cosine distance between the update it produces
(`inversion.observation.forward`) and the observed one, plus a total-variation prior,
with Adam on the *signed* gradient, a learning rate divided by 10 at 3/8, 5/8 and 7/8 of
the iterations, and the box constraint x in [0, 1] (images are de-normalised) enforced
after every step. Labels are given (known) or inferred from the update first (iDLG for
B = 1, the batch estimators of `inversion.labels` otherwise).
Restarts: run several keys batched and keep `inversion.attacks.best` by final loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from inversion import labels as label_inference
from inversion import objectives
from inversion.attacks import Attack, counted, guard, healthy, no_counts
from inversion.observation import Observation, ThreatModel, forward


LABELS = ("known",) + label_inference.METHODS


@dataclasses.dataclass(frozen=True, kw_only=True)
class IGConfig:
  """Inverting Gradients settings.

  Attributes:
    steps: the total number of iterations (sets the step-decay schedule).
    lr: Adam's initial learning rate.
    tv: weight of the total-variation prior.
    objective: 'cosine' (the paper's), 'layer_cosine' or 'l2'.
    labels: 'known', or inferred from the update: 'idlg' (batch size 1),
      'bias_corrected' or 'yin' (batches; `inversion.labels`).
  """

  steps: int = 2000
  lr: float = 0.1
  tv: float = 1e-4
  objective: str = "cosine"
  labels: str = "idlg"

  def __post_init__(self):
    if self.steps < 1 or self.lr <= 0 or self.tv < 0:
      raise ValueError("steps >= 1, lr > 0 and tv >= 0 are required")
    if self.objective not in objectives.OBJECTIVES:
      raise ValueError(f"objective must be one of {sorted(objectives.OBJECTIVES)}")
    if self.labels not in LABELS:
      raise ValueError(f"labels must be one of {LABELS}, got {self.labels!r}")


class IGState(NamedTuple):
  x: jax.Array
  y: jax.Array
  opt_state: Any
  loss: jax.Array
  diverged: jax.Array
  counts: jax.Array


def make(apply_fn: Callable[[Any, jax.Array], jax.Array], threat: ThreatModel,
         cfg: IGConfig = IGConfig()) -> Attack:
  """The Inverting Gradients attack on an observation under `threat`."""
  label_inference.check(cfg.labels, threat.batch_size)
  update_of = forward(apply_fn, threat)
  match = objectives.OBJECTIVES[cfg.objective]
  schedule = optax.piecewise_constant_schedule(
      cfg.lr, {int(cfg.steps * f): 0.1 for f in (3 / 8, 5 / 8, 7 / 8)})
  opt = optax.adam(schedule)

  def loss_of(x, y, obs):
    predicted = update_of(obs.params, x, jax.nn.one_hot(y, threat.num_classes))
    return match(predicted, obs.update) + cfg.tv * objectives.total_variation(x)

  def init(key: jax.Array, obs: Observation) -> IGState:
    kx, ky = jax.random.split(key)
    x = jax.random.uniform(kx, (threat.batch_size,) + tuple(threat.input_shape))
    y = label_inference.from_observation(cfg.labels, apply_fn, obs, threat, key=ky)
    return IGState(x=x, y=y, opt_state=opt.init(x), loss=loss_of(x, y, obs),
                   diverged=jnp.zeros((), bool), counts=counted(no_counts(), grad=1))

  def step(state: IGState, obs: Observation) -> tuple[IGState, dict[str, jax.Array]]:
    loss, grad = jax.value_and_grad(loss_of)(state.x, state.y, obs)
    updates, opt_state = opt.update(jnp.sign(grad), state.opt_state, state.x)
    x = jnp.clip(optax.apply_updates(state.x, updates), 0.0, 1.0)
    ok = healthy(loss, x)
    counts = counted(state.counts, double_backward=1)  # spent whether or not the step is kept
    new = guard(IGState(x=x, y=state.y, opt_state=opt_state, loss=loss,
                        diverged=state.diverged, counts=counts), state, ok)._replace(counts=counts)
    return new, {"loss": loss, "diverged": new.diverged}

  return Attack(init, step)
