"""Gradient inversion: threat model, objectives, priors, attacks, metrics.

Filled by later issues; may import `fljax`, `privacy` and `diffusion`.
"""
