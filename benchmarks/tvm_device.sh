#!/usr/bin/env bash
# Issue 17 on the GPU machine's CPU, in one run of about 8 minutes: TVM tuned against onnxruntime, same thread
# count, for resnet18 and its 40%-FLOPs slim (benchmarks/tvm_tuning.py, staged):
#   1. prepare: export resnet18 (random weights, 1x3x224x224), prune the slim (default strategy, --round-to 16)
#      and a second slim with --strategy global (measured untuned);
#   2. tune the original and the slim at the same time, each on its own half of the cores (taskset), in one
#      run of 210 s each (passes of 16, 32, 64... trials per kernel), snapshotting each database when it
#      reaches 70, 140 and 210 s;
#   3. measure on 16 cores: onnxruntime, TVM's default schedule and TVM with each snapshot's records as they
#      are (latency against tuning budget); the last snapshot's records checked in the model on these cores
#      (graphprune.backends.tvm_verify: a kernel whose tuned schedule is slower than its default there goes back
#      to the default, and every record of a model whose tuned build stays slower): its build is verified@210;
#      all builds of a model timed in interleaved rounds; which of the slim's kernels the original's records
#      cover; the time of every kernel (default, tuned and verified builds).
# Tuning stays concurrent (two halves of the socket: half the wall time); what the tuners measured with a
# neighbour is checked in step 3 on quiet cores, so the verified build does not carry the concurrency's noise.
# The apache-tvm wheel travels in two parts (../shared/tools/tvm-device-parts):
#   run 1, carry [".tvm-part1"]:  mkdir -p /root/tvmp && cp .tvm-part1/* /root/tvmp/
#   run 2, carry [".tvm-part2"]:  bash benchmarks/tvm_device.sh
# Results: $OUT/tvm_tuning_16c_s5.json, $OUT/tvm_tuning_16c_s5.log, $OUT/tvm_device_logs.tar.gz.
# Local smoke test (small): SMOKE=1 OUT=/tmp/o bash benchmarks/tvm_device.sh
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
WORK="${WORK:-$(mktemp -d)}"
THREADS="${THREADS:-16}"
BUDGETS="${BUDGETS:-70,140,210}"
TUNE_LIMIT="${TUNE_LIMIT:-250}"   # hard stop for each tuning process (s); what it measured by then is kept
SIZE=224
RUNS=30
ROUNDS=5
if [[ -n "${SMOKE:-}" ]]; then THREADS=1; BUDGETS="${BUDGETS_SMOKE:-20,40}"; TUNE_LIMIT=240; SIZE=64; RUNS=5; ROUNDS=2; fi

if ! python3 -c "import tvm" 2>/dev/null; then
    [[ -f /root/tvmp/part_aa ]] || { echo "tvm_device.sh: TVM is not installed and /root/tvmp/part_aa is missing (run 1)" >&2; exit 2; }
    cat /root/tvmp/part_aa .tvm-part2/part_a* > /root/tvm.tar.xz
    mkdir -p /root/tvmsite && tar -C /root/tvmsite -xJf /root/tvm.tar.xz && rm -f /root/tvm.tar.xz
    python3 -m pip install -q --no-deps .tvm-part2/*.whl
    export PYTHONPATH=/root/tvmsite
fi
# always this checkout (passes/ installs as graphprune.passes)
ln -sfn ../passes graphprune/passes
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# TVM's thread pool pins its threads to CPUs 0..n-1 unless told not to: it would ignore taskset
export TVM_BIND_THREADS=0 TVM_NUM_THREADS="$THREADS" OMP_NUM_THREADS="$THREADS"

# two disjoint sets of $THREADS logical CPUs on different physical cores (for the concurrent tuning), and one
# set of $THREADS CPUs, one per physical core where possible (for measuring)
read -r SET_A SET_B SET_M < <(python3 - "$THREADS" <<'PY'
import os, sys
n = int(sys.argv[1])
cpus = sorted(os.sched_getaffinity(0))
def core(c):
    try:
        base = f"/sys/devices/system/cpu/cpu{c}/topology/"
        return (open(base + "physical_package_id").read().strip(), open(base + "core_id").read().strip())
    except OSError:
        return ("0", str(c))
cores = {}
for c in cpus:
    cores.setdefault(core(c), []).append(c)
groups = list(cores.values())
firsts = [g[0] for g in groups]
half = len(groups) // 2
def take(gs):
    flat = [c for g in gs for c in g[:1]] + [c for g in gs for c in g[1:]]
    return flat[:n] if len(flat) >= n else flat
a, b = take(groups[:half]), take(groups[half:])
m = (firsts + [c for g in groups for c in g[1:]])[:n]
fmt = lambda s: ",".join(map(str, s)) or "0"
print(fmt(a), fmt(b), fmt(m))
PY
)
LOG="$OUT/tvm_tuning_16c_s5.log"
{
    echo "cpus: $(nproc) online; tuning sets A=$SET_A B=$SET_B; measuring on $SET_M; budgets $BUDGETS s"
    lscpu | grep -E "Model name|^CPU\(s\)|Thread\(s\) per core|Core\(s\) per socket|Socket\(s\)|L3" || true
} | tee "$LOG"
COMMON=(--threads "$THREADS" --size "$SIZE" --runs "$RUNS" --workdir "$WORK")
# the slims keep channel counts that are multiples of 16 (one AVX-512 register of float32)
python3 benchmarks/tvm_tuning.py --stage prepare "${COMMON[@]}" --round-to 16 --extra-strategy global 2>&1 \
    | { grep -v "Warning\|torch.onnx.export" || true; } | tail -3 | tee -a "$LOG"
# each tuner in its own session (process group), so that its builder/runner workers go with it
setsid taskset -c "$SET_A" timeout "$TUNE_LIMIT" python3 benchmarks/tvm_tuning.py --stage tune --model resnet18 \
    --budgets "$BUDGETS" "${COMMON[@]}" > "$WORK/tune_resnet18.log" 2>&1 &
PA=$!
setsid taskset -c "$SET_B" timeout "$TUNE_LIMIT" python3 benchmarks/tvm_tuning.py --stage tune --model resnet18_slim \
    --slim-budgets "$BUDGETS" "${COMMON[@]}" > "$WORK/tune_resnet18_slim.log" 2>&1 &
PB=$!
RA=0; RB=0
wait "$PA" || RA=$?
wait "$PB" || RB=$?
kill -- -"$PA" -"$PB" 2>/dev/null || true
grep -h "budget" "$WORK"/tune_*.log | tee -a "$LOG" || true
echo "tuning exit codes: resnet18 $RA, slim $RB" | tee -a "$LOG"
set +e
taskset -c "$SET_M" python3 benchmarks/tvm_tuning.py --stage measure "${COMMON[@]}" \
    --rounds "$ROUNDS" --out "$OUT/tvm_tuning_16c_s5.json" 2>&1 | { grep -v "Warning\|pool_max" || true; } | tee -a "$LOG"
RM=${PIPESTATUS[0]}
echo "measure exit code: $RM" | tee -a "$LOG"
tar -C "$WORK" -czf "$OUT/tvm_device_logs.tar.gz" --exclude="*.onnx" --exclude="*/logs" --exclude="db_*@*" . || true
exit "$RM"
