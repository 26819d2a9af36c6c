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

import os
import stat
import tempfile  # noqa: F401  (tests patch outputs.tempfile.mkstemp: the module the writer uses)
from typing import Any, Callable, Iterable

# the atomic writing itself lives one layer down (graphprune/atomic.py); re-exported for callers
from graphprune.atomic import (  # noqa: F401
    TEMP_PREFIX, _host_tag, _pid_alive, _signals_deferred, atomic_write, clean_stale_temps, new_file_mode,
    os_error_line, temp_prefix,
)
from graphprune.errors import GraphpruneError


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
        from graphprune.frontends.external import write_model

        real = self.real(path)
        if external is None:
            external = self.input_has_external_data
        if self._may_write(os.fspath(path)):
            write_model(model, real, external=external, gate=self, shown=os.fspath(path))
