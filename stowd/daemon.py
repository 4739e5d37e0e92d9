"""The running daemon: threads, signals and lifecycle.

One watcher thread per source, ``workers`` sender threads per destination, and the main thread
that keeps them alive and does housekeeping.  Signal handlers only set a flag; every wait is
``stop.wait(t)``.  On SIGTERM/SIGINT no new work is taken, requests in flight may finish for
``shutdown_timeout`` seconds, and whatever is still claimed returns to the queue at the next
start.  A second signal exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import FrameType

from stowd.config import Config, Source
from stowd.metadata import clear_spool, digest
from stowd.queue import Queue
from stowd.settle import repair
from stowd.stow import StowClient
from stowd.watch import Watcher
from stowd.worker import Worker

log = logging.getLogger("stowd")

HOUSEKEEPING_EVERY = 3600.0
RESETTLE_EVERY = 60.0
TICK = 1.0
EXIT_SECOND_SIGNAL = 1


class Daemon:
    """Owns the queue, the watchers and the workers of one configuration."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stop = threading.Event()
        self.queue = Queue(config.queue)
        self.signals = 0
        self.last_signal: int | None = None
        self.clients: dict[str, StowClient] = {}
        self.watchers: list[Watcher] = []
        self.workers: list[Worker] = []
        self._threads: dict[str, tuple[threading.Thread, Callable[[], None]]] = {}
        self.unsettled: set[int] = set()  # moves that failed (disk full, permissions)

    # -- signals ------------------------------------------------------------------------
    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.signals += 1
        self.last_signal = signum
        if self.signals > 1:
            os.write(2, b"stowd: second signal, exiting now; the queue recovers at next start\n")
            os._exit(EXIT_SECOND_SIGNAL)
        self.stop.set()

    # -- lifecycle ----------------------------------------------------------------------
    def run(self) -> None:
        """Run until stopped; raises ``QueueError`` when the queue cannot be used."""
        self.queue.open()
        try:
            self._recover()
            self._start()
            self._supervise()
        finally:
            self._shutdown()
            self.queue.close()

    def _recover(self) -> None:
        returned = self.queue.recover()
        orphans = self.queue.adopt({s.name: s.destination for s in self.config.sources})
        for source, count in orphans.items():
            log.warning(
                "%d queued file(s) belong to source %r, which is no longer configured; "
                "they wait in the queue until it is back",
                count,
                source,
            )
        repaired, self.unsettled = repair(self.queue, sources=self._sources())
        clear_spool(self.config)
        self._replan()
        counts = self.queue.counts()
        log.info(
            "stowd started: queue %s (%s)%s%s",
            self.config.queue,
            ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "empty",
            f"; {returned} interrupted upload(s) will be sent again" if returned else "",
            f"; {repaired} interrupted move(s) finished" if repaired else "",
        )

    def _start(self) -> None:
        for name, dest in self.config.destinations.items():
            client = StowClient(dest, stop=self.stop)
            self.clients[name] = client
            for n in range(dest.workers):
                worker = Worker(
                    self.config, self.queue, dest, client, self.stop, unsettled=self.unsettled
                )
                self.workers.append(worker)
                self._spawn(f"send-{name}-{n}", worker.run)
        for source in self.config.sources:
            watcher = Watcher(
                source, source.destination, self.queue.enqueue, exclude=self._queue_files()
            )
            self.watchers.append(watcher)
            self._spawn(f"watch-{source.name}", partial(watcher.run, self.stop))
            log.info("watching %s (source %s) -> %s", source.watch, source.name, source.destination)

    def _queue_files(self) -> tuple[Path, ...]:
        q = str(self.config.queue)
        return tuple(Path(q + suffix) for suffix in ("", "-wal", "-shm", "-journal", ".lock"))

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads[name] = (thread, target)
        thread.start()

    def _supervise(self) -> None:
        next_housekeeping = next_resettle = 0.0
        while not self.stop.wait(TICK):
            self._revive_dead_threads()
            now = time.monotonic()
            if now >= next_resettle and self.unsettled:
                self._resettle()
                next_resettle = now + RESETTLE_EVERY
            if now >= next_housekeeping:
                self._housekeeping()
                next_housekeeping = now + HOUSEKEEPING_EVERY

    def _replan(self) -> None:
        """Queued files read with other rules or sidecar settings are read again."""
        for source in self.config.sources:
            again = self.queue.replan(source.name, digest(self.config, source))
            if again:
                log.info(
                    "source %s: the metadata rules or sidecar settings changed; %d queued "
                    "file(s) are read again with the new ones",
                    source.name,
                    again,
                )

    def _sources(self) -> dict[str, Source]:
        return {s.name: s for s in self.config.sources}

    def _resettle(self) -> None:
        """Try again the moves to sent/ or failed/ that failed."""
        ids = set(self.unsettled)
        finished, stuck = repair(self.queue, only=ids, sources=self._sources())
        self.unsettled.difference_update(ids - stuck)
        if finished:
            log.info("finished %d move(s) that had failed before", finished)

    def _revive_dead_threads(self) -> None:
        for name, (thread, target) in list(self._threads.items()):
            if not thread.is_alive() and not self.stop.is_set():
                log.error("thread %s died; starting it again", name)
                self._spawn(name, target)

    def _housekeeping(self) -> None:
        cutoff = time.time() - self.config.history_days * 86400
        forgotten = self.queue.forget_done(cutoff)
        if forgotten:
            log.info(
                "forgot %d finished job(s) older than %g days", forgotten, self.config.history_days
            )

    def _shutdown(self) -> None:
        self.stop.set()
        deadline = time.monotonic() + self.config.shutdown_timeout
        log.info("stopping: waiting up to %gs for requests in flight", self.config.shutdown_timeout)
        for thread, _ in self._threads.values():
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t, _ in self._threads.values() if t.is_alive()]
        if alive:
            log.warning(
                "still busy at shutdown (%s); their files are sent again at next start",
                ", ".join(alive),
            )
        for client in self.clients.values():
            client.close()
        log.info("stopped")
