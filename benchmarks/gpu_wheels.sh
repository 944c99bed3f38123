#!/usr/bin/env bash
# Download, here, the wheels the GPU checks need on the lent H200 machine, into ./.whl.
#
# That machine's image has Python 3.12, torch 2.11, safetensors, pluggy, fsspec, rich and
# transformers, but no torchao or pydantic, and it cannot reach a package registry. The
# wheels below (about 7 MB) travel with the working tree when a device run names `.whl`
# in its carry list; `.whl/` is git-ignored. Then, on the device:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.:ckpt_plugins_float8
#   PYTHONUNBUFFERED=1 python3 benchmarks/gpu_float8_check.py 2>&1 | tee "$OUT/float8.log"
#
# Usage: bash benchmarks/gpu_wheels.sh   (from anywhere; writes <repo>/.whl)
set -euo pipefail
cd "$(dirname "$0")/.."

# Pure-Python wheels, except pydantic-core (cp312) and torchao (abi3, built for torch >= 2.11).
WHEELS=(
    torchao==0.18.0
    pydantic==2.14.4
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0
    compressed-tensors==0.20.0   # for the informational transformers load of the fp8 export
    loguru==0.7.3                # compressed-tensors imports it
)

mkdir -p .whl
rm -f .whl/*.whl
python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "${WHEELS[@]}"
ls -l .whl
du -sh .whl
