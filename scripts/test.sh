#!/usr/bin/env bash
# bash scripts/test.sh [pytest args]
# Sets up the environment (and Debian's chromium for the browser tests, when it can be
# installed), then runs the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "note: chromium could not be installed; browser tests will be skipped"
fi
exec python -m pytest -q "$@"
