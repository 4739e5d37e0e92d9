"""How many requests a destination's workers may have in flight at once: adaptive concurrency
(``adaptive: true``, the default), additive increase and multiplicative decrease (AIMD), as
TCP's congestion window.

* The limit starts at ``workers``.
* An archive that says it is overloaded (HTTP 429 or 503, any answer with ``Retry-After``) or
  a request that timed out halves it, rounded up, down to 1.  One decrease per round: a
  signal of a request that began before the last decrease is not counted again (the requests
  of one overloaded moment all answer 429 together; they are one signal, not several).
* ``limit`` successful requests in a row, all begun at the current limit, raise it by one, up
  to ``workers``: at most one increase per round of requests.

No clock is involved: a round is counted in requests, so the limit moves as fast as the
archive answers.  ``Concurrency`` is shared by the workers of one destination (``wire.Wire``
asks it whether a worker may claim a batch) and kept by name across a reload (``Limits``), so
a SIGHUP does not lose what was learnt.  With ``adaptive: false`` there is no limit but
``workers`` itself.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from stowd.config.model import Destination
from stowd.errors import DestinationBusy, StowFailure, TimedOut

OVERLOADED = (429, 503)  # the archive says it is overloaded (RFC 6585 s. 4, RFC 9110 s. 15.6.4)


@dataclass(frozen=True)
class Ticket:
    """What a request knew of the limit when it began (``Concurrency.ticket``)."""

    limit: int
    cuts: int  # decreases so far
    changes: int  # changes (either way) so far


@dataclass(frozen=True)
class Change:
    """A change of the limit, for its log line."""

    old: int
    new: int
    successes: int = 0  # the successful requests that raised it


def overload(failure: StowFailure) -> str | None:
    """What in ``failure`` says the archive is overloaded (for the log line), or None."""
    if isinstance(failure, TimedOut):
        return "a request timed out"
    if not isinstance(failure, DestinationBusy):
        return None
    if failure.retry_after is not None:
        return f"the archive asked to wait (HTTP {failure.status or '-'}, Retry-After)"
    if failure.status in OVERLOADED:
        return f"the archive is busy ({failure.status})"
    return None


def eased(failure: StowFailure) -> bool:
    """Is ``failure`` an overload answer the limit deals with alone (429/503 without
    ``Retry-After``), so that the batch is sent again soon instead of holding the
    destination?"""
    return (
        isinstance(failure, DestinationBusy)
        and failure.status in OVERLOADED
        and failure.retry_after is None
    )


class Concurrency:
    """The AIMD limit of one destination; thread-safe."""

    def __init__(self, workers: int, adaptive: bool = True) -> None:
        self._lock = threading.Lock()
        self.workers = workers
        self.adaptive = adaptive
        self._limit = workers
        self._cuts = 0
        self._changes = 0
        self._successes = 0  # in a row, of requests begun since the last change

    @property
    def limit(self) -> int:
        """Requests allowed in flight now (``workers`` when not adaptive)."""
        with self._lock:
            return self._limit if self.adaptive else self.workers

    def ticket(self) -> Ticket:
        with self._lock:
            return Ticket(self._limit, self._cuts, self._changes)

    def overloaded(self, ticket: Ticket) -> Change | None:
        """The request of ``ticket`` met an overloaded archive: halve the limit (rounded up,
        at least 1), unless that was done since it began.  The change, if any."""
        with self._lock:
            self._successes = 0
            if not self.adaptive or ticket.cuts != self._cuts or self._limit == 1:
                return None
            old = self._limit
            self._limit = (old + 1) // 2
            self._cuts += 1
            self._changes += 1
            return Change(old, self._limit)

    def succeeded(self, ticket: Ticket) -> Change | None:
        """The request of ``ticket`` was answered without a sign of overload: after
        ``limit`` of them in a row, all begun at this limit, raise it by one (up to
        ``workers``).  The change, if any."""
        with self._lock:
            if not self.adaptive or ticket.changes != self._changes:
                return None
            self._successes += 1
            if self._successes < self._limit or self._limit >= self.workers:
                return None
            old, successes = self._limit, self._successes
            self._limit += 1
            self._changes += 1
            self._successes = 0
            return Change(old, self._limit, successes)

    def reconfigure(self, workers: int, adaptive: bool) -> None:
        """A reload: the limit learnt so far stays, within the new ``workers``."""
        with self._lock:
            self.workers, self.adaptive = workers, adaptive
            self._limit = min(self._limit, workers) if adaptive else workers
            self._changes += 1
            self._successes = 0


class Limits:
    """The ``Concurrency`` of each destination by name, kept across reloads (the daemon's)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_name: dict[str, Concurrency] = {}

    def of(self, destination: Destination) -> Concurrency:
        """The limit of ``destination``, as learnt before a reload (within its new config)."""
        with self._lock:
            found = self._by_name.get(destination.name)
            if found is None:
                found = self._by_name[destination.name] = of(destination)
            else:
                found.reconfigure(destination.workers, destination.adaptive)
            return found

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Per adaptive destination: its limit and ``workers`` (for ``stowd status``)."""
        with self._lock:
            found = list(self._by_name.items())
        return {name: {"limit": c.limit, "workers": c.workers} for name, c in found if c.adaptive}


def of(destination: Destination) -> Concurrency:
    """A new limit for ``destination`` (at ``workers``)."""
    return Concurrency(destination.workers, destination.adaptive)
