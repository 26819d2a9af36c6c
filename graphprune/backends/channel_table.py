"""Which channel multiples are fast on a backend: a measured table behind `--round-to auto`.

Kernels run in blocks (onnxruntime's NCHWc convolutions in blocks of 8 or 16 channels, cuDNN's
fp16 tensor-core tiles in multiples of 8 to 64), so latency over channel count is a staircase and a
pruned layer with 100 channels can cost as much as one with 112. Rounding every kept channel
count to the step of that staircase is what turns a FLOPs cut into a speed-up.

The micro-benchmark sweeps every channel count in a window for a few representative ops (1x1
conv, 3x3 conv, depthwise 3x3 conv), computes MACs per millisecond at each count and, for each
candidate multiple m, how much more efficient counts divisible by m are than counts in general.
The chosen multiple is the smallest m whose efficiency gain is within `TOLERANCE` of the best
gain: a flat curve (no staircase) gives 1, a 16-step staircase gives 16.

The table shipped with the package (channel_multiples.json) was measured on the benchmark machine
(see `measured_on` in it). `graphprune calibrate` re-measures on the user's machine and writes a
table to the user cache, which then takes precedence.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from graphprune.errors import GraphpruneError

SHIPPED = Path(__file__).with_name("channel_multiples.json")
CANDIDATES = (1, 2, 4, 8, 16, 32)
TOLERANCE = 0.02  # a larger multiple must buy at least 2% more MACs per ms to be chosen
HARDWARE = ("ort-cpu", "cuda-fp16")
# (name, spatial size, channel window): wide enough that multiples of 32 occur several times
OPS = (("conv1x1", 28, (64, 192)), ("conv3x3", 14, (64, 192)), ("dwconv3x3", 28, (64, 192)))


def user_table_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "graphprune" / "channel_multiples.json"


def load_table() -> dict[str, Any]:
    """The shipped table, overridden per hardware key by the user's own measurement if there is one."""
    table: dict[str, Any] = {}
    for path in (SHIPPED, user_table_path()):
        if path.exists():
            try:
                table.update(json.loads(path.read_text()))
            except (OSError, ValueError) as exc:
                raise GraphpruneError(f"cannot read channel table {path}: {exc}; re-run `graphprune calibrate`") from None
    return table


def channel_multiple(hardware: str) -> int:
    """The channel multiple for `hardware` (one of HARDWARE) from the measured table."""
    if hardware not in HARDWARE:
        raise GraphpruneError(f"unknown hardware {hardware!r}; choose from {', '.join(HARDWARE)}")
    entry = load_table().get(hardware)
    if entry is None:
        raise GraphpruneError(f"no channel table for {hardware}; run `graphprune calibrate --hardware {hardware}` "
                              "or pass --round-to N")
    return int(entry["multiple"])


def elem_macs(hardware: str) -> float:
    """How many MACs cost as much time as moving one activation element on `hardware` (see fit_elem_macs).

    The speed-ordered allocation (strategy "speed", passes/allocate.py) weighs a channel's activation
    traffic with it. Tables written by `graphprune calibrate` store it; for older tables it is fitted
    from their curves here, and a table without curves (written by hand) uses the shipped table's.
    """
    if hardware not in HARDWARE:
        raise GraphpruneError(f"unknown hardware {hardware!r}; choose from {', '.join(HARDWARE)}")
    entry = load_table().get(hardware)
    if entry is None:
        raise GraphpruneError(f"no channel table for {hardware}; run `graphprune calibrate --hardware {hardware}`")
    shipped = json.loads(SHIPPED.read_text()).get(hardware) if SHIPPED.exists() else None
    for e in (entry, shipped):  # a hand-written table without curves falls back to the shipped measurement
        if e is None:
            continue
        if "elem_macs" in e:
            return float(e["elem_macs"])
        curves = {k: [(int(c), float(ms)) for c, ms in v] for k, v in e.get("curves", {}).items()}
        if sum(1 for op in ("conv1x1", "conv3x3") for c, _ in curves.get(op, []) if c % int(e["multiple"]) == 0) >= 2:
            return fit_elem_macs(hardware, curves, int(e["multiple"]))
    raise GraphpruneError(f"the {hardware} channel table has no curves to fit the speed order's rate; "
                          f"run `graphprune calibrate --hardware {hardware}`")


def _geometry(hardware: str, op: str) -> tuple[int, int, int]:
    """(batch, spatial size, kernel) of a sweep op as the timer of `hardware` runs it."""
    size = next(s for name, s, _ in OPS if name == op)
    k = 1 if op == "conv1x1" else 3
    return (1, size, k) if hardware == "ort-cpu" else (32, size * 2, k)


def fit_elem_macs(hardware: str, curves: dict[str, list[tuple[int, float]]], multiple: int = 1) -> float:
    """Fit ms = a * MACs + b * (input + output elements) to the dense 1x1 and 3x3 conv curves and
    return b / a, clipped to [1, 1000].

    The two ops move the same activations per channel but differ 9x in MACs, which separates the
    two costs; only channel counts divisible by `multiple` are used (the counts pruning keeps).
    """
    import numpy as np

    rows, ms = [], []
    for op in ("conv1x1", "conv3x3"):
        batch, size, k = _geometry(hardware, op)
        for c, t in curves.get(op, []):
            if c % max(1, multiple) == 0 and t > 0:
                rows.append([batch * c * c * k * k * size * size, batch * 2 * c * size * size])
                ms.append(t)
    if len(rows) < 2:
        raise GraphpruneError(f"the {hardware} channel table has too few conv curve points to fit; re-run calibrate")
    a, b = np.linalg.lstsq(np.array(rows, dtype=float), np.array(ms), rcond=None)[0]
    if a <= 0:
        return 1000.0
    return float(min(1000.0, max(1.0, b / a)))


