"""What becomes of a file after a try, for the reader and the senders alike.

It waits in the queue and is tried again after a backoff (``Filing.retry_later``), unless it is
older than ``retry.max_age``; or it fails (``Filing.fail``: a ``Decision`` to move it to
failed/ with its error document); decisions are carried out by ``Filing.settle``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import weakref
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future
from pathlib import Path
from queue import SimpleQueue
from typing import Any

from stowd.config.model import Config
from stowd.dicomweb.stowanswer import Answer, StowOutcome, Verdict, failure_meaning
from stowd.errors import QueueError, no_space
from stowd.pipeline import counters
from stowd.pipeline.backoff import RetryPolicy
from stowd.pipeline.disk import Disks
from stowd.pipeline.queue import ALREADY_STORED, STORED_WITH_WARNING, Job, Queue
from stowd.pipeline.settle import (
    Decision,
    Settled,
    iso,
    leave_lost,
    remove_empty_parents,
    settle_all,
)

log = logging.getLogger("stowd.worker")  # the readers' and senders' log lines, as ever

DROPS = "connection_drops"  # the key of the error document that counts them
# the key of the error document that counts the archive's refusals of the file with a code
# that may be transient but may as well be permanent (stow.is_counted): retry.max_refusals
REFUSALS = "refusals"
# the same refusals when other requests were in flight (a busy archive refuses for contention
# too): they count against CROWDED_FACTOR times retry.max_refusals, so that a permanent one
# fails even where requests always overlap
CROWDED = "refusals_crowded"
CROWDED_FACTOR = 10
CARRIED = (REFUSALS, CROWDED)  # counts kept in the error document until the file is done
# the batches a settle thread takes (``Behind``), each with its outcome; None: it ends
Batches = SimpleQueue[tuple[list[Decision], Future[None]] | None]


class Filing:
    """Puts files back into the queue to wait, or decides that they fail, and settles them.

    ``name``: the destination whose metrics count the retries; ``unsettled`` collects the
    files whose move failed (the daemon moves them later); ``disks`` is told of a full disk.
    """

    def __init__(
        self,
        config: Config,
        queue: Queue,
        *,
        name: str,
        clock: Callable[[], float] | None = None,
        unsettled: set[int] | None = None,
        disks: Disks | None = None,
    ) -> None:
        self.config = config
        self.queue = queue
        self.name = name
        self.clock = clock or queue.clock  # the queue's: the clock of the times it keeps
        self.policy = RetryPolicy(config.retry)  # how long a file or a destination waits
        self.unsettled = set() if unsettled is None else unsettled
        self.disks = disks

    def retry_later(
        self,
        job: Job,
        reason: str,
        *,
        verdict: Verdict | None = None,
        answer: Answer | None = None,
        stage: str = "storing the file",
        counted: str | None = counters.FILE,
        counts: Mapping[str, int] | None = None,
    ) -> Decision | None:
        """Try this file again after a backoff; a ``Decision`` to fail it once too old.

        ``counted``: the retry reason for the metrics (None: the caller counted it)."""
        now = self.clock()
        if self.policy.too_old(now - (job.first_try or now)):
            reason = reason.removesuffix("; it is tried again later")
            reason = f"gave up after {job.attempts + 1} attempts: {reason}"
            return self.fail(
                job, reason, verdict=verdict, answer=answer, stage=stage, counts=counts
            )
        delay = self.policy.next_delay(job.attempts)
        error = self.error_doc(
            job, reason, verdict=verdict, answer=answer, stage=stage, counts=counts
        )
        lost = self.queue.retry_later([job.id], at=now + delay, error=error, was=job.state)
        if lost:  # another node took it over: its retry, not this node's
            leave_lost(self.queue.node, lost)
            return None
        if counted is not None:
            counters.retried(self.name, counted)
        log.info("%s: %s; retry in %.0fs", job.path, reason, delay)
        return None

    def retry_all_later(self, batch: list[Job], reason: str, counted: str | None) -> None:
        decisions = [self.retry_later(j, reason, counted=counted) for j in batch]
        self.settle([d for d in decisions if d is not None])

    def fail(
        self,
        job: Job,
        reason: str,
        *,
        verdict: Verdict | None = None,
        answer: Answer | None = None,
        stage: str = "storing the file",
        counts: Mapping[str, int] | None = None,
    ) -> Decision:
        """The decision to move ``job``'s file to failed/ (logged)."""
        error = self.error_doc(
            job,
            reason,
            verdict=verdict,
            answer=answer,
            stage=stage,
            counts=counts,
        )
        source = self.config.source(job.source)
        where = "failed (left where it is)" if source.keep else "failed/"
        log.error("%s: %s -> %s", job.path, reason, where)
        return Decision(job, source, "failed", error)

    def settle(self, decisions: list[Decision]) -> None:
        """Move the decided files to sent/ or failed/ and finish them in the queue."""
        if not decisions:
            return
        try:
            results = settle_all(self.queue, decisions)
        except QueueError:
            # Rows already recorded as settling are finished by the daemon's repair; the
            # others are still claimed, and released by the caller (or sent again).
            self.unsettled.update(d.job.id for d in decisions)
            raise
        emptied: dict[tuple[Path, Path], Path] = {}  # (folder, watch) -> a file moved from it
        # (source, destination, outcome, note) -> [files, bytes sent]: counted once per batch
        alike: dict[tuple[str, str, str, str | None], list[int]] = {}
        lost = {r.decision.job.id: r.lost for r in results if r.lost is not None}
        leave_lost(self.queue.node, lost)  # moved (or recorded) by the node that took them
        for result in results:
            job, source = result.decision.job, result.decision.source
            if result.lost is not None:
                continue
            if result.problem is not None:
                self._move_failed(result)
                continue
            if result.target is not None:
                outcome = result.decision.outcome
                note = _metric_note(result.decision.note)
                counted = alike.setdefault((job.source, job.destination, outcome, note), [0, 0])
                counted[0] += 1
                counted[1] += max(job.size, 0)
            if result.target is not None and result.decision.outcome == "sent":
                stored = "already stored" if result.decision.note == ALREADY_STORED else "stored"
                log.info("%s: %s, moved to %s", job.path, stored, result.target)
            if result.target is not None and source.remove_empty_dirs:
                path = Path(job.path)
                emptied.setdefault((path.parent, source.watch), path)
        for (source_name, destination, outcome, note), (files, size) in alike.items():
            counters.settled(source_name, destination, outcome, size, note, n=files)
        for (_, watch), path in emptied.items():  # once per folder the batch left
            remove_empty_parents(path, watch)

    def _move_failed(self, result: Settled) -> None:
        """A move that failed: the daemon tries it again (a full disk is logged once, by
        the daemon, not once per file)."""
        job, outcome = result.decision.job, result.decision.outcome
        self.unsettled.add(job.id)
        if result.problem is not None and no_space(result.problem):
            if self.disks is not None:
                self.disks.hit(
                    result.decision.source.sent
                    if outcome == "sent"
                    else result.decision.source.failed
                )
            log.info(
                "cannot move %s to %s/ now: %s (will try again)", job.path, outcome, result.problem
            )
            return
        log.error("cannot move %s to %s/: %s (will try again)", job.path, outcome, result.problem)

    def error_doc(
        self,
        job: Job,
        reason: str,
        *,
        verdict: Verdict | None = None,
        answer: Answer | None = None,
        stage: str = "storing the file",
        counts: Mapping[str, int] | None = None,
    ) -> dict[str, Any]:
        """The file's error document; ``counts``: what is counted for the file by its key
        (``DROPS``: the connections the archive dropped when it was sent alone; ``REFUSALS``
        and ``CROWDED``: the refusals counted for ``retry.max_refusals``, this one included;
        ``verify.UNLISTED``).  The ``CARRIED`` counts so far are kept whatever else happens
        to the file."""
        now = self.clock()
        sent = answer is not None
        code = verdict.code if verdict and verdict.outcome is not StowOutcome.SENT else None
        doc: dict[str, Any] = {
            "file": job.path,
            "reason": reason,
            "stage": stage,
            "http_status": answer.status if answer else None,
            "failure_reason": f"{code:04X}" if code is not None else None,
            "failure_meaning": failure_meaning(code) if code is not None else None,
            "server_message": answer.server_message if answer else None,
            "attempts": job.attempts + (1 if sent else 0),
            "first_try": iso(job.first_try or (now if sent else None)),
            "last_try": iso(now if sent else None),
            "source": job.source,
            "destination": job.destination,
            "sop_instance_uid": job.sop_uid,
            "study_instance_uid": job.study_uid,
        }
        for key in CARRIED:
            if carried := counted_in_error(job, key):
                doc[key] = carried
        doc.update(counts or {})
        return doc


