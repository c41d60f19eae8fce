"""Gradient inversion: threat model, objectives, attacks, metrics.

  observation  `ThreatModel`, `Observation`, `observe` (via fljax's client_update), the
               forward operator (FedSGD gradient, FedAvg's unrolled local steps)
  objectives   L2, cosine and per-layer cosine gradient matching; total variation
  labels       iDLG label inference from the last layer's gradient
  attacks/     DLG / iDLG, Inverting Gradients, as init/step pairs
  metrics      MSE, PSNR, SSIM, Hungarian matching, label accuracy

May import `fljax`, `privacy` and `diffusion`.
"""
