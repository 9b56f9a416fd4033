#!/usr/bin/env bash
# The CPU-scale study of docs/reproduction.md on a JPEG-75 copy of CIFAR-10 kept outside the repository:
# set DATA to its folder (the default below is where the project's offline copy lives).
# Usage: benchmarks/cpu_study.sh PART [EPOCHS]   with PART = main | seeds | overfit | autoattack | autoattack-standard | report
# Each run writes runs/study/<part>/<name>/ and is skipped if it already finished (summary.json),
# or resumed if it was interrupted, so the parts can be run in pieces.
set -euo pipefail
PART=${1:?usage: cpu_study.sh main|seeds|overfit|autoattack|autoattack-standard|report [EPOCHS]}
EPOCHS=${2:-5}
DATA=${DATA:-../shared/data}
OUT=${OUT:-runs/study}
EVAL_N=${EVAL_N:-1000}
EVAL_WHICH=${EVAL_WHICH:-best last}   # which checkpoints `backsmooth eval` attacks
COMMON=(--preset cpu-cifar10-natural --data-dir "$DATA" --epochs "$EPOCHS" --no-progress --checkpoint-every 100)

run() {  # run NAME ARGS...: train (or resume) one run, then evaluate the checkpoints named in EVAL_WHICH
  local dir="$OUT/$PART/$1"; shift
  if [ ! -f "$dir/summary.json" ]; then
    local resume=(); [ -f "$dir/config.json" ] && resume=(--resume)
    backsmooth train "${COMMON[@]}" "$@" --out "$dir" "${resume[@]}"
  fi
  for which in $EVAL_WHICH; do
    [ -f "$dir/eval-$which.json" ] || backsmooth eval "$dir/$which.pt" --name "$which" --out "$dir" \
      --n-examples "$EVAL_N" --attacks "${ATTACKS:-pgd20,cw20}" --no-progress
  done
}

reuse_main() {  # reuse_main NAME METHOD: the main part's run of METHOD (seed 0, default settings) stands for NAME
  local main="$OUT/main/$2" dir="$OUT/$PART/$1"
  [ -f "$main/summary.json" ] && [ ! -e "$dir" ] && python -c "import json,sys; sys.exit(json.load(open('$main/config.json'))['epochs'] != $EPOCHS)" \
    && mkdir -p "$OUT/$PART" && ln -s "../main/$2" "$dir" || true
}

case "$PART" in
  main)
    for method in backward_smoothing trades fast_trades fgsm_rs natural pgd_at gradalign; do
      run "$method" --method "$method"
    done ;;
  seeds)  # seed 0 is the main part's run when the epochs match; it is also gamma = 1 and beta = 10 (the defaults)
    for method in backward_smoothing fast_trades fgsm_rs; do reuse_main "$method-seed0" "$method"; done
    for seed in 0 1 2; do
      for method in backward_smoothing fast_trades fgsm_rs; do
        run "$method-seed$seed" --method "$method" --seed "$seed"
      done
    done
    for gamma in 0.25 4; do run "bs-gamma$gamma" --method backward_smoothing --gamma "$gamma"; done
    run bs-beta6 --method backward_smoothing --beta 6 ;;
  overfit)  # a larger radius, then a larger step (alpha = 2 eps, as in Wong et al.'s failing FGSM setting)
    for method in fgsm_rs backward_smoothing; do run "$method-eps16" --method "$method" --eps 16/255; done
    for method in fgsm_rs backward_smoothing; do run "$method-alpha16" --method "$method" --alpha 16/255; done ;;
  autoattack)  # last models of part 1 and of the seed runs: PGD-20, CW-20, APGD-CE + APGD-T in one file (worst case)
    for dir in "$OUT"/main/*/ "$OUT"/seeds/*-seed*/; do
      [ -f "$dir/eval-last-aa.json" ] || backsmooth eval "$dir/last.pt" --name last-aa --out "$dir" \
        --n-examples "$EVAL_N" --attacks pgd20,cw20,autoattack-apgd --no-progress
    done ;;
  autoattack-standard)  # the full standard AutoAttack (adds FAB-T and Square) on the last BS and TRADES-10 models
    for method in backward_smoothing trades; do
      [ -f "$OUT/aa-standard/eval-$method-last-standard.json" ] || backsmooth eval "$OUT/main/$method/last.pt" \
        --name "$method-last-standard" --out "$OUT/aa-standard" --n-examples "$EVAL_N" \
        --attacks pgd20,cw20,autoattack --no-progress
    done ;;
  report)
    backsmooth report "$OUT"/main/* --out docs/results/study-main
    # the main TRADES-10 run gives the seeds report its "vs TRADES-10" column
    [ -d "$OUT/seeds" ] && backsmooth report "$OUT"/seeds/* "$OUT"/main/trades --out docs/results/study-seeds
    [ -d "$OUT/overfit" ] && backsmooth report "$OUT"/overfit/* --out docs/results/study-overfit
    [ -d "$OUT/aa-standard" ] && mkdir -p docs/results/study-aa-standard \
      && cp "$OUT"/aa-standard/eval-*.json docs/results/study-aa-standard/ ;;
  *) echo "unknown part $PART (main, seeds, overfit, autoattack, autoattack-standard, report)" >&2; exit 2 ;;
esac
