"""Issue 12: hostile models - nothing read from outside the model's folder, no broken model called
valid, no traceback, cost independent of image size, no terminal/HTML injection through names.

Exit-code contract checked throughout: 0 only for a validated output meeting the target,
2 (one line on stderr) for every input problem, never a traceback."""
from __future__ import annotations

import os
import re

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.cli import main
from graphprune.errors import GraphpruneError
from graphprune.frontends.onnx_frontend import load_onnx
from hostile_models import conv_chain, huge_input, if_reads_outer, pixel_shuffle

SECRET = b"-----BEGIN OPENSSH PRIVATE KEY----- not for the model"
PRUNE = ["--target-flops", "0.5"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, env={"COLUMNS": "200"})


def assert_contract(res, out=None):
    """Exit 0 with a written output, or exit 2 with one stderr line; never anything else."""
    assert "Traceback" not in res.output
    if res.exit_code == 0:
        assert out is None or os.path.exists(out)
        return "ok"
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert len([ln for ln in res.stderr.splitlines() if ln.strip()]) == 1, res.stderr
    assert out is None or not os.path.exists(out)
    return "error"


def _external(t: TensorProto, location: str, offset: int | str = 0, length: int | str | None = None) -> None:
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    del t.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", None if length is None else str(length))):
        if value is not None:
            e = t.external_data.add()
            e.key, e.value = key, value


def constant_external_model(location: str, length: int = 64) -> onnx.ModelProto:
    """conv_chain plus a Constant whose value tensor is external (uint8, `length` bytes) and is an output."""
    model = conv_chain()
    value = helper.make_tensor("leak", TensorProto.UINT8, [length], vals=np.zeros(length, np.uint8).tobytes(), raw=True)
    _external(value, location, 0, length)
    model.graph.node.append(helper.make_node("Constant", [], ["leaked"], name="const", value=value))
    model.graph.output.append(helper.make_tensor_value_info("leaked", TensorProto.UINT8, [length]))
    return model


# -- external data: model folder only, every tensor at any depth ---------------------------------
@pytest.fixture()
def home(tmp_path, monkeypatch):
    """A 'home directory' holding a secret, the model in its own folder, run from home."""
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "id_ed25519").write_bytes(SECRET)
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _no_secret_anywhere(directory):
    for root, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(root, f)
            if ".ssh" not in path:
                assert SECRET[:20] not in open(path, "rb").read(), path


def test_constant_external_data_is_not_read_from_the_current_directory(home):
    src = home / "models" / "m.onnx"
    onnx.save(constant_external_model(".ssh/id_ed25519", len(SECRET)), str(src))
    res = run(src, *PRUNE, "-o", home / "models" / "slim.onnx")
    assert assert_contract(res, home / "models" / "slim.onnx") == "error"
    assert "external data" in res.stderr
    assert assert_contract(run("inspect", src)) == "error"
    _no_secret_anywhere(home)


