#!/usr/bin/env bash
# One prepared run for the device machine (about 3-5 minutes on an H200): the GPU figures of
# BENCHMARKS.md. Uses that machine's python3 with its torch and timm; cdd-ray from this checkout.
#   bash bench/gpu_check.sh            (writes $OUT/gpu_check.json when OUT is set)
# bench/gpu_photo.sh runs the same check first, then the photo benchmark on the GPU (BENCHMARKS.md,
# "GPU", has both calls as they were made on 2026-11-30).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
out=${OUT:-/tmp}/gpu_check.json
PYTHONPATH=. timeout 480 python3 bench/gpu_check.py --device cuda --backbone wide_resnet50_2 --size 256 --batch 16 --steps 20 | tee "$out"
