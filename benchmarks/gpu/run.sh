#!/usr/bin/env bash
# bash benchmarks/gpu/run.sh OUTDIR [--dry-run] [--only a,b] [--skip a,b] [--budget S] [--work DIR]
#
# The whole GPU check as one command, for a short GPU window: sets itself up on a bare CUDA
# machine with nothing but this repository, prints what it found (GPU, driver, Python, torch,
# triton), then runs benchmarks/gpu/suite.py: every step its own process under its own time
# cap, 480 s in all counted from here. Writes OUTDIR/results.json, OUTDIR/RESULTS.md,
# OUTDIR/suite.log and OUTDIR/setup.log, even when steps fail or time out.
# --dry-run: the CPU rehearsal (tiny shapes, Triton interpreter), what CI runs.
#
# Set-up, offline-safe and a few seconds long: the first interpreter among $PYTHON,
# .venv/bin/python, python3 whose torch sees a GPU (any torch with --dry-run; else one pip
# attempt, recorded); streamgen from this checkout (already installed from it, else a symlink
# shim on PYTHONPATH: nothing to install); on a GPU run, missing optional packages
# (diffusers: Wan VAE; torchao: FP8) from wheels in $STREAMGEN_WHEELS or .whl/ when present,
# else one short pip attempt. Failures are logged and become rows, never fatal.
set -uo pipefail
export SUITE_T0=${SUITE_T0:-$(date +%s)}
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash benchmarks/gpu/run.sh OUTDIR [--dry-run] [--only a,b] [--skip a,b]" >&2
  exit 2
fi
OUT=$1
shift
DRY=0
for a in "$@"; do [ "$a" = "--dry-run" ] && DRY=1; done
mkdir -p "$OUT"
LOG="$OUT/setup.log"
: >"$LOG"
say() { echo "[setup] $*" | tee -a "$LOG" >&2; }
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total \
  --format=csv,noheader 2>&1 | sed 's/^/gpu: /' | tee -a "$LOG" | sed 's/^/[setup] /' >&2

# ---------------------------------------------------------------- interpreter (one import of torch each)
found='import os, platform, sys
import torch
cuda = torch.cuda.is_available()
try:
    import triton; tv = triton.__version__
except Exception as e:
    tv = f"not importable ({e})"
print("python", platform.python_version(), sys.executable, "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| GPU", torch.cuda.get_device_name(0) if cuda else "none", "| triton", tv)
sys.exit(0 if cuda or os.environ.get("DRY") == "1" else 3)'
PY=""
for c in ${PYTHON:-} .venv/bin/python python3 python; do
  command -v "$c" >/dev/null 2>&1 || continue
  if line=$(DRY=$DRY "$c" -c "$found" 2>>"$LOG"); then
    PY=$(command -v "$c")
    say "found: $line"
    break
  fi
  say "$c: no usable torch$([ $DRY = 0 ] && echo ' with CUDA') (${line:-no torch})"
done
if [ -z "$PY" ] && [ $DRY = 0 ] && command -v python3 >/dev/null 2>&1; then
  say "trying: python3 -m pip install torch (fails without a network; recorded)"
  timeout 120 python3 -m pip install -q --retries 0 --timeout 5 torch >>"$LOG" 2>&1 || say "pip install torch failed"
  line=$(python3 -c "$found" 2>>"$LOG") && say "found: $line"
fi
[ -n "$PY" ] || PY=$(command -v python3 || command -v python || echo python3)
case "$PY" in /*) ;; *) PY="$PWD/$PY" ;; esac

# ---------------------------------------------------------------- streamgen from this checkout
origin=$("$PY" -c 'import importlib.util as u; s = u.find_spec("streamgen"); print(s.origin if s else "")' 2>/dev/null)
if [ "$(dirname "$(realpath -m "${origin:-/none}")")" != "$(realpath streamgen)" ]; then
  shim=$(mktemp -d)/path
  mkdir -p "$shim/streamgen"
  for f in "$PWD"/streamgen/*; do ln -s "$f" "$shim/streamgen/"; done
  ln -s "$PWD/kernels" "$shim/streamgen/kernels"
  ln -s "$PWD/training" "$shim/streamgen/training"
  ln -s "$PWD/server" "$shim/streamgen/server"
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
  say "streamgen: not installed from this checkout; shim $shim on PYTHONPATH"
else
  say "streamgen: installed from this checkout"
fi

# ---------------------------------------------------------------- optional packages (GPU run only)
if [ $DRY = 0 ]; then
  missing=$("$PY" -c 'import importlib.util as u
print(" ".join(p for m, p in (("diffusers", "diffusers"), ("torchao", "torchao")) if u.find_spec(m) is None))' 2>/dev/null)
  WHEELS=${STREAMGEN_WHEELS:-.whl}
  if [ -n "$missing" ]; then
    if [ -d "$WHEELS" ]; then
      timeout 90 "$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" $missing >>"$LOG" 2>&1 \
        && say "installed from $WHEELS: $missing" || say "could not install from $WHEELS: $missing"
    else
      timeout 20 "$PY" -m pip install -q --retries 0 --timeout 3 $missing >>"$LOG" 2>&1 \
        && say "installed: $missing" || say "missing, not installable here (their rows will say so): $missing"
    fi
  fi
fi
say "set-up took $(( $(date +%s) - SUITE_T0 )) s; python $PY"

exec "$PY" benchmarks/gpu/suite.py --out "$OUT" --python "$PY" --setup-log "$LOG" "$@"
