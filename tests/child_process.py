"""Waiting for a child process to reach a point, with a bound.

Reads the child's stderr pipe directly (not through Popen's text wrapper, whose read-ahead would hide
lines from a later communicate()), so the caller can signal the child at that point and still get
everything it wrote. A child that hangs fails the test with what it wrote instead of hanging CI.
"""
from __future__ import annotations

import os
import selectors
import subprocess
import time


def wait_for_stderr(proc: subprocess.Popen, marker: str, timeout: float) -> str:
    """Read `proc`'s stderr until `marker` appears; return what was read (a child that exits first or
    stays silent for `timeout` seconds is an AssertionError, the child killed)."""
    fd = proc.stderr.fileno()
    seen = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while marker.encode() not in seen:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                proc.kill()
                proc.wait()
                raise AssertionError(f"no {marker!r} from the child in {timeout:.0f} s; its stderr:\n"
                                     f"{seen.decode(errors='replace')[-3000:]}")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise AssertionError(f"the child exited ({proc.wait()}) before {marker!r}; its stderr:\n"
                                     f"{seen.decode(errors='replace')[-3000:]}")
            seen += chunk
    return seen.decode(errors="replace")
