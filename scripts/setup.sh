#!/usr/bin/env bash
# Create .venv and install the project with its pinned dependencies. Idempotent; safe on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
quiet() { "$@" 2>&1 | { grep -v -e "is ignored: it is neither a file nor a directory" || true; }; return "${PIPESTATUS[0]}"; }

# Set up already for this pyproject.toml, this script, this folder and this Python: nothing to install
# (pip takes ~10 s to find that out itself, on every run of the main job).
stamp=$( { cat pyproject.toml scripts/setup.sh; pwd; "$PY" --version; } | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ "$(cat .venv/.dnlseg-setup 2>/dev/null)" = "$stamp" ]; then
    echo "setup: .venv up to date"
    exit 0
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
# The stock pip (23.x) backtracks for minutes through moto's versions: upgrade it first.
quiet .venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: any other spelling pulls the CUDA build (several GB) on CPU machines.
quiet .venv/bin/python -m pip install -q torch==2.13.0
quiet .venv/bin/python -m pip install -q -e '.[dev]'
# DVC: no analytics calls (no network here); the repo is initialised in git already.
.venv/bin/dvc config --global core.analytics false >/dev/null 2>&1 || true
echo "$stamp" > .venv/.dnlseg-setup
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
