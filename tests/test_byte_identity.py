"""Refactors must not change results: the pruned bytes of the seven equivalence models (ONNX path, l1 and
fpgm; PyTorch path, l1) and their reports are compared with SHA-256 digests recorded from the code before
the pipeline refactor (issue 10). The comparison runs inside tests/test_onnx_equivalence.py and
tests/test_fx_equivalence.py, on the results those tests already compute (same models, methods, target
and inputs as recorded here), so the suite does not prune the seven models twice.

Re-recorded (session 2, branch strict) when `--round-to auto` began keeping every group at the table's
full multiple (passes.allocate.auto_multiples): an intended change of every default plan; first
recorded from main at 80e9cb2, before the pipeline refactor. Re-recorded (session 3, branch speed3)
when strategy "speed" became the default for FLOPs targets (passes/time_proxy.py): again an intended
change of every default plan.

Re-record only for an intended change of results, and say why in the commit:
    .venv/bin/python tests/test_byte_identity.py --record
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from zoo import export, make_model  # noqa: E402

MODELS = ["resnet50", "mobilenet_v3_large", "densenet121", "googlenet", "efficientnet_b0",
          "regnet_y_400mf", "shufflenet_v2_x1_0"]
ONNX_CASES = [(name, method) for name in MODELS for method in ("l1", "fpgm")]
DATA = os.path.join(os.path.dirname(__file__), "data", "pruned_sha256.json")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# report entries added after the digests were recorded (every entry recorded before is still compared):
# the pass list (issue 10), warnings and the ignored state of groups (issue 15), norm_channels (issue 14)
ADDED_KEYS = ("passes", "warnings", "norm_channels")
ADDED_GROUP_KEYS = ("ignored", "ignored_channels", "state")


# measured on the machine, different on every run: the stage times and the timed speed-up
WALL_CLOCK = ("time", "latency")


def report_digest(report: dict) -> str:
    """The report without wall-clock measurements (WALL_CLOCK: the only parts that may differ between runs)
    and without the entries added since the recording (ADDED_KEYS)."""
    stable = {k: v for k, v in report.items() if k not in WALL_CLOCK + ADDED_KEYS}
    stable["groups"] = [{k: v for k, v in g.items() if k not in ADDED_GROUP_KEYS} for g in stable["groups"]]
    if isinstance(stable.get("source"), str):  # where the zoo was exported to differs between runs
        stable["source"] = os.path.basename(stable["source"])
    return _sha(json.dumps(stable, sort_keys=True, default=float).encode())


def module_digest(module) -> str:
    """Parameter/buffer names, shapes, dtypes and bytes, plus the module tree's layer types."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    h.update(";".join(f"{n}={type(m).__name__}" for n, m in module.named_modules()).encode())
    return h.hexdigest()


def onnx_case(name: str, method: str, zoo_dir: str) -> dict[str, str]:
    import graphprune

    path = export(name, zoo_dir)
    with open(path, "rb") as f:
        source = _sha(f.read())
    result = graphprune.prune(path, target_flops=0.4, method=method)
    return {"input": source, "model": _sha(result.model.SerializeToString()), "report": report_digest(result.report)}


def torch_case(name: str) -> dict[str, str]:
    import torch

    import graphprune

    model = make_model(name)
    source = module_digest(model)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    result = graphprune.prune(model, x, target_flops=0.4, method="l1")
    return {"input": source, "model": module_digest(result.model), "report": report_digest(result.report)}


def _recorded() -> dict[str, dict[str, str]]:
    with open(DATA) as f:
        return json.load(f)


def _check(key: str, got: dict[str, str]) -> None:
    want = _recorded()[key]
    if got["input"] != want["input"]:
        pytest.skip(f"{key}: the exported/initialised source model differs from the recorded one "
                    "(another torch build?), so its pruned bytes cannot be compared")
    assert got["model"] == want["model"], f"{key}: pruned model bytes changed"
    assert got["report"] == want["report"], f"{key}: report changed"


def check_onnx_digest(name: str, method: str, path: str, result) -> None:
    """Called by tests/test_onnx_equivalence.py on the result it already has (no second prune)."""
    with open(path, "rb") as f:
        source = _sha(f.read())
    _check(f"onnx/{name}/{method}", {"input": source, "model": _sha(result.model.SerializeToString()),
                                     "report": report_digest(result.report)})


def check_torch_digest(name: str, model, result) -> None:
    """Called by tests/test_fx_equivalence.py with the source module and its prune result."""
    _check(f"torch/{name}/l1", {"input": module_digest(model), "model": module_digest(result.model),
                                "report": report_digest(result.report)})


def test_every_case_is_recorded():
    """The equivalence tests check these digests; a missing record would make their check a KeyError,
    an extra one would never be checked."""
    assert set(_recorded()) == {f"onnx/{n}/{m}" for n, m in ONNX_CASES} | {f"torch/{n}/l1" for n in MODELS}


if __name__ == "__main__" and "--record" in sys.argv:
    import tempfile

    zoo = os.environ.get("GRAPHPRUNE_ZOO_DIR") or tempfile.mkdtemp()
    out = {}
    for name, method in ONNX_CASES:
        out[f"onnx/{name}/{method}"] = onnx_case(name, method, zoo)
        print(f"onnx/{name}/{method}", flush=True)
    for name in MODELS:
        out[f"torch/{name}/l1"] = torch_case(name)
        print(f"torch/{name}/l1", flush=True)
    os.makedirs(os.path.dirname(DATA), exist_ok=True)
    with open(DATA, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
        f.write("\n")
