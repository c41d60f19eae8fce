"""Label inference accuracy from one observed FedSGD gradient, per method and batch size.

For each model and batch size B, 20 random batches of the embedded MNIST's test split
(32x32x3) are observed through fljax's client update, and every method of
`inversion.labels` that applies infers the B labels; the score is the multiset label
accuracy (`inversion.metrics.label_accuracy`), averaged.

  python scripts/eval_labels.py
  python scripts/eval_labels.py --batches 5 --sizes 1,4
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fljax import config as config_lib
from fljax import datasets, models
from fljax import federated as fed
from fljax.partitions import Batch
from inversion import labels, metrics
from inversion import observation as ob


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
  """What is measured.

  Attributes:
    batches: random batches observed per model and batch size.
    sizes: the batch sizes B.
  """

  batches: int = 20
  sizes: tuple[int, ...] = (1, 4, 8, 16, 32)

  def __post_init__(self):
    if self.batches < 1 or not self.sizes or min(self.sizes) < 1:
      raise ValueError("--batches and every --sizes entry must be >= 1")


def main(argv=None):
  args, _ = config_lib.parse(EvalConfig, argv, description=__doc__.split("\n")[0])
  ds = datasets.load("mnist", image_size=32, channels=3)
  rng = np.random.default_rng(0)
  print(f"{'model':>16} {'B':>3} " + " ".join(f"{m:>15}" for m in labels.METHODS))
  for name, init in (("lenet", "uniform"), ("lenet", "default"), ("cnn", "default")):
    model = models.make(name, num_classes=10, input_shape=ds.image_shape, init=init)
    params = model.init(jax.random.key(0))
    client_update = jax.jit(fed.make_client_update(fed.make_loss_fn(model.apply),
                                                   fed.FedConfig(algorithm="fedsgd")))
    for b in args.sizes:
      threat = ob.ThreatModel(batch_size=b, input_shape=ds.image_shape)
      scores = {m: [] for m in labels.METHODS}
      for i in range(args.batches):
        idx = rng.choice(len(ds.y_test), b, replace=False)
        data = Batch(x=jnp.asarray(ds.x_test[idx]), y=jnp.asarray(ds.y_test[idx]),
                     mask=jnp.ones(b))
        obs = ob.Observation(update=client_update(params, data, jax.random.key(i))[0],
                             params=params)
        for m in scores:
          if (m == "idlg" and b > 1) or (m == "yin" and b > 10):
            continue
          y = labels.from_observation(m, model.apply, obs, threat, key=jax.random.key(i))
          scores[m].append(metrics.label_accuracy(np.asarray(y), ds.y_test[idx]))
      cells = [f"{np.mean(s):15.3f}" if s else f"{'-':>15}" for s in scores.values()]
      print(f"{name + '/' + init:>16} {b:>3} " + " ".join(cells))


if __name__ == "__main__":
  main()
