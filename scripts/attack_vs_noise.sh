#!/usr/bin/env bash
# Attack PSNR against forward-diffusion noise (issue 8): the naive attacker A0 and the
# adaptive attackers A1-A5 on the same 8 MNIST test images (32x32x3, B = 1, FedSGD,
# untrained DLG LeNet: the defender's worst case), each upload clipped to C = 1 (clipping
# binds: the updates' norms are ~30) and forward-noised to z; 100 double-backward
# evaluations per victim for every attack, seed 1. Each z is one compare_attacks run;
# rerunning resumes (finished attacks are skipped).
#   A0  ig, dps                                   the upload as received
#   A1  dps[adaptive=true,denoise=rescale]        rescaled, trial gradients clipped to C,
#       (= A5: the diffusion-guided attack with the noise-aware likelihood)
#   A2  dps[adaptive=true,denoise=svd+wiener]     SVD + Wiener shrinkage (surrogate stats)
#   A3  dps[adaptive=true,denoise=average,rounds=10]  10 rounds of the same update averaged
#   A4  dps[adaptive=true,denoise=pca]            learned (PCA, linear MMSE) denoiser
#   bash scripts/attack_vs_noise.sh [OUT] [Z ...]
set -euo pipefail
OUT=${1:-runs/attack_vs_noise}
shift || true
ZS=("$@")
[[ ${#ZS[@]} -eq 0 ]] && ZS=(0 0.003 0.01 0.03 0.1 0.3 1)
A0="ig,dps"
ADAPTIVE="dps[adaptive=true,denoise=rescale],dps[adaptive=true,denoise=svd+wiener],dps[adaptive=true,denoise=average,rounds=10],dps[adaptive=true,denoise=pca]"
for z in "${ZS[@]}"; do
  attacks="$A0,$ADAPTIVE"
  [[ "$z" == "0" ]] && attacks="$A0"
  [[ "$z" == "1" ]] && attacks="$A0,dps[adaptive=true,denoise=average,rounds=10]"
  python scripts/compare_attacks.py --workdir "$OUT/z$z" --seed 1 --attack.budget 100 \
      --victims.num 8 --defense.name forward_noise --defense.clip_norm 1 \
      --defense.noise_multiplier "$z" --classifier_dir "$OUT/classifier" --no-progress \
      --attacks "$attacks"
done
