"""Tests of studies/tuning.py and scripts/tune_attacks.py on the tiny preset (digits, mlp,
ig and idlg, 2 victims, 2 trials, 4 evaluations)."""

import contextlib
import dataclasses
import io
import json
import math
import shutil

import numpy as np
import pytest

from fljax import config
from inversion import compare, engine, held_out, specs
from studies import tuning
from tests.studies.conftest import load_script

script = load_script("tune_attacks")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
  """(workdir, defaults file, stdout) of `scripts/tune_attacks.py --tiny --write_defaults`."""
  root = tmp_path_factory.mktemp("tuning")
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    script.main(["--tiny", "--workdir", str(root / "run"), "--progress", "false",
                 "--write_defaults", "--defaults_file", str(root / "tuned.json")])
  return root / "run", root / "tuned.json", out.getvalue()


def _tiny(**overrides) -> tuning.TuningConfig:
  return dataclasses.replace(config.build(tuning.TuningConfig, tuning.TINY), **overrides)


def test_script_writes_the_tables_and_the_result_line(tuned):
  workdir, _, out = tuned
  data = json.loads((workdir / "tuning.json").read_text())
  last = out.strip().splitlines()[-1]
  assert last.startswith("RESULT tune_attacks best_ig=") and " best_idlg=" in last
  best = data["attacks"]["idlg"]["trials"][data["attacks"]["idlg"]["chosen"]]
  assert f"best_idlg={best['median_psnr']['estimate']:.4g}" in last
  text = (workdir / "tuning.md").read_text()
  assert "## ig (`ig`)" in text and "## idlg (`idlg`)" in text and "## Chosen values" in text
  assert "| trial | tv | lr | median PSNR [95 % CI] |" in text
  assert sum(line.startswith("| **") for line in text.splitlines()) == 2  # one per attack
  assert len(list((workdir / "trials").glob("*.json"))) == 4


def test_every_attack_gets_the_same_trials_and_budget_and_trial_0_is_its_default(tuned):
  data = json.loads((tuned[0] / "tuning.json").read_text())
  assert set(data["attacks"]) == {"ig", "idlg"}
  for attack, a in data["attacks"].items():
    assert [t["trial"] for t in a["trials"]] == [0, 1]
    assert a["trials"][0]["values"] == tuning.defaults(attack)
    for t in a["trials"]:
      assert t["status"] == "done" and len(t["psnr"]) == 2  # 2 victims of B = 1
      assert t["double_backward_evals_per_victim"] == 4  # the budget, spent in full
  assert data["attacks"]["ig"]["trials"][0]["values"] == {"tv": 1e-4, "lr": None}
  assert all(i % 4 == 3 for row in data["victims"] for i in row)  # the tuning quarter


def test_a_rerun_skips_the_finished_trials(tuned, tmp_path, monkeypatch):
  workdir = shutil.copytree(tuned[0], tmp_path / "run")
  before = json.loads((workdir / "tuning.json").read_text())

  def never(*args, **kwargs):
    raise AssertionError("a finished trial ran again")
  monkeypatch.setattr(tuning, "run_trial", never)
  after = tuning.run(_tiny(), workdir, log=lambda line: None)
  assert after["attacks"] == before["attacks"]


def test_a_trial_of_other_prior_weights_runs_again(tuned, tmp_path, monkeypatch):
  workdir = shutil.copytree(tuned[0], tmp_path / "run")
  for f in (workdir / "trials").glob("*.json"):  # as if each had sampled a prior
    f.write_text(json.dumps({**json.loads(f.read_text()), "priors": {"prior": "old"}}))
  ran = []
  real = tuning.run_trial
  monkeypatch.setattr(tuning, "run_trial", lambda *a, **k: ran.append(a[1]) or real(*a, **k))
  monkeypatch.setattr(tuning.cells, "variant_priors", lambda variant: {"prior": "old"})
  tuning.run(_tiny(), workdir, log=lambda line: None)
  assert ran == []  # the same weights: every trial cached
  monkeypatch.setattr(tuning.cells, "variant_priors", lambda variant: {"prior": "retrained"})
  tuning.run(_tiny(), workdir, log=lambda line: None)
  assert sorted(ran) == ["idlg", "idlg", "ig", "ig"]  # every trial again
  assert {json.loads(f.read_text())["priors"]["prior"]
          for f in (workdir / "trials").glob("*.json")} == {"retrained"}


