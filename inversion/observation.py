"""The threat model: what an honest-but-curious server observes of one client's update.

An `Observation` holds the shared update (a FedSGD gradient, or a FedAvg model delta) and
the parameters the client started from, together with a `ThreatModel`: what the attacker
is declared to know (algorithm, batch size, local epochs and learning rate, whether the
labels are known, the input shape, the defense applied). `observe` produces it with
fljax's own `client_update`, so an attack targets exactly what the simulation sends;
under secure aggregation `observe_aggregate` gives the server only the round's aggregate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fljax import federated as fed
from fljax.partitions import Batch


@dataclasses.dataclass(frozen=True, kw_only=True)
class ThreatModel:
  """What the attacker knows (static: hashable, usable as a jit argument).

  Attributes:
    algorithm: 'fedsgd' (the update is a gradient) or 'fedavg' (a model delta).
    batch_size: B, the number of examples behind the update.
    input_shape: (H, W, C) of one example.
    num_classes: K.
    local_epochs: FedAvg's E (declared).
    local_batch_size: FedAvg's local batch size (declared).
    local_lr: FedAvg's local learning rate (declared).
    labels_known: whether the attacker is given the labels.
    defense: the name of the defense applied to the update ('none' if none).
    observes: 'client' (one client's update) or 'aggregate' (secure aggregation).
  """

  algorithm: str = "fedsgd"
  batch_size: int = 1
  input_shape: tuple[int, ...] = (32, 32, 3)
  num_classes: int = 10
  local_epochs: int = 1
  local_batch_size: int = 1
  local_lr: float = 0.1
  labels_known: bool = False
  defense: str = "none"
  observes: str = "client"

  def __post_init__(self):
    if self.algorithm not in ("fedsgd", "fedavg"):
      raise ValueError(f"algorithm must be 'fedsgd' or 'fedavg', got {self.algorithm!r}")
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
    if self.observes not in ("client", "aggregate"):
      raise ValueError(f"observes must be 'client' or 'aggregate', got {self.observes!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class Observation:
  """One observed update: `update` (shaped like `params`), `params`, and known `labels`."""

  update: Any
  params: Any
  labels: jax.Array | None = None


def check(observation: Observation, threat: ThreatModel) -> None:
  """Raises a clear ValueError when the observation cannot come from this threat model."""
  shapes = jax.tree.map(jnp.shape, observation.params)
  if jax.tree.map(jnp.shape, observation.update) != shapes:
    raise ValueError("the observed update is not shaped like the model's parameters")
  finite = all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(observation.update))
  if not finite:
    raise ValueError("the observed update contains NaN or inf; an attack cannot match it")
  if threat.labels_known:
    if observation.labels is None or observation.labels.shape != (threat.batch_size,):
      raise ValueError(f"labels_known needs labels of shape ({threat.batch_size},)")


def check_batch(mask: jax.Array, threat: ThreatModel) -> None:
  """Raises a clear ValueError when a client (a mask `[N]`, or clients `[V, N]`) holds more
  examples than the threat model's declared batch size."""
  n = int(jnp.max(jnp.sum(mask, axis=-1)))
  if n > threat.batch_size:
    raise ValueError(f"the client holds {n} examples but the threat model declares batch "
                     f"size {threat.batch_size}")


def observe(client_update: fed.ClientUpdateFn, params: Any, data: Batch, key: jax.Array,
            threat: ThreatModel, *, defense: fed.DefenseFn = fed.identity_defense,
            defense_key: jax.Array | None = None, round_: int | jax.Array = 0) -> Observation:
  """What the server sees when a client with `data` runs `client_update` (then `defense`,
  at round `round_`)."""
  if not isinstance(data.mask, jax.core.Tracer):  # checked eagerly; vmap/jit callers check first
    check_batch(data.mask, threat)
  update, _ = client_update(params, data, key)
  if defense_key is None:
    defense_key = jax.random.fold_in(key, 1)
  update = defense(update, defense_key, round_)
  return Observation(update=update, params=params,
                     labels=data.y if threat.labels_known else None)


def local_steps(threat: ThreatModel) -> int:
  """The number of local SGD steps behind a FedAvg update (1 for FedSGD)."""
  if threat.algorithm == "fedsgd":
    return 1
  b = min(threat.local_batch_size, threat.batch_size)
  return threat.local_epochs * -(-threat.batch_size // b)


def gradient_signal(update: Any, threat: ThreatModel) -> Any:
  """The observed update read as the mean gradient of the batch's loss: a FedSGD update as
  it is; a FedAvg delta divided by -(lr x local steps), exact for one local step and the
  average of the local gradients otherwise (what label inference reads)."""
  if threat.algorithm == "fedsgd":
    return update
  scale = -1.0 / (threat.local_lr * local_steps(threat))
  return jax.tree.map(lambda u: u * scale, update)


def observe_aggregate(client_update: fed.ClientUpdateFn, params: Any, clients: Batch,
                      key: jax.Array, threat: ThreatModel, *,
                      defense: fed.DefenseFn = fed.identity_defense,
                      aggregate: fed.AggregateFn | fed.Aggregator = fed.weighted_mean,
                      round_: int | jax.Array = 0) -> Observation:
  """What the server sees of a round under secure aggregation: only the aggregate.

  Each of the m clients in `clients` (a padded `Batch [m, N_max, ...]`) runs
  `client_update` with key `fold_in(key, i)` and `defense` with `fold_in(key, m + i)`;
  `aggregate` (fljax's size-weighted mean, or `privacy.secagg.aggregator(...)`) combines
  them as the round would. The threat model must declare `observes='aggregate'` and the
  batch size of the union of the clients' data: with FedSGD and equal client sizes the
  mean of the clients' gradients is exactly the gradient of that union batch, so the
  attacks invert the sum as one large batch.
  """
  if threat.observes != "aggregate":
    raise ValueError("an aggregate observation needs ThreatModel(observes='aggregate')")
  m = clients.mask.shape[0]
  n = int(clients.mask.sum())
  if n > threat.batch_size:
    raise ValueError(f"the {m} clients hold {n} examples but the threat model declares "
                     f"batch size {threat.batch_size}")
  ids = jnp.arange(m)
  updates, _ = jax.vmap(lambda d, i: client_update(params, d, jax.random.fold_in(key, i)))(
      clients, ids)
  updates = jax.vmap(lambda u, i: defense(u, jax.random.fold_in(key, m + i), round_))(
      updates, ids)
  aggregator = fed.as_aggregator(aggregate)
  total, _, _ = aggregator.update(updates, clients.mask.sum(axis=1), aggregator.init(params),
                                  jax.random.fold_in(key, 2 * m))
  labels = clients.y[clients.mask > 0] if threat.labels_known else None
  return Observation(update=total, params=params, labels=labels)


def soft_label_loss(apply_fn: Callable[[Any, jax.Array], jax.Array]
                    ) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
  """`loss(params, x, label_probs)`: mean cross-entropy against probability targets,
  equal to fljax's loss when the targets are one-hot (the attacks' forward model)."""
  def loss(params, x, probs):
    logp = jax.nn.log_softmax(apply_fn(params, x))
    return -jnp.mean(jnp.sum(probs * logp, axis=-1))
  return loss


def forward(apply_fn: Callable[[Any, jax.Array], jax.Array], threat: ThreatModel
            ) -> Callable[[Any, jax.Array, jax.Array], Any]:
  """The forward operator A: `update(params, x, label_probs)` a client with inputs x sends.

  FedSGD: the gradient of the mean loss. FedAvg (breaching's multi-step objective): E
  epochs of local SGD with the declared batch size and learning rate, unrolled so that
  it can be differentiated, visiting the B examples in order (the client's shuffle is
  not observable; with one batch per epoch the order does not matter); the update is
  the model delta, as fljax's FedAvg client sends it.
  """
  loss = soft_label_loss(apply_fn)
  if threat.algorithm == "fedsgd":
    return jax.grad(loss)
  b = min(threat.local_batch_size, threat.batch_size)
  starts = list(range(0, threat.batch_size, b))

  def fedavg(params, x, probs):
    p = params
    for _ in range(threat.local_epochs):
      for s in starts:
        g = jax.grad(loss)(p, x[s:s + b], probs[s:s + b])
        p = jax.tree.map(lambda w, d: w - threat.local_lr * d, p, g)
    return jax.tree.map(jnp.subtract, p, params)

  return fedavg
