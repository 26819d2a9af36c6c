"""Issue 18: every file the tool writes goes through one gate - never the input, never a device,
never a traceback, nothing written before the checks or on --dry-run, stale temps cleaned."""
from __future__ import annotations

import errno
import hashlib
import os
import signal
import socket
import stat
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import graphprune
import graphprune.outputs as outputs
from graphprune.cli import main
from graphprune.examples import example_cnn
from hostile_models import ir3_model
from test_atomic_output import CHILD, signal_mid_write

PRUNE = ["--target-flops", "0.5"]


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def listing(directory) -> dict[str, str]:
    return {f: (sha(os.path.join(directory, f)) if os.path.isfile(os.path.join(directory, f)) else "?")
            for f in sorted(os.listdir(directory))}


def run(*args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kw)


def one_line_error(res, *words):
    assert res.exit_code == 2, (res.exit_code, res.output)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output, res.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture()
def model(tmp_path):
    path = tmp_path / "in.onnx"
    onnx.save(example_cnn(image=16), str(path))
    return path


@pytest.fixture()
def external(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save(example_cnn(image=16), str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    return path


# -- the input is never an output ---------------------------------------------------------------
@pytest.mark.parametrize("dry", [False, True])
def test_report_naming_the_input_is_refused(model, tmp_path, dry):
    before = sha(model)
    res = run(model, *PRUNE, "-o", tmp_path / "out.onnx", "--report", model, *(["--dry-run"] if dry else []))
    one_line_error(res, "--report", "input model", "--overwrite")
    assert sha(model) == before and not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("flag", ["--svg", "--dot"])
def test_inspect_outputs_naming_the_input_are_refused(model, flag):
    before = sha(model)
    one_line_error(run("inspect", model, flag, model), flag, "input model")
    assert sha(model) == before


def test_bench_json_naming_the_input_is_refused(model):
    before = sha(model)
    one_line_error(run("bench", model, "--runs", 1, "--json", model), "--json", "input model")
    assert sha(model) == before


def test_report_and_output_being_the_same_file_is_refused(model, tmp_path):
    out = tmp_path / "out.onnx"
    one_line_error(run(model, *PRUNE, "-o", out, "--report", out), "same file")
    assert not out.exists()


def test_external_data_file_of_the_input_is_never_an_output(external, tmp_path):
    before = listing(tmp_path)
    one_line_error(run(external, *PRUNE, "-o", tmp_path / "weights.bin"), "input file", "--overwrite")
    one_line_error(run(external, *PRUNE, "-o", tmp_path / "o.onnx", "--report", tmp_path / "weights.bin"), "input file")
    assert listing(tmp_path) == before
    graphprune.prune(str(external), target_flops=0.5)  # still loads


def test_external_data_input_writes_external_output_next_to_it(external, tmp_path):
    out = tmp_path / "sub" / "slim.onnx"
    out.parent.mkdir()
    res = run(external, *PRUNE, "-o", out)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "sub" / "slim.onnx.data").exists()
    import onnxruntime as ort

    here = os.getcwd()
    try:
        os.chdir("/")  # data is found next to the model, not in the current directory
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        assert sess.run(None, {"image": np.zeros((1, 3, 16, 16), np.float32)})[0].shape == (1, 10)
    finally:
        os.chdir(here)


# -- never a device, FIFO, socket, directory or a standard stream ------------------------------
def _special(tmp_path, kind):
    path = tmp_path / kind
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()
    elif kind == "chardev":
        try:
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a /dev/null node
        except PermissionError:
            pytest.skip("creating device nodes needs root")
    elif kind == "dir":
        path.mkdir()
    elif kind == "stdout_link":
        path.symlink_to("/proc/self/fd/1")
    return path


@pytest.mark.parametrize("kind", ["fifo", "socket", "chardev", "dir", "stdout_link"])
@pytest.mark.parametrize("flag", ["-o", "--report"])
def test_special_files_are_refused(model, tmp_path, kind, flag):
    target = _special(tmp_path, kind)
    mode = os.lstat(target).st_mode
    args = [model, *PRUNE, "-o", tmp_path / "o.onnx", "--report", target] if flag == "--report" else \
        [model, *PRUNE, "-o", target]
    res = run(*args)
    one_line_error(res, flag)
    assert os.lstat(target).st_mode == mode and not (tmp_path / "o.onnx").exists()


def test_dev_null_is_refused(model):
    one_line_error(run(model, *PRUNE, "-o", "/dev/null"), "character device")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_stdout_link_refused_when_stdout_is_a_regular_file(model, tmp_path):
    """With stdout redirected to a file, /proc/self/fd/1 resolves to that file: still refused."""
    link = tmp_path / "so"
    link.symlink_to("/proc/self/fd/1")
    log = tmp_path / "log.txt"
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, "-m", "graphprune.cli", str(model), *PRUNE, "-o", str(link)],
                              stdout=fh, stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "standard output" in proc.stderr and log.stat().st_size == 0


