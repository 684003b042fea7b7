#!/usr/bin/env bash
# Wheels for running scripts/gpu_check.sh on a GPU host without network (Python 3.12, x86_64 Linux,
# an image that already has torch, numpy, onnx, tokenizers' deps and the CUDA 13 libraries).
#
#   bash scripts/gpu_wheels.sh [DIR]        # default DIR: .gpu/wheels (git-ignored)
#
# Then carry DIR to the host and run: NEXTOKEN_WHEELS=DIR bash scripts/gpu_check.sh
# Wheels over 55 MiB (onnxruntime-gpu: ~245 MiB) are split into DIR/NAME.whl.part-aa, -ab, ...,
# which gpu_check.sh joins again, so that a transfer limited in size can take them in turns.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.gpu/wheels}"
mkdir -p "$dir"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$dir" \
  "onnxruntime-gpu==1.31.1" "optimum-onnx==0.1.0" "optimum>=2.1,<2.2" "transformers==4.57.6" \
  "huggingface-hub>=0.34,<1.0" "tokenizers>=0.22,<0.23" "setuptools>=77" "pluggy>=1.5"
for whl in "$dir"/*.whl; do
  if [ "$(stat -c %s "$whl")" -gt $((55 << 20)) ]; then
    split -b 55m "$whl" "$whl.part-" && rm "$whl"
  fi
done
ls -la "$dir"
