"""The one exception type users see: the CLI prints its message on one line and exits with code 2."""
from __future__ import annotations


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (its type name when the message is empty)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(exc).__name__


class GraphpruneError(Exception):
    """One-line user-facing error; the CLI prints it and exits with code 2.

    Messages quote names from the input file, which may hold newlines, terminal escape sequences
    or U+2028: those are escaped (graphprune.escape.plain) so the message stays one harmless line
    whatever the model contains.
    """

    def __init__(self, message: object = "") -> None:
        from graphprune.escape import plain

        super().__init__(plain(message))

    @classmethod
    def from_exception(cls, prefix: str, exc: BaseException, limit: int = 200) -> "GraphpruneError":
        """`prefix: <first line of exc>`, for wrapping a library's multi-line error into the one-line contract."""
        return cls(f"{prefix}: {first_line(exc, limit)}")


class SpeedupNotMet(GraphpruneError):
    """The measured speed-up is below --min-speedup: the CLI exits with code 3 and writes nothing."""

    exit_code = 3


class TargetNotMet(GraphpruneError):
    """A latency target the measured plans could not reach: exit code 3, nothing written (like
    --min-speedup); --allow-floor accepts the fastest plan tried instead."""

    exit_code = 3
