"""The pruning pipeline: named passes over one `PruneState`, run in order by a `PassManager`.

Why this shape: pruning an ONNX model and pruning an nn.Module are the same sequence (lower to the
IR, analyse, read calibration data, plan, rewrite, recover, validate, measure, report); only a few
steps touch the model format, and those live on an adapter (graphprune/adapters/). Everything else
is written once, as a `Pass`, and a pipeline is just a list of them: readable in one place
(`graphprune.passes.stages.default_passes`), extensible by inserting or replacing passes, and timed,
reported and error-wrapped by one manager instead of by hand in every entry point.

This module holds only the data and the machinery; it imports no pass, adapter or framework, so
everything above it (passes, adapters, api, cli) can depend on it without cycles.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from graphprune.analysis.context import DEFAULT_NORM_CHANNELS
from graphprune.analysis.groups import Analysis
from graphprune.analysis.plan import Plan
from graphprune.errors import GraphpruneError, first_line
from graphprune.ir.graph import Graph

Progress = Callable[[str], None]


def _quiet(_msg: str) -> None:
    return None


@dataclass
class PruneOptions:
    """What the user asked for, checked once before any pass runs (passes only read it)."""

    target_kind: str | None = None  # "macs", "params" or "latency"; None when `removed` is given
    target: float | None = None  # fraction of the cost to keep
    method: str = "l1"
    strategy: str = "speed"  # global importance order, scaled by MACs saved per estimated time saved
    round_to: int | str = "auto"  # "auto": the channel multiple measured fast on `hardware`
    hardware: str = "ort-cpu"  # whose channel table round_to="auto" reads
    measure: bool = True  # time original vs pruned (ONNX: onnxruntime) and report the speed-up
    min_speedup: float | None = None  # a measured speed-up below this is SpeedupNotMet
    ignore: tuple[str, ...] = ()
    # "freeze": channels a LayerNorm normalises over are kept; "prune": prunable, the norm's statistics
    # then taken over the kept channels (ONNX models; the masked reference does the same)
    norm_channels: str = DEFAULT_NORM_CHANNELS
    seed: int = 0
    input_shape: dict[str, tuple[int, ...]] | None = None
    scores: dict[int, float] | None = None  # the user's own importance (skips scoring)
    removed: frozenset[int] | None = None  # an explicit plan (skips scoring and allocation)
    allow_floor: bool = False  # a target below the floor keeps the floor instead of failing
    strict_method: bool = False  # a method that cannot score every group fails instead of falling back
    input_values: dict[str, float] | None = None  # fixed inputs of the validation feed
    calibration: Any = None  # calibration data (arrays, dict, iterable, .npz, image folder)
    calib_samples: int | None = None
    calib_preprocess: Any = None  # graphprune.calib.ImagePreprocess for an image folder
    recover: str | None = None  # "none", "bias" or "lsq"; None: lsq with calibration data (none for di)
    recover_options: dict[str, Any] = field(default_factory=dict)
    method_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class PruneState:
    """Everything a pass reads or produces. Passes fill it in order; nothing is bolted on elsewhere."""

    source: Any  # what the user passed: a path, a ModelProto or an nn.Module
    adapter: Any  # graphprune.adapters.OnnxAdapter or TorchAdapter
    options: PruneOptions
    example_inputs: Any = None
    progress: Progress = _quiet
    source_label: str | None = None  # how the report names the source
    lowered: Any = None  # the adapter's handle: LoadedModel (ONNX) or TracedModule (PyTorch)
    original: Any = None  # the model recovery compares against (PyTorch: an untouched module)
    graph: Graph | None = None
    analysis: Analysis | None = None
    cost_kind: str | None = None  # the cost the plan targets (differs from the option once latency is registered)
    round_to: int | dict[int, int] | None = None  # channel multiple(s) allocation keeps (per group for "auto")
    round_info: dict[str, Any] = field(default_factory=dict)  # what the report says about round_to
    # calibration: the loaded samples split into fit/held-out, the recovery knobs, channel statistics
    calibration: Any = None  # graphprune.calib.CalibrationSplit
    recover_options: Any = None  # graphprune.recovery.RecoverOptions
    stats: Any = None  # passes.act_importance.ChannelStats of the ORIGINAL model
    scores: dict[int, float] | None = None
    coverage: dict[str, Any] | None = None  # which groups the method scored (passes.methods.method_coverage)
    protected: dict[int, str] = field(default_factory=dict)  # classes --ignore keeps, and why
    plan: Plan | None = None
    warnings: list[str] = field(default_factory=list)  # reported, and printed by the CLI on stderr
    slim: Any = None
    recovered: bool = False  # recovery changed kept weights: the slim model no longer equals the masked original
    feed: Any = None  # the validation inputs, reused by measurement
    latency: dict[str, Any] | None = None  # measured original vs pruned (a latency fit measures while planning)
    report: dict[str, Any] = field(default_factory=dict)  # entries passes add; the report pass merges them
    times: dict[str, float] = field(default_factory=dict)
    passes_run: list[tuple[str, float]] = field(default_factory=list)  # (pass name, seconds), in run order

    def say(self, message: str) -> None:
        self.progress(message)

    def need(self, *names: str) -> None:
        """Fail clearly when a pass runs before the passes that produce what it reads."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise GraphpruneError(f"needs {', '.join(missing)}, which no earlier pass produced")


