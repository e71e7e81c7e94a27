#!/usr/bin/env bash
# The GPU path in one prepared run (at most ~8 minutes), for the device tool's machine:
#   1. the CUDA tests (pytest -m gpu),
#   2. inference B-scans/s of the paper's 64-channel U-Net on 496x768 B-scans, fp32 vs bf16 + channels_last,
#      and the gain of torch.compile; training steps/s with AMP,
#   3. the accurate recipe's training time (its folds, octseg.unet's fit) on the Duke B-scans.
# The device image has CUDA torch, numpy, scipy, scikit-image, pydantic and pytest but not octseg's services:
# octseg.unet is imported from this checkout through a namespace folder. The Duke data does not travel with
# ../shared: copy it into .gpu-data/ here first (ignored by git) and carry it:
#   mkdir -p .gpu-data && cp -r ../shared/data/duke_dme_fluid .gpu-data/   # then run with carry [".gpu-data"]
# Results go to $OUT (or /tmp/octseg-gpu): gpu.json and gpu.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/octseg-gpu}
mkdir -p "$OUT"
NS=$(mktemp -d)
mkdir -p "$NS/octseg"
for pkg in unet tasks flows; do ln -s "$PWD/$pkg" "$NS/octseg/$pkg"; done
export PYTHONPATH="$NS:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  timeout 180 "$PY" -m pytest -q -m gpu tests/unet -p no:cacheprovider -o addopts="" || echo "CUDA tests: exit $?"
  recipe=()
  [ -d .gpu-data/duke_dme_fluid ] && recipe=(--recipe flows/recipes/duke-dme-fluid-accurate.yaml --duke .gpu-data/duke_dme_fluid)
  timeout 300 "$PY" benchmarks/gpu.py --json "$OUT/gpu.json" "${recipe[@]}" || echo "benchmarks/gpu.py: exit $?"
} 2>&1 | tee "$OUT/gpu.log"
