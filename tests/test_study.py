"""The comparative study (inversion.study, scripts/study.py): a tiny grid end to end, the
cell cache, resume after a kill, failed cells, batched = one-at-a-time attacks, bad input."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from inversion import study as st

ROOT = Path(__file__).resolve().parents[1]
TINY = st.PRESETS["tiny"]  # scripts/study.py --tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  out = tmp_path_factory.mktemp("study")
  cfg = st.StudyConfig(**TINY)
  st.run(cfg, out, progress=False)
  return cfg, out


def test_tiny_study_writes_every_table_and_figure(tiny):
  cfg, out = tiny
  md = (out / "report.md").read_text()
  for heading in ("## Summary per defense", "## Every attack under every defense", "## Figures",
                  "## Defenses and attacks", "## Failed cells", "## Cells"):
    assert heading in md
  for fig in ("accuracy_per_round.png", "accuracy_vs_epsilon.png", "psnr_vs_epsilon.png",
              "frontier.png", "reconstructions_iid.png"):
    assert (out / fig).stat().st_size > 1000 and f"]({fig})" in md
  page = (out / "report.html").read_text()
  assert page.count("data:image/png;base64,") == 5 and "src='http" not in page
  data = json.loads((out / "report.json").read_text())
  rows = {r["defense"]: r for r in data["summary"]}
  assert set(rows) == {"none", "forward"} and all(r["seeds"] == 2 for r in rows.values())
  assert rows["none"]["epsilon"] == float("inf") and np.isfinite(rows["forward"]["epsilon"])
  assert all(0 <= r["accuracy"] <= 1 and np.isfinite(r["psnr"]) for r in rows.values())
  # 2 defenses x 2 attack seeds, each cell's config, status, device and wall time listed
  assert len(data["attacks"]) == 4 and not data["failed"]
  cells = [line.split(" | ")[0] for line in md.splitlines() if "`{" in line]
  assert cells.count("| fl") == 4 and cells.count("| attack") == 4 and "cpu x" in md


def test_rerun_skips_finished_cells(tiny):
  cfg, out = tiny
  stamps = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/*/done.json")}
  said = []
  st.run(cfg, out, progress=False, say=said.append)
  assert "(0 to run)" in said[0] and "(0 to run)" in said[1]
  assert {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/*/done.json")} == stamps


def test_batched_attack_cells_equal_one_at_a_time(tiny):
  cfg, out = tiny
  plan = st.plan_attacks(cfg, st.plan_fl(cfg), out / "cells")
  prepared = [st.prepare(c, h, out / "cells") for h, c in dict(plan.values()).items()]
  assert len({st.group_key(p) for p in prepared}) == 1  # one computation for all four
  together = st.attack_group(prepared, mode="map")
  for p, (r, _) in zip(prepared, together):
    alone, _ = st.attack_group([p], mode="map")[0]
    np.testing.assert_allclose(r["psnr"], alone["psnr"], rtol=1e-4)
    stored = json.loads((out / "cells" / "attack" / p.hash / "done.json").read_text())
    np.testing.assert_allclose(r["psnr"], stored["psnr"], rtol=1e-4)  # reproducible


def test_failed_cells_are_reported_and_the_study_goes_on(tmp_path, monkeypatch):
  monkeypatch.setitem(st.DEFENSES, "broken", st.Defense(
      dict(mechanism="dp_fedavg", clip_norm=-1.0, target_epsilon=1.0), "clear", "-"))
  def diverge(group, **kw):
    raise FloatingPointError("the attack diverged")
  monkeypatch.setattr(st, "attack_group", diverge)
  cfg = st.StudyConfig(**{**TINY, "defenses": ("none", "broken"), "seeds": (0,),
                          "attack_seeds": (0,)})
  st.run(cfg, tmp_path, progress=False)
  data = json.loads((tmp_path / "report.json").read_text())
  failed = {(f["kind"], f["what"].split(" / ")[1]): f["reason"] for f in data["failed"]}
  assert "clip norm C must be > 0" in failed[("fl", "broken")]
  assert "diverged" in failed[("attack", "none")]
  rows = {r["defense"]: r for r in data["summary"]}
  assert "accuracy" in rows["none"] and "accuracy" not in rows["broken"]
  assert "FloatingPointError: the attack diverged" in (tmp_path / "report.md").read_text()


def test_killed_study_resumes_without_redoing_finished_cells(tmp_path):
  out = tmp_path / "s"
  cmd = [sys.executable, str(ROOT / "scripts" / "study.py"), "--tiny", "--out", str(out),
         "--no-progress"]
  env = {**os.environ, "XLA_FLAGS": ""}
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
  t0 = time.time()
  while not list((out / "cells" / "fl").glob("*/done.json")) and time.time() - t0 < 300:
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  finished = {p: p.stat().st_mtime_ns for p in (out / "cells" / "fl").glob("*/done.json")}
  assert finished and not (out / "report.md").exists()
  done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
  assert done.returncode == 0, done.stderr
  assert f"({4 - len(finished)} to run)" in done.stdout
  assert all(p.stat().st_mtime_ns == t for p, t in finished.items())
  assert (out / "report.html").exists()


def test_bad_input_lists_valid_names_and_budget_stops_early(tmp_path):
  with pytest.raises(ValueError, match="unknown attack 'foo'; valid: dlg, idlg, ig, gifd"):
    st.StudyConfig(attacks=("foo",))
  with pytest.raises(ValueError, match="unknown partition 'dirichlet'; valid: iid"):
    st.StudyConfig(partitions=("dirichlet",))
  out = subprocess.run([sys.executable, str(ROOT / "scripts" / "study.py"), "--defenses",
                        "nope"], capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": ""})
  assert out.returncode != 0 and "error: unknown defense 'nope'; valid: none" in out.stderr
  assert "Traceback" not in out.stderr
  cfg = dataclasses.replace(st.StudyConfig(**TINY), defenses=("none",), seeds=(0,),
                            attack_seeds=(0,))
  with pytest.raises(st.BudgetError, match="over the budget of 0.001 minutes"):
    st.run(cfg, tmp_path, progress=False, budget_minutes=0.001)


def test_two_hosts_share_the_cells_and_host_zero_reports(tmp_path):
  hashes = [st.config_hash({"i": i}) for i in range(40)]
  hosts = [st.Hosts(i, 2) for i in range(2)]
  shares = [{h for h in hashes if host.mine(h)} for host in hosts]
  assert shares[0] and shares[1] and not shares[0] & shares[1] and shares[0] | shares[1] == set(hashes)
  env = {**os.environ, "XLA_FLAGS": ""}
  cmd = [sys.executable, str(ROOT / "scripts" / "study.py"), "--tiny", "--out", str(tmp_path),
         "--no-progress", "--hosts", "2", "--host"]
  procs = [subprocess.Popen(cmd + [str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  assert all(p.returncode == 0 for p in procs), outs
  assert "report:" in outs[0][0] and "report:" not in outs[1][0]
  ran = [int(o[0].split(" to run)")[0].rsplit("(", 1)[1]) for o in outs]
  assert sum(ran) == 4  # the 4 FL cells, each run by exactly one host
  assert len(json.loads((tmp_path / "report.json").read_text())["attacks"]) == 4


def test_default_and_full_grids_plan_every_cell(tmp_path):
  full = st.StudyConfig(**st.PRESETS["full"])
  assert (full.seeds, full.attack_seeds, full.batch_sizes, full.local_steps, full.model_states) == (
      (0, 1, 2, 3, 4), (0, 1, 2), (1, 4, 16), (1, 5), ("untrained", "trained"))
  for cfg, attack_cells in ((st.StudyConfig(), 3 * 11 * 6), (full, 3 * 11 * 3 * 6 * 3 * 2 * 2)):
    fl = st.plan_fl(cfg)
    assert len(fl) == len(cfg.partitions) * len(cfg.defenses) * len(cfg.seeds)
    for h, cell in fl.values():  # every FL cell is a valid run config
      st.fl_experiment(cell)
    assert fl[("iid", "dpsgd", 0)][1]["fed"]["sampling"] == "fixed"
    attacks = st.plan_attacks(cfg, fl, tmp_path)
    assert len(attacks) == attack_cells
  # on the untrained model DP-FedAvg's server sees the clear update: one cell for all epsilons
  untrained = {k[1]: h for k, (h, _) in attacks.items()
               if k[0] == "iid" and k[2:] == (0, "ig", 1, 1, "untrained")}
  assert untrained["none"] == untrained["dp_fedavg_eps1"] == untrained["dp_fedavg_eps8"]
  assert untrained["forward"] == untrained["hybrid"] == untrained["topup"] != untrained["none"]
  # the hybrid's central noise and the top-up's total are calibrated as released
  assert fl[("iid", "hybrid", 0)][1]["privacy"]["central_noise_multiplier"] > 1.9
  assert fl[("iid", "topup", 0)][1]["privacy"]["topup_noise_multiplier"] >= 20 ** 0.5 * st.LOCAL_Z


def test_trained_models_batches_and_local_steps(tmp_path):
  cfg = st.StudyConfig(**{**TINY, "defenses": ("none",), "seeds": (0,), "attack_seeds": (0,),
                          "model_states": ("untrained", "trained"), "batch_sizes": (1, 2),
                          "local_steps": (1, 2)})
  st.run(cfg, tmp_path, progress=False)
  data = json.loads((tmp_path / "report.json").read_text())
  assert not data["failed"] and len(data["attacks"]) == 8
  cells = [json.loads(p.read_text())["config"] for p in (tmp_path / "cells" / "attack").glob("*/done.json")]
  trained = [c for c in cells if c["model"]["state"] == "trained"]
  assert len(trained) == 4 and all(c["model"]["fl"] for c in trained)  # the FL cell's final model
  assert {(c["batch"], c["local_steps"]) for c in cells} == {(1, 1), (1, 2), (2, 1), (2, 2)}
  assert (tmp_path / "report.md").read_text().count("local step(s), trained model:") == 4
