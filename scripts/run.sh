#!/usr/bin/env bash
# The main job: set up, then run the whole DVC pipeline (sample data by default; see params.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" NO_ALBUMENTATIONS_UPDATE=1
# One local Ray for the whole run: each Ray stage joins it instead of starting its own (5-9 s less
# per sample training stage). Plain `dvc repro` works too, each stage then starting and stopping a Ray.
exec dnlseg with-ray -- dvc repro "$@"
