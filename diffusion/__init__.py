"""Diffusion models: schedules, denoisers, samplers with guidance hooks, training.

  schedules  linear / scaled-linear / cosine betas, q_sample, epsilon / x0 / v
             conversions, the VP-SDE and its marginal, forward noise to a diffusion time
             (read as a Gaussian mechanism), diffusers scheduler configs

Denoisers, samplers and training come with the rest of the diffusion issue; this package
imports only from `fljax`.
"""