# -- folder problems and OS errors: one line, before any work -----------------------------------
def _no_work(monkeypatch):
    import graphprune.api as api

    def boom(*a, **k):
        raise AssertionError("work started before the output checks")

    monkeypatch.setattr(api, "prune", boom)


@pytest.mark.parametrize("out", ["newdir/", "nodir/x.onnx"])
def test_bad_output_paths_found_before_work(model, tmp_path, monkeypatch, out):
    _no_work(monkeypatch)
    monkeypatch.chdir(tmp_path)
    one_line_error(run(model, *PRUNE, "-o", out), "-o")


def test_read_only_folder_found_before_work(model, tmp_path, monkeypatch):
    _no_work(monkeypatch)
    real = outputs.tempfile.mkstemp

    def read_only(*a, dir=None, **k):
        if dir and os.path.realpath(dir) == os.path.realpath(tmp_path / "ro"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*a, dir=dir, **k)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(outputs.tempfile, "mkstemp", read_only)
    one_line_error(run(model, *PRUNE, "-o", tmp_path / "ro" / "x.onnx"), "read-only file system")
    one_line_error(run(model, *PRUNE, "-o", tmp_path / "x.onnx", "--report", tmp_path / "ro" / "r.html"),
                   "--report", "read-only")
    assert not (tmp_path / "x.onnx").exists()


def test_full_disk_is_one_line_and_atomic(model, tmp_path, monkeypatch):
    out = tmp_path / "slim.onnx"
    out.write_bytes(b"previous output")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")  # where delayed allocation reports it

    monkeypatch.setattr(outputs.os, "fsync", full)
    one_line_error(run(model, *PRUNE, "-o", out), "no space left on device")
    assert out.read_bytes() == b"previous output"
    assert [f for f in os.listdir(tmp_path) if f.startswith(".graphprune-")] == []


def test_bench_json_missing_folder_and_negative_seed(model, tmp_path):
    one_line_error(run("bench", model, "--runs", 1, "--json", tmp_path / "nodir" / "x.json"), "--json")
    one_line_error(run(model, *PRUNE, "-o", tmp_path / "o.onnx", "--seed", "-1"), "--seed")
    assert not (tmp_path / "o.onnx").exists()


# -- --dry-run writes nothing -------------------------------------------------------------------
def test_dry_run_writes_nothing_and_says_so(model, tmp_path):
    before = listing(tmp_path)
    res = run(model, *PRUNE, "--dry-run", "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.html")
    assert res.exit_code == 0, res.output
    assert "dry run: nothing written" in res.stderr
    assert listing(tmp_path) == before


# -- demo never replaces a user's files ---------------------------------------------------------
def test_demo_refuses_to_replace_files(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "example.onnx").write_bytes(b"my own model")
    one_line_error(run("demo", "--out-dir", mine), "already exists", "--overwrite")
    assert (mine / "example.onnx").read_bytes() == b"my own model"


