#!/usr/bin/env bash
# The CPU-scale study of docs/reproduction.md on the CIFAR-10 copy in ../shared/data (JPEG-75).
# Usage: benchmarks/cpu_study.sh PART [EPOCHS]   with PART = main | seeds | overfit | report
# Each run writes runs/study/<part>/<name>/ and is skipped if it already finished (summary.json),
# or resumed if it was interrupted, so the parts can be run in pieces.
set -euo pipefail
PART=${1:?usage: cpu_study.sh main|seeds|overfit|report [EPOCHS]}
EPOCHS=${2:-5}
DATA=${DATA:-../shared/data}
OUT=${OUT:-runs/study}
EVAL_N=${EVAL_N:-1000}
COMMON=(--preset cpu-cifar10-natural --data-dir "$DATA" --epochs "$EPOCHS" --no-progress --checkpoint-every 100)

run() {  # run NAME ARGS...: train (or resume) one run, then evaluate its best and last models
  local dir="$OUT/$PART/$1"; shift
  if [ ! -f "$dir/summary.json" ]; then
    local resume=(); [ -f "$dir/config.json" ] && resume=(--resume)
    backsmooth train "${COMMON[@]}" "$@" --out "$dir" "${resume[@]}"
  fi
  for which in best last; do
    [ -f "$dir/eval-$which.json" ] || backsmooth eval "$dir/$which.pt" --name "$which" --out "$dir" \
      --n-examples "$EVAL_N" --attacks "${ATTACKS:-pgd20,cw20}" --no-progress
  done
}

case "$PART" in
  main)
    for method in backward_smoothing trades fast_trades fgsm_rs natural pgd_at gradalign; do
      run "$method" --method "$method"
    done ;;
  seeds)
    for seed in 0 1 2; do
      for method in backward_smoothing fast_trades fgsm_rs; do
        run "$method-seed$seed" --method "$method" --seed "$seed"
      done
    done
    for gamma in 0.25 1 4; do run "bs-gamma$gamma" --method backward_smoothing --gamma "$gamma"; done
    for beta in 6 10; do run "bs-beta$beta" --method backward_smoothing --beta "$beta"; done ;;
  overfit)
    for method in fgsm_rs backward_smoothing; do run "$method-eps16" --method "$method" --eps 16/255; done ;;
  report)
    backsmooth report "$OUT"/main/* --out docs/results/study-main
    [ -d "$OUT/seeds" ] && backsmooth report "$OUT"/seeds/* --out docs/results/study-seeds
    [ -d "$OUT/overfit" ] && backsmooth report "$OUT"/overfit/* --out docs/results/study-overfit ;;
  *) echo "unknown part $PART (main, seeds, overfit, report)" >&2; exit 2 ;;
esac
