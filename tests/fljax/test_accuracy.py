"""FedAvg learns: the embedded MNIST over 100 clients reaches 90% test accuracy.

The i.i.d. check runs with the suite (about 20 s); the non-i.i.d. curves are `slow`.
"""

import pytest

from fljax import train


def _run(tmp_path, partition, alpha=0.5):
  config = train.ExperimentConfig(data=train.DataConfig(partition=partition, alpha=alpha),
                                  rounds=50, eval_every=10, checkpoint_every=50)
  return train.train_and_evaluate(config, tmp_path, progress=False)


@pytest.mark.slow  # 50 rounds on MNIST (about 40 s)
def test_fedavg_iid_reaches_90_percent_in_50_rounds(tmp_path):
  record = _run(tmp_path, "iid")
  assert record["round"] == 50 and record["test_accuracy"] >= 0.90


@pytest.mark.slow
@pytest.mark.parametrize("alpha, floor", [(0.5, 0.90), (0.1, 0.85)])
def test_fedavg_dirichlet(tmp_path, alpha, floor):
  record = _run(tmp_path, "dirichlet", alpha)
  assert record["test_accuracy"] >= floor
