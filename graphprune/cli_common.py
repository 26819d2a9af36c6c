"""What every CLI command shares: the one-line error contract and argument parsing helpers.

Its own module so each command module imports it without importing graphprune.cli (which imports
the commands): the CLI's modules form a tree, not a cycle.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable

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
    import signal

    def handler(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is None:
            continue
        try:
            previous = signal.signal(sig, handler)
        except ValueError:  # not the main thread (embedded use): leave signal handling to the host
            return
        click.get_current_context().call_on_close(lambda s=sig, p=previous: signal.signal(s, p))


def _said_dry_run(gate: Any) -> None:
    planned = ", ".join(given for given, _ in gate.claimed.values())
    click.echo(f"graphprune: dry run: nothing written{f' (would write {planned})' if planned else ''}", err=True)
