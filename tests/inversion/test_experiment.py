"""Tests of the inversion driver (inversion/experiment.py, behind scripts/invert.py) and of
its engine (inversion/engine.py): a tiny end-to-end run, image folders as victims, true
throughput and progress after a resume, divergence reported as failure, interrupted attacks
resume to the same states, typed keys in the saved state, and one-line errors."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from fljax import datasets, models
from inversion import engine, experiment, report, specs

DIGITS = specs.DataSpec(name="digits", image_size=None, channels=None)
TINY = dict(data=DIGITS, victims=specs.VictimsConfig(num=2),
            attack=specs.AttackSpec(name="idlg", optimizer="adam", steps=10), chunk=5)
DIGITS_FLAGS = ["--data.name", "digits", "--data.image_size", "none", "--data.channels", "none"]


def test_tiny_run_writes_its_outputs_times_every_phase_and_is_not_repeated(tmp_path, capsys):
  cfg = specs.InversionConfig(**TINY)
  summary = experiment.run(cfg, tmp_path / "run")
  for name in ("grid.png", "metrics.json", "config.json", "reconstructions.npz"):
    assert (tmp_path / "run" / name).exists()
  data = json.loads((tmp_path / "run" / "metrics.json").read_text())
  assert data["summary"] == summary and len(data["victims"]) == 2
  assert summary["label_accuracy"] == 1.0  # iDLG reads the label off the gradient
  assert summary["failed"] == 0 and np.isfinite(summary["median_psnr"])
  assert summary["reference_test_accuracy"] > 0.8
  assert set(data["victims"][0]) >= {"psnr", "ssim", "mse", "feature_distance", "recognised",
                                     "inferred_labels", "labels"}
  # The reference classifier is trained before the attack and timed apart from it.
  assert summary["classifier_seconds"] > 0 and summary["attack_seconds"] > 0
  assert summary["wall_seconds"] >= summary["classifier_seconds"] + summary["attack_seconds"]
  assert 0 < summary["victim_attacks_per_hour"] < 2 * 3600 / summary["attack_seconds"] + 1
  # Output captured (not a terminal): progress comes as plain lines, up to 100 %.
  assert "attack steps 10/10 (100%)" in capsys.readouterr().err
  again = experiment.run(cfg, tmp_path / "run")
  assert again == summary and "nothing to do" in capsys.readouterr().out
  with pytest.raises(ValueError, match="different config"):
    experiment.run(specs.InversionConfig(**{**TINY, "seed": 1}), tmp_path / "run")


def test_resumed_run_counts_only_its_own_attacks(tmp_path, monkeypatch, capsys):
  cfg = specs.InversionConfig(**TINY)
  real_save = engine.save_state

  def save_then_die(path, states, done, attempt):
    real_save(path, states, done, attempt)
    raise KeyboardInterrupt

  monkeypatch.setattr(engine, "save_state", save_then_die)
  with pytest.raises(KeyboardInterrupt):  # killed after 5 of the 10 steps
    experiment.run(cfg, tmp_path / "run")
  assert list((tmp_path / "run" / "classifier").glob("*.msgpack"))  # trained before the attack
  monkeypatch.undo()
  results = []

  def keep_then_die(config, workdir, result, **kwargs):
    results.append(result)
    raise KeyboardInterrupt

  monkeypatch.setattr(report, "write", keep_then_die)
  with pytest.raises(KeyboardInterrupt):  # resumed at step 5, killed before the report
    experiment.run(cfg, tmp_path / "run")
  assert results[0].victim_attacks == 1.0  # half of each of the 2 victims' steps ran here
  assert "attack steps 10/10 (100%)" in capsys.readouterr().err
  monkeypatch.undo()
  summary = experiment.run(cfg, tmp_path / "run")  # the attack had finished: nothing to attack
  assert summary["victim_attacks_per_hour"] is None and summary["attack_seconds"] == 0
  assert "resumed" in capsys.readouterr().out


def _png(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def test_image_folder_victims_take_class_folder_labels_and_name_skipped_files(tmp_path, capsys):
  ds = datasets.load("digits")
  root = tmp_path / "imgs"
  for digit in range(10):  # every class folder, so that sorted order is the digit itself
    (root / str(digit)).mkdir(parents=True)
  for i, (label, size) in enumerate(((3, 24), (5, 8), (5, 13))):  # mixed sizes
    img = Image.fromarray((ds.x_test[i, :, :, 0] * 255).astype(np.uint8)).resize((size, size))
    img.save(root / str(label) / f"{i}.png")
  (root / "5" / "broken.png").write_bytes(b"\x89PNG truncated")
  experiment.main(["--workdir", str(tmp_path / "run"), *DIGITS_FLAGS, "--data.images",
                   str(root), "--victims.num", "16", "--attack.optimizer", "adam",
                   "--attack.steps", "2", "--feature_metric", "false", "--progress", "false"])
  err = capsys.readouterr().err
  assert "broken.png" in err and "attack steps" not in err  # named; no progress when off
  data = json.loads((tmp_path / "run" / "metrics.json").read_text())
  assert data["summary"]["victims"] == 3  # all the folder's readable images
  assert [v["labels"] for v in data["victims"]] == [[3], [5], [5]]
  assert data["victims"][0]["source"] == "3/0.png"


def test_bad_input_ends_in_one_sentence(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(SystemExit, match="no readable PNG/JPEG image"):
    experiment.main(["--workdir", str(tmp_path / "a"), *DIGITS_FLAGS,
                     "--data.images", str(tmp_path / "empty")])
  with pytest.raises(SystemExit, match="not a folder"):
    experiment.main(["--workdir", str(tmp_path / "b"), *DIGITS_FLAGS,
                     "--data.images", str(tmp_path / "missing")])
  with pytest.raises(SystemExit, match="need 20000 test images"):
    experiment.main(["--workdir", str(tmp_path / "d"), *DIGITS_FLAGS, "--victims.num", "20000"])
  (tmp_path / "file").write_text("")
  with pytest.raises(SystemExit, match="is a file"):
    experiment.main(["--workdir", str(tmp_path / "file"), *DIGITS_FLAGS])
  with pytest.raises(SystemExit):
    experiment.main(["--workdir", str(tmp_path / "c"), "--attack.name", "magic"])
  with pytest.raises(ValueError, match="prune fraction"):
    specs.DefenseSpec(name="prune", fraction=1.5)


def test_divergence_is_retried_then_reported_failed_never_scored(tmp_path, capsys):
  # Noise of std 1e30 overflows the squared matching loss: every restart diverges.
  cfg = specs.InversionConfig(**{**TINY, "attack": specs.AttackSpec(
      name="idlg", optimizer="adam", steps=5, restarts=2, retries=1)},
      defense=specs.DefenseSpec(name="gaussian", std=1e30), feature_metric=False)
  summary = experiment.run(cfg, tmp_path / "run")
  assert summary["failed"] == 2 and summary["retried_victims"] == 2
  assert summary["diverged_restarts"] == 2 * 2 * 2  # victims x restarts x attempts
  assert np.isnan(summary["median_psnr"])
  data = json.loads((tmp_path / "run" / "metrics.json").read_text())
  assert all(v["failed"] and v["attempts"] == 2 for v in data["victims"])
  err = capsys.readouterr().err  # each attempt's progress reaches its own 100 %
  assert "attack steps 5/5 (100%)" in err and "retry 1 steps 5/5 (100%)" in err


def _digits_setup(batch_size=1):
  ds = datasets.load("digits")
  model = models.make("lenet", num_classes=10, input_shape=ds.image_shape, init="uniform")
  params = model.init(jax.random.key(0))
  threat = engine.threat_model(specs.ThreatSpec(batch_size=batch_size), ds, "none")
  x, y = ds.x_test[:2, None], ds.y_test[:2, None]
  obs = engine.observe_all(model, params, x, y, threat,
                           specs.DEFENSES["none"](specs.DefenseSpec()), key=jax.random.key(1))
  return model, threat, obs


def test_interrupted_attack_resumes_to_the_same_states(tmp_path):
  model, threat, obs = _digits_setup()
  plan = specs.ATTACKS["idlg"](model, threat, specs.AttackSpec(optimizer="lbfgs", steps=10),
                              specs.DefenseSpec())
  keys = jax.random.split(jax.random.key(2), 2)
  whole = engine.attack_batched(plan, obs, keys, mode="map", chunk=5)
  path = tmp_path / "state.npz"

  class Stop(Exception):
    pass

  def save_then_stop(states, done):
    engine.save_state(path, states, done, 0)
    if done == 5:
      raise Stop

  with pytest.raises(Stop):
    engine.attack_batched(plan, obs, keys, mode="map", chunk=5, checkpoint=save_then_stop)
  done = []
  resumed = engine.attack_batched(plan, obs, keys, mode="map", chunk=5, progress=done.append,
                                  restore=lambda like: engine.load_state(path, like, 0))
  assert done[0] == 5  # resumed after 5 steps, not from scratch
  assert engine.load_state(path, whole, 1) is None  # another retry's state is not taken
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(whole)):
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):  # the state's key, kept typed
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_saved_state_keeps_typed_prng_keys(tmp_path):
  # The diffusion attacks carry typed keys in their state; np.savez cannot write those.
  state = {"key": jax.random.split(jax.random.key(7), 3),
           "x": np.arange(6, dtype=np.float32).reshape(3, 2)}
  engine.save_state(tmp_path / "s.npz", state, 4, 1)
  like = {"key": jax.random.split(jax.random.key(0), 3), "x": np.zeros((3, 2), np.float32)}
  restored, done = engine.load_state(tmp_path / "s.npz", like, 1)
  assert done == 4 and jax.dtypes.issubdtype(restored["key"].dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(restored["key"]),
                                jax.random.key_data(state["key"]))
  np.testing.assert_array_equal(restored["x"], state["x"])
  assert engine.load_state(tmp_path / "s.npz", {**like, "x": np.zeros((2, 2))}, 1) is None


def test_batch_attack_with_bias_corrected_labels_and_vmap(tmp_path):
  cfg = specs.InversionConfig(
      **{**TINY, "attack": specs.AttackSpec(name="ig", steps=3, restarts=2)},
      threat=specs.ThreatSpec(batch_size=4), batching="vmap", feature_metric=False)
  summary = experiment.run(cfg, tmp_path / "run", progress=False)
  data = json.loads((tmp_path / "run" / "metrics.json").read_text())
  assert summary["batch_size"] == 4 and summary["batching"] == "vmap"
  assert len(data["victims"][0]["psnr"]) == 4 and len(data["victims"][0]["inferred_labels"]) == 4
  assert summary["label_accuracy"] >= 0.75


def test_budget_sizes_every_attack_and_caps_lbfgs_line_searches():
  model, threat, obs = _digits_setup()
  plan = specs.ATTACKS["ig"](model, threat, specs.AttackSpec(budget=50, restarts=2),
                             specs.DefenseSpec())
  assert (plan.steps, plan.budget) == (25, 25)
  plan = specs.ATTACKS["idlg"](model, threat,
                               specs.AttackSpec(optimizer="lbfgs", budget=12, steps=40),
                               specs.DefenseSpec())
  states = engine.attack_batched(plan, obs, jax.random.split(jax.random.key(2), 2), mode="map")
  spent = np.asarray(states.counts)[:, 1]
  # Each L-BFGS step costs 1 + its line-search trials; a restart stops once it reaches 12.
  assert (spent >= 12).all() and (spent < 12 + 25).all()
  with pytest.raises(ValueError, match="needs --attack.budget >= 2 "):
    specs.ATTACKS["ig"](model, threat, specs.AttackSpec(budget=1, restarts=2),
                        specs.DefenseSpec())


def test_random_observation_control_keeps_shapes_and_layer_scales():
  _, _, obs = _digits_setup()
  rand = engine.random_observation(obs, key=jax.random.key(3))
  for a, b in zip(jax.tree.leaves(obs.update), jax.tree.leaves(rand.update)):
    assert a.shape == b.shape
    np.testing.assert_allclose(np.std(b[0]), np.std(a[0]), rtol=0.5)
    assert not np.allclose(a, b)
