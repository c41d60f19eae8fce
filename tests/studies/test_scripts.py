"""The entry points of `studies` (scripts/study.py, defense_tradeoff.py, scaling.py), run
in-process: bad input and faults end in one line and a non-zero exit."""

import json
import shutil

import pytest

from studies import cells, grid, runner, tradeoff
from tests.studies.conftest import load_script

study = load_script("study")


def _fails(*args, **kwargs):
  raise RuntimeError("the node went away")


def test_study_refuses_bad_names_and_workdirs_in_one_line(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    study.main(["--defenses", "none,nope"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "nope" in err and "dp_fedavg_eps8" in err
  assert len(err.strip().splitlines()) == 1
  (tmp_path / "file").write_text("")
  for workdir in (tmp_path / "file", tmp_path / "file" / "sub"):
    with pytest.raises(SystemExit, match=f"error: .*{workdir}.*folder"):
      study.main(["--tiny", "--workdir", str(workdir)])


def test_study_interrupted_says_finished_cells_are_kept(tmp_path, monkeypatch):
  def interrupt(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(cells, "run_fl_cell", interrupt)
  with pytest.raises(SystemExit, match="finished cells are kept .* rerun the same command"):
    study.main(["--tiny", "--workdir", str(tmp_path)])


def test_study_with_failed_cells_exits_non_zero_and_names_them(study_copy, monkeypatch):
  cfg, out = study_copy
  shutil.rmtree(out / "cells" / "fl" / runner.plan_fl(cfg)[("iid", "forward", 1)][0])
  monkeypatch.setattr(cells.ptrain, "train_and_evaluate", _fails)
  with pytest.raises(SystemExit, match=r"1 cell\(s\) failed \(iid / forward / seed 1\)"):
    study.main(["--tiny", "--workdir", str(out), "--progress", "false"])
  assert "the node went away" in (out / "report.md").read_text()  # the report is written


def test_defense_tradeoff_trains_reports_and_names_failed_cells(study_copy, tmp_path, monkeypatch,
                                                               capsys):
  cfg, out = study_copy  # its FL cells are the trade-off's at q = 0.5, 2 rounds: done already
  grid_cfg = grid.make(tradeoff.TradeoffConfig, tradeoff.QUICK,
                       {"defenses": ("none", "forward"), "q": 0.5, "rounds": 2})
  cell = tradeoff.plan(grid_cfg)[("iid", "none", 0)]
  assert cell == runner.plan_fl(cfg)[("iid", "none", 0)]
  attacks = tmp_path / "attacks" / "z0.3"  # a fake scripts/attack_vs_noise.sh cell
  attacks.mkdir(parents=True)
  (attacks / "comparison.json").write_text(json.dumps([
      {"attack": "dps", "median_psnr": 11.0},
      {"attack": "dps[adaptive=true,denoise=rescale]", "median_psnr": 11.5,
       "rero_bound_kappa_1e-3": 1.0, "success_rate_20db": 0.0, "update_cosine": 0.1}]))
  script = load_script("defense_tradeoff")
  argv = ["--quick", "--workdir", str(out), "--defenses", "none,forward", "--q", "0.5",
          "--rounds", "2", "--attack_root", str(tmp_path / "attacks")]
  script.main(argv)
  table = (out / "tradeoff.md").read_text()
  assert "| iid | forward | " in table and "| 11.5 |" in table
  for name in ("accuracy_vs_epsilon.png", "psnr_vs_z.png", "frontier.png", "schedules.png",
               "tradeoff.json"):
    assert (out / name).exists(), name
  shutil.rmtree(out / "cells" / "fl" / cell[0])
  monkeypatch.setattr(cells.ptrain, "train_and_evaluate", _fails)
  with pytest.raises(SystemExit, match="1 cell.* failed .*the node went away"):
    script.main(argv)
  assert "failed (seed 0): RuntimeError: the node went away" in capsys.readouterr().out


def test_scaling_quick_writes_tables_and_figures(study_copy, capsys):
  _, out = study_copy  # its attack cell of B = 1 is the batch study's at 8 clients, budget 4
  load_script("scaling").main(["--quick", "--workdir", str(out), "--parts", "batch,secagg,clients",
                               "--clients", "8", "--budget", "4", "--secagg", "2",
                               "--fl_clients", "4"])
  assert capsys.readouterr().out.strip().splitlines()[-1].startswith("RESULT scaling psnr_b1=")
  text = (out / "scaling.md").read_text()
  for name in ("attack quality vs batch", "attack quality vs secagg", "throughput vs clients"):
    assert name in text
  for fig in ("attack_vs_batch.png", "attack_vs_secagg.png", "throughput_vs_clients.png"):
    assert (out / fig).stat().st_size > 1000


@pytest.mark.slow  # every part, the device sweep in subprocesses (about a minute)
def test_scaling_quick_every_part(tmp_path, capsys):
  load_script("scaling").main(["--quick", "--workdir", str(tmp_path)])
  assert "device_speedup=" in capsys.readouterr().out.strip().splitlines()[-1]
  assert (tmp_path / "throughput_vs_devices.png").exists()
