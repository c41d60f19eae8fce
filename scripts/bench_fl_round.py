"""Benchmark: one FedAvg round, batched in one jit vs a Python loop over clients.

One FedAvg round on the embedded MNIST (small CNN, 1 local epoch, local batch 10, every
client participating) for C clients, done as
  (a) fljax's jitted round: all clients batched (vmap and lax.map) in one computation;
  (b) FedJAX's `for_each_client` style: a Python loop calling a jitted single-client
      update, accumulating the weighted sum with a jitted add, then the server step.
Both run in this process on the same data; it prints client-updates per second and the
ratio batched/loop. The headline `ratio=` is the best batched mode over the loop at the
largest C.

  python scripts/bench_fl_round.py            # C in 10, 100, 1000
  python scripts/bench_fl_round.py --quick    # C in 10, 100 on 1,000 examples
  python scripts/bench_fl_round.py --data fashion_mnist --clients 3000 --per_round 100
                                              # the scale study's rounds (issue sizes)
"""

import dataclasses

import jax
import jax.numpy as jnp

from fljax import config as config_lib
from fljax import datasets, models, partitions
from fljax import federated as fed
from fljax.timing import timed


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
  """The benchmark's sizes.

  Attributes:
    quick: 1,000 training examples and C in 10, 100 (a few seconds).
    clients: the numbers of clients C, e.g. 10,100 (none: 10,100,1000, or 10,100 with
      --quick).
    repeats: timed repetitions of each round (none: 5, or 2 with --quick).
    unroll: the local steps' scan unroll (FedConfig.local_unroll).
    data: the dataset (mnist is embedded; fashion_mnist needs Debian's package).
    per_round: clients sampled each round (0: every client); updates/s counts these.
  """

  quick: bool = False
  clients: tuple[int, ...] | None = None
  repeats: int | None = None
  unroll: int = 1
  data: str = "mnist"
  per_round: int = 0

  def __post_init__(self):
    if min(self.clients or (1,)) < 1 or (self.repeats or 1) < 1 or self.per_round < 0:
      raise ValueError("--clients and --repeats must be >= 1, --per_round >= 0")
    if self.per_round > min(self.clients or (10,)):
      raise ValueError(f"--per_round {self.per_round} exceeds the smallest population "
                       f"{min(self.clients or (10,))} (--clients)")


def main(argv=None):
  args, _ = config_lib.parse(BenchConfig, argv, description=__doc__.split("\n")[0])
  sizes = args.clients or ((10, 100) if args.quick else (10, 100, 1000))
  repeats = args.repeats or (2 if args.quick else 5)
  ds = datasets.load(args.data, train_subset=1000 if args.quick else None)
  model = models.make("cnn", num_classes=10, input_shape=ds.image_shape)
  params = model.init(jax.random.key(0))
  print(f"backend={jax.default_backend()} devices={jax.device_count()} {ds.describe()}")
  print(f"{'C':>6} {'m':>6} {'ex/client':>9} {'vmap u/s':>10} {'map u/s':>10} "
        f"{'loop u/s':>10} {'ratio':>7}")
  result = {}
  for c in sizes:
    parts = partitions.iid(ds.y_train, c, key=jax.random.key(1))
    clients = jax.tree.map(jnp.asarray, partitions.make_clients(ds.x_train, ds.y_train, parts))
    m = args.per_round or c
    ups = {}
    for mode in ("vmap", "map"):
      cfg = fed.FedConfig(local_epochs=1, local_batch_size=10, local_lr=0.1,
                          clients_per_round=m / c, client_batching=mode,
                          local_unroll=args.unroll)
      client_update = fed.make_client_update(fed.make_loss_fn(model.apply), cfg)
      step = jax.jit(fed.make_round_step(client_update, cfg, c))
      state = fed.init_server_state(params, cfg, key=jax.random.key(2))
      ups[mode] = m / timed(lambda: jax.block_until_ready(step(state, clients)), repeats)

    # (b) the loop baseline: one jitted client update per client, FedJAX style.
    one = jax.jit(client_update)
    add = jax.jit(lambda acc, u, w: jax.tree.map(lambda a, b: a + w * b, acc, u))
    server = jax.jit(lambda p, acc, total: jax.tree.map(lambda w, d: w + d / total, p, acc))
    per_client = [jax.tree.map(lambda a: a[i], clients) for i in range(m)]
    weights = [float(w) for w in clients.mask.sum(1)[:m]]
    keys = jax.random.split(jax.random.key(3), m)

    def loop_round():
      acc = jax.tree.map(jnp.zeros_like, params)
      for data, w, k in zip(per_client, weights, keys):
        update, _ = one(params, data, k)
        acc = add(acc, update, w)
      return jax.block_until_ready(server(params, acc, sum(weights)))

    ups["loop"] = m / timed(loop_round, repeats)
    best = max(ups["vmap"], ups["map"])
    ratio = best / ups["loop"]
    n = int(clients.mask.sum(1).max())
    print(f"{c:>6} {m:>6} {n:>9} {ups['vmap']:>10.1f} {ups['map']:>10.1f} "
          f"{ups['loop']:>10.1f} {ratio:>7.2f}", flush=True)
    result = {"ratio": ratio, "clients": c, "per_round": m, "vmap_ups": ups["vmap"],
              "map_ups": ups["map"], "loop_ups": ups["loop"]}
  print("RESULT bench_fl_round " + " ".join(
      f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())
      + f" backend={jax.default_backend()}")


if __name__ == "__main__":
  main()
