"""The loop a reader or a sender runs: one step after another until it is stopped.

It waits a moment when a step found nothing to do, and longer (``queue_write_delay``) while
the queue cannot be written; an unexpected error is logged and the loop goes on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from stowd.errors import QueueError, QueueFull
from stowd.pipeline.backoff import queue_write_delay
from stowd.pipeline.disk import Disks
from stowd.pipeline.queue import Queue

log = logging.getLogger("stowd.worker")  # the readers' and senders' log lines, as ever

IDLE_WAIT = 0.25


class Loop:
    """Runs steps until ``stop``; ``name``: the destination its log lines name."""

    def __init__(
        self, name: str, queue: Queue, stop: threading.Event, disks: Disks | None = None
    ) -> None:
        self.name = name
        self.queue = queue
        self.stop = stop
        self.disks = disks  # told of writes that failed for lack of space (it logs them)
        self._queue_failures = 0  # writes to the queue that failed in a row
        self._queue_full = False  # the last of them: for lack of space
        self.running = False  # inside run(): what the daemon's watchdog and reclaim ask

    def run(self, step: Callable[[], bool], beat: Callable[[], None]) -> None:
        """``step`` until stopped (False: it found nothing to do); ``beat`` before each."""
        self.running = True
        try:
            self._steps(step, beat)
        finally:
            self.running = False

    def _steps(self, step: Callable[[], bool], beat: Callable[[], None]) -> None:
        while not self.stop.is_set():
            beat()
            try:
                busy = step()
            except QueueError as exc:
                self.stop.wait(self._queue_failed(exc))
                continue
            except Exception:
                log.exception("unexpected error in the %s worker; going on", self.name)
                busy = False
            if busy:  # it wrote to the queue (a step that found nothing may write nothing)
                self._queue_works()
            else:
                self.stop.wait(IDLE_WAIT)

    def _queue_failed(self, exc: QueueError) -> float:
        """The queue could not be written: say so once, and how long to wait.  A full
        disk is logged by the daemon (``Disks``), once for all threads."""
        self._queue_full = isinstance(exc, QueueFull)
        if self._queue_full and self.disks is not None:
            self.disks.hit(self.queue.path)
            log.debug("the %s worker waits: %s", self.name, exc)
        elif self._queue_failures == 0:
            log.warning("%s; the %s worker waits and tries again (no file is lost)", exc, self.name)
        self._queue_failures += 1
        return queue_write_delay(self._queue_failures)

    def _queue_works(self) -> None:
        if self._queue_failures:
            level = logging.DEBUG if self._queue_full else logging.INFO  # Disks says it
            log.log(level, "the %s worker can write to the queue again", self.name)
        self._queue_failures = 0
