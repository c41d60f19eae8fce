"""Several gradient-inversion attacks on the same victims: one PNG grid, one table.

  python scripts/compare_attacks.py --workdir runs/compare                 # the default set
  python scripts/compare_attacks.py --attacks "ig,dps,dps[gradient_weight=0,features=0]" \
      --threat.batch_size 4 --defense.name gaussian --defense.std 0.01 --attack.budget 400

Every flag of scripts/invert.py applies to all attacks; see inversion.compare.
"""

from inversion.compare import main

if __name__ == "__main__":
  main()
