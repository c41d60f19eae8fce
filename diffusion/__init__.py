"""Diffusion models: schedules, denoisers, samplers with guidance hooks, training.

Filled by later issues; imports only from `fljax`.
"""
