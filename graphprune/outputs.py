"""The output gate: every file graphprune writes goes through here.

Why one gate: each writer used to check (or not check) its own path, so `--report in.onnx` replaced
the input model, `-o /dev/null` replaced a device node and a read-only folder was found only after a
long prune. The gate checks every planned output *before* any work starts and writes each one
atomically (temp file in the same folder, fsync, rename), with one file-mode policy and every OS
error turned into one GraphpruneError line.

Checks per output path (symlinks resolved first, so a link is written through, never replaced):
- not the input model or one of its external-data files (unless overwrite=True);
- not an existing non-regular file (directory, device, FIFO, socket);
- not the same file as another output of this run;
- its folder exists and a file can be created there.

Temp files are named `.graphprune-<host>-<pid>-<random>.tmp`; a later run in the same folder
removes those whose process (on this host) is gone, so a SIGKILLed run does not leave them forever.
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
from typing import Any, Callable, Iterable, Iterator

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


def clean_stale_temps(directory: str) -> list[str]:
    """Remove temp files of killed graphprune runs in `directory`; return the names removed.

    Only files matching our exact naming, written on this host by a process that no longer exists,
    owned by the current user and regular (not symlinks) are removed, so nothing else can be hit.
    """
    removed = []
    host = _host_tag()
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = _TEMP_RE.match(name)
        if not m or m.group("host") != host or int(m.group("pid")) == os.getpid() or _pid_alive(int(m.group("pid"))):
            continue
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                continue
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
    can never land between the two (the file would exist with nobody to remove it)."""
    sigs = {signal.SIGINT, signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    except (AttributeError, ValueError, OSError):  # no POSIX signal masks here
        old = None
    try:
        yield
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


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


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _kind(mode: int) -> str:
    for test, word in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return word
    return "not a regular file"


def _std_streams() -> dict[tuple[int, int], str]:
    """Files behind stdin/stdout/stderr: replacing one (e.g. via /proc/self/fd/1) loses the run's own output."""
    out = {}
    for fd, name in ((0, "standard input"), (1, "standard output"), (2, "standard error")):
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        out.setdefault((st.st_dev, st.st_ino), name)
    return out


class OutputGate:
    """Plans and performs every write of one run; see the module docstring for the rules.

    Typical use: gate = OutputGate([model], overwrite=..., dry_run=...); gate.claim(path, "-o")
    for every output before the work; later gate.write_bytes / write_model / write_with.
    """

    def __init__(self, inputs: Iterable[str] = (), *, overwrite: bool = False, dry_run: bool = False) -> None:
        self.overwrite = overwrite
        self.dry_run = dry_run
        self.protected: dict[tuple[int, int], str] = {}
        self.claimed: dict[str, tuple[str, str]] = {}  # real path -> (given path, what)
        self.written: list[str] = []
        self.input_has_external_data = False
        for path in inputs:
            self.protect_input(path)

    # -- planning -------------------------------------------------------------------------------
    def protect_input(self, path: str) -> None:
        """The input model and every external-data file it names may never be an output."""
        ident = _identity(path)
        if ident is None:
            return
        self.protected[ident] = path
        from graphprune.frontends.external import referenced_files

        files = referenced_files(path)
        if files:
            self.input_has_external_data = True
        for side in files:
            ident = _identity(side)
            if ident is not None:
                self.protected.setdefault(ident, side)

    def claim(self, path: str | os.PathLike, what: str) -> str:
        """Check one planned output now (before any work) and return the path to write."""
        given = os.fspath(path)
        if not given:
            raise GraphpruneError(f"{what}: empty output path")
        if given.endswith(("/", os.sep)) or os.path.isdir(given):
            raise GraphpruneError(f"{what} {given} is a directory; give a file name")
        real = os.path.realpath(given)
        try:
            st = os.stat(given)  # the kernel follows every link, /proc's magic ones included
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise GraphpruneError(f"{what} {given}: {exc.strerror}") from None
        if st is not None and not os.path.exists(real):
            raise GraphpruneError(f"{what} {given} resolves to an open file or pipe, not a path graphprune can replace")
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise GraphpruneError(f"{what} {given} is {_kind(st.st_mode)}; graphprune writes regular files only")
        if real.startswith(("/proc/", "/sys/")) or real in ("/proc", "/sys"):
            raise GraphpruneError(f"{what} {given} resolves to {real}, a kernel interface, not a file")
        if st is not None and (st.st_dev, st.st_ino) in _std_streams():
            raise GraphpruneError(f"{what} {given} is this process's {_std_streams()[(st.st_dev, st.st_ino)]}; "
                                  "graphprune does not replace it")
        if st is not None and (st.st_dev, st.st_ino) in self.protected and not self.overwrite:
            source = self.protected[(st.st_dev, st.st_ino)]
            role = "the input model" if source.endswith(".onnx") or len(self.protected) == 1 else "an input file"
            raise GraphpruneError(f"{what} {given} is {role} ({source}); pass --overwrite to replace it")
        if real in self.claimed:
            other, other_what = self.claimed[real]
            raise GraphpruneError(f"{what} {given} and {other_what} {other} are the same file")
        folder = os.path.dirname(real) or "."
        if not os.path.isdir(folder):
            raise GraphpruneError(f"{what} {given}: output folder does not exist: {os.path.dirname(given) or '.'}")
        self._probe_folder(folder, what, given)
        self.claimed[real] = (given, what)
        return real

    def _probe_folder(self, folder: str, what: str, given: str) -> None:
        """Create and remove a temp file: catches read-only file systems and missing permissions up front."""
        clean_stale_temps(folder)
        with _signals_deferred():  # create and remove with no interrupt in between
            try:
                fd, tmp = tempfile.mkstemp(prefix=temp_prefix(), suffix=".tmp", dir=folder)
            except OSError as exc:
                raise GraphpruneError(f"{what} {given}: {os_error_line(exc, given).split(': ', 1)[1]} "
                                      f"(output folder {folder})") from None
            os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def real(self, path: str | os.PathLike) -> str:
        """The resolved path of an output claimed earlier (claims it now if it was not)."""
        given = os.fspath(path)
        real = os.path.realpath(given)
        if real not in self.claimed:
            return self.claim(given, "output")
        return real

    # -- writing --------------------------------------------------------------------------------
    def _may_write(self, path: str) -> bool:
        if self.dry_run:
            return False
        self.written.append(path)
        return True

    def write_bytes(self, path: str | os.PathLike, data: bytes) -> None:
        real = self.real(path)
        if self._may_write(os.fspath(path)):
            atomic_write(real, lambda fh: fh.write(data), shown=os.fspath(path))

    def write_text(self, path: str | os.PathLike, text: str) -> None:
        self.write_bytes(path, text.encode("utf-8"))

    def write_with(self, path: str | os.PathLike, fill_path: Callable[[str], None]) -> None:
        """For libraries that write to a path themselves (torch.save, TVM export_library)."""
        real = self.real(path)
        if self._may_write(os.fspath(path)):
            atomic_write(real, fill_path=fill_path, shown=os.fspath(path))

    def write_model(self, model: Any, path: str | os.PathLike, external: bool | None = None) -> None:
        """An ONNX model; with external data (next to it, `<name>.data`) when asked or when over 2 GB."""
        real = self.real(path)
        if external is None:
            external = self.input_has_external_data
        if self._may_write(os.fspath(path)):
            write_onnx(model, real, external=external, gate=self, shown=os.fspath(path))


# -- ONNX files --------------------------------------------------------------------------------------
def serialized_size(model: Any) -> int:
    return model.ByteSize()


def write_onnx(model: Any, real: str, *, external: bool, gate: Any = None, shown: str | None = None) -> None:
    """Write `model` atomically; with external data in `<name>.data` next to it when asked or when
    the model would not fit one protobuf message. The data file is written (atomically) first."""
    import onnx

    from graphprune.frontends import external as ext

    shown = shown or real
    big = serialized_size(model) >= ext.PROTO_LIMIT
    movable = [t for t in model.graph.initializer if len(t.raw_data) >= ext.EXTERNAL_MIN_BYTES] if (external or big) else []
    if not movable:
        if big:
            raise GraphpruneError(f"cannot write {shown}: model over 2 GB with no tensor that can move to external data")
        atomic_write(real, lambda fh: fh.write(model.SerializeToString()), shown=shown)
        return
    data_real = real + ".data"
    location = os.path.basename(real) + ".data"
    if gate is not None:
        gate.claim(data_real, f"external data of {shown}")
    saved: list[tuple[onnx.TensorProto, bytes]] = []

    def fill_data(fh: Any) -> None:
        offset = 0
        for t in movable:
            raw = t.raw_data
            fh.write(raw)
            saved.append((t, raw))
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            del t.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            offset += len(raw)

    try:
        atomic_write(data_real, fill_data, shown=shown + ".data")
        if serialized_size(model) >= ext.PROTO_LIMIT:
            raise GraphpruneError(f"cannot write {shown}: over 2 GB even with its weights in external data")
        atomic_write(real, lambda fh: fh.write(model.SerializeToString()), shown=shown)
    finally:
        for t, raw in saved:  # the caller's proto is left as it was
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
            t.raw_data = raw
