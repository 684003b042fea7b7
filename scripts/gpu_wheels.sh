#!/usr/bin/env bash
# Wheels for running scripts/gpu_check.sh on a GPU host without network (Python 3.12, x86_64 Linux,
# an image that already has torch, numpy, onnx, tokenizers' deps and the CUDA 13 libraries).
#
#   bash scripts/gpu_wheels.sh [DIR]        # default DIR: .gpu/wheels (git-ignored)
#   PYTHON_VERSION=3.11 bash scripts/gpu_wheels.sh DIR    # for a host with another Python
#
# Then carry DIR to the host and run: NEXTOKEN_WHEELS=DIR bash scripts/gpu_check.sh
# Wheels over 55 MiB (onnxruntime-gpu: ~245 MiB) are split into DIR/NAME.whl.part-aa, -ab, ...,
# which gpu_check.sh joins again, so that a transfer limited in size can take them in turns.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.gpu/wheels}"
mkdir -p "$dir"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$dir" \
  "onnxruntime-gpu==1.31.1" "optimum-onnx==0.1.0" "optimum>=2.1,<2.2" "transformers==4.57.6" \
  "huggingface-hub>=0.34,<1.0" "tokenizers>=0.22,<0.23" "setuptools>=77" "pluggy>=1.5" \
  "requests>=2.32" "urllib3>=2" "idna" "certifi" "charset-normalizer>=3" \
  "onnxruntime-genai-cuda==0.18.0"   # huggingface-hub 0.x needs requests; genai is the peer to compare
for whl in "$dir"/*.whl; do
  if [ "$(stat -c %s "$whl")" -gt $((55 << 20)) ]; then
    split -b 55m "$whl" "$whl.part-" && rm "$whl"
  fi
done
# stories260k travels too (../shared stays behind); then a plan for a host reached by transfers of
# limited size (here 8 paths and 58 MiB each, beside the working tree): each copies what it brought
# into /root/gpu, the last one runs the check.
stories="$(dirname "$dir")/stories260k"
[ -d ../shared/models/stories260k ] && mkdir -p "$stories" && cp -r ../shared/models/stories260k/. "$stories"/
python3 - "$dir" "$stories" <<'PY'
import json, os, sys
wheels, stories = sys.argv[1], sys.argv[2]
files = sorted((os.path.join(wheels, f) for f in os.listdir(wheels)), key=os.path.getsize, reverse=True)
calls, room = [], 58 << 20   # stories260k (1 MiB) and the working tree ride along with the last call
for f in files:
    size = os.path.getsize(f)
    fit = next((c for c in calls if c["bytes"] + size <= room and len(c["carry"]) < 7), None)
    if fit is None:
        calls.append(fit := {"carry": [], "bytes": 0})
    fit["carry"].append(f)
    fit["bytes"] += size
calls.sort(key=lambda c: c["bytes"], reverse=True)
if os.path.isdir(stories):
    calls[-1]["carry"].append(stories)
base = os.path.dirname(wheels)
copy = f"mkdir -p /root/gpu && cp -r {base}/. /root/gpu/ && ls /root/gpu/wheels | wc -l"
check = (" && NEXTOKEN_WHEELS=/root/gpu/wheels bash scripts/gpu_check.sh --stories /root/gpu/stories260k"
         " --work /root/w --json ${OUT:-.}/gpu.json")
print(f"{len(calls)} transfers; the last runs the check:")
for i, c in enumerate(calls, 1):
    print(json.dumps({"call": i, "carry": c["carry"], "command": copy + (check if i == len(calls) else ""),
                      "timeout_s": 600 if i == len(calls) else 120}))
PY
