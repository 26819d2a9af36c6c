"""Model-supplied strings made safe to print.

Names in an ONNX file are attacker-controlled. Printed raw, an escape sequence can repaint the
terminal (a fake "OK" over an error), a U+2028 can split a one-line error, and `[...]` is read as
markup by rich (a MarkupError after the output was written). Everything that prints a name goes
through plain() (terminal text) or markup() (text handed to rich).
"""
from __future__ import annotations

import re

# C0/C1 controls, DEL, line/paragraph separators, bidi overrides/isolates, BOM/zero-width joiners
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")


def _code(m: re.Match[str]) -> str:
    ch = m.group(0)
    if ch == "\n":
        return "\\n"
    if ch == "\r":
        return "\\r"
    if ch == "\t":
        return "\\t"
    n = ord(ch)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}"


def plain(text: object) -> str:
    """One printable line: control and layout characters become visible escapes."""
    return _UNSAFE.sub(_code, str(text))


def markup(text: object) -> str:
    """plain() plus rich markup escaping, for strings inserted into rich markup."""
    from rich.markup import escape

    return escape(plain(text))
