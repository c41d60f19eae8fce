"""Benchmark: one secure-aggregation round (SecAgg and SecAgg+) against a plaintext sum.

For n clients with d-dimensional inputs mod 2^32 (5% of them dropping before the masked
input, so that the server also unmasks dropped clients' pairwise masks), it runs the
whole protocol in this process and prints the seconds spent in all clients' code
together and in the server's, for full SecAgg (t = 0.6 n) and SecAgg+ (k = 2 ceil(log2 n)
neighbours, t = 0.6 (k + 1)), and the plaintext sum of the same vectors. `seconds=` on
the RESULT line is the full SecAgg round (client and server work) at the largest n and d.

  python scripts/bench_secagg.py            # n in 10, 50, 100; d in 1e4, 1e5
  python scripts/bench_secagg.py --quick    # n in 10, 20; d in 1e3, 1e4
"""

import dataclasses
import math
import secrets
import time

import numpy as np

from fljax import config as config_lib
from privacy import secagg as sa


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
  """The benchmark's sizes.

  Attributes:
    quick: n in 10, 20 and d in 1e3, 1e4 (a few seconds) instead of n in 10, 50, 100 and d
      in 1e4, 1e5.
  """

  quick: bool = False


def one_round(n, d, k):
  group = k + 1 if k else n
  cfg = sa.SecAggConfig(num_clients=n, threshold=max(math.ceil(0.6 * group), group // 2 + 1),
                        dimension=d, bits=32, neighbours=k, graph_seed=secrets.token_bytes(32))
  inputs = {u: np.frombuffer(secrets.token_bytes(4 * d), np.uint32) for u in range(1, n + 1)}
  dropped = set(range(1, n + 1, 20))  # 5%
  timings = {}
  total, _ = sa.run(inputs, cfg, drop_before={"masked_input": dropped}, timings=timings)
  t0 = time.perf_counter()
  plain = np.zeros(d, np.uint32)
  for u, x in inputs.items():
    if u not in dropped:
      plain += x
  t_plain = time.perf_counter() - t0
  assert np.array_equal(total, plain), "secure sum differs from the plaintext sum"
  return timings["client"], timings["server"], t_plain


def main(argv=None):
  args, _ = config_lib.parse(BenchConfig, argv, description=__doc__.split("\n")[0])
  ns = [10, 20] if args.quick else [10, 50, 100]
  ds = [1_000, 10_000] if args.quick else [10_000, 100_000]
  print(f"{'n':>4} {'d':>7} {'SecAgg client s':>15} {'server s':>9} {'SecAgg+ k':>9} "
        f"{'client s':>9} {'server s':>9} {'plain s':>8}")
  last = None
  for d in ds:
    for n in ns:
      c, s, t_plain = one_round(n, d, 0)
      k = min(2 * math.ceil(math.log2(n)), n - 1 - (n - 1) % 2)
      c_plus, s_plus, _ = one_round(n, d, k)
      print(f"{n:>4} {d:>7} {c:15.2f} {s:9.2f} {k:>9} {c_plus:9.2f} {s_plus:9.2f} {t_plain:8.4f}")
      last = (n, d, c + s, c_plus + s_plus, t_plain)
  n, d, full, plus, t_plain = last
  print(f"RESULT bench_secagg seconds={full:.2f} secagg_plus_seconds={plus:.2f} n={n} d={d} "
        f"plain_seconds={t_plain:.4f}")


if __name__ == "__main__":
  main()
