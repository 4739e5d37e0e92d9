"""The C-STORE receivers of the running daemon, kept across reloads.

A reload (SIGHUP) restarts the watchers and senders, but not a receiver whose source kept its
``receive`` settings, destination and folder: its associations in progress go on.  A receiver
that was removed or changed is stopped (its open associations are aborted, and a C-STORE in
progress is answered 0xA700, so the sender tries again), and a new one started.  A port that
cannot be bound is logged and tried again every ``RETRY_BIND`` seconds; the rest of stowd runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from stowd import dicomlib
from stowd.config.model import Config, Receive, Source
from stowd.errors import StowdError
from stowd.pipeline import counters
from stowd.pipeline.incoming import clear_incoming, clear_parts, incoming_folder
from stowd.pipeline.queue import Queue

if TYPE_CHECKING:
    from stowd.pipeline.receive import Receiver

log = logging.getLogger("stowd.receive")

RETRY_BIND = 60.0  # seconds between tries to listen on a port that could not be bound
SWEEP_EVERY = 300.0  # seconds between sweeps of .incoming for instances never finished


@dataclass(frozen=True)
class _Key:
    """What a running receiver depends on: unchanged, it keeps running through a reload."""

    receive: Receive
    destination: str
    folder: str


def _key(source: Source) -> _Key:
    assert source.receive is not None
    return _Key(source.receive, source.destination, str(source.watch))


class Receivers:
    """Every receiving source's receiver, by source name."""

    def __init__(self, queue: Queue, clock: Callable[[], float] = time.monotonic) -> None:
        self.queue = queue
        self.clock = clock
        self.running: dict[str, Receiver] = {}
        self.unbound: dict[str, Source] = {}  # could not listen yet
        self._next_try = 0.0
        self._next_sweep = clock() + SWEEP_EVERY

    def start(self, config: Config) -> None:
        """At daemon start: clear what arrived unacknowledged before, then listen."""
        removed = clear_incoming(config.queue)
        removed += sum(clear_parts(s) for s in config.sources if s.receive is not None)
        if removed:
            log.info("removed %d instance(s) left unacknowledged by the last run", removed)
        self.sync(config)

    def sync(self, config: Config) -> None:
        """Run exactly the receivers ``config`` names (a reload: unchanged ones stay)."""
        wanted = {s.name: s for s in config.sources if s.receive is not None}
        for name in list(self.running):
            source = wanted.get(name)
            if source is None or _key(source) != _key(self.running[name].source):
                self.running.pop(name).stop()
                log.info("source %s: stopped receiving", name)
        self.unbound = {}
        for name, source in wanted.items():
            if name in self.running:
                self.running[name].source = source  # its rules may have changed
            else:
                self._open(source, config)

    def retry(self, config: Config) -> None:
        """Try again to listen where it failed (every ``RETRY_BIND`` seconds), and sweep."""
        self._sweep(config)
        if not self.unbound or self.clock() < self._next_try:
            return
        for source in list(self.unbound.values()):
            self._open(source, config)

    def _sweep(self, config: Config) -> None:
        """Remove instances whose association ended mid-transfer: not written for longer
        than any association may stay idle (it was aborted by then)."""
        if not self.running or self.clock() < self._next_sweep:
            return
        self._next_sweep = self.clock() + SWEEP_EVERY
        idle = max(r.settings.idle_timeout for r in self.running.values())
        removed = clear_incoming(config.queue, older_than=time.time() - 2 * idle - SWEEP_EVERY)
        if removed:
            log.info(
                "removed %d instance(s) whose association ended before they were whole", removed
            )

    def stop(self) -> None:
        for receiver in self.running.values():
            receiver.stop()
        self.running.clear()

    def snapshot(self) -> dict[str, dict[str, object]]:
        """What ``stowd status`` shows of each receiver (and of one not listening)."""
        found = {name: r.tally.snapshot() | _where(r.source) for name, r in self.running.items()}
        for name, source in self.unbound.items():
            found[name] = _where(source) | {"listening": False}
        return found

    def _open(self, source: Source, config: Config) -> None:
        dicomlib.load()  # pydicom whole, one thread at a time
        from stowd.pipeline.receive import Receiver  # noqa: PLC0415 - pynetdicom: only here

        receiver = Receiver(source, self.queue, incoming_folder(config.queue))
        counters.receiving(source.name)
        try:
            receiver.start()
        except StowdError as exc:
            if source.name not in self.unbound:
                log.error("%s; trying again every %gs", exc, RETRY_BIND)
            self.unbound[source.name] = source
            self._next_try = self.clock() + RETRY_BIND
            return
        self.unbound.pop(source.name, None)
        self.running[source.name] = receiver


def _where(source: Source) -> dict[str, object]:
    assert source.receive is not None
    r = source.receive
    return {"listening": True, "ae_title": r.ae_title, "bind": r.bind, "port": r.port}
