"""The study's grid: its registries, its config and presets, and the calibrated noise.

One defense registry (`DEFENSES`) serves the comparative study (`studies.runner`), the
privacy/utility trade-off (`studies.tradeoff`) and the scaling study (`studies.scaling`):
each entry says how FedAvg trains under the defense (`privacy.train.PrivacyConfig`
fields) and what the honest-but-curious server sees of one upload (its `view`):

  clear      the client's update as sent: no defense, or central DP (DP-FedAvg clips and
             noises at the server, after it has seen the update; Geyer et al. 2017,
             McMahan et al. 2018)
  local_dp   the update of one DP-SGD step on the batch: clip C, noise sigma C / B (exact
             for B = 1; for B > 1 the update is clipped as a whole)
  forward    the upload sqrt(abar) clip_C(u) + sqrt(1 - abar) C xi at the upload's z (the
             hybrids' central noise comes after the server has seen it)
  prune      its top 10% entries
  aggregate  only the mean of the n = q C sampled clients' updates (SecAgg; with the
             distributed discrete Gaussian each is clipped to C and the mean carries the
             summed noise, modelled as sigma C / n): with FedSGD, the gradient of the union
             of their batches
  None       no attack cell (PFDM: the server sees clear updates of noised data)

Noise "calibrated as released" (the value `CALIBRATED` in a registry entry) is resolved
per grid by `privacy_fields`: forward noise's z* for epsilon 8 (model observer,
replace-one, participation visible), the hybrid's central z_C on top of z_L, and the
top-up's participation-independent total z_T.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fljax import config as config_lib
from fljax import federated as fed
from fljax import models
from inversion import specs
from inversion.compare import parse_variant
from privacy import accounting
from privacy import federated as pfed
from privacy import forward_noise as fn

PARTITIONS: dict[str, dict[str, Any]] = {
    "iid": dict(partition="iid"),
    "dirichlet0.5": dict(partition="dirichlet", alpha=0.5),
    "dirichlet0.1": dict(partition="dirichlet", alpha=0.1),
    # Hsu et al.'s per-client draw at the same skew: it fits thousands of small clients,
    # where NIID-Bench's per-class draw at 0.1 cannot give each of 3,000 clients 2 examples
    "dirichlet0.1_per_client": dict(partition="dirichlet_per_client", alpha=0.1),
    "shards2": dict(partition="shards", shards_per_client=2),
}

# name -> (inversion.compare variant, paper)
ATTACKS: dict[str, tuple[str, str]] = {
    "dlg": ("dlg", "Zhu et al. 2019, Deep Leakage from Gradients"),
    "idlg": ("idlg", "Zhao et al. 2020, iDLG"),
    "ig": ("ig", "Geiping et al. 2020, Inverting Gradients"),
    "gifd": ("gifd", "Fang et al. 2023, GIFD (GAN prior, feature domain)"),
    "dps": ("dps[features=1]", "Chung et al. 2023 DPS as gradient inversion, with feature "
                               "matching (GI-DDPM style)"),
    "ggdm": ("ggdm", "Gu et al. 2024, GGDM (gradient-similarity guidance of DDPM sampling)"),
    "adaptive": ("dps[adaptive=true,denoise=rescale]", "diffusion-guided, noise-aware and "
                                                        "clip-aware (A1 of issue 8)"),
}

# attacks with a generative prior: each evaluation costs a prior network's pass too
GENERATIVE = ("gifd", "dps", "adaptive", "ggdm")

LOCAL_Z = 0.3  # forward noise's z per upload (empirically protective at issue 8's grid)
TARGET_EPSILON = 8.0  # the calibrated defenses' epsilon, at DELTA
DELTA = 1e-5
CALIBRATED = "eps8"  # a noise multiplier resolved by `privacy_fields`
RELEASED = "@released"  # suffix of an attack's plan name when it attacks the released model
TWICE_EXPECTED = "2qC"  # a Poisson cap of twice the expected clients, resolved by `fed_fields`


@dataclasses.dataclass(frozen=True)
class Defense:
  """A defense: how FL trains under it, and what the server sees (module docstring)."""

  privacy: dict[str, Any]  # `privacy.train.PrivacyConfig` fields
  view: str | None  # clear | local_dp | forward | prune | aggregate | None
  paper: str
  dp: bool = True
  fed: tuple[tuple[str, Any], ...] = ()  # FedConfig overrides


def _forward(z: float | str = LOCAL_Z, **privacy: Any) -> dict[str, Any]:
  return dict(mechanism="forward_noise", noise_multiplier=z, clip_norm=0.5, **privacy)


def _dp_fedavg(epsilon: float) -> Defense:
  return Defense(dict(mechanism="dp_fedavg", target_epsilon=epsilon, clip_norm=0.5), "clear",
                 "McMahan et al. 2018 (DP-FedAvg), user level")


DEFENSES: dict[str, Defense] = {
    "none": Defense(dict(mechanism="none"), "clear", "-", dp=False),
    "dp_fedavg_eps1": _dp_fedavg(1.0),
    "dp_fedavg_eps2": _dp_fedavg(2.0),
    "dp_fedavg_eps4": _dp_fedavg(4.0),
    "dp_fedavg_eps8": _dp_fedavg(8.0),
    "dp_fedavg_adaptive_eps8": Defense(
        dict(mechanism="dp_fedavg", target_epsilon=8.0, clip_norm=0.5, adaptive_clipping=True),
        "clear", "DP-FedAvg with adaptive clipping to the median norm (Andrew et al. 2021), "
                 "user level"),
    # forward noise's z* as DP-FedAvg's sigma: the two at equal epsilon under replace-one
    "dp_fedavg_replace_one_eps8": Defense(
        dict(mechanism="dp_fedavg", noise_multiplier=CALIBRATED, clip_norm=0.5), "clear",
        "McMahan et al. 2018 (DP-FedAvg) at forward noise's z for epsilon 8 (replace-one)"),
    # record level: client sampling is not credited, so a fixed q C clients a round (not
    # Poisson over all C slots) is the same privacy at a tenth of the per-example work; the
    # exact Poisson DP-SGD step pads every batch to the client's size, so its cost grows as
    # N^2 / B: local batches of 32 (DP-SGD's usual larger batches) keep it near the others'
    "dpsgd": Defense(dict(mechanism="dpsgd", noise_multiplier=1.0, clip_norm=1.0), "local_dp",
                     "Abadi et al. 2016 (DP-SGD) in each client, record level",
                     fed=(("sampling", "fixed"), ("local_batch_size", 32))),
    "secagg": Defense(dict(mechanism="secagg", secagg_clip=10.0, secagg_neighbours=8),
                      "aggregate", "Bonawitz et al. 2017; Bell et al. 2020 (SecAgg+)", dp=False),
    "secagg_ddp": Defense(dict(mechanism="secagg", target_epsilon=8.0, clip_norm=0.5,
                               secagg_bits=20, secagg_neighbours=8), "aggregate",
                          "SecAgg+ with the distributed discrete Gaussian (Kairouz et al. "
                          "2021), epsilon 8 replace-one, participation visible"),
    "forward": Defense(_forward(), "forward", "forward-diffusion noise on updates (issue 8), "
                       "z = 0.3"),
    "forward_z0.03": Defense(_forward(0.03), "forward", "forward noise, z = 0.03"),
    "forward_z0.1": Defense(_forward(0.1), "forward", "forward noise, z = 0.1"),
    "forward_z1": Defense(_forward(1.0), "forward", "forward noise, z = 1"),
    "forward_eps8": Defense(
        _forward(None, target_epsilon=8.0), "forward",
        "forward noise, constant z calibrated to epsilon 8 (replace-one, participation visible)"),
    "forward_anneal_eps8": Defense(
        _forward(None, target_epsilon=8.0, schedule="anneal", z_end=1 / 3), "forward",
        "forward noise annealed to z_end / z_0 = 1/3, scaled to epsilon 8"),
    "forward_cosine_eps8": Defense(
        _forward(None, target_epsilon=8.0, schedule="cosine", t_start=950, t_end=700),
        "forward", "forward noise on a cosine schedule t 950 -> 700, scaled to epsilon 8"),
    "forward_dpsgd": Defense(
        _forward(record_noise_multiplier=1.0), "forward",
        "forward noise z = 0.3 on DP-SGD (sigma 1) inside clients (the attack sees the forward "
        "noise only: in its favour)"),
    "hybrid": Defense(_forward(central_noise_multiplier=CALIBRATED), "forward",
                      "forward noise z = 0.3 + central noise to epsilon 8 (replace-one, "
                      "participation visible)"),
    # the trusted server hides participation: a cap of 2 q C slots keeps the top-up total
    # z_T >= sqrt(slots) z_L affordable
    "topup": Defense(_forward(topup_noise_multiplier=CALIBRATED), "forward",
                     "forward noise z = 0.3 topped up by the trusted server to a "
                     "participation-independent total (epsilon <= 8, add/remove, amplified)",
                     fed=(("poisson_cap", TWICE_EXPECTED),)),
    # the top-up at a tenth of forward noise's z: its floor sqrt(2 q C) z_L is a tenth too
    "topup_z0.03": Defense(_forward(0.03, topup_noise_multiplier=CALIBRATED), "forward",
                           "forward noise z = 0.03 topped up by the trusted server (as topup)",
                           fed=(("poisson_cap", TWICE_EXPECTED),)),
    "topup_z0.1": Defense(_forward(0.1, topup_noise_multiplier=CALIBRATED), "forward",
                          "forward noise z = 0.1 topped up by the trusted server (as topup)",
                          fed=(("poisson_cap", TWICE_EXPECTED),)),
    "pfdm": Defense(dict(mechanism="pfdm", t_start=500), None,
                    "clients train on forward-diffused data, t0 = 500 (one release per image)"),
    "prune": Defense(dict(mechanism="prune", prune_fraction=0.9), "prune",
                     "Zhu et al. 2019 (gradient pruning)", dp=False),
}

# the comparative study's defenses (--compare, --full), and the default grid's: one of each
# mechanism (the epsilon sweep, SecAgg alone and the top-up only in the larger grids)
STUDY_DEFENSES = ("none", "dp_fedavg_eps1", "dp_fedavg_eps4", "dp_fedavg_eps8", "dpsgd",
                  "secagg", "secagg_ddp", "forward", "hybrid", "topup", "prune")
DEFAULT_DEFENSES = ("none", "dp_fedavg_eps8", "dpsgd", "secagg_ddp", "forward", "hybrid",
                    "prune")
MODEL_STATES = ("untrained", "trained")
# every model state an attack can hit: also the global model after half the FL rounds
# (`fljax.train.ExperimentConfig.snapshot_rounds`)
ALL_MODEL_STATES = ("untrained", "midway", "trained")
# the scale preset's defenses: every mechanism, the epsilon sweep with fixed and adaptive
# clipping, and forward noise with its schedules, alone, topped up and with central noise
SCALE_DEFENSES = ("none", "dp_fedavg_eps1", "dp_fedavg_eps2", "dp_fedavg_eps4", "dp_fedavg_eps8",
                  "dp_fedavg_adaptive_eps8", "secagg_ddp", "dpsgd", "secagg", "prune", "forward",
                  "forward_eps8", "forward_anneal_eps8", "forward_cosine_eps8", "hybrid", "topup",
                  "topup_z0.1", "topup_z0.03")

# the study's initialisation of each model where it is not Flax's default: DLG's LeNet keeps
# DLG's uniform(-0.5, 0.5) (with LeCun-normal weights its sigmoids sit on a plateau: FedAvg
# left it at 10 % test accuracy after 10 rounds, centralised SGD after 400 steps; uniform, it
# reaches 82 % in 100 rounds; docs/study.md)
MODEL_INITS = {"lenet": "uniform"}
# the FedAvg rounds a study runs by default where the CNN's 10 leave a model untrained: the
# LeNet reaches 12 % test accuracy after 10 rounds and 82 % after 100 (100 clients, q 0.1)
MODEL_ROUNDS = {"lenet": 100}


def model_init(name: str) -> str:
  """The study's initialisation of model `name` (`fljax.models` init names)."""
  return MODEL_INITS.get(name, "default")


