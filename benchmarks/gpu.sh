#!/usr/bin/env bash
# The GPU benchmarks in one command, for a CUDA machine that may have no internet (about 10 minutes on an H100/H200).
#
#   benchmarks/gpu.sh --fetch-wheels   # where PyPI is reachable: the packages a bare PyTorch image lacks, into .whl/
#   benchmarks/gpu.sh                  # on the GPU machine: installs .whl/ when present, then measures
#
# It writes train_speed-gpu.json and class_images-gpu.json to $OUT when set, else to benchmarks/results/, and prints
# the tables that README.md's speed and memory table is filled from. The machine needs torch, transformers, accelerate
# and peft; diffusers and bitsandbytes (8-bit Adam of the T4 presets) come from the wheels.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(diffusers==0.42.1 bitsandbytes==0.50.2 importlib_metadata==10.2.0)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    platforms=()
    for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
        platforms+=(--platform "${tag}_x86_64")
    done
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" --platform any -d .whl "${WHEELS[@]}"
    exit 0
fi

export PYTHONPATH="$PWD"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
results="${OUT:-benchmarks/results}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 benchmarks/train_speed.py --gpu --json "$results/train_speed-gpu.json"
python3 benchmarks/class_images.py --gpu --json "$results/class_images-gpu.json"
