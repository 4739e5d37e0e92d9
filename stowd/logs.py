"""Log output: one line per event, in the form the reader needs.

* ``text`` (a terminal, a file): ``2026-11-27 14:30:05,123 INFO stowd.worker: ...``
* ``journal`` (under systemd, chosen by ``auto`` when ``JOURNAL_STREAM`` names our stderr): no
  time stamp (journald adds one) and a ``<N>`` syslog priority prefix, so ``journalctl -p
  warning`` works.
* ``json`` (log shippers): one JSON object a line: time, level, logger, message (and the
  exception text).

Secrets never reach a log line: URLs are logged with ``Destination.display_url`` and no
credentials are held by the code that logs.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime

FORMATS = ("auto", "text", "journal", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_PRIORITY = {  # syslog priorities (sd-daemon.h SD_ERR ...)
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}
_QUIET = ("httpx", "httpcore", "watchdog")


class JournalFormatter(logging.Formatter):
    """``<N>logger: message`` for journald's stdout/stderr stream (it adds time and unit)."""

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 6 if record.levelno < logging.ERROR else 3)
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        # journald reads one line as one entry: continuation lines keep the priority
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines() or [""])


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


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
    }.get(fmt, logging.Formatter(TEXT_FORMAT))
    handler.setFormatter(formatter)
    handler.addFilter(_quiet_watchdog_shutdown)  # child loggers' records skip logger filters
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    return fmt


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
    """watchdog logs an ERROR when an observer is stopped while events are queued: noise."""
    return "called when the thread is inactive" not in record.getMessage()
