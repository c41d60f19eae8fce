"""End-to-end tests of privacy/train.py (federated runs with a mechanism), and the command
lines of scripts/train_fl.py and scripts/train_dpsgd.py: epsilon logged and met, resume
bit-identical, every mechanism runs, clear errors."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fljax import runs
from fljax import train as fl_train
from fljax.checkpoint import Checkpointer
from privacy import train

ROOT = Path(__file__).resolve().parents[2]


def _config(rounds=3, subset=400, **privacy):  # privacy: PrivacyConfig's fields
  return train.PrivateExperimentConfig(  # 50 examples a client: every step is cheap
      data=fl_train.DataConfig(name="digits", num_clients=8, train_subset=subset,
                               test_subset=subset and subset // 2),
      model=fl_train.ModelConfig(name="mlp"),
      fed=fl_train.fed.FedConfig(clients_per_round=0.5, sampling="poisson"),
      rounds=rounds, checkpoint_every=1, privacy=train.PrivacyConfig(**privacy))


def _records(workdir):
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_dp_fedavg_meets_target_epsilon(tmp_path):
  cfg = _config(mechanism="dp_fedavg", target_epsilon=3.0)
  train.train_and_evaluate(cfg, tmp_path, progress=False)
  eps = [r["epsilon"] for r in _records(tmp_path)]
  assert eps == sorted(eps) and eps[-1] <= 3.0 and eps[-1] == pytest.approx(3.0, rel=1e-2)
  # sigma was calibrated for 3 rounds: running longer would silently overspend
  with pytest.raises(runs.WorkdirError, match="different config"):
    train.train_and_evaluate(dataclasses.replace(cfg, rounds=4), tmp_path, progress=False)


def test_adaptive_dp_fedavg_resumes_identically(tmp_path):
  cfg = _config(mechanism="dp_fedavg", noise_multiplier=1.0, adaptive_clipping=True,
                count_noise_multiplier=5.0)
  train.train_and_evaluate(cfg, tmp_path / "full", progress=False)
  full = _records(tmp_path / "full")
  train.train_and_evaluate(dataclasses.replace(cfg, rounds=2), tmp_path / "split", progress=False)
  train.train_and_evaluate(cfg, tmp_path / "split", progress=False)
  split = _records(tmp_path / "split")
  assert [r["epsilon"] for r in split] == [r["epsilon"] for r in full]
  assert len({r["dp_clip_norm"] for r in full}) == 3  # C adapts every round
  assert split[-1]["dp_clip_norm"] == full[-1]["dp_clip_norm"]
  a = Checkpointer(tmp_path / "full" / "checkpoints").restore(_restore_template())
  b = Checkpointer(tmp_path / "split" / "checkpoints").restore(_restore_template())
  for x, y in zip(fl_train.jax.tree.leaves(a), fl_train.jax.tree.leaves(b)):
    np.testing.assert_array_equal(fl_train.jax.random.key_data(x) if x.dtype == b.key.dtype else x,
                                  fl_train.jax.random.key_data(y) if y.dtype == b.key.dtype else y)


def _restore_template():
  """A ServerState shaped like the run's (params of the digits MLP, DP-FedAvg state)."""
  import jax
  from fljax import federated as fed
  from fljax import models
  from privacy import federated as pfed
  model = models.make("mlp", num_classes=10, input_shape=(8, 8, 1))
  cfg = fed.FedConfig()
  return fed.init_server_state(model.init(jax.random.key(0)), cfg, key=jax.random.key(0),
                               aggregate=pfed.dp_fedavg(clip_norm=1.0, noise_multiplier=1.0,
                                                        expected_clients=4.0))


