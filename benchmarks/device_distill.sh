#!/usr/bin/env bash
# Issue 16's figures in one command on a 2-GPU host (about 6-8 min wall, every job capped at 520 s):
# PP-OCRv4 rec at 0.5 and 0.4 FLOPs (act + lsq, then label-free distillation: curve, CPU time per step),
# the method ranking at 0.5 under one distillation budget, and the digits ResNet-20 at 0.2 FLOPs
# distilled without labels vs labelled fine-tuning. Independent jobs run in parallel, spread over both GPUs.
#
#   benchmarks/device_distill.sh --prepare   # here, once: copy the rec model and DejaVu fonts into bench_assets/
#   benchmarks/device_distill.sh             # on the GPU machine (carry bench_assets); results in benchmarks/results/
#
# Env: OUT (results folder, default benchmarks/results), ASSETS (default bench_assets), PY (default python3),
# RANK_STEPS (ranking budget in steps, default 2000), BUDGET_S (main distillation wall budget, default 150).
set -u
cd "$(dirname "$0")/.."
ASSETS=${ASSETS:-bench_assets}
PY=${PY:-python3}
OUT=${OUT:-benchmarks/results}
LOGS=${LOGS:-$OUT/distill_logs}

if [ "${1:-}" = "--prepare" ]; then
    mkdir -p "$ASSETS/fonts"
    rec=$(ls "${GRAPHPRUNE_CACHE:-/work/cache/wheels}"/rapidocr-1.4.4-models/ch_PP-OCRv4_rec_infer.onnx 2>/dev/null | head -1)
    [ -n "$rec" ] || { echo "device_distill: ch_PP-OCRv4_rec_infer.onnx not in the cache (run benchmarks/ocr_accuracy.py once)" >&2; exit 1; }
    cp "$rec" "$ASSETS/"
    find /usr/share/fonts -name 'DejaVu*.ttf' ! -name '*ExtraLight*' -exec cp {} "$ASSETS/fonts/" \;
    n=$(ls "$ASSETS/fonts" | wc -l)
    [ "$n" -gt 0 ] || { echo "device_distill: no DejaVu fonts under /usr/share/fonts" >&2; exit 1; }
    du -sh "$ASSETS"
    exit 0
fi

[ -f "$ASSETS/ch_PP-OCRv4_rec_infer.onnx" ] || { echo "device_distill: $ASSETS/ch_PP-OCRv4_rec_infer.onnx missing (run --prepare here and carry $ASSETS)" >&2; exit 1; }
$PY -c "import PIL" 2>/dev/null || { echo "device_distill: Pillow is not installed" >&2; exit 1; }
if ! $PY -c "import graphprune.passes, graphprune.distill" 2>/dev/null; then
    $PY -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
        || { echo "device_distill: cannot install graphprune from this checkout" >&2; exit 1; }
fi
ngpu=$($PY -c "import torch; print(torch.cuda.device_count())")
[ "$ngpu" -ge 1 ] || { echo "device_distill: no CUDA device" >&2; exit 1; }
g1=$(( ngpu > 1 ? 1 : 0 ))
mkdir -p "$OUT" "$LOGS"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-6}
B="benchmarks/distill_ocr.py --fonts $ASSETS/fonts --models $ASSETS --device cuda --workers 4 --ort-threads 4"
start=$(date +%s)
job() {  # job NAME GPU ARGS...: capped at 520 s so a slow job still leaves the others' results
    local name=$1 gpu=$2; shift 2
    CUDA_VISIBLE_DEVICES=$gpu timeout 520 $PY $B "$@" --out "$OUT/distill_$name.json" >"$LOGS/$name.log" 2>&1
    echo "$name: exit $? after $(( $(date +%s) - start )) s"
}
job ocr_0.5 0 ocr --target 0.5 --budget-s "${BUDGET_S:-150}" --cpu-threads 8 &
job ocr_0.4 "$g1" ocr --target 0.4 --budget-s "${BUDGET_S:-150}" --cpu-steps 0 &
job rank_l1 0 rank --target 0.5 --methods l1,hfp,ssr,hbfp --steps "${RANK_STEPS:-2000}" --cpu-steps 0 &
job rank_di "$g1" rank --target 0.5 --methods di --steps "${RANK_STEPS:-2000}" --cpu-steps 0 &
job digits "$g1" digits &
wait
$PY benchmarks/distill_ocr.py report "$OUT"/distill_ocr_0.5.json "$OUT"/distill_ocr_0.4.json "$OUT"/distill_rank_l1.json \
    "$OUT"/distill_rank_di.json "$OUT"/distill_digits.json --out "$OUT/distill.json" --md "$OUT/distill.md"
echo "device_distill: done in $(( $(date +%s) - start )) s; logs in $LOGS"
tail -n 3 "$LOGS"/*.log