def test_a_failed_trial_is_reported_and_retried(tuned, tmp_path, monkeypatch):
  workdir = shutil.copytree(tuned[0], tmp_path / "run")
  data = json.loads((workdir / "tuning.json").read_text())
  values = data["attacks"]["ig"]["trials"][1]["values"]
  h = tuning.trial_hash(_tiny(), np.asarray(data["victims"]), "ig", values)
  (workdir / "trials" / f"ig-{h}.json").unlink()

  def boom(*args, **kwargs):
    raise RuntimeError("the node went away")
  monkeypatch.setattr(tuning, "run_trial", boom)
  with pytest.raises(SystemExit, match=r"^error: 1 trial\(s\) failed \(ig trial 1\); .* retries"):
    script.main(["--tiny", "--workdir", str(workdir), "--progress", "false"])
  assert "| 1 | " + " | ".join(map(str, values.values())) + " | failed: RuntimeError: the node" in (
      workdir / "tuning.md").read_text()
  assert not (workdir / "trials" / f"ig-{h}.json").exists()  # not cached: a rerun retries it


def test_chosen_values_become_the_defaults_of_the_dataset_and_model(tuned, tmp_path):
  workdir, path, _ = tuned
  data = json.loads((workdir / "tuning.json").read_text())
  written = json.loads(path.read_text())
  assert list(written) == ["digits/mlp"] and set(written["digits/mlp"]) == {"ig", "idlg"}
  for attack, a in data["attacks"].items():
    values = {k: v for k, v in a["trials"][a["chosen"]]["values"].items() if v is not None}
    assert tuning.tuned_overrides("digits", "mlp", attack, path=path) == values
    variant = tuning.with_overrides(tuning.VARIANTS[attack], values)
    name, overrides = compare.parse_variant(variant)
    specs.AttackSpec(name=name, **overrides)  # the keys are attack settings
    assert name == attack and overrides == values
  assert tuning.tuned_overrides("mnist", "cnn", "gifd", path=path) == {}
  assert tuning.tuned_overrides("digits", "mlp", "dps", path=tmp_path / "none.json") == {}
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"digits/mlp": {"ig": {"gamma": 1.0}}}))
  with pytest.raises(ValueError, match="'gamma'.* not attack settings"):
    tuning.tuned_overrides("digits", "mlp", "ig", path=bad)
  for attack in tuning.SPACES:  # the committed file reads, whatever it holds
    assert isinstance(tuning.tuned_overrides("mnist", "cnn", attack), dict)


def test_a_warm_start_makes_another_datasets_tuned_values_trial_0(tuned, tmp_path, capsys):
  _, path, _ = tuned
  start = {a: tuning.tuned_overrides("digits", "mlp", a, path=path) for a in ("ig", "idlg")}
  result = tuning.run(_tiny(start_from="digits"), tmp_path / "run", defaults_file=path,
                      log=lambda line: None)
  for attack, a in result["attacks"].items():
    assert a["trials"][0]["values"] == {**tuning.defaults(attack), **start[attack]}
    # the draws after it (one that repeats trial 0, as the tiny run's own choice does here,
    # drawn again)
    assert a["trials"][1]["values"] == tuning.draws(attack, 2, 0, start[attack])[1]
    assert a["trials"][1]["values"] != a["trials"][0]["values"]
  assert "(trial 0: the values tuned on digits)" in (tmp_path / "run" / "tuning.md").read_text()
  with pytest.raises(SystemExit, match=r"^error: --start_from mnist: .* holds no values tuned "
                                       r"on mnist/mlp; tune there first"):
    script.main(["--tiny", "--workdir", str(tmp_path / "other"), "--start_from", "mnist",
                 "--defaults_file", str(path)])
  assert not (tmp_path / "other").exists()  # refused before any computation


def test_a_trial_runs_what_the_study_runs_with_the_datasets_own_prior():
  for dataset in ("mnist", "fashion_mnist"):
    for attack in tuning.SPACES:
      values = tuning.tuned_overrides(tuning.grid.tuning_dataset(dataset, "cnn"), "cnn", attack)
      assert (tuning.with_overrides(tuning.variant(attack, dataset), values)
              == tuning.grid.variant(attack, dataset, "cnn"))
  assert tuning.variant("dps", "mnist") == tuning.VARIANTS["dps"]  # MNIST's trial hashes hold
  assert compare.parse_variant(tuning.variant("ggdm", "fashion_mnist"))[1]["prior"] == (
      "fashion_mnist")
  assert compare.parse_variant(tuning.variant("gifd", "fashion_mnist"))[1]["gan"] == (
      "fashion_mnist")


