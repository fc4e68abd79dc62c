#!/usr/bin/env bash
# The test command: set up, lint, then the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" NO_ALBUMENTATIONS_UPDATE=1
ruff check components pipeline tests bench
exec python -m pytest "$@"
