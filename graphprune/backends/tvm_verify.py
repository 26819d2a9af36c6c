"""Tuned is never slower than untuned: check tuning records in the model they were tuned for.

MetaSchedule measures each candidate alone, a few runs on a warm cache, and keeps the fastest. On the
16-core device run of session 5 the tuned slim ran 16% slower than its default schedule: the winner of
a handful of noisy isolated measurements (one mean of 3 runs per candidate, measured while a second tuner
shared the socket) need not be faster where it counts, in the model. So after tuning, the default-schedule
build and the tuned build are profiled kernel by kernel in interleaved rounds, on the cores that will run
the model; a kernel whose tuned schedule is slower than its default (beyond `tolerance`) gets its default
schedule back, and if the tuned model as a whole is still slower than the default build, every record of
that model is set aside. The choice is kept beside the database (`tvm_backend.VERIFIED_FILE`, per target
and per record: a newer best record is checked again), so later builds apply it without profiling.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from graphprune.backends import tvm_backend as tb


@dataclass
class Verification:
    """What the in-model check decided for one model.

    `kept`: kernels whose tuned record stays (faster than, or within `tolerance` of, the default schedule in
    the model); `reverted`: set aside, the default schedule runs instead (all of them when `model_fallback`);
    `same_as_default`: the best record IS the default schedule (nothing to compare); `untuned`: no record.
    `kernel_ms` holds each compared kernel's in-model time (median over rounds) under both schedules,
    `model_ms` the whole model's latency as the default build, the tuned build and the verified build.
    `reused`: every choice came from the verification file, nothing was profiled.
    """

    kernels: int
    kept: list[str] = field(default_factory=list)
    reverted: list[str] = field(default_factory=list)
    same_as_default: list[str] = field(default_factory=list)
    untuned: list[str] = field(default_factory=list)
    kernel_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    model_ms: dict[str, float] = field(default_factory=dict)
    model_fallback: bool = False
    reused: bool = False
    tolerance: float = 0.03
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def summary(self) -> str:
        """One line for people: how many kernels run tuned records, how many went back to the default."""
        text = (f"{len(self.kept)} kernel(s) keep tuned records, {len(self.reverted)} reverted to the default "
                f"schedule (slower in the model), {len(self.same_as_default)} whose best record is the default "
                f"schedule, {len(self.untuned)} without records")
        if self.model_fallback:
            text += "; the tuned model was slower than the default build: every record set aside"
        return text + (" (choice reused from the database folder)" if self.reused else "")


def _interleaved(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[Any]]:
    """Each callable once per round, in turn: machine noise hits all alike."""
    out: dict[str, list[Any]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            out[name].append(fn())
    return out


def _model_ms(executables: dict[str, Any], target: Any, feeds: dict, order: list[str], runs: int,
              rounds: int) -> dict[str, float]:
    """Whole-model latency of each build: the median over `rounds` interleaved rounds of the median of `runs`."""
    timers = {}
    for name, ex in executables.items():
        vm, dev, args = tb._vm_on_device(ex, target, feeds, order, None)
        vm["main"](*args)
        evaluator = vm.time_evaluator("main", dev, number=1, repeat=runs, min_repeat_ms=0)
        timers[name] = (lambda ev=evaluator, a=args: float(np.median(ev(*a).results)) * 1e3)
    return {name: float(np.median(v)) for name, v in _interleaved(timers, rounds).items()}


def _kernel_ms(executables: dict[str, Any], target: Any, feeds: dict, order: list[str], runs: int,
               rounds: int) -> dict[str, dict[str, float]]:
    """Each kernel's in-model time per build (`tvm_backend.profile_kernels`), median over interleaved rounds."""
    profiles = _interleaved({name: (lambda ex=ex: tb.profile_kernels(ex, target, feeds, order, runs=runs,
                                                                     warmup=2))
                             for name, ex in executables.items()}, rounds)
    return {name: {k: float(np.median([p.get(k, np.nan) for p in per_round])) for k in per_round[0]}
            for name, per_round in profiles.items()}


