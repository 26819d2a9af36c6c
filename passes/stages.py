"""The pipeline's standard passes and the default pipeline, written once for ONNX and PyTorch.

Each pass is small: it reads a few fields of the PruneState, writes a few, and leaves anything that
depends on the model format to `state.adapter` (graphprune/adapters/). `default_passes(options)` is
the whole pruning pipeline in one list; read it first.
"""
from __future__ import annotations

from graphprune.analysis.plan import Plan
from graphprune.backends.channel_table import elem_macs
from graphprune.passes.allocate import allocate, ignore_reasons, resolve_round_to
from graphprune.passes.methods import (ACT_METHODS, PLAN_METHODS, check_strict, di_plan, method_coverage,
                                       unknown_method_error)
from graphprune.passes.time_proxy import register_time_proxy
from graphprune.pipeline import Pass, PruneOptions, PruneState


# -- load and analyse ------------------------------------------------------------------------------
class Lower(Pass):
    """Load (ONNX) or capture (PyTorch: torch.fx, else torch.export) the source model into the IR."""

    name, time_key = "lower", "load_s"

    def describe(self, state: PruneState) -> str | None:
        return state.adapter.lower_message

    def run(self, state: PruneState) -> PruneState:
        state.adapter.lower(state)
        return state


class Analyze(Pass):
    """Channel-dependency analysis: classes, groups, frozen reasons, cost model (the shared rule table)."""

    name, time_key, message = "analyze", "analyze_s", "analysing channel dependencies"

    def run(self, state: PruneState) -> PruneState:
        state.need("graph")
        state.analysis = state.adapter.analyze(state)
        return state


# -- calibration -----------------------------------------------------------------------------------
def uses_calibration(o: PruneOptions) -> bool:
    """Whether the calibration data is loaded for statistics/recovery. DI alone reads its labelled
    (x, y) data itself and keeps its plain-pruning output unless recovery is asked for."""
    if o.calibration is None:
        return False
    return not (o.method in PLAN_METHODS and o.recover in (None, "none") and o.strategy != "sensitivity")


class Calibrate(Pass):
    """Load and check the calibration samples for the model's inputs; split off held-out samples."""

    name, time_key, message = "calibrate", "calib_s", "reading calibration data"

    def run(self, state: PruneState) -> PruneState:
        from graphprune.calib import prepare_calibration
        from graphprune.recovery import RecoverOptions

        state.need("graph")
        o = state.options
        mode = o.recover or ("none" if o.method in PLAN_METHODS else "lsq")
        state.recover_options = RecoverOptions(mode=mode, seed=o.seed, **o.recover_options)
        state.calibration = prepare_calibration(o.calibration, state.graph, o.calib_samples, o.calib_preprocess,
                                                labelled=o.method in PLAN_METHODS)
        return state


class ChannelStatistics(Pass):
    """Per-channel mean and second moment of every consumer input of the ORIGINAL model, for the
    activation-aware criterion and for bias compensation (one pass over the fit samples)."""

    name, time_key, message = "statistics", "calib_s", "calibration statistics"

    def run(self, state: PruneState) -> PruneState:
        state.need("analysis", "calibration", "recover_options")
        state.stats = state.adapter.collect_stats(state, state.calibration.fit, state.recover_options.progress)
        return state


# -- plan ------------------------------------------------------------------------------------------
class LatencyCost(Pass):
    """Measure per-layer latency and register it as a cost model, so allocation can target latency."""

    name, time_key = "latency_cost", "plan_s"

    def run(self, state: PruneState) -> PruneState:
        state.need("analysis")
        state.cost_kind = state.adapter.latency_cost(state)
        return state


class ExplicitPlan(Pass):
    """The user's own plan (`removed=`): no scoring, no allocation; reported against MACs."""

    name, time_key = "explicit_plan", "plan_s"

    def run(self, state: PruneState) -> PruneState:
        state.need("analysis")
        removed = frozenset(state.options.removed or ())
        state.plan = Plan(removed, "macs", 1.0, state.analysis.macs(), state.analysis.macs(removed))
        return state


class RoundTo(Pass):
    """The channel multiple allocation keeps: the user's N, or (auto) the multiple a measured table says
    is fast on the target hardware for every group, finer only when the target needs it
    (passes/allocate.py auto_multiples). A latency target's cost model is registered after this pass,
    so its reachability is judged on MACs."""

    name, time_key = "round_to", "plan_s"

    def run(self, state: PruneState) -> PruneState:
        state.need("analysis")
        o = state.options
        kind = "macs" if o.target_kind in (None, "latency") else o.target_kind
        protected = set(ignore_reasons(state.analysis, list(o.ignore))[0]) if o.ignore else set()
        target = o.target if o.removed is None else None
        state.round_to, state.round_info = resolve_round_to(state.analysis, o.round_to, o.hardware, kind, target,
                                                            protected)
        return state


