"""Fuzz campaign for the ONNX loader + analysis + prune pipeline (bigger than the default tests).

    python benchmarks/fuzz_campaign.py --cases 2000 [--seconds 600] [--atheris]

Every case mutates a seed model (bytes or structure) and runs the contract oracle from
tests/fuzz_cases.py: a valid pruned model equivalent to consumer masking, or one GraphpruneError
line. A case running over --timeout seconds counts as a hang. Distinct failures are grouped by
(exception type, innermost graphprune frame) and printed with a reproducer seed.
"""
from __future__ import annotations

import argparse
import collections
import os
import signal
import sys
import tempfile
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))



class Hang(Exception):
    pass


def _alarm(_sig, _frame):
    raise Hang()


def signature(exc: BaseException) -> str:
    """Exception type plus the innermost frame inside graphprune (or the test oracle)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "graphprune" in f.filename or "fuzz" in f.filename]
    where = " < ".join(f"{os.path.basename(f.filename)}:{f.name}" for f in reversed(frames[-3:])) or "?"
    return f"{type(exc).__name__} @ {where}"


def make_case(i: int, seeds, tmp: str):
    """Case i is reproducible from i alone: (source, label, target)."""
    from fuzz_cases import mutate_bytes, mutate_proto, save_bytes

    rng = np.random.default_rng(i)
    seed = seeds[i % len(seeds)]
    path = os.path.join(tmp, "case.onnx")
    if rng.random() < 0.35:
        kind, data = mutate_bytes(seed.SerializeToString(), rng)
        source, label = save_bytes(path, data), f"bytes:{kind}"
    else:
        kinds, model = mutate_proto(seed, rng, n=int(rng.integers(1, 3)))
        source, label = model, "proto:" + "+".join(kinds)
    return source, label, float(rng.uniform(0.3, 0.9))


def run_case(source, target: float, timeout: float) -> str:
    from fuzz_cases import check_prune

    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        return check_prune(source, target=target).status
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def campaign(cases: int, seconds: float, timeout: float) -> int:
    from fuzz_cases import seed_models

    signal.signal(signal.SIGALRM, _alarm)
    seeds = seed_models()
    failures: dict[str, list[tuple[int, str, str]]] = collections.defaultdict(list)
    outcomes: collections.Counter = collections.Counter()
    t0 = time.time()
    ran = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(cases):
            if time.time() - t0 > seconds:
                break
            ran += 1
            source, label, target = make_case(i, seeds, tmp)
            try:
                status = run_case(source, target, timeout)
                outcomes[status] += 1
            except Hang:
                failures[f"hang > {timeout}s"].append((i, label, ""))
            except BaseException as exc:  # noqa: BLE001 - every escape is a finding
                if isinstance(exc, KeyboardInterrupt):
                    raise
                failures[signature(exc)].append((i, label, str(exc).splitlines()[0][:160] if str(exc) else ""))
    print(f"cases run: {ran} in {time.time() - t0:.0f}s; outcomes: {dict(outcomes)}; "
          f"distinct failures: {len(failures)}")
    for sig, hits in sorted(failures.items(), key=lambda kv: -len(kv[1])):
        i, label, msg = hits[0]
        print(f"  {len(hits):4d}x {sig}\n        first case {i} ({label}): {msg}")
    return 1 if failures else 0


def atheris_main(argv: list[str]) -> None:
    """Coverage-guided byte fuzzing of the loader with atheris (pip install atheris)."""
    import atheris

    with atheris.instrument_imports(include=["graphprune"]):  # coverage of graphprune only, not onnx/numpy
        from graphprune.analysis.groups import analyze_graph
        from graphprune.errors import GraphpruneError
        from graphprune.frontends.onnx_frontend import load_onnx
    from fuzz_cases import save_bytes, seed_models

    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "case.onnx")
    if not any(not a.startswith("-") for a in argv[1:]):
        corpus = os.path.join(tmp, "corpus")  # start from real models: random bytes rarely parse
        os.makedirs(corpus)
        for k, model in enumerate(seed_models()):
            save_bytes(os.path.join(corpus, f"seed{k}.onnx"), model.SerializeToString())
        argv = [*argv, corpus]

    def one(data: bytes) -> None:
        save_bytes(path, data)
        try:
            analyze_graph(load_onnx(path).graph)
        except GraphpruneError as exc:
            assert "\n" not in str(exc)

    atheris.Setup(argv, one)
    atheris.Fuzz()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=1e9)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--atheris", action="store_true", help="coverage-guided byte fuzzing of load+analysis")
    args, rest = parser.parse_known_args()
    if args.atheris:
        atheris_main([sys.argv[0], *rest])
    else:
        sys.exit(campaign(args.cases, args.seconds, args.timeout))
