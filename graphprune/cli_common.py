"""What every CLI command shares: the one-line error contract and argument parsing helpers.

Its own module so each command module imports it without importing graphprune.cli (which imports
the commands): the CLI's modules form a tree, not a cycle.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, Callable, NoReturn

import click

from graphprune.errors import GraphpruneError, first_line

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C

# the interrupt signals: Ctrl-C, a pipeline's timeout or `kill`, a closed terminal
_INTERRUPTS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
# while an interrupt exit is under way: the handlers it replaced by SIG_IGN (None otherwise)
_held: dict[int, Any] | None = None


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
        exit_interrupted()
    except Exception as exc:  # noqa: BLE001 - a bug inside analysis or rewrite is still one line, exit 2
        fail(f"internal error ({type(exc).__name__}): {first_line(exc, 300)}")


def exit_interrupted() -> NoReturn:
    """The one way a run ends on Ctrl-C, SIGTERM or SIGHUP: one line on stderr, exit 130, nothing written.

    By the time a KeyboardInterrupt is caught the temp files are already removed, so from here on
    further interrupt signals are ignored: another KeyboardInterrupt raised while the exit unwinds
    (a second Ctrl-C, a supervisor's repeated SIGTERM) would turn exit 130 into a traceback or a
    death by SIGINT. They stay ignored until the process ends; an in-process caller gets its
    handlers back from restore_interrupt_handlers() (the CLI group's main() does that).

    The empty exec() is not decoration: CPython remembers a KeyboardInterrupt that escaped code
    compiled from a string (exec/eval of a str: dataclasses and namedtuple build their methods that
    way, and torch imports modules lazily during the first training steps) and, when run as
    `python -m`, ends the process by SIGINT after a clean exit 130 (Py_RunMain checks the flag).
    Running any string through exec() resets that flag.
    """
    _ignore_interrupts()
    exec("")  # noqa: S102 - resets CPython's "unhandled KeyboardInterrupt" flag, see above
    click.echo("graphprune: interrupted; no output written", err=True)
    sys.exit(EXIT_INTERRUPTED)


def _ignore_interrupts() -> None:
    global _held
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers (embedded use): the host handles signals
    held = {}
    for sig in _INTERRUPTS:
        previous = signal.signal(sig, signal.SIG_IGN)
        held[sig] = signal.SIG_DFL if previous is None else previous  # None: set outside Python
    if _held is None:  # a second exit (nested run_guarded) keeps the first one's originals
        _held = held


def restore_interrupt_handlers() -> None:
    """Give back the handlers an interrupt exit ignored: for in-process callers that catch SystemExit
    (click's CliRunner, an embedding application) and keep running."""
    global _held
    held, _held = _held, None
    for sig, handler in (held or {}).items():
        signal.signal(sig, handler)


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


def parse_values(items: tuple[str, ...]) -> dict[str, float]:
    """('sr=16000', ...) -> {'sr': 16000.0}."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            raise GraphpruneError(f"bad --input-value {item!r}: expected NAME=NUMBER, e.g. sr=16000") from None
        if not sep or not name:
            raise GraphpruneError(f"bad --input-value {item!r}: expected NAME=NUMBER, e.g. sr=16000")
    return out


def image_folder_options(prefix: str) -> Callable[[Any], Any]:
    """--PREFIX-size/-mean/-std/-bgr/-gray/-layout: how a folder of images becomes input tensors.

    Declared once for prune's --calib and finetune's --data, so both read a folder the same way.
    """
    options = [
        click.option(f"--{prefix}-size", help="Image folder: resize to H,W."),
        click.option(f"--{prefix}-mean", help="Image folder: per-channel mean after scaling pixels to [0, 1], "
                     "e.g. 0.5 or 0.485,0.456,0.406."),
        click.option(f"--{prefix}-std", help="Image folder: per-channel std, e.g. 0.5 or 0.229,0.224,0.225."),
        click.option(f"--{prefix}-bgr", is_flag=True, help="Image folder: feed channels in BGR order (default RGB)."),
        click.option(f"--{prefix}-gray", is_flag=True, help="Image folder: one grayscale channel."),
        click.option(f"--{prefix}-layout", type=click.Choice(["NCHW", "NHWC"]), default="NCHW", show_default=True,
                     help="Image folder: tensor layout."),
    ]

    def apply(command: Any) -> Any:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


def _calibration_options(calib: str | None, samples: int | None, size: str | None, mean: str | None,
                         std: str | None, bgr: bool, gray: bool, layout: str, recover: str | None,
                         flag: str = "--calib") -> dict[str, Any]:
    """CLI calibration flags -> prune() keyword arguments (checked before any work starts).

    `flag` names the option family in messages: --calib for prune, --data for finetune."""
    from graphprune.calib import ImagePreprocess, parse_floats, parse_size

    if calib is None:
        given = [n for n, v in ((f"{flag}-samples", samples), (f"{flag}-size", size), (f"{flag}-mean", mean),
                                (f"{flag}-std", std), ("--recover", recover)) if v is not None]
        if given:
            raise GraphpruneError(f"{given[0]} needs {flag}")
        return {}
    what = "calibration data" if flag == "--calib" else "data"
    if not os.path.exists(calib):
        raise GraphpruneError(f"{what} not found: {calib}")
    kw: dict[str, Any] = {"calib": calib, "calib_samples": samples}
    if recover is not None:
        kw["recover"] = recover
    if os.path.isdir(calib):
        hw = parse_size(size)
        if hw is None:
            raise GraphpruneError(f"{what} from an image folder needs {flag}-size H,W")
        kw["calib_preprocess"] = ImagePreprocess(hw, parse_floats(mean, f"{flag}-mean") or (0.0,),
                                                 parse_floats(std, f"{flag}-std") or (1.0,), bgr=bgr,
                                                 layout=layout, grayscale=gray)
    elif size or mean or std:
        raise GraphpruneError(f"{flag}-size/{flag}-mean/{flag}-std apply to an image folder, not to an .npz")
    return kw


def _terminate_as_interrupt() -> None:
    """SIGTERM (a pipeline's timeout, `kill`) and SIGHUP (terminal closed) unwind like Ctrl-C, so a
    half-written temp file is removed."""

    def handler(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    def restore(sig: int, previous: Any) -> None:
        if previous is None:  # a handler set outside Python: nothing Python can put back
            return
        if _held is not None and sig in _held:  # an interrupt exit is under way: stay ignored until it ends
            _held[sig] = previous
        else:
            signal.signal(sig, previous)

    for sig in _INTERRUPTS:
        if sig == signal.SIGINT:  # Python's own handler already raises KeyboardInterrupt
            continue
        try:
            previous = signal.signal(sig, handler)
        except ValueError:  # not the main thread (embedded use): leave signal handling to the host
            return
        click.get_current_context().call_on_close(lambda s=sig, p=previous: restore(s, p))


def _said_dry_run(gate: Any) -> None:
    planned = ", ".join(given for given, _ in gate.claimed.values())
    click.echo(f"graphprune: dry run: nothing written{f' (would write {planned})' if planned else ''}", err=True)
