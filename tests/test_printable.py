"""printable.escape and the log formatters' tracebacks (issue 14)."""

from __future__ import annotations

import logging
import sys

import pytest

from stowd.printable import escape, escape_lines
from stowd.service.logs import JournalFormatter, TextFormatter


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("IM0001.dcm", "IM0001.dcm"),
        ("Müller 日本.dcm", "Müller 日本.dcm"),
        ("a\nb\r\tc", "a\\nb\\r\\tc"),
        ("\x1b[2J\x07\x00\x7f\x85", "\\x1b[2J\\x07\\x00\\x7f\\x85"),
        ("back\\n", "back\\\\n"),  # a real backslash cannot pass for an escape
        ("x\udcff\udcfe.dcm", "x\\xff\\xfe.dcm"),  # os.fsdecode of bytes that are not UTF-8
        ("rtl\u202eexe.dcm\u2028\u2029", "rtl\\u202eexe.dcm\\u2028\\u2029"),
    ],
)
def test_escape(text: str, shown: str) -> None:
    assert escape(text) == shown
    assert escape_lines([text, text]) == f"{shown}\n{shown}"


def _record(exc_info: bool) -> logging.LogRecord:
    try:
        try:
            raise OSError("inner\nFORGED")
        except OSError as exc:
            raise ValueError("outer\x1b[2J") from exc
    except ValueError:
        info = sys.exc_info()
    return logging.LogRecord(
        "stowd.worker", logging.ERROR, __file__, 1, "%s: failed", ("a\nFORGED",),
        info if exc_info else None,
    )  # fmt: skip


def test_text_tracebacks_keep_their_lines_and_escape_each() -> None:
    lines = TextFormatter().format(_record(True)).split("\n")
    assert lines[0].endswith("ERROR stowd.worker: a\\nFORGED: failed")
    assert lines[1] == "Traceback (most recent call last):"
    assert "OSError: inner\\nFORGED" in lines
    assert "The above exception was the direct cause of the following exception:" in lines
    assert lines[-1] == "ValueError: outer\\x1b[2J"
    assert not any(line.startswith("FORGED") for line in lines)


def test_journal_lines_each_start_with_the_priority() -> None:
    lines = JournalFormatter().format(_record(True)).split("\n")
    assert lines[0] == "<3>stowd.worker: a\\nFORGED: failed"
    assert all(line.startswith("<3>") for line in lines)
    assert "<3>OSError: inner\\nFORGED" in lines
