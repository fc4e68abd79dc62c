#!/usr/bin/env bash
# Build the separate venv that holds mmsegmentation 1.2.2, used only by the opt-in parity test
# (tests/test_parity_mmseg.py). Never touches the project's own .venv.
# Idempotent: a venv whose marker file matches the pins below is reused as it is.
# Downloads nothing but PyPI packages (torch comes from the local CPU wheel via pip config).
# Usage: tests/parity/make_mmseg_venv.sh [VENV_DIR]   (default: <repo>/.venv-mmseg)
# Prints the venv's python path on its last line.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${1:-${repo_root}/.venv-mmseg}"
python_bin="${PYTHON:-python3}"

# mmcv-lite is mmcv without compiled ops; mmseg's DNLNet path needs none of them.
# ftfy/regex: mmseg.utils.tokenizer imports them at package import time.
pins=(
  "torch==2.13.0"
  "mmsegmentation==1.2.2"
  "mmengine==0.10.7"
  "mmcv-lite==2.1.0"
  "numpy<2"
  "ftfy"
  "regex"
)
marker="${venv}/.dnlseg-mmseg-pins"
wanted="$(printf '%s\n' "${pins[@]}")"

if [[ -x "${venv}/bin/python" && -f "${marker}" && "$(cat "${marker}")" == "${wanted}" ]]; then
  echo "mmseg venv already built: ${venv}" >&2
  echo "${venv}/bin/python"
  exit 0
fi

echo "building mmseg venv in ${venv}" >&2
"${python_bin}" -m venv "${venv}"
bash "${repo_root}/scripts/venv-install.sh" "${venv}" "${pins[@]}" >&2
"${venv}/bin/python" -m pip check >&2 || echo "warning: pip check reported conflicts (see above)" >&2
printf '%s\n' "${pins[@]}" > "${marker}.tmp"
mv "${marker}.tmp" "${marker}"
echo "mmseg venv ready: ${venv}" >&2
echo "${venv}/bin/python"
