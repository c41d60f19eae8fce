"""Where the noise goes in federated learning: user-level, record-level and local DP.

Three mechanisms, each behind one of `fljax.federated`'s hooks:

  - `dp_fedavg` (an `aggregate`): user-level central DP, DP-FedAvg (McMahan et al., ICLR
    2018), with fixed clipping or adaptive quantile clipping (Andrew et al., NeurIPS 2021).
    The server is trusted; the model (and everything computed from it) is private.
  - `make_dpsgd_client_update` (a `client_update`): record-level DP, DP-SGD inside each
    client's local training, accounted per client with its own sampling rate.
  - `local_dp` (a `defense`): local DP on updates; each client clips and noises its own
    update before it leaves the device, so not even the server sees it in the clear.

Each states what it clips, the sensitivity, the neighbouring relation and its
`dp_accounting` event; `privacy.train` turns those into the epsilon logged every round.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from dp_accounting import dp_event

from fljax import federated as fed
from fljax.partitions import Batch
from privacy import accounting
from privacy.clipping import LossFn, clip_update
from privacy.ghost import CLIPPING
from privacy.noise import tree_gaussian


# ----------------------------------------------------------------------------- DP-FedAvg


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaptiveClipping:
  """Adaptive quantile clipping (Andrew et al. 2021): C tracks the gamma-quantile of norms.

  Each round C <- C * exp(-lr * (b - gamma)), where b is the noised fraction of sampled
  clients whose update norm was <= C.

  Attributes:
    target_quantile: gamma.
    lr: eta, the geometric learning rate.
    count_noise_multiplier: sigma_b, noise std on the count of unclipped clients (the
      paper suggests expected_clients / 20).
  """

  target_quantile: float = 0.5
  lr: float = 0.2
  count_noise_multiplier: float = 1.0


class DPFedAvgState(NamedTuple):
  clip_norm: jax.Array


def dp_fedavg_update_noise(noise_multiplier: float, adaptive: AdaptiveClipping | None) -> float:
  """The noise multiplier of the update sum so that the round's total is `noise_multiplier`.

  With adaptive clipping the round releases two Gaussian queries: the update sum
  (sensitivity C, noise z_u C) and the centred count sum_i (b_i - 1/2) (sensitivity 1/2,
  noise sigma_b). Together they are one Gaussian mechanism with multiplier
  z = (z_u^-2 + (2 sigma_b)^-2)^-1/2 (Andrew et al. 2021, Sec. 3), so
  z_u = (z^-2 - (2 sigma_b)^-2)^-1/2; it needs 2 sigma_b > z.
  """
  if adaptive is None:
    return noise_multiplier
  two_sb = 2.0 * adaptive.count_noise_multiplier
  if two_sb <= noise_multiplier:
    raise ValueError(f"adaptive clipping needs 2 * count_noise_multiplier > noise_multiplier "
                     f"(got {adaptive.count_noise_multiplier} and {noise_multiplier}); raise "
                     f"count_noise_multiplier (Andrew et al. use expected_clients / 20)")
  return (noise_multiplier ** -2 - two_sb ** -2) ** -0.5


def dp_fedavg(*, clip_norm: float, noise_multiplier: float, expected_clients: float,
              adaptive: AdaptiveClipping | None = None) -> fed.Aggregator:
  """DP-FedAvg's server aggregation, as a stateful `Aggregator` for the round's hook.

  The server clips every sampled client's update to C (whatever the client did), sums
  them with weight 1 each (client sizes are ignored: a size-weighted sum would have
  unbounded sensitivity), adds N(0, (z_u C)^2) and divides by the expected number of
  clients `expected_clients` (q * num_clients for Poisson sampling, m for fixed), a
  public constant.

  Guarantee (user level). What is clipped: a client's whole update, to L2 norm C.
  Sensitivity of the sum: C when one client is added or removed. Event per round:
  `PoissonSampledDpEvent(q, GaussianDpEvent(z))` with Poisson client sampling
  (add/remove-one user), `SampledWithoutReplacementDpEvent(num_clients, m,
  GaussianDpEvent(z / 2))` with fixed-size sampling (replace-one user, so the sum moves
  by up to 2C); see `dp_fedavg_event`.
  With adaptive clipping, z is the total over both queries (`dp_fedavg_update_noise`).

  Metrics: `dp_clip_norm` (C used this round), `dp_noise_std` (of the aggregate) and,
  with adaptive clipping, `dp_unclipped_fraction` (the noised b, itself private).
  """
  accounting.check_clip_norm(clip_norm)
  accounting.check_noise_multiplier(noise_multiplier)
  if expected_clients <= 0:
    raise ValueError(f"expected_clients must be > 0, got {expected_clients}")
  z_update = dp_fedavg_update_noise(noise_multiplier, adaptive)

  def init(params):
    del params
    return DPFedAvgState(clip_norm=jnp.asarray(clip_norm, jnp.float32))

  def update(updates, weights, state, key):
    update_key, count_key = jax.random.split(key)
    c = state.clip_norm
    real = (weights > 0).astype(jnp.float32)
    clipped, norms = jax.vmap(lambda u: clip_update(u, c))(updates)
    total = jax.tree.map(lambda u: jnp.tensordot(real, u, axes=1), clipped)
    noise = tree_gaussian(total, z_update * c, key=update_key)
    aggregate = jax.tree.map(lambda s, z: (s + z) / expected_clients, total, noise)
    metrics = {"dp_clip_norm": c, "dp_noise_std": z_update * c / expected_clients}
    if adaptive is None:
      return aggregate, state, metrics
    centred = (real * ((norms <= c).astype(jnp.float32) - 0.5)).sum()
    noisy = centred + adaptive.count_noise_multiplier * jax.random.normal(count_key, ())
    unclipped = noisy / expected_clients + 0.5
    new_c = c * jnp.exp(-adaptive.lr * (unclipped - adaptive.target_quantile))
    metrics["dp_unclipped_fraction"] = unclipped
    return aggregate, DPFedAvgState(clip_norm=new_c), metrics

  return fed.Aggregator(init, update)


def expected_clients(cfg: fed.FedConfig, num_clients: int) -> float:
  """The public denominator of DP-FedAvg: q*C for Poisson sampling, m for fixed."""
  if cfg.sampling == "poisson":
    return cfg.clients_per_round * num_clients
  return float(fed.num_sampled(cfg, num_clients))


def dp_fedavg_event(cfg: fed.FedConfig, num_clients: int, noise_multiplier: float
                    ) -> tuple[dp_event.DpEvent, str]:
  """One DP-FedAvg round's event and its neighbouring relation (user level)."""
  gaussian = dp_event.GaussianDpEvent(noise_multiplier)
  m = fed.num_sampled(cfg, num_clients)
  if cfg.sampling == "fixed":
    return accounting.fixed_size_event(num_clients, m, noise_multiplier), "replace_one"
  if m >= num_clients:
    return dp_event.PoissonSampledDpEvent(cfg.clients_per_round, gaussian), "add_remove"
  return dp_event.TruncatedSubsampledGaussianDpEvent(
      dataset_size=num_clients, sampling_probability=cfg.clients_per_round,
      truncated_batch_size=m, noise_multiplier=noise_multiplier), "add_remove"


