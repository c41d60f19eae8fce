#!/usr/bin/env bash
# Attack PSNR against forward-diffusion noise (issue 8): the naive attacker A0 and the
# adaptive attackers A1-A5 on the same 8 MNIST test images (32x32x3, B = 1, FedSGD,
# untrained DLG LeNet: the defender's worst case), each upload clipped to C = 1 (clipping
# binds: the updates' norms are ~30) and forward-noised to z; 100 double-backward
# evaluations per victim for every attack, seed 1. Each z is one compare_attacks run in
# <workdir>/z<z>; rerunning resumes (finished attacks are skipped).
#   A0  ig, dps                                   the upload as received
#   A1  dps[adaptive=true,denoise=rescale]        rescaled, trial gradients clipped to C,
#       (= A5: the diffusion-guided attack with the noise-aware likelihood)
#   A2  dps[adaptive=true,denoise=svd+wiener]     SVD + Wiener shrinkage (surrogate stats)
#   A3  dps[adaptive=true,denoise=average,rounds=10]  10 rounds of the same update averaged
#   A4  dps[adaptive=true,denoise=pca]            learned (PCA, linear MMSE) denoiser
# Runs from any folder; a relative --workdir is taken from the current one; $PYTHON
# (default python3) runs the cells.
#   bash scripts/attack_vs_noise.sh [--workdir DIR] [--zs Z,Z,...]
#     --workdir DIR   output folder (default: runs/attack_vs_noise)
#     --zs Z,Z,...    the noise levels z (default: 0,0.003,0.01,0.03,0.1,0.3,1)
set -euo pipefail
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
fail() { echo "error: $1 (bash $0 --help)" >&2; exit 2; }
WORKDIR=runs/attack_vs_noise
ZS=0,0.003,0.01,0.03,0.1,0.3,1
while (($#)); do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --workdir) [[ $# -ge 2 && $2 != -* ]] || fail "--workdir needs a folder"
               WORKDIR=$2; shift 2 ;;
    --zs) [[ $# -ge 2 && $2 =~ ^[0-9.e,+-]+$ ]] || fail "--zs needs comma-separated numbers"
          ZS=$2; shift 2 ;;
    *) fail "unknown argument $1" ;;
  esac
done
[[ $WORKDIR == /* ]] || WORKDIR="$PWD/$WORKDIR"
cd "$(dirname "$0")/.."
A0="ig,dps"
ADAPTIVE="dps[adaptive=true,denoise=rescale],dps[adaptive=true,denoise=svd+wiener],dps[adaptive=true,denoise=average,rounds=10],dps[adaptive=true,denoise=pca]"
IFS=, read -ra zs <<< "$ZS"
for z in "${zs[@]}"; do
  attacks="$A0,$ADAPTIVE"
  [[ "$z" == "0" ]] && attacks="$A0"
  [[ "$z" == "1" ]] && attacks="$A0,dps[adaptive=true,denoise=average,rounds=10]"
  "${PYTHON:-python3}" scripts/compare_attacks.py --workdir "$WORKDIR/z$z" --seed 1 \
      --attack.budget 100 --victims.num 8 --defense.name forward_noise --defense.clip_norm 1 \
      --defense.noise_multiplier "$z" --classifier_dir "$WORKDIR/classifier" --progress false \
      --attacks "$attacks"
done
