"""Trains a DDPM denoiser on an fljax dataset: checkpoints, resume, sample grids, a prior.

  python scripts/train_diffusion.py --workdir runs/ddpm_mnist
  python scripts/train_diffusion.py --workdir runs/ddpm_digits --data.name digits \
      --data.image_size 8 --block_out_channels 16,32 --down_block_types DownBlock2D,AttnDownBlock2D \
      --up_block_types AttnUpBlock2D,UpBlock2D --norm_num_groups 4 --attention_head_dim 8

Rerunning the same command resumes from the last checkpoint (a larger --steps extends the
run). The trained prior (EMA weights) is written to <workdir>/prior/; see diffusion.training.
"""

from diffusion import training

if __name__ == "__main__":
  training.main()
