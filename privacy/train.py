"""Federated runs with a privacy mechanism: `fljax.train` plus defenses and accounting.

`train_and_evaluate(PrivateExperimentConfig, workdir)` runs `fljax.train.train_and_evaluate`
with the mechanism's hooks plugged in, and logs the privacy spent after every round
(`epsilon`, at `privacy.delta`) in metrics.jsonl:

  mechanism   hook            threat model, unit          epsilon logged
  none        -               -                           (none)
  dp_fedavg   aggregate       model observer, user level  accountant over rounds
  dpsgd       client_update   model observer and server,  max over clients, RDP over the
                              record level                rounds each client took part in
  local_dp    defense         everyone, one client's      max over clients of its uploads
                              update (local DP)
  prune       defense         not DP                      (none: epsilon = inf)
  quantize    defense         not DP                      (none: epsilon = inf)
  secagg      aggregate       server sees only the sum;   (none), or with a noise multiplier or
                              + the distributed discrete  target: epsilon (replace one user,
                              Gaussian (privacy.ddgauss)  participation visible, RDP) and
                                                          epsilon_server (the worst client)
  forward_noise  defense      model observer, server      `privacy.forward_noise.ScheduleAccountant`:
              (+ aggregate,   per upload, record level    epsilon (model observer, participation
              client_update   (replace one user; record:  visible; with the top-up: DP-FedAvg's
              for hybrids)    add/remove one example)     event), epsilon_server, epsilon_record
  pfdm        clients         one image / one pixel       epsilon (= per image), epsilon_pixel
              (data noised    (replace one record)        (one release before training)
              once)

Forward noise's hybrids: `central_noise_multiplier` > 0 adds central Gaussian noise at the
server (which sums the noised uploads unclipped; participation stays visible);
`topup_noise_multiplier` > 0 has the trusted server top the aggregate's noise up to a
participation-independent total (amplification holds, add/remove); `record_noise_multiplier`
> 0 runs DP-SGD inside the clients (record level, add/remove one example, reported as
min(DP-SGD's, the per-upload bound read at record level)). The user-level epsilons of a
forward-noise run are under replace-one-user (see `privacy.forward_noise` for why neither
add/remove nor amplification by sampling holds for local noise); DP-FedAvg runs log it too
(`epsilon_replace_one`) for comparisons at equal epsilon. Every run writes privacy.json:
for each epsilon it logs, the threat model, the relation, the event and the accountant.
Noise keys derive from the seed unless `noise_seed='os'`.

What the guarantee covers: the model parameters (and, for `dpsgd` and `local_dp`, every
update the server receives). The training loss and other diagnostics in metrics.jsonl
are computed from raw client data for the experimenter and are not private.

With `target_epsilon` set, the noise multiplier is calibrated so that the epsilon after
`rounds` rounds meets it; client participation (needed by the per-client mechanisms) is
recomputed from the run's key, since client sampling does not depend on the data.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from dp_accounting import dp_event

from fljax import federated as fed
from fljax import train as fl_train
from privacy import accounting, ddgauss, defenses, secagg
from privacy import forward_noise as fn
from privacy import federated as pfed


MECHANISM_NAMES = ("none", "dp_fedavg", "dpsgd", "local_dp", "prune", "quantize", "secagg",
                   "forward_noise", "pfdm")
DP_MECHANISMS = ("dp_fedavg", "dpsgd", "local_dp")
SCHEDULES = ("constant", "staircase", "anneal", "linear", "cosine")
NOISE_SEEDS = ("run", "os")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrivacyConfig:
  """The privacy mechanism of a federated run.

  Attributes:
    mechanism: none, dp_fedavg (user-level central DP), dpsgd (record-level DP-SGD in each
      client), local_dp (each client noises its update), prune (top-k) or quantize.
    noise_multiplier: sigma, noise std in units of the clip norm (none: calibrate to
      target_epsilon).
    target_epsilon: calibrate sigma so that epsilon after all rounds is at most this.
    delta: the delta of every epsilon reported.
    clip_norm: C (dp_fedavg: initial C with adaptive clipping).
    accountant: pld or rdp for dp_fedavg (fixed-size client sampling forces rdp); dpsgd's
      per-client accounting always uses rdp.
    adaptive_clipping: dp_fedavg with adaptive quantile clipping (Andrew et al. 2021).
    target_quantile: adaptive clipping's gamma.
    clip_lr: adaptive clipping's geometric learning rate.
    count_noise_multiplier: adaptive clipping's sigma_b (none: expected clients / 20).
    per_layer: dpsgd clips each parameter tensor to C / sqrt(L).
    clipping: dpsgd's per-example norms: vmap (per-example gradients), ghost (from each
      layer's input and output gradient, `privacy.ghost`; the same clipped sum) or auto
      (ghost where it covers the model, else vmap; the default).
    prune_fraction: prune: fraction of update entries zeroed.
    quantize: quantize: fp16 or int8.
    secagg_clip: secagg without DP: each update coordinate is clipped to [-c, c] before
      encoding (with DP, the distributed discrete Gaussian clips the L2 norm to clip_norm).
    secagg_bits: secagg: the protocol works mod 2^bits (at most 32).
    secagg_threshold: secagg: t as a fraction (> 1/2) of the round's clients; with DP, the
      noise is sized for ceil(threshold * expected clients) survivors (n_min) and rounds
      with fewer abort (SecAgg+: of each neighbourhood).
    secagg_neighbours: secagg: 0 full SecAgg, -1 SecAgg+ with k chosen as Bell et al. 2020
      from the round's clients and the dropout rate, k > 0 (even) SecAgg+ with k neighbours
      (refused when below what the analysis needs).
    secagg_dropout: secagg: probability that a client drops before its masked input.
    schedule: forward_noise: constant (z = noise_multiplier), staircase (`stairs`
      geometric levels from noise_multiplier to z_end), anneal (geometric from
      noise_multiplier to z_end), linear or cosine (diffusion time t_start -> t_end over the
      rounds). With target_epsilon the schedule's shape is scaled to meet it (model
      observer, replace-one, PLD).
    z_end: forward_noise: the last round's z (staircase, anneal; with target_epsilon, the
      shape runs from 1 to z_end before it is scaled).
    stairs: forward_noise: staircase levels.
    t_start, t_end: forward_noise: diffusion times of the first and last round; pfdm: t_start
      is t0, the data's diffusion time.
    diffusion: forward_noise / pfdm: the diffusion schedule (linear or cosine) behind t.
    scaling: forward_noise: flat, per_layer, coordinate (public scale from the initial
      parameters) or norm (relative to the update's norm: not DP).
    rescale: forward_noise: the server divides each upload by sqrt(abar) (post-processing).
    central_noise_multiplier: forward_noise hybrid: central Gaussian noise z_C C on the sum
      (the aggregate's variance still grows with the clients that took part: participation
      stays visible and no amplification is credited).
    topup_noise_multiplier: forward_noise hybrid: the trusted server tops each round's
      aggregate noise up to z_T C whoever took part (participation hidden: Poisson
      amplification holds, add/remove one client); needs z_T >= sqrt(client slots) * max z.
    record_noise_multiplier: forward_noise hybrid: DP-SGD with this sigma inside clients.
    noise_seed: 'run' derives every noise key from --seed (reproducible research runs);
      'os' draws them from OS entropy, so that nobody who knows the seed can regenerate and
      subtract the noise (a deployment must). Client sampling stays seeded (accounting
      recomputes participation from it; it does not depend on the data).
  """

  mechanism: str = dataclasses.field(default="none", metadata={"choices": MECHANISM_NAMES})
  noise_multiplier: float | None = None
  target_epsilon: float | None = None
  delta: float = 1e-5
  clip_norm: float = 1.0
  accountant: str = "pld"
  adaptive_clipping: bool = False
  target_quantile: float = 0.5
  clip_lr: float = 0.2
  count_noise_multiplier: float | None = None
  per_layer: bool = False
  clipping: str = dataclasses.field(default="auto",
                                    metadata={"choices": ("auto", "vmap", "ghost")})
  prune_fraction: float = 0.9
  quantize: str = "int8"
  secagg_clip: float = 1.0
  secagg_bits: int = 32
  secagg_threshold: float = 0.6
  secagg_neighbours: int = 0
  secagg_dropout: float = 0.0
  schedule: str = "constant"
  z_end: float | None = None
  stairs: int = 4
  t_start: int = 500
  t_end: int = 250
  diffusion: str = "linear"
  scaling: str = "flat"
  rescale: bool = True
  central_noise_multiplier: float = 0.0
  topup_noise_multiplier: float = 0.0
  record_noise_multiplier: float = 0.0
  noise_seed: str = "run"

  def __post_init__(self):
    if self.mechanism not in MECHANISM_NAMES:
      raise ValueError(f"privacy.mechanism must be one of {MECHANISM_NAMES}, got {self.mechanism!r}")
    accounting.check_delta(self.delta)
    accounting.check_clip_norm(self.clip_norm)
    if self.clipping not in ("auto", "vmap", "ghost"):
      raise ValueError(f"privacy.clipping must be auto, vmap or ghost, got {self.clipping!r}")
    if self.noise_multiplier is not None:
      accounting.check_noise_multiplier(self.noise_multiplier)
    if self.target_epsilon is not None and not self.target_epsilon > 0:
      raise ValueError(f"privacy.target_epsilon must be > 0, got {self.target_epsilon}")
    if self.mechanism in DP_MECHANISMS and (self.noise_multiplier is None) == (self.target_epsilon is None):
      raise ValueError(f"privacy.mechanism={self.mechanism} needs exactly one of "
                       f"--privacy.noise_multiplier or --privacy.target_epsilon")
    if self.mechanism == "secagg" and None not in (self.noise_multiplier, self.target_epsilon):
      raise ValueError("privacy.mechanism=secagg takes at most one of --privacy.noise_multiplier "
                       "or --privacy.target_epsilon (none: secure aggregation without DP)")
    if self.mechanism == "forward_noise":
      if (self.noise_multiplier is None) == (self.target_epsilon is None) and \
          self.schedule not in ("linear", "cosine"):
        raise ValueError("privacy.mechanism=forward_noise needs exactly one of "
                         "--privacy.noise_multiplier (z) or --privacy.target_epsilon")
      if self.schedule not in SCHEDULES:
        raise ValueError(f"privacy.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
      if self.schedule in ("staircase", "anneal") and self.z_end is None:
        raise ValueError(f"privacy.schedule={self.schedule} needs --privacy.z_end")
      if min(self.central_noise_multiplier, self.record_noise_multiplier,
             self.topup_noise_multiplier) < 0:
        raise ValueError("privacy.central_noise_multiplier, topup_noise_multiplier and "
                         "record_noise_multiplier must be >= 0")
      if self.central_noise_multiplier and self.topup_noise_multiplier:
        raise ValueError("privacy.central_noise_multiplier and privacy.topup_noise_multiplier are "
                         "two hybrids: pass at most one")
      if self.scaling not in fn.SCALINGS:
        raise ValueError(f"privacy.scaling must be one of {fn.SCALINGS}, got {self.scaling!r}")
    if self.mechanism in ("forward_noise", "pfdm"):
      fn.z_of_t(self.diffusion, [self.t_start, self.t_end])
    if self.noise_seed not in NOISE_SEEDS:
      raise ValueError(f"privacy.noise_seed must be one of {NOISE_SEEDS}, got {self.noise_seed!r}")
    if self.accountant not in ("pld", "rdp"):
      raise ValueError(f"privacy.accountant must be 'pld' or 'rdp', got {self.accountant!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrivateExperimentConfig(fl_train.ExperimentConfig):
  """A federated run with a privacy mechanism (see `PrivacyConfig`)."""

  privacy: PrivacyConfig = PrivacyConfig()


# ----------------------------------------------------------------------------- mechanisms


def _secagg(cfg: PrivacyConfig, ctx: fl_train.RunContext) -> fl_train.Plugins:
  """Secure aggregation; with a noise multiplier or target epsilon, the distributed
  discrete Gaussian on top (`privacy.ddgauss`)."""
  settings = secagg.SecureAggregation(clip=cfg.secagg_clip, bits=cfg.secagg_bits,
                                      threshold=cfg.secagg_threshold,
                                      neighbours=cfg.secagg_neighbours,
                                      dropout=cfg.secagg_dropout)
  kind = "SecAgg+" if cfg.secagg_neighbours else "SecAgg"
  if cfg.noise_multiplier is None and cfg.target_epsilon is None:
    return fl_train.Plugins(
        aggregate=secagg.aggregator(settings, noise_seed=cfg.noise_seed),
        description=f"{kind}, mod 2^{cfg.secagg_bits}, clip {cfg.secagg_clip} "
                    f"(the server sees only the sum; not DP)")
  mech, q = ddgauss_mechanism(cfg, ctx)
  counts = _participation_counts(ctx).max(axis=1)

  def round_metrics(r):
    k = int(counts[r])
    return {"epsilon": _memo(("ddgauss", repr(mech), r, q), lambda: mech.epsilon(r, q, cfg.delta)),
            "epsilon_server": _memo(("ddgauss", repr(mech), k, 1.0),
                                    lambda: mech.epsilon(k, 1.0, cfg.delta)),
            "noise_multiplier": mech.noise_multiplier}

  relation = "replace_one (user; each client's noise share is in both worlds)"
  _write_privacy_json(ctx, {
      "mechanism": "secagg+ddgauss", "ddgauss": mech.describe(), "q": q, "delta": cfg.delta,
      "noise_seed": cfg.noise_seed, "overflow_probability": mech.overflow_probability,
      "guarantees": {
          "epsilon": {"threat_model": "model observer and the server (it sees the sum and who "
                                      "took part)", "relation": relation,
                      "event": f"DDGauss RDP (Kairouz et al. 2021), participation visible at "
                               f"rate {q:g}, {ctx.config.rounds} rounds", "accountant": "rdp"},
          "epsilon_server": {"threat_model": "server, the worst client's participations",
                             "relation": relation, "event": "DDGauss RDP per participation",
                             "accountant": "rdp"}}})
  return fl_train.Plugins(
      aggregate=secagg.aggregator(settings, ddgauss.DDGaussEncoding(mech),
                                  noise_seed=cfg.noise_seed),
      round_metrics=round_metrics,
      description=f"{kind} with the distributed discrete Gaussian: {mech.describe()}; "
                  f"participation visible (rate {q:g}); rounds with fewer than "
                  f"{mech.n_min} survivors abort; delta={cfg.delta:g}")


def ddgauss_mechanism(cfg: PrivacyConfig, ctx: fl_train.RunContext) -> tuple[Any, float]:
  """The run's `DDGauss` (calibrated to the target epsilon over the run's rounds, or at the
  given noise multiplier) and the participation rate its accounting uses. The noise is
  sized for n_min = ceil(secagg_threshold * expected clients) survivors."""
  fed_cfg, rounds, n = ctx.config.fed, ctx.config.rounds, ctx.clients.num_clients
  q = participation_rate(fed_cfg, n)
  expected = max(1, round(pfed.expected_clients(fed_cfg, n)))
  n_min = max(2, math.ceil(cfg.secagg_threshold * expected))
  dimension = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
      jax.eval_shape(ctx.model.init, jax.random.key(0))))
  key = ("ddgauss_mech", cfg.clip_norm, dimension, n_min, expected, cfg.secagg_bits,
         cfg.noise_multiplier, cfg.target_epsilon, rounds, q, cfg.delta)
  mech = _memo(key, lambda: ddgauss.DDGauss.create(
      clip=cfg.clip_norm, dimension=dimension, n_min=n_min, expected_clients=expected,
      bits=cfg.secagg_bits, noise_multiplier=cfg.noise_multiplier,
      target_epsilon=cfg.target_epsilon, rounds=rounds, q=q, delta=cfg.delta))
  return mech, q


def _none(cfg: PrivacyConfig, ctx: fl_train.RunContext) -> fl_train.Plugins:
  del cfg, ctx
  return fl_train.Plugins()


def _prune(cfg: PrivacyConfig, ctx: fl_train.RunContext) -> fl_train.Plugins:
  del ctx
  return fl_train.Plugins(defense=defenses.topk_prune(cfg.prune_fraction),
                          description=f"top-k pruning of {cfg.prune_fraction:.0%} (not DP)")


def _quantize(cfg: PrivacyConfig, ctx: fl_train.RunContext) -> fl_train.Plugins:
  del ctx
  return fl_train.Plugins(defense=defenses.quantize(cfg.quantize),
                          description=f"{cfg.quantize} quantization (not DP)")


def _sigma(cfg: PrivacyConfig, epsilon_of_sigma: Callable[[float], float]) -> float:
  """The configured sigma, or the smallest one whose epsilon meets the target."""
  if cfg.noise_multiplier is not None:
    return cfg.noise_multiplier
  return accounting.calibrate_noise(epsilon_of_sigma, cfg.target_epsilon)


def _event_sigma(cfg: PrivacyConfig, make_event: Callable[[float], Any], accountant: str,
                 neighbouring: str) -> float:
  """As `_sigma` for a whole-run event (PLD calibration is bracketed by RDP first)."""
  if cfg.noise_multiplier is not None:
    return cfg.noise_multiplier
  return accounting.calibrate(make_event, cfg.target_epsilon, cfg.delta, accountant=accountant,
                              neighbouring=neighbouring)


@dataclasses.dataclass(frozen=True)
class _UserLevel:
  """Sigma and per-round epsilon of a user-level Gaussian sum over sampled clients."""

  sigma: float
  round_metrics: Callable[[int], dict]
  text: str
  guarantees: dict[str, Any]


def _user_level(cfg: PrivacyConfig, ctx: fl_train.RunContext) -> _UserLevel:
  """DP-FedAvg's accounting (also distributed DP's): event per round from the client
  sampling, sigma calibrated for the run, epsilon after round r."""
  fed_cfg, rounds, n = ctx.config.fed, ctx.config.rounds, ctx.clients.num_clients
  neighbouring = pfed.dp_fedavg_event(fed_cfg, n, 1.0)[1]
  event_of = lambda s: pfed.dp_fedavg_event(fed_cfg, n, s)[0]  # noqa: E731
  name = "rdp" if neighbouring == "replace_one" else cfg.accountant
  if not accounting.make_accountant(name, neighbouring).supports(event_of(1.0)):
    raise ValueError(f"the {name} accountant cannot account {type(event_of(1.0)).__name__} "
                     f"(Poisson client sampling truncated by --fed.poisson_cap): use "
                     f"--privacy.accountant pld, or --fed.poisson_cap 0")
  sigma = _memo(("user_sigma", repr(fed_cfg), n, rounds, repr(cfg), name, neighbouring),
                lambda: _event_sigma(cfg, lambda s: accounting.compose([(event_of(s), rounds)]),
                                     name, neighbouring))
  running = _RoundAccountant(name, neighbouring, cfg.delta, event_of(sigma))
  replace_one = None
  if neighbouring == "add_remove" and accounting.make_accountant("pld", "replace_one").supports(
      event_of(sigma)):  # the relation forward noise is accounted under, for comparisons
    replace_one = _RoundAccountant("pld", "replace_one", cfg.delta, event_of(sigma))

  def round_metrics(r):
    out = {"epsilon": running.epsilon(r), "noise_multiplier": sigma}
    if replace_one is not None:
      out["epsilon_replace_one"] = replace_one.epsilon(r)
    return out

  threat = "model observer (trusted server, participation hidden)"
  guarantees = {"epsilon": _guarantee(threat, neighbouring, event_of(sigma), name)}
  if replace_one is not None:
    guarantees["epsilon_replace_one"] = _guarantee(threat, "replace_one", event_of(sigma), "pld")
  return _UserLevel(
      sigma=sigma,
      round_metrics=round_metrics,
      text=f"user level, {neighbouring}, C={cfg.clip_norm}, sigma={sigma:.4g}, {name} accountant, "
           f"delta={cfg.delta:g}",
      guarantees=guarantees)


def _dp_fedavg(cfg: PrivacyConfig, ctx: fl_train.RunContext) -> fl_train.Plugins:
  user = _user_level(cfg, ctx)
  expected = pfed.expected_clients(ctx.config.fed, ctx.clients.num_clients)
  adaptive = None
  if cfg.adaptive_clipping:
    adaptive = pfed.AdaptiveClipping(
        target_quantile=cfg.target_quantile, lr=cfg.clip_lr,
        count_noise_multiplier=cfg.count_noise_multiplier or expected / 20)
  aggregate = pfed.dp_fedavg(clip_norm=cfg.clip_norm, noise_multiplier=user.sigma,
                             expected_clients=expected, adaptive=adaptive)
  _write_privacy_json(ctx, {"mechanism": "dp_fedavg", "noise_multiplier": user.sigma,
                            "delta": cfg.delta, "noise_seed": cfg.noise_seed,
                            "guarantees": user.guarantees})
  return fl_train.Plugins(
      aggregate=aggregate, round_metrics=user.round_metrics,
      description=f"DP-FedAvg{' (adaptive clipping)' if adaptive else ''}, {user.text}")


# Accounting is a pure function of its inputs: a process that runs many trainings (a study's
# seeds and partitions share the client sampling, hence the events) computes each once. The
# memo keeps the MEMO_SIZE most recently used results (floats, sigmas, RDP curves of a few
# hundred orders, DDGauss mechanisms: a few MB at most); older ones are recomputed if needed.
MEMO_SIZE = 4096
_MEMO: collections.OrderedDict[tuple, Any] = collections.OrderedDict()


def _memo(key: tuple, compute: Callable[[], Any]) -> Any:
  if key in _MEMO:
    _MEMO.move_to_end(key)
    return _MEMO[key]
  value = _MEMO[key] = compute()
  if len(_MEMO) > MEMO_SIZE:
    _MEMO.popitem(last=False)
  return value


class _RoundAccountant:
  """epsilon(r) after r rounds of the same event (a function of r only, so resumable)."""

  def __init__(self, name: str, neighbouring: str, delta: float, event):
    self.key = ("round_epsilon", (name, neighbouring, delta), repr(event))
    self.repeated = accounting.RepeatedEvent(event, accountant=name, neighbouring=neighbouring,
                                             delta=delta)  # one composition more per round

  def epsilon(self, r: int) -> float:
    return _memo(self.key + (r,), lambda: self.repeated.epsilon(r))


def _participation_counts(ctx: fl_train.RunContext) -> np.ndarray:
  """`[rounds + 1, C]`: how many rounds each client took part in, after round r."""
  taken = np.asarray(pfed.participation(ctx.config.fed, ctx.clients.num_clients, ctx.run_key,
                                        range(ctx.config.rounds)))
  return np.concatenate([np.zeros((1, taken.shape[1])), np.cumsum(taken, axis=0)])


def _record_level(cfg: PrivacyConfig, ctx: fl_train.RunContext, sigma: float | None
                  ) -> tuple[float, fed.ClientUpdateFn, Callable[[int], float]]:
  """DP-SGD inside every client: (sigma, its client update, worst-client epsilon after r
  rounds, RDP over the rounds each client took part in). sigma None: calibrated."""
  fed_cfg = ctx.config.fed
  sizes = np.asarray(ctx.clients.mask.sum(axis=1)).astype(int)
  counts = _participation_counts(ctx)

  def curves(sigma: float) -> dict[int, np.ndarray]:
    return {int(s): _memo(("dpsgd_curve", repr(fed_cfg), int(s), sigma), lambda s=s: accounting.rdp_curve(
        pfed.dpsgd_client_event(fed_cfg, int(s), sigma))) for s in np.unique(sizes)}

  def worst(curve_of: dict[int, np.ndarray], participations: np.ndarray) -> float:
    pairs = {(int(s), int(k)) for s, k in zip(sizes, participations) if k > 0}
    return max([accounting.rdp_epsilon(k * curve_of[s], cfg.delta) for s, k in pairs], default=0.0)

  if sigma is None:
    sigma = _sigma(cfg, lambda s: worst(curves(s), counts[-1]))
  curve_of = curves(sigma)
  client_update = pfed.make_dpsgd_client_update(ctx.loss_fn, fed_cfg, clip_norm=cfg.clip_norm,
                                                noise_multiplier=sigma, per_layer=cfg.per_layer,
                                                clipping=cfg.clipping)
  return sigma, client_update, lambda r: worst(curve_of, counts[r])


def _dpsgd(cfg: PrivacyConfig, ctx: fl_train.RunContext) -> fl_train.Plugins:
  sigma, client_update, record_epsilon = _record_level(cfg, ctx, cfg.noise_multiplier)
  _write_privacy_json(ctx, {"mechanism": "dpsgd", "noise_multiplier": sigma, "delta": cfg.delta,
                            "noise_seed": cfg.noise_seed, "guarantees": {"epsilon": {
                                "threat_model": "everyone (server included), record level, the "
                                                "worst client over the rounds it took part in",
                                "relation": "add_remove (record)",
                                "event": "per round taken part in: dpsgd_client_event(size)",
                                "accountant": "rdp"}}})
  return fl_train.Plugins(
      client_update=client_update,
      round_metrics=lambda r: {"epsilon": record_epsilon(r), "noise_multiplier": sigma},
      description=(f"local DP-SGD (record level, add/remove), C={cfg.clip_norm}, "
                   f"sigma={sigma:.4g}, epsilon = max over clients (rdp), delta={cfg.delta:g}"))


def _local_dp(cfg: PrivacyConfig, ctx: fl_train.RunContext) -> fl_train.Plugins:
  counts = _participation_counts(ctx)

  def eps(sigma: float, uploads: int) -> float:
    if uploads == 0:
      return 0.0
    return accounting.epsilon(accounting.compose([(pfed.local_dp_event(sigma), uploads)]),
                              cfg.delta, accountant="pld")

  uploads = max(1, int(counts[-1].max()))
  sigma = _event_sigma(cfg, lambda s: accounting.compose([(pfed.local_dp_event(s), uploads)]),
                       "pld", "add_remove")
  _write_privacy_json(ctx, {"mechanism": "local_dp", "noise_multiplier": sigma, "delta": cfg.delta,
                            "noise_seed": cfg.noise_seed, "guarantees": {"epsilon": _guarantee(
                                "everyone (server included), per upload, the worst client",
                                "any two datasets of one client (sensitivity 2C)",
                                accounting.compose([(pfed.local_dp_event(sigma), uploads)]),
                                "pld")}})
  return fl_train.Plugins(
      defense=pfed.local_dp(clip_norm=cfg.clip_norm, noise_multiplier=sigma),
      round_metrics=lambda r: {"epsilon": eps(sigma, int(counts[r].max())), "noise_multiplier": sigma},
      description=(f"local DP on updates (sensitivity 2C), C={cfg.clip_norm}, sigma={sigma:.4g}, "
                   f"epsilon = max over clients of their uploads, delta={cfg.delta:g}"))


def noise_schedule(cfg: PrivacyConfig, rounds: int, q: float) -> fn.NoiseSchedule:
  """The forward-noise schedule of a run: its shape from the flags, scaled to the target."""
  z = cfg.noise_multiplier if cfg.noise_multiplier is not None else 1.0
  if cfg.schedule == "constant":
    shape = fn.constant(z, rounds)
  elif cfg.schedule == "staircase":
    shape = fn.staircase(list(np.geomspace(z, cfg.z_end, cfg.stairs)), rounds)
  elif cfg.schedule == "anneal":
    shape = fn.annealed(z, cfg.z_end, rounds)
  else:
    shape = fn.from_diffusion(cfg.schedule, cfg.t_start, cfg.t_end, rounds)
  if cfg.target_epsilon is None:
    return shape
  return fn.calibrate(shape, cfg.target_epsilon, cfg.delta, q=q)


def participation_rate(fed_cfg: fed.FedConfig, num_clients: int) -> float:
  """The probability that a given client takes part in a round, independently over rounds:
  q for Poisson sampling (at most q with a cap), m / C for fixed-size sampling. Local noise's
  visible-participation accounting is monotone in it, so an upper bound is exact enough."""
  if fed_cfg.sampling == "poisson":
    return fed_cfg.clients_per_round
  return fed.num_sampled(fed_cfg, num_clients) / num_clients


def _write_privacy_json(ctx: fl_train.RunContext, record: dict[str, Any]) -> None:
  """privacy.json: the mechanism and, for every epsilon it logs, the threat model, the
  neighbouring relation, the dp_accounting event (JSON) and the accountant."""
  if ctx.workdir is not None and jax.process_index() == 0:
    (ctx.workdir / "privacy.json").write_text(json.dumps(record, indent=1) + "\n")


def _guarantee(threat_model: str, relation: str, event, accountant: str) -> dict[str, Any]:
  return {"threat_model": threat_model, "relation": relation,
          "event": accounting.event_to_json(event), "accountant": accountant}


def _forward_noise(cfg: PrivacyConfig, ctx: fl_train.RunContext) -> fl_train.Plugins:
  """Forward-diffusion noise on every upload (and its hybrids); see `privacy.forward_noise`."""
  fed_cfg, rounds, n = ctx.config.fed, ctx.config.rounds, ctx.clients.num_clients
  q = participation_rate(fed_cfg, n)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", fn.ScheduleWarning)
    schedule = noise_schedule(cfg, rounds, q)
  for w in caught:
    print(f"warning: {w.message}")
  schedule.check_rounds(rounds)
  shapes = jax.eval_shape(ctx.model.init, jax.random.key(0))  # only the tensor count is needed
  scale = None
  if cfg.scaling == "coordinate":  # the RMS of each tensor at a data-independent init
    scale = fn.public_scale(ctx.model.init(jax.random.key(0)))
  mech = fn.ForwardNoise(clip_norm=None if cfg.scaling == "norm" else cfg.clip_norm,
                         schedule=schedule, scaling=cfg.scaling, rescale=cfg.rescale,
                         coordinate_scale=scale)
  layers = len(jax.tree.leaves(shapes))
  event_z = mech.event_z(layers)
  # hybrid (a): the client's own noise and the central noise are in both worlds (replace-one)
  z_model = np.sqrt(event_z ** 2 + cfg.central_noise_multiplier ** 2)
  plugins: dict[str, Any] = {"defense": mech.defense()}
  text = [f"forward noise, {schedule.describe()}, {cfg.scaling} scaling, C={cfg.clip_norm}",
          "not DP (epsilon = inf, empirical only)" if not mech.private else
          f"replace-one user level, participation visible (rate {q:g}, no amplification)"]
  expected = pfed.expected_clients(fed_cfg, n)
  if cfg.central_noise_multiplier:
    plugins["aggregate"] = central_gaussian(cfg.central_noise_multiplier * cfg.clip_norm, expected)
    text.append(f"+ central noise z_C={cfg.central_noise_multiplier:g} (server sums the "
                f"uploads unclipped; model observer z = sqrt(z^2 + z_C^2), participation visible)")
  topup = None
  if cfg.topup_noise_multiplier:
    if cfg.scaling != "flat" or not mech.private:
      raise ValueError("privacy.topup_noise_multiplier needs --privacy.scaling flat (the "
                       "server tops up a per-coordinate noise of z C)")
    fn.check_topup(cfg.topup_noise_multiplier, schedule.z, fed.num_sampled(fed_cfg, n))
    plugins["aggregate"] = fn.topup_aggregator(schedule.z, cfg.topup_noise_multiplier,
                                               cfg.clip_norm, expected)
    event, relation = pfed.dp_fedavg_event(fed_cfg, n, cfg.topup_noise_multiplier)
    name = "rdp" if relation == "replace_one" else "pld"
    topup = _RoundAccountant(name, relation, cfg.delta, event)
    text.append(f"+ top-up to z_T={cfg.topup_noise_multiplier:.4g} by the trusted server "
                f"(participation hidden: model observer {relation}, "
                f"{type(event).__name__}, {name})")
  record_epsilon = None
  if cfg.record_noise_multiplier:
    sigma, plugins["client_update"], record_epsilon = _record_level(
        cfg, ctx, cfg.record_noise_multiplier)
    text.append(f"+ DP-SGD in clients sigma={sigma:g} (record level, add/remove, rdp)")
  counts = _participation_counts(ctx).max(axis=1)
  acc = fn.ScheduleAccountant(z_model, q=q, delta=cfg.delta, participations=counts,
                              record_epsilon=record_epsilon, private=mech.private)
  server = fn.ScheduleAccountant(event_z, q=1.0, delta=cfg.delta, participations=counts,
                                 record_epsilon=record_epsilon, private=mech.private)
  zs = schedule.z

  def round_metrics(r):
    model = acc.epsilons(r)
    # the server sees each upload before the central noise: its view is from z_L alone
    uploads = server.epsilons(r) if cfg.central_noise_multiplier or topup else model
    out = {"epsilon": model["epsilon"], "epsilon_server": uploads["epsilon_server"],
           "epsilon_record": uploads["epsilon_record"], "pld_grid": model.get("pld_grid", 0.0),
           "noise_multiplier": float(zs[min(r, rounds) - 1]) if r else float(zs[0])}
    if topup is not None:  # the model observer's view is the topped-up aggregate
      out["epsilon_visible"] = out["epsilon"]
      out["epsilon"] = topup.epsilon(r)
    return out

  uploads = [(float(v), k) for v, k in sorted(collections.Counter(event_z.tolist()).items())]
  observer = ("model observer (participation visible)", "replace_one",
              fn.schedule_event(z_model, q), "closed form (visible GDP mixture) or pld")
  guarantees = {
      "epsilon_server": _guarantee("server, per upload (worst client)", "replace_one",
                                   accounting.compose([(dp_event.GaussianDpEvent(v), k)
                                                       for v, k in uploads]), "gdp closed form"),
      "epsilon_record": _guarantee("record level (one example)", "add_remove (record)",
                                   accounting.compose([(dp_event.GaussianDpEvent(v / 2), k)
                                                       for v, k in uploads]),
                                   "gdp closed form, min with DP-SGD's rdp when clients run it"),
  }
  if topup is not None:
    guarantees["epsilon"] = _guarantee("model observer (trusted server hides participation)",
                                       topup.repeated.neighbouring, topup.repeated.event,
                                       topup.repeated.accountant)
    guarantees["epsilon_visible"] = _guarantee(*observer)
  else:
    guarantees["epsilon"] = _guarantee(*observer)
  _write_privacy_json(ctx, {
      "mechanism": "forward_noise", "schedule": schedule.to_json(), "event_z": list(event_z),
      "model_observer_z": list(z_model), "q": q, "delta": cfg.delta, "private": mech.private,
      "topup_noise_multiplier": cfg.topup_noise_multiplier, "noise_seed": cfg.noise_seed,
      "guarantees": guarantees if mech.private else {}, "description": "; ".join(text)})
  return fl_train.Plugins(round_metrics=round_metrics, description="; ".join(text), **plugins)


def central_gaussian(stddev: float, expected_clients: float) -> fed.Aggregator:
  """The server's central noise for the forward-noise hybrid: the sum of the (already
  clipped and noised) uploads, each with weight 1, plus N(0, stddev^2), over the public
  `expected_clients`. It does not clip again: the uploads' own noise would dominate it."""
  def update(updates, weights, state, key):
    return fn.noised_mean(updates, weights, stddev, expected_clients, key=key), state, {}
  return fed.Aggregator(lambda params: (), update)


