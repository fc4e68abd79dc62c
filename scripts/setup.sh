#!/usr/bin/env bash
# Create .venv and install the project with its pinned dependencies. Idempotent; safe on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Set up already for this pyproject.toml, these scripts, this folder and this Python: nothing to install
# (the installer takes seconds to find that out itself, on every run of the main job).
stamp=$( { cat pyproject.toml scripts/setup.sh scripts/venv-install.sh; pwd; "$PY" --version; } | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ "$(cat .venv/.dnlseg-setup 2>/dev/null)" = "$stamp" ]; then
    echo "setup: .venv up to date"
    exit 0
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch pinned: any other spelling pulls the CUDA build (several GB) on CPU machines.
bash scripts/venv-install.sh .venv torch==2.13.0 -e '.[dev]'
# DVC: no analytics calls (no network here); the repo is initialised in git already.
.venv/bin/dvc config --global core.analytics false >/dev/null 2>&1 || true
echo "$stamp" > .venv/.dnlseg-setup
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