def make_model(name: str, ds: Any) -> models.Model:
  """The study's model `name` for dataset `ds`, with its study initialisation."""
  return models.make(name, num_classes=ds.num_classes, input_shape=ds.image_shape,
                     init=model_init(name))


def init_field(name: str) -> dict[str, str]:
  """{"init": ...} where the model's initialisation is not the default, else {}: what a
  cell or trial's config adds, so that the hashes of default-initialised models keep."""
  return {} if model_init(name) == "default" else {"init": model_init(name)}
# the attacks of the default grid under the defenses: the tuned strongest classical attack
# and the diffusion attack that knows the defense (issue 20's first point)
DEFENSE_ATTACKS = ("ig", "adaptive")
# the attacks of the default grid at B > 1: all but the diffusion ones, whose 16 victims
# of 4 images cost about 4.5 minutes each per model state here (issue 20's note)
BATCH_ATTACKS = ("dlg", "idlg", "ig", "gifd")
# the default grid's attacks: all but dlg, which iDLG dominates by construction (the same
# L-BFGS on the same objective, with the label read off the update instead of learned; at
# the comparison's first point it trailed iDLG at every rung)
DEFAULT_ATTACKS = ("idlg", "ig", "gifd", "dps", "ggdm", "adaptive")


def check_names(kind: str, names: Iterable[str], valid: Iterable[str]) -> list[str]:
  """`names`, all of them in `valid`; else ValueError listing the valid ones."""
  names, valid = list(names), list(valid)
  bad = [n for n in names if n not in valid]
  if bad:
    raise ValueError(f"unknown {kind} {', '.join(map(repr, bad))}; valid: {', '.join(valid)}")
  if not names:
    raise ValueError(f"at least one {kind} is needed")
  return names


