#!/usr/bin/env bash
# The test command: set up, lint, then the test suite (arguments go to pytest).
#   bash scripts/test.sh            every tier (CI: .ci/run, with the mmseg parity test on)
#   bash scripts/test.sh -m unit    the quick check, under 2 minutes (tiers: tests/conftest.py)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" NO_ALBUMENTATIONS_UPDATE=1
ruff check components pipeline tests bench
# Everything the tests write outside the repo (pytest's tmp_path, Ray's sessions, MLflow's and
# multiprocessing's temp files, torch's caches) goes under one folder, removed at the end: the disk is
# shared. (To keep a failed test's files, run `python -m pytest` directly.)
TMPDIR=$(mktemp -d "${TMPDIR:-/tmp}/dnlseg-tests.XXXXXX")
export TMPDIR
trap 'rm -rf "$TMPDIR"' EXIT
python -m pytest "$@"
