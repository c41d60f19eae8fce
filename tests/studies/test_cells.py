"""studies.cells: the cell cache (outcomes, retries that keep their reasons, unreadable
files) and cell hashes."""

import json

import numpy as np

import pytest

from inversion import held_out
from studies import cells, grid


def test_a_retried_cell_keeps_the_reasons_of_its_failures(tmp_path):
  folder = tmp_path / "cell"
  assert cells.read_cell(folder) is None and not cells.is_done(folder)
  for attempt in range(2):
    cells.write_cell(folder, {"status": "failed", "reason": f"failure {attempt}"})
    assert not cells.is_done(folder)
    cells.reopen(folder)  # a new study takes it up: no outcome until it has a new one
    assert cells.read_cell(folder) is None
  cells.write_cell(folder, {"status": "done", "psnr": [12.0]})
  record = cells.read_cell(folder)
  assert record["previous_failures"] == ["failure 0", "failure 1"] and cells.is_done(folder)
  assert sorted(p.name for p in folder.iterdir()) == ["done.json"]


def test_an_unreadable_cell_file_is_named_and_its_cell_runs_again(tmp_path):
  folder = tmp_path / "cell"
  cells.write_cell(folder, {"status": "done"})
  (folder / "done.json").write_text('{"status": "do')
  with pytest.warns(UserWarning, match=str(folder / "done.json")):
    assert not cells.is_done(folder)


def test_a_cell_of_a_retrained_prior_runs_again(tmp_path):
  prior = tmp_path / "prior"
  prior.mkdir()
  (prior / "params.msgpack").write_bytes(b"weights 1")
  (prior / "config.json").write_text("{}")
  cell = {"kind": "attack", "variant": f"dps[prior={prior}]"}
  folder = tmp_path / "cell"
  cells.write_cell(folder, {"status": "done", "config": cell})
  assert cells.read_cell(folder)["priors"] == cells.priors_of(cell) and cells.is_done(folder)
  (prior / "samples.png").write_bytes(b"png")  # neither weights nor config
  assert cells.is_done(folder)
  (prior / "params.msgpack").write_bytes(b"weights 2")  # retrained
  assert cells.read_cell(folder) is None and not cells.is_done(folder)
  cells.reopen(folder)
  assert sorted(p.name for p in folder.iterdir()) == ["retry.json"]
  cells.write_cell(folder, {"status": "done", "config": cell})
  record = cells.read_cell(folder)
  assert record["priors"] == cells.priors_of(cell) != {}
  assert record["previous_failures"][0].startswith("ran with other weights of its priors")
  ig = {"kind": "attack", "variant": "ig[lr=0.1]"}  # no prior: nothing to go stale
  cells.write_cell(tmp_path / "ig", {"status": "done", "config": ig})
  assert "priors" not in cells.read_cell(tmp_path / "ig")


def test_cells_that_see_the_same_upload_share_one_hash():
  cfg = grid.make(grid.StudyConfig, grid.PRESETS["tiny"])
  none, dp = (cells.attack_cell(cfg, "iid", d, 0, "ig", 1, 1, "untrained", "h", None, 4)
              for d in ("none", "dp_fedavg_eps8"))
  assert cells.config_hash(none) == cells.config_hash(dp)  # DP-FedAvg's server sees the clear update
  trained = cells.attack_cell(cfg, "iid", "none", 0, "ig", 1, 1, "trained", "h", None, 4)
  assert cells.config_hash(trained) != cells.config_hash(none)
  assert json.loads(json.dumps(none)) == none  # JSON as it is hashed and stored
  with pytest.raises(ValueError, match="not modelled"):
    cells.attack_cell(cfg, "iid", "pfdm", 0, "ig", 1, 1, "untrained", "h", None, 4)


def test_victims_are_held_out_test_images_with_their_clients_labels():
  cfg = grid.make(grid.StudyConfig, grid.PRESETS["tiny"])
  cell = cells.attack_cell(cfg, "iid", "none", 0, "ig", 4, 1, "untrained", "h", None, 4)
  x, y = cells.victim_batches(cell, 3)
  ds, clients = cells.load_partition(cell)
  assert x.shape == (3, 4) + ds.image_shape and y.shape == (3, 4)
  flat = x.reshape(12, -1)
  test = ds.x_test.reshape(len(ds.x_test), -1)
  train = ds.x_train.reshape(len(ds.x_train), -1)
  tuning = held_out.split_indices(len(ds.y_test), "tuning")
  for image, label in zip(flat, y.reshape(-1)):
    in_test = np.flatnonzero((test == image).all(axis=1))
    assert len(in_test) and label in ds.y_test[in_test]  # a test image of the victim's label
    assert not np.isin(in_test, tuning).all()            # of the evaluation split
    assert not (train == image).all(axis=1).any()        # never a training image
  assert len({row.tobytes() for row in flat}) == 12       # each test image serves one victim
  client_labels = {tuple(sorted(r)) for r in np.asarray(clients.y)[:, :4]}
  assert all(tuple(sorted(r)) in client_labels for r in y)  # a client's label mix


def test_a_diverged_victim_is_scored_as_the_grey_image_not_left_out():
  import numpy as np
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(3, 1, 8, 8, 1)).astype(np.float32)
  p = cells.Prepared(cell={"kind": "attack"}, hash="h", params=None, obs=None, x=x,
                     y=np.zeros((3, 1), np.int32), threat=None, spec=None, defense=None)
  rec = x.copy()
  rec[1] = np.nan
  cost_ = {"seconds_per_victim": 1.0, "compile_seconds": 0.0,
           "flops_per": {"double_backward": 1.0, "grad": 1.0}}
  result, matched = cells.score_cell(p, rec, np.zeros((3, 1), np.int32), np.array([True, True, False]),
                                     np.zeros((3, len(cells.attacks.COUNTERS))), 3.0, 10, cost_)
  assert result["failed_victims"] == [1, 2] and len(result["psnr"]) == 3
  grey = cells.metrics.score(np.full_like(x[1], cells.FAILED_IMAGE), x[1])["psnr"][0]
  assert result["psnr"][1] == grey and result["psnr"][0] > 60  # an exact copy
  assert (matched[2] == cells.FAILED_IMAGE).all()
