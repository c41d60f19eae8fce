"""Gradient inversion on the updates fljax's clients send: a thin driver.

  python scripts/invert.py --workdir runs/invert                      # iDLG, 16 MNIST victims
  python scripts/invert.py --attack.name ig --model.name cnn --threat.batch_size 4
  python scripts/invert.py --data.images my_photos/ --data.channels 3  # class subfolders: labels
  python scripts/invert.py --defense.name prune --defense.fraction 0.9

`--help` lists every flag; see `inversion.experiment`.
"""

from inversion.experiment import main

if __name__ == "__main__":
  main()
