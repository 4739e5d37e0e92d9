"""Prometheus metrics: counters the daemon moves, queue gauges read at scrape time, an HTTP server.

Counters and the request histogram live on this module's ``REGISTRY`` (not prometheus_client's
global one, so tests and several daemons in one process do not mix with other libraries' metrics)::

    stowd_files_queued_total{source,destination}     files the watcher queued
    stowd_files_sent_total{source,destination}       files the archive stored (moved to sent/)
    stowd_files_failed_total{source,destination}     files given up on (moved to failed/)
    stowd_bytes_sent_total{destination}              bytes of the files sent
    stowd_request_duration_seconds{destination}      STOW-RS requests (histogram)
    stowd_retries_total{destination,reason}          retries, ``reason`` one of ``REASONS``

Each scrape also reads the queue database (``queue.read_active``: its own read-only
connection, closed after the scrape, so it never shares the daemon's per-thread connections
and never blocks it)::

    stowd_queue_files{destination,state}             active rows: pending, waiting, claimed,
                                                     settling (``waiting``: pending, but its next
                                                     attempt lies ahead; as ``stowd status``)
    stowd_oldest_pending_age_seconds{destination}    age of its oldest active row (0: none)
    stowd_destination_held{destination}              1 while the destination is held (as
                                                     ``stowd status`` shows it), else 0
    stowd_up                                         1

Label values are source names, destination names, states and reasons only: never paths,
patient data or URLs (which may carry credentials).  Names are checked against the pattern
config.py accepts, so a path passed by mistake is refused rather than exported.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from stowd.errors import (
    DestinationBusy,
    DestinationHeld,
    FileUnreadable,
    QueueError,
    StowdError,
)
from stowd.queue import ActiveView, read_active
from stowd.yamlwalk import NAME

log = logging.getLogger("stowd.metrics")

# -- retry reasons ---------------------------------------------------------------------------
UNAVAILABLE = "unavailable"
"""The destination could not be reached or was busy: connect errors, timeouts, 408, 429,
502/503/504 (transient trouble of the whole request)."""
REFUSED = "refused"
"""The destination refused us and is held: 401/403/404/405/415, redirects, TLS failures."""
SERVER_ERROR = "server_error"
"""The archive answered with another 5xx (500 above all), which one of the files may cause."""
FILE = "file"
"""A single file is tried again: the archive said so for it (out of resources, a warning it
treats as transient), or preparing it failed in a way that may pass."""
UNREADABLE = "unreadable"
"""stowd could not read the file (permissions, an I/O error, a share gone)."""
REASONS = (UNAVAILABLE, REFUSED, SERVER_ERROR, FILE, UNREADABLE)

_UNAVAILABLE_STATUSES = frozenset({408, 429, 502, 503, 504})

# -- what is counted -------------------------------------------------------------------------
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
STATES = ("pending", "waiting", "claimed", "settling")
OUTCOMES = ("sent", "failed")
SCRAPE_BUSY_TIMEOUT = 5.0  # seconds a scrape waits for a locked database (WAL readers rarely do)

REGISTRY = CollectorRegistry()

FILES_QUEUED = Counter(
    "stowd_files_queued_total",
    "Files the watcher queued",
    ["source", "destination"],
    registry=REGISTRY,
)
FILES_SENT = Counter(
    "stowd_files_sent_total",
    "Files the archive stored, moved to sent/",
    ["source", "destination"],
    registry=REGISTRY,
)
FILES_FAILED = Counter(
    "stowd_files_failed_total",
    "Files given up on, moved to failed/",
    ["source", "destination"],
    registry=REGISTRY,
)
FILES_NOTED = Counter(
    "stowd_files_sent_noted_total",
    "Files moved to sent/ with a note: the archive said it already held them "
    "(note: already_stored) or stored them with a warning (note: warning)",
    ["source", "destination", "note"],
    registry=REGISTRY,
)
NOTES = ("already_stored", "warning")
BYTES_SENT = Counter(
    "stowd_bytes_sent_total",
    "Bytes of the files the archive stored",
    ["destination"],
    registry=REGISTRY,
)
REQUEST_DURATION = Histogram(
    "stowd_request_duration_seconds",
    "Duration of STOW-RS requests, answered or not",
    ["destination"],
    buckets=REQUEST_BUCKETS,
    registry=REGISTRY,
)
RETRIES = Counter(
    "stowd_retries_total",
    "Retries by reason: " + ", ".join(REASONS),
    ["destination", "reason"],
    registry=REGISTRY,
)


# -- what the daemon calls (cheap; prometheus_client metrics are thread-safe) ------------------
def queued(source: str, destination: str, n: int = 1) -> None:
    """``n`` files of ``source`` were queued for ``destination``."""
    if n > 0:
        FILES_QUEUED.labels(_name(source), _name(destination)).inc(n)


def settled(
    source: str, destination: str, outcome: str, size: int, note: str | None = None
) -> None:
    """A file was moved to sent/ (``outcome`` "sent") or failed/ ("failed"); ``size`` in bytes
    counts only when it was sent; ``note`` (one of ``NOTES``) how a sent one was stored."""
    if outcome == "sent":
        FILES_SENT.labels(_name(source), _name(destination)).inc()
        BYTES_SENT.labels(_name(destination)).inc(max(size, 0))
        if note in NOTES:
            FILES_NOTED.labels(_name(source), _name(destination), note).inc()
    elif outcome == "failed":
        FILES_FAILED.labels(_name(source), _name(destination)).inc()
    else:
        raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")


def request(destination: str, seconds: float) -> None:
    """One STOW-RS request to ``destination`` took ``seconds`` (answered or not)."""
    REQUEST_DURATION.labels(_name(destination)).observe(seconds)


def retried(destination: str, reason: str, n: int = 1) -> None:
    """``n`` files (or one request) to ``destination`` are tried again; ``reason`` in REASONS."""
    if reason not in REASONS:
        raise ValueError(f"reason must be one of {REASONS}, got {reason!r}")
    if n > 0:
        RETRIES.labels(_name(destination), reason).inc(n)


def retry_reason(exc: BaseException) -> str:
    """The retry reason of an exception the worker retries after.

    DestinationHeld: REFUSED; DestinationBusy: UNAVAILABLE without an answer or for
    408/429/502/503/504, else SERVER_ERROR; FileUnreadable and OSError: UNREADABLE; anything
    else (an unexpected error while preparing a file): FILE.  A retry the archive asked for in
    its answer for one file is FILE too: pass the constant.
    """
    if isinstance(exc, DestinationHeld):
        return REFUSED
    if isinstance(exc, DestinationBusy):
        status = exc.status
        if status is None or status in _UNAVAILABLE_STATUSES or status < 500:
            return UNAVAILABLE
        return SERVER_ERROR
    if isinstance(exc, FileUnreadable | OSError):
        return UNREADABLE
    return FILE


def _name(value: str) -> str:
    """A label value must be a configured name (which can never be a path or a URL)."""
    if not NAME.fullmatch(value):
        raise ValueError(f"metric labels take source and destination names only, got {value!r}")
    return value


# -- read from the queue at scrape time ------------------------------------------------------
class QueueCollector:
    """A prometheus_client collector: the queue gauges of ``destinations`` and ``stowd_up``.

    A queue that cannot be read leaves its gauges out of that scrape (the counters are still
    served); the problem is logged once, and once more when reading works again.
    """

    def __init__(
        self, path: Path, destinations: Sequence[str], clock: Callable[[], float] = time.time
    ) -> None:
        self.path = path
        self.destinations = [_name(d) for d in destinations]
        self.clock = clock
        self._failing = False
        self._lock = threading.Lock()

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily("stowd_up", "1 while stowd serves its metrics", value=1)
        now = self.clock()
        view = self._read(now)
        if view is not None:
            yield from self._families(view, now)

    def _read(self, now: float) -> ActiveView | None:
        try:
            view = read_active(self.path, now, busy_timeout=SCRAPE_BUSY_TIMEOUT)
        except Exception as exc:
            self._note_failure(exc)
            return None
        with self._lock:
            if self._failing:
                log.info("metrics: the queue can be read again")
            self._failing = False
        return view

    def _note_failure(self, exc: Exception) -> None:
        with self._lock:
            first, self._failing = not self._failing, True
        if first and isinstance(exc, QueueError | OSError):
            log.warning(
                "metrics: cannot read the queue %s, its gauges are left out: %s", self.path, exc
            )
        elif first:
            log.exception(
                "metrics: reading the queue %s failed, its gauges are left out", self.path
            )

    def _families(self, view: ActiveView, now: float) -> Iterable[Metric]:
        files = GaugeMetricFamily(
            "stowd_queue_files",
            "Active rows of the queue by destination and state (pending, waiting, claimed, "
            "settling)",
            labels=["destination", "state"],
        )
        oldest = GaugeMetricFamily(
            "stowd_oldest_pending_age_seconds",
            "Age of the oldest row a destination has not finished (0: none)",
            labels=["destination"],
        )
        held = GaugeMetricFamily(
            "stowd_destination_held",
            "1 while the destination is held (refused or unavailable), else 0",
            labels=["destination"],
        )
        for name in self.destinations:
            for state in STATES:
                files.add_metric([name, state], view.counts.get((name, state), 0))
            first = view.oldest.get(name)
            oldest.add_metric([name], 0.0 if first is None else max(0.0, now - first))
            held.add_metric([name], 1 if name in view.held else 0)
        return [files, oldest, held]


class _Scrape:
    """What one scrape serves: the module's registry, then the queue collector."""

    def __init__(self, queue: QueueCollector) -> None:
        self.queue = queue

    def collect(self) -> Iterable[Metric]:
        yield from REGISTRY.collect()
        yield from self.queue.collect()


