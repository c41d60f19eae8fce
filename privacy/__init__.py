"""Privacy mechanisms for federated learning, each with its exact accounting.

  clipping     per-example gradients (vmap, micro-batched) and L2 clipping
  noise        Gaussian noise as optax transformations (`gaussian_privatizer`)
  dpsgd        DP-SGD: Poisson / fixed-size batches, the private step, its events
  accounting   dp_accounting events -> epsilon (RDP, PLD), calibration, running accountant
  federated    DP-FedAvg (fixed / adaptive clipping), record-level client DP-SGD, local DP
  defenses     non-DP baselines: top-k pruning, quantization
  train        federated runs with a mechanism and epsilon logged every round
  centralized  centralized DP-SGD runs

Imports from `fljax`, and `diffusion.schedules` (forward noise reads its schedules).
"""
