#!/usr/bin/env bash
# dnlseg GPU acceptance on ONE NVIDIA GPU (<= 12 min): the machine's facts, then bench/gpu_acceptance.py
# (hardware check, fp32/tf32/bf16 step, Ray Train checkpoint + resume on another worker count, the evaluate
# stage at 1024x2048 ms+flip, MLflow's GPU system metrics), one table at the end. From the repo root:
#   bash bench/gpu_acceptance.sh            # PY=path/to/python to use another interpreter than .venv's
#   bash bench/gpu_acceptance.sh --dry      # the same on the CPU at toy sizes
# The interpreter needs the project installed (scripts/setup.sh) with a CUDA build of torch 2.13.0; on a
# V100 the CUDA 12.6 one: pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export TMPDIR=$(mktemp -d "${TMPDIR:-/tmp}/dnlseg-accept.XXXXXX")   # Ray's session, checkpoints, MLflow
trap 'rm -rf "$TMPDIR"' EXIT
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || true
fi
df -h /dev/shm | tail -1 || true   # DataLoader workers pass batches through it (a container's 64 MB: bus error)
"$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_arch_list())'
timeout 720 "$PY" bench/gpu_acceptance.py "$@"
