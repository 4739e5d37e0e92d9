"""The STOW requests in flight to one destination, shared by the workers that send to it.

An archive that crashes on a file drops every connection open at that moment, so a dropped
connection says something about a file only when its request was the only one on the wire
from start to end.  ``Wire`` tells which: ``begin`` counts a request in (and, for a probe of
a held destination, only when none is in flight, so that probes go one at a time), ``alone``
says whether no other request overlapped it, ``end`` counts it out.  It also keeps the
SOPInstanceUIDs of requests that ended without an answer (``unanswered``/``answered``): an
archive that later says it already holds one may hold it from stowd's own request.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable

NOT_ALONE = 0  # the token of a request that began while another was in flight


class Wire:
    """Requests in flight to one destination."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy = 0
        self._begun = 0
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


def wire_of(client: object) -> Wire:
    """The ``Wire`` of the destination ``client`` sends to (one client per destination is
    shared by its workers; a new generation of workers has new clients)."""
    with _wires_lock:
        wire = _wires.get(client)
        if wire is None:
            wire = _wires[client] = Wire()
        return wire