# ----------------------------------------------------------------------------- local DP


def local_dp(*, clip_norm: float, noise_multiplier: float) -> fed.DefenseFn:
  """Local DP on updates: `defense(update, key, round)` clips to C and adds N(0, (sigma C)^2).

  Guarantee (per upload, against everyone including the server). What is clipped: the
  client's whole update, to L2 norm C. Neighbouring relation: any two local datasets of
  that client, so two clipped updates differ by at most 2C (sensitivity 2C). Event per
  upload: `GaussianDpEvent(sigma / 2)` (noise multiplier relative to the sensitivity),
  composed over the rounds the client takes part in (`local_dp_event`).
  """
  accounting.check_clip_norm(clip_norm)
  accounting.check_noise_multiplier(noise_multiplier)

  def defense(update, key, round_=0):
    del round_
    clipped, _ = clip_update(update, clip_norm)
    noise = tree_gaussian(clipped, noise_multiplier * clip_norm, key=key)
    return jax.tree.map(jnp.add, clipped, noise)

  return defense


def local_dp_event(noise_multiplier: float) -> dp_event.DpEvent:
  """One upload under `local_dp`: the Gaussian mechanism at sensitivity 2C."""
  return dp_event.GaussianDpEvent(noise_multiplier / 2.0)


# ----------------------------------------------------------------------------- record level


