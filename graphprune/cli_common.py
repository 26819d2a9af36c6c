"""What every CLI command shares: the one-line error contract and argument parsing helpers.

Its own module so each command module imports it without importing graphprune.cli (which imports
the commands): the CLI's modules form a tree, not a cycle.
"""
from __future__ import annotations

import sys
from typing import Any

import click

from graphprune.errors import GraphpruneError, first_line

EXIT_USAGE = 2


def fail(message: str) -> None:
    """One line on stderr, exit code 2: the contract for every bad input."""
    from graphprune.escape import plain

    click.echo(f"graphprune: error: {plain(message)}", err=True)
    sys.exit(EXIT_USAGE)


def run_guarded(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call fn; any failure becomes the one-line error (exit 2), Ctrl-C exit 130 with nothing written."""
    try:
        return fn(*args, **kwargs)
    except GraphpruneError as exc:
        code = getattr(exc, "exit_code", EXIT_USAGE)  # e.g. SpeedupNotMet: 3
        if code != EXIT_USAGE:
            from graphprune.escape import plain

            click.echo(f"graphprune: error: {plain(exc)}", err=True)
            sys.exit(code)
        fail(str(exc))
    except OSError as exc:  # any file-system failure not already worded by the output gate
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        fail(f"{exc.strerror or type(exc).__name__}{where}")
    except KeyboardInterrupt:
        click.echo("graphprune: interrupted; no output written", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - a bug inside analysis or rewrite is still one line, exit 2
        fail(f"internal error ({type(exc).__name__}): {first_line(exc, 300)}")


def parse_shape(value: str | None) -> dict[str, tuple[int, ...]] | None:
    """'1,3,224,224' or 'input=1,3,224,224;mask=1,1,224,224'."""
    if not value:
        return None
    out: dict[str, tuple[int, ...]] = {}
    try:
        for i, part in enumerate(value.split(";")):
            name, _, dims = part.rpartition("=")
            out[name or f"#{i}"] = tuple(int(d) for d in dims.replace("x", ",").split(","))
    except ValueError:
        raise GraphpruneError(f"bad --input-shape {value!r}: expected e.g. 1,3,224,224") from None
    if any(d <= 0 for dims in out.values() for d in dims):
        raise GraphpruneError(f"bad --input-shape {value!r}: dims must be positive")
    if list(out) == ["#0"]:
        return {"": out["#0"]}
    return out
