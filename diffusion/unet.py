"""The DDPM denoiser: a UNet (Ho et al., NeurIPS 2020) laid out as diffusers' `UNet2DModel`.

ResNet blocks with GroupNorm and a projected time embedding, sinusoidal timestep features,
self-attention in the blocks whose type says so (`AttnDownBlock2D`, `AttnUpBlock2D`, and
the middle block), an optional class embedding added to the time embedding. `UNetConfig`
has diffusers' field names and meanings, and every submodule is named after diffusers'
(`down_blocks_0/resnets_1/conv1` holds `down_blocks.0.resnets.1.conv1`), so a diffusers
checkpoint loads into this module (`diffusion.hub`) and a config round-trips through
diffusers' `config.json`.

Images are NHWC (diffusers is NCHW). `UNet(config)(x, t, labels)`: `x [B, H, W, C]`, `t [B]`
integer or real timesteps, `labels [B]` int (only with `num_class_embeds`); the output has
`out_channels` channels. Class-conditional priors trained here reserve the last class
embedding as the null label (`null_label(config)`), which classifier-free guidance and
unconditional sampling use.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Params = Any

DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")
ACTIVATIONS = {"silu": nn.silu, "swish": nn.silu, "gelu": nn.gelu, "relu": nn.relu, "mish": lambda x: x * jnp.tanh(nn.softplus(x))}


class ConfigError(ValueError):
  """A UNet configuration this module cannot build (the message says which field)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class UNetConfig:
  """diffusers' `UNet2DModel` configuration (the fields this port supports).

  Attributes:
    sample_size: image height = width.
    in_channels, out_channels: image channels in and out.
    block_out_channels: channels of each resolution level.
    down_block_types, up_block_types: one per level, `DownBlock2D` / `AttnDownBlock2D` and
      `UpBlock2D` / `AttnUpBlock2D`; every down block but the last halves the resolution.
    layers_per_block: ResNet blocks per down block (up blocks have one more).
    norm_num_groups, norm_eps: GroupNorm groups and epsilon.
    attention_head_dim: channels per attention head (None: one head).
    num_class_embeds: size of the class embedding table (None: unconditional).
    flip_sin_to_cos, freq_shift: the sinusoidal timestep features' layout.
    center_input_sample: maps the input x to 2x - 1 first.
    resnet_time_scale_shift: 'default' (add the time embedding) or 'scale_shift'.
    downsample_padding: 1 (symmetric) or 0 (pad right/bottom, the original DDPM).
    mid_block_scale_factor: output scale of the middle block's ResNets and attention.
    add_attention: whether the middle block has attention.
    attn_norm_num_groups: GroupNorm groups of the middle attention (None: norm_num_groups
      with 'default' time conditioning, no norm with 'scale_shift', as diffusers).
    act_fn: activation (silu).
  """

  sample_size: int = 32
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (64, 128, 128)
  down_block_types: tuple[str, ...] = ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D")
  up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")
  layers_per_block: int = 2
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  attention_head_dim: int | None = 8
  num_class_embeds: int | None = None
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  center_input_sample: bool = False
  resnet_time_scale_shift: str = "default"
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  add_attention: bool = True
  attn_norm_num_groups: int | None = None
  act_fn: str = "silu"

  def __post_init__(self):
    for name in ("block_out_channels", "down_block_types", "up_block_types"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    levels = len(self.block_out_channels)
    if len(self.down_block_types) != levels or len(self.up_block_types) != levels:
      raise ConfigError(f"block_out_channels, down_block_types and up_block_types must have one "
                        f"entry per level; got {levels}, {len(self.down_block_types)}, "
                        f"{len(self.up_block_types)}")
    for kind, allowed in ((self.down_block_types, DOWN_BLOCKS), (self.up_block_types, UP_BLOCKS)):
      for t in kind:
        if t not in allowed:
          raise ConfigError(f"unsupported block type {t!r}; this UNet port supports {allowed}")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ConfigError(f"norm_num_groups={self.norm_num_groups} must divide every entry of "
                          f"block_out_channels {self.block_out_channels}")
      if self.attention_head_dim and c % self.attention_head_dim:
        raise ConfigError(f"attention_head_dim={self.attention_head_dim} must divide every "
                          f"entry of block_out_channels {self.block_out_channels}")
    if self.resnet_time_scale_shift not in ("default", "scale_shift"):
      raise ConfigError(f"unsupported resnet_time_scale_shift {self.resnet_time_scale_shift!r}; "
                        "choose 'default' or 'scale_shift'")
    if self.downsample_padding not in (0, 1):
      raise ConfigError(f"downsample_padding must be 0 or 1, got {self.downsample_padding}")
    if self.attn_norm_num_groups not in (None, self.norm_num_groups):
      raise ConfigError(f"unsupported attn_norm_num_groups={self.attn_norm_num_groups} different "
                        f"from norm_num_groups={self.norm_num_groups}")
    if self.act_fn not in ACTIVATIONS:
      raise ConfigError(f"unsupported act_fn {self.act_fn!r}; choose one of {sorted(ACTIVATIONS)}")
    factor = 2 ** (levels - 1)
    if self.sample_size % factor:
      raise ConfigError(f"sample_size={self.sample_size} must be divisible by 2^(levels - 1) = "
                        f"{factor} for {levels} resolution levels")

  @property
  def time_embed_dim(self) -> int:
    return 4 * self.block_out_channels[0]

  @property
  def input_shape(self) -> tuple[int, int, int]:
    return (self.sample_size, self.sample_size, self.in_channels)


def null_label(config: UNetConfig) -> int:
  """The label index a class-conditional prior trained here reserves for 'no class'."""
  if not config.num_class_embeds:
    raise ConfigError("this UNet has no class embedding (num_class_embeds is None)")
  return config.num_class_embeds - 1


def timestep_features(t: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                      max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal features of timesteps `t [B]` -> `[B, dim]` (diffusers' layout)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """Two dense layers with an activation between them (diffusers' `TimestepEmbedding`)."""

  features: int
  act: Any

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.features, name="linear_1")(x)
    return nn.Dense(self.features, name="linear_2")(self.act(x))


class ResnetBlock(nn.Module):
  """diffusers' `ResnetBlock2D`: norm-act-conv, time embedding, norm-act-conv, skip."""

  out_channels: int
  config: UNetConfig
  output_scale_factor: float = 1.0

  @nn.compact
  def __call__(self, x, temb):
    cfg = self.config
    act = ACTIVATIONS[cfg.act_fn]
    h = act(nn.GroupNorm(cfg.norm_num_groups, epsilon=cfg.norm_eps, name="norm1")(x))
    h = nn.Conv(self.out_channels, (3, 3), padding=1, name="conv1")(h)
    scale_shift = cfg.resnet_time_scale_shift == "scale_shift"
    t = nn.Dense(self.out_channels * (2 if scale_shift else 1), name="time_emb_proj")(act(temb))
    t = t[:, None, None, :]
    if not scale_shift:
      h = h + t
    h = nn.GroupNorm(cfg.norm_num_groups, epsilon=cfg.norm_eps, name="norm2")(h)
    if scale_shift:
      scale, shift = jnp.split(t, 2, axis=-1)
      h = h * (1 + scale) + shift
    h = nn.Conv(self.out_channels, (3, 3), padding=1, name="conv2")(act(h))
    if x.shape[-1] != self.out_channels:
      x = nn.Conv(self.out_channels, (1, 1), name="conv_shortcut")(x)
    return (x + h) / self.output_scale_factor


class Attention(nn.Module):
  """diffusers' spatial self-attention block: GroupNorm, multi-head attention, residual."""

  config: UNetConfig
  output_scale_factor: float = 1.0
  norm: bool = True

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    b, hh, ww, c = x.shape
    head_dim = cfg.attention_head_dim or c
    heads = c // head_dim
    h = nn.GroupNorm(cfg.norm_num_groups, epsilon=cfg.norm_eps, name="group_norm")(x) if self.norm else x
    h = h.reshape(b, hh * ww, c)
    split = lambda y: y.reshape(b, hh * ww, heads, head_dim)  # noqa: E731
    q = split(nn.Dense(c, name="to_q")(h))
    k = split(nn.Dense(c, name="to_k")(h))
    v = split(nn.Dense(c, name="to_v")(h))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, hh * ww, c)
    out = nn.Dense(c, name="to_out_0")(out).reshape(b, hh, ww, c)
    return (out + x) / self.output_scale_factor


class Downsample(nn.Module):
  """A stride-2 3x3 convolution (padding 1, or the original DDPM's right/bottom pad)."""

  channels: int
  padding: int

  @nn.compact
  def __call__(self, x):
    if self.padding == 0:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
      return nn.Conv(self.channels, (3, 3), strides=2, padding="VALID", name="conv")(x)
    return nn.Conv(self.channels, (3, 3), strides=2, padding=1, name="conv")(x)


class Upsample(nn.Module):
  """Nearest-neighbour 2x upsampling, then a 3x3 convolution."""

  channels: int

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return nn.Conv(self.channels, (3, 3), padding=1, name="conv")(x)


class DownBlock(nn.Module):
  """`DownBlock2D` / `AttnDownBlock2D`: ResNets (each followed by attention), downsample."""

  out_channels: int
  attention: bool
  downsample: bool
  config: UNetConfig

  @nn.compact
  def __call__(self, x, temb):
    skips = []
    for i in range(self.config.layers_per_block):
      x = ResnetBlock(self.out_channels, self.config, name=f"resnets_{i}")(x, temb)
      if self.attention:
        x = Attention(self.config, name=f"attentions_{i}")(x)
      skips.append(x)
    if self.downsample:
      x = Downsample(self.out_channels, self.config.downsample_padding, name="downsamplers_0")(x)
      skips.append(x)
    return x, skips


class UpBlock(nn.Module):
  """`UpBlock2D` / `AttnUpBlock2D`: ResNets over [x, skip] (each followed by attention), upsample."""

  out_channels: int
  attention: bool
  upsample: bool
  config: UNetConfig

  @nn.compact
  def __call__(self, x, skips, temb):
    for i, skip in enumerate(skips):
      x = jnp.concatenate([x, skip], axis=-1)
      x = ResnetBlock(self.out_channels, self.config, name=f"resnets_{i}")(x, temb)
      if self.attention:
        x = Attention(self.config, name=f"attentions_{i}")(x)
    if self.upsample:
      x = Upsample(self.out_channels, name="upsamplers_0")(x)
    return x


class MidBlock(nn.Module):
  """`UNetMidBlock2D`: ResNet, attention (if `add_attention`), ResNet."""

  config: UNetConfig

  @nn.compact
  def __call__(self, x, temb):
    cfg = self.config
    c, s = x.shape[-1], cfg.mid_block_scale_factor
    x = ResnetBlock(c, cfg, output_scale_factor=s, name="resnets_0")(x, temb)
    if cfg.add_attention:
      norm = cfg.attn_norm_num_groups is not None or cfg.resnet_time_scale_shift == "default"
      x = Attention(cfg, output_scale_factor=s, norm=norm, name="attentions_0")(x)
    return ResnetBlock(c, cfg, output_scale_factor=s, name="resnets_1")(x, temb)


class UNet(nn.Module):
  """diffusers' `UNet2DModel` in Flax (NHWC); see the module docstring."""

  config: UNetConfig

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, labels: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    act = ACTIVATIONS[cfg.act_fn]
    t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
    if cfg.center_input_sample:
      x = 2 * x - 1.0
    features = timestep_features(t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                 freq_shift=cfg.freq_shift)
    temb = TimestepEmbedding(cfg.time_embed_dim, act, name="time_embedding")(features)
    if cfg.num_class_embeds:
      if labels is None:
        raise ConfigError("this UNet is class-conditional: pass labels (the null label "
                          "num_class_embeds - 1 for unconditional use)")
      temb = temb + nn.Embed(cfg.num_class_embeds, cfg.time_embed_dim, name="class_embedding")(labels)

    h = nn.Conv(cfg.block_out_channels[0], (3, 3), padding=1, name="conv_in")(x)
    skips = [h]
    levels = len(cfg.block_out_channels)
    for i, (channels, kind) in enumerate(zip(cfg.block_out_channels, cfg.down_block_types)):
      h, block_skips = DownBlock(channels, kind == "AttnDownBlock2D", i < levels - 1, cfg,
                                 name=f"down_blocks_{i}")(h, temb)
      skips.extend(block_skips)
    h = MidBlock(cfg, name="mid_block")(h, temb)
    for i, (channels, kind) in enumerate(zip(reversed(cfg.block_out_channels), cfg.up_block_types)):
      n = cfg.layers_per_block + 1
      block_skips, skips = skips[-n:][::-1], skips[:-n]
      h = UpBlock(channels, kind == "AttnUpBlock2D", i < levels - 1, cfg,
                  name=f"up_blocks_{i}")(h, block_skips, temb)
    h = act(nn.GroupNorm(cfg.norm_num_groups, epsilon=cfg.norm_eps, name="conv_norm_out")(h))
    return nn.Conv(cfg.out_channels, (3, 3), padding=1, name="conv_out")(h)


def init(config: UNetConfig, *, key: jax.Array) -> Params:
  """Freshly initialised parameters for `UNet(config)`."""
  x = jnp.zeros((1, *config.input_shape), jnp.float32)
  labels = jnp.zeros((1,), jnp.int32) if config.num_class_embeds else None
  return UNet(config).init(key, x, jnp.zeros((1,)), labels)["params"]


def count_params(params: Params) -> int:
  return sum(int(p.size) for p in jax.tree.leaves(params))


def config_from_dict(d: dict[str, Any]) -> UNetConfig:
  """A `UNetConfig` from a diffusers `config.json` dict (unknown keys ignored, unsupported
  values named)."""
  if d.get("time_embedding_type", "positional") != "positional":
    raise ConfigError(f"unsupported time_embedding_type {d['time_embedding_type']!r}; this port "
                      "supports 'positional'")
  if d.get("class_embed_type") not in (None,):
    raise ConfigError(f"unsupported class_embed_type {d['class_embed_type']!r}; this port "
                      "supports a plain class embedding table (class_embed_type null)")
  for key, ok in (("downsample_type", "conv"), ("upsample_type", "conv")):
    if d.get(key, ok) != ok:
      raise ConfigError(f"unsupported {key} {d[key]!r}; this port supports {ok!r}")
  fields = {f.name for f in dataclasses.fields(UNetConfig)}
  kwargs = {k: v for k, v in d.items() if k in fields}
  for k in ("block_out_channels", "down_block_types", "up_block_types"):
    if k in kwargs:
      kwargs[k] = tuple(kwargs[k])
  return UNetConfig(**kwargs)


def config_to_dict(config: UNetConfig) -> dict[str, Any]:
  """The diffusers `config.json` dict of `config` (`_class_name: UNet2DModel`)."""
  d = {"_class_name": "UNet2DModel", "time_embedding_type": "positional"}
  for f in dataclasses.fields(config):
    v = getattr(config, f.name)
    d[f.name] = list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v
  return d