def _pfdm(cfg: PrivacyConfig, ctx: fl_train.RunContext) -> fl_train.Plugins:
  """PFDM-style data-level noising: every client's images released once at t0."""
  data = fn.DataForwardNoise.at(cfg.diffusion, cfg.t_start)
  pixels = int(np.prod(ctx.dataset.image_shape))
  eps = data.epsilons(pixels, cfg.delta)
  key = jax.random.fold_in(ctx.run_key, 0x5FD)  # the one data release; no round key uses it

  def clients(batch):
    return dataclasses.replace(batch, x=data.apply(jnp.asarray(batch.x), key=key))

  return fl_train.Plugins(
      clients=clients,
      round_metrics=lambda r: {"epsilon": eps["epsilon_image"],
                               "epsilon_pixel": eps["epsilon_pixel"], "noise_multiplier": data.z},
      description=(f"PFDM data noising at {cfg.diffusion} t0={cfg.t_start} (z={data.z:.3g}), one "
                   f"release: epsilon {eps['epsilon_image']:.3g} per image, "
                   f"{eps['epsilon_pixel']:.3g} per pixel (replace one record), delta={cfg.delta:g}"))


MECHANISMS: dict[str, Callable[[PrivacyConfig, fl_train.RunContext], fl_train.Plugins]] = {
    "none": _none,
    "dp_fedavg": _dp_fedavg,
    "dpsgd": _dpsgd,
    "local_dp": _local_dp,
    "prune": _prune,
    "quantize": _quantize,
    "secagg": _secagg,
    "forward_noise": _forward_noise,
    "pfdm": _pfdm,
}
assert tuple(MECHANISMS) == MECHANISM_NAMES


