"""Trains the DCGAN image prior of the GAN-prior attacks (GIFD) on an fljax dataset's
training split: checkpoints, resume, sample grids, a prior folder.

  python scripts/train_gan.py --workdir runs/dcgan_mnist

Rerunning the same command resumes from the last checkpoint (a larger --steps extends the
run). The generator is written to <workdir>/prior/; see inversion.gan.
"""

from inversion import gan

if __name__ == "__main__":
  gan.main()
