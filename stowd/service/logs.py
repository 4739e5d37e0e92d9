"""Log output: one line per event, in the form the reader needs.

* ``text`` (a terminal, a file): ``2026-11-27 14:30:05,123 INFO stowd.worker: ...``
* ``journal`` (under systemd, chosen by ``auto`` when ``JOURNAL_STREAM`` names our stderr): no
  time stamp (journald adds one) and a ``<N>`` syslog priority prefix, so ``journalctl -p
  warning`` works.
* ``json`` (log shippers): one JSON object a line: time, level, logger, message (and the
  exception text).

Names and answers never forge a line: every message, in every format, is escaped by
``printable.escape`` (a newline in a file name shows as ``\\n``, an ESC as ``\\x1b``).  A
traceback keeps its lines, each escaped, and each exception's own text is put on one line.

Secrets never reach a log line: URLs are logged with ``Destination.display_url`` and no
credentials are held by the code that logs.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from datetime import UTC, datetime
from types import TracebackType

from stowd.printable import escape

FORMATS = ("auto", "text", "journal", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_PRIORITY = {  # syslog priorities (sd-daemon.h SD_ERR ...)
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}
_QUIET = ("httpx", "httpcore", "watchdog", "pynetdicom")


def _one_line(record: logging.LogRecord) -> bool:
    """pynetdicom logs a peer's broken connection as an ERROR with a traceback: for stowd it
    is one WARNING line (stowd says itself what became of the association)."""
    if not record.name.startswith("pynetdicom"):
        return True
    record.exc_info = None
    record.exc_text = None
    if record.levelno > logging.WARNING:
        record.levelno, record.levelname = logging.WARNING, "WARNING"
    return True


CHAIN_LIMIT = 20  # chained exceptions shown in one traceback, the newest ones


_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``, the message escaped; tracebacks as ``format_exception`` writes them."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._second: tuple[int, str] = (-1, "")  # the last second written, as text

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        """``logging.Formatter``'s time stamp, the date and time of a second made once (a
        busy daemon writes many lines a second)."""
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        made, text = self._second
        if made != second:
            text = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = (second, text)
        return f"{text},{int(record.msecs):03d}"  # default_msec_format, "%s,%03d"

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = escape(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: _ExcInfo) -> str:  # noqa: N802
        return format_exception(ei)


class JournalFormatter(logging.Formatter):
    """``<N>logger: message`` for journald's stdout/stderr stream (it adds time and unit)."""

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 6 if record.levelno < logging.ERROR else 3)
        text = f"{record.name}: {escape(record.getMessage())}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        # journald reads one line as one entry: continuation lines keep the priority
        return "\n".join(f"<{priority}>{line}" for line in text.split("\n"))

    def formatException(self, ei: _ExcInfo) -> str:  # noqa: N802
        return format_exception(ei)


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": escape(record.getMessage()),
        }
        if record.exc_info:
            doc["exception"] = format_exception(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def format_exception(ei: _ExcInfo) -> str:
    """A traceback with its usual lines, each escaped, and each exception's text on one line
    (a file name in an exception's message cannot start a line of its own)."""
    exc = ei[1]
    if exc is None:
        return "NoneType: None"
    return "\n".join(_exception_lines(exc, set()))


def _exception_lines(exc: BaseException, seen: set[int]) -> list[str]:
    """The chain of exceptions, oldest first, walked without recursion (a chain a thousand
    long, one per folder of ``mkdir(parents=True)``, made the log itself fail), and at most
    ``CHAIN_LIMIT`` of them."""
    chain: list[tuple[BaseException, str | None]] = []  # newest first, with its link
    link: str | None = None
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(chain) < CHAIN_LIMIT:
        seen.add(id(current))
        chain.append((current, link))
        current, link = _earlier(current)
    lines: list[str] = []
    if current is not None and id(current) not in seen:
        lines += [f"[{CHAIN_LIMIT} exceptions shown, earlier ones left out]", ""]
    for each, link in reversed(chain):
        lines += _one_exception(each)
        if link is not None:
            lines += ["", link, ""]
    return lines


def _earlier(exc: BaseException) -> tuple[BaseException | None, str | None]:
    """The exception ``exc`` was raised from or during, and the line that joins them."""
    if exc.__cause__ is not None:
        return exc.__cause__, _CAUSE
    if exc.__context__ is not None and not exc.__suppress_context__:
        return exc.__context__, _CONTEXT
    return None, None


def _one_exception(exc: BaseException) -> list[str]:
    lines: list[str] = []
    if exc.__traceback__ is not None:
        lines.append("Traceback (most recent call last):")
        frames = "".join(traceback.format_tb(exc.__traceback__))
        lines += [escape(line) for line in frames.rstrip("\n").split("\n")]
    only = "".join(traceback.format_exception_only(type(exc), exc))
    lines.append(escape(only.rstrip("\n")))
    return lines


_CAUSE = "The above exception was the direct cause of the following exception:"
_CONTEXT = "During handling of the above exception, another exception occurred:"


def under_journald() -> bool:
    """stderr is connected to journald (``JOURNAL_STREAM`` is its ``device:inode``)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def setup(level: str, fmt: str = "auto") -> str:
    """Log to stderr at ``level`` in ``fmt``; return the format used."""
    if fmt == "auto":
        fmt = "journal" if under_journald() else "text"
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter = {
        "journal": JournalFormatter(),
        "json": JsonFormatter(),
    }.get(fmt, TextFormatter())
    handler.setFormatter(formatter)
    handler.addFilter(_quiet_watchdog_shutdown)  # child loggers' records skip logger filters
    handler.addFilter(_one_line)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    _record_less()
    return fmt


def _record_less() -> None:
    """No format here shows where a line was logged from, nor its process: each record
    skips looking for them (the frames walked up to the caller were a fifth of a line's
    CPU; logging's documented switches, see "Optimization" in the logging HOWTO)."""
    logging._srcfile = None
    logging.logProcesses = False
    logging.logMultiprocessing = False


class _OverBar(logging.Formatter):
    """Starts each record by clearing the terminal's line: a progress bar redrawn in place
    (``stowd migrate``) is written over instead of having log lines glued to its end."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return "\r\x1b[K" + self.inner.format(record)


def over_progress_bar() -> None:
    """Make the handlers set up by ``setup`` clear the progress bar's line first."""
    for handler in logging.getLogger().handlers:
        if handler.formatter is not None:
            handler.setFormatter(_OverBar(handler.formatter))


def _quiet_watchdog_shutdown(record: logging.LogRecord) -> bool:
    """watchdog logs an ERROR when an observer is stopped while events are queued: noise.
    (Only watchdog's records are formatted to look: the others are formatted once, later.)"""
    if not record.name.startswith("watchdog"):
        return True
    return "called when the thread is inactive" not in record.getMessage()
