"""What the running daemon is doing now that the queue does not record, for ``stowd status``
(another process): a small JSON file beside the queue, ``<queue>.state``.

The daemon rewrites it (temp file and rename, mode 0600) when its content changed, at most
every ``WRITE_EVERY`` seconds, and removes it when it stops.  It holds a document::

    {"pid": 4242, "written_at": 1767000000.0,
     "destinations": {"pacs": {"request_since": ..., "last_progress": ..., "requests": 2}},
     "receivers": {"ct": {"listening": true, "open": 1, "received": 200, ...}},
     "concurrency": {"pacs": {"limit": 2, "workers": 4}}}

``destinations`` names, per destination with requests in flight, the request that has gone
longest without progress (no byte sent, no answer): when it started, when it last sent a
chunk, and how many requests are in flight.  ``concurrency`` names, per destination with
``adaptive: true``, how many requests it allows at once now (``pipeline/concurrency.py``).
Readers ignore keys they do not know, so more
can be added.  Status trusts the file only when its pid is the daemon holding the queue.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from stowd.fileops import write_new

log = logging.getLogger("stowd")

SUFFIX = ".state"
CONCURRENCY = "concurrency"  # the key of the adaptive limits (issue 20)
MODE = 0o600  # what a daemon is doing is for its administrators only
WRITE_EVERY = 2.0  # seconds
# A request without progress for this long (or a tenth of the read timeout, if shorter) is
# shown as "not answering" in status, long before the read timeout ends it.
NOT_ANSWERING_AFTER = 30.0
NOT_ANSWERING_SHARE = 0.1


def path_of(queue: Path) -> Path:
    return Path(str(queue) + SUFFIX)


def not_answering_after(read_timeout: float) -> float:
    """Seconds without progress after which a request counts as not answered."""
    return min(NOT_ANSWERING_AFTER, read_timeout * NOT_ANSWERING_SHARE)


def stalled(requests: Iterable[tuple[float, float]]) -> dict[str, Any] | None:
    """Of (started, last progress) pairs, the one without progress the longest, or None."""
    found = sorted(requests, key=lambda r: r[1])
    if not found:
        return None
    started, progress = found[0]
    return {"request_since": started, "last_progress": progress, "requests": len(found)}


def in_flight(
    requests: Iterable[tuple[str, tuple[float, float] | None]],
) -> dict[str, dict[str, Any]]:
    """Per destination with requests in flight, ``stalled`` of them: ``requests`` holds each
    sender's destination name and its request (started, last progress), None when idle."""
    found: dict[str, list[tuple[float, float]]] = {}
    for name, request in requests:
        if request is not None:
            found.setdefault(name, []).append(request)
    stalls = {name: stalled(pairs) for name, pairs in found.items()}
    return {name: stall for name, stall in stalls.items() if stall is not None}


def document(pid: int, now: float, destinations: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    return {"pid": pid, "written_at": now, "destinations": dict(destinations)}


def write(queue: Path, doc: Mapping[str, Any]) -> None:
    """Replace the state file at once (a reader sees the old or the new one, whole)."""
    write_new(path_of(queue), json.dumps(doc).encode("utf-8"), MODE, suffix=".tmp", sync=False)


def publish(queue: Path, doc: Mapping[str, Any]) -> bool:
    """``write``, False (logged at debug: status then shows less) when it cannot be written."""
    try:
        write(queue, doc)
    except OSError as exc:
        log.debug("cannot write %s: %s", path_of(queue), exc)
        return False
    return True


def remove(queue: Path) -> None:
    with contextlib.suppress(OSError):  # status ignores a file whose daemon is gone
        path_of(queue).unlink(missing_ok=True)


def read(queue: Path, pid: int | None) -> dict[str, Any]:
    """The destinations part of the file the running daemon ``pid`` wrote, else ``{}``."""
    return _part(queue, pid, "destinations")


def read_receivers(queue: Path, pid: int | None) -> dict[str, Any]:
    """Per receiving source: what its C-STORE receiver took in (``receivers.snapshot``)."""
    return _part(queue, pid, "receivers")


def read_concurrency(queue: Path, pid: int | None) -> dict[str, Any]:
    """Per adaptive destination: the requests it allows at once now, and its workers."""
    return _part(queue, pid, CONCURRENCY)


def _part(queue: Path, pid: int | None, key: str) -> dict[str, Any]:
    if pid is None:
        return {}
    try:
        doc = json.loads(path_of(queue).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("pid") != pid:
        return {}  # left by a daemon that was killed
    found = doc.get(key)
    return found if isinstance(found, dict) else {}