@pytest.mark.parametrize("where", ["constant", "subgraph_initializer", "attribute_tensor", "sparse_initializer"])
def test_external_data_at_any_depth_resolves_against_the_model_folder(home, where):
    """Legitimate side data next to the model is loaded (from there, not the cwd)."""
    folder = home / "models"
    payload = np.arange(16, dtype=np.float32)
    (folder / "side.bin").write_bytes(payload.tobytes())
    (home / "side.bin").write_bytes(SECRET)  # a decoy in the current directory
    model = conv_chain()
    if where == "constant":
        t = numpy_helper.from_array(payload, "cval")
        _external(t, "side.bin", 0, 64)
        model.graph.node.insert(0, helper.make_node("Constant", [], ["cv"], name="const", value=t))
        model.graph.output.append(helper.make_tensor_value_info("cv", TensorProto.FLOAT, [16]))
    elif where == "subgraph_initializer":
        model = if_reads_outer("If")
        t = model.graph.node[-1].attribute[0].g.initializer[0]
        (folder / "side.bin").write_bytes(t.raw_data)
        _external(t, "side.bin", 0, os.path.getsize(folder / "side.bin"))
    elif where == "attribute_tensor":
        t = numpy_helper.from_array(payload, "cofs")
        _external(t, "side.bin", 0, 64)
        model.graph.node.insert(0, helper.make_node("ConstantOfShape", ["shp"], ["filled"], name="cos",
                                                    value=numpy_helper.from_array(np.array([1.0], np.float32))))
        model.graph.initializer.append(numpy_helper.from_array(np.array([4], np.int64), "shp"))
        model.graph.node.insert(0, helper.make_node("Constant", [], ["cv"], name="const", value=t))
        model.graph.output.append(helper.make_tensor_value_info("cv", TensorProto.FLOAT, [16]))
    else:
        values = numpy_helper.from_array(payload[:4], "sp_values")
        _external(values, "side.bin", 0, 16)
        sparse = helper.make_sparse_tensor(values, numpy_helper.from_array(np.array([0, 1, 2, 3], np.int64), "sp_idx"), [16])
        model.graph.sparse_initializer.append(sparse)
    src = folder / "m.onnx"
    onnx.save(model, str(src))
    from graphprune.frontends.onnx_frontend import read_model

    proto, _ = read_model(src)
    from graphprune.frontends.external import iter_tensors

    assert not any(t.data_location == TensorProto.EXTERNAL for t in iter_tensors(proto))
    assert all(SECRET[:16] not in t.raw_data for t in iter_tensors(proto))


def test_external_output_keeps_data_next_to_it(home):
    folder = home / "models"
    src = folder / "m.onnx"
    onnx.save(conv_chain(), str(src), save_as_external_data=True, location="m.bin", size_threshold=0)
    out = home / "elsewhere" / "slim.onnx"
    out.parent.mkdir()
    assert assert_contract(run(src, *PRUNE, "-o", out), out) == "ok"
    slim = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in slim.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"slim.onnx.data"}
    assert (out.parent / "slim.onnx.data").exists()


def _refusals(folder):
    outside = folder.parent / "outside.bin"
    outside.write_bytes(SECRET)
    (folder / "link.bin").symlink_to(outside)
    (folder / "sub").mkdir()
    (folder / "sub" / "link_dir").symlink_to(folder.parent)
    os.link(outside, folder / "hard.bin")
    (folder / "ok.bin").write_bytes(b"\0" * 64)
    return {
        "../outside.bin": "'..'", "sub/../../outside.bin": "'..'", str(outside): "absolute", "/etc/passwd": "absolute",
        "link.bin": "symbolic link", "sub/link_dir/outside.bin": "symbolic link", "hard.bin": "hard-linked",
        "C:\\Windows\\win.ini": "absolute", "..\\outside.bin": "'..'", "missing.bin": "not found", "": "empty",
        "sub": "not a regular file",
    }


def test_loader_refusal_rules(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    for location, word in _refusals(folder).items():
        src = folder / "m.onnx"
        onnx.save(constant_external_model(location, 16), str(src))
        with pytest.raises(GraphpruneError, match=re.escape(word)):
            load_onnx(str(src))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(location=st.one_of(st.sampled_from(["ok.bin", "./ok.bin", "link.bin", "../outside.bin", "hard.bin", "sub",
                                           "ok.bin/..", "ok.bin\x00x", "/dev/zero", "~/.ssh/id", "ok.bin/"]),
                          st.text(max_size=12)),
       offset=st.one_of(st.integers(-5, 100), st.sampled_from(["abc", "1e3", " 8", "-0", "99999999999999999999"])),
       length=st.one_of(st.none(), st.integers(-5, 100), st.sampled_from(["x", "18446744073709551617"])))
def test_fuzz_external_data_fields(tmp_path_factory, location, offset, length):
    """Any location/offset/length: loads only bytes of ok.bin, or one GraphpruneError; nothing else."""
    folder = tmp_path_factory.mktemp("fz") / "models"
    folder.mkdir()
    _refusals(folder)
    src = folder / "m.onnx"
    try:
        onnx.save(constant_external_model(location, 16), str(src))
        m = onnx.load(str(src), load_external_data=False)
        _external(m.graph.node[-1].attribute[0].t, location, offset, length)
        onnx.save(m, str(src))
    except (ValueError, UnicodeEncodeError):
        return  # protobuf refuses to store it: nothing to load
    try:
        loaded = load_onnx(str(src))
    except GraphpruneError as exc:
        assert "\n" not in str(exc)
        return
    value = loaded.graph.constants.get("leaked")
    assert value is not None and SECRET[:8] not in value.tobytes()


# -- subgraphs reading outer tensors: consumers like any other ----------------------------------
@pytest.mark.parametrize("kind", ["If", "Loop"])
def test_subgraph_reader_keeps_its_channels(tmp_path, kind):
    src = tmp_path / "m.onnx"
    onnx.save(if_reads_outer(kind), str(src))
    out = tmp_path / "slim.onnx"
    res = run(src, "--target-flops", "0.7", "-o", out)
    assert assert_contract(res, out) == "ok"
    slim = onnx.load(str(out))
    weights = {t.name: tuple(t.dims) for t in slim.graph.initializer}
    assert weights["w1"][0] == 16  # the producer read inside the body keeps all 16 channels
    assert weights["w0"][0] < 16  # the rest still prunes
    import onnxruntime as ort

    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"]).run(
            None, {"x": np.zeros((1, 3, 8, 8), np.float32)})


