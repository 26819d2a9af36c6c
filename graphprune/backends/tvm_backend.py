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


def make_target(name: str = "llvm", num_cores: int | None = None, mcpu: str | None = None) -> Any:
    """Build a TVM target from a short name, failing with a plain message when it is unavailable."""
    tvm = require_tvm()
    if name == "llvm":
        if not tvm.runtime.enabled("llvm"):
            raise GraphpruneError("target 'llvm' is unavailable: this TVM build has no LLVM code generator")
        spec: dict[str, Any] = {"kind": "llvm", "num-cores": int(num_cores or default_num_cores())}
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

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    try:
        return from_onnx(proto, keep_params_in_input=False)
    except Exception as exc:  # the frontend raises many types
        raise GraphpruneError(f"TVM cannot import the model: {str(exc).splitlines()[0]}") from exc


def compile_untuned(mod: Any, target: Any) -> Any:
    """Default Relax pipeline, no tuning: fast to build, slow to run on CPU."""
    tvm = require_tvm()
    with tvm.transform.PassContext(opt_level=3):
        return tvm.compile(mod, target=target)


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
    """What one tuning session did; `new_trials == 0` means the database already covered everything."""

    tasks: list[str]
    tuned_tasks: list[str]
    reused_tasks: list[str]
    new_trials: int
    db_records_before: int
    db_records_after: int
    seconds: float
    per_task_trials: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class RPCSpec:
    """Where a remote device is: a TVM RPC tracker address and the device key registered there."""

    tracker_host: str
    tracker_port: int
    key: str
    session_timeout_sec: int = 60


def _progress_callback(on_trials: Callable[[str, int], None]) -> Any:
    """A MetaSchedule measure callback that reports each batch of measured candidates."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class _Progress(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            name = str(task_scheduler.tasks_[task_id].ctx.task_name)
            on_trials(name, len(measure_candidates))

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


def tune(
    mod: Any,
    target: Any,
    db_dir: str | Path,
    trials: int,
    *,
    trials_per_task: int | None = None,
    trials_per_iter: int = 16,
    rpc: RPCSpec | None = None,
    retune: bool = False,
    on_start: Callable[[list[str], int], None] | None = None,
    on_trials: Callable[[str, int], None] | None = None,
    seed: int = 0,
    quiet: bool = True,
) -> TuneResult:
    """MetaSchedule-tune every fused kernel of `mod`, recording into the JSON database in `db_dir`.

    Kernels already in the database are skipped (unless `retune`), so a second run on the same
    model costs zero new trials and a pruned variant only tunes the kernels whose shapes changed.
    """
    require_tvm()
    from tvm.s_tir import meta_schedule as ms

    t0 = time.perf_counter()
    fused = _fuse_for_tuning(mod, target)
    extracted = ms.relax_integration.extract_tasks(fused, target)
    database = open_database(db_dir)
    before = len(database)
    todo, reused = [], []
    for task in extracted:
        done = database.has_workload(task.dispatched[0]) and database.get_top_k(
            database.commit_workload(task.dispatched[0]), 1
        )
        (reused if done and not retune else todo).append(task)
    names = [t.task_name for t in extracted]
    budget = trials if todo else 0
    per_task = trials_per_task or max(1, -(-trials // max(1, len(todo))))
    if on_start:
        on_start([t.task_name for t in todo], min(budget, per_task * len(todo)))
    counts: dict[str, int] = {}

    def _count(name: str, n: int) -> None:
        counts[name] = counts.get(name, 0) + n
        if on_trials:
            on_trials(name, n)

    if todo:
        _drop_unnamed_handlers("tvm.s_tir.meta_schedule")
        # MetaSchedule sizes its console handler from this logger's level and always logs everything
        # to files under <db>/logs: WARNING keeps its INFO lines and task tables off the terminal
        logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING if quiet else logging.INFO)
        work_dir = str(db_dir)
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            todo, work_dir, strategy=_search_strategy(per_task), num_threads=int(target.attrs.get("num-cores", default_num_cores())), seed=seed
        )
        builder = ms.builder.LocalBuilder(
            max_workers=int(target.attrs.get("num-cores", 1)), timeout_sec=120, initializer=_worker_init
        )
        cost_model = "xgb" if importlib.util.find_spec("xgboost") else "random"
        callbacks = list(ms.measure_callback.MeasureCallback.create("default")) + [_progress_callback(_count)]
        try:
            ms.tune.tune_tasks(
                tasks=contexts,
                task_weights=weights,
                work_dir=work_dir,
                max_trials_global=budget,
                max_trials_per_task=per_task,
                num_trials_per_iter=min(trials_per_iter, per_task),
                builder=builder,
                runner=_runner(rpc, target),
                database=database,
                cost_model=cost_model,
                measure_callbacks=callbacks,
            )
        except Exception as exc:
            raise GraphpruneError(f"tuning failed: {str(exc).strip().splitlines()[-1]}") from exc
    return TuneResult(
        tasks=names,
        tuned_tasks=[t.task_name for t in todo],
        reused_tasks=[t.task_name for t in reused],
        new_trials=sum(counts.values()),
        db_records_before=before,
        db_records_after=len(database),
        seconds=time.perf_counter() - t0,
        per_task_trials=counts,
    )


def compile_tuned(mod: Any, target: Any, db_dir: str | Path) -> Any:
    """Compile with the best schedules from the database; kernels without records use defaults."""
    require_tvm()
    from tvm.s_tir import meta_schedule as ms

    return ms.relax_integration.compile_relax(open_database(db_dir), mod, target, None)


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
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
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