def test_overlapping_victims_are_refused_in_one_sentence_before_any_computation(
    tmp_path, monkeypatch, capsys):
  def never(*args, **kwargs):
    raise AssertionError("computed before the victims were checked")
  for module, name in ((tuning, "run_trial"), (tuning, "_plan"), (engine, "observe_all")):
    monkeypatch.setattr(module, name, never)
  with pytest.raises(held_out.HeldOutError, match="overlap the evaluation victims") as e:
    tuning.run(_tiny(victim_indices=(3, 4)), tmp_path / "run")  # 4 is an evaluation image
  assert "\n" not in str(e.value)
  with pytest.raises(SystemExit, match="^error: the tuning victims overlap"):
    script.main(["--tiny", "--workdir", str(tmp_path / "run"), "--victim_indices", "0,7"])
  assert not (tmp_path / "run" / "tuning.json").exists()


def test_victims_come_from_the_tuning_split_and_the_draws_from_the_seed():
  chosen = tuning.victim_indices(_tiny(victims=8), 359)
  assert chosen.shape == (8, 1) and all(chosen.ravel() % 4 == 3)
  assert (tuning.victim_indices(_tiny(victim_indices=(3, 7)), 359) == [[3], [7]]).all()
  with pytest.raises(ValueError, match=r"victim_indices must lie in \[0, 359\)"):
    tuning.victim_indices(_tiny(victim_indices=(3, 359)), 359)
  for attack, space in tuning.SPACES.items():
    first = tuning.draws(attack, 8, seed=0)
    assert first == tuning.draws(attack, 8, seed=0) != tuning.draws(attack, 8, seed=1)
    assert first[0] == tuning.defaults(attack) and len(first) == 8
    assert len({json.dumps(v, sort_keys=True) for v in first}) == 8  # no draw repeated
    for values in first[1:]:
      assert list(values) == list(space)
      for name, dim in space.items():
        v = values[name]
        if isinstance(dim, tuning.Choice):
          assert v in dim.values
        elif not (name == "lr" and values.get("optimizer") == "lbfgs_zoom"):
          assert dim.low <= v <= dim.high
      if values.get("optimizer") == "lbfgs_zoom":
        assert values["lr"] is None  # its line search sets the step
  # stratified: each of the 7 equal log-ranges of a continuous hyperparameter drawn once
  for attack in ("ig", "dps", "ggdm"):
    for name, dim in tuning.SPACES[attack].items():
      drawn = [v[name] for v in tuning.draws(attack, 8, seed=0)[1:]]
      to_u = ((lambda v, d=dim: math.log(v / d.low) / math.log(d.high / d.low))
              if isinstance(dim, tuning.LogUniform) else
              (lambda v, d=dim: (v - d.low) / (d.high - d.low)))
      strata = sorted(min(int(to_u(v) * 7), 6) for v in drawn)
      assert strata == list(range(7)), (attack, name, drawn)


def test_the_best_trial_wins_ties_go_to_the_earlier_and_bad_settings_are_refused(monkeypatch):
  def trial(psnr):
    return {"status": "done", "median_psnr": {"estimate": psnr}}
  assert tuning.chosen([trial(5.0), trial(7.0), trial(7.0)]) == 1
  assert tuning.chosen([{"status": "failed"}, trial(3.0)]) == 1
  assert tuning.chosen([{"status": "failed"}, trial(float("nan"))]) is None
  with pytest.raises(ValueError, match="victims x batch_size = 4"):
    _tiny(victims=2, batch_size=2, victim_indices=(3, 7))
  with pytest.raises(ValueError, match="trials must be >= 1"):
    _tiny(trials=0)
  with pytest.raises(ValueError, match="unknown attack 'adaptive'"):
    _tiny(attacks=("adaptive",))
  with pytest.raises(SystemExit, match="smoke-test values"):
    script.main(["--tiny", "--write_defaults"])
  monkeypatch.setitem(tuning.SPACES, "ig", {"tv": tuning.Choice((1e-4, 1e-3))})
  assert len(tuning.draws("ig", 2, seed=0)) == 2
  with pytest.raises(ValueError, match="fewer than 3 distinct settings; lower --trials"):
    tuning.draws("ig", 3, seed=0)