@pytest.mark.parametrize("privacy", [
    dict(mechanism="dpsgd", noise_multiplier=1.0),
    dict(mechanism="local_dp", target_epsilon=20.0),
    dict(mechanism="prune", prune_fraction=0.5),
    dict(mechanism="quantize", quantize="int8"),
    dict(mechanism="dp_fedavg", noise_multiplier=1.0, accountant="rdp"),
    dict(mechanism="secagg", secagg_neighbours=-1, secagg_dropout=0.2),
    # the real protocol with the distributed discrete Gaussian, calibrated
    dict(mechanism="secagg", target_epsilon=30.0, secagg_bits=20),
])
def test_every_mechanism_runs(tmp_path, privacy):
  record = train.train_and_evaluate(_config(rounds=2, **privacy), tmp_path, progress=False)
  assert 0 <= record["test_accuracy"] <= 1
  if privacy["mechanism"] in train.DP_MECHANISMS or "target_epsilon" in privacy:
    assert 0 < record["epsilon"] < float("inf")
    if "target_epsilon" in privacy:
      assert record["epsilon"] <= privacy["target_epsilon"]
  else:
    assert "epsilon" not in record


def _run(script, *args):
  return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args],
                        capture_output=True, text=True, timeout=600,
                        env={**os.environ, "XLA_FLAGS": ""})


def test_cli_errors_are_one_clear_line(tmp_path):
  out = _run("train_fl.py", "--workdir", str(tmp_path), "--privacy.mechanism", "dp_fedavg")
  assert out.returncode != 0
  assert "needs exactly one of --privacy.noise_multiplier or --privacy.target_epsilon" in out.stderr
  assert "Traceback" not in out.stderr
  out = _run("train_dpsgd.py", "--workdir", str(tmp_path), "--delta", "2")
  assert out.returncode != 0 and "delta must be in (0, 1)" in out.stderr
  assert "Traceback" not in out.stderr


def test_secure_aggregation_trains_like_plain_fedavg(tmp_path):
  plain = train.train_and_evaluate(_config(rounds=4), tmp_path / "plain", progress=False)
  secure = train.train_and_evaluate(_config(rounds=4, mechanism="secagg", secagg_clip=5.0),
                                    tmp_path / "secure", progress=False)
  # uniform vs size-weighted mean of 4 near-equal iid clients, plus quantization
  assert abs(secure["test_accuracy"] - plain["test_accuracy"]) < 0.03
  assert secure["secagg_clipped"] == 0 and secure["secagg_aborted"] == 0


def test_forward_noise_logs_three_threat_models_and_post_processing_changes_none(tmp_path):
  base = dict(mechanism="forward_noise", noise_multiplier=2.0, clip_norm=0.01)
  runs = {"plain": _config(**base),
          "no_rescale": _config(**base, rescale=False),
          "momentum": dataclasses.replace(
              _config(**base), fed=fl_train.fed.FedConfig(
                  clients_per_round=0.5, sampling="poisson", server_optimizer="momentum"))}
  logs = {}
  for name, cfg in runs.items():
    train.train_and_evaluate(cfg, tmp_path / name, progress=False)
    logs[name] = _records(tmp_path / name)
  keys = ("epsilon", "epsilon_server", "epsilon_record")
  first = [[r[k] for k in keys] for r in logs["plain"]]
  for name in runs:
    assert [[r[k] for k in keys] for r in logs[name]] == first
  last = logs["plain"][-1]
  assert 0 < last["epsilon"] < float("inf") and 0 < last["epsilon_server"] < float("inf")
  # participation is visible: the model observer's epsilon is the binomial mixture
  from privacy import forward_noise as fn
  assert last["epsilon"] == pytest.approx(fn.visible_gdp_epsilon([2.0] * 3, 0.5, 1e-5), rel=1e-9)
  saved = json.loads((tmp_path / "plain" / "privacy.json").read_text())
  assert saved["schedule"]["z"] == [2.0] * 3
  for name in keys:
    assert set(saved["guarantees"][name]) == {"threat_model", "relation", "event", "accountant"}
  assert saved["guarantees"]["epsilon"]["relation"] == "replace_one"
  assert "participation_visible" in json.dumps(saved["guarantees"]["epsilon"]["event"])


