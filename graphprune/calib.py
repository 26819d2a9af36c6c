"""Calibration data: unlabeled model inputs for data-aware pruning and recovery (the I/O edge).

Sources: an `.npz` (one array per model input name, or one array for a single-input model; samples
on axis 0), a folder of images with explicit preprocessing, in-memory arrays (or a dict of them), or
any iterable of input batches. Everything is checked against the model's inputs before any work
starts, so bad data fails with one clear line instead of an onnxruntime traceback half way through.

Arrays are kept as given (inputs are small next to activations); image folders are decoded lazily,
batch by batch, so a large folder never sits in memory. Activations are never stored here: the
capture code streams batches through the model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from graphprune.errors import GraphpruneError

Batch = dict[str, np.ndarray]
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")


@dataclass
class ImagePreprocess:
    """How image files become a model input: resize, channel order, scaling, layout.

    Pixels are scaled to [0, 1], then (x - mean) / std per channel; e.g. mean=std=0.5 gives [-1, 1].
    """

    size: tuple[int, int]
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    bgr: bool = False
    layout: str = "NCHW"
    grayscale: bool = False

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) <= 0:
            raise GraphpruneError(f"bad calibration image size {self.size}: expected H,W > 0")
        if self.layout not in ("NCHW", "NHWC"):
            raise GraphpruneError(f"bad calibration layout {self.layout!r}: expected NCHW or NHWC")
        if any(s == 0 for s in self.std):
            raise GraphpruneError("calibration std must not contain 0")

    def load(self, path: str) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                im = im.convert("L" if self.grayscale else "RGB")
                im = im.resize((self.size[1], self.size[0]), Image.BILINEAR)
                x = np.asarray(im, dtype=np.float32) / 255.0
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise GraphpruneError(f"cannot read calibration image {path}: {type(exc).__name__}") from None
        if x.ndim == 2:
            x = x[:, :, None]
        if self.bgr:
            x = x[:, :, ::-1]
        c = x.shape[2]
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        for name, v in (("mean", mean), ("std", std)):
            if v.size not in (1, c):
                raise GraphpruneError(f"calibration {name} has {v.size} values, the images have {c} channels")
        x = (x - mean) / std
        return np.ascontiguousarray(x.transpose(2, 0, 1) if self.layout == "NCHW" else x)


Chunks = Callable[[int, int, int], Iterator[Batch]]  # (start, stop, size) -> batches of samples [start, stop)


def _sliced(get: Callable[[int, int], Batch]) -> Chunks:
    """Chunks of a random-access source."""
    def chunks(start: int, stop: int, size: int) -> Iterator[Batch]:
        for i in range(start, stop, max(1, size)):
            yield get(i, min(i + size, stop))
    return chunks


@dataclass
class Calibration:
    """Validated calibration inputs: `n` samples, delivered as batches of a dict input name -> array.

    `batches(size)` can be called any number of times (each call is a fresh pass over the data).
    """

    names: list[str]
    n: int
    _chunks: Chunks
    source: str = "arrays"
    meta: dict[str, Any] = field(default_factory=dict)

    def batches(self, size: int, start: int = 0, stop: int | None = None) -> Iterator[Batch]:
        stop = self.n if stop is None else min(stop, self.n)
        return self._chunks(start, stop, max(1, size))

    def subset(self, start: int, stop: int) -> "Calibration":
        """Samples [start, stop) as a Calibration of their own (e.g. a held-out split)."""
        stop = min(stop, self.n)
        chunks = self._chunks
        return Calibration(self.names, max(0, stop - start),
                           lambda a, b, size: chunks(start + a, start + b, size), self.source, dict(self.meta))


def _input_specs(graph: Any) -> dict[str, tuple[int, ...]]:
    """Model input name -> per-sample shape (batch axis dropped) from the analysed (pinned) IR."""
    specs = {}
    for name in graph.inputs:
        shape = graph.shape(name)
        if shape is None:
            raise GraphpruneError(f"input '{name}' has no known shape; pass --input-shape")
        specs[name] = tuple(shape[1:])
    return specs


def _check_array(name: str, arr: Any, sample_shape: tuple[int, ...], what: str) -> np.ndarray:
    try:
        a = np.asarray(arr)
    except Exception as exc:
        raise GraphpruneError(f"calibration {what} for input '{name}' is not an array ({type(exc).__name__})") from None
    if a.dtype == object or not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise GraphpruneError(f"calibration {what} for input '{name}' has dtype {a.dtype}; expected numbers")
    if a.ndim != len(sample_shape) + 1:
        raise GraphpruneError(
            f"calibration {what} for input '{name}' has shape {tuple(a.shape)}; expected (N, "
            f"{', '.join(map(str, sample_shape))}) with samples on axis 0"
        )
    if tuple(a.shape[1:]) != tuple(sample_shape):
        raise GraphpruneError(
            f"calibration {what} for input '{name}' has sample shape {tuple(a.shape[1:])}; the model "
            f"expects {tuple(sample_shape)}"
        )
    if a.shape[0] == 0:
        raise GraphpruneError(f"calibration {what} for input '{name}' is empty")
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise GraphpruneError(f"calibration {what} for input '{name}' contains NaN or infinite values")
    return a


def _from_arrays(arrays: dict[str, Any], specs: dict[str, tuple[int, ...]], what: str,
                 dtypes: dict[str, Any]) -> Calibration:
    missing = [n for n in specs if n not in arrays]
    extra = [n for n in arrays if n not in specs]
    if missing or extra:
        raise GraphpruneError(
            f"calibration {what} has arrays {sorted(arrays)}; the model inputs are {list(specs)}"
        )
    checked = {n: _check_array(n, arrays[n], specs[n], what) for n in specs}
    counts = {n: a.shape[0] for n, a in checked.items()}
    if len(set(counts.values())) != 1:
        raise GraphpruneError(f"calibration arrays have different sample counts {counts}")
    n = next(iter(counts.values()))
    data = {k: v.astype(dtypes.get(k, np.float32), copy=False) for k, v in checked.items()}
    return Calibration(list(specs), n, _sliced(lambda a, b: {k: v[a:b] for k, v in data.items()}), what)


def _from_npz(path: str, specs: dict[str, tuple[int, ...]], dtypes: dict[str, Any]) -> Calibration:
    # numpy falls back to unpickling anything that is not a zip or .npy file and then blames "pickled
    # data": a text file or a .npy given as --calib would get that misleading line
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as exc:
        raise GraphpruneError(f"cannot read calibration file {path}: {exc.strerror or type(exc).__name__}") from None
    if not head.startswith(b"PK"):
        found = "a .npy array" if head == b"\x93NUMPY" else "not a zip archive"
        raise GraphpruneError(f"calibration file {path} is not an .npz archive ({found}); write one with "
                              f"numpy.savez(path, x=array), one array per model input")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as exc:  # zipfile, pickle and value errors all mean the same to the user
        raise GraphpruneError(f"cannot read calibration file {path}: {type(exc).__name__}: {str(exc)[:120]}") from None
    if not arrays:
        raise GraphpruneError(f"calibration file {path} holds no arrays")
    if len(specs) == 1 and len(arrays) == 1:
        arrays = {next(iter(specs)): next(iter(arrays.values()))}
    elif len(specs) == 1 and next(iter(specs)) not in arrays and "x" in arrays:
        arrays = {next(iter(specs)): arrays["x"]}  # DI-style (x, y) file: labels are not used here
    return _from_arrays(arrays, specs, f"file {os.path.basename(path)}", dtypes)


def _from_folder(path: str, specs: dict[str, tuple[int, ...]], pre: ImagePreprocess | None,
                 dtypes: dict[str, Any]) -> Calibration:
    if len(specs) != 1:
        raise GraphpruneError(f"an image folder can only feed a single-input model; this one has {list(specs)}")
    if pre is None:
        raise GraphpruneError("calibration from an image folder needs --calib-size H,W (and --calib-mean/--calib-std)")
    files = sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTS)
    )
    if not files:
        raise GraphpruneError(f"calibration folder {path} holds no images ({', '.join(IMAGE_EXTS)})")
    name = next(iter(specs))
    probe = pre.load(files[0])
    if tuple(probe.shape) != specs[name]:
        raise GraphpruneError(
            f"preprocessed calibration images have shape {tuple(probe.shape)}; the model input '{name}' "
            f"expects {specs[name]} (check --calib-size and the layout)"
        )
    dtype = dtypes.get(name, np.float32)

    def get(a: int, b: int) -> Batch:
        return {name: np.stack([pre.load(f) for f in files[a:b]]).astype(dtype, copy=False)}

    return Calibration([name], len(files), _sliced(get), f"folder {path}")


def _as_batch(item: Any, names: list[str]) -> dict[str, Any]:
    if isinstance(item, dict):
        batch = item
    elif isinstance(item, (list, tuple)) and len(names) > 1:
        batch = dict(zip(names, item))
    else:
        batch = {names[0]: item}
    return {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else v) for k, v in batch.items()}


def _from_iterable(batches: Iterable[Any], specs: dict[str, tuple[int, ...]], limit: int | None,
                   dtypes: dict[str, Any]) -> Calibration:
    """Batches from an iterable. A re-iterable source (a list, a DataLoader, an object whose
    __iter__ starts over) is validated in one streaming pass and re-read on every use, so its size
    does not bound memory; a one-shot iterator (a generator) is read once and kept."""
    names = list(specs)
    reiterable = iter(batches) is not batches

    def checked(item: Any) -> Batch:
        part = _from_arrays(_as_batch(item, names), specs, "batch", dtypes)
        return next(part.batches(part.n))

    if reiterable:
        n = 0
        for item in batches:
            n += len(next(iter(checked(item).values())))
            if limit is not None and n >= limit:
                break
        if n == 0:
            raise GraphpruneError("calibration data is empty")

        def chunks(start: int, stop: int, size: int) -> Iterator[Batch]:
            pos, pending = 0, []
            have = 0
            for item in batches:
                if pos >= stop:
                    break
                b = checked(item)
                k = len(next(iter(b.values())))
                lo, hi = max(start - pos, 0), min(stop - pos, k)
                pos += k
                if hi <= lo:
                    continue
                pending.append({key: v[lo:hi] for key, v in b.items()})
                have += hi - lo
                while have >= size:
                    joined = stack(pending)
                    yield {key: v[:size] for key, v in joined.items()}
                    rest = {key: v[size:] for key, v in joined.items()}
                    have -= size
                    pending = [rest] if have else []
            if have:
                yield stack(pending)
        return Calibration(names, n, chunks, "iterable")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
    n = 0
    for item in batches:
        got = checked(item)
        for k in names:
            parts[k].append(got[k])
        n += len(got[names[0]])
        if limit is not None and n >= limit:
            break
    if n == 0:
        raise GraphpruneError("calibration data is empty")
    data = {k: np.concatenate(v) for k, v in parts.items()}
    return Calibration(names, n, _sliced(lambda a, b: {k: v[a:b] for k, v in data.items()}), "iterable")


def load_calibration(
    source: Any,
    graph: Any,
    *,
    samples: int | None = None,
    preprocess: ImagePreprocess | None = None,
    dtypes: dict[str, Any] | None = None,
    min_samples: int = 2,
) -> Calibration:
    """Turn any supported calibration source into a validated Calibration for the model `graph` (IR).

    `samples` takes the first N samples and fails when fewer exist; `min_samples` is what the
    recovery passes need (one held-out sample plus one to fit on).
    """
    specs = _input_specs(graph)
    dtypes = dtypes or {}
    if samples is not None and samples < min_samples:
        raise GraphpruneError(f"--calib-samples must be at least {min_samples}, got {samples}")
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise GraphpruneError(f"calibration data not found: {path}")
        if os.path.isdir(path):
            calib = _from_folder(path, specs, preprocess, dtypes)
        else:
            calib = _from_npz(path, specs, dtypes)
    elif isinstance(source, dict):
        calib = _from_arrays(source, specs, "arrays", dtypes)
    elif isinstance(source, np.ndarray) or hasattr(source, "detach"):
        if len(specs) != 1:
            raise GraphpruneError(f"the model has inputs {list(specs)}: pass a dict of arrays, one per input")
        arr = source.detach().cpu().numpy() if hasattr(source, "detach") else source
        calib = _from_arrays({next(iter(specs)): arr}, specs, "arrays", dtypes)
    elif isinstance(source, Iterable):
        calib = _from_iterable(source, specs, samples, dtypes)
    else:
        raise GraphpruneError(f"unsupported calibration data of type {type(source).__name__}")
    if calib.n < min_samples or (samples is not None and calib.n < samples):
        need = max(min_samples, samples or 0)
        raise GraphpruneError(f"calibration data has {calib.n} samples; {need} needed")
    if samples is not None:
        calib = calib.subset(0, samples)
    return calib


def parse_floats(value: str | None, what: str) -> tuple[float, ...] | None:
    """'0.5' or '0.485,0.456,0.406' (CLI helper)."""
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise GraphpruneError(f"bad {what} {value!r}: expected comma-separated numbers") from None
    if not out:
        raise GraphpruneError(f"bad {what} {value!r}")
    return out


def parse_size(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        h, w = (int(v) for v in value.replace("x", ",").split(","))
    except ValueError:
        raise GraphpruneError(f"bad --calib-size {value!r}: expected H,W") from None
    return (h, w)


def split_holdout(calib: Calibration, fraction: float = 0.125, cap: int = 64) -> tuple[Calibration, Calibration]:
    """Fit/held-out split: the last max(1, min(cap, n*fraction)) samples are only used to report agreement."""
    k = max(1, min(cap, int(calib.n * fraction)))
    return calib.subset(0, calib.n - k), calib.subset(calib.n - k, calib.n)


def stack(batches: Sequence[Batch]) -> Batch:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


@dataclass
class CalibrationSplit:
    """Calibration samples used for statistics/fitting, and the held-out ones used to report agreement."""

    fit: Calibration
    holdout: Calibration

    def summary(self) -> dict[str, Any]:
        return {"samples": self.fit.n + self.holdout.n, "fit_samples": self.fit.n,
                "heldout_samples": self.holdout.n, "source": self.fit.source}


def prepare_calibration(calib: Any, graph: Any, samples: int | None = None, preprocess: Any = None,
                        labelled: bool = False) -> CalibrationSplit:
    """Load and validate calibration data for a model's IR graph and split off held-out samples."""
    if labelled and isinstance(calib, tuple) and len(calib) == 2:
        calib = calib[0]  # DI-style (inputs, labels): recovery only needs the inputs
    data = load_calibration(calib, graph, samples=samples, preprocess=preprocess)
    fit, hold = split_holdout(data)
    return CalibrationSplit(fit, hold)
