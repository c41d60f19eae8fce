"""Federated training on the embedded MNIST (or any fljax dataset), resumable.

  python scripts/train_fl.py --workdir runs/fl --rounds 50 --data.partition dirichlet --data.alpha 0.1
  python scripts/train_fl.py --help
"""

from fljax.train import main

if __name__ == "__main__":
  main()
