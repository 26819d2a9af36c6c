"""Nothing lost: an interrupted write leaves no output or the previous one, the input is never
modified, and -o pointing at the input (directly, relatively or through a symlink) needs --overwrite."""
from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import graphprune
import graphprune.io as gio
from child_process import wait_for_stderr
from graphprune.cli import main
from graphprune.examples import example_cnn


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def leftovers(directory) -> list[str]:
    return [f for f in os.listdir(directory) if f.startswith(".graphprune-")]


@pytest.fixture()
def example(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(example_cnn(image=16), path)
    return path


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
@pytest.mark.parametrize("previous", [False, True])
def test_interrupt_mid_write_keeps_previous_or_nothing(example, tmp_path, monkeypatch, where, previous):
    out = tmp_path / "slim.onnx"
    if previous:
        out.write_bytes(b"previous output")
    result = graphprune.prune(str(example), target_flops=0.5)

    real_fdopen = os.fdopen

    class HalfWriter:
        """Writes half the bytes, then the user hits Ctrl-C."""

        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            self.fh.write(data[: len(data) // 2])
            raise KeyboardInterrupt

        def __getattr__(self, name):
            return getattr(self.fh, name)

    if where == "write":
        monkeypatch.setattr(gio.os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    elif where == "fsync":
        monkeypatch.setattr(gio.os, "fsync", lambda fd: (_ for _ in ()).throw(KeyboardInterrupt()))
    else:
        monkeypatch.setattr(gio.os, "replace", lambda a, b: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        result.save(out)
    assert (out.read_bytes() == b"previous output") if previous else not out.exists()
    assert leftovers(tmp_path) == []


def test_cli_interrupt_reports_and_writes_nothing(example, tmp_path, monkeypatch):
    out = tmp_path / "slim.onnx"
    monkeypatch.setattr(gio.os, "replace", lambda a, b: (_ for _ in ()).throw(KeyboardInterrupt()))
    res = CliRunner().invoke(main, [str(example), "--target-flops", "0.5", "-o", str(out)])
    assert res.exit_code == 130 and "no output written" in res.stderr
    assert not out.exists() and leftovers(tmp_path) == []


def _big_model(path, mib: int = 256) -> None:
    """A conv net whose weights make serialising and writing take a noticeable time."""
    c = int(np.sqrt(mib * 2**20 / 4 / 9 / 2))
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((c, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((c, c, 3, 3)).astype(np.float32), "w2")
    w3 = numpy_helper.from_array(rng.standard_normal((c, c, 3, 3)).astype(np.float32), "w3")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1] * 4, name="c1"),
             helper.make_node("Relu", ["a"], ["b"], name="r1"),
             helper.make_node("Conv", ["b", "w2"], ["c"], pads=[1] * 4, name="c2"),
             helper.make_node("Relu", ["c"], ["d"], name="r2"),
             helper.make_node("Conv", ["d", "w3"], ["y"], pads=[1] * 4, name="c3")]
    g = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 4, 4])], [w1, w2, w3])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


# A child that runs the real CLI but stops inside the output write, after the first chunk has reached the
# temp file, and says so on stderr: the parent's signal then lands mid-write however loaded the machine
# is (a sleep-paced write raced the parent's polling: on a busy 2-core machine the write could finish
# first and the test fail with exit 0).
MID_WRITE = "test child: inside the output write"
CHILD = textwrap.dedent("""
    import os, sys, time
    import graphprune.io as gio
    real_fdopen = os.fdopen
    class Stalled:
        def __init__(self, fh): self.fh = fh
        def __enter__(self): return self
        def __exit__(self, *a): self.fh.close()
        def write(self, data):
            self.fh.write(data[:1 << 16]); self.fh.flush()
            sys.stderr.write("%s\\n" % MID_WRITE); sys.stderr.flush()
            time.sleep(300)  # ended by the parent's signal (its handler raises KeyboardInterrupt)
            self.fh.write(data[1 << 16:])
        def __getattr__(self, n): return getattr(self.fh, n)
    gio.os.fdopen = lambda fd, mode: Stalled(real_fdopen(fd, mode))
    from graphprune.cli import main
    sys.argv = ["graphprune", *sys.argv[1:]]
    main()
""").replace("MID_WRITE", repr(MID_WRITE))


def signal_mid_write(proc: subprocess.Popen, sig: int, directory) -> str:
    """Wait until the child is inside its write (its temp file in `directory`), send `sig`, return the
    child's stderr from then on."""
    wait_for_stderr(proc, MID_WRITE, timeout=240)
    assert leftovers(directory), "no temp file while writing"
    proc.send_signal(sig)
    return proc.communicate(timeout=120)[1]


@pytest.mark.parametrize("previous", [False, True])
def test_sigterm_while_writing_a_big_model(tmp_path, previous):
    src = tmp_path / "big.onnx"
    _big_model(src, mib=64)
    before = sha(src)
    out = tmp_path / "slim.onnx"
    if previous:
        out.write_bytes(b"previous output")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(src), "--target-flops", "0.5", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = signal_mid_write(proc, signal.SIGTERM, tmp_path)
    assert proc.returncode == 130, err
    assert "no output written" in err
    assert (out.read_bytes() == b"previous output") if previous else not out.exists()
    assert leftovers(tmp_path) == []
    assert sha(src) == before


def test_output_equal_to_input_refused_in_every_spelling(example, tmp_path, monkeypatch):
    before = sha(example)
    link = tmp_path / "link.onnx"
    link.symlink_to(example)
    monkeypatch.chdir(tmp_path)
    spellings = [str(example), "model.onnx", "./model.onnx", f"../{tmp_path.name}/model.onnx", str(link), "link.onnx"]
    for spelling in spellings:
        res = CliRunner().invoke(main, [str(example), "--target-flops", "0.5", "-o", spelling])
        assert res.exit_code == 2 and "--overwrite" in res.stderr, (spelling, res.stderr)
        assert sha(example) == before
    # the input given through the symlink, the output as the real path
    res = CliRunner().invoke(main, ["link.onnx", "--target-flops", "0.5", "-o", "model.onnx"])
    assert res.exit_code == 2 and sha(example) == before
    res = CliRunner().invoke(main, ["model.onnx", "--target-flops", "0.5", "-o", "model.onnx", "--overwrite"])
    assert res.exit_code == 0, res.stderr
    assert sha(example) != before and leftovers(tmp_path) == []
    onnx.checker.check_model(onnx.load("model.onnx"))


def test_input_never_modified_and_output_mode(example, tmp_path):
    before, mode = sha(example), os.stat(example).st_mode
    out = tmp_path / "slim.onnx"
    for _ in range(2):  # second run replaces an existing output
        res = CliRunner().invoke(main, [str(example), "--target-flops", "0.5", "-o", str(out)])
        assert res.exit_code == 0, res.stderr
    assert sha(example) == before and os.stat(example).st_mode == mode
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_existing_output_mode_is_kept(example, tmp_path):
    out = tmp_path / "slim.onnx"
    out.write_bytes(b"old")
    os.chmod(out, 0o640)
    graphprune.prune(str(example), target_flops=0.5).save(out)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o640


def test_failed_run_leaves_previous_output(tmp_path):
    """A bad input after a good run: the earlier output stays as it was."""
    out = tmp_path / "slim.onnx"
    out.write_bytes(b"previous output")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(example_cnn().SerializeToString()[:999])
    res = CliRunner().invoke(main, [str(bad), "--target-flops", "0.5", "-o", str(out)])
    assert res.exit_code == 2
    assert out.read_bytes() == b"previous output" and leftovers(tmp_path) == []