def os_noise_key() -> jax.Array:
  """A threefry key from 64 bits of OS entropy (`--privacy.noise_seed os`)."""
  return jax.random.wrap_key_data(np.frombuffer(os.urandom(8), np.uint32), impl="threefry2x32")


def train_and_evaluate(config: PrivateExperimentConfig, workdir, **kwargs) -> dict[str, Any]:
  """`fljax.train.train_and_evaluate` with `config.privacy`'s mechanism plugged in."""
  make = MECHANISMS[config.privacy.mechanism]
  # With a target epsilon, sigma is calibrated for `rounds`: extending the run would
  # overspend, so a rerun with more rounds is refused.
  extendable = () if config.privacy.target_epsilon is not None else ("rounds",)

  def plugins(ctx):
    made = make(config.privacy, ctx)
    if config.privacy.noise_seed == "os":
      made = dataclasses.replace(made, noise_key=os_noise_key(),
                                 description=made.description + "; noise keys from OS entropy")
    return made

  return fl_train.train_and_evaluate(config, workdir, plugins=plugins, extendable=extendable,
                                     **kwargs)


def main(argv: list[str] | None = None) -> None:
  """`fljax.train`'s command line with the `--privacy.*` flags."""
  fl_train.main(argv, config_cls=PrivateExperimentConfig, run=train_and_evaluate)


if __name__ == "__main__":
  main()
