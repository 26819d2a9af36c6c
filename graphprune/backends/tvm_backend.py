"""Apache TVM backend: Relax import, MetaSchedule tuning with a reusable JSON database,
compiled-library export, latency measurement (local or over TVM RPC) and a check against onnxruntime.

tvm is an optional extra (`graphprune[tvm]`); it is imported lazily inside functions so that
`import graphprune` never needs it.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx

from graphprune.backends.latency import LatencyStats
from graphprune.errors import GraphpruneError

TVM_EXTRA_HINT = "TVM is not installed; install the optional extra: pip install 'graphprune[tvm]'"
CUDA_HINT = (
    "target 'cuda' is unavailable: the installed TVM has no CUDA support (the apache-tvm wheel is "
    "CPU-only) or no NVIDIA GPU is visible; a CUDA-enabled TVM must be built from source with "
    "USE_CUDA=ON (and USE_LLVM=ON) against a CUDA toolkit, and run on a machine with an NVIDIA driver"
)


def require_tvm() -> Any:
    """Import tvm or raise the one-line install hint."""
    try:
        import tvm  # noqa: F401
    except ImportError as exc:
        raise GraphpruneError(TVM_EXTRA_HINT) from exc
    _light_tensor_intrin()
    return tvm


def _light_tensor_intrin() -> None:
    """Skip registering every tensor intrinsic (CUDA/ROCm/ARM: ~20-40 s per process).

    MetaSchedule imports `tvm.s_tir.tensor_intrin` in the tuner and in every builder worker, which
    registers intrinsics for all hardware. CPU tuning without -mcpu needs none of them, so we
    pre-install the package as an empty module; submodules stay importable on demand because the
    stub keeps the real package path. Set GRAPHPRUNE_TVM_ALL_INTRIN=1 to disable this.
    """
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules or os.environ.get("GRAPHPRUNE_TVM_ALL_INTRIN") == "1":
        return
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return
    stub = types.ModuleType(name, "graphprune: lazily populated tensor intrinsics")
    stub.__path__ = list(spec.submodule_search_locations)  # type: ignore[attr-defined]
    sys.modules[name] = stub


def _worker_init() -> None:
    """Initializer for MetaSchedule builder/runner worker processes (must be importable by name)."""
    _light_tensor_intrin()


def default_num_cores() -> int:
    """Physical cores where psutil knows them, else logical ones: MetaSchedule wants physical."""
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def host_mcpu() -> str | None:
    """LLVM's name for this machine's CPU (e.g. znver5, sapphirerapids), or None when unknown.

    Without -mcpu LLVM emits baseline x86-64 code (128-bit SSE2), so AVX2/AVX-512 machines run TVM
    kernels at a fraction of the speed onnxruntime's hand-written kernels reach.
    """
    tvm = require_tvm()
    fn = tvm.get_global_func("target.llvm_get_system_cpu", allow_missing=True)
    try:
        name = str(fn()) if fn is not None else ""
    except Exception:
        return None
    return name if name and name != "generic" else None


def make_target(name: str = "llvm", num_cores: int | None = None, mcpu: str | None = None) -> Any:
    """Build a TVM target from a short name, failing with a plain message when it is unavailable.

    `mcpu="native"` means this machine's CPU (`host_mcpu`); None leaves LLVM's generic x86-64.
    """
    tvm = require_tvm()
    if name == "llvm":
        if not tvm.runtime.enabled("llvm"):
            raise GraphpruneError("target 'llvm' is unavailable: this TVM build has no LLVM code generator")
        spec: dict[str, Any] = {"kind": "llvm", "num-cores": int(num_cores or default_num_cores())}
        if mcpu == "native":
            mcpu = host_mcpu()
        if mcpu:
            spec["mcpu"] = mcpu
            if name == "llvm":
                import tvm.s_tir.tensor_intrin.x86  # noqa: F401  (VNNI/AVX512 intrinsics)
        return tvm.target.Target(spec)
    if name == "cuda":
        if not tvm.runtime.enabled("cuda") or not tvm.cuda(0).exist:
            raise GraphpruneError(CUDA_HINT)
        host = {"kind": "llvm", "num-cores": int(num_cores or default_num_cores())}
        return tvm.target.Target({"kind": "cuda", "arch": _cuda_arch(tvm)}, host=host)
    raise GraphpruneError(f"unknown target {name!r}; expected 'llvm' or 'cuda'")


def _cuda_arch(tvm: Any) -> str:
    return "sm_" + tvm.cuda(0).compute_version.replace(".", "")


def device_for(target: Any, remote: Any = None) -> Any:
    """The runtime device matching a target, local or on an RPC session."""
    tvm = require_tvm()
    kind = target.kind.name
    if remote is not None:
        return remote.cuda(0) if kind == "cuda" else remote.cpu(0)
    return tvm.cuda(0) if kind == "cuda" else tvm.cpu(0)


def import_onnx(model: onnx.ModelProto | str | Path) -> Any:
    """ONNX -> Relax IRModule with weights bound as constants (static shapes, fixed weights)."""
    require_tvm()
    from tvm.relax.frontend.onnx import from_onnx

    from graphprune.frontends.onnx_frontend import read_model

    # external data only from the model's folder, under the loader rules (frontends/external.py)
    proto = model if isinstance(model, onnx.ModelProto) else read_model(str(model))[0]
    try:
        return from_onnx(proto, keep_params_in_input=False)
    except Exception as exc:  # the frontend raises many types
        raise GraphpruneError(f"TVM cannot import the model: {str(exc).splitlines()[0]}") from exc


def compile_untuned(mod: Any, target: Any, schedule: str = "default") -> Any:
    """Compile without tuning records.

    `schedule="default"` gives every kernel the default CPU schedule of `default_schedule_database`
    (parallel, tiled, vectorised); `"none"` is TVM's plain pipeline, whose kernels are unscheduled
    single-threaded loop nests (kept for comparison: it is ~2-100x slower).
    """
    tvm = require_tvm()
    if schedule == "none" or target.kind.name != "llvm":
        with tvm.transform.PassContext(opt_level=3):
            return tvm.compile(mod, target=target)
    return _compile(default_schedule_database(target), mod, target)


def cpu_layout(mod: Any, target: Any) -> Any:
    """The layout graphprune compiles and tunes in: channels-last convolutions on CPU targets
    (`channels_last`), unchanged elsewhere or when GRAPHPRUNE_TVM_LAYOUT=nchw (for comparisons).
    Tuning records are keyed by kernel structure, so records made in one layout do not apply to the other.
    """
    if target.kind.name != "llvm" or os.environ.get("GRAPHPRUNE_TVM_LAYOUT", "").lower() == "nchw":
        return mod
    return channels_last(mod)


AVX512_CPUS = ("avx512", "knl", "knm", "cannonlake", "icelake", "tigerlake", "cooperlake", "cascadelake",
               "sapphirerapids", "emeraldrapids", "graniterapids", "rocketlake", "alderlake-avx512", "znver4",
               "znver5", "diamondrapids")


def vector_lanes(target: Any) -> int:
    """float32 lanes of the target's widest vector unit: 16 with AVX-512, else 8 (AVX2)."""
    mcpu = str(target.attrs.get("mcpu", "") or "")
    return 16 if any(key in mcpu for key in AVX512_CPUS) else 8


