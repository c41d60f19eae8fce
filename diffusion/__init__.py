"""Diffusion models: schedules, denoisers, samplers with guidance hooks, training.

  schedules   linear / scaled-linear / cosine betas, q_sample, epsilon / x0 / v
              conversions, the VP-SDE and its marginal, forward noise to a diffusion time
              (read as a Gaussian mechanism), diffusers scheduler configs
  unet        the denoiser: a Flax UNet laid out as diffusers' UNet2DModel
  samplers    DDPM, DDIM (eta), DDIM inversion, VP-SDE Euler-Maruyama / predictor-corrector,
              as init/step pairs with a guidance hook (DPS) and one-scan `run`
  training    the DDPM loss (with label dropout for classifier-free guidance) and the
              training driver (EMA, orbax checkpoints and resume, grids, metrics.jsonl)
  prior       a trained prior on disk (the shipped MNIST prior), its guided denoiser
  hub         diffusers UNet2DModel checkpoints (safetensors, no torch) in and out
  evaluation  sample quality scored by a classifier trained here (class accuracy,
              Frechet distance in its feature space)

This package imports only from `fljax`.
"""
