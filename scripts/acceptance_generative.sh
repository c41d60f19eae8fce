#!/usr/bin/env bash
# The generative-attack acceptance table (issue 7): every attack on the same 16 MNIST test
# images (32x32x3; B = 1: 16 victims, B = 4: 4 victims), untrained DLG LeNet, FedSGD, a
# double-backward budget of 100 evaluations per victim for every attack (plus Inverting
# Gradients at 2000 steps, an unequal-budget reference), seed 1 (the dps step size was
# tuned on seed 0's victims). Controls: dps[gradient_weight=0,features=0] samples the prior at
# the inferred labels only; dps[control=random_observation] attacks a random update.
# Each cell is one compare_attacks run in <workdir>/<cell>; rerunning resumes (finished
# attacks are skipped). Runs from any folder; a relative --workdir is taken from the current
# one; $PYTHON (default python3) runs the cells.
#   bash scripts/acceptance_generative.sh [--workdir DIR] [--gifd false]
#     --workdir DIR   output folder (default: runs/acceptance)
#     --gifd false    leave out the GAN-prior attack (GIFD)
set -euo pipefail
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
fail() { echo "error: $1 (bash $0 --help)" >&2; exit 2; }
WORKDIR=runs/acceptance
GIFD=true
while (($#)); do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --workdir) [[ $# -ge 2 && $2 != -* ]] || fail "--workdir needs a folder"
               WORKDIR=$2; shift 2 ;;
    --gifd) if [[ ${2:-} =~ ^(true|false|yes|no|1|0)$ ]]; then GIFD=$2; shift 2; else GIFD=true; shift; fi ;;
    *) fail "unknown argument $1" ;;
  esac
done
[[ $WORKDIR == /* ]] || WORKDIR="$PWD/$WORKDIR"
cd "$(dirname "$0")/.."
[[ $GIFD =~ ^(true|yes|1)$ ]] && GIFD=",gifd" || GIFD=""
BASE="dlg,idlg,ig,ig[budget=none,steps=2000],ggdm,dps[features=0],dps,dps[gradient_weight=0,features=0]"
common=(--seed 1 --attack.budget 100 --classifier_dir "$WORKDIR/classifier" --progress false)
cell() {  # name, extra attacks, flags...
  local name=$1 extra=$2; shift 2
  "${PYTHON:-python3}" scripts/compare_attacks.py --workdir "$WORKDIR/$name" "${common[@]}" \
      --attacks "$BASE${extra:+,$extra}$GIFD" "$@"
}
cell lenet_b1_none "dps[control=random_observation]" --victims.num 16
cell lenet_b1_noise1e-2 "dps[adaptive=true]" --victims.num 16 --defense.name gaussian --defense.std 0.01
cell lenet_b4_none "" --victims.num 4 --threat.batch_size 4
cell lenet_b4_oracle "" --victims.num 4 --threat.batch_size 4 --threat.labels_known true
cell lenet_b1_noise1e-1 "dps[adaptive=true]" --victims.num 16 --defense.name gaussian --defense.std 0.1
cell lenet_b1_prune90 "dps[adaptive=true]" --victims.num 16 --defense.name prune --defense.fraction 0.9
cell lenet_b1_noise1e-3 "" --victims.num 16 --defense.name gaussian --defense.std 0.001
cell lenet_b8_none "" --victims.num 2 --threat.batch_size 8
cell cnn_b1_none "" --victims.num 16 --model.name cnn --model.init default
cell cnn_b4_none "" --victims.num 4 --threat.batch_size 4 --model.name cnn --model.init default
