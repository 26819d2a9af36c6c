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
    from tvm.s_tir import meta_schedule as ms

    return ms.relax_integration.compile_relax(default_schedule_database(target), mod, target, None)


AVX512_CPUS = ("avx512", "knl", "knm", "cannonlake", "icelake", "tigerlake", "cooperlake", "cascadelake",
               "sapphirerapids", "emeraldrapids", "graniterapids", "rocketlake", "alderlake-avx512", "znver4",
               "znver5", "diamondrapids")


def vector_lanes(target: Any) -> int:
    """float32 lanes of the target's widest vector unit: 16 with AVX-512, else 8 (AVX2)."""
    mcpu = str(target.attrs.get("mcpu", "") or "")
    return 16 if any(key in mcpu for key in AVX512_CPUS) else 8


def _largest_divisor(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _default_tiles(trace: Any, lanes: int) -> Any:
    """Replace a design space's sampled tile sizes by fixed, usually good ones.

    MetaSchedule's CPU multi-level tiling splits every spatial loop in four (outer parallel tiles
    first, the innermost last) and every reduction loop in two. A random sample of those sizes
    rarely vectorises (innermost tile 1) and was measured ~2.7x slower than these rules on
    resnet18: the innermost spatial loop (output width, or the matmul's columns) gets a vector of
    `lanes`, the output-channel loop (third from last spatial loop; the rows of a matmul) a register
    block of 4 in the innermost tile, reductions an inner tile of up to 8, and what remains of
    every spatial loop goes to the outer, parallel tiles.
    """
    tiles = [i for i in trace.insts if i.kind.name == "SamplePerfectTile"]
    spatial = [i for i in tiles if int(i.attrs[0]) == 4]
    reduce_ = [i for i in tiles if int(i.attrs[0]) == 2]
    decisions = trace.decisions
    extent = {i: int(np.prod([int(x) for x in decisions[i]])) for i in tiles}
    chosen: dict[Any, Any] = {}
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
    for trace in (_safe_default_tiles(spaces[0].trace, vector_lanes(target)), spaces[0].trace):
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


def _try_measure_default(task: Any, target: Any, builder: Any, runner: Any, database: Any) -> float | None:
    """`_measure_default`, with any failure meaning "no default record" (the search still runs)."""
    try:
        return _measure_default(task, target, builder, runner, database)
    except Exception as exc:
        logging.getLogger(__name__).warning("default schedule of %s not measured: %s", task.task_name,
                                            str(exc).strip().splitlines()[-1] if str(exc).strip() else exc)
        return None


def _measure_default(task: Any, target: Any, builder: Any, runner: Any, database: Any) -> float | None:
    """Build and time a kernel's default schedule with the tuner's own builder and runner, and commit
    it to the database as an ordinary tuning record; its latency in ms, or None when the kernel
    has no default schedule (GraphpruneError when it fails to build or run).

    Committed first, it is the record every tuned candidate has to beat (the database's best
    record is what `compile_tuned` uses), and the evolutionary search, which seeds each population
    from the database's best records, starts from it.
    """
    import shutil

    from tvm.s_tir import Schedule
    from tvm.s_tir import meta_schedule as ms

    mod = task.dispatched[0]
    trace = default_trace(mod, target)
    if trace is None:
        return None
    sch = Schedule(mod)
    trace.apply_to_schedule(sch, remove_postproc=False)
    args_info = ms.arg_info.ArgInfo.from_prim_func(sch.mod["main"])
    (built,) = builder.build([ms.builder.BuilderInput(sch.mod, target)])
    if built.error_msg is not None or built.artifact_path is None:
        raise GraphpruneError(f"build failed: {built.error_msg}")
    device = "cuda" if target.kind.name == "cuda" else "cpu"
    try:
        (future,) = runner.run([ms.runner.RunnerInput(built.artifact_path, device, args_info)])
        result = future.result()
    finally:
        shutil.rmtree(os.path.dirname(built.artifact_path), ignore_errors=True)
    if result.error_msg is not None or not result.run_secs:
        raise GraphpruneError(f"run failed: {result.error_msg}")
    workload = database.commit_workload(mod)
    database.commit_tuning_record(ms.database.TuningRecord(trace, workload, list(result.run_secs), target,
                                                           args_info))
    return float(sum(float(x) for x in result.run_secs) / len(result.run_secs)) * 1e3


def _safe_default_tiles(trace: Any, lanes: int) -> Any:
    try:
        return _default_tiles(trace, lanes)
    except Exception:
        return None


def _fuse_for_tuning(mod: Any, target: Any) -> Any:
    """The same preparation `compile_relax` runs before applying the database, so keys match."""
    tvm = require_tvm()
    from tvm import relax
    from tvm.relax import pipeline as relax_pipeline

    try:
        dispatch = list(relax_pipeline.library_dispatch_passes(target))
    except (ValueError, AttributeError):
        dispatch = []
    seq = [
        *dispatch,
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]
    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.transform.Sequential(seq)(mod)


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
    costs ~30-60 s of search per kernel on 2 cores, which dominates small-budget tuning."""
    from tvm.s_tir import meta_schedule as ms

    population = max(32, min(512, 8 * per_task))
    return ms.search_strategy.EvolutionarySearch(
        population_size=population,
        init_min_unmeasured=max(8, min(50, 2 * per_task)),
        genetic_num_iters=2 if per_task < 64 else 4,
    )


def _runner(rpc: RPCSpec | None, target: Any) -> Any:
    from tvm.s_tir import meta_schedule as ms

    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=0, enable_cpu_cache_flush=False)
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
    its default schedule (`default_trace`) as its first measured candidate, so its best record is
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
    open_tasks = [k for k in keys if not state.get(k, {}).get("complete")]
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
        (reused if entry and entry.get("complete") else todo).append((task, key))
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
        if current.get("deadline") is not None and time.perf_counter() >= current["deadline"] and scheduler:
            current["terminated"] = True
            scheduler.terminate_task(task_id)

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
                if key in fresh:
                    # the default schedule is the kernel's first measured candidate: tuning can only improve
                    # on it, and the search starts from it. Its state is saved with the next batch or at the
                    # kernel's end (a run stopped before then recounts it from the database on resume).
                    default_ms = _try_measure_default(task, target, builder, runner, database)
                    if default_ms is not None:
                        name = task.task_name
                        counts[name] = counts.get(name, 0) + 1
                        best[name] = min(best.get(name, default_ms), default_ms)
                        entry = state.setdefault(key, {"task": name, "measured": 0, "complete": False})
                        entry["measured"] = int(entry.get("measured", 0)) + 1
                        entry["default_ms"] = defaults[name] = default_ms
                        if on_trials:
                            on_trials(name, 1, best[name])
                        if current["deadline"] is not None and time.perf_counter() >= current["deadline"]:
                            current["terminated"] = True
                searched = want - (counts.get(task.task_name, 0) - got_before)
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


def kernel_coverage(mod: Any, target: Any, db_dir: str | Path | None) -> dict[str, Any]:
    """Which fused kernels of `mod` have tuning records in `db_dir` and which run a default schedule."""
    require_tvm()
    from tvm.s_tir import meta_schedule as ms

    tasks = ms.relax_integration.extract_tasks(_fuse_for_tuning(mod, target), target)
    database = open_database(db_dir) if db_dir else None
    tuned = [t.task_name for t in tasks if database is not None and database.has_workload(t.dispatched[0])
             and database.get_top_k(database.commit_workload(t.dispatched[0]), 1)]
    return {"kernels": len(tasks), "kernels_tuned": len(tuned),
            "kernels_default": [t.task_name for t in tasks if t.task_name not in tuned]}


def compile_tuned(mod: Any, target: Any, db_dir: str | Path) -> Any:
    """Compile with the best schedules from the database; kernels without records get the default
    schedule of `default_schedule_database` (see `kernel_coverage` for which)."""
    require_tvm()
    from tvm.s_tir import meta_schedule as ms

    database = open_database(db_dir)
    if target.kind.name == "llvm":
        database = ms.database.OrderedUnionDatabase(database, default_schedule_database(target))
    return ms.relax_integration.compile_relax(database, mod, target, None)


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
