#!/usr/bin/env bash
# A first session on one GPU inside a fixed time budget, in the order that matters when GPU time is short:
#   1. the CUDA tests;
#   2. the bench tables of gpu_benchmarks.sh: resnet18 and wrn34_10, eager fp32 and eager bf16 + channels_last
#      (every method), then bf16 + channels_last + compile on resnet18 (natural, Backward Smoothing, TRADES-10);
#   3. Backward Smoothing and TRADES-10 under the controlled protocol (presets cifar10-resnet18-METHOD-wa: one-cycle,
#      label smoothing 0.4, weight averaging 0.9995, best.pt by PGD-10 on 1,000 validation images) as one study,
#      one after the other, for as many epochs as the budget leaves (the same for both, from the bf16 bench),
#      each evaluated with PGD-20 and CW-20 on 1,000 stratified test images;
#   4. with what is left: standard AutoAttack on both best.pt, then the compile bench of wrn34_10.
# Every step has its own time limit, so a failing or slow step costs its share only.
#
#   bash benchmarks/gpu_session.sh RESULTS_DIR BUDGET_SECONDS CIFAR10_DIR [SNAPSHOT.tgz]
#
# CIFAR10_DIR holds cifar-10-batches-py/ or cifar10_{train,test}[_jpeg].npz (docs/data.md). With SNAPSHOT, the
# results (without checkpoints) are packed there after every step, so a session cut short keeps what it measured.
set -uo pipefail
if [ $# -lt 3 ]; then
  echo "usage: bash benchmarks/gpu_session.sh RESULTS_DIR BUDGET_SECONDS CIFAR10_DIR [SNAPSHOT.tgz]" >&2
  exit 2
fi
RES=$1 BUDGET=$2 DATA=$(cd "$3" && pwd) SNAPSHOT=${4:-}
mkdir -p "$RES"
T0=$SECONDS
left() { echo $((BUDGET - SECONDS + T0)); }
say() { echo "== [$((SECONDS - T0))s] $*"; }
snapshot() { [ -n "$SNAPSHOT" ] && tar czf "$SNAPSHOT" --exclude='*.pt' -C "$(dirname "$RES")" "$(basename "$RES")"; }
# within CAP RESERVE CMD...: run CMD for at most CAP seconds, and stop it RESERVE seconds before the budget ends
within() {
  local cap=$1 reserve=$2 limit rc
  shift 2
  limit=$(( $(left) - reserve ))
  (( limit > cap )) && limit=$cap
  if (( limit < 10 )); then say "skipped, no time left: $*"; return 124; fi
  say "start (limit ${limit}s): $*"
  timeout -k 15 -s INT "$limit" "$@"
  rc=$?
  say "rc $rc: $*"
  return $rc
}
BSM=(python3 -m backsmooth)

say "device"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c 'import platform, torch; print("torch", torch.__version__, "python", platform.python_version(),
              torch.cuda.get_device_name(0), "cpus", __import__("os").cpu_count())'; } | tee "$RES/device.txt"
# decode the CIFAR-10 copy into the cache once, while the tests and benches run
python3 -c "from backsmooth.data.load import load_dataset; load_dataset('cifar10', '$DATA')" > "$RES/decode.log" 2>&1 &

say "1. CUDA tests"
within 120 0 python3 -m pytest -q -p no:cacheprovider -rs tests/test_loader.py 2>&1 | tee "$RES/tests.log"
snapshot

say "2. benches"
BENCH=(--device cuda --warmup 2 --repeats 3 --steps 3)
BF16=(--precision bf16 --channels-last)
for arch in resnet18 wrn34_10; do
  within 90 320 "${BSM[@]}" bench --arch "$arch" "${BENCH[@]}" --json "$RES/bench_${arch}_gpu_fp32.json"
  within 90 320 "${BSM[@]}" bench --arch "$arch" "${BENCH[@]}" "${BF16[@]}" --json "$RES/bench_${arch}_gpu_bf16_cl.json"
  snapshot
done
within 120 290 "${BSM[@]}" bench --arch resnet18 "${BENCH[@]}" "${BF16[@]}" --compile \
  --methods natural,backward_smoothing,trades --json "$RES/bench_resnet18_gpu_bf16_cl_compile.json"
snapshot

say "3. Backward Smoothing and TRADES-10, controlled protocol"
wait  # the decode
# epochs that fit: both runs at their bench speed, plus validation, the guard and start-up
EPOCHS=$(python3 - "$RES/bench_resnet18_gpu_bf16_cl.json" "$(left)" <<'EOF'
import json, sys
rows = {row["method"]: row["seconds_per_step"] for row in json.load(open(sys.argv[1]))["rows"]}
window = float(sys.argv[2]) - 60 - 40  # 60 s kept for step 4 (AutoAttack); 40 s for start-up and evaluation
epoch = 49_000 // 128 * (rows["backward_smoothing"] + rows["trades"]) * 1.15 + 8
print(max(1, min(100, int(window // epoch))))
EOF
) || EPOCHS=2
say "epochs: $EPOCHS"
cat > "$RES/gpu-short.toml" <<EOF
# Backward Smoothing and TRADES-10 under the controlled protocol, shortened to $EPOCHS epochs (written by gpu_session.sh)
title = "gpu-short"
seeds = [0]

[protocol]
preset = "cifar10-resnet18-{method}-wa"
data_dir = "$DATA"
epochs = $EPOCHS
device = "cuda"
precision = "bf16"
channels_last = true
final_eval_examples = 0
on_collapse = "warn"  # log a collapse and go on: a short run shows whether the guard false-alarms

[evaluation]
attacks = ["pgd20", "cw20"]
n_examples = 1000
checkpoints = ["last", "best"]
batch_size = 500

[[entries]]
method = "backward_smoothing"

[[entries]]
method = "trades"
EOF
within 10000 45 "${BSM[@]}" study "$RES/gpu-short.toml" --out "$RES/study" 2>&1 | tee "$RES/study.log"
snapshot

say "4. AutoAttack, then the wrn34_10 compile bench, with what is left"
# the adapter owns the list of AutoAttack packages; on failure its one-line install hint is the last line
if missing=$(python3 -c "from backsmooth.attacks.autoattack import autoattack_module; autoattack_module()" 2>&1); then
  for method in backward_smoothing trades; do
    within 10000 15 "${BSM[@]}" eval "$RES/study/runs/$method-seed0/best.pt" --attacks autoattack --n-examples 1000 \
      --batch-size 500 --name "$method-best" --out "$RES/autoattack" --no-progress 2>&1 | tee -a "$RES/autoattack.log"
    snapshot
  done
else
  say "AutoAttack skipped: ${missing##*$'\n'}"
fi
within 10000 5 "${BSM[@]}" bench --arch wrn34_10 "${BENCH[@]}" "${BF16[@]}" --compile \
  --methods natural,backward_smoothing,trades --json "$RES/bench_wrn34_10_gpu_bf16_cl_compile.json"
snapshot
say "done"
