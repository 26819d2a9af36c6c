"""graphprune (default settings) vs Torch-Pruning (round_to 8) at equal FLOPs: measured speed-ups.

One run produces the whole table of issue 14: seven torchvision models (random weights, BN
statistics randomised as in tests/zoo.py), pruned to 40% FLOPs by
  - graphprune, default settings: ONNX path, `--round-to auto` from the ort-cpu table (CPU rows),
    nn.Module path with the cuda-fp16 table (GPU rows);
  - Torch-Pruning: MetaPruner, GroupMagnitudeImportance(p=1), global pruning, round_to=8, the
    classifier ignored; its pruning ratio bisected towards graphprune's pruned MACs (graphprune's MAC
    counter, the same one for every model here), keeping the tried ratio closest from either side;
  - graphprune --target-latency R, where R is the latency ratio the FLOPs-pruned model measured
    in a short first pass: the latency-aware allocation should then keep more MACs at no more
    measured latency ("at equal measured latency").
Timing: onnxruntime CPU with 1 and 8 intra-op threads, and PyTorch on the GPU (fp16, channels-last,
CUDA graphs) at batch 1, 32 and 128. All variants of a model are timed in interleaved rounds and the
medians compared, so machine noise hits them alike. Pruning runs in parallel worker processes
(one thread each) before any timing starts.

    python benchmarks/peer_latency.py                      # full run (GPU machine), writes the results
    python benchmarks/peer_latency.py --quick --models resnet18 --size 64 --out /tmp/p.json
    python benchmarks/peer_latency.py --render benchmarks/results/peer_latency.json  # table only
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

MODELS = ["resnet50", "mobilenet_v2", "efficientnet_b0", "regnet_y_800mf", "convnext_tiny", "densenet121", "resnet18"]
RESULTS = Path(__file__).parent / "results" / "peer_latency.json"
DOC = Path(__file__).parent.parent / "docs" / "benchmarks.md"


def _classifier(model):
    import torch

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return [linears[-1]] if linears else []


def tp_prune(model, x, target_macs: float, steps: int):
    """Torch-Pruning at round_to 8, ratio bisected towards graphprune's MAC count `target_macs`.

    round_to 8 makes Torch-Pruning's MACs move in steps, so it rarely lands on the target: of all
    ratios tried, the one whose MACs are closest to the target (from either side) is kept, so the
    two tools are compared at FLOPs as equal as the steps allow (both ratios are in the results).
    """
    import torch_pruning as tp

    import graphprune

    lo, hi, best = 0.0, 0.95, None
    for _ in range(steps):
        mid = (lo + hi) / 2
        m = copy.deepcopy(model)
        pruner = tp.pruner.MetaPruner(m, x, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                      pruning_ratio=mid, global_pruning=True, round_to=8,
                                      ignored_layers=_classifier(m))
        pruner.step()
        macs = graphprune.analyze(m, x).macs()
        if best is None or abs(macs - target_macs) < abs(best[1] - target_macs):
            best = (m, macs, mid)
        if macs <= target_macs:
            hi = mid
        else:
            lo = mid
    if best is None:
        raise RuntimeError("Torch-Pruning did not reach the target")
    return best


def export(model, x, path: Path) -> Path:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"])
    return path


def source_model(name: str, size: int, work: Path):
    """The zoo model (one torch thread), an example input, its ONNX export and its MACs."""
    import torch

    import graphprune
    from zoo import make_model

    torch.set_num_threads(1)
    model = make_model(name).eval()
    x = torch.randn(1, 3, size, size)
    orig = export(model, x, work / f"{name}.onnx")
    return model, x, orig, graphprune.analyze(str(orig)).macs()


def prepare(name: str, size: int, target: float, workdir: str, tp_steps: int, gpu: bool) -> dict:
    """Build every pruned variant of one model (one worker process, one thread)."""
    import torch

    import graphprune
    from graphprune.backends.ort_backend import measure_speedup, random_inputs

    t0 = time.perf_counter()
    work = Path(workdir)
    model, x, orig, base = source_model(name, size, work)
    row: dict = {"model": name, "macs": base, "files": {"original": str(orig)}}

    gp = graphprune.prune(str(orig), target_flops=target, measure=False)
    gp.save(work / f"{name}_gp.onnx")
    row["files"]["graphprune"] = str(work / f"{name}_gp.onnx")
    row["graphprune"] = {"macs_ratio": gp.report["macs"]["ratio"], "round_to": gp.report["round_to"],
                         "round_to_source": gp.report["round_to_source"]}

    tpm, tp_macs, ratio = tp_prune(model, x, gp.report["macs"]["after"], tp_steps)
    export(tpm, x, work / f"{name}_tp.onnx")
    torch.save(tpm, work / f"{name}_tp.pt")
    row["files"]["torch_pruning"] = str(work / f"{name}_tp.onnx")
    row["torch_pruning"] = {"macs_ratio": tp_macs / base, "pruning_ratio": ratio}

    # a quick (noisy: other workers run) latency ratio of the FLOPs-pruned model sets the latency target
    feed = random_inputs(str(orig))
    quick = measure_speedup(_load(orig), gp.model, feed, budget_s=2.0, max_rounds=15)
    lat_target = min(0.95, max(0.2, quick["ratio"]))
    try:
        lat = graphprune.prune(str(orig), target_latency=lat_target)
        lat.save(work / f"{name}_lat.onnx")
        row["files"]["graphprune_latency"] = str(work / f"{name}_lat.onnx")
        row["graphprune_latency"] = {"target_latency": lat_target, "macs_ratio": lat.report["macs"]["ratio"],
                                     "predicted_ratio": lat.report["latency"]["predicted_ratio"]}
    except graphprune.GraphpruneError as exc:
        row["graphprune_latency"] = {"target_latency": lat_target, "error": str(exc)}

    if gpu:
        gpm = graphprune.prune(model, x, target_flops=target, hardware="cuda-fp16")
        torch.save(gpm.model, work / f"{name}_gp_gpu.pt")
        row["graphprune_gpu"] = {"macs_ratio": gpm.report["macs"]["ratio"], "round_to": gpm.report["round_to"]}
    row["prepare_s"] = round(time.perf_counter() - t0, 1)
    return row


def prepare_all(prepare_fn, args: argparse.Namespace, workdir: str, gpu: bool) -> tuple[list[dict], dict[str, str]]:
    """prepare_fn for every model of args.models, in parallel spawned workers; a model that fails is
    recorded (name -> error) and the run goes on."""
    import multiprocessing

    with ProcessPoolExecutor(max_workers=args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(prepare_fn, n, args.size, args.target, workdir, args.tp_steps, gpu) for n in args.models]
        rows, failed = [], {}
        for name, f in zip(args.models, futures):
            try:
                rows.append(f.result())
                print(f"prepared {name} in {rows[-1]['prepare_s']}s", flush=True)
            except Exception as exc:  # noqa: BLE001 - one model's failure is a result, not the end of the run
                failed[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
                print(f"FAILED to prepare {name}: {failed[name]}", flush=True)
    return rows, failed


def _load(path):
    import onnx

    return onnx.load(str(path))


def time_cpu(row: dict, threads: int, rounds: int) -> dict:
    """Interleaved onnxruntime medians of every variant; speed-up over the original."""
    from graphprune.backends.ort_backend import interleaved_samples, random_inputs

    keys = list(row["files"])
    feed = random_inputs(row["files"]["original"])
    samples = interleaved_samples([row["files"][k] for k in keys], feed, rounds=rounds, warmup=3,
                                  intra_op_threads=threads)
    med = {k: statistics.median(s) for k, s in zip(keys, samples)}
    iqr = {k: _iqr_pct(s) for k, s in zip(keys, samples)}
    return {"median_ms": med, "iqr_pct": iqr, "rounds": rounds,
            "speedup": {k: med["original"] / med[k] for k in keys if k != "original"}}


def _iqr_pct(samples: list[float]) -> float:
    q = statistics.quantiles(samples, n=4)
    return round(100 * (q[2] - q[0]) / statistics.median(samples), 2)


def time_gpu(row: dict, workdir: str, batches: list[int], rounds: int) -> dict:
    """fp16, channels-last, CUDA-graph replays; variants interleaved per round."""
    import torch

    from zoo import make_model

    torch.backends.cudnn.benchmark = True
    name = row["model"]
    models = {"original": make_model(name).eval(),
              "graphprune": torch.load(Path(workdir) / f"{name}_gp_gpu.pt", weights_only=False).eval(),
              "torch_pruning": torch.load(Path(workdir) / f"{name}_tp.pt", weights_only=False).eval()}
    out = {}
    for bs in batches:
        try:
            out[str(bs)] = _time_gpu_batch(models, bs, row["size"], rounds)
        except Exception as exc:  # noqa: BLE001
            out[str(bs)] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(f"GPU batch {bs} of {name} failed: {out[str(bs)]['error']}", flush=True)
        torch.cuda.empty_cache()
    return out


def _time_gpu_batch(models: dict, bs: int, size: int, rounds: int) -> dict:
    import torch

    graphs = {}
    for k, m in models.items():
        m = m.cuda().half().to(memory_format=torch.channels_last)
        x = torch.randn(bs, 3, size, size, device="cuda", dtype=torch.half)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    m(x)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                m(x)
        graphs[k] = (g, x)  # the captured input must outlive the graph
    reps = 20 if bs == 1 else 5
    samples = {k: [] for k in graphs}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(2):
        for g, _ in graphs.values():
            g.replay()
    for _ in range(rounds):
        for k, (g, _) in graphs.items():
            start.record()
            for _ in range(reps):
                g.replay()
            end.record()
            end.synchronize()
            samples[k].append(start.elapsed_time(end) / reps)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"median_ms": med, "iqr_pct": {k: _iqr_pct(v) for k, v in samples.items()},
            "speedup": {k: med["original"] / med[k] for k in med if k != "original"}}


def render(report: dict, src: str = "benchmarks/results/peer_latency.json") -> str:
    """The markdown tables of docs/benchmarks.md, from a results file alone."""
    lines = [f"<!-- results: {src} (benchmarks/peer_latency.py) -->",
             f"Machine: {report['machine']}. Target {report['target']:.0%} FLOPs, input {report['size']}x{report['size']}, "
             f"interleaved medians, one run ({report['date']}); "
             + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
             + f"; channel multiples from the table: {report.get('channel_multiples')}.", "",
             "| model | FLOPs kept gp / TP | round_to gp | ORT 1 thread gp | ORT 1 thread TP | ORT 8 threads gp | ORT 8 threads TP |",
             "|---|---|---|---|---|---|---|"]
    for r in report["models"]:
        c1, c8 = r["cpu"]["1"]["speedup"], r["cpu"]["8"]["speedup"]
        lines.append(f"| {r['model']} | {r['graphprune']['macs_ratio']:.3f} / {r['torch_pruning']['macs_ratio']:.3f} | "
                     f"{r['graphprune']['round_to']} | {c1['graphprune']:.2f}x | {c1['torch_pruning']:.2f}x | "
                     f"{c8['graphprune']:.2f}x | {c8['torch_pruning']:.2f}x |")
    if any("gpu" in r for r in report["models"]):
        batches = list(next(r for r in report["models"] if "gpu" in r)["gpu"])
        lines += ["", f"GPU ({report.get('gpu', '?')}), fp16, channels-last, CUDA graphs: speed-up graphprune / Torch-Pruning", "",
                  "| model | round_to gp | " + " | ".join(f"batch {b}" for b in batches) + " |",
                  "|---|---|" + "---|" * len(batches)]
        for r in report["models"]:
            if "gpu" not in r:
                continue
            cells = [f"{r['gpu'][b]['speedup']['graphprune']:.2f}x / {r['gpu'][b]['speedup']['torch_pruning']:.2f}x"
                     if "speedup" in r["gpu"][b] else "failed" for b in batches]
            lines.append(f"| {r['model']} | {r['graphprune_gpu']['round_to']} | " + " | ".join(cells) + " |")
    lines += ["", "Latency-aware allocation (`--target-latency R`, R = the FLOPs-pruned model's measured ratio) vs "
              "`--target-flops 0.4`, ORT 1 thread:", "",
              "| model | R | latency kept: flops / latency target | MACs kept: flops / latency target | wins |",
              "|---|---|---|---|---|"]
    for r in report["models"]:
        m = r["cpu"]["1"]["median_ms"]
        if "graphprune_latency" not in m:
            lines.append(f"| {r['model']} | {r['graphprune_latency']['target_latency']:.3f} | failed: "
                         f"{r['graphprune_latency']['error'][:60]} | | no |")
            continue
        lf, ll = m["graphprune"] / m["original"], m["graphprune_latency"] / m["original"]
        lines.append(f"| {r['model']} | {r['graphprune_latency']['target_latency']:.3f} | {lf:.3f} / {ll:.3f} | "
                     f"{r['graphprune']['macs_ratio']:.3f} / {r['graphprune_latency']['macs_ratio']:.3f} | "
                     f"{'yes' if r['latency_wins'] else 'no'} |")
    lines.append("<!-- /results -->")
    return "\n".join(lines)


def latency_wins(r: dict) -> bool:
    """Latency-aware wins when it keeps more MACs at no more measured latency (2% noise allowance)."""
    m = r["cpu"]["1"]["median_ms"]
    if "graphprune_latency" not in m:
        return False
    return (m["graphprune_latency"] <= m["graphprune"] * 1.02
            and r["graphprune_latency"]["macs_ratio"] > r["graphprune"]["macs_ratio"])


def update_doc(text: str, src: str = "benchmarks/results/peer_latency.json", doc: Path = DOC) -> None:
    """Replace this results file's block in docs/benchmarks.md (or append it)."""
    from mdtable import replace_block

    doc.write_text(replace_block(doc.read_text(), src, text, f"## Speed-up vs Torch-Pruning at equal FLOPs ({src})"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--target", type=float, default=0.4)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=21, help="Interleaved CPU rounds per thread setting.")
    ap.add_argument("--gpu-rounds", type=int, default=15)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--tp-steps", type=int, default=12, help="Bisection steps for Torch-Pruning's ratio.")
    ap.add_argument("--workers", type=int, default=min(7, os.cpu_count() or 1))
    ap.add_argument("--no-gpu", action="store_true", help="CPU rows only, even where a GPU is visible.")
    ap.add_argument("--quick", action="store_true", help="Few rounds and steps: a smoke run, not results.")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--doc", action="store_true", help="Also rewrite the table in docs/benchmarks.md.")
    ap.add_argument("--render", type=Path, help="Only print (and with --doc, write) the tables of a results file.")
    args = ap.parse_args(argv)
    if args.render:
        src = args.render.resolve().relative_to(DOC.parent.parent).as_posix()
        text = render(json.loads(args.render.read_text()), src)
        print(text)
        if args.doc:
            update_doc(text, src)
        return 0
    if args.quick:
        args.rounds, args.gpu_rounds, args.tp_steps = 5, 3, 5
    import torch

    gpu = torch.cuda.is_available() and not args.no_gpu
    workdir = tempfile.mkdtemp(prefix="peer-latency-")
    t0 = time.perf_counter()
    rows, failed = prepare_all(prepare, args, workdir, gpu)
    prep_s = time.perf_counter() - t0
    report = header(args, gpu, prep_s)
    report["failed"] = failed
    for r in rows:
        r["size"] = args.size
        r["cpu"] = {str(t): time_cpu(r, t, args.rounds) for t in (1, 8)}
        if gpu:
            r["gpu"] = time_gpu(r, workdir, args.batches, args.gpu_rounds)
        r["latency_wins"] = latency_wins(r)
        print(json.dumps({"model": r["model"], "cpu1": r["cpu"]["1"]["speedup"],
                          "gpu": {b: v["speedup"] for b, v in r.get("gpu", {}).items()}}), flush=True)
        del r["files"]
        report["models"].append(r)
        report["latency_wins"] = sum(x["latency_wins"] for x in report["models"])
        report["total_s"] = round(time.perf_counter() - t0, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")  # after each model: a timeout keeps what ran
    src = args.out.resolve().relative_to(DOC.parent.parent).as_posix() if args.doc else str(args.out)
    text = render(report, src)
    print(text)
    if args.doc:
        update_doc(text, src)
    return 0


def header(args: argparse.Namespace, gpu: bool, prep_s: float) -> dict:
    import importlib.metadata

    import onnxruntime
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    from graphprune.backends.channel_table import load_table

    return {"machine": f"{cpu}, {os.cpu_count()} cores", "gpu": torch.cuda.get_device_name() if gpu else None,
            "date": time.strftime("%Y-%m-%d"), "target": args.target, "size": args.size, "quick": args.quick,
            "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                         # (the 1.6.1 wheel's torch_pruning.__version__ still says 1.6.0)
                         "torch_pruning": importlib.metadata.version("torch-pruning")},
            "channel_multiples": {k: v["multiple"] for k, v in load_table().items()},
            "prepare_s": round(prep_s, 1), "models": [], "latency_wins": 0}


if __name__ == "__main__":
    sys.exit(main())
