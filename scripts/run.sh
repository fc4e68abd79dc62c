#!/usr/bin/env bash
# The main job: set up, then run the whole DVC pipeline (sample data by default; see params.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" NO_ALBUMENTATIONS_UPDATE=1
exec dvc repro "$@"