def _coverage(state: PruneState) -> None:
    """Which prunable groups the method scores itself; strict_method makes any fallback an error."""
    state.coverage = state.adapter.coverage(state, state.options.method)
    if state.coverage is not None and state.options.strict_method:
        check_strict(state.coverage)


def _target_kind(state: PruneState) -> str:
    return state.cost_kind or state.options.target_kind


class SearchPlan(Pass):
    """A data-driven structure search (di) that returns a plan meeting the target directly."""

    name, time_key = "search", "plan_s"

    def describe(self, state: PruneState) -> str | None:
        return f"searching the structure ({state.options.method}{state.adapter.search_note})"

    def run(self, state: PruneState) -> PruneState:
        state.need("analysis")
        o, a = state.options, state.analysis
        _coverage(state)
        kind = _target_kind(state)
        options = dict(o.method_options)
        if o.calibration is not None:
            options["calib"] = o.calibration
        found = di_plan(a, o.target, kind, options, progress=state.say, **state.adapter.search_context(state))
        state.plan = Plan(found, kind, o.target, a.cost(kind), a.cost(kind, found))
        return state


class Score(Pass):
    """Importance per channel class: the user's scores, activation-aware scores from the calibration
    statistics, or a criterion the adapter supports (weight criteria on both kinds, taylor on modules)."""

    name, time_key = "score", "plan_s"

    def describe(self, state: PruneState) -> str | None:
        return f"scoring channels ({state.options.method})"

    def run(self, state: PruneState) -> PruneState:
        state.need("analysis")
        o = state.options
        if o.scores is not None:
            state.scores = dict(o.scores)
        elif o.method in ACT_METHODS:
            from graphprune.passes.act_importance import act_scores

            state.need("stats")
            state.scores = act_scores(state.analysis, state.stats, centered=state.recover_options.mode != "none")
        else:
            _coverage(state)
            fn = state.adapter.criteria().get(o.method)
            if fn is None:
                raise unknown_method_error(o.method, state.adapter.kind)
            state.scores = fn(state.analysis, seed=o.seed, **state.adapter.score_context(state), **o.method_options)
        return state


def _protect(state: PruneState) -> set[int]:
    """The classes --ignore keeps (with why, for the report) and a warning per pattern matching nothing."""
    if state.options.ignore:
        state.protected, unmatched = ignore_reasons(state.analysis, list(state.options.ignore))
        state.warnings += [f"--ignore {p!r} matches no layer or parameter name" for p in unmatched]
    return set(state.protected)


class Allocate(Pass):
    """Turn scores into removed classes meeting the cost target (global or uniform, rounded).

    A latency target is closed against the clock: allocate on the per-layer latency model, rewrite,
    measure, rescale the model's target, up to three tries (the adapter's fit_latency); the slim model
    and its measurement of the chosen try are kept, so rewrite and measure do not repeat them.
    """

    name, time_key = "allocate", "plan_s"

    def describe(self, state: PruneState) -> str | None:
        if _target_kind(state) == "latency":
            return "allocating the budget, fitted to measured latency"
        return "allocating the budget"

    def run(self, state: PruneState) -> PruneState:
        state.need("analysis", "scores", "round_to")
        o = state.options
        protected = _protect(state)
        kind = _target_kind(state)

        time_kind = None
        if o.strategy == "speed" and kind == "macs":
            kappa = elem_macs(o.hardware)
            time_kind = register_time_proxy(state.analysis, kappa)
            state.report["speed_order"] = {"hardware": o.hardware, "elem_macs": round(kappa, 2)}

        def allocate_at(goal: float) -> Plan:
            return allocate(state.analysis, state.scores, target=goal, kind=kind, strategy=o.strategy,
                            round_to=state.round_to, protected=protected, allow_floor=o.allow_floor,
                            cost_aware=kind == "latency", time_kind=time_kind)

        if kind == "latency":
            plan, state.slim, state.latency = state.adapter.fit_latency(state, allocate_at)
            state.plan = Plan(plan.removed, plan.kind, o.target, plan.base_cost, plan.cost, plan.kept)
            _check_latency_fit(state)
        else:
            state.plan = allocate_at(o.target)
        return state


