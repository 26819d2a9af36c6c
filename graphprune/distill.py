"""Label-free distillation fine-tuning: the original model teaches the pruned one on unlabeled inputs.

Why distillation: below about half the FLOPs, calibration recovery (least squares per layer) cannot
restore what the removed channels computed; training can, and a deployment engineer holding an
ONNX file has the original model and unlabeled inputs but no labels or training pipeline. The
original's outputs are the targets.

ONNX models are trained through graphprune.frontends.onnx_torch (the graph itself executed with
torch ops) and written back into the slim graph's initializers, so the output keeps the slim
model's names, opset and metadata; it is validated like a pruned model, and the exported file
must reproduce the trained module's outputs. nn.Modules are trained in place of a copy.

The loop is passes/training.py's `optimize` (one loop for every training-based pass). Losses per
output: KL of temperature-softened distributions for logits and probabilities (a Softmax output
is matched on its input logits), scale-free MSE otherwise; optional feature matching at the
layers whose inputs the plan pruned. Several processes: run under torchrun (the CLI's --nproc N
does that); each rank trains on its share of every batch and DistributedDataParallel averages
the gradients, so N processes take the same steps as one process with the whole batch.
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from graphprune.errors import GraphpruneError

LOSS_KINDS = ("kl", "mse")


@dataclass
class FinetuneOptions:
    """Distillation settings (CLI flags of `graphprune finetune` map 1:1)."""

    steps: int = 500
    batch_size: int = 32
    lr: float = 5e-4
    warmup: float = 0.05  # fraction of the steps ramping the learning rate up (a pretrained student)
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    temperature: float = 1.0
    loss: dict[str, Any] = field(default_factory=dict)  # output name -> "kl" | "mse" | callable(student, teacher)
    feature_weight: float = 0.0  # weight of feature matching at the layers the plan touched; 0 = off
    eval_every: int = 50
    patience: int = 5  # evaluations without held-out improvement before stopping; 0 = run all steps
    device: str = "cpu"
    amp: bool | None = None  # None: on for CUDA (bf16 autocast)
    channels_last: bool | None = None  # None: on for CUDA
    train_bn: bool = False  # re-estimate BatchNorm statistics while training (default: keep them)
    augment: str | None = None  # "shift": random translation by up to 2 pixels of image inputs (teacher sees it too)
    seed: int = 0
    bar: bool = True  # tqdm progress bar with loss and held-out agreement
    grad_clip: float | None = 5.0
    # called at every held-out evaluation with (step, student module in eval mode); its dict of numbers
    # joins that point of the report's curve (your own metric, e.g. accuracy on a labelled set)
    monitor: Callable[[int, Any], dict[str, float]] | None = None

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise GraphpruneError(f"finetune steps must be >= 0, got {self.steps}")
        if self.batch_size < 1:
            raise GraphpruneError(f"finetune batch size must be >= 1, got {self.batch_size}")
        if not 0 <= self.warmup < 1:
            raise GraphpruneError(f"warmup must be a fraction of the steps in [0, 1), got {self.warmup}")
        if not self.lr > 0:
            raise GraphpruneError(f"finetune learning rate must be > 0, got {self.lr}")
        if self.augment not in (None, "shift"):
            raise GraphpruneError(f"unknown augmentation {self.augment!r}: choose shift or none")
        if self.optimizer not in ("adamw", "sgd"):
            raise GraphpruneError(f"unknown optimizer {self.optimizer!r}: choose adamw or sgd")
        if not self.temperature > 0:
            raise GraphpruneError(f"distillation temperature must be > 0, got {self.temperature}")
        if self.device not in ("cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise GraphpruneError(f"unknown device {self.device!r}: choose cpu or cuda")
        for name, kind in self.loss.items():
            if not callable(kind) and kind not in LOSS_KINDS:
                raise GraphpruneError(f"loss for output {name!r} must be one of {LOSS_KINDS} or a callable, got {kind!r}")


@dataclass
class FinetuneResult:
    """The fine-tuned model (ModelProto for ONNX input, nn.Module for a module) and its report."""

    model: Any
    report: dict[str, Any]

    def save(self, path: str | os.PathLike, overwrite: bool = True) -> None:
        import onnx

        if isinstance(self.model, onnx.ModelProto):
            from graphprune.io import write_model_atomic

            write_model_atomic(self.model, path, overwrite=overwrite)
        else:
            from graphprune.torch_io import save as save_module

            save_module(self.model, path)


# -- distributed (torchrun) ----------------------------------------------------------------------
def world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) in a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _init_distributed(device: str) -> Any:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist


# -- data ----------------------------------------------------------------------------------------
class _DataSpec:
    """Input names and shapes for a module's calibration data (the IR graph plays this role for ONNX)."""

    def __init__(self, names: list[str], shapes: dict[str, tuple[int, ...]]) -> None:
        self.inputs = names
        self._shapes = shapes

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]


