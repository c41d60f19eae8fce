"""diffusers checkpoints: torch-free round trips and bad input here; equality with
diffusers itself in test_diffusers_equality.py (optional)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from diffusion import hub, prior, schedules, unet
from tests.diffusion.test_unet import TINY


@pytest.fixture(scope="module")
def tiny_prior():
  return prior.Prior(unet_config=TINY, params=unet.init(TINY, key=jax.random.key(0)),
                     schedule=schedules.linear(1000), num_classes=10,
                     schedule_config={"name": "linear", "num_train_steps": 1000})


def _same_output(a, b):
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  t, y = jnp.array([3, 500]), jnp.array([1, 10])
  np.testing.assert_allclose(a.apply(a.params, x, t, y), b.apply(b.params, x, t, y), atol=1e-6)


def test_save_then_load_diffusers_round_trips(tiny_prior, tmp_path):
  hub.save_diffusers(tiny_prior, tmp_path)
  state = load_file(str(tmp_path / "unet" / hub.WEIGHTS))
  assert state["down_blocks.0.resnets.0.conv1.weight"].shape == (8, 8, 3, 3)  # OIHW
  assert state["mid_block.attentions.0.to_out.0.weight"].shape == (16, 16)
  loaded = hub.load_diffusers(tmp_path)
  assert loaded.unet_config == TINY and loaded.num_classes == 10
  np.testing.assert_allclose(loaded.schedule.alpha_bars, tiny_prior.schedule.alpha_bars)
  _same_output(tiny_prior, loaded)


def test_pre_014_attention_names_are_renamed(tiny_prior, tmp_path):
  hub.save_diffusers(tiny_prior, tmp_path)
  path = tmp_path / "unet" / hub.WEIGHTS
  old = {}
  for k, v in load_file(str(path)).items():
    for new, dep in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
      k = k.replace(f".{new}.", f".{dep}.")
    old[k] = v
  assert "mid_block.attentions.0.proj_attn.weight" in old
  save_file(old, str(path))
  _same_output(tiny_prior, hub.load_diffusers(tmp_path))


def _edit(tmp_path, tiny_prior, change):
  hub.save_diffusers(tiny_prior, tmp_path)
  path = tmp_path / "unet" / hub.WEIGHTS
  state = load_file(str(path))
  change(state)
  save_file(state, str(path))


def test_missing_tensor_is_named(tiny_prior, tmp_path):
  _edit(tmp_path, tiny_prior, lambda s: s.pop("up_blocks.1.resnets.0.conv2.bias"))
  with pytest.raises(hub.CheckpointFormatError, match=r"up_blocks\.1\.resnets\.0\.conv2\.bias"):
    hub.load_diffusers(tmp_path)


def test_mismatched_tensor_is_named(tiny_prior, tmp_path):
  def change(s):
    s["conv_in.weight"] = np.zeros((8, 3, 3, 3), np.float32)
  _edit(tmp_path, tiny_prior, change)
  with pytest.raises(hub.CheckpointFormatError, match=r"conv_in\.weight.*\(8, 3, 3, 3\).*\(8, 1, 3, 3\)"):
    hub.load_diffusers(tmp_path)


def test_unexpected_tensor_is_named(tiny_prior, tmp_path):
  def change(s):
    s["down_blocks.0.attentions.0.to_q.weight"] = np.zeros((8, 8), np.float32)
  _edit(tmp_path, tiny_prior, change)
  with pytest.raises(hub.CheckpointFormatError, match=r"down_blocks\.0\.attentions\.0\.to_q\.weight"):
    hub.load_diffusers(tmp_path)


def test_unsupported_block_type_is_named(tiny_prior, tmp_path):
  hub.save_diffusers(tiny_prior, tmp_path)
  config = json.loads((tmp_path / "unet" / "config.json").read_text())
  config["down_block_types"] = ["DownBlock2D", "SkipDownBlock2D"]
  (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
  with pytest.raises(hub.CheckpointFormatError, match="SkipDownBlock2D"):
    hub.load_diffusers(tmp_path)


def test_missing_files_say_what_a_folder_needs(tmp_path):
  with pytest.raises(hub.CheckpointFormatError, match="config.json"):
    hub.load_diffusers(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(unet.config_to_dict(TINY)))
  (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"")
  with pytest.raises(hub.CheckpointFormatError, match="safe_serialization"):
    hub.load_diffusers(tmp_path)
