"""studies.grid: names checked against the registries, presets, the calibrated noise."""

import functools
import math

import jax
import numpy as np
import pytest

from fljax import partitions
from studies import cells, grid


def test_unknown_names_are_refused_with_the_valid_ones_listed():
  with pytest.raises(ValueError, match="unknown attack 'foo'; valid: dlg, idlg, ig, gifd"):
    grid.StudyConfig(attacks=("foo",))
  with pytest.raises(ValueError, match="unknown partition 'dirichlet'; valid: iid"):
    grid.StudyConfig(partitions=("dirichlet",))
  with pytest.raises(ValueError, match="attack_seeds"):
    grid.make(grid.StudyConfig, grid.PRESETS["tiny"], {"seeds": (1,)})


def test_presets_are_flags_over_the_defaults():
  tiny = grid.make(grid.StudyConfig, grid.PRESETS["tiny"], {"rounds": 1})
  assert (tiny.data.name, tiny.defenses, tiny.rounds, tiny.clients) == (
      "digits", ("none", "forward"), 1, 8)
  assert grid.StudyConfig().defenses == grid.DEFAULT_DEFENSES
  assert set(grid.DEFAULT_DEFENSES) < set(grid.STUDY_DEFENSES)
  assert grid.make(grid.StudyConfig, grid.PRESETS["compare"]).defenses == grid.STUDY_DEFENSES


def test_calibrated_noise_is_resolved_per_grid():
  z = grid.replace_one_z(10, 0.1)
  hybrid = grid.privacy_fields("hybrid", rounds=10, q=0.1, clients=100)
  assert hybrid["central_noise_multiplier"] == pytest.approx(math.sqrt(z ** 2 - grid.LOCAL_Z ** 2),
                                                             abs=1e-6)
  assert grid.privacy_fields("dp_fedavg_replace_one_eps8", rounds=10, q=0.1, clients=100)[
      "noise_multiplier"] == pytest.approx(z, abs=1e-6)
  assert grid.replace_one_z(20, 0.1) > z  # more rounds, more noise for the same epsilon
  assert "noise_multiplier" not in grid.privacy_fields("forward_eps8", rounds=10, q=0.1,
                                                       clients=100)  # the run calibrates it


def test_the_budget_ladder_is_checked_and_capped_per_attack():
  for bad in ((100, 30), (30, 30), (), (0, 4)):
    with pytest.raises(ValueError, match="strictly increasing"):
      grid.StudyConfig(budgets=bad)
  cfg = grid.StudyConfig(budgets=(30, 100, 300, 1000), generative_budget=100, defense_budget=300)
  assert cfg.rungs("ig", "none") == (30, 100, 300, 1000)
  assert cfg.rungs("dps", "none") == cfg.rungs("gifd", "none") == (30, 100)
  assert cfg.rungs("ig", "forward") == (300,) and cfg.rungs("dps", "forward") == (100,)
  assert cfg.batches("none") == (1, 4) and cfg.batches("forward") == (1,)
  # at B > 1 the clear update's ladder stops at batch_budget, for the batch attacks only
  assert cfg.rungs("ig", "none", 4) == (30, 100) and cfg.rungs("ig", "forward", 4) == (300,)
  assert cfg.attacks_under("none", 4) == ("idlg", "ig", "gifd")  # dlg is not a default attack
  assert cfg.attacks_under("none", 1) == cfg.attacks and cfg.attacks_under("dpsgd", 1) == (
      "ig", "adaptive")
  with pytest.raises(ValueError, match="at least the ladder's first rung 30"):
    grid.StudyConfig(budgets=(30, 100), generative_budget=10)


def test_the_study_runs_each_attack_with_its_tuned_values(tmp_path):
  path = tmp_path / "tuned.json"
  path.write_text('{"mnist/cnn": {"dps": {"scale": 64.0}, "ig": {"tv": 0.1}}}')
  assert grid.variant("dps", "mnist", "cnn", path=path) == "dps[features=1.0,scale=64.0]"
  assert grid.variant("adaptive", "mnist", "cnn", path=path).startswith("dps[adaptive=true")
  assert "scale=64.0" in grid.variant("adaptive", "mnist", "cnn", path=path)  # dps's values
  assert grid.variant("ig", "mnist", "cnn", path=path) == "ig[tv=0.1]"
  assert grid.variant("ig", "mnist", "lenet", path=path) == "ig"  # not tuned there


def test_the_lenet_is_dlgs_with_its_init_and_other_models_keep_their_cell_hashes():
  import jax
  from fljax import datasets
  from studies import cells
  ds = datasets.load("digits", image_size=32, channels=1)
  params = grid.make_model("lenet", ds).init(jax.random.key(0))
  leaves = jax.tree.leaves(params)
  assert all(float(abs(p).max()) <= 0.5 for p in leaves)
  assert max(float(abs(p).max()) for p in leaves) > 0.4  # uniform(-0.5, 0.5), not LeCun
  cfg = grid.StudyConfig(model="lenet")
  assert cells.fl_cell(cfg, "iid", "none", 0)["init"] == "uniform"
  assert cells.fl_experiment(cells.fl_cell(cfg, "iid", "none", 0)).model.init == "uniform"
  cnn = cells.fl_cell(grid.StudyConfig(), "iid", "none", 0)
  assert "init" not in cnn and cnn["rounds"] == 10  # the CNN's cells hash as before
  assert cells.fl_cell(cfg, "iid", "none", 0)["rounds"] == 100  # the LeNet needs more
  assert cells.fl_cell(grid.StudyConfig(model="lenet", rounds=7), "iid", "none", 0)["rounds"] == 7
  with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
    grid.StudyConfig(rounds=0)


def test_the_study_partitions_at_the_scale_population():
  """Every study partition but NIID-Bench's per-class draw at 0.1 fits 3,000 clients of
  Fashion-MNIST's 60,000 balanced labels; that one says what to use instead."""
  scale = grid.make(grid.StudyConfig, grid.PRESETS["scale"])
  labels = np.repeat(np.arange(10), 6000)
  for name in grid.PARTITIONS:
    cell = cells.fl_cell(scale, name, "none", 0)
    data = cells.fl_experiment(cell).data
    call = functools.partial(partitions.partition, data.partition, labels, scale.clients,
                             key=jax.random.key(0), **data.partition_kwargs())
    if name == "dirichlet0.1":
      with pytest.raises(ValueError, match="use the partition dirichlet_per_client"):
        call()
      continue
    parts = call()
    assert sorted(np.concatenate(parts)) == list(range(len(labels))), name
    assert min(map(len, parts)) >= 1, name
