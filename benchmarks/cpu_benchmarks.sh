#!/usr/bin/env bash
# Regenerates the CPU tables of docs/benchmarks.md (run on an otherwise idle machine).
set -euo pipefail
backsmooth bench --arch small_cnn --warmup 2 --repeats 5 --steps 3 --json docs/results/bench_small_cnn_cpu.json
backsmooth bench --arch resnet18 --warmup 1 --repeats 3 --steps 1 --json docs/results/bench_resnet18_cpu.json
