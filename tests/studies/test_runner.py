"""studies.runner: a tiny grid end to end, the cell cache on rerun, failed cells retried,
the budget, several hosts, the planned grids."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from studies import cells, grid, runner
from tests.studies.conftest import ROOT, TINY


def test_tiny_study_writes_every_table_and_figure(tiny_study):
  cfg, out = tiny_study
  md = (out / "report.md").read_text()
  for heading in ("## Summary per defense", "## Quality against compute (clear update)",
                  "## Every attack under every defense", "## Figures",
                  "## Defenses and attacks", "## Failed cells", "## Cells"):
    assert heading in md
  # the baselines by model state under the summary (2 attack seeds x 1 victim)
  assert re.search(r"without the gradient .*: blank: untrained [\d.]+ \(n = 2\); mean_image: "
                   r"untrained [\d.]+ \(n = 2\); nearest_training: untrained [\d.]+ \(n = 2\)\.",
                   md)
  for fig in ("psnr_vs_evaluations.png", "psnr_vs_seconds.png", "accuracy_per_round.png",
              "accuracy_vs_epsilon.png", "psnr_vs_epsilon.png", "frontier.png",
              "reconstructions_iid.png"):
    assert (out / fig).stat().st_size > 1000 and f"]({fig})" in md
  page = (out / "report.html").read_text()
  assert page.count("data:image/png;base64,") == 7 and "src='http" not in page
  data = json.loads((out / "report.json").read_text())
  rows = {r["defense"]: r for r in data["summary"]}
  assert set(rows) == {"none", "forward"} and all(r["seeds"] == 2 for r in rows.values())
  assert rows["none"]["epsilon"] == float("inf") and np.isfinite(rows["forward"]["epsilon"])
  assert all(0 <= r["accuracy"] <= 1 and np.isfinite(r["psnr"]) for r in rows.values())
  # 2 attack seeds x (none at budgets 2 and 4, forward at 4), each cell's config, status,
  # device and wall time listed
  assert len(data["attacks"]) == 6 and not data["failed"]
  assert sorted(e["budget"] for e in data["attacks"] if e["defense"] == "none") == [2, 2, 4, 4]
  listed = [line.split(" | ")[0] for line in md.splitlines() if "`{" in line]
  assert listed.count("| fl") == 4 and listed.count("| attack") == 6 and "cpu x" in md
  # the ladder: each rung's evaluations, seconds (compilation apart) and FLOPs; the baselines
  for e in data["attacks"]:
    record = json.loads((out / "cells" / "attack" / e["hash"] / "done.json").read_text())
    assert record["double_backward_evals_per_victim"] == e["budget"]
    assert record["seconds_per_victim"] > 0 and record["compile_seconds"] > 0
    assert record["flops_per_victim"] == pytest.approx(
        e["budget"] * record["unit_flops"]["double_backward"]
        + record["grad_evals_per_victim"] * record["unit_flops"]["grad"])
  (ladder,) = data["ladder"]
  assert [(r["attack"], r["budget"], r["interval"]["n"]) for r in ladder["rows"]] == [
      ("ig", 2, 2), ("ig", 4, 2)]
  assert set(ladder["baselines"]) == {"blank", "mean_image", "nearest_training"}
  assert "| baseline: nearest_training | - | 0 |" in md


def test_rerun_runs_only_missing_and_unreadable_cells(study_copy, capsys):
  cfg, out = study_copy
  fl = runner.plan_fl(cfg)
  missing = out / "cells" / "fl" / fl[("iid", "none", 1)][0]
  corrupt = out / "cells" / "fl" / fl[("iid", "forward", 0)][0] / "done.json"
  shutil.rmtree(missing)
  corrupt.write_text('{"status": "do')
  kept = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/*/done.json") if p != corrupt}
  with pytest.warns(UserWarning, match=str(corrupt)):
    runner.run(cfg, out, progress=True)
  assert {p: p.stat().st_mtime_ns for p in kept} == kept
  assert cells.is_done(missing) and json.loads(corrupt.read_text())["status"] == "done"
  assert "FL cells 2/2" in capsys.readouterr().err  # progress lines when not on a terminal


def test_failed_cells_are_reported_and_retried_with_their_reason(study_copy, monkeypatch):
  cfg, out = study_copy
  fl_hash = runner.plan_fl(cfg)[("iid", "none", 1)][0]
  attack_hash = runner.plan_attacks(cfg, runner.plan_fl(cfg), out / "cells")[
      ("iid", "none", 1, "ig", 1, 1, "untrained", 4)][0]
  shutil.rmtree(out / "cells" / "fl" / fl_hash)
  shutil.rmtree(out / "cells" / "attack" / attack_hash)

  def fails(*args, **kwargs):
    raise RuntimeError("the node went away")

  with monkeypatch.context() as m:
    m.setattr(cells.ptrain, "train_and_evaluate", fails)
    m.setattr(cells, "attack_group", fails)
    data = runner.run(cfg, out, progress=False)
  assert {f["hash"] for f in data["failed"]} == {fl_hash, attack_hash}
  assert all(f["reason"] == "RuntimeError: the node went away" for f in data["failed"])
  assert "RuntimeError: the node went away" in (out / "report.md").read_text()
  assert {r["defense"]: r["seeds"] for r in data["summary"]} == {"none": 1, "forward": 2}

  data = runner.run(cfg, out, progress=False)  # the failed cells run again, and succeed
  assert not data["failed"]
  for folder in (out / "cells" / "fl" / fl_hash, out / "cells" / "attack" / attack_hash):
    record = json.loads((folder / "done.json").read_text())
    assert record["previous_failures"] == ["RuntimeError: the node went away"]
    assert not (folder / "failed.json").exists()


def test_batched_attack_cells_equal_one_at_a_time(tiny_study):
  cfg, out = tiny_study
  plan = runner.plan_attacks(cfg, runner.plan_fl(cfg), out / "cells")
  prepared = [cells.prepare(c, h, out / "cells") for h, c in dict(plan.values()).items()]
  groups = {}
  for p in prepared:
    groups.setdefault(cells.group_key(p), []).append(p)
  assert sorted(len(g) for g in groups.values()) == [2, 4]  # one computation per budget
  group = max(groups.values(), key=len)  # budget 4: none and forward, seeds 0 and 1
  together = cells.attack_group(group, mode="map")
  for p, (r, _) in zip(group, together):
    alone, _ = cells.attack_group([p], mode="map")[0]
    np.testing.assert_allclose(r["psnr"], alone["psnr"], rtol=1e-4)
    stored = json.loads((out / "cells" / "attack" / p.hash / "done.json").read_text())
    np.testing.assert_allclose(r["psnr"], stored["psnr"], rtol=1e-4)  # reproducible


def test_budget_stops_after_the_first_cell_and_keeps_it(study_copy):
  cfg, out = study_copy
  missing = out / "cells" / "fl" / runner.plan_fl(cfg)[("iid", "forward", 1)][0]
  shutil.rmtree(missing)
  with pytest.raises(runner.BudgetError, match="over the budget of 1e-05 minutes"):
    runner.run(cfg, out, progress=False, budget_minutes=1e-5)
  assert cells.is_done(missing)


def test_trained_models_batches_and_local_steps(study_copy):
  cfg, out = study_copy
  cfg = grid.make(grid.StudyConfig, TINY, {
      "defenses": ("none",), "seeds": (0,), "attack_seeds": (0,),
      "model_states": ("untrained", "trained"), "batch_sizes": (1, 2), "local_steps": (1, 2)})
  data = runner.run(cfg, out, progress=False)
  assert not data["failed"] and len(data["attacks"]) == 16  # 8 points x budgets 2 and 4
  plan = runner.plan_attacks(cfg, runner.plan_fl(cfg), out / "cells")
  configs = [json.loads((out / "cells" / "attack" / h / "done.json").read_text())["config"]
             for h, _ in plan.values()]
  trained = [c for c in configs if c["model"]["state"] == "trained"]
  assert len(trained) == 8 and all(c["model"]["fl"] for c in trained)  # the FL cell's final model
  assert {(c["batch"], c["local_steps"]) for c in configs} == {(1, 1), (1, 2), (2, 1), (2, 2)}
  md = (out / "report.md").read_text()
  assert md.count("local step(s), trained model:") == 4
  assert md.count("local step(s), trained model\n") == 4  # the ladder's sections


def test_hosts_split_the_cells():
  hashes = [cells.config_hash({"i": i}) for i in range(40)]
  shares = [{h for h in hashes if runner.Hosts(i, 2).mine(h)} for i in range(2)]
  assert shares[0] and shares[1] and not shares[0] & shares[1] and shares[0] | shares[1] == set(hashes)
  with pytest.raises(ValueError, match="host index 2"):
    runner.Hosts(2, 2)


@pytest.mark.slow  # two processes (about 45 s)
def test_two_hosts_share_the_cells_and_host_zero_reports(study_copy):
  cfg, out = study_copy
  for folder in [*(out / "cells" / "fl").iterdir()][:2] + [*(out / "cells" / "attack").iterdir()]:
    shutil.rmtree(folder)
  (out / "report.md").unlink()
  cmd = [sys.executable, str(ROOT / "scripts" / "study.py"), "--tiny", "--workdir", str(out),
         "--progress", "false", "--hosts", "2", "--host"]
  env = {**os.environ, "XLA_FLAGS": ""}
  procs = [subprocess.Popen(cmd + [str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  assert all(p.returncode == 0 for p in procs), outs
  assert "report:" in outs[0][0] and "report:" not in outs[1][0]
  data = json.loads((out / "report.json").read_text())
  assert len(data["attacks"]) == 6 and not data["failed"]


def test_default_and_full_grids_plan_every_cell(tmp_path):
  full = grid.make(grid.StudyConfig, grid.PRESETS["full"])
  assert (full.seeds, full.attack_seeds, full.batch_sizes, full.local_steps, full.model_states) == (
      (0, 1, 2, 3, 4), (0, 1, 2), (1, 4, 16), (1, 5), ("untrained", "trained"))
  # per partition, attack seed and local steps: on the clear update, for each model state,
  # at B = 1 2 classical attacks (no dlg) x every rung + 4 generative ones x the rungs up
  # to their cap, at B = 4 the 2 classical ones and gifd up to rung 100; under the 6 other
  # defenses the 2 defense attacks x one rung, for each defense B and state
  default = 1 * 1 * 1 * (2 * ((2 * 4 + 4 * 1) + (2 * 2 + 1 * 1)) + 6 * 1 * 1 * 2)
  full_cells = 3 * 3 * 2 * 2 * (3 * (3 * 6 + 4 * 4) + 10 * 2 * 7)
  for cfg, attack_cells in ((grid.StudyConfig(), default), (full, full_cells)):
    cells.check_budgets(cfg)  # every attack can run at its smallest budget
    fl = runner.plan_fl(cfg)
    assert len(fl) == len(cfg.partitions) * len(cfg.defenses) * len(cfg.seeds)
    for h, cell in fl.values():  # every FL cell is a valid run config
      cells.fl_experiment(cell)
    assert fl[("iid", "dpsgd", 0)][1]["fed"]["sampling"] == "fixed"
    attacks = runner.plan_attacks(cfg, fl, tmp_path)
    assert len(attacks) == attack_cells
  compare = grid.make(grid.StudyConfig, grid.PRESETS["compare"])
  assert len(runner.plan_attacks(compare, runner.plan_fl(compare), tmp_path)) == 2 * (
      2 * (3 * 4 + 4 * 2) + 10 * 1 * 7)
  # on the untrained model DP-FedAvg's server sees the clear update: one cell for all epsilons
  untrained = {k[1]: h for k, (h, _) in attacks.items()
               if k[0] == "iid" and k[2:] == (0, "ig", 1, 1, "untrained", 1000)}
  assert untrained["none"] == untrained["dp_fedavg_eps1"] == untrained["dp_fedavg_eps8"]
  assert untrained["forward"] == untrained["hybrid"] == untrained["topup"] != untrained["none"]
  # the hybrid's central noise and the top-up's total are calibrated as released
  assert fl[("iid", "hybrid", 0)][1]["privacy"]["central_noise_multiplier"] > 1.9
  assert fl[("iid", "topup", 0)][1]["privacy"]["topup_noise_multiplier"] >= 20 ** 0.5 * grid.LOCAL_Z


def test_an_attack_that_cannot_step_at_the_first_rung_stops_the_study_before_it_runs(tmp_path):
  cfg = grid.make(grid.StudyConfig, TINY, {"attacks": ("dlg",), "budgets": (1, 4)})
  with pytest.raises(ValueError, match=r"attack dlg cannot run at the ladder's budget 1 \(B = 1\)"):
    runner.run(cfg, tmp_path / "study", progress=False)
  assert not (tmp_path / "study").exists()  # nothing ran, nothing was written


def test_defense_and_batch_attacks_fall_back_to_the_attacks_and_bad_rates_are_refused():
  only = grid.make(grid.StudyConfig, {"attacks": ("idlg",), "defense_attacks": ("ig",)})
  assert only.attacks_under("dpsgd") == only.attacks_under("none", 4) == ("idlg",)
  with pytest.raises(ValueError, match=r"q must be in \(0, 1\]"):
    grid.make(grid.StudyConfig, {"q": 1.5})
  only_clear = grid.make(grid.StudyConfig, {"defenses": ("none",), "attacks": ("idlg",)})
  assert only_clear.states("none") == grid.MODEL_STATES


def test_scale_preset_plans_valid_cells(tmp_path):
  scale = grid.make(grid.StudyConfig, grid.PRESETS["scale"])
  assert (scale.data.name, scale.clients, scale.expected_clients(), scale.fl_rounds) == (
      "fashion_mnist", 3000, 100, 100)
  fl = runner.plan_fl(scale)
  assert len(fl) == len(grid.SCALE_DEFENSES) * 3
  for (_, defense, _), (_, cell) in fl.items():
    config = cells.fl_experiment(cell)  # a valid run config, its noise calibrated as released
    assert grid.CALIBRATED not in cell["privacy"].values()
    if defense != "dpsgd":  # Poisson into 160 slots; the top-up's own cap is 2 q C
      assert config.fed.sampling == "poisson"
      assert config.fed.poisson_cap == (200 if defense.startswith("topup") else 160)
  for name, z in (("topup", grid.LOCAL_Z), ("topup_z0.1", 0.1), ("topup_z0.03", 0.03)):
    assert fl[("iid", name, 0)][1]["privacy"]["topup_noise_multiplier"] >= 200 ** 0.5 * z
  attacks = runner.plan_attacks(scale, fl, tmp_path)
  # the clear update: 3 states x (idlg, ig x 4 rungs + 4 generative x 1); under the 17 other
  # defenses: ig and adaptive x 3 states (midway too) at one rung; ig on the released model
  # under all 18, at the 3 states
  assert len(attacks) == 3 * (2 * 4 + 4) + 17 * 2 * 3 + 18 * 3
  assert {c["model"].get("round") for k, (_, c) in attacks.items() if k[6] == "midway"} == {50}
  # DESIGN.md: at least 16 victims per number (an aggregate holds a round's ~100 images)
  assert {c["victims"] for _, c in attacks.values() if c["view"]["kind"] != "aggregate"} == {16}
  base = cells.plan_baselines(attacks, scale.prior_only_steps)  # one per model state
  assert sorted(c["model"]["state"] for _, c in base.values()) == sorted(grid.ALL_MODEL_STATES)
  assert all(c["view"] == {"kind": "clear"} for _, c in base.values())  # not the released model
  assert {p for p, _ in base.values()} == {"iid"}
  variants = {k[3]: c["variant"] for k, (_, c) in attacks.items() if k[1] == "none"}
  # Fashion-MNIST's own priors and tuning (studies/tuned.json)
  assert "gan=fashion_mnist" in variants["gifd"] and "prior=fashion_mnist" in variants["ggdm"]
  # (on the clear update the adaptive attack is dps itself: one shared cell)
  assert all(v == grid.variant("dps" if a == "adaptive" else a, "fashion_mnist", "cnn")
             for a, v in variants.items() if not a.endswith(grid.RELEASED))
  baseline = cells.baseline_cell(attacks[next(iter(attacks))][1], scale.prior_only_steps)
  assert "prior=fashion_mnist" in baseline["variant"]


def test_a_cap_below_the_expected_clients_is_refused():
  with pytest.raises(ValueError, match="poisson_cap 50 is below the 100 clients expected"):
    grid.make(grid.StudyConfig, {"clients": 1000, "q": 0.1, "poisson_cap": 50})


def test_attacks_on_the_released_model(study_copy):
  cfg, out = study_copy
  cfg = grid.make(grid.StudyConfig, TINY, {"seeds": (0,), "attack_seeds": (0,),
                                           "defenses": ("none", "forward", "dp_fedavg_eps8"),
                                           "released_attacks": ("ig",)})
  data = runner.run(cfg, out, progress=False)
  assert not data["failed"]
  released = {r["defense"]: r for r in data["released"]}
  assert set(released) == {"none", "forward", "dp_fedavg_eps8"}
  assert all(r["attack"] == "ig" + grid.RELEASED for r in data["released"])
  assert not any(r["attack"].endswith(grid.RELEASED) for r in data["attacks"])
  plan = runner.plan_attacks(cfg, runner.plan_fl(cfg), out / "cells")
  views = {k[1]: c["view"] for k, (_, c) in plan.items() if k[3].endswith(grid.RELEASED)}
  n = cfg.expected_clients()
  assert views["none"] == {"kind": "aggregate", "clients": n}  # SecAgg's view, one cell
  assert views["forward"]["upload"]["kind"] == "forward" and views["forward"]["clients"] == n
  dp = views["dp_fedavg_eps8"]  # the run's calibrated sigma on the mean of n clipped updates
  assert dp["clip_norm"] == 0.5 and dp["sigma"] > 0.5
  assert all(c["victims"] == 1 for k, (_, c) in plan.items() if k[3].endswith(grid.RELEASED))
  summary = {r["defense"]: r for r in data["summary"]}
  assert set(summary["forward"]["released_by_state"]) == {"untrained"}
  md = (out / "report.md").read_text()
  assert "released model: best PSNR" in md and "untrained" in md


def test_attacks_on_the_midway_model(study_copy):
  cfg, out = study_copy
  cfg = grid.make(grid.StudyConfig, TINY, {"seeds": (0,), "attack_seeds": (0,),
                                           "defenses": ("none", "forward"),
                                           "defense_model_states": grid.ALL_MODEL_STATES})
  data = runner.run(cfg, out, progress=False)
  assert not data["failed"]
  plan = runner.plan_attacks(cfg, runner.plan_fl(cfg), out / "cells")
  midway = [c for k, (_, c) in plan.items() if k[6] == "midway"]
  assert len(midway) == 1 and midway[0]["model"]["round"] == 1  # half of the 2 rounds
  fl_run = out / "cells" / "fl" / midway[0]["model"]["fl"] / "run"
  params = {r: (fl_run / f"params_round{r}.msgpack").read_bytes() for r in (1,)}
  assert params[1] != (fl_run / "params.msgpack").read_bytes()  # round 1's model, not the last
  forward = {r["defense"]: r for r in data["summary"]}["forward"]
  assert list(forward["psnr_by_state"]) == ["untrained", "midway", "trained"]
  (fl_run / "params_round1.msgpack").unlink()  # an FL cell run before midway models were kept
  h = next(h for k, (h, _) in plan.items() if k[6] == "midway")
  (out / "cells" / "attack" / h / "done.json").unlink()
  data = runner.run(cfg, out, progress=False)
  assert "params_round1.msgpack is missing: the FL cell ran before" in data["failed"][0]["reason"]


def test_a_baseline_whose_prior_is_not_trained_fails_and_is_retried(study_copy, monkeypatch):
  from diffusion import prior as prior_lib
  cfg, out = study_copy
  h = next(p.name for p in (out / "cells" / "baseline").iterdir())
  cell = {**json.loads((out / "cells" / "baseline" / h / "done.json").read_text())["config"],
          "prior_steps": 2}

  def untrained(path):
    raise prior_lib.PriorError("the fashion_mnist diffusion prior is not trained yet: ...")
  monkeypatch.setattr(prior_lib, "load", untrained)
  result = cells.run_baseline_cell(cell, h, out / "cells")
  assert result["status"] == "failed" and "not trained yet" in result["reason"]
  assert not cells.is_done(out / "cells" / "baseline" / h)  # a rerun retries it


def test_report_only_writes_the_finished_cells_and_runs_none(study_copy):
  cfg, out = study_copy
  wider = grid.make(grid.StudyConfig, TINY, {"defenses": ("none", "forward", "prune")})
  before = sorted(p.name for p in (out / "cells" / "fl").iterdir())
  said = []
  data = runner.run(wider, out, progress=False, report_only=True, say=said.append)
  assert sorted(p.name for p in (out / "cells" / "fl").iterdir()) == before
  assert {f["what"] for f in data["failed"] if f["kind"] == "fl"} == {
      "iid / prune / seed 0", "iid / prune / seed 1"}
  assert all(f["reason"] == "not run" for f in data["failed"])
  rows = {r["defense"]: r for r in data["summary"]}
  assert rows["prune"]["seeds"] == 0 and rows["forward"]["seeds"] == 2
  assert "not run yet" in said[-1] and "| prune |" in (out / "report.md").read_text()