def _check_latency_fit(state: PruneState) -> None:
    """A latency target is met when the measured ratio is at most target * (1 + TOLERANCE); a miss
    is TargetNotMet (exit 3, nothing written) unless --allow-floor, and a plan much faster than asked
    (it pruned more than needed) is a warning."""
    from graphprune.errors import TargetNotMet
    from graphprune.passes.latency_cost import TOLERANCE, meets_latency_target

    target, measured = state.options.target, state.latency["ratio"]
    tries = len(state.latency.get("calibration", []))
    if not meets_latency_target(measured, target):
        if not state.options.allow_floor:
            raise TargetNotMet(f"--target-latency {target:g}: the closest plan of {tries} measured tries runs at "
                               f"{measured:.3f} of the original latency; nothing written (--allow-floor accepts it)")
        state.warnings.append(f"latency target {target:g} not met: measured {measured:.3f} (--allow-floor)")
    elif measured < target * (1 - TOLERANCE):
        state.warnings.append(f"latency target {target:g}: the fitted plan measures {measured:.3f} after {tries} "
                              "tries, faster than asked (more pruned than needed)")


class SensitivityAllocate(Pass):
    """Allocation by measured sensitivity: each group's output change on calibration data prices its
    channels, then the global greedy runs over those prices (passes/sensitivity.py)."""

    name, time_key, message = "sensitivity", "plan_s", "sensitivity: measuring each group on calibration data"

    def run(self, state: PruneState) -> PruneState:
        from graphprune.passes.sensitivity import DEFAULT_RATIOS, DEFAULT_SAMPLES, sensitivity_allocate

        state.need("analysis", "scores")
        o = state.options
        protected = _protect(state)
        samples = int(o.method_options.get("sensitivity_samples", DEFAULT_SAMPLES))
        ratios = tuple(float(r) for r in o.method_options.get("sensitivity_ratios", DEFAULT_RATIOS))
        fit = state.calibration.fit if state.calibration is not None else None
        runner = state.adapter.masked_runner(state, fit, samples)
        state.plan, sens = sensitivity_allocate(state.analysis, state.scores, runner, target=o.target,
                                                kind=_target_kind(state), round_to=state.round_to, protected=protected,
                                                progress=state.say, samples=samples, ratios=ratios)
        state.report["sensitivity"] = sens.to_json()
        return state


# -- rewrite and recover -----------------------------------------------------------------------------
class Rewrite(Pass):
    """Cut the removed channels out of the real model."""

    name, time_key = "rewrite", "rewrite_s"

    def describe(self, state: PruneState) -> str | None:
        return state.adapter.rewrite_message

    def run(self, state: PruneState) -> PruneState:
        state.need("analysis", "plan")
        if state.slim is None:  # a latency fit already rewrote the plan it chose
            state.slim = state.adapter.rewrite(state)
        return state


class Recover(Pass):
    """Bias compensation, then (lsq) layer-wise least-squares reconstruction of every layer that reads
    a removed channel, fitted on calibration data against the original model (graphprune/recovery.py;
    the maths in passes/compensate.py and passes/reconstruct.py). After the rewrite because the fit
    needs the pruned model's own activations."""

    name, time_key = "recover", "recover_s"

    def describe(self, state: PruneState) -> str | None:
        mode = state.recover_options.mode if state.recover_options is not None else "none"
        return f"recovering accuracy ({mode})" if mode != "none" else None

    def run(self, state: PruneState) -> PruneState:
        state.need("slim", "calibration", "recover_options")
        state.report["recovery"] = state.adapter.recover(state)
        state.recovered = state.recover_options.mode != "none"
        return state


# -- check, measure, report --------------------------------------------------------------------------
class Validate(Pass):
    """Check the slim model before anything is written (ONNX: checker, shape inference, onnxruntime and
    equality with the masked original; PyTorch: a forward pass with the original output shapes)."""

    name, time_key = "validate", "validate_s"

    def describe(self, state: PruneState) -> str | None:
        return state.adapter.validate_message

    def run(self, state: PruneState) -> PruneState:
        state.need("slim")
        state.adapter.validate(state)
        return state


class HeldOutAgreement(Pass):
    """How closely the slim model follows the original on calibration samples no pass has seen."""

    name, time_key, message = "agreement", "agreement_s", "agreement on held-out calibration samples"

    def run(self, state: PruneState) -> PruneState:
        state.need("slim", "calibration")
        state.report.setdefault("recovery", {"mode": state.recover_options.mode})
        state.report["recovery"]["agreement"] = state.adapter.agreement(state, state.calibration.holdout)
        state.report["calibration"] = state.calibration.summary()
        return state


