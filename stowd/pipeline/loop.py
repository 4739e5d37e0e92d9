"""The loop a reader or a sender runs: one step after another until it is stopped.

A step that found nothing to do waits for the bell (``ring``): whoever puts new work in the
queue rings it (a watcher or a receiver that queued files, a loop whose step did work, such
as reading new files), so that a file dropped into an idle daemon is read and sent at once.
The wait also ends after ``IDLE_WAIT`` (what no one rings for: a file's retry time or a
destination's hold that ran out) and at once when its ``Stop`` is set.  While the queue
cannot be written it waits longer (``queue_write_delay``); an unexpected error is logged and
the loop goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from stowd.errors import QueueError, QueueFull
from stowd.pipeline.backoff import queue_write_delay
from stowd.pipeline.disk import Disks
from stowd.pipeline.queue import Queue

log = logging.getLogger("stowd.worker")  # the readers' and senders' log lines, as ever

IDLE_WAIT = 0.25  # the longest wait for work when no one rings


class Bell:
    """Rung when there is new work in the queue: the loops waiting for work look at once."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.rings = 0  # how often it was rung: a loop notes it before a step
        self.waiting = 0  # loops waiting for it now

    def ring(self) -> None:
        with self._cond:
            self.rings += 1
            self._cond.notify_all()

    def wake(self) -> None:
        """Wake the waiting loops without ringing (each one looks whether it was stopped)."""
        with self._cond:
            self._cond.notify_all()

    def wait(self, seen: int, stop: threading.Event, timeout: float) -> None:
        """Until rung since ``rings`` was ``seen``, ``stop`` is set, or ``timeout`` ran out."""
        with self._cond:
            self.waiting += 1
            try:
                self._cond.wait_for(lambda: self.rings != seen or stop.is_set(), timeout)
            finally:
                self.waiting -= 1


BELL = Bell()  # one for the process: a loop woken for another queue's work just looks


def ring() -> None:
    """New work is in the queue (files queued, or read): the waiting loops look now."""
    BELL.ring()


class Stop(threading.Event):
    """The event that stops loops: setting it wakes the loops waiting for work at once
    (a plain ``threading.Event`` is seen within ``IDLE_WAIT``)."""

    def set(self) -> None:
        super().set()
        BELL.wake()


# GNU ``timeout`` signals the command and then its own process group, so the command gets its
# SIGTERM twice at once: a repeat this soon after the first is the same stop, not a second
SAME_STOP = 0.5


class Stops:
    """Stop signals (SIGTERM, SIGINT) counted: the first stops gently, a later one at once."""

    def __init__(self) -> None:
        self.count = 0
        self.first = 0.0

    def at_once(self) -> bool:
        """Count this signal; True when it asks to stop at once (a second stop request)."""
        now = time.monotonic()
        if self.count and now - self.first < SAME_STOP:
            return False  # the same request again (``timeout``'s signal to its group)
        self.count += 1
        if self.count == 1:
            self.first = now
        return self.count > 1


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
            seen = BELL.rings  # rung during the step: look again at once
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
                ring()  # what it did may be work for the others (files read: to send)
            else:
                BELL.wait(seen, self.stop, IDLE_WAIT)

    def _queue_failed(self, exc: QueueError) -> float:
        """The queue could not be written: say so once, and how long to wait.  A full
        disk is logged by the daemon (``Disks``), once for all threads."""
        self._queue_full = isinstance(exc, QueueFull)
        if isinstance(exc, QueueFull) and self.disks is not None:
            self.disks.hit(self.queue.path, at=exc.at)  # it may have failed long before
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
