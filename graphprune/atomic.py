"""Atomic file writing: a file is either its complete new content or untouched.

Its own module, below both the output gate (graphprune/outputs.py, which decides WHAT may be written)
and the external-data code (graphprune/frontends/external.py, which writes weight files and spill
files): both use these helpers, and neither has to import the other's module to do so.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import socket
import stat
import tempfile
import threading
from typing import Any, Callable, Iterator

from graphprune.errors import GraphpruneError

TEMP_PREFIX = ".graphprune-"
_TEMP_RE = re.compile(r"^\.graphprune-(?P<host>[A-Za-z0-9]{1,16})-(?P<pid>\d{1,10})-[A-Za-z0-9_]+\.tmp(\.[A-Za-z0-9]{1,8})?$")


def _host_tag() -> str:
    """Short alphanumeric tag of this host: a pid only identifies a process on its own machine."""
    name = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:16]
    return name or "host"


def temp_prefix() -> str:
    return f"{TEMP_PREFIX}{_host_tag()}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, belongs to someone else
        return True
    except OSError:
        return True
    return True


def stale_entries(directory: str, pattern: re.Pattern[str]) -> Iterator[tuple[str, str, os.stat_result]]:
    """(name, path, lstat) of each entry in `directory` that a killed graphprune run left: named by
    `pattern` (with host and pid groups), written on this host by a process that no longer exists,
    and owned by the current user. lstat, so a link is seen as a link, never followed."""
    host = _host_tag()
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        m = pattern.match(name)
        if not m or m.group("host") != host or int(m.group("pid")) == os.getpid() or _pid_alive(int(m.group("pid"))):
            continue
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if st.st_uid == os.getuid():
            yield name, path, st


def clean_stale_temps(directory: str) -> list[str]:
    """Remove temp files of killed graphprune runs in `directory`; return the names removed.

    Only regular files (not symlinks) of our exact naming that stale_entries finds are removed, so
    nothing else can be hit.
    """
    removed = []
    for name, path, st in stale_entries(directory, _TEMP_RE):
        if not stat.S_ISREG(st.st_mode):
            continue
        try:
            os.unlink(path)
            removed.append(name)
        except OSError:
            continue
    return removed


def new_file_mode(path: str) -> int:
    """One mode policy for every writer: keep an existing file's mode, else 0666 minus the umask."""
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def os_error_line(exc: OSError, path: str) -> str:
    reason = exc.strerror or type(exc).__name__
    if exc.errno == errno.ENOSPC:
        reason = "no space left on device"
    elif exc.errno == errno.EROFS:
        reason = "read-only file system"
    return f"cannot write {path}: {reason}"


def _fsync_dir(directory: str) -> None:
    """Make the rename itself durable (a crash right after must not bring the old file back)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C/SIGTERM/SIGHUP while a temp file is created and its name stored, so an interrupt
    can never land between the two (the file would exist with nobody to remove it).

    A signal mask alone is not enough: the kernel hands a process signal to any thread that does not
    block it (onnxruntime's and torch's workers), and Python then runs the handler in the main thread
    anyway. So in the main thread the handlers themselves are swapped for one that only records the
    signal, and the first recorded signal is raised again once the block is done.
    """
    sigs = [signal.SIGINT, signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])]
    pending: list[int] = []
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in sigs:
            if signal.getsignal(sig) is None:  # a handler installed outside Python: leave it to the mask
                continue
            previous[sig] = signal.signal(sig, lambda signum, _frame: pending.append(signum))
    old = None
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, set(sigs))
    except (AttributeError, ValueError, OSError):  # no POSIX signal masks here
        old = None
    try:
        yield
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pending:
            signal.raise_signal(pending[0])


def atomic_write(path: str, fill: Callable[[Any], None] | None = None, *,
                 fill_path: Callable[[str], None] | None = None, shown: str | None = None) -> None:
    """Write `path` atomically: `fill(fh)` (or `fill_path(tmp)`) writes the temp file, then rename.

    An interrupted or failed write removes the temp file and leaves any previous file untouched.
    """
    shown = shown or path
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(directory):
        raise GraphpruneError(f"cannot write {shown}: output folder does not exist: {directory}")
    # libraries that pick a format by extension (TVM: .so / .tar) see the output's extension
    ext = os.path.splitext(path)[1] if fill_path is not None else ""
    ext = ext if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", ext) else ""
    fd, tmp = -1, ""
    try:
        try:
            with _signals_deferred():
                fd, tmp = tempfile.mkstemp(prefix=temp_prefix(), suffix=".tmp" + ext, dir=directory)
            # mkstemp makes 0600 files; the output gets the mode a plain open() would give it
            os.chmod(tmp, new_file_mode(path))
            if fill is not None:
                with os.fdopen(fd, "wb") as fh:
                    fd = -1
                    fill(fh)
                    fh.flush()
                    os.fsync(fh.fileno())
            else:
                os.close(fd)
                fd = -1
                assert fill_path is not None
                fill_path(tmp)
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            raise GraphpruneError(os_error_line(exc, shown)) from None
        _fsync_dir(directory)
    except BaseException:
        # a second Ctrl-C/SIGTERM here would skip the unlink and leave the temp file: held until it is
        # gone, then raised (as KeyboardInterrupt, in place of what was unwinding)
        with _signals_deferred():
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
            if tmp:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        raise
