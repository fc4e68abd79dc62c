#!/usr/bin/env bash
# The main job: set up, then run the whole DVC pipeline (sample data by default; see params.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" NO_ALBUMENTATIONS_UPDATE=1
# `dnlseg repro`: DVC runs each stage, independent ones at once (`--jobs auto`: as many training runs
# as the Ray cluster holds, plus one), against one local Ray (or $RAY_ADDRESS), writing to MLflow
# through one loopback server. Arguments go to it: targets, `--jobs 1` for one stage at a time.
exec dnlseg repro "$@"
