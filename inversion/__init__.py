"""Gradient inversion: threat model, objectives, label inference, attacks, metrics.

  observation  `ThreatModel`, `Observation`, `observe` (via fljax's client_update, then a
               defense), `observe_aggregate` (secure aggregation: the sum only), the
               forward operator (FedSGD gradient, FedAvg's unrolled local steps)
  objectives   L2, cosine and per-layer cosine gradient matching; total variation
  labels       iDLG for one example; bias-corrected counts (Geng et al.) and Yin et al.'s
               distinct labels for batches
  attacks/     DLG / iDLG, Inverting Gradients, as init/step pairs
  metrics      MSE, PSNR, SSIM, feature distance, Hungarian matching, label accuracy
  stats        bootstrap medians, paired differences and verdicts for "A beats B"
  baselines    blank, mean-image, nearest-training, prior-only and GAN-sample baselines
  specs        an experiment's config dataclasses and the DEFENSES / ATTACKS registries
  engine       victims, observations, the batched attack engine, attack-state save/restore
  report       scoring an `AttackResult`: metrics.json, reconstructions.npz, grid.png
  experiment   the driver behind scripts/invert.py: victims -> observations -> batched
               attacks with restarts and divergence retries -> report
  compare      several attacks on the same victims: one grid, one table

May import `fljax`, `privacy` and `diffusion`.
"""
