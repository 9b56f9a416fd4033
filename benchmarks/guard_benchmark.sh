#!/usr/bin/env bash
# The collapse guard's benchmark (docs/recipe.md#the-guards-benchmark): four studies of healthy and
# collapsing runs with the guard warning, then the table of detections, false alarms and delays.
# Needs ../shared/data (MNIST, CIFAR-10); run from the repository root with the project installed.
set -euo pipefail
out=${1:-runs/study}
for part in digits mnist mnist-seeds cifar10; do
  backsmooth study "benchmarks/studies/guard/$part.toml" --out "$out/guard-$part"
done
python benchmarks/guard_benchmark.py "$out"/guard-digits "$out"/guard-mnist "$out"/guard-mnist-seeds "$out"/guard-cifar10
