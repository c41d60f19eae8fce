"""Centralized DP-SGD on the embedded MNIST (or any fljax dataset), resumable.

  python scripts/train_dpsgd.py --workdir runs/dpsgd_eps4 --target_epsilon 4 --epochs 20
  python scripts/train_dpsgd.py --workdir runs/sgd --private false
  python scripts/train_dpsgd.py --help
"""

from privacy.centralized import main

if __name__ == "__main__":
  main()
