"""Federated rounds: FedSGD and FedAvg (McMahan et al., AISTATS 2017) as one jitted step.

One round, as `round_step(state, clients) -> (state, metrics)`:

  1. sample clients (a fixed number without replacement, or Poisson with rate q);
  2. every sampled client runs `client_update(params, data, key) -> (update, metrics)`:
     FedSGD sends the gradient of its mean loss on all its data; FedAvg runs E epochs of
     local SGD with batch size B (ceil(n/B) steps per epoch, the last batch smaller) and
     sends the model delta `local_params - params`;
  3. every update passes through the `defense(update, key, round) -> update` hook
     (identity by default: DP noise, clipping, pruning and forward-diffusion noise plug in
     here; `round` is the round's index, a traced int32, for schedules over rounds);
  4. the server's `aggregate(updates, weights, key) -> update` hook combines the stacked
     updates (a mean weighted by client size by default; secure aggregation plugs in here);
  5. the server optimizer (optax) steps on the pseudo-gradient: `-aggregate` for FedAvg,
     `local_lr * aggregate` for FedSGD, so plain averaging is `sgd(1.0)` for both.

The sampled clients are batched with `jax.vmap` or `jax.lax.map` (a setting: on CPU,
lax.map avoids the grouped convolutions that vmapping over per-client weights creates),
and with a `jax.sharding.Mesh` the client axis is split over devices by `jax.shard_map`.

Round r's key is `fold_in(key, r)`, split by purpose (sampling, clients, defense,
aggregate); client i gets `fold_in(purpose_key, i)`. So an attacker (or a test) can
recompute exactly the update that client sent: see `client_key`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fljax.partitions import Batch

Params = Any
Update = Any  # a pytree shaped like Params
Metrics = dict[str, jax.Array]
LossFn = Callable[[Params, Batch, jax.Array], tuple[jax.Array, Metrics]]
ClientUpdateFn = Callable[[Params, Batch, jax.Array], tuple[Update, Metrics]]
DefenseFn = Callable[[Update, jax.Array, jax.Array], Update]  # (update, key, round)
AggregateFn = Callable[[Update, jax.Array, jax.Array], Update]


class Aggregator(NamedTuple):
  """A stateful `aggregate` hook (e.g. adaptive clipping), an init/update pair like optax's.

  `init(params) -> state`; `update(updates, weights, state, key) -> (update, state,
  metrics)`. The state lives in `ServerState.aggregate_state` (so it is checkpointed) and
  the metrics (scalars) join the round's metrics.
  """

  init: Callable[[Params], Any]
  update: Callable[[Update, jax.Array, Any, jax.Array], tuple[Update, Any, Metrics]]


def as_aggregator(aggregate: AggregateFn | Aggregator) -> Aggregator:
  """A plain `aggregate(updates, weights, key)` function as a stateless `Aggregator`."""
  if isinstance(aggregate, Aggregator):
    return aggregate
  return Aggregator(init=lambda params: (),
                    update=lambda u, w, state, key: (aggregate(u, w, key), state, {}))

CLIENT_AXIS = "clients"


@dataclasses.dataclass(frozen=True, kw_only=True)
class FedConfig:
  """Federated optimisation settings.

  Attributes:
    algorithm: 'fedavg' (local SGD, sends the model delta) or 'fedsgd' (sends one gradient).
    local_epochs: E, FedAvg's passes over the client's data per round.
    local_batch_size: B, FedAvg's local batch size.
    local_lr: client learning rate (FedSGD: the step the server takes along the gradient).
    clients_per_round: fraction q of clients sampled each round.
    sampling: 'fixed' (round(q*C) clients without replacement) or 'poisson' (each client
      independently with probability q).
    poisson_cap: static number of client slots for Poisson sampling (0: C, exact). With a
      smaller cap, clients past the cap are dropped and counted in `clients_dropped`.
      Empty slots cost nothing under lax.map (they are skipped), a full client under vmap.
    server_optimizer: 'sgd', 'momentum' or 'adam' on the pseudo-gradient.
    server_lr: server learning rate (1.0 with 'sgd' is plain averaging).
    server_momentum: momentum for 'momentum' (FedAvgM).
    client_batching: 'vmap', 'map' (jax.lax.map) or 'auto' over the sampled clients. 'auto'
      is 'map' on CPU, where vmapping over per-client weights turns convolutions into
      slow grouped convolutions (measured by scripts/bench_fl_round.py), else 'vmap'.
    map_batch_size: clients per lax.map step (0: one at a time).
    local_unroll: local SGD steps unrolled per loop iteration (0: all). XLA:CPU runs ops
      inside loops markedly slower, so unrolling short local loops pays there, at the
      cost of compile time.
  """

  algorithm: str = "fedavg"
  local_epochs: int = 1
  local_batch_size: int = 10
  local_lr: float = 0.1
  clients_per_round: float = 0.1
  sampling: str = "fixed"
  poisson_cap: int = 0
  server_optimizer: str = "sgd"
  server_lr: float = 1.0
  server_momentum: float = 0.9
  client_batching: str = "auto"
  map_batch_size: int = 0
  local_unroll: int = 8

  def __post_init__(self):
    checks = [
        ("algorithm", self.algorithm in ("fedavg", "fedsgd"), "must be 'fedavg' or 'fedsgd'"),
        ("local_epochs", self.local_epochs >= 1, "must be >= 1"),
        ("local_batch_size", self.local_batch_size >= 1, "must be >= 1"),
        ("local_lr", self.local_lr > 0, "must be > 0"),
        ("clients_per_round", 0 < self.clients_per_round <= 1,
         "is the fraction of all clients sampled each round, in (0, 1]"),
        ("sampling", self.sampling in ("fixed", "poisson"), "must be 'fixed' or 'poisson'"),
        ("poisson_cap", self.poisson_cap >= 0, "must be >= 0"),
        ("server_optimizer", self.server_optimizer in SERVER_OPTIMIZERS,
         f"must be one of {sorted(SERVER_OPTIMIZERS)}"),
        ("server_lr", self.server_lr > 0, "must be > 0"),
        ("client_batching", self.client_batching in ("auto", "vmap", "map"),
         "must be 'auto', 'vmap' or 'map'"),
        ("map_batch_size", self.map_batch_size >= 0, "must be >= 0"),
        ("local_unroll", self.local_unroll >= 0, "must be >= 0"),
    ]
    for name, ok, message in checks:
      if not ok:
        raise ValueError(f"FedConfig: {name} {message}, got {getattr(self, name)!r}")


SERVER_OPTIMIZERS: dict[str, Callable[[FedConfig], optax.GradientTransformation]] = {
    "sgd": lambda cfg: optax.sgd(cfg.server_lr),
    "momentum": lambda cfg: optax.sgd(cfg.server_lr, momentum=cfg.server_momentum),
    "adam": lambda cfg: optax.adam(cfg.server_lr),
}


# ----------------------------------------------------------------------------- loss


def make_loss_fn(apply_fn: Callable[[Params, jax.Array], jax.Array]) -> LossFn:
  """Masked softmax cross-entropy: `loss_fn(params, batch, key) -> (mean loss, aux)`.

  The mean runs over the valid rows (mask 1) only; aux holds the sums needed to combine
  batches exactly: `loss_sum`, `correct`, `count`.
  """
  def loss_fn(params: Params, batch: Batch, key: jax.Array) -> tuple[jax.Array, Metrics]:
    del key  # deterministic models; the argument keeps the one loss contract
    logits = apply_fn(params, batch.x)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch.y)
    count = batch.mask.sum()
    loss_sum = (ce * batch.mask).sum()
    correct = ((logits.argmax(-1) == batch.y) * batch.mask).sum()
    return loss_sum / jnp.maximum(count, 1.0), {"loss_sum": loss_sum, "correct": correct,
                                                "count": count}
  return loss_fn


# ----------------------------------------------------------------------------- clients


def make_client_update(loss_fn: LossFn, cfg: FedConfig) -> ClientUpdateFn:
  """The update one client sends: `client_update(params, data, key) -> (update, metrics)`.

  `data` is one client's padded `Batch` (`x [N_max, ...]`, mask marks its n examples).
  FedSGD: the gradient of the mean loss over the n examples. FedAvg: the model delta after
  E epochs of SGD with batch size B; each epoch visits the n examples in a fresh random
  order in ceil(n/B) steps (steps past that see only padding and leave the model as is).
  Metrics: the mean training loss over the examples seen and their number.
  """
  grad_fn = jax.grad(loss_fn, has_aux=True)
  skip_with_cond = resolve_batching(cfg.client_batching) == "map"

  def unroll(length: int) -> int:
    return length if cfg.local_unroll == 0 else min(cfg.local_unroll, length)

  def fedsgd(params: Params, data: Batch, key: jax.Array) -> tuple[Update, Metrics]:
    grads, aux = grad_fn(params, data, key)
    return grads, {"loss": aux["loss_sum"] / jnp.maximum(aux["count"], 1.0),
                   "count": aux["count"]}

  def fedavg(params: Params, data: Batch, key: jax.Array) -> tuple[Update, Metrics]:
    # No client holds more than N_max examples: a larger batch would only be padding.
    n_max = data.mask.shape[0]
    b = min(cfg.local_batch_size, n_max)
    steps = math.ceil(n_max / b)
    pad = steps * b - n_max

    def sgd_step(p, inputs):
      index, mask, step_key = inputs

      def step(p):
        batch = Batch(x=data.x[index], y=data.y[index], mask=mask)
        grads, aux = grad_fn(p, batch, step_key)
        p = jax.tree.map(lambda w, g: w - cfg.local_lr * g, p, grads)
        return p, (aux["loss_sum"], aux["count"])

      def skip(p):
        zero = 0.0 * mask.sum()  # derived from the data, so it varies over a mesh like it
        return p, (zero, zero)

      # A batch of padding only (a client smaller than N_max) leaves the model as it is.
      # Clients one at a time (lax.map) skip its work with a cond; vmapped clients compute
      # it and select (a vmapped cond is a select anyway, and trips shard_map's checks).
      active = mask.sum() > 0
      if skip_with_cond:
        return jax.lax.cond(active, step, skip, p)
      stepped, sums = step(p)
      return jax.tree.map(lambda a, b: jnp.where(active, a, b), stepped, p), sums

    def epoch(p, epoch_key):
      order_key, steps_key = jax.random.split(epoch_key)
      # Valid rows first, in a uniformly random order; padding rows last.
      noise = jax.random.uniform(order_key, (n_max,))
      order = jnp.argsort(jnp.where(data.mask > 0, noise, 2.0))
      order = jnp.concatenate([order, jnp.zeros((pad,), order.dtype)])
      mask = jnp.concatenate([data.mask[order[:n_max]], jnp.zeros((pad,), data.mask.dtype)])
      inputs = (order.reshape(steps, b), mask.reshape(steps, b),
                jax.random.split(steps_key, steps))
      p, (loss_sums, counts) = jax.lax.scan(sgd_step, p, inputs, unroll=unroll(steps))
      return p, (loss_sums.sum(), counts.sum())

    local, (loss_sums, counts) = jax.lax.scan(
        epoch, params, jax.random.split(key, cfg.local_epochs), unroll=unroll(cfg.local_epochs))
    delta = jax.tree.map(jnp.subtract, local, params)
    return delta, {"loss": loss_sums.sum() / jnp.maximum(counts.sum(), 1.0),
                   "count": data.mask.sum()}

  return fedsgd if cfg.algorithm == "fedsgd" else fedavg


def identity_defense(update: Update, key: jax.Array, round_: jax.Array | int = 0) -> Update:
  """The default `defense` hook: sends the update as it is."""
  del key, round_
  return update


def weighted_mean(updates: Update, weights: jax.Array, key: jax.Array) -> Update:
  """The default `aggregate` hook: sum_i w_i u_i / sum_i w_i (0 when no weight).

  Args:
    updates: stacked client updates, each leaf `[m, ...]`.
    weights: `[m]` non-negative weights (client sizes; 0 for unsampled padding slots).
    key: unused (stochastic aggregators use it).
  """
  del key
  total = weights.sum()
  scale = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)
  return jax.tree.map(lambda u: jnp.tensordot(weights * scale, u, axes=1), updates)


def resolve_batching(mode: str) -> str:
  """'auto' -> 'map' on CPU, 'vmap' on accelerators; other modes pass through."""
  if mode == "auto":
    return "map" if jax.default_backend() == "cpu" else "vmap"
  return mode


def batch_over(fn: Callable, mode: str, batch_size: int = 0) -> Callable:
  """`fn` mapped over the leading axis of all its arguments, by vmap or lax.map."""
  mode = resolve_batching(mode)
  if mode == "vmap":
    return jax.vmap(fn)
  if mode == "map":
    return lambda *args: jax.lax.map(lambda a: fn(*a), args, batch_size=batch_size or None)
  raise ValueError(f"batching mode must be 'vmap' or 'map', got {mode!r}")


# ----------------------------------------------------------------------------- sampling


def num_sampled(cfg: FedConfig, num_clients: int) -> int:
  """Static number of client slots per round."""
  if cfg.sampling == "fixed":
    return max(1, min(num_clients, round(cfg.clients_per_round * num_clients)))
  return cfg.poisson_cap or num_clients


def sample_clients(num_clients: int, cfg: FedConfig, *, key: jax.Array
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Client indices `[m]`, a 0/1 float `[m]` marking real slots, and the number dropped.

  'fixed': m = round(q*C) distinct clients, uniformly. 'poisson': every client joins
  independently with probability q; the joined ones fill the first slots in random order,
  the rest are padding (index 0, weight 0). Only a `poisson_cap` below C can drop
  clients, a uniformly random subset of those that joined.
  """
  m = num_sampled(cfg, num_clients)
  if cfg.sampling == "fixed":
    idx = jax.random.choice(key, num_clients, (m,), replace=False)
    return idx, jnp.ones((m,), jnp.float32), jnp.zeros((), jnp.int32)
  idx, real, dropped = poisson_slots(num_clients, cfg.clients_per_round, m, key=key)
  return idx, real, dropped


