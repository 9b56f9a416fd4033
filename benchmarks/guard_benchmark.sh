#!/usr/bin/env bash
# The collapse guard's benchmark (docs/recipe.md#the-guards-benchmark): three studies of healthy and
# collapsing runs with the guard warning, then the table of detections, false alarms and delays.
# Needs ../shared/data (MNIST, CIFAR-10); run from the repository root with the project installed.
set -euo pipefail
out=${1:-runs/study}
for part in mnist cifar10 digits; do
  backsmooth study "benchmarks/studies/guard/$part.toml" --out "$out/guard-$part"
done
python benchmarks/guard_benchmark.py "$out"/guard-mnist "$out"/guard-cifar10 "$out"/guard-digits
