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
  secagg      aggregate       server sees only the sum;   (none), or with a noise multiplier:
                              + distributed DP: model     accountant over rounds
                              observer, user level

What the guarantee covers: the model parameters (and, for `dpsgd` and `local_dp`, every
update the server receives). The training loss and other diagnostics in metrics.jsonl
are computed from raw client data for the experimenter and are not private.

With `target_epsilon` set, the noise multiplier is calibrated so that the epsilon after
`rounds` rounds meets it; client participation (needed by the per-client mechanisms) is
recomputed from the run's key, since client sampling does not depend on the data.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np

from fljax import train as fl_train
from privacy import accounting, defenses, secagg
from privacy import federated as pfed


MECHANISM_NAMES = ("none", "dp_fedavg", "dpsgd", "local_dp", "prune", "quantize", "secagg")
DP_MECHANISMS = ("dp_fedavg", "dpsgd", "local_dp")


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
    prune_fraction: prune: fraction of update entries zeroed.
    quantize: quantize: fp16 or int8.
    secagg_clip: secagg: each update coordinate is clipped to [-c, c] before encoding.
    secagg_bits: secagg: the protocol works mod 2^bits (at most 32).
    secagg_threshold: secagg: t as a fraction (> 1/2) of the round's clients (or of a
      SecAgg+ neighbourhood).
    secagg_neighbours: secagg: k > 0 runs SecAgg+ with k neighbours per client.
    secagg_dropout: secagg: probability that a client drops before its masked input.
  """

  mechanism: str = "none"
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
  prune_fraction: float = 0.9
  quantize: str = "int8"
  secagg_clip: float = 1.0
  secagg_bits: int = 32
  secagg_threshold: float = 0.6
  secagg_neighbours: int = 0
  secagg_dropout: float = 0.0

  def __post_init__(self):
    if self.mechanism not in MECHANISM_NAMES:
      raise ValueError(f"privacy.mechanism must be one of {MECHANISM_NAMES}, got {self.mechanism!r}")
    accounting.check_delta(self.delta)
    accounting.check_clip_norm(self.clip_norm)
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
    if self.accountant not in ("pld", "rdp"):
      raise ValueError(f"privacy.accountant must be 'pld' or 'rdp', got {self.accountant!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrivateExperimentConfig(fl_train.ExperimentConfig):
  """A federated run with a privacy mechanism (see `PrivacyConfig`)."""

  privacy: PrivacyConfig = PrivacyConfig()


# ----------------------------------------------------------------------------- mechanisms


def _secagg(cfg: PrivacyConfig, ctx: fl_train.RunContext) -> fl_train.Plugins:
  """Secure aggregation; with a noise multiplier or target epsilon, distributed DP on top."""
  private = cfg.noise_multiplier is not None or cfg.target_epsilon is not None
  settings = dict(clip=cfg.secagg_clip, bits=cfg.secagg_bits, threshold=cfg.secagg_threshold,
                  neighbours=cfg.secagg_neighbours, dropout=cfg.secagg_dropout)
  kind = f"SecAgg+ (k={cfg.secagg_neighbours})" if cfg.secagg_neighbours else "SecAgg"
  if not private:
    return fl_train.Plugins(aggregate=secagg.aggregator(secagg.SecureAggregation(**settings)),
                            description=f"{kind}, mod 2^{cfg.secagg_bits}, clip {cfg.secagg_clip} "
                                        f"(the server sees only the sum; not DP)")
  user = _user_level(cfg, ctx)
  return fl_train.Plugins(
      aggregate=secagg.aggregator(secagg.SecureAggregation(
          **settings, noise_multiplier=user.sigma, l2_clip=cfg.clip_norm)),
      round_metrics=user.round_metrics,
      description=f"{kind} with distributed DP ({user.text}; sigma over the survivors)")


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
  sigma = _event_sigma(cfg, lambda s: accounting.compose([(event_of(s), rounds)]), name,
                       neighbouring)
  running = _RoundAccountant(lambda: accounting.Accountant(name, neighbouring, cfg.delta),
                             event_of(sigma))
  return _UserLevel(
      sigma=sigma,
      round_metrics=lambda r: {"epsilon": running.epsilon(r), "noise_multiplier": sigma},
      text=f"user level, {neighbouring}, C={cfg.clip_norm}, sigma={sigma:.4g}, {name} accountant, "
           f"delta={cfg.delta:g}")


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
  return fl_train.Plugins(
      aggregate=aggregate, round_metrics=user.round_metrics,
      description=f"DP-FedAvg{' (adaptive clipping)' if adaptive else ''}, {user.text}")


class _RoundAccountant:
  """epsilon(r) after r rounds of the same event (a function of r only, so resumable)."""

  def __init__(self, make: Callable[[], accounting.Accountant], event):
    self.make, self.event = make, event

  def epsilon(self, r: int) -> float:
    return self.make().compose(self.event, r).epsilon()


def _participation_counts(ctx: fl_train.RunContext) -> np.ndarray:
  """`[rounds + 1, C]`: how many rounds each client took part in, after round r."""
  taken = np.asarray(pfed.participation(ctx.config.fed, ctx.clients.num_clients, ctx.run_key,
                                        range(ctx.config.rounds)))
  return np.concatenate([np.zeros((1, taken.shape[1])), np.cumsum(taken, axis=0)])


def _dpsgd(cfg: PrivacyConfig, ctx: fl_train.RunContext) -> fl_train.Plugins:
  fed_cfg = ctx.config.fed
  sizes = np.asarray(ctx.clients.mask.sum(axis=1)).astype(int)
  counts = _participation_counts(ctx)
  final = counts[-1]

  def curves(sigma: float) -> dict[int, np.ndarray]:
    return {int(s): accounting.rdp_curve(pfed.dpsgd_client_event(fed_cfg, int(s), sigma))
            for s in np.unique(sizes)}

  def worst(curve_of: dict[int, np.ndarray], participations: np.ndarray) -> float:
    pairs = {(int(s), int(k)) for s, k in zip(sizes, participations) if k > 0}
    return max([accounting.rdp_epsilon(k * curve_of[s], cfg.delta) for s, k in pairs], default=0.0)

  sigma = _sigma(cfg, lambda s: worst(curves(s), final))
  curve_of = curves(sigma)
  client_update = pfed.make_dpsgd_client_update(ctx.loss_fn, fed_cfg, clip_norm=cfg.clip_norm,
                                                noise_multiplier=sigma, per_layer=cfg.per_layer)
  return fl_train.Plugins(
      client_update=client_update,
      round_metrics=lambda r: {"epsilon": worst(curve_of, counts[r]), "noise_multiplier": sigma},
      description=(f"local DP-SGD (record level, add/remove), C={cfg.clip_norm}, "
                   f"sigma={sigma:.4g}, epsilon = max over clients (rdp), delta={cfg.delta:g}"))


def _local_dp(cfg: PrivacyConfig, ctx: fl_train.RunContext) -> fl_train.Plugins:
  counts = _participation_counts(ctx)

  def eps(sigma: float, uploads: int) -> float:
    if uploads == 0:
      return 0.0
    return accounting.epsilon(accounting.compose([(pfed.local_dp_event(sigma), uploads)]),
                              cfg.delta, accountant="pld")

  sigma = _event_sigma(cfg, lambda s: accounting.compose(
      [(pfed.local_dp_event(s), max(1, int(counts[-1].max())))]), "pld", "add_remove")
  return fl_train.Plugins(
      defense=pfed.local_dp(clip_norm=cfg.clip_norm, noise_multiplier=sigma),
      round_metrics=lambda r: {"epsilon": eps(sigma, int(counts[r].max())), "noise_multiplier": sigma},
      description=(f"local DP on updates (sensitivity 2C), C={cfg.clip_norm}, sigma={sigma:.4g}, "
                   f"epsilon = max over clients of their uploads, delta={cfg.delta:g}"))


MECHANISMS: dict[str, Callable[[PrivacyConfig, fl_train.RunContext], fl_train.Plugins]] = {
    "none": _none,
    "dp_fedavg": _dp_fedavg,
    "dpsgd": _dpsgd,
    "local_dp": _local_dp,
    "prune": _prune,
    "quantize": _quantize,
    "secagg": _secagg,
}
assert tuple(MECHANISMS) == MECHANISM_NAMES


def train_and_evaluate(config: PrivateExperimentConfig, workdir, **kwargs) -> dict[str, Any]:
  """`fljax.train.train_and_evaluate` with `config.privacy`'s mechanism plugged in."""
  make = MECHANISMS[config.privacy.mechanism]
  if config.privacy.target_epsilon is not None:
    # sigma is calibrated for `rounds`: extending the run would overspend, so refuse it.
    fl_train.check_workdir(Path(workdir), config, kwargs.get("overwrite", False), extendable=())
  return fl_train.train_and_evaluate(config, workdir, plugins=lambda ctx: make(config.privacy, ctx),
                                     **kwargs)


def main(argv: list[str] | None = None) -> None:
  """`fljax.train`'s command line with the `--privacy.*` flags."""
  fl_train.main(argv, config_cls=PrivateExperimentConfig, run=train_and_evaluate)


if __name__ == "__main__":
  main()