def make_dpsgd_client_update(loss_fn: LossFn, cfg: fed.FedConfig, *, clip_norm: float,
                             noise_multiplier: float, per_layer: bool = False,
                             clipping: str = "auto") -> fed.ClientUpdateFn:
  """Record-level DP: each client trains with DP-SGD; `client_update(params, data, key)`.

  A client with n_i examples takes s_i = E * ceil(n_i / B) local steps (FedAvg; one step
  for FedSGD). Each step Poisson-samples its examples at rate q_i = min(1, B / n_i) into
  the client's whole padded row set (no truncation), sums the per-example gradients
  clipped to C, adds N(0, (sigma C)^2), divides by B (public) and steps with the local
  learning rate. FedAvg sends the model delta; FedSGD sends the noised gradient.

  Guarantee (record level, for each client's examples). What is clipped: each example's
  gradient, to C. Sensitivity of each step's sum: C under add/remove-one example.
  Event per round the client takes part in: `SelfComposedDpEvent(PoissonSampledDpEvent(
  q_i, GaussianDpEvent(sigma)), s_i)` (`dpsgd_client_event`). Rounds it sits out cost
  nothing (the later models are post-processing of its earlier releases).
  q_i and s_i are computed from the client's size n_i, which is treated as public (as
  centralized DP-SGD treats n in q = B/n, following Opacus and jax-privacy); a strict
  add/remove guarantee would fix them before seeing the data.
  """
  accounting.check_clip_norm(clip_norm)
  if clipping not in CLIPPING:
    raise ValueError(f"clipping must be one of {', '.join(CLIPPING)}, got {clipping!r}")
  clip_sum = CLIPPING[clipping]
  if noise_multiplier < 0:  # 0 (clipping only) is allowed, for baselines and tests
    raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
  b = cfg.local_batch_size
  skip_with_cond = fed.resolve_batching(cfg.client_batching) == "map"

  def client_update(params, data: Batch, key):
    n_max = data.mask.shape[0]
    n = data.mask.sum()
    q = jnp.minimum(1.0, b / jnp.maximum(n, 1.0))
    if cfg.algorithm == "fedsgd":
      steps, active_steps = 1, jnp.minimum(n, 1.0)
    else:
      steps = cfg.local_epochs * math.ceil(n_max / min(b, n_max))
      active_steps = cfg.local_epochs * jnp.ceil(n / b)

    def dp_step(p, inputs):
      t, step_key = inputs
      sample_key, grad_key, noise_key = jax.random.split(step_key, 3)

      def step(p):
        mask = data.mask * (jax.random.uniform(sample_key, (n_max,)) < q)
        batch = Batch(x=data.x, y=data.y, mask=mask)
        total, m = clip_sum(loss_fn, p, batch, grad_key, clip_norm=clip_norm,
                            per_layer=per_layer)
        noise = tree_gaussian(total, noise_multiplier * clip_norm, key=noise_key)
        grad = jax.tree.map(lambda s, z: (s + z) / b, total, noise)
        return grad, (m["loss_sum"], m["count"], m["nonfinite"])

      def skip(p):
        zero = 0.0 * n
        return jax.tree.map(jnp.zeros_like, p), (zero, zero, zero)

      active = t < active_steps
      if skip_with_cond:
        grad, sums = jax.lax.cond(active, step, skip, p)
      else:
        grad, sums = step(p)
        grad = jax.tree.map(lambda g: jnp.where(active, g, 0.0), grad)
        sums = jax.tree.map(lambda s: jnp.where(active, s, 0.0), sums)
      return jax.tree.map(lambda w, g: w - cfg.local_lr * g, p, grad), (grad, sums)

    inputs = (jnp.arange(steps), jax.random.split(key, steps))
    local, (grads, (loss_sums, counts, nonfinite)) = jax.lax.scan(dp_step, params, inputs)
    if cfg.algorithm == "fedsgd":
      update = jax.tree.map(lambda g: g[0], grads)
    else:
      update = jax.tree.map(jnp.subtract, local, params)
    return update, {"loss": loss_sums.sum() / jnp.maximum(counts.sum() - nonfinite.sum(), 1.0),
                    "count": n, "nonfinite": nonfinite.sum()}

  return client_update


def dpsgd_client_event(cfg: fed.FedConfig, client_size: int, noise_multiplier: float
                       ) -> dp_event.DpEvent:
  """One round of `make_dpsgd_client_update` for a client with `client_size` examples."""
  b = cfg.local_batch_size
  q = min(1.0, b / max(client_size, 1))
  steps = 1 if cfg.algorithm == "fedsgd" else cfg.local_epochs * math.ceil(client_size / b)
  return accounting.dpsgd_event(q, noise_multiplier, steps)


# ----------------------------------------------------------------------------- participation


def participation(cfg: fed.FedConfig, num_clients: int, run_key: jax.Array,
                  rounds: range) -> Any:
  """`[len(rounds), num_clients]` 0/1: which clients took part in each round.

  Recomputed from the run's key exactly as `fljax.federated.make_round_step` samples, so
  per-client accounting needs nothing from the device but the key.
  """
  def one(r):
    idx, real, _ = fed.sample_clients(num_clients, cfg, key=fed.round_keys(run_key, r)["sample"])
    return jnp.zeros((num_clients,)).at[idx].max(real)

  if len(rounds) == 0:
    return jnp.zeros((0, num_clients))
  return jax.jit(jax.vmap(one))(jnp.asarray(list(rounds)))

