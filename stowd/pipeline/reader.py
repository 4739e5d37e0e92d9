"""The reader of new files: their headers, the metadata rules, lookups and made UIDs.

New files are read a chunk at a time, by one thread of a generation at a time
(``classify_lock``): a reader of its own, so that no upload waits for the next batch's
headers, and a sender that has nothing to send (one batch, when a reader reads beside it).
The first chunk after the reader caught up is one batch, so that its upload starts once it
is read; each next chunk is twice as large, up to ``CLASSIFY_CHUNK``.  Bad files go to
failed/; files that cannot be read now wait (``filing``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime

from stowd import dicomlib, dropped
from stowd.config.model import Config, Source
from stowd.errors import (
    FileIncomplete,
    FileProblem,
    FileUnreadable,
    FileVanished,
    LookupNoMatchYet,
    LookupUnavailable,
    UnknownType,
)
from stowd.pipeline import classify as classify_mod
from stowd.pipeline import counters, metadata
from stowd.pipeline.disk import Disks
from stowd.pipeline.filing import Filing, unchanged
from stowd.pipeline.lookup import Finder
from stowd.pipeline.loop import Loop
from stowd.pipeline.queue import Classification, Job, Made, Queue
from stowd.pipeline.settle import Decision

log = logging.getLogger("stowd.worker")  # the readers' and senders' log lines, as ever

CLASSIFY_CHUNK = 200  # the most new files read in one go (recorded in one transaction)
LOOKING = "looking up the study in the archive"


class Reader:
    """Reads the headers of new files and records in the queue what each one is.

    ``name``: the destination its log lines and retry metrics name; ``max_step``: how long
    one step may take before the daemon's watchdog calls it stuck."""

    def __init__(
        self,
        config: Config,
        queue: Queue,
        stop: threading.Event,
        *,
        name: str,
        max_step: float,
        clock: Callable[[], float] | None = None,
        unsettled: set[int] | None = None,
        classify_lock: threading.Lock | None = None,
        finder: Finder | None = None,
        disks: Disks | None = None,
    ) -> None:
        self.config = config
        self.queue = queue
        self.name = name
        self.clock = clock or queue.clock  # the queue's: the clock of the times it keeps
        dropped.configure(config.sources)  # no link in a drop folder is read (follow_links)
        self.filing = Filing(
            config, queue, name=name, clock=clock, unsettled=unsettled, disks=disks
        )
        self.policy = self.filing.policy  # how long a file waits to be read again
        # asks the archives for the study a rule's lookup names (shared by a generation)
        self.finder = finder or Finder(config, queue, clock=clock)
        # one worker of a generation reads new files at a time (shared by its workers)
        self.classify_lock = classify_lock or threading.Lock()
        self._digests: dict[str, str] = {}  # of each source's rules, stored with its files
        self._loop = Loop(name, queue, stop, disks)
        self.beat = time.monotonic()  # last sign of progress (the daemon's watchdog reads it)
        self.max_step = max_step
        self._first = first_chunk(config)  # read first once the reader caught up
        self._chunk = self._first  # read next

    def run(self) -> None:
        self._loop.run(self.step, self._alive)

    @property
    def running(self) -> bool:
        """Inside ``run`` (its loop says)."""
        return self._loop.running

    def _alive(self) -> None:
        self.beat = time.monotonic()

    def step(self) -> bool:
        """Read a chunk of new files; False when there was nothing to read."""
        return self.classify_some() > 0

    def classify_some(self, limit: int | None = None) -> int:
        """Read the headers of new files (one thread at a time); bad ones go to failed/.
        At most ``limit`` of them, else the next chunk (``_next_chunk``)."""
        if not self.classify_lock.acquire(blocking=False):
            return 0
        try:
            asked = self._chunk if limit is None else limit
            read = self._read(asked)
            if limit is None:
                self._chunk = self._next_chunk(asked, read)
            return read
        finally:
            self.classify_lock.release()

    def _next_chunk(self, asked: int, read: int) -> int:
        """Twice as many files as were read, up to ``CLASSIFY_CHUNK``; one batch again
        once fewer were left than asked (the next new files: their upload starts soon)."""
        return min(2 * asked, CLASSIFY_CHUNK) if read == asked else self._first

    def _read(self, limit: int) -> int:
        """Read up to ``limit`` new files and record what each one is; how many were read."""
        jobs = self.queue.unclassified(limit)
        keys, refused = [], []
        for job in jobs:
            result = self._classify_safely(job)
            if isinstance(result, Decision):
                refused.append(result)
            elif result is not None:
                keys.append(result)
        self.queue.set_classified(keys)
        self.filing.settle(refused)
        return len(jobs)

    def _classify_safely(self, job: Job) -> Classification | Decision | None:
        """``_classify``, but one file's trouble never stops the others."""
        try:
            return self._classify(job)
        except FileUnreadable as exc:
            return self.filing.retry_later(
                job, str(exc), stage="reading the file", counted=counters.UNREADABLE
            )
        except Exception:
            log.exception("unexpected error while reading %s; it is tried again later", job.path)
            reason = "stowd hit an unexpected error while reading the file (see its log)"
            return self.filing.retry_later(job, reason, stage="reading the file")

    def _classify(self, job: Job) -> Classification | Decision | None:
        """The file's keys; a ``Decision`` to fail it; None when it is gone."""
        try:
            c = classify_mod.classify(job.path)
        except FileVanished:
            log.info("file vanished before it was sent, forgetting it: %s", job.path)
            self.queue.finish(job.id, state="gone", was=job.state)
            return None
        except UnknownType as problem:
            return self._unknown_type(job, problem)
        except FileIncomplete as problem:
            return self._incomplete(job, problem)
        except FileProblem as problem:
            return self.filing.fail(job, str(problem), stage="reading the file")
        return self._apply_rules(job, c)

    def _incomplete(self, job: Job, problem: FileIncomplete) -> Decision | None:
        """An image cut short: a writer that stalled may still add the rest, so it is read
        again after a backoff (at once when the watcher finds it changed); once it stayed
        so for the source's ``incomplete_wait`` it fails as truncated."""
        wait = self.config.source(job.source).incomplete_wait
        now = self.clock()
        until = (job.first_try or now) + wait
        if now >= until and unchanged(job):
            stayed = f"; it stayed so for {wait:.0f}s" if wait else ""
            return self.filing.fail(job, f"{problem}{stayed}", stage="reading the file")
        at = now + self.policy.next_delay(job.attempts)  # changed: the watcher queues it anew
        at = min(at, until) if until > now else at
        when = datetime.fromtimestamp(until).strftime("%H:%M:%S")
        reason = f"{problem}; waiting until {when} for the rest of it"
        error = self.filing.error_doc(job, reason, stage="reading the file")
        if self.queue.wait_for_rest(job, at=at, error=error):
            log.info("%s: %s (read again in %.0fs)", job.path, reason, at - now)
        return None

    def _unknown_type(self, job: Job, problem: UnknownType) -> Decision | None:
        """A file of a type its source does not send: failed/, or left alone (``ignore``)."""
        if self.config.source(job.source).bulkdata.unknown == "fail":
            return self.filing.fail(job, str(problem), stage="reading the file")
        log.info("%s: ignored (bulkdata.unknown: ignore): %s", job.path, problem)
        self.queue.finish(job.id, state="ignored", was=job.state)
        return None

    def _apply_rules(
        self, job: Job, c: classify_mod.Classified
    ) -> Classification | Decision | None:
        """Apply the metadata rules and sidecars; their trouble sends the file to failed/."""
        source = self.config.source(job.source)
        try:
            stored = None if job.sidecars is None else job.sidecar_entries()  # as found
            p = metadata.plan_file(
                self.config, source, job.path, job.rel, c, now=datetime.now(), stored=stored
            )
        except FileVanished as exc:  # a sidecar went away while it was read: read again
            stage = "reading its sidecar"
            return self.filing.retry_later(job, str(exc), stage=stage, counted=counters.UNREADABLE)
        except UnknownType as problem:
            return self._unknown_type(job, problem)
        except FileProblem as problem:
            return self.filing.fail(job, str(problem), stage="applying the metadata rules")
        looked = self._look_up(job, c, p)
        if looked is None or isinstance(looked, Decision):
            return looked
        p, record = looked
        changes = p.outcome.changes() if p.outcome.changed else None
        sidecars = None
        if source.sidecars is not None:
            sidecars = tuple((str(path), text) for path, text in p.sidecars)
        if p.outcome.matched:
            names = ", ".join(r.label for r in p.outcome.matched)
            log.debug("%s: %s; changes %s", job.path, names, changes or "none")
        made = None if c.media is None else self._instance_uids(job, c.kind, p)
        study = p.study_uid or (made.study if made else "")
        sop = p.sop_uid or (made.instance if made else "")
        sop_class = c.sop_class
        if c.media is not None:  # pydicom's import is left to a file that needs it (issue 19)
            dicomlib.load()  # pydicom whole, one thread at a time
            from stowd.media import bulkdata  # noqa: PLC0415

            sop_class = bulkdata.sop_class_for(c.media, photographic=photographic(source))
        keys = (c.kind, study, sop, sop_class)
        digest = self._digest(source)
        return Classification(job, *keys, changes, sidecars, digest, made, record)

    def _look_up(
        self, job: Job, c: classify_mod.Classified, p: metadata.Planned
    ) -> tuple[metadata.Planned, str | None] | Decision | None:
        """``p`` joined to the archive's study or worklist item when a rule looks one up,
        with the record kept for the file; else the file waits or fails."""
        wanted = p.outcome.lookup
        if wanted is None:
            return p, None
        try:
            found = self.finder.find(job, wanted)
        except LookupNoMatchYet as exc:
            self._wait_for_study(job, str(exc), exc.until)
            return None
        except LookupUnavailable as exc:
            return self.filing.retry_later(
                job, str(exc), stage=LOOKING, counted=counters.UNAVAILABLE
            )
        except FileProblem as problem:
            return self.filing.fail(job, str(problem), stage=LOOKING)
        try:
            return metadata.joined(p, found.values, c), found.record
        except FileProblem as problem:
            return self.filing.fail(job, str(problem), stage=LOOKING)

    def _wait_for_study(self, job: Job, reason: str, until: float) -> None:
        """No study yet: read the file again after a backoff, at the latest at ``until``."""
        now = self.clock()
        at = min(now + self.policy.next_delay(job.attempts), until + 0.1)
        error = self.filing.error_doc(job, reason, stage=LOOKING)
        self.queue.retry_later([job.id], at=at, error=error, failing=False, was=job.state)
        log.info("%s: %s; asked again in %.0fs", job.path, reason, at - now)

    def _instance_uids(self, job: Job, kind: str, p: metadata.Planned) -> Made:
        """The UIDs of the instance built from ``job``'s file: made once, then reused."""
        made = job.made_uids()
        if made is not None and made.key == p.study_key and p.study_uid in ("", made.study):
            return made  # read again (other rules, a restart): the same instance
        root = self.config.uid_root  # new, or another study or patient now: a new instance
        study = p.study_uid or None
        return self.queue.make_uids(
            job.source, p.study_key, study, kind, lambda: metadata.new_uid(root)
        )

    def _digest(self, source: Source) -> str:
        if source.name not in self._digests:
            self._digests[source.name] = metadata.digest(self.config, source)
        return self._digests[source.name]


def first_chunk(config: Config) -> int:
    """How many new files are read first: one batch (the smallest of the destinations')."""
    sizes = [d.batch.max_files for d in config.destinations.values()]
    return max(1, min([CLASSIFY_CHUNK, *sizes]))


def photographic(source: Source) -> bool:
    return source.bulkdata.images == "photographic"