def _module_spec(data: Any, example_inputs: Any) -> _DataSpec:
    import torch

    ref = example_inputs
    if ref is None:
        if isinstance(data, (str, os.PathLike)) and os.fspath(data).endswith(".npz") and os.path.isfile(data):
            try:
                with np.load(data) as z:
                    ref = z[z.files[0]][:1] if len(z.files) == 1 else None
            except (OSError, ValueError, IndexError):
                ref = None  # load_calibration reports the unreadable file
        elif isinstance(data, np.ndarray) or isinstance(data, torch.Tensor):
            ref = data[:1]
    if isinstance(ref, (tuple, list)) and len(ref) == 1:
        ref = ref[0]
    if ref is None or not hasattr(ref, "shape") or len(ref.shape) < 1:
        raise GraphpruneError("fine-tuning an nn.Module needs example_inputs (or data given as one array / .npz)")
    return _DataSpec(["input"], {"input": (1,) + tuple(ref.shape[1:])})


def _load_data(data: Any, spec: Any, samples: int | None, preprocess: Any) -> tuple[Any, Any]:
    from graphprune.calib import load_calibration, split_holdout

    calib = load_calibration(data, spec, samples=samples, preprocess=preprocess)
    return split_holdout(calib)


def check_data(original: Any, data: Any, samples: int | None, preprocess: Any, input_shape: Any) -> None:
    """Validate the data against an ONNX model's inputs (what finetune does first), without training."""
    from graphprune.frontends.onnx_frontend import load_onnx

    _load_data(data, load_onnx(original, input_shape).graph, samples, preprocess)


def _tensors(calib: Any, names: list[str]) -> list[Any]:
    """All samples of a Calibration as float tensors, one per model input (training shuffles them)."""
    import torch

    parts: dict[str, list[np.ndarray]] = {k: [] for k in calib.names}
    for batch in calib.batches(256):
        for k in calib.names:
            parts[k].append(batch[k])
    order = names if set(names) == set(calib.names) else calib.names
    return [torch.from_numpy(np.ascontiguousarray(np.concatenate(parts[k]))) for k in order]


# -- losses --------------------------------------------------------------------------------------
def kl_logits(student: Any, teacher: Any, temperature: float, axis: int = -1) -> Any:
    """KL(teacher || student) of temperature-softened distributions along `axis`, summed over classes and
    averaged over every other position (a sequence model's time steps count like samples); scaled by T^2."""
    import torch.nn.functional as F

    t = temperature
    s_log = F.log_softmax(student.float() / t, dim=axis)
    t_log = F.log_softmax(teacher.float() / t, dim=axis)
    kl = F.kl_div(s_log, t_log, log_target=True, reduction="none").sum(axis)
    return kl.mean() * t * t


def mse_scaled(student: Any, teacher: Any) -> Any:
    """MSE divided by the teacher's mean square, so outputs and features of any scale weigh alike."""
    s, t = student.float(), teacher.float()
    return ((s - t) ** 2).mean() / (t ** 2).mean().clamp_min(1e-12)


