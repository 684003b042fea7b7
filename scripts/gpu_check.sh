#!/usr/bin/env bash
# The GPU check on a CUDA host, from a clone: install what it needs, then run scripts/gpu_check.py.
#
#   bash scripts/gpu_check.sh [gpu_check.py options, e.g. --json gpu.json]
#
# With network: a virtual environment .venv-gpu with nextoken[cuda,export] (onnxruntime-gpu, the CUDA
# runtime, cuBLAS and cuDNN wheels, torch). Never install onnxruntime beside onnxruntime-gpu.
# Offline (NEXTOKEN_WHEELS=DIR, made by scripts/gpu_wheels.sh): the wheels in DIR and nextoken go into
# /tmp/nextoken-site, ahead of the system python's packages (which must hold torch and the CUDA
# libraries: an image with PyTorch for CUDA 13 does); onnxruntime-genai-cuda, when its wheel is in DIR,
# goes into /tmp/genai-site and is benchmarked beside nextoken.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${NEXTOKEN_WHEELS:-}" ]; then
  site=/tmp/nextoken-site
  for part in "$NEXTOKEN_WHEELS"/*.whl.part-aa; do          # wheels carried in pieces
    [ -e "$part" ] && cat "${part%-aa}"-* > "${part%.part-aa}"
  done
  wheels=()
  for whl in "$NEXTOKEN_WHEELS"/*.whl; do [[ "$whl" == */onnxruntime_genai* ]] || wheels+=("$whl"); done
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "${wheels[@]}"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target "$site" .
  py=python3
  # onnxruntime-genai-cuda, when its wheel is there: its own folder beside the image's packages (its
  # model builder wants the image's newer transformers), sharing the same onnxruntime-gpu wheel.
  genai=("$NEXTOKEN_WHEELS"/onnxruntime_genai_cuda-*.whl)
  if [ -e "${genai[0]}" ] && [[ " $* " != *" --genai-python "* ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/genai-site \
      "${genai[0]}" "$NEXTOKEN_WHEELS"/onnxruntime_gpu-*.whl
    # genai does not preload the CUDA wheels' libraries: the dynamic loader must find them itself.
    libs="$(python3 -c 'import glob, sys; print(":".join(d for p in sys.path for d in sorted(glob.glob(p + "/nvidia/*/lib"))))')"
    printf '#!/bin/sh\nPYTHONPATH=/tmp/genai-site LD_LIBRARY_PATH=%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} exec %s "$@"\n' \
      "$libs" "$(command -v python3)" > /tmp/genai-python
    chmod +x /tmp/genai-python
    set -- "$@" --genai-python /tmp/genai-python
  fi
else
  [ -x .venv-gpu/bin/python ] || python3 -m venv .venv-gpu
  .venv-gpu/bin/pip install -q -e ".[cuda,export]"
  py=.venv-gpu/bin/python
fi
export PYTHONUNBUFFERED=1
# SIGTERM at the limit (GPU_CHECK_TIMEOUT seconds, default 480): the script prints what it measured.
exec timeout -k 30 "${GPU_CHECK_TIMEOUT:-480}" "$py" scripts/gpu_check.py "$@"
