"""The Prometheus counters the pipeline moves, on this module's ``REGISTRY`` (not
prometheus_client's global one, so tests and several daemons in one process do not mix with
other libraries' metrics)::

    stowd_files_queued_total{source,destination}     files the watcher queued
    stowd_files_sent_total{source,destination}       files the archive stored (moved to sent/)
    stowd_files_sent_noted_total{source,destination,note}
                                                     of those, stored with a note (``NOTES``)
    stowd_files_failed_total{source,destination}     files given up on (moved to failed/)
    stowd_bytes_sent_total{destination}              bytes of the files sent
    stowd_request_duration_seconds{destination}      STOW-RS requests (histogram)
    stowd_retries_total{destination,reason}          retries, ``reason`` one of ``REASONS``
    stowd_received_instances_total{source}           C-STORE instances queued (answered Success)
    stowd_received_bytes_total{source}               bytes of those instances
    stowd_received_refused_total{source}             C-STORE instances answered with a failure
    stowd_associations_rejected_total{source}        associations rejected (AE title, limit)
    stowd_associations_open{source}                  associations open now (a gauge)
    stowd_destination_max_rate_bytes{destination}    its rate cap (``max_rate``) in bytes per
                                                     second, a gauge; no series: no cap
    stowd_destination_concurrency{destination}      requests allowed in flight at once now
                                                     (a gauge; adaptive destinations only)

``service/metrics.py`` serves them with the queue's gauges.  Label values are source names,
destination names and reasons only: never paths, patient data or URLs (which may carry
credentials).  Names are checked against the pattern the config accepts, so a path passed by
mistake is refused rather than exported.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from stowd.config.yamlwalk import NAME
from stowd.errors import DestinationBusy, DestinationHeld, FileUnreadable

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
OUTCOMES = ("sent", "failed")

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


RECEIVED_INSTANCES = Counter(
    "stowd_received_instances_total",
    "C-STORE instances received and queued (answered Success)",
    ["source"],
    registry=REGISTRY,
)
RECEIVED_BYTES = Counter(
    "stowd_received_bytes_total",
    "Bytes of the C-STORE instances received and queued",
    ["source"],
    registry=REGISTRY,
)
RECEIVED_REFUSED = Counter(
    "stowd_received_refused_total",
    "C-STORE instances answered with a failure status (out of resources, malformed)",
    ["source"],
    registry=REGISTRY,
)
ASSOCIATIONS_REJECTED = Counter(
    "stowd_associations_rejected_total",
    "Associations rejected: calling or called AE title, or too many open",
    ["source"],
    registry=REGISTRY,
)
ASSOCIATIONS_OPEN = Gauge(
    "stowd_associations_open",
    "Associations open now, per receiving source",
    ["source"],
    registry=REGISTRY,
)
# ratecap (issue 20)
MAX_RATE = Gauge(
    "stowd_destination_max_rate_bytes",
    "The destination's rate cap (max_rate) in bytes per second; no series: no cap",
    ["destination"],
    registry=REGISTRY,
)

# adaptive concurrency (issue 20)
CONCURRENCY = Gauge(
    "stowd_destination_concurrency",
    "Requests allowed in flight at once to the destination now (adaptive: lowered while the "
    "archive is busy, raised again after rounds of successful requests)",
    ["destination"],
    registry=REGISTRY,
)


# -- what the daemon calls (cheap; prometheus_client metrics are thread-safe) ------------------
def queued(source: str, destination: str, n: int = 1) -> None:
    """``n`` files of ``source`` were queued for ``destination``."""
    if n > 0:
        FILES_QUEUED.labels(label(source), label(destination)).inc(n)


def settled(
    source: str,
    destination: str,
    outcome: str,
    size: int,
    note: str | None = None,
    *,
    n: int = 1,
) -> None:
    """A file was moved to sent/ (``outcome`` "sent") or failed/ ("failed"); ``size`` in bytes
    counts only when it was sent; ``note`` (one of ``NOTES``) how a sent one was stored.
    ``n``: that many files alike at once (a batch's), ``size`` their bytes together."""
    if outcome == "sent":
        FILES_SENT.labels(label(source), label(destination)).inc(n)
        BYTES_SENT.labels(label(destination)).inc(max(size, 0))
        if note in NOTES:
            FILES_NOTED.labels(label(source), label(destination), note).inc(n)
    elif outcome == "failed":
        FILES_FAILED.labels(label(source), label(destination)).inc(n)
    else:
        raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")


def request(destination: str, seconds: float) -> None:
    """One STOW-RS request to ``destination`` took ``seconds`` (answered or not)."""
    REQUEST_DURATION.labels(label(destination)).observe(seconds)


def retried(destination: str, reason: str, n: int = 1) -> None:
    """``n`` files (or one request) to ``destination`` are tried again; ``reason`` in REASONS."""
    if reason not in REASONS:
        raise ValueError(f"reason must be one of {REASONS}, got {reason!r}")
    if n > 0:
        RETRIES.labels(label(destination), reason).inc(n)


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


def label(value: str) -> str:
    """A label value must be a configured name (which can never be a path or a URL)."""
    if not NAME.fullmatch(value):
        raise ValueError(f"metric labels take source and destination names only, got {value!r}")
    return value


def touch(destination: str) -> None:
    """Start the series of ``destination`` at 0, so rates and alerts work before its first event."""
    BYTES_SENT.labels(destination)
    REQUEST_DURATION.labels(destination)
    for reason in REASONS:
        RETRIES.labels(destination, reason)


def route(source: str, destination: str) -> None:
    """Start the file series of ``source`` to ``destination`` at 0: Prometheus's ``increase``
    and ``rate`` count nothing of a series' first sample, so without this the first failed
    file of a process never raised ``increase(stowd_files_failed_total[1h])``."""
    for counter in (FILES_QUEUED, FILES_SENT, FILES_FAILED):
        counter.labels(label(source), label(destination))


def receiving(source: str) -> None:
    """Start the series of a receiving ``source`` at 0."""
    for counter in (RECEIVED_INSTANCES, RECEIVED_BYTES, RECEIVED_REFUSED, ASSOCIATIONS_REJECTED):
        counter.labels(label(source))
    ASSOCIATIONS_OPEN.labels(label(source))


def instance_received(source: str, size: int) -> None:
    RECEIVED_INSTANCES.labels(label(source)).inc()
    RECEIVED_BYTES.labels(label(source)).inc(max(size, 0))


def instance_refused(source: str) -> None:
    RECEIVED_REFUSED.labels(label(source)).inc()


def association_rejected(source: str) -> None:
    ASSOCIATIONS_REJECTED.labels(label(source)).inc()


def association_opened(source: str) -> None:
    ASSOCIATIONS_OPEN.labels(label(source)).inc()


def association_closed(source: str) -> None:
    ASSOCIATIONS_OPEN.labels(label(source)).dec()


# ratecap (issue 20)
def max_rate(destination: str, rate: float | None) -> None:
    """The destination's rate cap now (None: none, and no series)."""
    name = label(destination)
    if rate is not None:
        MAX_RATE.labels(name).set(rate)
    else:
        with contextlib.suppress(KeyError):  # it had none
            MAX_RATE.remove(name)


def concurrency(destination: str, limit: int) -> None:
    """``destination`` allows ``limit`` requests at once now (adaptive concurrency)."""
    CONCURRENCY.labels(label(destination)).set(limit)


def concurrency_forgotten() -> None:
    """No destination's limit is shown until it is set again (a reload: a destination may be
    gone or no longer adaptive, and its last figure would be false)."""
    CONCURRENCY.clear()
