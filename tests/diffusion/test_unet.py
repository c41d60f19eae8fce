import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import unet

TINY = unet.UNetConfig(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                       norm_num_groups=4, attention_head_dim=8, num_class_embeds=11)


def test_output_shape_time_and_label_dependence():
  params = unet.init(TINY, key=jax.random.key(0))
  apply = jax.jit(unet.UNet(TINY).apply)
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
  out = apply({"params": params}, x, jnp.array([0, 10, 999]), jnp.array([0, 1, 10]))
  assert out.shape == (3, 8, 8, 1) and bool(jnp.all(jnp.isfinite(out)))
  other_t = apply({"params": params}, x, jnp.array([5, 10, 999]), jnp.array([0, 1, 10]))
  other_y = apply({"params": params}, x, jnp.array([0, 10, 999]), jnp.array([3, 1, 10]))
  assert not np.allclose(out[0], other_t[0]) and np.allclose(out[1:], other_t[1:], atol=1e-6)
  assert not np.allclose(out[0], other_y[0]) and np.allclose(out[1:], other_y[1:], atol=1e-6)
  # Per-example: no statistic is shared across the batch (another third example changes
  # nothing of the first two; the same compiled program as above).
  other_x = apply({"params": params}, x.at[2].set(-x[2]), jnp.array([0, 10, 999]),
                  jnp.array([0, 1, 10]))
  assert not np.allclose(out[2], other_x[2])
  np.testing.assert_allclose(other_x[:2], out[:2], atol=1e-6)


def test_parameters_are_named_as_in_diffusers():
  params = unet.init(TINY, key=jax.random.key(0))
  assert set(params) == {"conv_in", "time_embedding", "class_embedding", "down_blocks_0", "down_blocks_1",
                         "mid_block", "up_blocks_0", "up_blocks_1", "conv_norm_out", "conv_out"}
  assert set(params["down_blocks_1"]) == {"resnets_0", "attentions_0"}  # last level: no downsampler
  assert set(params["down_blocks_0"]) == {"resnets_0", "downsamplers_0"}
  assert set(params["up_blocks_0"]) == {"resnets_0", "resnets_1", "attentions_0", "attentions_1", "upsamplers_0"}
  assert set(params["mid_block"]["attentions_0"]) == {"group_norm", "to_q", "to_k", "to_v", "to_out_0"}


def test_timestep_features_match_diffusers_formula():
  t = jnp.array([0.0, 3.0])
  emb = unet.timestep_features(t, 8, flip_sin_to_cos=False, freq_shift=1)
  freqs = np.exp(-np.log(10000) * np.arange(4) / 3)
  np.testing.assert_allclose(emb[1], np.concatenate([np.sin(3 * freqs), np.cos(3 * freqs)]), atol=1e-6)
  flipped = unet.timestep_features(t, 8, flip_sin_to_cos=True, freq_shift=1)
  np.testing.assert_allclose(flipped[1, :4], emb[1, 4:])


@pytest.mark.parametrize("kwargs, message", [
    (dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D")), "CrossAttnDownBlock2D"),
    (dict(up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D")), "ResnetUpsampleBlock2D"),
    (dict(norm_num_groups=3), "norm_num_groups"),
    (dict(block_out_channels=(8,)), "one entry per level"),
    (dict(sample_size=7), "divisible"),
    (dict(resnet_time_scale_shift="ada_group"), "ada_group"),
])
def test_bad_configs_are_named(kwargs, message):
  with pytest.raises(unet.ConfigError, match=message):
    unet.UNetConfig(**{**{f: getattr(TINY, f) for f in ("sample_size", "in_channels", "out_channels",
                                                       "block_out_channels", "down_block_types",
                                                       "up_block_types", "norm_num_groups",
                                                       "attention_head_dim")}, **kwargs})


def test_config_round_trips_through_the_diffusers_dict():
  d = unet.config_to_dict(TINY)
  assert d["_class_name"] == "UNet2DModel" and d["block_out_channels"] == [8, 16]
  assert unet.config_from_dict(d) == TINY
  with pytest.raises(unet.ConfigError, match="fourier"):
    unet.config_from_dict({**d, "time_embedding_type": "fourier"})


def test_conditional_unet_needs_labels():
  params = unet.init(TINY, key=jax.random.key(0))
  with pytest.raises(unet.ConfigError, match="null label"):
    unet.UNet(TINY).apply({"params": params}, jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)))
  assert unet.null_label(TINY) == 10
