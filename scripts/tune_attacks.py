"""Tune every attack by the same protocol: the same trials and budget, on victims of the
test split's tuning quarter, never the evaluation victims (`studies.tuning`).

  python scripts/tune_attacks.py --workdir runs/tuning                   # mnist, cnn, 6 attacks
  python scripts/tune_attacks.py --workdir runs/tuning --write_defaults  # and studies/tuned.json
  python scripts/tune_attacks.py --tiny --workdir /tmp/tuning            # seconds: digits, mlp

Writes tuning.md (one table per attack, the chosen trial in bold) and tuning.json into
--workdir, each finished trial in --workdir/trials/ (rerunning resumes), and ends with
`RESULT tune_attacks best_<attack>=<median PSNR> ...` (then an error line, status 1, if
a trial failed: rerunning retries it).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fljax import config, datasets, runs  # noqa: E402
from studies import tuning  # noqa: E402


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
  """Where the tuning writes.

  Attributes:
    workdir: output folder: tuning.md, tuning.json, trials/.
    tiny: digits, mlp, ig and idlg, 2 victims, 2 trials, 4 evaluations: a smoke test.
    write_defaults: record the chosen values as the defaults of this dataset and model.
    defaults_file: where they are recorded (none: studies/tuned.json, which the study reads).
    progress: print a line per trial.
  """

  workdir: str = "runs/tuning"
  tiny: bool = False
  write_defaults: bool = False
  defaults_file: str | None = None
  progress: bool = True


def main(argv: list[str] | None = None) -> None:
  opts, ns = config.parse(Options, argv, description=__doc__.split("\n\n")[0],
                          extra=lambda p: config.add_arguments(p, tuning.TuningConfig))
  flags = {k: v for k, v in vars(ns).items() if not hasattr(opts, k)}
  if opts.tiny and opts.write_defaults and opts.defaults_file is None:
    raise SystemExit("error: --tiny --write_defaults would record smoke-test values in "
                     "studies/tuned.json; pass --defaults_file elsewhere")
  with runs.cli_errors(datasets.DatasetError):
    cfg = config.build(tuning.TuningConfig, {**(tuning.TINY if opts.tiny else {}), **flags})
    result = tuning.run(cfg, opts.workdir, write_defaults=opts.write_defaults,
                        defaults_file=opts.defaults_file or tuning.TUNED,
                        log=print if opts.progress else lambda line: None)
  print(tuning.tables(result))
  best = []
  for attack, a in result["attacks"].items():
    score = "nan" if a["chosen"] is None else a["trials"][a["chosen"]]["median_psnr"]["estimate"]
    best.append(f"best_{attack}={score if isinstance(score, str) else f'{score:.4g}'}")
  print("RESULT tune_attacks " + " ".join(best))
  failed = [f"{attack} trial {t['trial']}" for attack, a in result["attacks"].items()
            for t in a["trials"] if t["status"] == "failed"]
  if failed:
    raise SystemExit(f"error: {len(failed)} trial(s) failed ({', '.join(failed)}); their "
                     f"reasons are in {opts.workdir}/tuning.md, and rerunning the same command "
                     f"retries them")


if __name__ == "__main__":
  main()