def test_topup_hides_participation_and_is_accounted_as_dp_fedavg(tmp_path):
  from privacy import federated as pfed
  cfg = _config(mechanism="forward_noise", noise_multiplier=0.5, clip_norm=0.01,
                topup_noise_multiplier=1.5)
  record = train.train_and_evaluate(cfg, tmp_path, progress=False)
  event, relation = pfed.dp_fedavg_event(cfg.fed, 8, 1.5)
  from privacy import accounting
  assert relation == "add_remove"
  assert record["epsilon"] == pytest.approx(accounting.Accountant("pld", relation, 1e-5).compose(
      event, 3).epsilon(), rel=1e-9)
  assert record["epsilon"] < record["epsilon_visible"]
  with pytest.raises(ValueError, match="below sqrt"):  # 8 slots: z_T >= sqrt(8) * 0.6
    train.train_and_evaluate(dataclasses.replace(cfg, privacy=dataclasses.replace(
        cfg.privacy, noise_multiplier=0.6)), tmp_path / "low", progress=False)


def test_noise_seed_os_draws_noise_nobody_can_regenerate_from_the_seed(tmp_path):
  base = dict(mechanism="dp_fedavg", noise_multiplier=1.0)
  runs = {}
  for name, seed in (("run_a", "run"), ("run_b", "run"), ("os_a", "os"), ("os_b", "os")):
    train.train_and_evaluate(_config(rounds=1, **base, noise_seed=seed), tmp_path / name,
                             progress=False)
    runs[name] = _records(tmp_path / name)[-1]["update_norm"]
    assert json.loads((tmp_path / name / "privacy.json").read_text())["noise_seed"] == seed
  assert runs["run_a"] == runs["run_b"]
  assert len({runs["run_a"], runs["os_a"], runs["os_b"]}) == 3


@pytest.mark.parametrize("privacy", [
    dict(mechanism="forward_noise", target_epsilon=20.0, schedule="anneal", z_end=0.5),
    dict(mechanism="forward_noise", schedule="cosine", t_start=900, t_end=700,
         central_noise_multiplier=1.0, record_noise_multiplier=1.0),
    dict(mechanism="forward_noise", noise_multiplier=1.0, scaling="norm"),
    dict(mechanism="pfdm", t_start=750),
])
def test_forward_noise_variants_run(tmp_path, privacy):
  if privacy["mechanism"] == "forward_noise":
    privacy = {**privacy, "clip_norm": 0.01}  # noise z C sqrt(55k) must not swamp the mlp
  # record-level noise gains on the server's epsilon only with clients of ~200 examples
  subset = None if "record_noise_multiplier" in privacy else 400
  record = train.train_and_evaluate(_config(rounds=2, subset=subset, **privacy), tmp_path,
                                    progress=False)
  assert 0 <= record["test_accuracy"] <= 1
  if privacy.get("scaling") == "norm":
    assert record["epsilon"] == float("inf")
  elif "target_epsilon" in privacy:
    assert record["epsilon"] <= privacy["target_epsilon"]
  else:
    assert 0 < record["epsilon"] < float("inf")
  if "record_noise_multiplier" in privacy:
    assert record["epsilon_record"] < record["epsilon_server"]


@pytest.mark.parametrize("privacy, message", [
    (dict(mechanism="forward_noise"), "exactly one of"),
    (dict(mechanism="forward_noise", noise_multiplier=1.0, schedule="staircase"), "z_end"),
    (dict(mechanism="forward_noise", noise_multiplier=1.0, schedule="sigmoid"), "schedule"),
    (dict(mechanism="forward_noise", schedule="linear", t_start=0), "integer in"),
    (dict(mechanism="forward_noise", noise_multiplier=1.0, clip_norm=0.0), "clip norm"),
    (dict(mechanism="forward_noise", noise_multiplier=1.0, delta=1.0), "delta"),
    (dict(mechanism="pfdm", t_start=1001), "integer in"),
    (dict(mechanism="forward_noise", noise_multiplier=1.0, central_noise_multiplier=1.0,
          topup_noise_multiplier=3.0), "at most one"),
    (dict(mechanism="none", noise_seed="urandom"), "noise_seed"),
])
def test_forward_noise_bad_settings_are_rejected(privacy, message):
  with pytest.raises(ValueError, match=message):
    train.PrivacyConfig(**privacy)