# -- the HTTP server ---------------------------------------------------------------------------
class Server:
    """The metrics HTTP server running in a daemon thread; ``close()`` stops it."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        address: Any = httpd.server_address
        self.host: str = str(address[0])
        self.port: int = int(address[1])

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(
    host: str,
    port: int,
    queue_path: Path,
    destinations: list[str],
    *,
    clock: Callable[[], float] = time.time,
) -> Server:
    """Serve the metrics over HTTP on host:port (port 0: any free one, see ``Server.port``).

    Every path answers with the metrics, ``/metrics`` among them.  Series of the configured
    destinations start at 0, so rates and alerts work before the first event.
    """
    collector = QueueCollector(queue_path, destinations, clock)
    for name in collector.destinations:
        _touch(name)
    try:
        scrape = CollectorRegistry(auto_describe=True)  # a real registry: ?name[]= works
        scrape.register(_Scrape(collector))
        httpd, thread = start_http_server(port, addr=host, registry=scrape)
    except OSError as exc:
        where = f"[{host}]" if ":" in host else host
        reason = exc.strerror or str(exc)
        raise StowdError(f"cannot serve metrics on {where}:{port}: {reason}") from exc
    thread.name = "stowd-metrics"
    return Server(httpd, thread)


def _touch(destination: str) -> None:
    BYTES_SENT.labels(destination)
    REQUEST_DURATION.labels(destination)
    for reason in REASONS:
        RETRIES.labels(destination, reason)