class Behind:
    """The settle of a sender's last batch, carried out on a thread of its own while the
    sender uploads its next batch (``Filing.settle``: the same moves, fsyncs and queue rows,
    in the same order).  At most one batch is settled behind: ``start`` waits for the one
    before.  Its rows stay claimed (or settling) until it is done, so they are counted as
    done only once their moves are synced and recorded; ``ids`` are held by the sender
    meanwhile (never reclaimed).  An error of the settle (the queue cannot be written) is
    raised by the next ``wait``, with the rows it left claimed given back (``release``).

    One thread (and so one queue connection) serves all the batches of a sender until
    ``close``.  It is a daemon thread, like its sender: a process that ends (after
    ``shutdown_timeout``) does not wait for it; a settle cut short is finished at the next
    start, as after a crash (a ``ThreadPoolExecutor``'s thread is waited for at exit)."""

    def __init__(self, filing: Filing, release: Callable[[frozenset[int]], None]) -> None:
        self._filing = filing
        self._release = release  # gives back rows a failed settle left claimed
        self._batches: Batches | None = None  # taken by the settle thread, while there is one
        self._pending: Future[None] | None = None
        self.ids: frozenset[int] = frozenset()  # the rows of the batch being settled

    @property
    def busy(self) -> bool:
        """A batch is settled behind (or its error not yet raised by ``wait``)."""
        return self._pending is not None

    @property
    def failed(self) -> bool:
        """The batch settled behind is done and its settle failed: its error is yet to be
        raised (by ``wait``), before the sender claims or uploads anything new."""
        pending = self._pending
        return pending is not None and pending.done() and pending.exception() is not None

    def start(self, decisions: list[Decision], ids: Collection[int]) -> None:
        """Settle ``decisions`` behind, once the batch before is settled (its error raised
        here); ``ids``: the batch's rows, held until it is done."""
        self.wait()
        if decisions:
            if self._batches is None:
                self._batches = self._serving()
            self.ids = frozenset(ids)
            self._pending = Future()
            self._batches.put((decisions, self._pending))

    def wait(self) -> bool:
        """Wait until the batch settled behind is done; False when there was none.  Its
        error, if any, is raised here, once its claimed rows were given back."""
        pending, ids = self._pending, self.ids
        if pending is None:
            return False
        try:
            pending.result()
        except BaseException:
            self._release(ids)  # rows already settling stay for the daemon's repair
            raise
        finally:
            self._pending, self.ids = None, frozenset()
        return True

    def close(self) -> None:
        """End the settle thread once its batch is settled (``wait`` first); ``start``
        starts another."""
        if self._batches is not None:
            self._batches.put(None)
            self._batches = None

    def _serving(self) -> Batches:
        """Start a settle thread (named after the sender); the queue of batches it takes.
        It ends at ``close``, or once this ``Behind`` is gone (a sender never ``run``)."""
        batches: Batches = SimpleQueue()
        name = f"settle-of-{threading.current_thread().name}"
        args = (self._filing, batches)
        threading.Thread(target=_settle_each, args=args, name=name, daemon=True).start()
        weakref.finalize(self, batches.put, None)
        return batches