def poisson_slots(n: int, q: float, m: int, *, key: jax.Array
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Poisson sampling into m static slots: indices `[m]`, a 0/1 float mask `[m]`, dropped.

  Each of the n items joins independently with probability q; the joined ones fill the
  first slots in a uniformly random order and the rest are padding (index 0, mask 0).
  When more than m join, a uniformly random subset of m is kept and the number dropped
  is returned (DP accounting must then treat the truncation: see privacy.accounting).
  """
  join_key, order_key = jax.random.split(key)
  joined = jax.random.uniform(join_key, (n,)) < q
  # Joined items first, in random order, so that truncation drops a uniformly random subset.
  order = jnp.argsort(jnp.where(joined, jax.random.uniform(order_key, (n,)), 2.0))
  count = joined.sum()
  idx = jnp.where(jnp.arange(m) < count, order[:m], 0)
  real = (jnp.arange(m) < count).astype(jnp.float32)
  return idx.astype(jnp.int32), real, jnp.maximum(count - m, 0).astype(jnp.int32)


# ----------------------------------------------------------------------------- server


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerState:
  """Everything a run needs to continue: params, server optimizer state, round, keys.

  `key` is the run's base key and never changes; round r samples its clients from
  `fold_in(key, r)`. `noise_key` keys everything else a round draws (local training, the
  defense, the aggregation: all DP noise); it is `key` unless a layer above passes another
  one (e.g. from OS entropy, so that knowing the run's seed does not give the noise).
  `aggregate_state` is the state of a stateful `Aggregator` (() for plain functions).
  """

  params: Params
  opt_state: optax.OptState
  round: jax.Array
  key: jax.Array
  noise_key: jax.Array
  aggregate_state: Any = ()


def init_server_state(params: Params, cfg: FedConfig, *, key: jax.Array,
                      aggregate: AggregateFn | Aggregator = weighted_mean,
                      noise_key: jax.Array | None = None) -> ServerState:
  opt = SERVER_OPTIMIZERS[cfg.server_optimizer](cfg)
  return ServerState(params=params, opt_state=opt.init(params),
                     round=jnp.zeros((), jnp.int32), key=key,
                     noise_key=jax.random.clone(key if noise_key is None else noise_key),
                     aggregate_state=as_aggregator(aggregate).init(params))


def round_keys(state_key: jax.Array, round_: jax.Array, noise_key: jax.Array | None = None
               ) -> dict[str, jax.Array]:
  """The named keys of one round: sampling (from `state_key`), clients, defense, aggregate
  (from `noise_key`, `state_key` when None)."""
  k_sample, k_clients, k_defense, k_aggregate = jax.random.split(
      jax.random.fold_in(state_key, round_), 4)
  if noise_key is not None:
    k_clients, k_defense, k_aggregate = jax.random.split(jax.random.fold_in(noise_key, round_), 4)[1:]
  return {"sample": k_sample, "clients": k_clients, "defense": k_defense,
          "aggregate": k_aggregate}


def client_key(state_key: jax.Array, round_: int | jax.Array, client_id: int | jax.Array,
               purpose: str = "clients", noise_key: jax.Array | None = None) -> jax.Array:
  """The key client `client_id` used in round `round_` for `purpose` ('clients'/'defense')."""
  return jax.random.fold_in(round_keys(state_key, round_, noise_key)[purpose], client_id)


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh over the first `num_devices` devices (all by default), axis 'clients'."""
  devices = jax.devices()
  n = num_devices or len(devices)
  if n > len(devices):
    raise ValueError(f"asked for {n} devices but only {len(devices)} exist; on CPU set "
                     f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before starting")
  return Mesh(np.asarray(devices[:n]), (CLIENT_AXIS,))


def make_round_step(client_update: ClientUpdateFn, cfg: FedConfig, num_clients: int, *,
                    defense: DefenseFn = identity_defense,
                    aggregate: AggregateFn | Aggregator = weighted_mean,
                    mesh: Mesh | None = None
                    ) -> Callable[[ServerState, Batch], tuple[ServerState, Metrics]]:
  """Builds `round_step(state, clients) -> (state, metrics)`; jit it at the call site.

  Args:
    client_update: from `make_client_update` (or any function with its signature).
    cfg: the federated settings.
    num_clients: C, the leading size of `clients`.
    defense: per-update hook, `defense(update, key, round)`, called on each client's update
      with its own key and the round's index.
    aggregate: server hook over the stacked updates `[m, ...]` and their weights (a
      function, or a stateful `Aggregator`; build the state with the same hook in
      `init_server_state`).
    mesh: if given, the sampled clients are split over its 'clients' axis with shard_map
      (padded with weight-0 slots to a multiple of the device count).

  Returns:
    The round function. Metrics: `train_loss` (client-size weighted), `clients`,
    `examples`, `clients_dropped`, `update_norm` (of the aggregate), and the
    aggregator's own metrics.
  """
  aggregator = as_aggregator(aggregate)
  server_opt = SERVER_OPTIMIZERS[cfg.server_optimizer](cfg)
  m = num_sampled(cfg, num_clients)
  n_dev = 1 if mesh is None else mesh.devices.size
  m_pad = -(-m // n_dev) * n_dev

  skip_empty_slots = resolve_batching(cfg.client_batching) == "map"

  def one_client(params, round_, data, ckey, dkey, real):
    def run(_):
      update, metrics = client_update(params, data, ckey)
      return defense(update, dkey, round_), metrics

    if not skip_empty_slots:
      return run(None)
    # Slots that hold no sampled client (Poisson rounds, padding for the mesh) send zeros;
    # clients run one at a time, so a cond skips their work (vmapped, it would not).
    shapes = jax.eval_shape(run, None)

    def empty(_):
      zero = 0.0 * data.mask.sum()  # derived from the data, so it varies over a mesh like it
      return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype) + zero.astype(s.dtype), shapes)

    return jax.lax.cond(real > 0, run, empty, None)

  def local_clients(params, round_, batch, ckeys, dkeys, real):
    return batch_over(lambda d, c, k, r: one_client(params, round_, d, c, k, r),
                      cfg.client_batching, cfg.map_batch_size)(batch, ckeys, dkeys, real)

  if mesh is None:
    client_phase = local_clients
  else:
    def sharded_body(params, round_, batch, ckeys, dkeys, real):
      # params enter replicated; mark them varying so that per-client gradients stay
      # per-device instead of being summed over the mesh by the transpose of a broadcast.
      params = jax.lax.pcast(params, CLIENT_AXIS, to="varying")
      return local_clients(params, round_, batch, ckeys, dkeys, real)
    client_phase = jax.shard_map(
        sharded_body, mesh=mesh,
        in_specs=(P(), P(), P(CLIENT_AXIS), P(CLIENT_AXIS), P(CLIENT_AXIS), P(CLIENT_AXIS)),
        out_specs=(P(CLIENT_AXIS), P(CLIENT_AXIS)))

  def round_step(state: ServerState, clients: Batch) -> tuple[ServerState, Metrics]:
    keys = round_keys(state.key, state.round, state.noise_key)
    idx, real, dropped = sample_clients(num_clients, cfg, key=keys["sample"])
    if m_pad > m:
      idx = jnp.concatenate([idx, jnp.zeros((m_pad - m,), idx.dtype)])
      real = jnp.concatenate([real, jnp.zeros((m_pad - m,), real.dtype)])
    batch = jax.tree.map(lambda a: a[idx], clients)
    ckeys = jax.vmap(jax.random.fold_in, (None, 0))(keys["clients"], idx)
    dkeys = jax.vmap(jax.random.fold_in, (None, 0))(keys["defense"], idx)
    updates, cmetrics = client_phase(state.params, state.round, batch, ckeys, dkeys, real)
    weights = real * batch.mask.sum(axis=1)
    aggregated, aggregate_state, ametrics = aggregator.update(
        updates, weights, state.aggregate_state, keys["aggregate"])
    if cfg.algorithm == "fedavg":
      pseudo_grad = jax.tree.map(jnp.negative, aggregated)
    else:
      pseudo_grad = jax.tree.map(lambda g: cfg.local_lr * g, aggregated)
    steps, opt_state = server_opt.update(pseudo_grad, state.opt_state, state.params)
    params = optax.apply_updates(state.params, steps)
    total = weights.sum()
    metrics = {
        "train_loss": (weights * cmetrics["loss"]).sum() / jnp.maximum(total, 1.0),
        "clients": real.sum(),
        "examples": total,
        "clients_dropped": dropped,
        "update_norm": optax.tree.norm(aggregated),
        **ametrics,
    }
    new_state = ServerState(params=params, opt_state=opt_state, round=state.round + 1,
                            key=state.key, noise_key=state.noise_key,
                            aggregate_state=aggregate_state)
    return new_state, metrics

  return round_step


def replicate(tree: Any, mesh: Mesh | None) -> Any:
  """Places a pytree on every device of `mesh` (no-op without a mesh).

  With several processes (`jax.distributed`), every process must pass the same values:
  each contributes its copy to a global, fully replicated array.
  """
  if mesh is None:
    return tree
  sharding = NamedSharding(mesh, P())
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(x):
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))

  return jax.tree.map(put, tree)


# ----------------------------------------------------------------------------- evaluation


def make_evaluate(apply_fn: Callable[[Params, jax.Array], jax.Array], batch_size: int = 500
                  ) -> Callable[[Params, jax.Array, jax.Array], Metrics]:
  """`evaluate(params, x, y) -> {'accuracy', 'loss'}` over a whole split, in batches."""
  loss_fn = make_loss_fn(apply_fn)

  def evaluate(params: Params, x: jax.Array, y: jax.Array) -> Metrics:
    n = x.shape[0]
    steps = -(-n // batch_size)
    pad = steps * batch_size - n
    xs = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
    ys = jnp.concatenate([y, jnp.zeros((pad,), y.dtype)])
    mask = (jnp.arange(steps * batch_size) < n).astype(jnp.float32)
    batches = Batch(x=xs.reshape((steps, batch_size) + x.shape[1:]),
                    y=ys.reshape(steps, batch_size), mask=mask.reshape(steps, batch_size))
    _, aux = jax.lax.map(lambda b: loss_fn(params, b, None), batches)
    return {"accuracy": aux["correct"].sum() / n, "loss": aux["loss_sum"].sum() / n}

  return evaluate
