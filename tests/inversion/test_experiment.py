"""Tests of inversion/experiment.py (the driver behind scripts/invert.py): a tiny end-to-end
run, image folders as victims, divergence reported as failure, interrupted attacks resume
to the same result, and clear errors for bad input."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from fljax import datasets
from inversion import engine, experiment, specs

TINY = dict(victims=specs.VictimsConfig(dataset="digits", image_size=None, channels=None, num=3),
            attack=specs.AttackSpec(name="idlg", optimizer="adam", steps=300),
            chunk=100)


def test_tiny_run_writes_grid_metrics_and_config_and_is_not_repeated(tmp_path, capsys):
  cfg = specs.InversionConfig(**TINY)
  summary = experiment.run(cfg, tmp_path / "run", progress=False)
  for name in ("grid.png", "metrics.json", "config.json"):
    assert (tmp_path / "run" / name).exists()
  data = json.loads((tmp_path / "run" / "metrics.json").read_text())
  assert data["summary"] == summary and len(data["victims"]) == 3
  assert summary["label_accuracy"] == 1.0          # iDLG
  assert summary["failed"] == 0 and summary["median_psnr"] > 20
  assert summary["reference_test_accuracy"] > 0.8
  victim = data["victims"][0]
  assert set(victim) >= {"psnr", "ssim", "mse", "feature_distance", "recognised",
                         "inferred_labels", "labels"}
  again = experiment.run(cfg, tmp_path / "run", progress=False)
  assert again == summary and "nothing to do" in capsys.readouterr().out
  with pytest.raises(SystemExit, match="different config"):
    experiment.run(specs.InversionConfig(**{**TINY, "seed": 1}), tmp_path / "run", progress=False)


def test_images_folder_victims_with_class_subfolders(tmp_path):
  rng = np.random.default_rng(0)
  ds = datasets.load("digits")
  for i, label in enumerate((3, 5, 5)):
    (tmp_path / "imgs" / str(label)).mkdir(parents=True, exist_ok=True)
    img = (ds.x_test[i, :, :, 0] * 255).astype(np.uint8)
    Image.fromarray(img).resize((24, 24)).save(tmp_path / "imgs" / str(label) / f"{i}.png")
  (tmp_path / "imgs" / "notes.txt").write_text("not an image")
  (tmp_path / "imgs" / "broken.png").write_bytes(rng.bytes(100))
  x, y, names = datasets.load_image_folder(tmp_path / "imgs", (8, 8, 1))
  assert x.shape == (3, 8, 8, 1) and list(y) == [3, 5, 5] and names[0] == "3/0.png"
  assert 0 <= x.min() and x.max() <= 1
  cfg = specs.InversionConfig(**{**TINY, "victims": specs.VictimsConfig(
      dataset="digits", image_size=None, channels=None, images=str(tmp_path / "imgs"), num=16)},
      feature_metric=False)
  summary = experiment.run(cfg, tmp_path / "run", progress=False)
  assert summary["victims"] == 3  # all the folder holds
  data = json.loads((tmp_path / "run" / "metrics.json").read_text())
  assert [v["labels"] for v in data["victims"]] == [[3], [5], [5]]
  assert data["victims"][0]["source"] == "3/0.png"


def test_bad_input_gives_one_clear_error(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(SystemExit, match="no readable PNG/JPEG image"):
    experiment.main(["--workdir", str(tmp_path / "a"), "--victims.dataset", "digits",
             "--victims.image_size", "none", "--victims.channels", "none",
             "--victims.images", str(tmp_path / "empty")])
  with pytest.raises(SystemExit, match="not a folder"):
    experiment.main(["--workdir", str(tmp_path / "b"), "--victims.images", str(tmp_path / "missing")])
  with pytest.raises(SystemExit):
    experiment.main(["--workdir", str(tmp_path / "c"), "--attack.name", "magic"])
  with pytest.raises(SystemExit, match="need 20000 test images"):
    experiment.main(["--workdir", str(tmp_path / "d"), "--victims.num", "20000"])
  with pytest.raises(ValueError, match="prune fraction"):
    specs.DefenseSpec(name="prune", fraction=1.5)


def test_divergence_is_retried_then_reported_failed_never_scored(tmp_path):
  # Noise of std 1e30 overflows the squared matching loss: every restart diverges.
  cfg = specs.InversionConfig(**{**TINY, "attack": specs.AttackSpec(
      name="idlg", optimizer="adam", steps=20, restarts=2, retries=1)},
      defense=specs.DefenseSpec(name="gaussian", std=1e30), feature_metric=False)
  summary = experiment.run(cfg, tmp_path / "run", progress=False)
  assert summary["failed"] == 3 and summary["retried_victims"] == 3
  assert summary["diverged_restarts"] == 3 * 2 * 2  # victims x restarts x attempts
  assert np.isnan(summary["median_psnr"])
  data = json.loads((tmp_path / "run" / "metrics.json").read_text())
  assert all(v["failed"] and v["attempts"] == 2 for v in data["victims"])


def test_interrupted_attack_resumes_to_the_same_states(tmp_path):
  ds = datasets.load("digits")
  from fljax import models
  model = models.make("lenet", num_classes=10, input_shape=ds.image_shape, init="uniform")
  params = model.init(jax.random.key(0))
  threat = engine.threat_model(specs.ThreatSpec(), ds, "none")
  x, y = ds.x_test[:2, None], ds.y_test[:2, None]
  obs = engine.observe_all(model, params, x, y, threat, specs.DEFENSES["none"](specs.DefenseSpec()),
                       key=jax.random.key(1))
  plan = specs.ATTACKS["idlg"](model, threat, specs.AttackSpec(optimizer="lbfgs", steps=30), specs.DefenseSpec())
  keys = jax.random.split(jax.random.key(2), 2)
  whole = engine.attack_batched(plan, obs, keys, mode="map", chunk=10)
  path = tmp_path / "state.npz"

  class Stop(Exception):
    pass

  def save_then_stop(states, done):
    engine.save_state(path, states, done, 0)
    if done == 20:
      raise Stop

  with pytest.raises(Stop):
    engine.attack_batched(plan, obs, keys, mode="map", chunk=10, checkpoint=save_then_stop)
  done = []
  resumed = engine.attack_batched(plan, obs, keys, mode="map", chunk=10, progress=done.append,
                              restore=lambda like: engine.load_state(path, like, 0))
  assert done[0] == 20  # resumed after 20 steps, not from scratch
  assert engine.load_state(path, whole, 1) is None  # another retry's state is not taken
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(whole)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_batch_attack_with_bias_corrected_labels_and_vmap(tmp_path):
  cfg = specs.InversionConfig(**{**TINY, "attack": specs.AttackSpec(name="ig", steps=50, restarts=2)},
                           threat=specs.ThreatSpec(batch_size=4), batching="vmap",
                           feature_metric=False)
  summary = experiment.run(cfg, tmp_path / "run", progress=False)
  data = json.loads((tmp_path / "run" / "metrics.json").read_text())
  assert summary["batch_size"] == 4 and summary["batching"] == "vmap"
  assert len(data["victims"][0]["psnr"]) == 4 and len(data["victims"][0]["inferred_labels"]) == 4
  assert summary["label_accuracy"] >= 0.75


def _digits_setup(batch_size=1):
  from fljax import models
  ds = datasets.load("digits")
  model = models.make("lenet", num_classes=10, input_shape=ds.image_shape, init="uniform")
  params = model.init(jax.random.key(0))
  threat = engine.threat_model(specs.ThreatSpec(batch_size=batch_size), ds, "none")
  x, y = ds.x_test[:2, None], ds.y_test[:2, None]
  obs = engine.observe_all(model, params, x, y, threat, specs.DEFENSES["none"](specs.DefenseSpec()),
                       key=jax.random.key(1))
  return model, threat, obs


def test_budget_sizes_every_attack_and_caps_lbfgs_line_searches():
  model, threat, obs = _digits_setup()
  plan = specs.ATTACKS["ig"](model, threat, specs.AttackSpec(budget=50, restarts=2), specs.DefenseSpec())
  assert (plan.steps, plan.budget) == (25, 25)
  plan = specs.ATTACKS["idlg"](model, threat, specs.AttackSpec(optimizer="lbfgs", budget=12, steps=40),
                            specs.DefenseSpec())
  states = engine.attack_batched(plan, obs, jax.random.split(jax.random.key(2), 2), mode="map")
  spent = np.asarray(states.counts)[:, 1]
  # Each L-BFGS step costs 1 + its line-search trials; a restart stops once it reaches 12.
  assert (spent >= 12).all() and (spent < 12 + 25).all()
  with pytest.raises(ValueError, match="smaller than attack.restarts"):
    specs.ATTACKS["ig"](model, threat, specs.AttackSpec(budget=1, restarts=2), specs.DefenseSpec())


def test_random_observation_control_keeps_shapes_and_layer_scales():
  _, _, obs = _digits_setup()
  rand = engine.random_observation(obs, key=jax.random.key(3))
  for a, b in zip(jax.tree.leaves(obs.update), jax.tree.leaves(rand.update)):
    assert a.shape == b.shape
    np.testing.assert_allclose(np.std(b[0]), np.std(a[0]), rtol=0.5)
    assert not np.allclose(a, b)


def test_unknown_attack_variants_are_refused_with_the_valid_names():
  from inversion import compare
  assert compare.parse_variant("dps[features=0,scale=8]") == ("dps", {"features": 0.0, "scale": 8.0})
  with pytest.raises(ValueError, match="valid: .*gifd"):
    compare.parse_variant("gan_attack")
  with pytest.raises(ValueError, match="not an attack setting"):
    compare.parse_variant("dps[zeta=3]")
