#!/usr/bin/env bash
# The GPU benchmarks, for a CUDA machine that may have no internet.
#
#   benchmarks/gpu.sh --fetch-wheels   # where PyPI is reachable: the packages a bare PyTorch image lacks, and a copy of
#                                      # the official diffusers scripts (from $OFFICIAL, default
#                                      # ../shared/reference/diffusers-examples), into .whl/ (gitignored: carried, not
#                                      # committed)
#   benchmarks/gpu.sh [PART ...]       # on the GPU machine: installs .whl/ when present, then measures each PART:
#       train   train_speed.py --gpu --card-gib 15: every preset, ours against the official script on the same random
#               full-size model folder, the T4 presets as on a 15 GiB card (~7 minutes on an H200)
#       seed    seed_recipe.py --gpu --card-gib 15: the seed SD 1.5 recipe end to end (class images, 400 steps, saving;
#               ~5 minutes)
#       class   class_images.py --gpu: class-image throughput, SD 1.5 and SDXL (~2 minutes)
#       memory  activation_memory.py: real CUDA peaks of one step beside the CPU counts (~3 minutes)
#       rehearsal  .ci/rehearse.py --device gpu: every notebook in full mode against full-size stand-in weights under
#               the real hub ids (scripts/standin_hub.py --full, ~25 GB written first), CUDA fp16, the real presets
#               (8-bit AdamW, gradient checkpointing), the process capped at 15 GiB as on a T4; per notebook its wall
#               time and peak allocated/reserved memory. Needs nbclient and ipykernel on the machine too.
#               DRY_RUN=1: the plumbing only, on a CPU (tiny stand-ins, notebook 01, no CUDA needed).
#     (train when none is named: one command may run at most 10 minutes, so run the others one per command)
#
# It writes PART-gpu.json files to $OUT when set, else to benchmarks/results/, and prints the tables that README.md's
# speed and memory section is filled from. The machine needs torch, torchvision, transformers, accelerate and peft;
# diffusers and bitsandbytes (8-bit Adam of the T4 presets) come from the wheels.
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
    official="${OFFICIAL:-../shared/reference/diffusers-examples}"
    [[ -f "$official/train_dreambooth.py" ]] || { echo "no official scripts in $official: set OFFICIAL" >&2; exit 2; }
    chmod -R u+w .whl/official 2>/dev/null || true
    rm -rf .whl/official && mkdir -p .whl/official
    cp "$official"/*.py "$official"/LICENSE .whl/official/ && chmod -R u+w .whl/official
    exit 0
fi

export PYTHONPATH="$PWD"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
results="${OUT:-benchmarks/results}"
official="${OFFICIAL:-.whl/official}"
[[ -f "$official/train_dreambooth.py" ]] || official=../shared/reference/diffusers-examples
[[ -n "${DRY_RUN:-}" ]] || python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU: run the CPU benchmarks instead')"
parts=("$@")
[[ ${#parts[@]} -gt 0 ]] || parts=(train)
for part in "${parts[@]}"; do
    case "$part" in
        train)
            python3 benchmarks/train_speed.py --gpu --card-gib 15 --official "$official" \
                --json "$results/train_speed-gpu.json" ;;
        seed) python3 benchmarks/seed_recipe.py --gpu --card-gib 15 --json "$results/seed_recipe-gpu.json" ;;
        class) python3 benchmarks/class_images.py --gpu --json "$results/class_images-gpu.json" ;;
        memory) python3 benchmarks/activation_memory.py --json "$results/activation_memory-gpu.json" ;;
        rehearsal)
            if [[ -n "${DRY_RUN:-}" ]]; then
                python3 .ci/rehearse.py --device cpu --timings-json "$results/rehearsal-dry-run.json" \
                    notebooks/01_forward_diffusion.ipynb
            else
                python3 .ci/rehearse.py --device gpu --full-size --timings-json "$results/rehearsal-gpu.json"
            fi ;;
        *) echo "unknown part '$part': use train, seed, class, memory or rehearsal" >&2; exit 2 ;;
    esac
done