# -- one file-mode policy -----------------------------------------------------------------------
def test_every_writer_uses_the_same_mode(model, tmp_path):
    torch = pytest.importorskip("torch")
    old = os.umask(0o022)
    try:
        res = run(model, *PRUNE, "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.html")
        assert res.exit_code == 0, res.output
        assert run("inspect", model, "--dot", tmp_path / "g.dot").exit_code == 0
        graphprune.save(torch.nn.Conv2d(3, 4, 3), tmp_path / "m.pt")
        modes = {f: stat.S_IMODE(os.stat(tmp_path / f).st_mode) for f in ("o.onnx", "r.html", "g.dot", "m.pt")}
    finally:
        os.umask(old)
    assert set(modes.values()) == {0o644}, modes


# -- stale temps and SIGHUP ---------------------------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temps_of_killed_runs_are_cleaned(model, tmp_path):
    host = outputs._host_tag()
    stale = tmp_path / f".graphprune-{host}-{_dead_pid()}-abc123.tmp"
    stale.write_bytes(b"x" * 100)
    alive = tmp_path / f".graphprune-{host}-{os.getppid()}-abc123.tmp"  # a running process: kept
    alive.write_bytes(b"y")
    other_host = tmp_path / f".graphprune-elsewhere-{_dead_pid()}-abc123.tmp"
    other_host.write_bytes(b"z")
    lookalike = tmp_path / ".graphprune-notes.txt"
    lookalike.write_bytes(b"mine")
    assert run(model, *PRUNE, "-o", tmp_path / "o.onnx").exit_code == 0
    assert not stale.exists()
    assert alive.exists() and other_host.exists() and lookalike.exists()


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
def test_hangup_mid_write_leaves_nothing(model, tmp_path, sig):
    out = tmp_path / "slim.onnx"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(model), *PRUNE, "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = signal_mid_write(proc, sig, tmp_path)
    assert proc.returncode == 130, err
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".graphprune-")] and not out.exists()


# -- old models, bench inputs -------------------------------------------------------------------
@pytest.mark.parametrize("opset", [7, 8])
def test_ir3_models_prune(tmp_path, opset):
    src = tmp_path / "old.onnx"
    onnx.save(ir3_model(opset), str(src))
    out = tmp_path / "slim.onnx"
    res = run(src, *PRUNE, "-o", out)
    assert res.exit_code == 0, res.output
    slim = onnx.load(str(out))
    onnx.checker.check_model(slim)
    assert slim.ir_version == 3
    assert {t.name for t in slim.graph.initializer} <= {i.name for i in slim.graph.input}


def test_bench_input_shape_for_dynamic_models(tmp_path):
    model = example_cnn(image=16)
    for axis, name in ((2, "h"), (3, "w")):
        d = model.graph.input[0].type.tensor_type.shape.dim[axis]
        d.Clear()
        d.dim_param = name
    path = tmp_path / "dyn.onnx"
    onnx.save(model, str(path))
    res = run("bench", path, "--runs", 1, "--warmup", 0)
    one_line_error(res, "--input-shape")
    res = run("bench", path, "--runs", 1, "--warmup", 0, "--input-shape", "1,3,16,16", "--json", tmp_path / "b.json")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "b.json").exists()


def test_bench_compare_needs_the_same_inputs_and_outputs(model, tmp_path):
    from hostile_models import conv_chain

    other = tmp_path / "other.onnx"
    onnx.save(conv_chain(), str(other))
    one_line_error(run("bench", model, "--compare", other, "--runs", 1), "same inputs and outputs")


# -- over 2 GB: external data, never one 2 GB proto ---------------------------------------------
def test_outputs_over_the_proto_limit_use_external_data(model, tmp_path, monkeypatch):
    """The >2 GB path with a lowered limit: output and validation go through external data."""
    from graphprune.frontends import external

    monkeypatch.setattr(external, "PROTO_LIMIT", 100_000)
    out = tmp_path / "slim.onnx"
    res = run(model, *PRUNE, "-o", out)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "slim.onnx.data").stat().st_size > out.stat().st_size
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"image": np.zeros((1, 3, 16, 16), np.float32)})[0].shape == (1, 10)