@dataclass
class OutputLoss:
    """How one output is matched: kind, the tensor compared (a Softmax's input logits) and its class axis."""

    name: str
    kind: str
    tap: str | None = None  # intermediate tensor compared instead of the output (ONNX)
    axis: int = -1
    fn: Callable[[Any, Any], Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"output": self.name, "loss": self.kind if self.fn is None else "custom",
                **({"on": self.tap} if self.tap else {})}


def outputs_loss(losses: list[OutputLoss], s_outs: tuple[Any, ...], t_outs: tuple[Any, ...],
                 s_cap: dict[str, Any], t_cap: dict[str, Any], temperature: float) -> Any:
    """The distillation loss summed over outputs: each compared as its OutputLoss says (a Softmax output on
    its captured input logits). Shared by finetune and the training-based methods' label-free runs."""
    total: Any = 0.0
    for e, s, t in zip(losses, s_outs, t_outs):
        if e.tap:
            s, t = s_cap[e.tap], t_cap[e.tap]
        if e.fn is not None:
            total = total + e.fn(s, t)
        elif e.kind == "kl":
            total = total + kl_logits(s, t, temperature, e.axis)
        else:
            total = total + mse_scaled(s, t)
    return total


def onnx_output_losses(proto: Any, overrides: dict[str, Any]) -> list[OutputLoss]:
    """KL on the logits for Softmax/LogSoftmax outputs and for rank-2 float outputs (classifier logits),
    scale-free MSE for anything else (features, boxes, regressions); `overrides` wins."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    shapes = {o.name: [d.dim_value if d.HasField("dim_value") else None for d in o.type.tensor_type.shape.dim]
              for o in proto.graph.output}
    opset = next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
    unknown = set(overrides) - set(shapes)
    if unknown:
        raise GraphpruneError(f"loss override for unknown output(s) {sorted(unknown)}; outputs are {list(shapes)}")
    out = []
    for o in proto.graph.output:
        node = producer.get(o.name)
        rank = len(shapes[o.name])
        entry = OutputLoss(o.name, "mse")
        if node is not None and node.op_type in ("Softmax", "LogSoftmax"):
            axis = next((a.i for a in node.attribute if a.name == "axis"), -1 if opset >= 13 else 1)
            entry = OutputLoss(o.name, "kl", tap=node.input[0], axis=int(axis))
        elif rank == 2 and o.type.tensor_type.elem_type == 1 and (shapes[o.name][1] or 2) > 1:
            entry = OutputLoss(o.name, "kl", axis=1)
        _override(entry, overrides.get(o.name))
        out.append(entry)
    return out


def _override(entry: OutputLoss, kind: Any) -> None:
    if kind is None:
        return
    if callable(kind):
        entry.fn, entry.kind = kind, "custom"
    elif kind == "mse":
        entry.kind, entry.tap = "mse", None
    else:
        entry.kind = "kl"


def module_output_losses(outputs: list[Any], overrides: dict[str, Any]) -> list[OutputLoss]:
    """For an nn.Module: KL for rank-2 float outputs with more than one column (logits), else MSE;
    outputs are named output0, output1, ... for overrides."""
    out = []
    for i, t in enumerate(outputs):
        kind = "kl" if t.dim() == 2 and t.shape[1] > 1 and t.is_floating_point() else "mse"
        entry = OutputLoss(f"output{i}", kind, axis=1)
        _override(entry, overrides.get(entry.name))
        out.append(entry)
    unknown = set(overrides) - {e.name for e in out}
    if unknown:
        raise GraphpruneError(f"loss override for unknown output(s) {sorted(unknown)}; outputs are "
                              f"{[e.name for e in out]}")
    return out


def touched_onnx_tensors(original: Any, slim: Any) -> list[str]:
    """Outputs of the layers whose inputs the plan pruned but whose own outputs kept every channel
    (Conv/Gemm/MatMul with a smaller weight in the slim model, same output width): same shape in both
    models, so the student's features can be matched to the teacher's directly."""
    dims = {t.name: list(t.dims) for t in original.graph.initializer}
    out = []
    for node in slim.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        w = next((t for t in slim.graph.initializer if t.name == node.input[1]), None)
        if w is None or w.name not in dims or list(w.dims) == dims[w.name]:
            continue
        old, new = dims[w.name], list(w.dims)
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        out_axis = 0 if node.op_type == "Conv" or (node.op_type == "Gemm" and trans_b) else len(new) - 1
        if new[out_axis] == old[out_axis]:
            out.append(node.output[0])
    return out


def touched_modules(original: Any, slim: Any) -> list[str]:
    """Module names (Conv/Linear) whose input width the plan cut and whose output width is unchanged."""
    from torch import nn

    orig = dict(original.named_modules())
    out = []
    for name, m in slim.named_modules():
        o = orig.get(name)
        if not isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) or type(o) is not type(m):
            continue
        grouped = getattr(m, "groups", 1) != 1
        if m.weight.shape != o.weight.shape and m.weight.shape[0] == o.weight.shape[0] and not grouped:
            out.append(name)
    return out


# -- held-out agreement --------------------------------------------------------------------------
def agreement_score(agreement: dict[str, Any]) -> float:
    """One number from output_agreement: mean top-1 agreement where defined, else mean cosine."""
    outs = agreement["outputs"]
    top = [o["top1_agreement"] for o in outs if "top1_agreement" in o]
    return float(np.mean(top)) if top else float(np.mean([o["cosine"] for o in outs]))


def _outputs(model: Any, xs: list[Any], batch: int, device: Any) -> list[np.ndarray]:
    import torch

    model.eval()
    got: list[list[np.ndarray]] = []
    with torch.no_grad():
        for i in range(0, len(xs[0]), batch):
            outs = _as_tuple(model(*[x[i: i + batch].to(device) for x in xs]))
            if not got:
                got = [[] for _ in outs]
            for k, o in enumerate(outs):
                got[k].append(o.float().cpu().numpy())
    return [np.concatenate(g) for g in got]


def _as_tuple(out: Any) -> tuple[Any, ...]:
    if isinstance(out, (tuple, list)):
        return tuple(out)
    if isinstance(out, dict):
        return tuple(out.values())
    return (out,)


# -- the public entry point ----------------------------------------------------------------------
def finetune(original: Any, slim: Any, data: Any, *, samples: int | None = None, preprocess: Any = None,
             input_shape: dict[str, tuple[int, ...]] | None = None, example_inputs: Any = None,
             progress: Callable[[str], None] | None = None, **options: Any) -> FinetuneResult:
    """Distil `original` (teacher) into `slim` (student) on unlabeled `data` and return the tuned model.

    `original`/`slim`: ONNX paths or ModelProtos (the slim one returned tuned, as a ModelProto), or two
    nn.Modules (the slim one copied, then trained). `data`: anything `--calib` accepts (an .npz, an
    image folder with `preprocess`, arrays, a dict of arrays, an iterable of batches); the last 1/8
    (at most 64 samples) is held out to measure agreement with the original before and after.
    `options`: FinetuneOptions fields (steps, batch_size, lr, optimizer, temperature, loss,
    feature_weight, eval_every, patience, device, amp, channels_last, train_bn, seed, bar).
    """
    opts = FinetuneOptions(**options)
    from graphprune.adapters import is_torch_module as _is_torch_module

    if _is_torch_module(original) != _is_torch_module(slim):
        raise GraphpruneError("finetune needs two ONNX models or two nn.Modules, not one of each")
    say = progress or (lambda _msg: None)
    if _is_torch_module(slim):
        return _finetune_module(original, slim, data, opts, samples, preprocess, example_inputs, say)
    return _finetune_onnx(original, slim, data, opts, samples, preprocess, input_shape, say)


def _device(opts: FinetuneOptions) -> Any:
    import torch

    rank, size, local = world()
    if opts.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise GraphpruneError("--device cuda requested but no CUDA device is available")
        return torch.device(f"cuda:{local}" if size > 1 or opts.device == "cuda" else opts.device)
    return torch.device("cpu")


def _finetune_onnx(original: Any, slim: Any, data: Any, opts: FinetuneOptions, samples: int | None,
                   preprocess: Any, input_shape: Any, say: Callable[[str], None]) -> FinetuneResult:
    from graphprune.frontends.onnx_frontend import load_onnx
    from graphprune.frontends.onnx_torch import OnnxModule, export_onnx

    t0 = time.perf_counter()
    say("loading models")
    teacher_m = load_onnx(original, input_shape)
    student_m = load_onnx(slim, input_shape)
    t_in, s_in = list(teacher_m.graph.inputs), list(student_m.graph.inputs)
    t_out = [o.name for o in teacher_m.proto.graph.output]
    s_out = [o.name for o in student_m.proto.graph.output]
    if t_in != s_in or t_out != s_out:
        raise GraphpruneError(f"the slim model's inputs/outputs {s_in}/{s_out} differ from the original's "
                              f"{t_in}/{t_out}: is it a pruned version of it?")
    say("reading data")
    fit, hold = _load_data(data, teacher_m.graph, samples, preprocess)
    teacher = OnnxModule(teacher_m.proto)
    student = OnnxModule(student_m.proto, train_bn=opts.train_bn)
    losses = onnx_output_losses(teacher_m.proto, opts.loss)
    features = touched_onnx_tensors(teacher_m.proto, student_m.proto) if opts.feature_weight > 0 else []
    taps = {e.tap for e in losses if e.tap} | set(features)
    teacher.taps = student.taps = taps
    report, student = _distil(teacher, student, fit, hold, s_in, losses, features, opts, say)
    say("exporting and validating")
    tuned = export_onnx(student, student_m.proto)
    report["export_max_abs_diff"] = _check_export(student, tuned, hold, s_in, opts)
    _validate(teacher_m, tuned)
    report["time_s"] = time.perf_counter() - t0
    return FinetuneResult(tuned, report)


def _check_export(student: Any, tuned: Any, hold: Any, names: list[str], opts: FinetuneOptions) -> float:
    """The written model must compute what the trained module computes (fp32, held-out samples)."""
    import torch

    from graphprune.rewrite.validate import run_onnx

    xs = _tensors(hold.subset(0, min(hold.n, 8)), names)
    student.to(torch.device("cpu"), memory_format=torch.contiguous_format).float()
    ref = _outputs(student, xs, 8, torch.device("cpu"))
    got = run_onnx(tuned, {n: x.numpy() for n, x in zip(names, xs)})
    diff = max(float(np.abs(r - g).max()) for r, g in zip(ref, got))
    scale = max(1.0, max(float(np.abs(r).max()) for r in ref))
    if diff > 1e-4 * scale:
        raise GraphpruneError(f"exported model differs from the trained module by {diff:.2e}: not written")
    return diff


def _validate(teacher_m: Any, tuned: Any) -> None:
    from graphprune.rewrite.validate import random_feed, validate

    feed = random_feed(teacher_m.proto, teacher_m.graph, 0)
    expected = [teacher_m.graph.shape(o) for o in teacher_m.graph.outputs]
    if any(s is None for s in expected):
        from graphprune.rewrite.validate import run_onnx

        expected = [tuple(o.shape) for o in run_onnx(teacher_m.proto, feed)]
    validate(tuned, feed, expected)


def _finetune_module(original: Any, slim: Any, data: Any, opts: FinetuneOptions, samples: int | None,
                     preprocess: Any, example_inputs: Any, say: Callable[[str], None]) -> FinetuneResult:
    import torch

    t0 = time.perf_counter()
    spec = _module_spec(data, example_inputs)
    say("reading data")
    fit, hold = _load_data(data, spec, samples, preprocess)
    # the data check runs on the CPU; modules handed in on a GPU (e.g. after an evaluation there) move too
    teacher = copy.deepcopy(original).cpu().eval()
    student = copy.deepcopy(slim).cpu()
    try:
        with torch.no_grad():
            xs = _tensors(hold.subset(0, 1), spec.inputs)
            outs = _as_tuple(teacher(*xs))
            s_outs = _as_tuple(student.eval()(*xs))
    except Exception as exc:  # noqa: BLE001 - the user's data does not fit the module
        raise GraphpruneError(f"the models cannot run on this data: {type(exc).__name__}: "
                              f"{(str(exc).splitlines() or [''])[0][:200]}") from None
    if [tuple(o.shape) for o in outs] != [tuple(o.shape) for o in s_outs]:
        raise GraphpruneError("the slim module's outputs differ in shape from the original's")
    losses = module_output_losses(list(outs), opts.loss)
    features = touched_modules(original, slim) if opts.feature_weight > 0 else []
    _hook_features(teacher, student, features)
    report, student = _distil(teacher, student, fit, hold, spec.inputs, losses, features, opts, say)
    for h in getattr(student, "_gp_hooks", []) + getattr(teacher, "_gp_hooks", []):
        h.remove()
    student.to("cpu", memory_format=torch.contiguous_format).float()
    report["time_s"] = time.perf_counter() - t0
    return FinetuneResult(student, report)


def _hook_features(teacher: Any, student: Any, names: list[str]) -> None:
    """Module outputs at `names` land in `.captured[name]` (the ONNX module's tap mechanism, for modules)."""
    for model in (teacher, student):
        model.captured = {}
        mods = dict(model.named_modules())
        hooks = []
        for name in names:
            def hook(_m: Any, _i: Any, out: Any, name: str = name, model: Any = model) -> None:
                model.captured[name] = out
            hooks.append(mods[name].register_forward_hook(hook))
        model._gp_hooks = hooks


def _distil(teacher: Any, student: Any, fit: Any, hold: Any, names: list[str], losses: list[OutputLoss],
            features: list[str], opts: FinetuneOptions, say: Callable[[str], None]) -> tuple[dict[str, Any], Any]:
    """Train `student` towards `teacher` with the shared loop; returns the report and the trained student."""
    import torch

    from graphprune.passes.training import TrainConfig, _shift, optimize
    from graphprune.recovery import output_agreement

    rank, size, _local = world()
    dev = _device(opts)
    cuda = dev.type == "cuda"
    amp = cuda if opts.amp is None else bool(opts.amp and cuda)
    channels_last = cuda if opts.channels_last is None else bool(opts.channels_last)
    torch.manual_seed(opts.seed)
    if size > 1:
        dist = _init_distributed(str(dev))
        if cuda:
            torch.cuda.set_device(dev)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    teacher.to(dev, memory_format=fmt).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.to(dev, memory_format=fmt)
    xs_fit = _tensors(fit, names)
    xs_hold = _tensors(hold, names)
    if not xs_fit or len(xs_fit[0]) == 0:
        raise GraphpruneError("no training samples left after the held-out split; give more data")
    n = len(xs_fit[0])
    batch = min(opts.batch_size, n)
    if batch % size:
        raise GraphpruneError(f"batch size {batch} is not divisible by the {size} processes")

    def to_dev(x: Any) -> Any:
        x = x.to(dev, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x

    ref = _outputs(teacher, xs_hold, 64, dev)

    def agreement() -> dict[str, Any]:
        res = output_agreement(ref, _outputs(student, xs_hold, 64, dev))
        res["samples"] = hold.n
        for e, entry in zip(losses, res["outputs"]):
            entry["name"] = e.name
        return res

    before = agreement()
    model = student
    if size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(student, device_ids=[dev.index] if cuda else None)

    gen = torch.Generator().manual_seed(opts.seed)

    def stream() -> Any:
        while True:
            order = torch.randperm(n, generator=gen)
            for i in range(0, n - batch + 1, batch):
                idx = order[i: i + batch]
                mine = idx[rank * (batch // size): (rank + 1) * (batch // size)]
                xb = [to_dev(x[mine]) for x in xs_fit]
                if opts.augment == "shift":
                    xb = [_shift(x, gen) if x.dim() == 4 else x for x in xb]
                yield xb

    frozen_bn = [] if opts.train_bn else [m for m in student.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    def batch_loss(xb: list[Any]) -> Any:
        student.train()
        for m in frozen_bn:  # nn.Modules: keep BatchNorm on its running statistics unless train_bn
            m.eval()
        with torch.no_grad():
            t_outs = _as_tuple(teacher(*xb))
            t_cap = dict(teacher.captured) if hasattr(teacher, "captured") else {}
        s_outs = _as_tuple(model(*xb))
        s_cap = student.captured if hasattr(student, "captured") else {}
        total = outputs_loss(losses, s_outs, t_outs, s_cap, t_cap, opts.temperature)
        if features:
            feat = sum(mse_scaled(s_cap[f], t_cap[f]) for f in features) / len(features)
            total = total + opts.feature_weight * feat
        return total

    curve: list[dict[str, Any]] = []

    def evaluate(step: int) -> float:
        agree = agreement()
        score = agreement_score(agree)
        cosine = float(np.mean([o["cosine"] for o in agree["outputs"]]))
        curve.append({"step": step, "agreement": score, "cosine": cosine})
        if opts.monitor is not None:
            curve[-1].update(opts.monitor(step, student.eval()))
        return score + 1e-3 * cosine  # top-1 agreement on few samples ties often: cosine breaks ties

    cfg = TrainConfig(lr=opts.lr, warmup=opts.warmup, weight_decay=opts.weight_decay, optimizer=opts.optimizer, device=str(dev),
                      amp=amp, eval_every=opts.eval_every if opts.steps else 0, patience=opts.patience,
                      grad_clip=opts.grad_clip, progress=opts.bar and rank == 0, desc="distilling")
    say(f"distilling: {opts.steps} steps, batch {batch}, {size} process(es) on {dev.type}")
    t = time.perf_counter()
    res = optimize(model, cfg, stream(), batch_loss, opts.steps, evaluate=evaluate if opts.eval_every else None)
    train_s = time.perf_counter() - t
    student.eval()
    if hasattr(student, "taps"):
        student.taps = set()
        teacher.taps = set()
    after = agreement()
    report = {
        "teacher_student": [e.to_json() for e in losses],
        "features": features,
        "feature_weight": opts.feature_weight,
        "samples": {"train": n, "heldout": hold.n, "source": fit.source},
        "steps": res.steps, "steps_planned": opts.steps, "batch_size": batch,
        "optimizer": opts.optimizer, "lr": opts.lr, "augment": opts.augment, "temperature": opts.temperature,
        "device": dev.type, "processes": size, "amp": amp, "channels_last": channels_last, "seed": opts.seed,
        "stopped_early": res.stopped_early, "best_step": res.best_step,
        "loss_first": res.losses[0] if res.losses else None, "loss_last": res.losses[-1] if res.losses else None,
        "curve": curve, "train_s": train_s, "step_s": train_s / max(1, res.steps),
        "agreement_before": before, "agreement_after": after,
        "score_before": agreement_score(before), "score_after": agreement_score(after),
    }
    if size > 1:
        dist.barrier()
    return report, student


def prune_then_finetune(prune: Callable[..., Any], model: Any, example_inputs: Any, steps: int,
                        options: dict[str, Any] | None, **kwargs: Any) -> Any:
    """graphprune.prune(..., finetune_steps=N): prune, then distil the original into the result on the
    calibration inputs; the result's model is replaced and its report gains "finetune"."""
    calib = kwargs.get("calib")
    if calib is None:
        raise GraphpruneError("finetune_steps needs calibration data (calib=... / --calib): the inputs to distil on")
    if isinstance(calib, tuple) and len(calib) == 2:
        calib = calib[0]  # DI-style (inputs, labels): distillation needs only the inputs
    result = prune(model, example_inputs, **kwargs)
    say = kwargs.get("progress")
    opts = {"seed": kwargs.get("seed", 0), **(options or {}), "steps": steps}
    if say is not None:
        opts.setdefault("bar", False)
    ft = finetune(model, result.model, calib, samples=kwargs.get("calib_samples"),
                  preprocess=kwargs.get("calib_preprocess"), input_shape=kwargs.get("input_shape"),
                  example_inputs=example_inputs, progress=say, **opts)
    result.model = ft.model
    result.report["finetune"] = ft.report
    return result
