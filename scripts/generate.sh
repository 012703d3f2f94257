#!/usr/bin/env bash
# bash scripts/generate.sh [extra `streamgen generate` flags]
# Sets up the environment, then generates a video with the shipped default model and
# prints the file it wrote.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
exec streamgen generate --model default --frames 96 --seed 0 \
  --prompt "a brick dungeon at dusk, light haze" --out out/default.mp4 "$@"
