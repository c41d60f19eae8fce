"""Federated training on the embedded MNIST (or any fljax dataset), with an optional
privacy mechanism and the privacy spent logged every round; resumable.

  python scripts/train_fl.py --workdir runs/fl --rounds 50 --data.partition dirichlet --data.alpha 0.1
  python scripts/train_fl.py --workdir runs/dpfedavg --privacy.mechanism dp_fedavg \
      --privacy.target_epsilon 4 --fed.sampling poisson --fed.clients_per_round 0.2
  python scripts/train_fl.py --help
"""

from privacy.train import main

if __name__ == "__main__":
  main()