def _largest_divisor(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _default_tiles(trace: Any, lanes: int, cores: int = 1) -> Any:
    """Replace a design space's sampled tile sizes by fixed, usually good ones.

    MetaSchedule's CPU multi-level tiling splits every spatial loop in four (outer parallel tiles
    first, the innermost last) and every reduction loop in two. A random sample of those sizes
    rarely vectorises (innermost tile 1) and was measured ~2.7x slower than these rules on
    resnet18. A channels-last convolution gets `_conv_nhwc_tiles`. Any other kernel: the innermost
    spatial loop (output width, or the matmul's columns) gets a vector of `lanes`, the third from
    last spatial loop (output channels of an NCHW conv; the rows of a matmul) a register block of
    4 in the innermost tile, reductions an inner tile of up to 8, and what remains of every spatial
    loop goes to the outer, parallel tiles.
    """
    tiles = [i for i in trace.insts if i.kind.name == "SamplePerfectTile"]
    spatial = [i for i in tiles if int(i.attrs[0]) == 4]
    reduce_ = [i for i in tiles if int(i.attrs[0]) == 2]
    decisions = trace.decisions
    extent = {i: int(np.prod([int(x) for x in decisions[i]])) for i in tiles}
    chosen: dict[Any, Any] = {}
    if _is_conv_nhwc(trace, spatial, reduce_):
        chosen = _conv_nhwc_tiles(spatial, reduce_, extent, lanes, cores)
        for inst in trace.insts:
            if inst.kind.name == "SampleComputeLocation":
                chosen[inst] = _pad_location()
    else:
        block_axis = len(spatial) - 3 if len(spatial) >= 3 else 0
        for pos, inst in enumerate(spatial):
            n = extent[inst]
            if pos == len(spatial) - 1:
                inner = _largest_divisor(n, lanes)
                rest = n // inner
                mid = _largest_divisor(rest, 2)
                chosen[inst] = [rest // mid, mid, 1, inner]
            elif pos == block_axis:
                inner = _largest_divisor(n, 4)
                rest = n // inner
                mid = _largest_divisor(rest, 2)
                chosen[inst] = [rest // mid, 1, mid, inner]
            else:
                chosen[inst] = [n, 1, 1, 1]
        for inst in reduce_:
            n = extent[inst]
            inner = n if n <= 3 else _largest_divisor(n, 8)
            chosen[inst] = [n // inner, inner]
    for inst in trace.insts:  # the unroll limit: the 64-step choice when there is one
        if inst.kind.name == "SampleCategorical" and len(inst.attrs[0]) > 2:
            chosen[inst] = 2
    for inst, decision in chosen.items():
        trace = trace.with_decision(inst, decision, True)
    return trace


def _pad_location() -> int:
    """Where a convolution computes its padded input: once for the whole input, in its own parallel loop
    before the conv (-1, the default), or with GRAPHPRUNE_TVM_PAD=task inside each parallel task of the conv
    (the rows that task reads; one fork-join per conv instead of two, at the price of copying rows shared
    by neighbouring tasks more than once: 7-15% more one-thread time on resnet18 and its slims)."""
    return 6 if os.environ.get("GRAPHPRUNE_TVM_PAD", "").lower() == "task" else -1


def _is_conv_nhwc(trace: Any, spatial: list, reduce_: list) -> bool:
    """A trace tiling TOPI's channels-last convolution (n, h, w, co x rh, rw, rc)."""
    blocks = {str(i.attrs[0]) for i in trace.insts if i.kind.name == "GetSBlock"}
    return "conv2d_nhwc" in blocks and len(spatial) == 4 and len(reduce_) == 3


def _conv_nhwc_tiles(spatial: list, reduce_: list, extent: dict, lanes: int, cores: int) -> dict:
    """Tiles of a channels-last (NHWC, HWIO weights) convolution: a register block of `w3` output
    pixels x `co3` output channels in the innermost tile (channels vectorised, pixels unrolled; with
    the epilogue fused after the second spatial level the block's accumulators stay in registers),
    the whole reduction between, and output-channel blocks x rows as parallel tasks. Channel counts
    are multiples of 8 or 16 in most networks (and after pruning with `--round-to`), unlike the widths
    7/14/28 that an NCHW schedule vectorises, and a strided conv's inputs are broadcast, not gathered."""
    n, h, w, co = spatial
    height, width, channels = extent[h], extent[w], extent[co]
    # a power of two (LLVM splits other vector widths badly: 40 lanes ran 3x slower than 8), at most two
    # registers' worth
    co3 = max(d for d in (1, 2, 4, 8, 16, 32, 64) if d <= 2 * lanes and channels % d == 0)
    vectors = -(-co3 // lanes)
    registers = 24 if lanes >= 16 else 12  # accumulators, leaving room for weights and a broadcast
    # the accumulator block lives on the stack (TVM allocates up to 1 KiB there), so <= 256 floats
    w3 = _largest_divisor(width, max(1, min(registers // vectors, 256 // co3)))
    co0 = channels // co3
    # parallel tasks: output-channel blocks, then rows until every core has the same number of tasks (or
    # at least 4); a task keeps its weight slice in cache across all of its rows
    h0 = height
    for d in range(1, height + 1):
        tasks = co0 * d
        if height % d == 0 and tasks >= cores and (tasks % cores == 0 or tasks >= 4 * cores):
            h0 = d
            break
    chosen = {n: [extent[n], 1, 1, 1], h: [h0, height // h0, 1, 1], w: [1, width // w3, 1, w3],
              co: [co0, 1, 1, co3]}
    rh, rw, rc = reduce_
    rc1 = extent[rc] if extent[rc] <= 3 else _largest_divisor(extent[rc], 8)
    chosen.update({rh: [extent[rh], 1], rw: [extent[rw], 1], rc: [extent[rc] // rc1, rc1]})
    return chosen


def channels_last(mod: Any) -> Any:
    """Rewrite every ungrouped 2-D convolution to channels-last (NHWC data, HWIO weights) for CPU code.

    An NCHW schedule vectorises the output width, which in a CNN is often 7, 14, 28 or 56 (a
    fraction of a 16-lane AVX-512 register), and gathers its inputs when the stride is 2; channels-last
    vectorises output channels, which are vector multiples in real networks, and broadcasts inputs.
    Weights are constants, so their transposition folds away at build time; elementwise ops, pools
    and the residual adds follow the new layout, leaving one transpose at the input and one before the
    first op that needs NCHW. Grouped and depthwise convolutions are not asked to change: they follow
    their input's layout and keep their weights' (TOPI handles both).
    """
    require_tvm()
    from tvm import relax

    def layouts(call: Any) -> dict:
        if call.op.name == "relax.nn.conv2d" and int(call.attrs.groups) == 1 and call.attrs.data_layout == "NCHW":
            return {"relax.nn.conv2d": ["NHWC", "HWIO"]}
        return {}

    try:
        return relax.transform.ConvertLayout({}, layouts)(mod)
    except Exception:  # a graph the pass cannot convert keeps its layout (numerics are checked later)
        return mod


def default_trace(mod: Any, target: Any) -> Any:
    """The default schedule of one kernel as a complete MetaSchedule trace (post-processing included),
    or None when the kernel has no design space that the rules or the seeded sample can fill.

    The schedule is MetaSchedule's own first design space for the kernel (multi-level tiling,
    parallel outer loops, vectorised inner loops, unrolling) with its tile sizes set by fixed rules
    (`_default_tiles`) instead of sampled, then its post-processors. A kernel the rules cannot
    schedule gets the seeded sample. Being a trace of the design space, it can be stored in a tuning
    database like any measured candidate, and the evolutionary search mutates it like its own.
    """
    from tvm.s_tir import Schedule
    from tvm.s_tir import meta_schedule as ms

    try:
        ctx = ms.TuneContext(mod=mod, target=target, space_generator="post-order-apply",
                             task_name="graphprune-default", num_threads=1, rand_state=0)
        spaces = ctx.space_generator.generate_design_space(mod)
    except Exception:
        return None
    if not spaces:
        return None
    lanes, cores = vector_lanes(target), int(target.attrs.get("num-cores", 1))
    # a channels-last conv takes the space whose epilogue is fused after the second spatial level: its
    # accumulator block is then a small buffer inside the parallel loop, which LLVM keeps in registers
    first = spaces[1] if len(spaces) > 1 and _is_conv_nhwc_space(spaces[1].trace) else spaces[0]
    for trace in (_safe_default_tiles(first.trace, lanes, cores), _safe_default_tiles(spaces[0].trace, lanes, cores),
                  spaces[0].trace):
        if trace is None:
            continue
        try:
            sch = Schedule(mod)
            trace.apply_to_schedule(sch, remove_postproc=False)
            sch.enter_postproc()
            if all(post.apply(sch) for post in ctx.space_generator.postprocs):
                return sch.trace
        except Exception:  # try the next trace; a kernel none fits keeps TVM's fallback
            continue
    return None


def default_schedule_database(target: Any) -> Any:
    """A database that answers every kernel with its default schedule (`default_trace`) instead of a
    measured one.

    No candidate is measured, so nothing is "tuned"; it avoids TVM's unscheduled fallback, which
    runs each kernel as one single-threaded loop nest, and a random sample's unvectorised loops.
    A kernel that cannot be scheduled at all keeps the fallback.
    """
    from tvm.s_tir import meta_schedule as ms

    def schedule_fn(sch: Any) -> bool:
        trace = default_trace(sch.mod, target)
        if trace is None:
            return False
        try:
            trace.apply_to_schedule(sch, remove_postproc=False)
        except Exception:
            return False
        return True

    return ms.database.ScheduleFnDatabase(schedule_fn, module_equality="structural")


def _complete(entry: dict | None, trials_per_task: int | None) -> bool:
    """Whether a kernel's search is done: its space exhausted, or (when the caller sets a per-kernel trial
    count) that many candidates measured, else as the run that tuned it recorded. A later call with a larger
    `trials_per_task` resumes kernels that earlier, shorter calls finished: budgets can grow in steps."""
    if not entry:
        return False
    if trials_per_task is not None and not entry.get("exhausted"):
        return int(entry.get("measured", 0)) >= trials_per_task
    return bool(entry.get("complete"))


def _try_measure_defaults(tasks: list, target: Any, builder: Any, runner: Any, database: Any) -> dict[str, float]:
    """`_measure_defaults`, with a failure meaning "no default records" (the search still runs)."""
    try:
        return _measure_defaults(tasks, target, builder, runner, database)
    except Exception as exc:
        logging.getLogger(__name__).warning("default schedules not measured: %s",
                                            str(exc).strip().splitlines()[-1] if str(exc).strip() else exc)
        return {}


def _measure_defaults(tasks: list, target: Any, builder: Any, runner: Any, database: Any) -> dict[str, float]:
    """Build and time the default schedules of many kernels as one batch (builds in parallel, runs one
    after another, as MetaSchedule measures a batch of candidates) and commit each as an ordinary tuning
    record; each kernel's latency in ms (kernels without a default schedule or whose build or run
    failed are left out)."""
    import shutil

    from tvm.s_tir import Schedule
    from tvm.s_tir import meta_schedule as ms

    items = []
    for task in tasks:
        mod = task.dispatched[0]
        trace = default_trace(mod, target)
        if trace is None:
            continue
        sch = Schedule(mod)
        trace.apply_to_schedule(sch, remove_postproc=False)
        # as the task scheduler does: the arguments the built kernel takes (a repacked weight in its new layout)
        items.append((task, mod, trace, sch.mod, ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)))
    if not items:
        return {}
    built = builder.build([ms.builder.BuilderInput(sch_mod, target) for _, _, _, sch_mod, _ in items])
    device = "cuda" if target.kind.name == "cuda" else "cpu"
    ok = [(item, b) for item, b in zip(items, built) if b.error_msg is None and b.artifact_path is not None]
    try:
        futures = runner.run([ms.runner.RunnerInput(b.artifact_path, device, item[4]) for item, b in ok])
        results = [f.result() for f in futures]
    finally:
        for _, b in ok:
            shutil.rmtree(os.path.dirname(b.artifact_path), ignore_errors=True)
    out = {}
    for ((task, mod, trace, _, args_info), _), result in zip(ok, results):
        if result.error_msg is not None or not result.run_secs:
            continue
        workload = database.commit_workload(mod)
        database.commit_tuning_record(ms.database.TuningRecord(trace, workload, list(result.run_secs), target,
                                                               args_info))
        out[task.task_name] = float(sum(float(x) for x in result.run_secs) / len(result.run_secs)) * 1e3
    return out


def _is_conv_nhwc_space(trace: Any) -> bool:
    tiles = [i for i in trace.insts if i.kind.name == "SamplePerfectTile"]
    return _is_conv_nhwc(trace, [i for i in tiles if int(i.attrs[0]) == 4], [i for i in tiles if int(i.attrs[0]) == 2])


def _safe_default_tiles(trace: Any, lanes: int, cores: int = 1) -> Any:
    try:
        return _default_tiles(trace, lanes, cores)
    except Exception:
        return None


def _fusion_passes(target: Any) -> list[Any]:
    """Legalise and fuse as MetaSchedule's `compile_relax` does, then mark the constant (weight) inputs of
    every kernel as layout-free, so that a schedule may store them in the order its loops read them."""
    from tvm import relax
    from tvm.relax import pipeline as relax_pipeline

    try:
        dispatch = list(relax_pipeline.library_dispatch_passes(target))
    except (ValueError, AttributeError):
        dispatch = []
    return [
        *dispatch,
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        *([relax.transform.AttachAttrLayoutFreeBuffers()] if _prepack(target) else []),
    ]


def _prepack(target: Any) -> bool:
    """Weight pre-packing on CPU targets, unless GRAPHPRUNE_TVM_PREPACK=0 (for comparisons)."""
    return target.kind.name == "llvm" and os.environ.get("GRAPHPRUNE_TVM_PREPACK", "1") != "0"


def _fuse_for_tuning(mod: Any, target: Any) -> Any:
    """The same preparation `_compile` runs before applying the database, so keys match."""
    tvm = require_tvm()

    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.transform.Sequential(_fusion_passes(target))(cpu_layout(mod, target))


def _compile(database: Any, mod: Any, target: Any) -> Any:
    """MetaSchedule's `compile_relax` plus weight pre-packing: kernels whose schedule rewrote the layout of
    a weight (MetaSchedule's RewriteLayout post-processor, on the buffers `_fusion_passes` marks) get
    that weight in the new layout, computed once at build time (the weights are constants) instead of
    per inference."""
    tvm = require_tvm()
    from tvm import relax
    from tvm.relax import pipeline as relax_pipeline

    if target.kind.name != "llvm":
        from tvm.s_tir import meta_schedule as ms

        return ms.relax_integration.compile_relax(database, mod, target, None)
    try:
        lower = list(relax_pipeline.dataflow_lower_passes(target)) + list(relax_pipeline.finalize_passes(target))
    except (ValueError, AttributeError):  # what compile_relax falls back to for CPU targets in TVM 0.27
        t = relax.transform
        lower = [t.RewriteDataflowReshape(), t.ToNonDataflow(), t.RemovePurityChecking(), t.CallTIRRewrite(),
                 t.StaticPlanBlockMemory(), t.LowerAllocTensor(), t.KillAfterLastUse(), t.LowerRuntimeBuiltin(),
                 t.ComputePrimValue(), t.VMShapeLower(), t.AttachGlobalSymbol()]

    @tvm.transform.module_pass(opt_level=3)
    def pipeline(mod: Any, _ctx: Any) -> Any:
        mod = tvm.transform.Sequential(_fusion_passes(target))(mod)
        mod = relax.transform.MetaScheduleApplyDatabase()(mod)
        mod = tvm.transform.Sequential([relax.transform.SplitLayoutRewritePreproc(), relax.transform.FoldConstant(),
                                        relax.transform.DeadCodeElimination()])(mod)
        return tvm.transform.Sequential(lower)(mod)

    with target, database, tvm.transform.PassContext(opt_level=3):
        return relax.build(cpu_layout(mod, target), target=target, relax_pipeline=pipeline)


def open_database(db_dir: str | Path) -> Any:
    """JSON tuning database in `db_dir` (created if missing); reusable across runs and models."""
    require_tvm()
    from tvm.s_tir import meta_schedule as ms

    Path(db_dir).mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(db_dir), module_equality="structural")


@dataclass
class TuneResult:
    """What one tuning session did; `new_trials == 0` means the database already covered everything.

    `tuned_tasks` were tuned (or resumed) in this session, `reused_tasks` were complete in the database
    already; `stopped` says why tuning ended early ("time budget", or None when every task got its
    trials); `best_ms` holds the fastest measured run of each kernel that has records, `default_ms`
    the measured default schedule of each kernel that started its search in this session.
    """

    tasks: list[str]
    tuned_tasks: list[str]
    reused_tasks: list[str]
    new_trials: int
    db_records_before: int
    db_records_after: int
    seconds: float
    per_task_trials: dict[str, int] = field(default_factory=dict)
    best_ms: dict[str, float] = field(default_factory=dict)
    default_ms: dict[str, float] = field(default_factory=dict)
    stopped: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class RPCSpec:
    """Where a remote device is: a TVM RPC tracker address and the device key registered there."""

    tracker_host: str
    tracker_port: int
    key: str
    session_timeout_sec: int = 60


def _progress_callback(on_batch: Callable[..., None]) -> Any:
    """A MetaSchedule measure callback that reports each measured batch and its fastest run (ms), with
    the scheduler and task id so the receiver can end the task (a time budget)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class _Progress(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            name = str(task_scheduler.tasks_[task_id].ctx.task_name)
            runs = [float(sum(float(x) for x in r.run_secs) / len(r.run_secs)) * 1e3
                    for r in runner_results if r.error_msg is None and r.run_secs]
            on_batch(name, len(measure_candidates), min(runs) if runs else None, task_scheduler, task_id)

    return _Progress()


def _search_strategy(per_task: int) -> Any:
    """Evolutionary search sized to the budget: the default population (512, 50 random samples)
    costs ~30-60 s of search per kernel on 2 cores, which dominates small-budget tuning; with 16-32
    trials per kernel a population of 4x the trials generated a batch in 8-19 s per kernel on one core
    (the smoke test of benchmarks/tvm_device.sh), most of a batch's time."""
    from tvm.s_tir import meta_schedule as ms

    population = max(32, min(512, 4 * per_task))
    return ms.search_strategy.EvolutionarySearch(
        population_size=population,
        init_min_unmeasured=max(8, min(50, per_task)),
        genetic_num_iters=1 if per_task <= 32 else 2 if per_task < 64 else 4,
    )


# how each candidate is timed: REPEATS samples, each the mean of as many runs as fill MIN_REPEAT_MS (at least
# one); the database ranks candidates by the mean of the samples. One mean of 3 runs per candidate (TVM's
# default number=3, repeat=1 with min_repeat_ms=0, used until session 5) let one lucky sample among a kernel's
# candidates win: on 16 cores a 0.2 ms kernel varied by tens of percent between samples.
REPEATS = 5
MIN_REPEAT_MS = 2


def evaluator_config() -> Any:
    """The runner's timing protocol (see REPEATS): a few milliseconds per candidate, next to the ~0.3-1 s
    that building it takes."""
    from tvm.s_tir import meta_schedule as ms

    return ms.runner.EvaluatorConfig(number=1, repeat=REPEATS, min_repeat_ms=MIN_REPEAT_MS,
                                     enable_cpu_cache_flush=False)


def _runner(rpc: RPCSpec | None, target: Any) -> Any:
    from tvm.s_tir import meta_schedule as ms

    evaluator = evaluator_config()
    if rpc is None:
        return ms.runner.LocalRunner(timeout_sec=60, evaluator_config=evaluator, initializer=_worker_init)
    config = ms.runner.RPCConfig(
        tracker_host=rpc.tracker_host,
        tracker_port=rpc.tracker_port,
        tracker_key=rpc.key,
        session_timeout_sec=rpc.session_timeout_sec,
    )
    return ms.runner.RPCRunner(config, evaluator_config=evaluator, max_workers=1, initializer=_worker_init)


def _drop_unnamed_handlers(name: str) -> None:
    """MetaSchedule rebuilds its logging with dictConfig from the names of the handlers already on its
    logger and crashes on an unnamed one (e.g. one left by an earlier run in the same process)."""
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        if handler.get_name() is None:
            logger.removeHandler(handler)


STATE_FILE = "graphprune_tuning_state.json"


def _load_state(db_dir: Path) -> dict[str, dict]:
    """Per-kernel progress kept beside the MetaSchedule database (trials measured, finished or not)."""
    import json

    try:
        data = json.loads((db_dir / STATE_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_state(db_dir: Path, state: dict[str, dict]) -> None:
    import json

    tmp = db_dir / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    os.replace(tmp, db_dir / STATE_FILE)


def _workload_key(task: Any) -> str:
    """A kernel's identity across runs and models: the structural hash the database keys on."""
    require_tvm()
    from tvm_ffi import structural_hash

    return f"{structural_hash(task.dispatched[0]) & 0xFFFFFFFFFFFFFFFF:016x}"


def _task_flops(task: Any) -> float:
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return float(estimate_tir_flops(task.dispatched[0]))
    except Exception:
        return 0.0


def tune(
    mod: Any,
    target: Any,
    db_dir: str | Path,
    trials: int,
    *,
    trials_per_task: int | None = None,
    trials_per_iter: int = 16,
    time_budget_s: float | None = None,
    rpc: RPCSpec | None = None,
    retune: bool = False,
    on_start: Callable[[list[str], int], None] | None = None,
    on_trials: Callable[[str, int, float | None], None] | None = None,
    seed: int = 0,
    quiet: bool = True,
) -> TuneResult:
    """MetaSchedule-tune every fused kernel of `mod`, recording into the JSON database in `db_dir`.

    Kernels are tuned one per MetaSchedule call, heaviest first: with a single task the scheduler joins
    and commits each batch of candidates as soon as it is measured (with many tasks it only joins
    after dispatching every task once, so an early stop lost everything). A run that is stopped
    (Ctrl-C, SIGTERM, `time_budget_s`) keeps all but the batch in flight, and the next run resumes
    from the per-kernel counts in `graphprune_tuning_state.json`. A kernel without records starts with
    its default schedule (`default_trace`) as its first measured candidate (the defaults of all new kernels
    are built and timed as one batch), so its best record is
    never slower than the untuned default. With a time budget each kernel
    gets the share of the remaining time that its FLOPs have of the remaining work. Kernels already
    complete in the database are skipped (unless `retune`): a second run costs zero trials, and a
    pruned variant only tunes the kernels whose shapes changed.
    """
    require_tvm()
    from tvm.s_tir import meta_schedule as ms

    t0 = time.perf_counter()
    db_path = Path(db_dir)
    fused = _fuse_for_tuning(mod, target)
    extracted = ms.relax_integration.extract_tasks(fused, target)
    database = open_database(db_path)
    before = len(database)
    state = {} if retune else _load_state(db_path)
    keys = [_workload_key(t) for t in extracted]
    open_tasks = [k for k in keys if not _complete(state.get(k), trials_per_task)]
    per_task = trials_per_task or max(1, -(-trials // max(1, len(open_tasks))))
    todo, reused = [], []
    for task, key in zip(extracted, keys):
        entry = state.get(key)
        if entry is None and not retune and database.has_workload(task.dispatched[0]):
            # records without graphprune's state (an interrupted first batch, or an older database)
            records = database.get_top_k(database.commit_workload(task.dispatched[0]), 1 << 20)
            if records:
                entry = state[key] = {"task": task.task_name, "measured": len(records),
                                      "complete": len(records) >= per_task}
        (reused if _complete(entry, trials_per_task) else todo).append((task, key))
    names = [t.task_name for t in extracted]
    remaining = {key: max(0, per_task - int(state.get(key, {}).get("measured", 0))) for _, key in todo}
    todo.sort(key=lambda tk: -_task_flops(tk[0]) * tk[0].weight)
    if on_start:
        on_start([t.task_name for t, _ in todo], min(trials, sum(remaining.values())))
    counts: dict[str, int] = {}
    best: dict[str, float] = {}
    defaults: dict[str, float] = {}
    current: dict[str, str] = {}

    def _on_batch(name: str, n: int, best_ms: float | None, scheduler: Any = None, task_id: int = 0) -> None:
        counts[name] = counts.get(name, 0) + n
        if best_ms is not None:
            best[name] = min(best.get(name, best_ms), best_ms)
        entry = state.setdefault(current["key"], {"task": name, "measured": 0, "complete": False})
        entry["measured"] = int(entry.get("measured", 0)) + n
        _save_state(db_path, state)  # the records of this batch are in the database already
        if on_trials:
            on_trials(name, n, best.get(name))
        current["got"] = int(current.get("got", 0)) + n
        if current.get("deadline") is not None and time.perf_counter() >= current["deadline"] and scheduler \
                and not current.get("terminated") and current["got"] < int(current.get("allowed", 0)):
            # once, and only while trials are left: the batch in flight is joined after the termination and
            # reports here again, and a batch that uses up the call's trials is joined by MetaSchedule's final
            # loop, which then ends the task itself; MetaSchedule refuses to end a task twice (InternalError,
            # seen on the 16-core device run and in the device script's smoke test)
            current["terminated"] = True
            try:
                scheduler.terminate_task(task_id)
            except Exception:  # the task ended on its own (its trials done) in the same batch
                pass

    stopped = None
    if todo:
        _drop_unnamed_handlers("tvm.s_tir.meta_schedule")
        # MetaSchedule sizes its console handler from this logger's level and always logs everything
        # to files under <db>/logs: WARNING keeps its INFO lines and task tables off the terminal
        logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING if quiet else logging.INFO)
        num_cores = int(target.attrs.get("num-cores", default_num_cores()))
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            [t for t, _ in todo], str(db_path), strategy=_search_strategy(per_task), num_threads=num_cores,
            seed=seed,
        )
        builder = ms.builder.LocalBuilder(max_workers=num_cores, timeout_sec=120, initializer=_worker_init)
        runner = _runner(rpc, target)
        cost_model_kind = "xgb" if importlib.util.find_spec("xgboost") else "random"
        # the state is saved right after the database commit, before the (slow) cost-model update
        default_callbacks = list(ms.measure_callback.MeasureCallback.create("default"))
        callbacks = default_callbacks[:1] + [_progress_callback(_on_batch)] + default_callbacks[1:]
        budget_left = trials
        # the budget is for measuring; task extraction and search set-up above are not counted
        deadline = None if time_budget_s is None else time.perf_counter() + float(time_budget_s)
        work = [_task_flops(t) * t.weight for t, _ in todo]
        # kernels without any record yet: their default schedule is measured before the search
        fresh = {key for _, key in todo if not state.get(key, {}).get("measured")} if target.kind.name == "llvm" \
            else set()
        try:
            if fresh and (deadline is None or time.perf_counter() < deadline):
                # every kernel's default schedule first, as the first measured candidate of its search: one
                # build batch (in parallel) and one run batch for all kernels, not one round-trip per kernel
                # (state saved with the next batch; a run stopped before then recounts from the database)
                measured = _try_measure_defaults([t for t, k in todo if k in fresh], target, builder, runner,
                                                 database)
                for task, key in todo:
                    if key in fresh and measured.get(task.task_name) is not None:
                        name, default_ms = task.task_name, measured[task.task_name]
                        counts[name] = counts.get(name, 0) + 1
                        best[name] = min(best.get(name, default_ms), default_ms)
                        entry = state.setdefault(key, {"task": name, "measured": 0, "complete": False})
                        entry["measured"] = int(entry.get("measured", 0)) + 1
                        entry["default_ms"] = defaults[name] = default_ms
                        remaining[key] = max(0, remaining[key] - 1)
                        budget_left -= 1
                        if remaining[key] == 0:  # its one trial was the default
                            entry["complete"] = True
                        if on_trials:
                            on_trials(name, 1, best[name])
                _save_state(db_path, state)
            for i, ((task, key), ctx, weight) in enumerate(zip(todo, contexts, weights)):
                want = min(remaining[key], budget_left)
                if want <= 0:
                    continue
                now = time.perf_counter()
                if deadline is not None and now >= deadline:
                    stopped = "time budget"
                    break
                # each kernel gets the share of the time left that its FLOPs have of the work left
                share = work[i] / sum(work[i:]) if sum(work[i:]) > 0 else 1.0 / (len(todo) - i)
                current.update(key=key, deadline=None if deadline is None else now + (deadline - now) * share,
                               terminated=False)
                got_before = counts.get(task.task_name, 0)
                searched = want
                current.update(got=0, allowed=searched)
                if searched > 0 and not current["terminated"]:
                    ms.tune.tune_tasks(
                        tasks=[ctx], task_weights=[weight], work_dir=str(db_path), max_trials_global=searched,
                        max_trials_per_task=searched, num_trials_per_iter=min(trials_per_iter, searched),
                        builder=builder, runner=runner, database=database, cost_model=cost_model_kind,
                        measure_callbacks=callbacks, task_scheduler="round-robin",
                    )
                got = counts.get(task.task_name, 0) - got_before
                remaining[key] -= got
                budget_left -= got
                if got < want and not current["terminated"]:  # the search space is exhausted
                    remaining[key] = 0
                    state.setdefault(key, {"task": task.task_name, "measured": 0})["exhausted"] = True
                if remaining[key] <= 0:
                    state.setdefault(key, {"task": task.task_name, "measured": 0})["complete"] = True
                elif current["terminated"]:
                    stopped = "time budget"
                if got:
                    _save_state(db_path, state)
        except Exception as exc:
            raise GraphpruneError(f"tuning failed: {str(exc).strip().splitlines()[-1]}") from exc
    for (task, key) in todo:
        entry = state.get(key)
        if entry and entry.get("measured") and task.task_name not in best:
            top = database.get_top_k(database.commit_workload(task.dispatched[0]), 1)
            if top and top[0].run_secs:
                best[task.task_name] = float(sum(float(x) for x in top[0].run_secs) / len(top[0].run_secs)) * 1e3
    return TuneResult(
        tasks=names,
        tuned_tasks=[t.task_name for t, _ in todo if counts.get(t.task_name)],
        reused_tasks=[t.task_name for t, _ in reused],
        new_trials=sum(counts.values()),
        db_records_before=before,
        db_records_after=len(database),
        seconds=time.perf_counter() - t0,
        per_task_trials=counts,
        best_ms=best,
        default_ms=defaults,
        stopped=stopped,
    )


VERIFIED_FILE = "graphprune_verified.json"


def record_id(record: Any) -> str:
    """A tuning record's identity across runs: the hash of its schedule (trace). A verification made for
    one record does not hold for another one that later tuning makes the database's best."""
    import hashlib

    return hashlib.sha1(str(record.trace).encode()).hexdigest()[:16]


def model_key(keys: list[str]) -> str:
    """A model's identity for the verification file: its set of kernels (database keys)."""
    import hashlib

    return hashlib.sha1(",".join(sorted(set(keys))).encode()).hexdigest()[:16]


def load_verified(db_dir: str | Path, target: Any) -> dict[str, dict]:
    """The in-model verification choices kept beside the database for this target (`tvm_verify`):
    {"kernels": {key: {...}}, "models": {model_key: {...}}}; empty when none were made."""
    section = _read_verified(Path(db_dir) / VERIFIED_FILE).get("targets", {}).get(str(target), {})
    return {"kernels": dict(section.get("kernels", {})), "models": dict(section.get("models", {}))}


def _read_verified(path: Path) -> dict:
    """The whole verification file, or {} when it is missing or not one (then it is rewritten whole)."""
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and isinstance(data.get("targets"), dict) else {}


def save_verified(db_dir: str | Path, target: Any, kernels: dict[str, dict], models: dict[str, dict]) -> None:
    """Merge choices into the verification file (atomically: a reader sees the old or the new file)."""
    import json

    from graphprune.io import write_bytes_atomic

    path = Path(db_dir) / VERIFIED_FILE
    data = _read_verified(path)
    data.setdefault("version", 1)
    section = data.setdefault("targets", {}).setdefault(str(target), {"kernels": {}, "models": {}})
    section.setdefault("kernels", {}).update(kernels)
    section.setdefault("models", {}).update(models)
    write_bytes_atomic((json.dumps(data, indent=1, sort_keys=True) + "\n").encode(), path)


@dataclass
class KernelRecords:
    """One fused kernel of a model with its database key and the database's best record (None: no record)."""

    task: Any
    key: str
    record: Any

    @property
    def name(self) -> str:
        return str(self.task.task_name)


def best_records(mod: Any, target: Any, db_dir: str | Path | None) -> list[KernelRecords]:
    """Every fused kernel of `mod` with the best record `db_dir` holds for it (by mean measured time)."""
    require_tvm()
    from tvm.s_tir import meta_schedule as ms

    tasks = ms.relax_integration.extract_tasks(_fuse_for_tuning(mod, target), target)
    database = open_database(db_dir) if db_dir else None
    rows = []
    for task in tasks:
        top = []
        if database is not None and database.has_workload(task.dispatched[0]):
            top = database.get_top_k(database.commit_workload(task.dispatched[0]), 1)
        rows.append(KernelRecords(task, _workload_key(task), top[0] if top else None))
    return rows


def reverted_kernels(rows: list[KernelRecords], verified: dict[str, dict]) -> dict[str, str]:
    """Kernels whose best record the in-model verification found slower than the default schedule, for
    the record it checked (a newer best record is unverified): name -> why ("kernel": slower in the model;
    "model": the whole tuned model was slower than the default build, so all its records are set aside)."""
    keys = [r.key for r in rows]
    model = verified.get("models", {}).get(model_key(keys))
    out: dict[str, str] = {}
    current = {r.key: record_id(r.record) for r in rows if r.record is not None}
    if model and model.get("use") == "default" and model.get("records") == current:
        return {r.name: "model" for r in rows if r.record is not None}
    for r in rows:
        entry = verified.get("kernels", {}).get(r.key)
        if r.record is not None and entry and entry.get("use") == "default" and entry.get("record") == current[r.key]:
            out[r.name] = "kernel"
    return out


def kernel_coverage(mod: Any, target: Any, db_dir: str | Path | None) -> dict[str, Any]:
    """Which fused kernels of `mod` run a tuning record from `db_dir` and which run the default schedule:
    no record, or a record the in-model verification set aside (`kernels_reverted`, a subset of
    `kernels_default`); `kernels_unverified` have records that were never checked in a model."""
    rows = best_records(mod, target, db_dir)
    verified = load_verified(db_dir, target) if db_dir else {"kernels": {}, "models": {}}
    reverted = reverted_kernels(rows, verified)
    tuned = [r.name for r in rows if r.record is not None and r.name not in reverted]
    checked = verified.get("kernels", {})
    return {"kernels": len(rows), "kernels_tuned": len(tuned),
            "kernels_default": [r.name for r in rows if r.name not in tuned],
            "kernels_reverted": sorted(reverted),
            "kernels_unverified": [r.name for r in rows if r.name in tuned and
                                   checked.get(r.key, {}).get("record") != record_id(r.record)]}


def tuned_database(mod: Any, target: Any, db_dir: str | Path, verified: bool = True) -> Any:
    """The database `compile_tuned` applies: for every kernel of `mod` the best record in `db_dir`,
    except (with `verified`) those the in-model verification set aside, then the default schedule
    (`default_schedule_database`) for the rest on CPU targets."""
    require_tvm()
    from tvm.s_tir import meta_schedule as ms

    rows = best_records(mod, target, db_dir)
    skip = reverted_kernels(rows, load_verified(db_dir, target)) if verified else {}
    chosen = ms.database.MemoryDatabase(module_equality="structural")
    for r in rows:
        if r.record is not None and r.name not in skip:
            workload = chosen.commit_workload(r.task.dispatched[0])
            chosen.commit_tuning_record(ms.database.TuningRecord(r.record.trace, workload, r.record.run_secs,
                                                                 r.record.target, r.record.args_info))
    if target.kind.name == "llvm":
        return ms.database.OrderedUnionDatabase(chosen, default_schedule_database(target))
    return chosen


def compile_tuned(mod: Any, target: Any, db_dir: str | Path, verified: bool = True) -> Any:
    """Compile with the best schedules from the database; kernels without records get the default
    schedule of `default_schedule_database` (see `kernel_coverage` for which), and so do kernels whose
    record the in-model verification found slower than the default (`tvm_verify`; `verified=False`
    uses every best record as it is)."""
    return _compile(tuned_database(mod, target, db_dir, verified), mod, target)


def export_library(executable: Any, path: str | Path) -> Path:
    """Write a deployable shared library (needs a host C compiler, e.g. gcc)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        executable.export_library(str(path))
    except Exception as exc:
        raise GraphpruneError(f"cannot export {path}: {str(exc).strip().splitlines()[-1]}") from exc
    return path


def load_library(path: str | Path, target: Any) -> Any:
    """A Relax VM over an exported library, on the local device."""
    tvm = require_tvm()
    from tvm import relax

    return relax.VirtualMachine(tvm.runtime.load_module(str(path)), device_for(target))


def _vm(executable: Any, target: Any) -> Any:
    from tvm import relax

    return relax.VirtualMachine(executable, device_for(target))


def run_tvm(executable: Any, target: Any, feeds: dict[str, np.ndarray], input_order: list[str]) -> list[np.ndarray]:
    """Outputs of one inference as numpy arrays, inputs in graph order."""
    tvm = require_tvm()
    vm = _vm(executable, target)
    dev = device_for(target)
    out = vm["main"](*[tvm.runtime.tensor(feeds[n], dev) for n in input_order])
    return [o.numpy() for o in _flatten(out)]


def profile_kernels(executable: Any, target: Any, feeds: dict[str, np.ndarray], input_order: list[str],
                    runs: int = 20, warmup: int = 3, clock: str = "wall") -> dict[str, float]:
    """Time of every kernel in one inference (ms, local device): the median over `runs` inferences of
    the wall time of each call, summed over the kernel's calls in the inference. `clock="thread"`
    takes the calling thread's CPU time and the minimum over the runs instead: with one TVM thread the
    kernels run in the calling thread, and on a shared machine its CPU time does not count the time other
    processes held the core.

    Whole-model latency hides where a schedule loses; on a many-core CPU a kernel with too few
    parallel tasks, or a fixed cost per kernel, stands out here. Timing uses the VM's instrument hook
    (a Python call around every VM instruction), so per-kernel sums exceed the model's latency by a few
    microseconds per kernel; the VM's own builtins (allocation, tuples) are left out.
    """
    tvm = require_tvm()
    vm = _vm(executable, target)
    dev = device_for(target)
    args = [tvm.runtime.tensor(feeds[n], dev) for n in input_order]
    samples: dict[str, list[float]] = {}
    started: list[float] = [0.0]

    now = time.thread_time if clock == "thread" else time.perf_counter

    def instrument(func: Any, symbol: str, before: bool, ret: Any, *call_args: Any) -> int:
        if before:
            started[0] = now()
        elif not str(symbol).startswith("vm.builtin."):
            samples.setdefault(str(symbol), []).append(now() - started[0])
        return 0

    for _ in range(warmup):
        vm["main"](*args)
    vm.set_instrument(instrument)
    for _ in range(runs):
        vm["main"](*args)
    result = {}
    for symbol, times in samples.items():
        calls = len(times) // runs
        per_run = [sum(times[r * calls:(r + 1) * calls]) for r in range(runs)]
        result[symbol.removesuffix("_prepacked")] = float(min(per_run) if clock == "thread"
                                                          else np.median(per_run)) * 1e3
    return result


def parallel_extents(func: Any) -> list[int]:
    """Extents of the parallel loops of a scheduled kernel, outermost first: each is a fork-join over the
    thread pool whose iterations are split evenly (statically) among the threads."""
    import re

    text = re.sub(r"T\.int64\((\d+)\)", r"\1", func.script())
    return [int(x) for x in re.findall(r"T\.parallel\((\d+)", text)]


def kernel_parallelism(mod: Any, target: Any) -> list[dict[str, Any]]:
    """For every fused kernel of `mod` (as compiled, default schedule): its calls per inference, FLOPs, the
    extents of its parallel loops and its database key (equal keys share tuning records); a loop of extent T on C cores runs ceil(T / C) rounds of
    iterations, so T / (C * ceil(T / C)) of the cores' time is useful."""
    from tvm.s_tir import Schedule
    from tvm.s_tir import meta_schedule as ms

    rows = []
    for task in ms.relax_integration.extract_tasks(_fuse_for_tuning(mod, target), target):
        prim = task.dispatched[0]
        trace = default_trace(prim, target)
        extents: list[int] = []
        if trace is not None:
            sch = Schedule(prim)
            trace.apply_to_schedule(sch, remove_postproc=False)
            extents = parallel_extents(sch.mod["main"])
        rows.append({"kernel": task.task_name, "calls": int(task.weight), "flops": _task_flops(task),
                     "parallel": extents, "key": _workload_key(task)})
    return rows


def _flatten(out: Any) -> list[Any]:
    if hasattr(out, "numpy"):
        return [out]
    return [x for item in out for x in _flatten(item)]


def graph_input_names(model: onnx.ModelProto | str | Path) -> list[str]:
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    inits = {i.name for i in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name not in inits]


def check_against_ort(
    executable: Any, target: Any, model: onnx.ModelProto | str | Path, rtol: float = 1e-4, atol: float = 1e-4
) -> float:
    """Max abs difference between TVM and onnxruntime on random inputs; raises if out of tolerance."""
    from graphprune.backends.ort_backend import random_inputs, run_ort

    feeds = random_inputs(model)
    ref = run_ort(model, feeds)
    got = run_tvm(executable, target, feeds, graph_input_names(model))
    worst = 0.0
    for r, g in zip(ref, got):
        worst = max(worst, float(np.max(np.abs(r.astype(np.float64) - g.astype(np.float64)))) if r.size else 0.0)
        if not np.allclose(r, g, rtol=rtol, atol=atol):
            raise GraphpruneError(f"TVM output differs from onnxruntime (max abs diff {worst:.3g})")
    return worst


def _stats_from_evaluator(vm: Any, dev: Any, args: list[Any], runs: int, warmup: int) -> LatencyStats:
    for _ in range(warmup):
        vm["main"](*args)
    timer = vm.time_evaluator("main", dev, number=1, repeat=runs, min_repeat_ms=0)
    result = timer(*args)
    return LatencyStats.from_samples([s * 1e3 for s in result.results])


def measure_tvm(
    executable: Any,
    target: Any,
    feeds: dict[str, np.ndarray],
    input_order: list[str],
    runs: int = 50,
    warmup: int = 5,
    rpc: RPCSpec | None = None,
) -> LatencyStats:
    """Latency of a compiled model, locally or on the device behind an RPC tracker."""
    vm, dev, args = _vm_on_device(executable, target, feeds, input_order, rpc)
    return _stats_from_evaluator(vm, dev, args, runs, warmup)


def _vm_on_device(executable: Any, target: Any, feeds: dict[str, np.ndarray], input_order: list[str],
                  rpc: RPCSpec | None) -> tuple[Any, Any, list[Any]]:
    """A VM for the compiled model on the local device, or uploaded to the RPC device, and its inputs."""
    tvm = require_tvm()
    from tvm import relax

    if rpc is None:
        dev = device_for(target)
        vm = relax.VirtualMachine(executable, dev)
    else:
        remote = connect(rpc)
        with tempfile.TemporaryDirectory() as tmp:
            lib = Path(tmp) / "graphprune_model.so"
            export_library(executable, lib)
            remote.upload(str(lib))
            rexec = remote.load_module(lib.name)
        dev = device_for(target, remote)
        vm = relax.VirtualMachine(rexec, dev)
    return vm, dev, [tvm.runtime.tensor(feeds[n], dev) for n in input_order]


def single_run_timer(executable: Any, target: Any, feeds: dict[str, np.ndarray], input_order: list[str],
                     rpc: RPCSpec | None = None) -> Callable[[], float]:
    """A callable timing one inference (ms, measured on the device), for interleaved benchmarking."""
    vm, dev, args = _vm_on_device(executable, target, feeds, input_order, rpc)
    timer = vm.time_evaluator("main", dev, number=1, repeat=1, min_repeat_ms=0)
    return lambda: float(timer(*args).results[0]) * 1e3


def connect(rpc: RPCSpec) -> Any:
    """An RPC session to the device registered at the tracker under `rpc.key`."""
    require_tvm()
    from tvm import rpc as tvm_rpc

    try:
        tracker = tvm_rpc.connect_tracker(rpc.tracker_host, rpc.tracker_port)
        return tracker.request(rpc.key, priority=1, session_timeout=rpc.session_timeout_sec)
    except Exception as exc:
        raise GraphpruneError(
            f"cannot reach RPC device {rpc.key!r} via tracker {rpc.tracker_host}:{rpc.tracker_port}: "
            f"{str(exc).strip().splitlines()[-1]}"
        ) from exc


def parse_tracker(address: str, key: str) -> RPCSpec:
    """'host:port' -> RPCSpec."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise GraphpruneError(f"--rpc-tracker must look like host:port, got {address!r}")
    return RPCSpec(host, int(port), key)


@contextlib.contextmanager
def local_rpc(key: str = "graphprune-local") -> Iterator[RPCSpec]:
    """An RPC tracker plus one server on localhost: stands in for an edge device in tests and demos."""
    require_tvm()
    from tvm.rpc.server import Server
    from tvm.rpc.tracker import Tracker

    tracker = Tracker(host="127.0.0.1", port=9190, port_end=9990, silent=True)
    server = Server(
        host="127.0.0.1",
        port=9990,
        port_end=10990,
        tracker_addr=(tracker.host, tracker.port),
        key=key,
        silent=True,
    )
    try:
        _wait_for_server(RPCSpec(tracker.host, tracker.port, key))
        yield RPCSpec(tracker.host, tracker.port, key)
    finally:
        server.terminate()
        tracker.terminate()


def _wait_for_server(rpc: RPCSpec, timeout_s: float = 30.0) -> None:
    from tvm import rpc as tvm_rpc

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            summary = tvm_rpc.connect_tracker(rpc.tracker_host, rpc.tracker_port).summary()
            if any(q.get("free", 0) for k, q in summary.get("queue_info", {}).items() if k == rpc.key):
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise GraphpruneError(f"local RPC server {rpc.key!r} did not register with the tracker in {timeout_s:.0f} s")
