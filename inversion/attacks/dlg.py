"""Deep Leakage from Gradients (Zhu et al., NeurIPS 2019) and iDLG (Zhao et al. 2020).

Dummy inputs (and, without known labels, dummy label logits) are optimised so that the
update they produce on the observed parameters (`inversion.observation.forward`: the
FedSGD gradient, or FedAvg's unrolled local steps) matches the observed one (L2 by
default). iDLG first reads a single example's label from the last layer's gradient
(`inversion.labels.idlg`; for FedAvg the delta is read as a negative gradient, which holds
for one local step) and optimises the input only; batches take their labels from the
batch estimators of `inversion.labels` the same way. Optimisers: Adam, or L-BFGS with
a zoom line search (optax.lbfgs), the original DLG's choice.

A step whose loss is not finite, or whose iterate is not finite or explodes
(`attacks.healthy`), keeps the previous iterate and sets `diverged`; the driver reports such a victim as failed (or restarts it), never scores it silently.
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


LABELS = ("optimise", "known") + label_inference.METHODS


@dataclasses.dataclass(frozen=True, kw_only=True)
class DLGConfig:
  """DLG settings.

  Attributes:
    optimizer: 'adam' or 'lbfgs'.
    lr: Adam's learning rate (L-BFGS uses its line search).
    objective: 'l2', 'cosine' or 'layer_cosine'.
    labels: 'optimise' (DLG: soft labels learned jointly), 'known' (from the
      observation), or inferred from the update first: 'idlg' (batch size 1),
      'bias_corrected' or 'yin' (batches; `inversion.labels`).
  """

  optimizer: str = "adam"
  lr: float = 0.1
  objective: str = "l2"
  labels: str = "idlg"

  def __post_init__(self):
    if self.optimizer not in ("adam", "lbfgs"):
      raise ValueError(f"optimizer must be 'adam' or 'lbfgs', got {self.optimizer!r}")
    if self.objective not in objectives.OBJECTIVES:
      raise ValueError(f"objective must be one of {sorted(objectives.OBJECTIVES)}")
    if self.labels not in LABELS:
      raise ValueError(f"labels must be one of {LABELS}, got {self.labels!r}")


class DLGState(NamedTuple):
  x: jax.Array             # [B, H, W, C] current reconstruction
  label_logits: jax.Array  # [B, K] (fixed one-hot logits when labels are not optimised)
  opt_state: Any
  loss: jax.Array
  diverged: jax.Array
  counts: jax.Array


def make(apply_fn: Callable[[Any, jax.Array], jax.Array], threat: ThreatModel,
         cfg: DLGConfig = DLGConfig()) -> Attack:
  """The DLG / iDLG attack on a FedSGD observation under `threat`."""
  label_inference.check(cfg.labels, threat.batch_size)
  update_of = forward(apply_fn, threat)
  match = objectives.OBJECTIVES[cfg.objective]
  learn_labels = cfg.labels == "optimise"
  opt = optax.adam(cfg.lr) if cfg.optimizer == "adam" else optax.lbfgs()

  def objective(variables, obs: Observation):
    x, logits = variables
    probs = jax.nn.softmax(logits)
    return match(update_of(obs.params, x, probs), obs.update)

  def init(key: jax.Array, obs: Observation) -> DLGState:
    kx, ky = jax.random.split(key)
    x = jax.random.uniform(kx, (threat.batch_size,) + tuple(threat.input_shape))
    if learn_labels:
      logits = jax.random.normal(ky, (threat.batch_size, threat.num_classes))
    else:
      y = label_inference.from_observation(cfg.labels, apply_fn, obs, threat, key=ky)
      logits = 1e3 * jax.nn.one_hot(y, threat.num_classes)  # softmax = one-hot
    variables = (x, logits)
    return DLGState(x=x, label_logits=logits, opt_state=opt.init(variables),
                    loss=objective(variables, obs), diverged=jnp.zeros((), bool),
                    counts=counted(no_counts(), grad=1))

  def step(state: DLGState, obs: Observation) -> tuple[DLGState, dict[str, jax.Array]]:
    variables = (state.x, state.label_logits)
    fn = lambda v: objective(v, obs)  # noqa: E731
    loss, grads = jax.value_and_grad(fn)(variables)
    if not learn_labels:
      grads = (grads[0], jnp.zeros_like(grads[1]))
    if cfg.optimizer == "lbfgs":
      updates, opt_state = opt.update(grads, state.opt_state, variables, value=loss,
                                      grad=grads, value_fn=fn)
    else:
      updates, opt_state = opt.update(grads, state.opt_state, variables)
    new_x, new_logits = optax.apply_updates(variables, updates)
    ok = healthy(loss, new_x)
    # L-BFGS's zoom line search evaluates the objective (and its gradient) again per trial.
    extra = optax.tree.get(opt_state, "num_linesearch_steps") if cfg.optimizer == "lbfgs" else 0
    counts = counted(state.counts, double_backward=1 + extra)
    new = guard(DLGState(x=new_x, label_logits=new_logits, opt_state=opt_state, loss=loss,
                         diverged=state.diverged, counts=counts), state, ok)._replace(counts=counts)
    return new, {"loss": loss, "diverged": new.diverged}

  return Attack(init, step)


def labels(state: DLGState) -> jax.Array:
  """The attack's label estimate for each reconstructed example."""
  return jnp.argmax(state.label_logits, axis=-1)