def expected_clients(q: float, clients: int) -> int:
  """q C clients a round on average, at least one (what a study's views and caps use)."""
  return max(1, round(q * clients))


def _names(default: tuple[str, ...], registry: Iterable[str]) -> Any:
  return dataclasses.field(default=default, metadata={"choices": tuple(registry)})


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSpec:
  """The data every cell reads.

  Attributes:
    name: dataset: mnist (embedded), digits, fashion_mnist, or tfds:<name>.
    image_size, channels: images are resized to this geometry (32x32x1: the shipped
      priors'; none: the dataset's own).
  """

  name: str = "mnist"
  image_size: int | None = 32
  channels: int | None = 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class StudyConfig:
  """A study's grid and the size of each cell.

  Attributes:
    partitions: data partitions of the FL cells.
    defenses: defenses of the FL cells.
    attacks: attacks of the attack cells.
    seeds: every FL cell runs once per seed; attack cells on `attack_seeds` of them.
    attack_seeds: the seeds whose FL cells are attacked.
    batch_sizes: B, the images behind each attacked upload.
    local_steps: local SGD steps behind it (1: a FedSGD gradient; s > 1: FedAvg, s
      full-batch steps).
    model_states: untrained (the run's initial model), midway (its global model after half
      the rounds) and/or trained (its final model).
    data: the data.
    clients: clients C of the federated run.
    q: Poisson sampling rate: q C clients a round on average.
    poisson_cap: static client slots a round (0: all C, exact Poisson; with thousands of
      clients every round then gathers them all). A cap truncates the rare rounds where
      more join, which DP accounting charges for (`TruncatedSubsampledGaussianDpEvent`).
    rounds: FedAvg rounds (none: the model's, `MODEL_ROUNDS`: 10, DLG's LeNet 100).
    model: the model (fljax.models).
    victims: attacked uploads per attack cell.
    budgets: the budget ladder (double-backward evaluations of the victim model per
      victim, strictly increasing): on the clear update (defense `none`) every attack runs
      at each rung up to its cap, each rung a run of its own (an attack's schedule is sized
      to its budget), so that quality is read against evaluations and seconds.
    generative_budget: the cap of the attacks with a generative prior (gifd, dps,
      adaptive, ggdm), whose evaluations cost a prior network's pass too.
    defense_budget: under every other defense an attack runs once, at its largest rung
      not above this, for the batch sizes `defense_batch_sizes`.
    defense_batch_sizes: B of the attack cells under defenses other than `none`.
    batch_attacks: the attacks (of `attacks`) run on the clear update at B > 1 (all of
      `attacks` when none of them is listed).
    batch_budget: on the clear update at B > 1 the ladder stops at this rung (an
      evaluation costs B times more there).
    defense_attacks: the attacks (of `attacks`) run under defenses other than `none` (all
      of `attacks` when none of them is listed).
    defense_victims: attacked uploads per attack cell under defenses other than `none`.
    defense_model_states: the model states attacked under defenses other than `none`.
    released_attacks: attacks also run against the released model, under every defense
      (a model observer's view: two consecutive global models give the round's mean
      update over its n = q C clients, with DP-FedAvg's central noise; `RELEASED`), at
      one rung as under a defense (`rungs`), B in `defense_batch_sizes`, models
      `defense_model_states`.
    prior_only_steps: sampler steps of the prior-only baseline (the diffusion prior's
      sample at the labels inferred from the update; 0: no prior baselines).
    eval_every: test accuracy every this many rounds.
  """

  partitions: tuple[str, ...] = _names(("iid",), PARTITIONS)
  defenses: tuple[str, ...] = _names(DEFAULT_DEFENSES, DEFENSES)
  attacks: tuple[str, ...] = _names(DEFAULT_ATTACKS, ATTACKS)
  seeds: tuple[int, ...] = (0, 1, 2)
  attack_seeds: tuple[int, ...] = (0,)
  batch_sizes: tuple[int, ...] = (1, 4)
  local_steps: tuple[int, ...] = (1,)
  model_states: tuple[str, ...] = _names(MODEL_STATES, ALL_MODEL_STATES)
  data: DataSpec = DataSpec()
  clients: int = 100
  q: float = 0.1
  poisson_cap: int = 0
  rounds: int | None = None
  model: str = "cnn"
  victims: int = 16
  budgets: tuple[int, ...] = (30, 100, 300, 1000)
  generative_budget: int = 30
  defense_budget: int = 30
  defense_batch_sizes: tuple[int, ...] = (1,)
  batch_attacks: tuple[str, ...] = _names(BATCH_ATTACKS, ATTACKS)
  batch_budget: int = 100
  defense_attacks: tuple[str, ...] = _names(DEFENSE_ATTACKS, ATTACKS)
  defense_victims: int = 8
  defense_model_states: tuple[str, ...] = _names(("untrained",), ALL_MODEL_STATES)
  released_attacks: tuple[str, ...] = _names((), ATTACKS)
  prior_only_steps: int = 30
  eval_every: int = 2

  def __post_init__(self):
    check_names("partition", self.partitions, PARTITIONS)
    check_names("defense", self.defenses, DEFENSES)
    check_names("attack", self.attacks, ATTACKS)
    check_names("model state", self.model_states, ALL_MODEL_STATES)
    check_names("defense attack", self.defense_attacks, ATTACKS)
    check_names("batch attack", self.batch_attacks, ATTACKS)
    check_names("defense model state", self.defense_model_states, ALL_MODEL_STATES)
    if self.released_attacks:  # none is a valid choice here
      check_names("released attack", self.released_attacks, ATTACKS)
    if not 0 < self.q <= 1:
      raise ValueError(f"q must be in (0, 1], got {self.q}")
    if not 0 <= self.poisson_cap <= self.clients:
      raise ValueError(f"poisson_cap must be in [0, clients={self.clients}], got {self.poisson_cap}")
    if 0 < self.poisson_cap < self.expected_clients():
      raise ValueError(f"poisson_cap {self.poisson_cap} is below the {self.expected_clients()} "
                       f"clients expected a round (q C): most rounds would be truncated; use "
                       f"at least 1.5 q C, or 0 (no cap)")
    if not self.seeds or not set(self.attack_seeds) <= set(self.seeds):
      raise ValueError(f"attack_seeds {list(self.attack_seeds)} must be among seeds {list(self.seeds)}")
    for name in ("clients", "fl_rounds", "victims", "generative_budget", "defense_budget",
                 "batch_budget", "defense_victims", "eval_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name.removeprefix('fl_')} must be >= 1, got {getattr(self, name)}")
    sizes = self.batch_sizes + self.local_steps + self.defense_batch_sizes
    if not self.batch_sizes or not self.local_steps or not self.defense_batch_sizes or min(sizes) < 1:
      raise ValueError("batch sizes and local steps must be >= 1")
    b = list(self.budgets)
    if not b or b[0] < 1 or any(x >= y for x, y in zip(b, b[1:])):
      raise ValueError(f"the budget ladder must be strictly increasing and >= 1, got {b}: "
                       f"e.g. --budgets 30,100,300,1000")
    if self.prior_only_steps < 0:
      raise ValueError(f"prior_only_steps must be >= 0, got {self.prior_only_steps}")
    if b[0] > min(self.generative_budget, self.defense_budget):
      raise ValueError(f"generative_budget {self.generative_budget} and defense_budget "
                       f"{self.defense_budget} must be at least the ladder's first rung {b[0]}")

  @property
  def fl_rounds(self) -> int:
    """The FedAvg rounds the FL cells run: `rounds`, or the model's default."""
    return MODEL_ROUNDS.get(self.model, 10) if self.rounds is None else self.rounds

  def rungs(self, attack: str, defense: str, batch: int = 1) -> tuple[int, ...]:
    """The budgets an attack runs at under a defense: every rung up to the attack's cap
    on the clear update (`none`; at B > 1 also up to `batch_budget`), else (any other
    defense, or the released model, `RELEASED`) the largest one not above
    `defense_budget`."""
    cap = self.generative_budget if attack in GENERATIVE else max(self.budgets)
    ladder = tuple(x for x in self.budgets if x <= cap)
    if defense == "none":
      return tuple(x for x in ladder if batch == 1 or x <= self.batch_budget)
    return tuple(x for x in ladder if x <= self.defense_budget)[-1:]

  def batches(self, defense: str) -> tuple[int, ...]:
    return self.batch_sizes if defense == "none" else self.defense_batch_sizes

  def attacks_under(self, defense: str, batch: int = 1) -> tuple[str, ...]:
    """The attacks run under a defense at batch size B: those of `attacks` among
    `defense_attacks` (other defenses) or `batch_attacks` (the clear update at B > 1), or
    all of `attacks` when none of them is there (`--attacks dlg` runs dlg everywhere)."""
    if defense == "none" and batch == 1:
      return self.attacks
    among = self.batch_attacks if defense == "none" else self.defense_attacks
    return tuple(a for a in self.attacks if a in among) or self.attacks

  def states(self, defense: str) -> tuple[str, ...]:
    return self.model_states if defense == "none" else self.defense_model_states

  def expected_clients(self) -> int:
    return expected_clients(self.q, self.clients)


