"""Benchmark: fljax's iDLG against the original torch DLG, wall seconds per converged victim.

DLG's setting (`studies.convergence`): its LeNet, untrained, weights uniform(-0.5, 0.5);
one FedSGD gradient of one 32x32x3 photo (the `photos` test crops); a victim converges when
its reconstruction reaches 30 dB, and stops there. fljax runs iDLG with L-BFGS and the
periodic restart (every 1,500 evaluations, budget 3,000), each seed's victims in one
compiled computation (`studies.convergence.run_optimizer`; its seconds include
compilation). torch runs the authors' DLG (`fljax.peers.original_dlg`: L-BFGS, 300 steps)
on the same images with the same weights (copied), one victim after the other, after fljax
is done (never both at once).

  pip install -e '.[peers]'          # torch==2.13.0 (CPU) and opacus==1.6.0
  python scripts/bench_attack_vs_torch.py [--quick]

Ends with `RESULT bench_attack_vs_torch ratio=<torch s / fljax s per converged victim>
fljax_s=<fljax s per converged victim> torch_s=<torch's>`.
"""

import dataclasses
import time

import numpy as np

from fljax import config as config_lib
from fljax import peers
from studies import convergence


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
  """The benchmark's sizes.

  Attributes:
    quick: 2 victims, fljax budget 200, torch 10 steps (seconds; a smoke test).
    victims: victims per seed.
    seeds: seeds (each: the model's weights, the victims, the attacks' starts).
  """

  quick: bool = False
  victims: int = 16
  seeds: tuple[int, ...] = (0,)

  def __post_init__(self):
    if self.victims < 1 or not self.seeds:
      raise ValueError("--victims must be >= 1 and --seeds must name at least one seed")


def main(argv=None):
  args, _ = config_lib.parse(BenchConfig, argv, description=__doc__.split("\n")[0])
  peers.require_or_exit()
  victims = 2 if args.quick else args.victims
  cfg = convergence.ConvergenceConfig(
      optimizers=("lbfgs",), victims=victims, seeds=args.seeds,
      budget=200 if args.quick else 3000, restart=True, restart_after=1500)
  ours = convergence.run_optimizer("lbfgs", cfg, log=lambda line: None)
  fl_conv = sum(0 <= f <= cfg.budget for f in ours["first"])
  time.sleep(1.0)

  model = convergence.dlg_model(cfg)
  net = peers.model("lenet", model.input_shape, model.module.num_classes)
  theirs = []
  for seed in cfg.seeds:  # the weights and victims run_optimizer attacked, seed by seed
    params, vs = convergence.seed_setting(cfg, model, seed)
    peers.load_flax_lenet(net, params)
    for i in range(victims):
      theirs.append(peers.original_dlg(net, np.asarray(vs.x[i, 0]), int(vs.y[i, 0]),
                                       steps=10 if args.quick else 300, seed=1000 * seed + i))
  th_conv = sum(r["converged"] for r in theirs)
  th_s = sum(r["seconds"] for r in theirs)
  n = len(theirs)
  fl_per = ours["seconds"] / fl_conv if fl_conv else float("inf")
  th_per = th_s / th_conv if th_conv else float("inf")
  print(f"{n} victims ({victims} per seed, seeds {', '.join(map(str, cfg.seeds))}), 32x32x3 "
        f"photos, DLG's LeNet; {peers.versions()}")
  print(f"{'attack':>28} {'converged':>9} {'median evals':>12} {'seconds':>8} "
        f"{'s / converged':>13}")
  fl_evals = [f for f in ours["first"] if 0 <= f <= cfg.budget]
  th_evals = [r["evaluations"] for r in theirs if r["converged"]]
  for name, conv, evals, secs, per in (
      ("fljax iDLG (L-BFGS+restart)", fl_conv, fl_evals, ours["seconds"], fl_per),
      ("torch DLG (original)", th_conv, th_evals, th_s, th_per)):
    med = f"{np.median(evals):.0f}" if evals else "-"
    print(f"{name:>28} {conv:>4}/{n:<4} {med:>12} {secs:8.1f} {per:13.2f}")
  print(f"RESULT bench_attack_vs_torch ratio={th_per / fl_per:.2f} fljax_s={fl_per:.2f} "
        f"torch_s={th_per:.2f}")


if __name__ == "__main__":
  main()
