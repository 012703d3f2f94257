#!/usr/bin/env bash
# bash scripts/setup.sh   (sourced by generate.sh and test.sh; idempotent)
# Creates .venv and installs streamgen with its extras. Without an NVIDIA GPU, the CPU
# build torch==2.13.0 is installed first: a bare `torch` would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
stamp=.venv/.streamgen-installed
want=$(cat pyproject.toml | sha1sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q "torch==2.13.0" "triton==3.7.1"
  fi
  # cluster: Ray Serve for `streamgen serve --replicas N` and tests/test_cluster.py (one ~80 MB wheel)
  python -m pip install -q -e ".[dev,server,demo,cluster]"
  echo "$want" > "$stamp"
fi