# StudyConfig overrides of `scripts/study.py --compare`, `--full` and `--tiny`, as flags
# name them. The default grid is sized for about 30 minutes on 2 CPU cores from seconds per
# victim measured here (2026-12-03, CNN, 16 victims): at B = 1, dlg 2.8 s at 1,000
# evaluations, dps 4.3 s at 30; at B = 4 each evaluation costs about 5 times more (dlg
# 4.1 s at 300), dps about 17 s at 30. `compare` is the attack comparison's grid (every
# attack at B 1 and 4 up to 1,000, generative ones to 100, all defenses): hours here.
PRESETS: dict[str, dict[str, Any]] = {
    "compare": {"victims": 16, "batch_sizes": (1, 4), "model_states": ("untrained", "trained"),
                "budgets": (30, 100, 300, 1000), "generative_budget": 100,
                "defense_budget": 300, "defense_attacks": tuple(ATTACKS),
                "defense_model_states": MODEL_STATES, "batch_attacks": tuple(ATTACKS),
                "batch_budget": 1000, "defenses": STUDY_DEFENSES, "attacks": tuple(ATTACKS),
                "defense_victims": 16},
    "full": {"partitions": ("iid", "dirichlet0.5", "dirichlet0.1"), "seeds": (0, 1, 2, 3, 4),
             "attack_seeds": (0, 1, 2), "rounds": 50, "victims": 32,
             "budgets": (30, 100, 300, 1000, 3000, 10000), "generative_budget": 1000,
             "defense_budget": 1000, "batch_sizes": (1, 4, 16), "defense_batch_sizes": (1, 4),
             "local_steps": (1, 5), "model_states": MODEL_STATES, "eval_every": 5,
             "defense_attacks": tuple(ATTACKS), "defense_model_states": MODEL_STATES,
             "batch_attacks": tuple(ATTACKS), "batch_budget": 10000, "defenses": STUDY_DEFENSES,
             "attacks": tuple(ATTACKS), "defense_victims": 32},
    # populations at scale (issue 22): Fashion-MNIST over 3,000 clients, about 100 a round
    # (Poisson into 160 slots: 6 sd above the mean, so truncation is rare and PLD charges it)
    # for 100 rounds, every defense, attacked on the untrained, midway and trained model (the
    # clear update too: each state has its baselines), at 300 evaluations (IG's plateau on the
    # clear update at this scale, 30 is far below it), on 16 victims under every defense as
    # on the clear update (DESIGN.md's floor; the 8 of an earlier version gave intervals too
    # wide to judge goal 2); about 3 min per FL cell here (54 cells; DDGauss 8.5), 4 to 5
    # hours in all with the attacks
    "scale": {"data.name": "fashion_mnist", "clients": 3000, "q": 1 / 30, "poisson_cap": 160,
              "rounds": 100, "eval_every": 10, "partitions": ("iid",), "seeds": (0, 1, 2),
              "attack_seeds": (0,), "defenses": SCALE_DEFENSES, "batch_sizes": (1,),
              "model_states": ALL_MODEL_STATES, "defense_model_states": ALL_MODEL_STATES,
              "defense_victims": 16, "defense_budget": 300,
              "released_attacks": ("ig",)},
    "tiny": {"data.name": "digits", "partitions": ("iid",), "defenses": ("none", "forward"),
             "attacks": ("ig",), "seeds": (0, 1), "attack_seeds": (0, 1), "clients": 8,
             "q": 0.5, "rounds": 2, "model": "mlp", "victims": 1, "budgets": (2, 4),
             "generative_budget": 4, "defense_budget": 4, "batch_sizes": (1,),
             "model_states": ("untrained",), "prior_only_steps": 0, "eval_every": 1,
             "defense_attacks": ("ig",), "defense_victims": 1},
}