class Pass:
    """One named pipeline stage. Subclasses set `name` and implement `run`.

    `message` is what the progress line shows while it runs; `time_key` is the report's `time`
    entry it is counted under (several passes may share one: scoring and allocation go to plan_s).
    """

    name: str = "pass"
    message: str | None = None
    time_key: str | None = None

    def run(self, state: PruneState) -> PruneState:
        raise NotImplementedError

    def describe(self, state: PruneState) -> str | None:
        return self.message

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


class FunctionPass(Pass):
    """A pass from a plain function `fn(state) -> state | None` (for user pipelines and tests)."""

    def __init__(self, name: str, fn: Callable[[PruneState], PruneState | None], message: str | None = None,
                 time_key: str | None = None) -> None:
        self.name, self.fn, self.message, self.time_key = name, fn, message, time_key

    def run(self, state: PruneState) -> PruneState:
        out = self.fn(state)
        return state if out is None else out


class Instrument:
    """Hooks around every pass (timing, progress); the manager calls them in order."""

    def before(self, p: Pass, state: PruneState) -> None:
        return None

    def after(self, p: Pass, state: PruneState, seconds: float) -> None:
        return None


class ProgressInstrument(Instrument):
    """Drives the one progress callback: each pass's message as it starts."""

    def before(self, p: Pass, state: PruneState) -> None:
        msg = p.describe(state)
        if msg:
            state.say(msg)


class TimingInstrument(Instrument):
    """Adds each pass's wall time to state.times under its time_key (or `<name>_s`)."""

    def after(self, p: Pass, state: PruneState, seconds: float) -> None:
        key = p.time_key or f"{p.name}_s"
        state.times[key] = state.times.get(key, 0.0) + seconds


class PassManager:
    """Runs passes in order; an unexpected failure becomes one GraphpruneError naming the pass.

    A GraphpruneError from a pass is already a user-facing message and goes through unchanged.
    After the last pass the total time is recorded and, when a report exists, its `time` entry
    is filled in, so the report covers every pass that ran.
    """

    def __init__(self, passes: Sequence[Pass], instruments: Sequence[Instrument] | None = None) -> None:
        bad = [p for p in passes if not getattr(p, "name", None) or not callable(getattr(p, "run", None))]
        if bad:
            raise GraphpruneError(f"not a pass (needs a name and run(state)): {bad[0]!r}")
        self.passes = list(passes)
        self.instruments = list(instruments) if instruments is not None else [ProgressInstrument(), TimingInstrument()]

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def run(self, state: PruneState) -> PruneState:
        start = time.perf_counter()
        for p in self.passes:
            for ins in self.instruments:
                ins.before(p, state)
            t = time.perf_counter()
            try:
                out = p.run(state)
            except (GraphpruneError, KeyboardInterrupt):
                raise
            except Exception as exc:
                before = [name for name, _ in state.passes_run]
                done = f" (after {', '.join(before)})" if before else ""
                raise GraphpruneError(
                    f"internal error in pass {p.name}{done}: {type(exc).__name__}: {first_line(exc)}"
                ) from exc
            if not isinstance(out, PruneState):
                raise GraphpruneError(f"internal error: pass {p.name} returned {type(out).__name__}, not the state")
            state = out
            seconds = time.perf_counter() - t
            state.passes_run.append((p.name, seconds))
            for ins in self.instruments:
                ins.after(p, state, seconds)
        state.times["total_s"] = time.perf_counter() - start
        if state.report:
            state.report["time"] = {k: round(v, 4) for k, v in state.times.items()}
            state.report["passes"] = [{"name": name, "s": round(s, 4)} for name, s in state.passes_run]
        return state