class Measure(Pass):
    """Time original vs pruned (interleaved, bounded by GRAPHPRUNE_MEASURE_S) so every prune states the
    speed-up it really gives next to the FLOPs reduction; --min-speedup turns a smaller one into
    SpeedupNotMet. A measurement the latency fit made is reused: channel shapes decide the time, so
    it still holds after recovery changed the kept weights. Model kinds the adapter cannot time
    (nn.Modules: no onnxruntime; custom op domains) report none."""

    name, time_key = "measure", "measure_s"

    def describe(self, state: PruneState) -> str | None:
        return None if state.latency is not None else state.adapter.measure_message

    def run(self, state: PruneState) -> PruneState:
        from graphprune.passes.measure import check_speedup, speedup_record

        state.need("slim", "plan")
        lat = state.latency if state.latency is not None else state.adapter.measure(state)
        state.latency = None if lat is None else speedup_record(lat, state.analysis, state.plan)
        check_speedup(state.latency, state.options.min_speedup)
        return state


class Report(Pass):
    """The JSON-ready report: targets, achieved costs, groups; entries earlier passes left are kept."""

    name, time_key = "report", "report_s"

    def run(self, state: PruneState) -> PruneState:
        from graphprune.report.summary import build_report

        state.need("analysis", "plan")
        o = state.options
        round_to = state.round_info.get("round_to", o.round_to)
        report = build_report(state.analysis, state.plan, method=o.method, strategy=o.strategy, round_to=round_to,
                              times=state.times, source=state.source_label, coverage=state.coverage,
                              ignored=state.protected, warnings=state.warnings)
        if state.round_info:
            report["round_to_source"] = state.round_info["round_to_source"]
        report.update(state.report)
        report.update(state.adapter.report_notes(state))
        if state.latency is not None:
            report["latency"] = state.latency
            if state.plan.kind == "latency":  # the measured ratio is what was achieved
                from graphprune.passes.latency_cost import meets_latency_target

                report["achieved"] = state.latency["ratio"]
                report["target_error"] = abs(state.latency["ratio"] - state.plan.target)
                report["target_met"] = meets_latency_target(state.latency["ratio"], state.plan.target)
        state.report = report
        return state


# -- the pipelines ---------------------------------------------------------------------------------
def plan_passes(options: PruneOptions) -> list[Pass]:
    """How the plan is made: an explicit plan, a structure search, or scores + allocation."""
    if options.removed is not None:
        return [RoundTo(), ExplicitPlan()]
    out: list[Pass] = [RoundTo()] + ([LatencyCost()] if options.target_kind == "latency" else [])
    if options.method in PLAN_METHODS and options.scores is None:
        return out + [SearchPlan()]
    return out + [Score(), SensitivityAllocate() if options.strategy == "sensitivity" else Allocate()]


def default_passes(options: PruneOptions) -> list[Pass]:
    """The pruning pipeline, in one place:

        lower -> analyze -> [calibrate -> statistics] -> plan -> rewrite -> [recover] -> validate
              -> [agreement] -> [measure] -> report

    Brackets: calibration data given (statistics only when the act criterion or recovery reads
    them); measure unless measure=False (--no-measure).
    """
    passes: list[Pass] = [Lower(), Analyze()]
    calibrated = uses_calibration(options)
    if calibrated:
        passes.append(Calibrate())
        mode = options.recover or ("none" if options.method in PLAN_METHODS else "lsq")
        if options.method in ACT_METHODS or mode != "none":
            passes.append(ChannelStatistics())
    passes += plan_passes(options)
    passes.append(Rewrite())
    if calibrated:
        passes.append(Recover())
    passes.append(Validate())
    if calibrated:
        passes.append(HeldOutAgreement())
    if options.measure:
        passes.append(Measure())
    passes.append(Report())
    return passes


def analysis_passes() -> list[Pass]:
    """What `graphprune.analyze` and `graphprune inspect` run: the first two passes of pruning."""
    return [Lower(), Analyze()]


__all__ = ["default_passes", "analysis_passes", "plan_passes", "uses_calibration", "Lower", "Analyze", "Calibrate",
           "ChannelStatistics", "LatencyCost", "ExplicitPlan", "SearchPlan", "Score", "Allocate",
           "SensitivityAllocate", "Rewrite", "Recover", "Validate", "HeldOutAgreement", "Measure", "Report", "RoundTo"]

