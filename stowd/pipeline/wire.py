"""The STOW requests in flight to one destination, shared by the workers that send to it.

An archive that crashes on a file drops every connection open at that moment, so a dropped
connection says something about a file only when its request was the only one on the wire
from start to end.  ``Wire`` tells which: ``begin`` counts a request in (and, for a probe of
a held destination, only when none is in flight, so that probes go one at a time), ``alone``
says whether no other request overlapped it, ``end`` counts it out.  It also keeps the
SOPInstanceUIDs of requests that ended without an answer (``unanswered``/``answered``): an
archive that later says it already holds one may hold it from stowd's own request.

It also keeps the destination's concurrency limit (``concurrency.Concurrency``, adaptive by
default): a worker takes a ``seat`` before it claims a batch and gives it back when its
request is over; with every seat taken it claims nothing (it reads new files or idles), so no
claimed batch ever waits for room on the wire.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable

from stowd.pipeline.concurrency import Concurrency, Ticket

NOT_ALONE = 0  # the token of a request that began while another was in flight


class Wire:
    """Requests in flight to one destination."""

    def __init__(self, concurrency: Concurrency | None = None) -> None:
        self._lock = threading.Lock()
        self._busy = 0
        self._begun = 0
        # requests allowed at once (None: no limit); seats: batches claimed or being claimed
        self.concurrency = concurrency
        self._seats = 0
        # SOPInstanceUIDs sent in a request that ended without an answer (a timeout, a
        # dropped connection, a 5xx): the archive may hold them from that request
        self._unanswered: set[str] = set()

    def idle(self) -> bool:
        with self._lock:
            return self._busy == 0

    def begin(self, *, only: bool = False) -> int | None:
        """Count a request in; its token (``NOT_ALONE`` when another is in flight).  With
        ``only``: None instead of counting it when another request is in flight."""
        with self._lock:
            if only and self._busy:
                return None
            self._busy += 1
            self._begun += 1
            return self._begun if self._busy == 1 else NOT_ALONE

    def alone(self, token: int) -> bool:
        """Was the request of ``token`` the only one in flight since it began (so far)?"""
        with self._lock:
            return token != NOT_ALONE and self._begun == token

    def end(self) -> None:
        with self._lock:
            self._busy -= 1

    def seat(self) -> Ticket | None:
        """Take a seat for a batch to claim and send; None when the limit allows no more
        (give it back with ``unseat``).  Without a limit every worker has one."""
        with self._lock:
            limit = self.concurrency
            if limit is None:
                return Ticket(0, 0, 0)
            ticket = limit.ticket()
            if self._seats >= limit.limit:
                return None
            self._seats += 1
            return ticket

    def unseat(self) -> None:
        with self._lock:
            if self.concurrency is not None:
                self._seats = max(0, self._seats - 1)

    def unanswered(self, uids: Iterable[str]) -> None:
        """These UIDs were sent in a request that ended without an answer."""
        with self._lock:
            self._unanswered.update(uids)

    def answered(self, uids: Iterable[str]) -> set[str]:
        """Which of ``uids`` were sent before without an answer; all of them are answered now."""
        with self._lock:
            found = self._unanswered.intersection(uids)
            self._unanswered.difference_update(found)
            return found


_wires: weakref.WeakKeyDictionary[object, Wire] = weakref.WeakKeyDictionary()
_wires_lock = threading.Lock()


def wire_of(client: object, concurrency: Callable[[], Concurrency | None] = lambda: None) -> Wire:
    """The ``Wire`` of the destination ``client`` sends to (one client per destination is
    shared by its workers; a new generation of workers has new clients).  A new wire takes
    its limit from ``concurrency``."""
    with _wires_lock:
        wire = _wires.get(client)
        if wire is None:
            wire = _wires[client] = Wire(concurrency())
        return wire
