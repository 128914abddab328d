#!/usr/bin/env bash
# cdd-ray against anomalib, side by side on this machine: RD training-step throughput on the same
# backbone, image size and batch size, and AUPRO on the same maps (values and time).
# anomalib lives in its own virtual environment (bench/.anomalib-venv), never in cdd-ray's
# dependencies; torch and the other heavy packages there follow cdd-ray's constraints.txt.
#   bash bench/anomalib_compare.sh [--backbone resnet18] [--size 128] [--batch 8] [--steps 12]
#   bash bench/anomalib_compare.sh patchcore [--settings clean overlap] [--seeds 0 1 2]   (PatchCore metrics)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=bench/.anomalib-venv
ANOMALIB_VERSION=${ANOMALIB_VERSION:-2.7.0}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import anomalib, cdd_ray" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -c constraints.txt -e . "anomalib==$ANOMALIB_VERSION"
fi
if [ "${1:-}" = "patchcore" ]; then
  shift
  "$VENV/bin/python" bench/anomalib_patchcore.py "$@"
else
  "$VENV/bin/python" bench/anomalib_compare.py "$@"
fi