def make(cls: type, *layers: Mapping[str, Any]) -> Any:
  """`cls` from layers of field values keyed as flags (`data.name`), a later layer's value
  winning: e.g. a preset, then the flags given."""
  return config_lib.build(cls, {k: v for layer in layers for k, v in layer.items()})


# ----------------------------------------------------------------------------- calibration


@functools.lru_cache(maxsize=16)
def replace_one_z(rounds: int, q: float) -> float:
  """Forward noise's constant z* for epsilon 8 over the rounds (model observer,
  replace-one, participation visible at rate q, PLD)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", fn.ScheduleWarning)
    return float(fn.calibrate(fn.constant(1.0, rounds), TARGET_EPSILON, DELTA, q=q).z[0])


def central_z(rounds: int, q: float) -> float:
  """The hybrid's central z_C: sqrt(z_L^2 + z_C^2) = z*, so the model observer's epsilon
  is 8."""
  return math.sqrt(max(replace_one_z(rounds, q) ** 2 - LOCAL_Z ** 2, 1e-6))


@functools.lru_cache(maxsize=16)
def topup_z(rounds: int, q: float, clients: int, slots: int, local_z: float = LOCAL_Z) -> float:
  """The top-up's total z_T: sqrt(slots) z_L (the least the server can top up to), or
  DP-FedAvg's noise for epsilon 8 (add/remove, Poisson q truncated to `slots`, PLD) when
  that floor does not reach epsilon 8."""
  fed_cfg = fed.FedConfig(clients_per_round=q, sampling="poisson", poisson_cap=slots)
  run = lambda s: accounting.compose([(pfed.dp_fedavg_event(fed_cfg, clients, s)[0], rounds)])  # noqa: E731
  floor = math.sqrt(slots) * local_z
  if accounting.epsilon(run(floor), DELTA, neighbouring="add_remove") <= TARGET_EPSILON:
    return floor
  return accounting.calibrate(run, TARGET_EPSILON, DELTA, accountant="pld",
                              neighbouring="add_remove", sigma_min=floor)


def fed_fields(defense: str, *, q: float, clients: int, poisson_cap: int = 0) -> dict[str, Any]:
  """The FL cell's `FedConfig` fields: Poisson sampling at rate q (into `poisson_cap`
  slots when given, all C otherwise), then the defense's overrides, `TWICE_EXPECTED`
  resolved."""
  out = {"clients_per_round": q, "sampling": "poisson"}
  if poisson_cap:
    out["poisson_cap"] = poisson_cap
  for name, value in DEFENSES[defense].fed:
    out[name] = 2 * expected_clients(q, clients) if value == TWICE_EXPECTED else value
  return out


def privacy_fields(defense: str, *, rounds: int, q: float, clients: int) -> dict[str, Any]:
  """The defense's `PrivacyConfig` fields for a run of `rounds` at rate q over `clients`,
  its `CALIBRATED` noise multipliers resolved (rounded to 6 digits: they enter cell hashes)."""
  d = DEFENSES[defense]
  privacy = dict(d.privacy)
  resolve = {
      "noise_multiplier": lambda: replace_one_z(rounds, q),
      "central_noise_multiplier": lambda: central_z(rounds, q),
      "topup_noise_multiplier": lambda: topup_z(rounds, q, clients, fed_fields(
          defense, q=q, clients=clients)["poisson_cap"], privacy["noise_multiplier"]),
  }
  for name, value in resolve.items():
    if privacy.get(name) == CALIBRATED:
      privacy[name] = round(value(), 6)
  return {k: v for k, v in privacy.items() if v is not None}


# ----------------------------------------------------------------------------- tuned values

TUNED = Path(__file__).with_name("tuned.json")  # written by studies.tuning (--write_defaults)


def read_tuned(path: Path) -> dict[str, Any]:
  """The tuned values file ({} when absent); ValueError when it cannot be read."""
  if not path.exists():
    return {}
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} cannot be read ({e}); restore it from git") from None


def tuned_overrides(dataset: str, model: str, attack: str, *,
                    path: str | Path = TUNED) -> dict[str, Any]:
  """The tuned `AttackSpec` overrides of `attack` (a study name) on `dataset` and `model`
  ({} when it was not tuned there), to merge into its variant (`with_overrides`).

  Raises:
    ValueError: the file is unreadable or names a key that is not an AttackSpec field.
  """
  path = Path(path)
  values = dict(read_tuned(path).get(f"{dataset}/{model}", {}).get(attack, {}))
  fields = {f.name for f in dataclasses.fields(specs.AttackSpec)} - {"name"}
  bad = sorted(set(values) - fields)
  if bad:
    raise ValueError(f"{path} gives {attack} on {dataset}/{model} the values {bad}, which are "
                     f"not attack settings; valid: {', '.join(sorted(fields))}")
  return values


def with_overrides(variant: str, overrides: dict[str, Any]) -> str:
  """`variant` with `overrides` merged in (theirs win), written as `parse_variant` reads
  it: with_overrides('dps[features=1]', {'scale': 64.0}) == 'dps[features=1.0,scale=64.0]'."""
  name, current = parse_variant(variant)
  merged = {**current, **overrides}
  if not merged:
    return name
  return f"{name}[{','.join(f'{k}={_written(v)}' for k, v in sorted(merged.items()))}]"


def _written(value: Any) -> str:
  """A value as a variant (or a flag) writes it."""
  if value is None:
    return "none"
  return str(value).lower() if isinstance(value, bool) else str(value)


# a dataset whose attacks have not been tuned on it takes the tuning of one with the same
# image geometry and model (every attack alike, so the comparison stays equal-effort)
TUNING_FALLBACK = {"fashion_mnist": "mnist"}


def tuning_dataset(dataset: str, model: str, *, path: str | Path = TUNED) -> str:
  """The dataset whose tuned values a study on `dataset` uses (`TUNING_FALLBACK`)."""
  if f"{dataset}/{model}" not in read_tuned(Path(path)) and dataset in TUNING_FALLBACK:
    return TUNING_FALLBACK[dataset]
  return dataset


def prior_overrides(attack: str, dataset: str) -> dict[str, str]:
  """The generative prior an attack samples on `dataset`: the one trained on that dataset
  when one ships (`diffusion.prior.SHIPPED`, `inversion.gan.SHIPPED`), by name; {} for
  MNIST (the default priors) and for datasets without their own."""
  from diffusion import prior as prior_lib
  from inversion import gan as gan_lib
  if attack not in GENERATIVE or dataset == "mnist":
    return {}
  field, shipped = ("gan", gan_lib.SHIPPED) if attack == "gifd" else ("prior", prior_lib.SHIPPED)
  return {field: dataset} if dataset in shipped else {}


def variant(attack: str, dataset: str, model: str, *, path: str | Path = TUNED) -> str:
  """The variant a study runs for `attack` on `dataset` and `model`: its registry variant
  with the values tuned there (`studies.tuning`; `TUNING_FALLBACK`) and the dataset's own
  prior merged in; `adaptive` takes dps's tuning."""
  tuned = tuned_overrides(tuning_dataset(dataset, model, path=path), model,
                          "dps" if attack == "adaptive" else attack, path=path)
  return with_overrides(ATTACKS[attack][0], {**tuned, **prior_overrides(attack, dataset)})