@pytest.mark.parametrize("kind", ["If", "Loop"])
@pytest.mark.parametrize("channels", [16, 12])
def test_validation_cannot_be_fooled_by_a_body_consumer(tmp_path, monkeypatch, kind, channels):
    """With the subgraph read ignored (the old analysis), validation itself must refuse the result."""
    import graphprune.analysis.engine as engine

    monkeypatch.setattr(engine, "_freeze_subgraph_reads", lambda ctx: None)
    src = tmp_path / "m.onnx"
    onnx.save(if_reads_outer(kind, channels), str(src))
    analysis = graphprune.analyze(str(src))
    group = next(g for g in analysis.groups if "t" in g.tensors)
    # an explicit plan removes these channels whatever the analysis froze: only validation stands in the way
    with pytest.raises(GraphpruneError, match="input channels"):
        graphprune.prune(str(src), removed=set(group.classes[: len(group.classes) // 2]))


def test_masked_original_comparison_catches_wrong_numbers(tmp_path, monkeypatch):
    """A rewrite that keeps the wrong channels gives a model with the right shapes that runs fine;
    only the comparison with the consumer-masked original can refuse it - and does."""
    from graphprune.rewrite import onnx_rewrite, validate

    src = tmp_path / "m.onnx"
    onnx.save(conv_chain(), str(src))
    assert "equals masked original" in graphprune.prune(str(src), target_flops=0.6).report["validation"]
    real = onnx_rewrite.param_indices

    def first_k(analysis, masks):  # keeps the first k channels instead of the chosen ones
        return {p: {ax: np.arange(len(idx)) for ax, idx in axes.items()} for p, axes in real(analysis, masks).items()}

    monkeypatch.setattr(onnx_rewrite, "param_indices", first_k)
    with pytest.raises(GraphpruneError, match="not equivalent to the original with the removed channels masked"):
        graphprune.prune(str(src), target_flops=0.6)
    reference = [np.ones((1, 4), np.float32)]
    assert validate.compare_to_masked(reference, [np.ones((1, 4), np.float32)]) is None
    assert validate.compare_to_masked([np.array([np.nan, 1.0])], [np.array([0.0, 1.0])]) is None


@pytest.mark.parametrize("depth", [1, 3, 12])
def test_nested_subgraphs_read_outer_tensor_at_any_depth(tmp_path, depth):
    model = if_reads_outer("If")
    branch = model.graph.node[-1]
    inner = branch.attribute[0].g
    for level in range(depth - 1):  # wrap the then-branch's Conv in further Ifs
        wrapped = helper.make_graph([helper.make_node("If", ["cond"], [inner.output[0].name], name=f"nest{level}",
                                                      then_branch=inner, else_branch=inner)],
                                    f"wrap{level}", [], list(inner.output))
        inner = wrapped
    branch.attribute[0].g.CopyFrom(inner)
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src))
    analysis = graphprune.analyze(str(src))
    group = next(g for g in analysis.groups if "t" in g.tensors)
    assert group.frozen and "subgraph" in group.reason


# -- size: per channel, not per element ---------------------------------------------------------
def test_huge_static_input_is_one_line(tmp_path):
    src = tmp_path / "huge.onnx"
    onnx.save(huge_input(), str(src))
    out = tmp_path / "o.onnx"
    res = run(src, *PRUNE, "-o", out)
    assert assert_contract(res, out) == "error" and "too large" in res.stderr
    analysis = graphprune.analyze(str(src))  # the analysis itself stays per channel
    assert max(sp.ids.size for sp in analysis.ctx.spaces.values()) <= 16


@pytest.mark.parametrize("size", [16, 512, 2048])
def test_pixel_shuffle_analysis_does_not_grow_with_image_size(tmp_path, size):
    from graphprune.analysis.spaces import MAX_LABELS

    src = tmp_path / "ps.onnx"
    onnx.save(pixel_shuffle(size), str(src))
    analysis = graphprune.analyze(str(src))
    assert max(sp.ids.size for sp in analysis.ctx.spaces.values()) <= MAX_LABELS
    stem = next(g for g in analysis.groups if g.size == 16)
    assert not stem.frozen  # the layer before the upsampler still prunes
    shuffled = [g for g in analysis.groups if g.size in (256, 64)]
    assert shuffled and all(g.frozen for g in shuffled)


# -- names: markup, escapes, U+2028, HTML ----------------------------------------------------------
HOSTILE_NAMES = ["x[/]", "a/[/]/Conv", "[bold red]boom[/]",
                 "\x1b[2K\r\x1b[32mOK: wrote slim.onnx\x1b[0m", "line\u2028break", "rtl\u202eexe.onnx", "bell\x07"]


def _clean(text: str) -> None:
    assert "\x1b" not in text and "\u2028" not in text and "\u202e" not in text and "\x07" not in text


def test_hostile_names_in_tables_progress_and_inspect(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(conv_chain(tuple(HOSTILE_NAMES[:3])), str(src))
    out = tmp_path / "o.onnx"
    res = run(src, *PRUNE, "-o", out)
    assert assert_contract(res, out) == "ok"
    assert "x[/]" in res.stdout
    res = run("inspect", src)
    assert res.exit_code == 0 and "[bold red]boom" in res.stdout  # printed literally, not as markup
    src2 = tmp_path / "m2.onnx"
    onnx.save(conv_chain(tuple(HOSTILE_NAMES[3:6])), str(src2))
    for args in ([src2, *PRUNE, "-o", tmp_path / "o2.onnx"], ["inspect", src2]):
        res = run(*args)
        assert res.exit_code == 0, res.output
        _clean(res.output)


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_in_error_lines(tmp_path, name):
    model = conv_chain()
    model.graph.node[1].input[0] = name  # reads a tensor nobody produces: an error naming it
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src))
    res = run(src, *PRUNE, "-o", tmp_path / "o.onnx")
    assert assert_contract(res, tmp_path / "o.onnx") == "error"
    _clean(res.stderr)


def test_html_report_script_data_cannot_be_escaped(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(conv_chain(("<!--<script>", "</script><script>alert(1)</script>", "c")), str(src))
    report = tmp_path / "r.html"
    res = run(src, *PRUNE, "-o", tmp_path / "o.onnx", "--report", report)
    assert res.exit_code == 0, res.output
    html = report.read_text()
    for script in re.findall(r"<script[^>]*>(.*?)</script>", html, flags=re.S):
        assert "<!--" not in script and "<script" not in script.lower() and "</" not in script
    assert "alert(1)</script>" not in html


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(names=st.lists(st.text(min_size=1, max_size=10), min_size=3, max_size=3, unique=True))
def test_fuzz_names_keep_the_contract(tmp_path_factory, names):
    folder = tmp_path_factory.mktemp("names")
    src = folder / "m.onnx"
    try:
        onnx.save(conv_chain(tuple(names)), str(src))
    except (ValueError, UnicodeEncodeError):
        return
    out = folder / "o.onnx"
    res = run(src, *PRUNE, "-o", out)
    assert_contract(res, out)
    _clean(res.output)
