#!/usr/bin/env bash
# Fills the GPU table of docs/benchmarks.md: fp32 against bf16 + channels_last (+ compile).
set -euo pipefail
for arch in resnet18 wrn34_10; do
  backsmooth bench --arch "$arch" --device cuda --json "docs/results/bench_${arch}_gpu_fp32.json"
  backsmooth bench --arch "$arch" --device cuda --precision bf16 --channels-last \
    --json "docs/results/bench_${arch}_gpu_bf16_cl.json"
  backsmooth bench --arch "$arch" --device cuda --precision bf16 --channels-last --compile \
    --json "docs/results/bench_${arch}_gpu_bf16_cl_compile.json"
done
