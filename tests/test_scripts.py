"""Smoke tests of the scripts (tests/fljax/test_train.py covers scripts/train_fl.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str) -> str:
  """Runs scripts/<name> on one CPU device; asserts it succeeded and returns its stdout."""
  out = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "XLA_FLAGS": ""})
  assert out.returncode == 0, out.stderr
  return out.stdout


@pytest.mark.slow  # a benchmark's smoke test (about 20 s)
def test_bench_fl_round_quick_prints_result_line():
  stdout = run_script("bench_fl_round.py", "--quick", "--clients", "20", "--repeats", "1")
  last = stdout.strip().splitlines()[-1]
  assert last.startswith("RESULT bench_fl_round ratio=") and "clients=20" in last
  ratio = float(last.split("ratio=")[1].split()[0])
  assert ratio > 0


@pytest.mark.slow  # a benchmark's smoke test (about 40 s)
def test_bench_ghost_quick_prints_result_line_and_equal_steps():
  lines = run_script("bench_ghost.py", "--quick", "--repeats", "1").strip().splitlines()
  assert lines[-1].startswith("RESULT bench_ghost speedup=")
  diffs = [float(line.split()[-1]) for line in lines if line.split()[0] in ("lenet", "cnn")]
  assert len(diffs) == 4 and max(diffs) < 1e-5  # ghost and vmap step to the same params


@pytest.mark.slow  # a benchmark's smoke test (about 30 s)
def test_bench_dpsgd_quick_prints_result_line():
  last = run_script("bench_dpsgd.py", "--quick", "--repeats", "1").strip().splitlines()[-1]
  assert last.startswith("RESULT bench_dpsgd ratio=")
  assert float(last.split("ratio=")[1].split()[0]) > 0


def test_bench_secagg_quick_prints_result_line():
  last = run_script("bench_secagg.py", "--quick").strip().splitlines()[-1]
  assert last.startswith("RESULT bench_secagg seconds=")
  assert float(last.split("seconds=")[1].split()[0]) > 0


@pytest.mark.slow  # a benchmark's smoke test (about 30 s)
def test_bench_inversion_quick_prints_result_line():
  stdout = run_script("bench_inversion.py", "--quick", "--victims", "2", "--steps", "5")
  last = stdout.strip().splitlines()[-1]
  assert last.startswith("RESULT bench_inversion ratio=")
  assert float(last.split("ratio=")[1].split()[0]) > 0


@pytest.mark.slow  # invert.py through a subprocess (about 17 s); tests/inversion/test_experiment.py runs the driver in process
def test_invert_script_end_to_end(tmp_path):
  stdout = run_script(
      "invert.py", "--workdir", str(tmp_path / "run"), "--data.name", "digits",
      "--data.image_size", "none", "--data.channels", "none", "--victims.num", "2",
      "--attack.optimizer", "adam", "--attack.steps", "20", "--feature_metric", "false",
      "--progress", "false")
  assert "median PSNR" in stdout
  assert (tmp_path / "run" / "grid.png").exists() and (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.slow  # a subprocess (about 20 s); tests/inversion/test_labels.py tests the estimators
def test_eval_labels_script_runs():
  stdout = run_script("eval_labels.py", "--batches", "2", "--sizes", "1,4")
  rows = [line.split() for line in stdout.strip().splitlines()[1:]]
  assert len(rows) == 6 and rows[0][2] == "1.000"  # iDLG at B = 1


@pytest.mark.slow  # a benchmark's smoke test (about 30 s)
def test_bench_diffusion_quick_prints_result_line():
  last = run_script("bench_diffusion.py", "--quick", "--images", "4", "--single", "1").strip().splitlines()[-1]
  assert last.startswith("RESULT bench_diffusion ratio=")
  assert float(last.split("ratio=")[1].split()[0]) > 0


@pytest.mark.slow  # two subprocesses (about 35 s); tests/diffusion/test_training.py trains in process
def test_train_then_evaluate_a_diffusion_prior(tmp_path):
  tiny = ["--data.name", "digits", "--data.image_size", "8", "--block_out_channels", "16",
          "--down_block_types", "AttnDownBlock2D", "--up_block_types", "AttnUpBlock2D",
          "--norm_num_groups", "4", "--attention_head_dim", "8", "--sample_steps", "2",
          "--progress", "false"]
  run_script("train_diffusion.py", "--workdir", str(tmp_path / "run"), "--steps", "3", *tiny)
  assert (tmp_path / "run" / "prior" / "params.msgpack").exists()
  assert (tmp_path / "run" / "samples_000003.png").exists()
  run_script("eval_diffusion.py", "--prior", str(tmp_path / "run" / "prior"), "--data.name", "digits",
             "--num", "40", "--steps", "2", "--cache_dir", str(tmp_path / "cache"),
             "--workdir", str(tmp_path / "eval"), "--grid")
  result = json.loads((tmp_path / "eval" / "eval.json").read_text())
  assert 0 <= result["class_accuracy"] <= 1 and result["frechet_distance"] > 0
  assert (tmp_path / "eval" / "samples.png").exists()
  # A folder that is not a prior is one clear error.
  bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "eval_diffusion.py"), "--prior",
                        str(tmp_path / "run")], capture_output=True, text=True)
  assert bad.returncode != 0 and "unet.json is missing" in bad.stderr and "Traceback" not in bad.stderr


def _tiny_gan(path):
  import jax
  from inversion import gan
  cfg = gan.GANConfig(latent_dim=8, base=4, channels=1)
  gan.save(gan.GAN(cfg, gan.init(cfg, key=jax.random.key(0))[0]), path)


@pytest.mark.slow  # a subprocess (about 25 s); tests/inversion/attacks/test_gifd.py covers the GAN in process
def test_train_gan_writes_a_loadable_prior(tmp_path):
  run_script("train_gan.py", "--workdir", str(tmp_path / "run"), "--steps", "2", "--base", "4",
             "--latent_dim", "8", "--batch_size", "8", "--sample_every", "2", "--progress", "false")
  from inversion import gan
  assert gan.load(tmp_path / "run" / "prior").config.base == 4
  assert list((tmp_path / "run").glob("samples_*.png"))


def _tiny_prior(path):
  import jax
  from diffusion import prior as prior_lib
  from diffusion import schedules, unet
  micro = unet.UNetConfig(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(8,),
                          down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
                          layers_per_block=1, norm_num_groups=4, num_class_embeds=11)
  prior_lib.save(prior_lib.Prior(unet_config=micro, params=unet.init(micro, key=jax.random.key(0)),
                                 schedule=schedules.linear(1000), num_classes=10,
                                 schedule_config={"name": "linear", "num_train_steps": 1000}), path)


@pytest.mark.slow  # GIFD and DPS through a subprocess (about 35 s); tests/inversion/test_compare.py runs the driver in process
def test_compare_attacks_writes_one_grid_and_one_table(tmp_path):
  _tiny_gan(tmp_path / "gan")
  _tiny_prior(tmp_path / "prior")
  run_script("compare_attacks.py", "--workdir", str(tmp_path / "cmp"), "--victims.num", "1",
             "--feature_metric", "false", "--progress", "false", "--attack.budget", "6",
             "--attack.gan", str(tmp_path / "gan"), "--attack.prior", str(tmp_path / "prior"),
             "--attacks", "ig,gifd,dps[steps=2,control=random_observation]")
  table = (tmp_path / "cmp" / "comparison.md").read_text()
  assert table.count("\n") == 2 + 3 and "gifd" in table
  rows = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
  assert [r["double_backward_evals_per_victim"] for r in rows[:2]] == [6, 6]
  assert (tmp_path / "cmp" / "comparison.png").exists()
  from inversion import compare
  collected = compare.collect(tmp_path)  # the cell 'cmp', one row per attack
  assert collected.count("| cmp |") == 3


@pytest.mark.slow
def test_bench_generative_attacks_quick_prints_result_line():
  last = run_script("bench_generative_attacks.py", "--quick", "--victims", "1", "--steps", "2",
                    "--loop_runs", "1").strip().splitlines()[-1]
  assert last.startswith("RESULT bench_generative_attacks ratio=")


@pytest.mark.parametrize("script", ["bench_vs_torch", "bench_attack_vs_torch"])
def test_peer_benchmarks_without_their_peers_say_how_to_install_them(monkeypatch, capsys,
                                                                     script):
  import importlib.util
  spec = importlib.util.spec_from_file_location(script, ROOT / "scripts" / f"{script}.py")
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  monkeypatch.setitem(sys.modules, "opacus", None)  # import opacus raises ImportError
  with pytest.raises(SystemExit) as exit_info:
    bench.main(["--quick"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "pip install -e '.[peers]'" in err[0] and "torch==2.13.0" in err[0]


@pytest.mark.slow  # the peer benchmark's smoke test, where the peers extra is installed
def test_bench_vs_torch_quick_prints_result_line():
  pytest.importorskip("opacus", reason="the peers extra is not installed")
  last = run_script("bench_vs_torch.py", "--quick", "--repeats", "1", "--rounds", "1")
  assert last.strip().splitlines()[-1].startswith("RESULT bench_vs_torch dp_ratio=")


def test_the_torch_lenet_twin_takes_the_flax_weights():
  torch = pytest.importorskip("torch", reason="the peers extra is not installed")
  import jax
  import numpy as np

  from fljax import models, peers
  model = models.make("lenet", num_classes=10, input_shape=(32, 32, 3), init="uniform")
  params = model.init(jax.random.key(1))
  x = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
  net = peers.model("lenet", (32, 32, 3), 10)
  peers.load_flax_lenet(net, params)
  theirs = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).detach().numpy()
  np.testing.assert_allclose(theirs, np.asarray(model.apply(params, x)), rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # the attack peer benchmark's smoke test, where the peers extra is installed
def test_bench_attack_vs_torch_quick_prints_result_line():
  pytest.importorskip("opacus", reason="the peers extra is not installed")
  last = run_script("bench_attack_vs_torch.py", "--quick")
  assert last.strip().splitlines()[-1].startswith("RESULT bench_attack_vs_torch ratio=")


@pytest.mark.slow  # two worker processes, each compiling both models
def test_bench_cpu_split_quick_prints_result_line():
  last = run_script("bench_cpu_split.py", "--quick")
  assert last.strip().splitlines()[-1].startswith("RESULT bench_cpu_split speedup=")
