"""studies.report: the best attack under each defense against the prior-only baseline."""

import numpy as np
import pytest

from studies import grid, report
from tests.studies.conftest import TINY


def _attack(defense, attack, state, psnrs, budget=4, seed=0, partition="iid"):
  return {"partition": partition, "defense": defense, "attack": attack, "state": state,
          "seed": seed, "batch": 1, "local_steps": 1, "budget": budget, "psnrs": list(psnrs)}


def _baselines(partition, state, prior):
  return {"partition": partition, "batch": 1, "local_steps": 1, "state": state, "seed": 0,
          "scores": {"prior_only": {"psnr": list(prior)}, "blank": {"psnr": [5.0] * 16},
                     "mean_image": {"psnr": [7.0] * 16}}}


def test_the_best_attack_is_paired_with_the_prior_only_baseline_on_its_victims():
  cfg = grid.make(grid.StudyConfig, TINY, {"defenses": ("none", "forward", "prune", "secagg"),
                                           "model_states": ("untrained", "trained")})
  prior = np.linspace(10.0, 14.0, 16)  # the clear update's 16 victims
  data = {"baselines": [_baselines("iid", s, prior) for s in ("untrained", "trained")],
          "attacks": [_attack("none", "ig", "untrained", prior + 9),  # the clear update: no row
                      _attack("forward", "ig", "untrained", prior[:8] - 3),
                      _attack("forward", "ig", "untrained", prior[:8] + 50, budget=2),  # a
                      # lower rung: not the defense's budget
                      _attack("forward", "ig", "trained", prior[:8] + 0.5),
                      _attack("prune", "ig", "untrained", prior[:8] + 4),
                      {**_attack("secagg", "ig", "untrained", np.zeros(100)), "view": "aggregate"}]}
  rows = {(r["defense"], r["state"]): r for r in report.against_prior_only(cfg, data)}
  assert {r["partition"] for r in rows.values()} == {"iid"}
  assert set(rows) == {("forward", "untrained"), ("forward", "trained"),
                       ("prune", "untrained")}
  far_below = rows[("forward", "untrained")]
  assert far_below["difference"] == pytest.approx(-3) and far_below["n"] == 8
  assert far_below["within"] == "yes" and far_below["prior_only"] == pytest.approx(
      np.median(prior[:8]))
  assert rows[("forward", "trained")]["within"] == "yes"  # +0.5 on every victim
  assert rows[("prune", "untrained")]["within"] == "no"
  assert rows[("prune", "untrained")]["low"] == pytest.approx(4)
  # the blind baseline is the better of the blank (5 dB) and mean image (7 dB): prune's
  # attack, 7 to 8.9 dB above it on every victim, recovers more than an output that needs
  # nothing from the update; forward's, 0 to 1.9 dB above it, is unresolved
  blind = rows[("prune", "untrained")]
  assert blind["blind"] == "mean_image" and blind["blind_psnr"] == pytest.approx(7)
  assert blind["blind_within"] == "no" and blind["blind_low"] > 6
  assert far_below["blind_within"] == "unresolved" and far_below["blind_low"] >= 0


def test_each_partition_is_paired_with_its_own_victims_baselines():
  # the victims of a partition are its own clients' (`cells.victim_batches`): the attack on a
  # skewed partition must meet the baselines scored on that partition's victims, not those
  # of whichever partition was read last
  cfg = grid.make(grid.StudyConfig, TINY, {"defenses": ("none", "forward"),
                                           "partitions": ("iid", "shards2"),
                                           "model_states": ("trained",)})
  iid, shards = np.linspace(10.0, 14.0, 16), np.linspace(20.0, 24.0, 16)
  data = {"baselines": [_baselines("iid", "trained", iid),
                        _baselines("shards2", "trained", shards)],
          "attacks": [_attack("forward", "ig", "trained", iid[:8] - 2),
                      _attack("forward", "ig", "trained", shards[:8] + 2, partition="shards2")]}
  rows = {r["partition"]: r for r in report.against_prior_only(cfg, data)}
  assert set(rows) == {"iid", "shards2"}
  assert rows["iid"]["difference"] == pytest.approx(-2) and rows["iid"]["within"] == "yes"
  assert rows["shards2"]["difference"] == pytest.approx(2) and rows["shards2"]["within"] == "no"
  assert rows["shards2"]["prior_only"] == pytest.approx(np.median(shards[:8]))
