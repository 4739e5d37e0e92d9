"""Text from outside made safe to print: file and folder names, and what an archive says.

A drop folder's writers choose its names, and an archive chooses its answers; neither may
forge a log line, a journal record or a line of ``stowd status``, nor drive the reader's
terminal.  ``escape`` writes every character that is not plain printable text as a visible
escape, as Python would in a string literal: ``\\n``, ``\\r``, ``\\t``, ``\\x1b``, ``\\x07``,
``\\u2028`` ...; a byte of a name that is not UTF-8 (a lone surrogate from
``os.fsdecode``) as ``\\xNN``; and the backslash itself as ``\\\\``, so that an escape cannot be
faked either.  What is escaped: the Unicode categories Cc (C0 and C1 controls, DEL), Cf
(format characters such as the right-to-left override), Cs (surrogates), Zl and Zp (line
and paragraph separators, which ``str.splitlines`` and some readers take as line ends).

Used by the log formatters (``logs.py``, for every record and traceback) and by the renderers
of ``status``, ``explain``, ``check-config`` (and ``--connect``), ``dry-run``, ``retry`` and
``migrate``'s summary, each on its whole output line by line.  JSON output (``--json``,
``.error.json``) is escaped by JSON; the ``json`` log format escapes its message as well.
A file stowd writes as UTF-8 (``.error.json``, ``migrate``'s report) cannot hold a name that
is not UTF-8: ``utf8_safe`` escapes, in a document, each text that could not be written.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from typing import Any

_NAMED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_ESCAPED = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_PLAIN = re.compile(r"[\x20-\x5b\x5d-\x7e]*")  # printable ASCII without the backslash


def escape(text: str) -> str:
    """``text`` on one line, with nothing a terminal or a log reader would act on."""
    if _PLAIN.fullmatch(text):
        return text  # the common case, quickly
    return "".join(_escaped(c) for c in text)


def escape_lines(lines: Iterable[str]) -> str:
    """``lines`` joined by newlines, each escaped: a value inside one cannot add another."""
    return "\n".join(escape(line) for line in lines)


def utf8_safe(value: Any) -> Any:
    """``value`` (a JSON-like document) with each text that is not valid UTF-8 escaped; the
    rest as it was.  The exact name stays in the queue; a person reads this one."""
    if isinstance(value, str):
        return value if is_utf8(value) else escape(value)
    if isinstance(value, dict):
        return {k: utf8_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [utf8_safe(v) for v in value]
    return value


def is_utf8(text: str) -> bool:
    """``text`` can be written as UTF-8 (it holds no byte of a name that is not UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _escaped(char: str) -> str:
    named = _NAMED.get(char)
    if named is not None:
        return named
    if unicodedata.category(char) not in _ESCAPED:
        return char
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's stand-in for a byte that is not UTF-8
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
