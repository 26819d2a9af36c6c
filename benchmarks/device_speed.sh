#!/usr/bin/env bash
# Every figure of issue 14 in one run on the GPU machine (16-core CPU + 1 GPU):
#   benchmarks/peer_latency.py  -> $OUT/peer_latency.json   (ORT 1/8 threads, GPU fp16 batch 1/32/128,
#                                   Torch-Pruning at equal FLOPs, --target-latency vs --target-flops)
#   benchmarks/round_to_rule.py -> $OUT/round_to_rule.json  (strict vs halved channel multiples, ORT CPU time)
#   benchmarks/norm_channels_speed.py -> $OUT/norm_channels_speed.json (convnext_tiny: --norm-channels freeze vs
#                                   prune vs Torch-Pruning, ORT 1 thread and GPU fp16 batch 128)
#
#   benchmarks/device_speed.sh --prepare   # here, once: puts the Torch-Pruning wheel in .whl/ (gitignored)
#   OUT=$OUT benchmarks/device_speed.sh    # there, with carry [".whl"]; nothing else may run meanwhile (it times)
#   OUT=$OUT benchmarks/device_speed.sh --sweep   # instead: benchmarks/rule_sweep.py -> $OUT/rule_sweep.json
#                                                  (candidate allocation rules and GPU multiples, ~5 min)
#
# Torch-Pruning is not installed on the GPU machine: its wheel travels in .whl/ and is unpacked next to
# it. If graphprune is not installed there, this checkout is imported (PYTHONPATH + a graphprune/passes
# link inside the copy; passes/ installs as graphprune.passes).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
WHEEL=torch_pruning-1.6.1-py3-none-any.whl

if [[ "${1:-}" == "--prepare" ]]; then
    mkdir -p .whl
    if [[ ! -f ".whl/$WHEEL" ]]; then
        if [[ -f "/work/cache/wheels/$WHEEL" ]]; then
            cp "/work/cache/wheels/$WHEEL" .whl/
        else
            python3 -m pip download --no-deps -d .whl torch-pruning==1.6.1
        fi
    fi
    ls -l ".whl/$WHEEL"
    exit 0
fi

OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
# always this checkout, whatever graphprune another install provides
[[ -e graphprune/passes ]] || ln -s ../passes graphprune/passes
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import torch_pruning" 2>/dev/null; then
    [[ -f ".whl/$WHEEL" ]] || { echo "device_speed.sh: .whl/$WHEEL missing: run benchmarks/device_speed.sh --prepare and carry .whl" >&2; exit 1; }
    python3 -m zipfile -e ".whl/$WHEEL" .whl/site
    export PYTHONPATH="$ROOT/.whl/site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import graphprune, torch_pruning, torch; import graphprune.passes.allocate as a; print('graphprune', a.__file__, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())"

start=$(date +%s)
if [[ "${1:-}" == "--sweep" ]]; then
    shift
    python3 benchmarks/rule_sweep.py --out "$OUT/rule_sweep.json" "$@"
    echo "rule_sweep: $(( $(date +%s) - start )) s"
    exit 0
fi
python3 benchmarks/peer_latency.py --out "$OUT/peer_latency.json" "$@"  # extra args: e.g. --quick for a smoke run
echo "peer_latency: $(( $(date +%s) - start )) s"
# secondary (not an issue-14 figure): a failure here keeps peer_latency.json
python3 benchmarks/round_to_rule.py --out "$OUT/round_to_rule.json" || echo "round_to_rule.py failed (peer_latency.json is complete)"
echo "round_to_rule: $(( $(date +%s) - start )) s"
python3 benchmarks/norm_channels_speed.py --out "$OUT/norm_channels_speed.json" "$@" || echo "norm_channels_speed.py failed (peer_latency.json is complete)"
echo "total: $(( $(date +%s) - start )) s"