def verify_tuned(mod: Any, target: Any, db_dir: str | Path, feeds: dict, order: list[str], *, rounds: int = 5,
                 runs: int = 20, tolerance: float = 0.03, force: bool = False, default_ex: Any = None,
                 tuned_ex: Any = None, on_step: Callable[[str], None] | None = None) -> tuple[Verification, Any]:
    """Check `db_dir`'s best records for `mod` in the model on this machine, keep the choice beside the
    database, and return it with the executable `compile_tuned` now builds (None when nothing was
    compiled: the choice was reused, or no kernel has a record that differs from its default schedule).

    Kernels are compared by their in-model time (`profile_kernels`, median over `rounds` interleaved
    rounds of `runs` inferences each) under the default-schedule build and the tuned build; a kernel is
    reverted when tuned > default * (1 + tolerance). Then the default build and the verified build are
    timed whole, interleaved; if the verified build is still slower than the default beyond `tolerance`,
    every record of the model is set aside (a kernel's time also depends on what ran before it: caches,
    threads). `force` re-checks records that were checked before. `default_ex`, `tuned_ex`: the
    default-schedule build and `compile_tuned(..., verified=False)`, when the caller has them already.
    """
    t0 = time.perf_counter()
    say = on_step or (lambda _msg: None)
    rows = tb.best_records(mod, target, db_dir)
    result = Verification(kernels=len(rows), tolerance=tolerance)
    result.untuned = [r.name for r in rows if r.record is None]
    recorded = [r for r in rows if r.record is not None]
    defaults = {r.key: tb.default_trace(r.task.dispatched[0], target) for r in recorded}
    differ = [r for r in recorded if defaults[r.key] is None or str(defaults[r.key]) != str(r.record.trace)]
    result.same_as_default = [r.name for r in recorded if r not in differ]
    ids = {r.key: tb.record_id(r.record) for r in recorded}
    mkey = tb.model_key([r.key for r in rows])
    known = tb.load_verified(db_dir, target)
    model_entry = known["models"].get(mkey)
    if not force and model_entry and model_entry.get("records") == ids and \
            all(known["kernels"].get(r.key, {}).get("record") == ids[r.key] for r in differ):
        reverted = tb.reverted_kernels(rows, known)
        result.reverted = [r.name for r in differ if r.name in reverted]
        result.kept = [r.name for r in differ if r.name not in reverted]
        result.model_fallback = model_entry.get("use") == "default"
        if result.model_fallback:
            result.same_as_default = []
            result.reverted = [r.name for r in recorded]
        result.model_ms = dict(model_entry.get("model_ms", {}))
        result.reused = True
        result.seconds = time.perf_counter() - t0
        return result, None
    kernels: dict[str, dict] = {r.key: {"task": r.name, "record": ids[r.key], "use": "tuned"} for r in recorded}
    models = {mkey: {"records": ids, "use": "tuned"}}
    verified_ex = None
    if differ:
        say("building the default-schedule and the tuned model")
        default_ex = default_ex if default_ex is not None else tb.compile_untuned(mod, target)
        tuned_ex = tuned_ex if tuned_ex is not None else tb.compile_tuned(mod, target, db_dir, verified=False)
        say(f"profiling {len(differ)} tuned kernel(s) in the model, {rounds} interleaved rounds")
        times = _kernel_ms({"default": default_ex, "tuned": tuned_ex}, target, feeds, order, runs, rounds)
        for r in differ:
            d, t = times["default"].get(r.name), times["tuned"].get(r.name)
            if d is None or t is None or not np.isfinite(d) or not np.isfinite(t):
                result.kept.append(r.name)  # not seen in the profile (a kernel inlined away): nothing to judge
                continue
            result.kernel_ms[r.name] = {"default": d, "tuned": t}
            slower = t > d * (1 + tolerance)
            (result.reverted if slower else result.kept).append(r.name)
            kernels[r.key].update(use="default" if slower else "tuned", default_ms=d, tuned_ms=t)
        # the choice per kernel first (compile_tuned reads it), then the model as a whole
        tb.save_verified(db_dir, target, kernels, {})
        verified_ex = tb.compile_tuned(mod, target, db_dir) if result.reverted else tuned_ex
        say("timing the default, tuned and verified builds")
        builds = {"default": default_ex, "tuned": tuned_ex}
        if result.reverted:
            builds["verified"] = verified_ex
        result.model_ms = _model_ms(builds, target, feeds, order, runs, rounds)
        result.model_ms.setdefault("verified", result.model_ms["tuned"])
        # (when every compared kernel went back to its default, the verified build IS the default build)
        if result.kept and result.model_ms["verified"] > result.model_ms["default"] * (1 + tolerance):
            result.model_fallback = True
            result.reverted = [r.name for r in recorded]
            result.kept, result.same_as_default = [], []
            verified_ex = default_ex
        models[mkey].update(use="default" if result.model_fallback else "tuned", model_ms=result.model_ms)
    tb.save_verified(db_dir, target, kernels, models)
    result.seconds = time.perf_counter() - t0
    return result, verified_ex
