#!/usr/bin/env bash
# Behaviour check for refactors: three short runs (Backward Smoothing; FGSM-PGI with its per-example
# memory; FGSM-RS with weight averaging and --on-collapse rollback) trained by the code at REV and by the
# working tree, then every tensor of their last.pt compared bitwise.
#   bash benchmarks/same_behaviour.sh REV [OUT]      (run from the repository root, venv active)
set -euo pipefail
rev=${1:?usage: same_behaviour.sh REV [OUT]}
out=${2:-/tmp/same-behaviour}
root=$(pwd)
rm -rf "$out" && mkdir -p "$out"
git worktree add --detach "$out/before-src" "$rev" >/dev/null
trap 'git -C "$root" worktree remove --force "$out/before-src"' EXIT
runs=(
  "bs|--preset demo --epochs 2"
  "pgi|--preset cpu-digits-fgsm_pgi --epochs 2"
  "wa|--dataset mnist --data-dir ../shared/data --arch small_cnn --method fgsm_rs --eps 0.3 --alpha 0.45 --batch-size 128 --lr 0.05 --schedule constant --epochs 2 --val-size 1000 --val-pgd-steps 0 --weight-averaging 0.99 --on-collapse rollback"
)
for side in before after; do
  src=$root/src
  [ "$side" = before ] && src=$out/before-src/src
  for run in "${runs[@]}"; do
    name=${run%%|*}
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=1 PYTHONPATH=$src python -m backsmooth train ${run#*|} --final-eval-examples 0 \
      --no-progress --out "$out/$side-$name" >"$out/$side-$name.log" 2>&1
  done
done
python - "$out" <<'PY'
import sys, torch
out = sys.argv[1]
bad = 0
for name in ("bs", "pgi", "wa"):
    a = torch.load(f"{out}/before-{name}/last.pt", weights_only=True)["model"]
    b = torch.load(f"{out}/after-{name}/last.pt", weights_only=True)["model"]
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    bad += not same
    print(f"{name}: last.pt {'bitwise identical' if same else 'DIFFERS'} ({len(a)} tensors)")
sys.exit(1 if bad else 0)
PY