def choose_multiple(curves: dict[str, list[tuple[int, float, float]]]) -> tuple[int, dict[str, float]]:
    """Pick the multiple from measured (channels, macs, ms) curves; returns it and the gain per candidate.

    gain(m) = mean MACs/ms over counts divisible by m / mean MACs/ms over all counts, averaged
    over the ops (means trimmed by 10% at each end, so a stray slow sample does not decide). The
    smallest m within TOLERANCE of the best gain wins.
    """
    gains: dict[str, float] = {}
    for m in CANDIDATES:
        per_op = []
        for rows in curves.values():
            eff_all = [macs / ms for _, macs, ms in rows if ms > 0]
            eff_m = [macs / ms for c, macs, ms in rows if ms > 0 and c % m == 0]
            if eff_all and eff_m:
                per_op.append(_trimmed_mean(eff_m) / _trimmed_mean(eff_all))
        gains[str(m)] = statistics.fmean(per_op) if per_op else 1.0
    best = max(gains.values())
    chosen = next(m for m in CANDIDATES if gains[str(m)] >= best - TOLERANCE)
    return chosen, gains


def _trimmed_mean(values: list[float], cut: float = 0.1) -> float:
    ordered = sorted(values)
    k = int(len(ordered) * cut)
    return statistics.fmean(ordered[k:len(ordered) - k] or ordered)


def _ort_timer(rounds: int) -> Callable[[str, int, int], tuple[float, float]]:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from graphprune.backends.ort_backend import sample_ort

    rng = np.random.default_rng(0)

    def run(op: str, c: int, size: int) -> tuple[float, float]:
        k = 1 if op == "conv1x1" else 3
        group = c if op.startswith("dw") else 1
        w = rng.standard_normal((c, c // group, k, k)).astype(np.float32)
        node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[k // 2] * 4, group=group)
        graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, size, size])],
                                  [helper.make_empty_tensor_value_info("y")], [numpy_helper.from_array(w, "w")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        feed = {"x": rng.standard_normal((1, c, size, size)).astype(np.float32)}
        samples = sample_ort(model, feed, rounds, warmup=2, intra_op_threads=1)
        macs = float(c * (c // group) * k * k * size * size)
        return macs, statistics.median(samples)

    return run


def _cuda_timer(rounds: int, batch: int = 32) -> Callable[[str, int, int], tuple[float, float]]:
    import torch

    if not torch.cuda.is_available():
        raise GraphpruneError("cuda-fp16 needs a CUDA GPU visible to PyTorch")
    torch.backends.cudnn.benchmark = True

    def run(op: str, c: int, size: int) -> tuple[float, float]:
        k = 1 if op == "conv1x1" else 3
        group = c if op.startswith("dw") else 1
        conv = torch.nn.Conv2d(c, c, k, padding=k // 2, groups=group, bias=False).cuda().half()
        conv = conv.to(memory_format=torch.channels_last)
        x = torch.randn(batch, c, size * 2, size * 2, device="cuda", dtype=torch.half)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            for _ in range(3):
                conv(x)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            samples = []
            for _ in range(rounds):
                start.record()
                for _ in range(10):
                    conv(x)
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 10)
        macs = float(batch * c * (c // group) * k * k * (size * 2) ** 2)
        return macs, statistics.median(samples)

    return run


def measure(hardware: str, rounds: int = 7, step: int = 1, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Sweep channel counts for each op on `hardware` and return its table entry."""
    if hardware not in HARDWARE:
        raise GraphpruneError(f"unknown hardware {hardware!r}; choose from {', '.join(HARDWARE)}")
    timer = _ort_timer(rounds) if hardware == "ort-cpu" else _cuda_timer(rounds)
    curves: dict[str, list[tuple[int, float, float]]] = {}
    t0 = time.perf_counter()
    for name, size, (lo, hi) in OPS:
        rows = []
        for c in range(lo, hi + 1, step):
            if progress:
                progress(f"{hardware}: {name} {c} channels")
            macs, ms = timer(name, c, size)
            rows.append((c, macs, round(ms, 5)))
        curves[name] = rows
    multiple, gains = choose_multiple(curves)
    kappa = fit_elem_macs(hardware, {k: [(c, ms) for c, _, ms in rows] for k, rows in curves.items()}, multiple)
    return {"multiple": multiple, "gains": {k: round(v, 4) for k, v in gains.items()}, "elem_macs": round(kappa, 2),
            "measured_on": _machine(hardware), "seconds": round(time.perf_counter() - t0, 1),
            "curves": {k: [[c, ms] for c, _, ms in rows] for k, rows in curves.items()}}


def _machine(hardware: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    if hardware == "cuda-fp16":
        import torch

        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, cuDNN, fp16, channels-last, batch 32)"
    import onnxruntime

    return f"{cpu} (onnxruntime {onnxruntime.__version__}, 1 thread)"


def write_table(entries: dict[str, Any], path: str | os.PathLike) -> Path:
    """Merge `entries` into the table at `path` (atomically)."""
    from graphprune.io import write_bytes_atomic

    path = Path(path)
    table = json.loads(path.read_text()) if path.exists() else {}
    table.update(entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic((json.dumps(table, indent=1) + "\n").encode(), path)
    return path
