#!/usr/bin/env bash
# Issue 16's figures in one command on a 2-GPU host (about 6-8 min wall, every job capped at 500 s):
# PP-OCRv4 rec at 0.5 and 0.4 FLOPs (act + lsq, then label-free distillation: curve, CPU time per step),
# the method ranking at 0.5 under one distillation budget, and the digits ResNet-20 at 0.2 FLOPs
# distilled without labels vs labelled fine-tuning. Independent jobs run in parallel, spread over both GPUs.
#
#   benchmarks/device_distill.sh --prepare   # here, once: copy the rec model and DejaVu fonts into bench_assets/
#   benchmarks/device_distill.sh             # on the GPU machine (carry bench_assets); results in benchmarks/results/
#
# Env: OUT (results folder, default benchmarks/results), ASSETS (default bench_assets), PY (default python3),
# RANK_STEPS (ranking budget in steps, default 2000), BUDGET_S (main distillation wall budget, default 200),
# JOBS (a subset of "ocr_0.5 ocr_0.4 rank_l1 rank_di digits", plus "ddp": finetune --nproc 1 vs 2 on the example
# CNN, and "rank_hfp rank_ssr rank_hbfp": the training-based methods on the ONNX model, their first METHOD_STEPS
# (default 400) of the RANK_STEPS driven by the distillation loss before pruning; not in the default set; the
# report merges every result file present), CAP_S (per-job time limit, default 500),
# DEVICE=cpu SMOKE=1 for a local check of the whole chain with tiny sizes (numbers meaningless).
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
    # not installed here: import this checkout directly (passes/ installs as graphprune.passes, so a link
    # inside this disposable copy stands in for the package mapping)
    [ -e graphprune/passes ] || ln -s ../passes graphprune/passes
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    $PY -c "import graphprune.passes, graphprune.distill" \
        || { echo "device_distill: cannot import graphprune from this checkout" >&2; exit 1; }
fi
DEVICE=${DEVICE:-cuda}
ngpu=$($PY -c "import torch; print(torch.cuda.device_count())")
[ "$DEVICE" = cpu ] || [ "$ngpu" -ge 1 ] || { echo "device_distill: no CUDA device" >&2; exit 1; }
g1=$(( ngpu > 1 ? 1 : 0 ))
SMALL=""; DSMALL=""; OSMALL=""
if [ "${SMOKE:-0}" = 1 ]; then
    SMALL="--train-lines 32 --eval-lines 16 --recover bias --batch-size 8 --curve-points 2 --cpu-threads 1 --workers 1 --ort-threads 1"
    DSMALL="--digits-quick --seeds 0"; OSMALL="--steps 2 --cpu-steps 1"
    BUDGET_S=${BUDGET_S:-1}; RANK_STEPS=${RANK_STEPS:-5}; METHOD_STEPS=${METHOD_STEPS:-3}; SMALL="$SMALL --epoch-steps 1"
fi
mkdir -p "$OUT" "$LOGS"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-6}
B="benchmarks/distill_ocr.py --fonts $ASSETS/fonts --models $ASSETS --device $DEVICE --workers 4 --ort-threads 4"
start=$(date +%s)
JOBS=${JOBS:-ocr_0.5 ocr_0.4 rank_l1 rank_di digits}
# GPU indices below are logical: with CUDA_VISIBLE_DEVICES already set (e.g. a GPU pinned by the caller) they
# map into that list instead of replacing it
IFS=, read -ra VISIBLE <<< "${CUDA_VISIBLE_DEVICES:-}"
job() {  # job NAME GPU ARGS...: capped (CAP_S, default 500 s) so a slow job still leaves the others' results
    local name=$1 gpu=$2; shift 2
    [ "${#VISIBLE[@]}" -gt 0 ] && gpu=${VISIBLE[$gpu]:-${VISIBLE[0]}}
    case " $JOBS " in *" $name "*) ;; *) return 0 ;; esac
    CUDA_VISIBLE_DEVICES=$gpu timeout "${CAP_S:-500}" $PY $B "$@" --out "$OUT/distill_$name.json" >"$LOGS/$name.log" 2>&1
    echo "$name: exit $? after $(( $(date +%s) - start )) s"
}
job ocr_0.5 0 ocr --target 0.5 --budget-s "${BUDGET_S:-200}" --cpu-threads 8 $SMALL $OSMALL &
job ocr_0.4 "$g1" ocr --target 0.4 --budget-s "${BUDGET_S:-200}" --cpu-steps 0 $SMALL $OSMALL &
job rank_l1 0 rank --target 0.5 --methods l1 --steps "${RANK_STEPS:-2000}" --cpu-steps 0 $SMALL &
job rank_di "$g1" rank --target 0.5 --methods di --steps "${RANK_STEPS:-2000}" --cpu-steps 0 $SMALL &
job digits "$g1" digits $DSMALL &
MS="--method-steps ${METHOD_STEPS:-400}"
job rank_hfp 0 rank --target 0.5 --methods hfp --steps "${RANK_STEPS:-2000}" $MS --cpu-steps 0 $SMALL &
job rank_ssr "$g1" rank --target 0.5 --methods ssr --steps "${RANK_STEPS:-2000}" $MS --cpu-steps 0 $SMALL &
job rank_hbfp 0 rank --target 0.5 --methods hbfp --steps "${RANK_STEPS:-2000}" $MS --cpu-steps 0 $SMALL &
wait
case " $JOBS " in *" ddp "*)  # the multi-process path on the GPUs: the built-in example CNN, 1 vs 2 processes
    D=$(mktemp -d)
    $PY -c "
import numpy as np, onnx, graphprune
from graphprune.examples import example_cnn
onnx.save(example_cnn(), '$D/m.onnx')
graphprune.prune('$D/m.onnx', target_flops=0.4, round_to=1, measure=False).save('$D/s.onnx')
np.savez('$D/d.npz', image=np.random.default_rng(0).normal(size=(2048, 3, 32, 32)).astype(np.float32))
" && for n in 1 2; do
        [ "$n" -le "$ngpu" ] || [ "$DEVICE" = cpu ] || continue
        timeout 200 $PY -m graphprune.cli finetune "$D/m.onnx" "$D/s.onnx" --data "$D/d.npz" -o "$D/t$n.onnx" \
            --steps "${DDP_STEPS:-300}" --batch-size 128 --eval-every 0 --device "$DEVICE" --nproc $n --json \
            > "$OUT/distill_ddp_$n.json" 2> "$LOGS/ddp_$n.log"
        echo "ddp $n process(es): exit $?"
    done ;;
esac
files=""
for f in ocr_0.5 ocr_0.4 rank_l1 rank_di rank_hfp rank_ssr rank_hbfp digits; do [ -f "$OUT/distill_$f.json" ] && files="$files $OUT/distill_$f.json"; done
$PY benchmarks/distill_ocr.py report $files --out "$OUT/distill.json" --md "$OUT/distill.md"
echo "device_distill: done in $(( $(date +%s) - start )) s; logs in $LOGS"
tail -n 3 "$LOGS"/*.log
