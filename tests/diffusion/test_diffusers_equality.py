"""The Flax port against diffusers itself (optional: skipped without torch and diffusers).

Run it with

    pip install torch==2.13.0 diffusers        # a CPU build of torch
    python -m pytest -q tests/diffusion/test_diffusers_equality.py

A randomly initialised `UNet2DModel` saved by diffusers (safetensors) must give the same
output through `diffusion.hub` to 1e-4, and our DDPM / DDIM steps must match diffusers'
`DDPMScheduler.step` / `DDIMScheduler.step` to 1e-5 with the same noise.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusion import hub, samplers, schedules  # noqa: E402

CONFIGS = {
    # Class-conditional, multi-head attention, as priors trained here.
    "conditional": dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
                        norm_num_groups=8, attention_head_dim=16, num_class_embeds=5),
    # google/ddpm-cifar10-32's options: original DDPM padding, sin/cos order, freq shift,
    # one attention head; plus scale-shift time conditioning.
    "ddpm_cifar_style": dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 32, 64),
                             down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                             layers_per_block=1, norm_num_groups=8, attention_head_dim=None,
                             downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
                             resnet_time_scale_shift="scale_shift"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_unet_port_matches_diffusers(name, tmp_path):
  torch.manual_seed(0)
  model = diffusers.UNet2DModel(**CONFIGS[name]).eval()
  with torch.no_grad():  # move every parameter off its initial value (norm scales of 1, zero biases)
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(tmp_path, safe_serialization=True)
  config, params = hub.load_unet(tmp_path)

  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 3, 16, 16)).astype(np.float32)
  t = np.array([0, 17, 999])
  labels = np.array([0, 2, 4]) if config.num_class_embeds else None
  with torch.no_grad():
    want = model(torch.from_numpy(x), torch.from_numpy(t),
                 class_labels=None if labels is None else torch.from_numpy(labels)).sample.numpy()
  from diffusion import unet
  got = unet.UNet(config).apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t),
                                None if labels is None else jnp.asarray(labels))
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, atol=1e-4, rtol=0)


def _scheduler_case(num_steps, index):
  rng = np.random.default_rng(index)
  sample = rng.standard_normal((2, 4, 4, 1)).astype(np.float32)
  model_out = rng.standard_normal((2, 4, 4, 1)).astype(np.float32)
  key = jax.random.key(index)
  _, k_noise = jax.random.split(key)
  noise = np.asarray(jax.random.normal(k_noise, sample.shape))
  return sample, model_out, key, noise


def _ours(sampler, sample, model_out, key, index):
  state = samplers.SamplerState(x=jnp.asarray(sample), i=jnp.asarray(index, jnp.int32), key=key)
  state, _ = sampler.step(state, lambda x, t: jnp.asarray(model_out))
  return np.asarray(state.x)


def _nchw(a):
  return torch.from_numpy(np.array(a.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("num_steps, index", [(1000, 0), (1000, 500), (1000, 999), (50, 10), (50, 49)])
def test_ddpm_step_matches_diffusers(num_steps, index, monkeypatch):
  scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
  scheduler.set_timesteps(num_steps)
  sample, model_out, key, noise = _scheduler_case(num_steps, index)
  import diffusers.schedulers.scheduling_ddpm as ddpm_module
  monkeypatch.setattr(ddpm_module, "randn_tensor", lambda *a, **k: _nchw(noise))
  t = int(scheduler.timesteps[index])
  want = scheduler.step(_nchw(model_out), t, _nchw(sample)).prev_sample.numpy().transpose(0, 2, 3, 1)
  got = _ours(samplers.ddpm(schedules.linear(1000), num_steps=num_steps), sample, model_out, key, index)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("eta, clip", [(0.0, False), (0.0, True), (0.7, False)])
@pytest.mark.parametrize("index", [0, 25, 49])
def test_ddim_step_matches_diffusers(eta, clip, index):
  scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=clip)
  scheduler.set_timesteps(50)
  sample, model_out, key, noise = _scheduler_case(50, index)
  t = int(scheduler.timesteps[index])
  want = scheduler.step(_nchw(model_out), t, _nchw(sample), eta=eta,
                        variance_noise=_nchw(noise) if eta else None).prev_sample.numpy().transpose(0, 2, 3, 1)
  sampler = samplers.ddim(schedules.linear(1000), num_steps=50, eta=eta, clip=1.0 if clip else None)
  got = _ours(sampler, sample, model_out, key, index)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_scheduler_config_reads_into_our_schedule():
  for kwargs in (dict(beta_schedule="linear"), dict(beta_schedule="squaredcos_cap_v2"),
                 dict(beta_schedule="scaled_linear", prediction_type="v_prediction")):
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, **kwargs)
    schedule, prediction = schedules.from_diffusers_config(dict(scheduler.config))
    np.testing.assert_allclose(schedule.alpha_bars, scheduler.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-7)
    assert prediction == {"epsilon": "epsilon", "v_prediction": "v"}[scheduler.config.prediction_type]