def _settle_each(filing: Filing, batches: Batches) -> None:
    """A settle thread: one batch after another, each one's outcome in its future."""
    while (work := batches.get()) is not None:
        decisions, done = work
        try:
            filing.settle(decisions)
        except BaseException as exc:  # raised on the sender's thread, by ``Behind.wait``
            done.set_exception(exc)
        else:
            done.set_result(None)
    filing.queue.release_connection()


def counted_in_error(job: Job, key: str) -> int:
    """A count kept in ``job``'s error document (0 when there is none)."""
    try:
        count = json.loads(job.error or "{}").get(key, 0)
    except (ValueError, AttributeError):
        return 0
    return count if isinstance(count, int) else 0


def refusals_so_far(job: Job) -> int:
    """How many times the archive refused ``job`` with a code counted for
    ``retry.max_refusals`` so far (kept in its error document)."""
    return counted_in_error(job, REFUSALS)


def unchanged(job: Job) -> bool:
    """The file is still the size and age it had when it was queued."""
    try:
        st = os.stat(job.path)
    except OSError:
        return False
    return st.st_size == job.size and st.st_mtime_ns == job.mtime_ns


def _metric_note(note: str | None) -> str | None:
    """The metrics' word for a settled file's queue note (``counters.NOTES``)."""
    if note == ALREADY_STORED:
        return "already_stored"
    if note is not None and note.startswith(STORED_WITH_WARNING):
        return "warning"
    return None
