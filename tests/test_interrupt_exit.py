"""An interrupted run ends one way: one line on stderr, exit 130, nothing written, whenever the signal
lands. Deterministic: each test delivers the signal itself at the moment it checks (signal.raise_signal
runs the Python handler before it returns), instead of racing a timer against a running child.

Why these moments: a SIGTERM that landed in code compiled from a string (dataclasses build their
methods with exec(); torch imports modules lazily in the first training steps) made `python -m
graphprune.cli` die by SIGINT after printing its clean exit-130 line; a signal arriving while the exit
unwinds turned it into a traceback or a death by SIGTERM; and a second signal during a failed write's
cleanup left the temp file behind.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import onnx
import pytest
from click.testing import CliRunner

from graphprune import atomic
from graphprune.cli import main
from graphprune.examples import example_cnn

INTERRUPTS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]

# run as `python -m` like the test suite and torchrun start the CLI: Py_RunMain's exit path is the
# one that honoured CPython's stale "unhandled KeyboardInterrupt" flag
CHILD = textwrap.dedent("""
    import atexit, signal, sys
    import click
    import graphprune.cli as cli

    case = sys.argv.pop(1)
    ALL = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def signal_in_exec():
        # what a dataclass's generated __init__ looks like to the interpreter: code compiled from a string
        exec("import signal; signal.raise_signal(signal.SIGTERM)")

    def more_signals():
        for sig in ALL:
            signal.raise_signal(sig)

    def patched(*args, **kwargs):
        if case == "late":
            # fires while the exit unwinds (the command's context closes after the message) and again
            # during interpreter shutdown
            click.get_current_context().call_on_close(more_signals)
            atexit.register(more_signals)
        if case == "outside":
            signal.raise_signal(signal.SIGTERM)
        signal_in_exec()

    if case == "outside":  # between the command's guarded calls, where run_guarded cannot see it
        cli._progress_printer = patched
    else:  # inside run_guarded (the command's input-shape parsing)
        cli.parse_shape = patched
    sys.argv = ["graphprune", *sys.argv[1:]]
    cli.main()
""")


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    d = tmp_path_factory.mktemp("child")
    (d / "interrupted_child.py").write_text(CHILD)
    onnx.save(example_cnn(), str(d / "m.onnx"))
    return d


@pytest.mark.parametrize("case", ["exec", "late", "outside"])
def test_interrupt_exit_is_130_and_one_line(child, tmp_path, case):
    out = tmp_path / "slim.onnx"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(child), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "interrupted_child", case, str(child / "m.onnx"),
                           "--target-flops", "0.5", "--no-measure", "-o", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    assert proc.stderr == "graphprune: interrupted; no output written\n", proc.stderr
    assert os.listdir(tmp_path) == []


def test_in_process_interrupt_gives_the_handlers_back(child, tmp_path, monkeypatch):
    """CliRunner catches the SystemExit and the caller keeps running: it must not be left ignoring Ctrl-C."""
    import graphprune.cli as cli

    before = {sig: signal.getsignal(sig) for sig in INTERRUPTS}
    monkeypatch.setattr(cli, "parse_shape", lambda *a: signal.raise_signal(signal.SIGTERM))
    res = CliRunner().invoke(main, [str(child / "m.onnx"), "--target-flops", "0.5", "--no-measure",
                                    "-o", str(tmp_path / "slim.onnx")])
    assert res.exit_code == 130 and res.stderr == "graphprune: interrupted; no output written\n", res.stderr
    assert {sig: signal.getsignal(sig) for sig in INTERRUPTS} == before
    assert os.listdir(tmp_path) == []


def test_second_interrupt_during_cleanup_still_removes_the_temp_file(tmp_path, monkeypatch):
    """The first interrupt stops the write; a second one arriving while the temp file is being removed
    is held until it is gone, then raised."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a worker may ignore SIGINT
    try:
        real_unlink = os.unlink
        calls = []

        def unlink_after_a_second_ctrl_c(path, *a, **kw):
            calls.append(path)
            signal.raise_signal(signal.SIGINT)
            return real_unlink(path, *a, **kw)

        def fill(fh):
            fh.write(b"half")
            monkeypatch.setattr(atomic.os, "unlink", unlink_after_a_second_ctrl_c)
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            atomic.atomic_write(str(tmp_path / "out.bin"), fill)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(calls) == 1  # the cleanup ran, and the second interrupt landed inside it
    assert os.listdir(tmp_path) == []
