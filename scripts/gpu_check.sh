#!/usr/bin/env bash
# The GPU check on a CUDA host, from a clone: install what it needs, then run scripts/gpu_check.py.
#
#   bash scripts/gpu_check.sh [gpu_check.py options, e.g. --json gpu.json]
#
# With network: a virtual environment .venv-gpu with nextoken[cuda,export] (onnxruntime-gpu, the CUDA
# runtime, cuBLAS and cuDNN wheels, torch). Never install onnxruntime beside onnxruntime-gpu.
# Offline (NEXTOKEN_WHEELS=DIR, made by scripts/gpu_wheels.sh): the wheels in DIR and nextoken go into
# /tmp/nextoken-site, ahead of the system python's packages (which must hold torch and the CUDA
# libraries: an image with PyTorch for CUDA 13 does).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${NEXTOKEN_WHEELS:-}" ]; then
  site=/tmp/nextoken-site
  for part in "$NEXTOKEN_WHEELS"/*.whl.part-aa; do          # wheels carried in pieces
    [ -e "$part" ] && cat "${part%-aa}"-* > "${part%.part-aa}"
  done
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "$NEXTOKEN_WHEELS"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target "$site" .
  py=python3
else
  [ -x .venv-gpu/bin/python ] || python3 -m venv .venv-gpu
  .venv-gpu/bin/pip install -q -e ".[cuda,export]"
  py=.venv-gpu/bin/python
fi
export PYTHONUNBUFFERED=1
exec timeout 480 "$py" scripts/gpu_check.py "$@"
