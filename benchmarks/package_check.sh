#!/usr/bin/env bash
# Packaging check: build the wheel and sdist, `twine check --strict` them, install the wheel (with its `demo`
# extra) into a fresh virtual environment and run the CPU demo from there, outside the repository.
# Usage: bash benchmarks/package_check.sh     (PYTHON=python3.12 picks the interpreter; KEEP=1 keeps the temp dir;
# TMPDIR=/dev/shm is faster where deleting 1.3 GB of venv from disk is slow, e.g. an ext4 mounted with `discard`)
# Exits non-zero on any failure; prints the time of each step. CI runs it (.ci/run).
# The sdist is covered too: `python -m build` builds the wheel from the sdist it just made.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/backsmooth-package.XXXXXX")"
unset PYTHONPATH  # the import must come from the installed wheel, never from src/

START=$(date +%s.%N)
LAST=$START
step() {  # step NAME: print how long the previous step took
    local now; now=$(date +%s.%N)
    printf '[package_check] %-40s %6.1f s\n' "$1" "$(awk "BEGIN {print $now - $LAST}")"
    LAST=$now
}
cleanup() { cd /; LAST=$(date +%s.%N); rm -rf "$WORK"; step "cleanup (rm -rf the temp dir)"; }
if [ "${KEEP:-0}" = 1 ]; then echo "keeping $WORK"; else trap cleanup EXIT; fi

# build and twine: from $PYTHON if it has them, else from a throwaway tools environment
TOOLS="$PYTHON"
if ! "$PYTHON" -c "import build, twine" 2>/dev/null; then
    "$PYTHON" -m venv "$WORK/tools"
    "$WORK/tools/bin/python" -m pip install -q build twine
    TOOLS="$WORK/tools/bin/python"
    step "tools venv (build, twine)"
fi

"$TOOLS" -m build --outdir "$WORK/dist" "$REPO" > "$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
WHEEL=$(ls "$WORK"/dist/backsmooth-*.whl)
SDIST=$(ls "$WORK"/dist/backsmooth-*.tar.gz)
step "build wheel + sdist"

"$TOOLS" -m twine check --strict "$WHEEL" "$SDIST"
"$TOOLS" - "$WHEEL" "$REPO/src" <<'EOF'
import pathlib, sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "LICENSE missing from the wheel"
src = pathlib.Path(sys.argv[2])
wanted = {p.relative_to(src).as_posix() for p in (src / "backsmooth").rglob("*")
          if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
missing = sorted(wanted - names)
assert not missing, f"files of src/ missing from the wheel: {missing}"
EOF
step "twine check --strict + wheel contents"

# torch 2.13.0 (CPU) first, so the wheel's plain `torch` requirement never pulls a CUDA build
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q --upgrade pip
"$VPY" -m pip install -q --no-compile torch==2.13.0  # --no-compile: half the files to write and to delete
step "fresh venv + torch==2.13.0"
"$VPY" -m pip install -q --no-compile "$WHEEL[demo]"
"$VPY" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
step "install wheel[demo]"

cd "$WORK"  # outside the repository
IMPORTED=$("$VPY" -c "import backsmooth; print(backsmooth.__file__)")
SITE=$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
case "$IMPORTED" in
    "$SITE"/backsmooth/*) echo "backsmooth imported from $IMPORTED" ;;
    *) echo "backsmooth imported from $IMPORTED, not from the venv's site-packages $SITE" >&2; exit 1 ;;
esac
TMPDIR="$WORK" BACKSMOOTH_CACHE="$WORK/cache" "$WORK/venv/bin/backsmooth" train --no-progress --epochs 2 --out "$WORK/run"
test -f "$WORK/run/last.pt" || { echo "the demo wrote no $WORK/run/last.pt" >&2; exit 1; }
step "backsmooth train (demo, 2 epochs)"

printf '[package_check] %-40s %6.1f s\n' "OK, total" "$(awk "BEGIN {print $(date +%s.%N) - $START}")"
