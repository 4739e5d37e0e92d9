"""The work loop of one destination: classify -> group -> (rules) -> stow -> settle.

Each step is a module of its own; this one only moves jobs between them and the queue.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from stowd import bulkdata, dropped, metadata, metrics, rewrite, verify
from stowd import classify as classify_mod
from stowd.answers import answer_seconds
from stowd.backoff import RetryPolicy, queue_write_delay
from stowd.bulkform import bulk_part
from stowd.config import TRANSCODE_EXPLICIT, BatchLimits, Config, Destination, Source
from stowd.disk import Disks
from stowd.errors import (
    ClientSetupError,
    ConnectionDropped,
    DestinationBusy,
    DestinationHeld,
    FileIncomplete,
    FileProblem,
    FileUnreadable,
    FileVanished,
    LookupUnavailable,
    NotYet,
    QueueError,
    QueueFull,
    SpoolFull,
    StowFailure,
    UnknownType,
    VerifyUnavailable,
    no_space,
)
from stowd.group import take_batch
from stowd.lookup import Finder
from stowd.media import Media, detect
from stowd.queue import ALREADY_STORED, STORED_WITH_WARNING, Classification, Job, Made, Queue
from stowd.settle import Decision, Settled, iso, remove_empty_parents, settle_all
from stowd.stow import (
    Answer,
    Outcome,
    Part,
    StowClient,
    Verdict,
    failure_meaning,
    is_counted,
    judge,
    refusal_advice,
)
from stowd.wire import NOT_ALONE, wire_of

log = logging.getLogger("stowd.worker")

CLASSIFY_CHUNK = 200
IDLE_WAIT = 0.25
LEASE_SLACK = 600.0
MB = 1024 * 1024
LOOKING = "looking up the study in the archive"
# A file whose request, sent alone, ends this many times in a dropped connection fails.
MAX_DROPS = 3
DROPS = "connection_drops"  # the key of the error document that counts them
# the key of the error document that counts the archive's refusals of the file with a code
# that may be transient but may as well be permanent (stow.is_counted): retry.max_refusals
REFUSALS = "refusals"
# what verify: true checks before the file moves to sent/: the archive's "stored" and its
# "already stored" (stow.Outcome.ALREADY) alike
STORED = (Outcome.SENT, Outcome.ALREADY)


class Worker:
    """Sends the queued files of one destination, one batch at a time."""

    def __init__(
        self,
        config: Config,
        queue: Queue,
        destination: Destination,
        client: StowClient,
        stop: threading.Event,
        *,
        clock: Callable[[], float] = time.time,
        unsettled: set[int] | None = None,
        classify_lock: threading.Lock | None = None,
        finder: Finder | None = None,
        sends: bool = True,
        disks: Disks | None = None,
        verified: verify.Tally | None = None,
    ) -> None:
        self.config = config
        # the stored files the archive listed (or not), with verify (shared by a migration)
        self.verified = verified or verify.Tally()
        dropped.configure(config.sources)  # no link in a drop folder is read (follow_links)
        self.disks = disks  # told of writes that failed for lack of space (it logs them)
        # False: only reads new files, so that reading overlaps the uploads of the others
        self.sends = sends
        # asks the archives for the study a rule's lookup names (shared by a generation)
        self.finder = finder or Finder(config, queue, clock=clock)
        self.unsettled = set() if unsettled is None else unsettled
        # one worker of a generation reads new files at a time (shared by its workers)
        self.classify_lock = classify_lock or threading.Lock()
        self.queue = queue
        self.destination = destination
        self.client = client
        self.stop = stop
        self.clock = clock
        self.policy = RetryPolicy(config.retry)  # how long a file or a destination waits
        answer = answer_seconds(destination.timeouts.read)  # a whole answer's deadline
        self._lease = destination.timeouts.write + answer + LEASE_SLACK
        self.limits = destination.batch  # halved when the archive answers 413
        self._digests: dict[str, str] = {}  # of each source's rules, stored with its files
        self.beat = time.monotonic()  # last sign of progress (the daemon's watchdog reads it)
        self.max_step = self._lease  # one step (a batch upload) may take this long
        self.running = False  # inside run()
        # (started, last progress) of the request in flight, for status (via the daemon)
        self.in_flight: tuple[float, float] | None = None
        self._wire = wire_of(client)  # the requests in flight to this destination
        self._token = NOT_ALONE  # of this worker's request on the wire
        # the answer being applied came to a request that was alone on the wire: its
        # refusals count for retry.max_refusals (see _refused)
        self._alone = False
        # The ids this worker has claimed and not given back: the daemon never reclaims
        # them (an upload in progress, or a release that failed and is tried again).
        self.held: frozenset[int] = frozenset()
        self._owed: set[int] = set()  # claimed rows whose release failed: released first
        self._queue_failures = 0  # writes to the queue that failed in a row
        self._queue_full = False  # the last of them: for lack of space

    def run(self) -> None:
        self.running = True
        try:
            self._loop()
        finally:
            self.running = False

    def _loop(self) -> None:
        while not self.stop.is_set():
            self.beat = time.monotonic()
            try:
                busy = self.step()
            except QueueError as exc:
                self.stop.wait(self._queue_failed(exc))
                continue
            except Exception:
                log.exception("unexpected error in the %s worker; going on", self.destination.name)
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
            log.debug("the %s worker waits: %s", self.destination.name, exc)
        elif self._queue_failures == 0:
            log.warning(
                "%s; the %s worker waits and tries again (no file is lost)",
                exc,
                self.destination.name,
            )
        self._queue_failures += 1
        return queue_write_delay(self._queue_failures)

    def _queue_works(self) -> None:
        if self._queue_failures:
            level = logging.DEBUG if self._queue_full else logging.INFO  # Disks says it
            log.log(level, "the %s worker can write to the queue again", self.destination.name)
        self._queue_failures = 0

    def _alive(self) -> None:
        """A sign of progress within a step (a chunk of an upload went out)."""
        self.beat = time.monotonic()
        request = self.in_flight
        if request is not None:
            self.in_flight = (request[0], self.clock())

    def _request(self, parts: list[Part]) -> Answer:
        """One STOW request, recorded as in flight while it runs."""
        started = self.clock()
        self.in_flight = (started, started)
        try:
            return self.client.store(parts, progress=self._alive)
        finally:
            self.in_flight = None

    def step(self) -> bool:
        """Do one unit of work; False when there was nothing to do."""
        self._pay_back()
        classified = self.classify_some()
        if not self.sends:
            return classified > 0
        return self.send_one() or classified > 0

    # -- classify -------------------------------------------------------------------------
    def classify_some(self) -> int:
        """Read the headers of new files (one worker at a time); bad ones go to failed/."""
        if not self.classify_lock.acquire(blocking=False):
            return 0
        try:
            jobs = self.queue.unclassified(CLASSIFY_CHUNK)
            keys, refused = [], []
            for job in jobs:
                result = self._classify_safely(job)
                if isinstance(result, Decision):
                    refused.append(result)
                elif result is not None:
                    keys.append(result)
            self.queue.set_classified(keys)
            self._settle_all(refused)
            return len(jobs)
        finally:
            self.classify_lock.release()

    def _classify_safely(self, job: Job) -> Classification | Decision | None:
        """``_classify``, but one file's trouble never stops the others."""
        try:
            return self._classify(job)
        except FileUnreadable as exc:
            return self._later(job, str(exc), stage="reading the file", counted=metrics.UNREADABLE)
        except Exception:
            log.exception("unexpected error while reading %s; it is tried again later", job.path)
            reason = "stowd hit an unexpected error while reading the file (see its log)"
            return self._later(job, reason, stage="reading the file")

    def _classify(self, job: Job) -> Classification | Decision | None:
        """The file's keys; a ``Decision`` to fail it; None when it is gone."""
        try:
            c = classify_mod.classify(job.path)
        except FileVanished:
            log.info("file vanished before it was sent, forgetting it: %s", job.path)
            self.queue.finish(job.id, state="gone")
            return None
        except UnknownType as problem:
            return self._unknown(job, problem)
        except FileIncomplete as problem:
            return self._incomplete(job, problem)
        except FileProblem as problem:
            return self._failure(job, str(problem), stage="reading the file")
        return self._plan(job, c)

    def _incomplete(self, job: Job, problem: FileIncomplete) -> Decision | None:
        """An image cut short: a writer that stalled may still add the rest, so it is read
        again after a backoff (at once when the watcher finds it changed); once it stayed
        so for the source's ``incomplete_wait`` it fails as truncated."""
        wait = self.config.source(job.source).incomplete_wait
        now = self.clock()
        until = (job.first_try or now) + wait
        if now >= until and _unchanged(job):
            stayed = f"; it stayed so for {wait:.0f}s" if wait else ""
            return self._failure(job, f"{problem}{stayed}", stage="reading the file")
        at = now + self.policy.next_delay(job.attempts)  # changed: the watcher queues it anew
        at = min(at, until) if until > now else at
        when = datetime.fromtimestamp(until).strftime("%H:%M:%S")
        reason = f"{problem}; waiting until {when} for the rest of it"
        error = self._error_doc(job, reason, stage="reading the file")
        if self.queue.wait_for_rest(job, at=at, error=error):
            log.info("%s: %s (read again in %.0fs)", job.path, reason, at - now)
        return None

    def _unknown(self, job: Job, problem: UnknownType) -> Decision | None:
        """A file of a type its source does not send: failed/, or left alone (``ignore``)."""
        if self.config.source(job.source).bulkdata.unknown == "fail":
            return self._failure(job, str(problem), stage="reading the file")
        log.info("%s: ignored (bulkdata.unknown: ignore): %s", job.path, problem)
        self.queue.finish(job.id, state="ignored")
        return None

    def _plan(self, job: Job, c: classify_mod.Classified) -> Classification | Decision | None:
        """Apply the metadata rules and sidecars; their trouble sends the file to failed/."""
        source = self.config.source(job.source)
        try:
            stored = None if job.sidecars is None else job.sidecar_entries()  # as found
            p = metadata.plan(
                self.config, source, job.path, job.rel, c, now=datetime.now(), stored=stored
            )
        except FileVanished as exc:  # a sidecar went away while it was read: read again
            stage = "reading its sidecar"
            return self._later(job, str(exc), stage=stage, counted=metrics.UNREADABLE)
        except UnknownType as problem:
            return self._unknown(job, problem)
        except FileProblem as problem:
            return self._failure(job, str(problem), stage="applying the metadata rules")
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
        made = None if c.media is None else self._made(job, c.kind, p)
        study = p.study_uid or (made.study if made else "")
        sop = p.sop_uid or (made.instance if made else "")
        sop_class = c.sop_class
        if c.media is not None:
            sop_class = bulkdata.sop_class_for(c.media, photographic=_photographic(source))
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
        except NotYet as exc:
            self._waiting(job, str(exc), exc.until)
            return None
        except LookupUnavailable as exc:
            return self._later(job, str(exc), stage=LOOKING, counted=metrics.UNAVAILABLE)
        except FileProblem as problem:
            return self._failure(job, str(problem), stage=LOOKING)
        try:
            return metadata.joined(p, found.values, c), found.record
        except FileProblem as problem:
            return self._failure(job, str(problem), stage=LOOKING)

    def _waiting(self, job: Job, reason: str, until: float) -> None:
        """No study yet: read the file again after a backoff, at the latest at ``until``."""
        now = self.clock()
        at = min(now + self.policy.next_delay(job.attempts), until + 0.1)
        error = self._error_doc(job, reason, stage=LOOKING)
        self.queue.retry_later([job.id], at=at, error=error, failing=False)
        log.info("%s: %s; asked again in %.0fs", job.path, reason, at - now)

    def _made(self, job: Job, kind: str, p: metadata.Planned) -> Made:
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

    # -- send -----------------------------------------------------------------------------
    def send_one(self) -> bool:
        name = self.destination.name
        hold = self.queue.holds().get(name)
        if hold is not None and hold.until > self.clock():
            return False
        if hold is not None and not self._wire.idle():
            return False  # another worker probes the held destination: one at a time
        batch = self.queue.claim_batch(
            [name],
            pick=lambda _dest, jobs: take_batch(jobs, self.limits),
            candidates=self.limits.max_files,
            lease=self._lease,
        )
        if not batch:
            return False
        self.held = frozenset(j.id for j in batch)
        try:
            self._send(batch, held=hold is not None)
        except BaseException:
            self._give_back(self.held)  # never leave a batch claimed
            raise
        finally:
            self.held = frozenset(self._owed)
        return True

    def _give_back(self, ids: frozenset[int]) -> None:
        """Release ``ids``; when the queue cannot be written now, keep them to release
        before any new work is claimed (``_pay_back``)."""
        try:
            self.queue.release(ids)
        except QueueError:
            self._owed |= ids

    def _pay_back(self) -> None:
        """Release the rows a failed release left claimed (raises ``QueueError`` while the
        queue still cannot be written: then nothing new is claimed)."""
        if self._owed:
            self.queue.release(self._owed)
            log.info(
                "destination %s: %d file(s) whose upload could not be recorded are queued "
                "again and will be sent again",
                self.destination.name,
                len(self._owed),
            )
            self._owed.clear()
            self.held = frozenset()

    def _send(self, batch: list[Job], *, held: bool) -> None:
        token = self._wire.begin(only=held)  # a held destination: one probe at a time
        if token is None:  # another worker began probing meanwhile
            self._give_back(frozenset(j.id for j in batch))
            return
        self._token = token
        spooled: list[Path] = []
        try:
            batch, parts = self._parts(batch, spooled)
            if batch:
                self._store(batch, parts, held=held)
        finally:
            self._wire.end()
            for path in spooled:
                path.unlink(missing_ok=True)

    def _parts(self, batch: list[Job], spooled: list[Path]) -> tuple[list[Job], list[Part]]:
        """What to send for each job: the file itself, or its changed copy in the spool."""
        jobs, parts, refused, no_room = [], [], [], []
        for job in batch:
            try:
                parts.append(self._part(job, spooled))
                jobs.append(job)
            except SpoolFull:
                no_room.append(job.id)
            except FileVanished:
                self._drop_vanished([job])
            except FileUnreadable as exc:
                stage = _stage(job)
                refused.append(self._later(job, str(exc), stage=stage, counted=metrics.UNREADABLE))
            except FileProblem as problem:
                refused.append(self._failure(job, str(problem), stage=_stage(job)))
            except Exception as exc:  # a bug must not stop the other files (nor spin on it)
                if no_space(exc):  # writing the DICOM file made from it
                    no_room.append(job.id)
                    continue
                log.exception("unexpected error while preparing %s; tried again later", job.path)
                reason = "stowd hit an unexpected error while preparing the file (see its log)"
                refused.append(self._later(job, reason, stage=_stage(job)))
        self._wait_for_room(no_room)
        self._settle_all([d for d in refused if d is not None])
        return jobs, parts

    def _wait_for_room(self, ids: list[int]) -> None:
        """The spool is full: these files wait for space, without counting an attempt
        (their copy is made again later; the daemon logs the full disk once)."""
        if not ids:
            return
        if self.disks is not None:
            self.disks.hit(self.config.spool)
        self.queue.release(ids, not_before=self.clock() + self.config.retry.initial)
        log.debug("no space in the spool %s for %d file(s); they wait", self.config.spool, len(ids))

    def _part(self, job: Job, spooled: list[Path]) -> Part:
        if job.kind != "dicom":
            return self._built(job, spooled)
        changes = job.change_set()
        explicit = self.destination.transcode == TRANSCODE_EXPLICIT  # if the file is implicit
        if changes is None and not (explicit and rewrite.needs_explicit(Path(job.path))):
            return Part(job.path, job.size, job.sop_uid or "", job.mtime_ns)
        if not _unchanged(job):
            raise FileVanished("the file changed or vanished before it was sent", path=job.path)
        now = datetime.now()
        copy = metadata.spool_copy(self.config, job, changes, now, explicit=explicit)
        spooled.append(copy)
        return Part(str(copy), copy.stat().st_size, job.sop_uid or "", None)

    def _built(self, job: Job, spooled: list[Path]) -> Part:
        """The DICOM instance made from a file that is not DICOM (a PDF, a photo, a video):
        a Part-10 file in the spool, or its metadata and bulk data (``bulkdata: metadata``)."""
        made = job.made_uids()
        if made is None or not _unchanged(job):
            raise FileVanished("the file changed or vanished before it was sent", path=job.path)
        source = self.config.source(job.source)
        media = media_of(job)
        values = (job.change_set() or {}).get("set", {})
        target = metadata.spool_path(self.config, job)
        metadata.make_spool(target, job)
        spooled += [target, target.with_suffix(".pixels")]
        uids = bulkdata.Uids(made.study, made.series, made.instance)
        options: dict[str, Any] = {
            "now": datetime.fromtimestamp(job.mtime_ns / 1e9),  # the same on every attempt
            "instance_number": made.number,
            "photographic": _photographic(source),
            "expect": (job.size, job.mtime_ns),  # the content the UIDs were made for
        }
        if self.destination.bulkdata == "metadata":
            scratch = target.with_suffix(".pixels")
            return bulk_part(job, media, values, uids, scratch=scratch, **options)
        size = bulkdata.build(Path(job.path), media, values, uids, target, **options)
        return Part(str(target), size, job.sop_uid or "", None)

    def _store(self, batch: list[Job], parts: list[Part], *, held: bool) -> None:
        try:
            answer = self._request(parts)
        except FileVanished:
            self._drop_vanished(batch)
            return
        except FileUnreadable as exc:
            self._unreadable(batch, parts, exc)
            return
        except StowFailure as failure:
            self._destination_trouble(batch, failure)
            return
        except OSError as exc:  # reading a file failed mid-request (I/O error, share gone)
            reason = f"could not read the file while sending it: {exc}"
            self._later_all(batch, reason, metrics.UNREADABLE)
            return
        metrics.request(self.destination.name, answer.seconds)
        verifying = self.destination.verify  # then a hold ends once the stored files are listed
        if held and not verifying:
            self._resume()
        if self._apply(batch, answer, parts) and held and verifying:
            self._resume()

    def _resume(self) -> None:
        if self.queue.unhold(self.destination.name):
            log.warning("destination %s: reachable again, sending resumes", self.destination.name)

    def _drop_vanished(self, batch: list[Job]) -> None:
        """Some file changed or disappeared: forget those, put the others back."""
        keep = []
        for job in batch:
            if _unchanged(job):
                keep.append(job.id)
            else:
                log.info("file vanished or changed before it was sent: %s", job.path)
                self.queue.finish(job.id, state="gone")
        self.queue.release(keep)

    def _unreadable(self, batch: list[Job], parts: list[Part], exc: FileUnreadable) -> None:
        """One file cannot be read now: it waits, the others go back to the queue."""
        bad = [j for j, p in zip(batch, parts, strict=True) if exc.path in (j.path, p.path)]
        decisions = [
            self._later(j, str(exc), stage="reading the file", counted=metrics.UNREADABLE)
            for j in bad
        ]
        self.queue.release([j.id for j in batch if j not in bad])
        self._settle_all([d for d in decisions if d is not None])

    def _destination_trouble(self, batch: list[Job], failure: StowFailure) -> None:
        """Hold the destination; the files wait behind others that have not failed yet."""
        if self.stop.is_set():
            self.queue.release([j.id for j in batch])
            return
        hold = self.queue.holds().get(self.destination.name)
        delay = self.policy.hold_delay(failure, hold.failures if hold else 0)
        until = self.clock() + delay
        self.queue.hold(self.destination.name, until=until, reason=str(failure))
        metrics.retried(self.destination.name, metrics.retry_reason(failure), len(batch))
        if _may_be_the_files(failure) and len(batch) > 1:
            self.queue.isolate([j.id for j in batch], not_before=until)
        elif isinstance(failure, ConnectionDropped):
            batch = [] if self._dropped(batch[0], failure) else batch  # [] : failed
        elif _may_be_the_files(failure):
            self._later_all(batch, str(failure), None)  # counted above
        else:
            self.queue.release([j.id for j in batch], not_before=until)
        kind = "refused" if isinstance(failure, DestinationHeld) else "unavailable"
        log.warning(
            "destination %s %s: %s; %d file(s) stay queued, next try in %.0fs",
            self.destination.name,
            kind,
            failure,
            len(batch),
            delay,
        )

    def _dropped(self, job: Job, failure: ConnectionDropped) -> bool:
        """The archive dropped the connection of a request that sent ``job`` alone: one drop
        more for it when no other request was on the wire meanwhile (an archive that crashes
        drops them all); ``MAX_DROPS`` of them fail it."""
        drops = _drops(job) + (1 if self._wire.alone(self._token) else 0)
        if drops < MAX_DROPS:
            decision = self._later(job, str(failure), counted=None, drops=drops)
        else:
            decision = self._failure(job, _dropped_reason(drops), drops=drops)
        self._settle_all([decision] if decision is not None else [])
        return decision is not None

    # -- apply the verdicts ---------------------------------------------------------------
    def _apply(self, batch: list[Job], answer: Answer, parts: Sequence[Part]) -> bool:
        """Act on the answer's verdicts; False when the files it stored could not be
        verified (they wait, the destination is held)."""
        if answer.status == 413 and len(batch) > 1:
            self._shrink_batches(batch)
        verdicts = judge(answer, parts, duplicates=self.destination.duplicates)
        self._alone = self._wire.alone(self._token)
        tally: dict[str, int] = {}
        decisions: list[Decision] = []
        stored: list[Job] = []  # to be verified before they are settled as sent
        for job in batch:
            verdict = verdicts[job.sop_uid or ""]
            tally[verdict.outcome.value] = tally.get(verdict.outcome.value, 0) + 1
            if verdict.outcome in STORED and self.destination.verify:
                stored.append(job)
                continue
            decision = self._act(job, verdict, answer)
            if decision is not None:
                decisions.append(decision)
        unlisted = self._verify(stored, verdicts, answer, decisions)
        unsettled = [j for j in stored if unlisted is None or j.sop_uid in unlisted]
        _recount(tally, [verdicts[j.sop_uid or ""].outcome for j in unsettled], unlisted)
        self._settle_all(decisions)
        size = sum(j.size for j in batch) / MB
        log.info(
            "destination %s: batch of %d file(s), %.1f MB, HTTP %d in %.2fs: %s",
            self.destination.name,
            len(batch),
            size,
            answer.status,
            answer.seconds,
            ", ".join(f"{n} {k}" for k, n in sorted(tally.items())),
        )
        if answer.server_message and answer.status != 200:
            log.warning("destination %s said: %s", self.destination.name, answer.server_message)
        return unlisted is not None

    # -- verify what was stored (verify: true) -------------------------------------------
    def _verify(
        self,
        stored: list[Job],
        verdicts: dict[str, Verdict],
        answer: Answer,
        decisions: list[Decision],
    ) -> set[str] | None:
        """Ask the archive whether it lists the files it said it stored: the listed ones
        are sent (their decisions added to ``decisions``), the others sent again.  The
        SOPInstanceUIDs it does not list; None when it cannot be asked."""
        if not stored:
            return set()
        instances = [(j.study_uid or "", j.sop_uid or "") for j in stored]
        try:
            http = self.client.http
            missing = verify.unlisted(http, self.destination, instances, self._alive)
        except (VerifyUnavailable, ClientSetupError) as exc:
            self._unverified(stored, str(exc))
            return None
        self.verified.add(len(stored) - len(missing), len(missing))
        log.info(
            "destination %s: the archive lists %d of the %d file(s) it stored (QIDO-RS)",
            self.destination.name,
            len(stored) - len(missing),
            len(stored),
        )
        for job in stored:
            verdict = verdicts[job.sop_uid or ""]
            if job.sop_uid in missing:
                decision = self._unlisted(job, answer)
            else:
                decision = self._act(job, verdict, answer)
            if decision is not None:
                decisions.append(decision)
        return missing

    def _unlisted(self, job: Job, answer: Answer) -> Decision | None:
        """The archive said it stored ``job``'s file but does not list it: send it again,
        at most ``MAX_UNLISTED`` times, then fail it."""
        count = verify.unlisted_count(job.error) + 1
        said = (
            f"the archive answered that it stored the file (SOPInstanceUID {job.sop_uid}), "
            "but does not list it when asked (QIDO-RS)"
        )
        if count >= verify.MAX_UNLISTED:
            reason = (
                f"{said}, {count} times: stowd does not send it again; check the archive's "
                "log and storage (a file it says it stores but cannot find is not safe there)"
            )
            return self._failure(job, reason, answer=answer, unlisted=count)
        reason = f"{said}; it is sent again"
        return self._later(job, reason, answer=answer, counted=metrics.FILE, unlisted=count)

    def _unverified(self, stored: list[Job], reason: str) -> None:
        """The archive cannot be asked: hold the destination; the stored files wait in the
        queue (neither sent/ nor failed/) and are sent and verified again afterwards."""
        name = self.destination.name
        hold = self.queue.holds().get(name)
        delay = self.policy.next_delay(hold.failures if hold else 0)
        until = self.clock() + delay
        self.queue.hold(name, until=until, reason=f"cannot verify what it stored: {reason}")
        self.queue.release([j.id for j in stored], not_before=until)
        log.warning(
            "destination %s: the archive answered that it stored %d file(s), but stowd cannot "
            "ask it whether it lists them (verify: true): %s; the files stay where they are "
            "(not moved to sent/) and are sent and verified again in %.0fs",
            name,
            len(stored),
            reason,
            delay,
        )

    def _act(self, job: Job, verdict: Verdict, answer: Answer) -> Decision | None:
        """Queue bookkeeping for one file; a ``Decision`` when its file is to be moved."""
        if verdict.outcome is Outcome.SENT:
            note = None
            if verdict.reason:  # a WarningReason: stored, with a note in the queue
                log.warning("%s: %s", job.path, verdict.reason)
                note = f"{STORED_WITH_WARNING} {verdict.code or 0:04X}"
            return Decision(job, self.config.source(job.source), "sent", note=note)
        if verdict.outcome is Outcome.ALREADY:
            log.info("%s: %s; settled as stored", job.path, verdict.reason)
            return Decision(job, self.config.source(job.source), "sent", note=ALREADY_STORED)
        if verdict.outcome is Outcome.FAILED:
            return self._failure(job, verdict.reason, verdict=verdict, answer=answer)
        if _doubtful(verdict):
            return self._refused(job, verdict, answer)
        if verdict.outcome is Outcome.ISOLATE and answer.status == 413:
            self.queue.release([job.id])  # sent again in the smaller batches
        elif verdict.outcome is Outcome.ISOLATE:
            self.queue.isolate([job.id])
        else:
            return self._later(job, verdict.reason, verdict=verdict, answer=answer)
        return None

    def _refused(self, job: Job, verdict: Verdict, answer: Answer) -> Decision | None:
        """A refusal that may be transient but may as well be permanent: tried again with
        the normal backoff; the ``retry.max_refusals``-th such refusal fails the file.  The
        count is kept in its error document (the queue), so it survives restarts.  Only a
        refusal of a request that was alone on the wire counts: a busy archive refuses for
        contention too (tiny_pacs answers 0110 when its SQLite index is locked by another
        request), and such refusals are retried until ``retry.max_age``, as before."""
        if not self._alone:
            reason = f"{verdict.reason} (not counted: other requests were in flight)"
            return self._later(job, reason, verdict=verdict, answer=answer)
        refusals = _refusals(job) + 1
        limit = self.config.retry.max_refusals
        if refusals < limit:
            reason = f"{verdict.reason} (refusal {refusals} of at most {limit})"
            return self._later(job, reason, verdict=verdict, answer=answer)
        reason = (
            f"the archive refused this file {refusals} times (retry.max_refusals: {limit}): "
            f"{verdict.reason}; stowd does not send it again: {refusal_advice(verdict.code)}"
        )
        return self._failure(job, reason, verdict=verdict, answer=answer)

    def _shrink_batches(self, batch: list[Job]) -> None:
        """HTTP 413 for a batch: from now on send at most half of it per request."""
        total = sum(j.size for j in batch)
        self.limits = BatchLimits(max_files=max(1, len(batch) // 2), max_bytes=max(1, total // 2))
        log.warning(
            "destination %s: a request of %d file(s), %.1f MB was too large for the archive "
            "(HTTP 413); sending at most %d file(s), %.1f MB per request from now on "
            "(lower batch.max_bytes in the config to keep it so)",
            self.destination.name,
            len(batch),
            total / MB,
            self.limits.max_files,
            self.limits.max_bytes / MB,
        )

    def _later(
        self,
        job: Job,
        reason: str,
        *,
        verdict: Verdict | None = None,
        answer: Answer | None = None,
        stage: str = "storing the file",
        counted: str | None = metrics.FILE,
        drops: int | None = None,
        unlisted: int | None = None,
    ) -> Decision | None:
        """Try this file again after a backoff; a ``Decision`` to fail it once too old.

        ``counted``: the retry reason for the metrics (None: the caller counted it)."""
        now = self.clock()
        age = now - (job.first_try or now)
        if self.policy.too_old(age):
            reason = reason.removesuffix("; it is tried again later")
            reason = f"gave up after {job.attempts + 1} attempts: {reason}"
            return self._failure(
                job,
                reason,
                verdict=verdict,
                answer=answer,
                stage=stage,
                drops=drops,
                unlisted=unlisted,
            )
        delay = self.policy.next_delay(job.attempts)
        if counted is not None:
            metrics.retried(self.destination.name, counted)
        error = self._error_doc(
            job,
            reason,
            verdict=verdict,
            answer=answer,
            stage=stage,
            drops=drops,
            unlisted=unlisted,
        )
        self.queue.retry_later([job.id], at=now + delay, error=error)
        log.info("%s: %s; retry in %.0fs", job.path, reason, delay)
        return None

    def _later_all(self, batch: list[Job], reason: str, counted: str | None) -> None:
        decisions = [self._later(j, reason, counted=counted) for j in batch]
        self._settle_all([d for d in decisions if d is not None])

    # -- settle ---------------------------------------------------------------------------
    def _failure(
        self,
        job: Job,
        reason: str,
        *,
        verdict: Verdict | None = None,
        answer: Answer | None = None,
        stage: str = "storing the file",
        drops: int | None = None,
        unlisted: int | None = None,
    ) -> Decision:
        error = self._error_doc(
            job,
            reason,
            verdict=verdict,
            answer=answer,
            stage=stage,
            drops=drops,
            unlisted=unlisted,
        )
        source = self.config.source(job.source)
        where = "failed (left where it is)" if source.keep else "failed/"
        log.error("%s: %s -> %s", job.path, reason, where)
        return Decision(job, source, "failed", error)

    def _settle_all(self, decisions: list[Decision]) -> None:
        if not decisions:
            return
        try:
            results = settle_all(self.queue, decisions)
        except QueueError:
            # Rows already recorded as settling are finished by the daemon's repair; the
            # others are still claimed, and released by the caller (or sent again).
            self.unsettled.update(d.job.id for d in decisions)
            raise
        for result in results:
            job, source = result.decision.job, result.decision.source
            if result.problem is not None:
                self._unsettled(result)
                continue
            if result.target is not None:
                outcome = result.decision.outcome
                note = _metric_note(result.decision.note)
                metrics.settled(job.source, job.destination, outcome, job.size, note)
            if result.target is not None and result.decision.outcome == "sent":
                stored = "already stored" if result.decision.note == ALREADY_STORED else "stored"
                log.info("%s: %s, moved to %s", job.path, stored, result.target)
            if result.target is not None and source.remove_empty_dirs:
                remove_empty_parents(Path(job.path), source.watch)

    def _unsettled(self, result: Settled) -> None:
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

    def _error_doc(
        self,
        job: Job,
        reason: str,
        *,
        verdict: Verdict | None = None,
        answer: Answer | None = None,
        stage: str = "storing the file",
        drops: int | None = None,
        unlisted: int | None = None,
    ) -> dict[str, Any]:
        """The file's error document; ``drops``: the connections the archive dropped when
        it was sent alone (counted on, while it waits, by ``_drops``).  The refusals counted
        for ``retry.max_refusals`` are carried on whatever else happens to the file, and one
        more when ``verdict`` is such a refusal of a request alone on the wire."""
        now = self.clock()
        sent = answer is not None
        code = verdict.code if verdict and verdict.outcome is not Outcome.SENT else None
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
        if drops is not None:
            doc[DROPS] = drops
        refusals = _refusals(job) + (1 if self._alone and _doubtful(verdict) else 0)
        if refusals:
            doc[REFUSALS] = refusals
        if unlisted is not None:
            doc[verify.UNLISTED] = unlisted
        return doc


def _recount(tally: dict[str, int], unsettled: list[Outcome], unlisted: set[str] | None) -> None:
    """The batch's tally after verifying the stored files: those not listed, or not
    verified at all (``unsettled``, by their outcome), are not sent."""
    for outcome in unsettled:
        tally[outcome.value] -= 1
        if not tally[outcome.value]:
            del tally[outcome.value]
    if unsettled:
        key = "stored, not verified" if unlisted is None else "stored, not listed"
        tally[key] = len(unsettled)


def _may_be_the_files(failure: StowFailure) -> bool:
    """An answered 500 (not a gateway's 502/503/504), or a connection the archive closed
    without answering once the request was sent, may be caused by one of the files."""
    if isinstance(failure, ConnectionDropped):
        return True
    status = failure.status or 0
    return isinstance(failure, DestinationBusy) and status >= 500 and status not in (502, 503, 504)


def _drops(job: Job) -> int:
    """How many times the archive dropped the connection of a request that sent ``job``
    alone, so far (kept in its error document while it waits)."""
    try:
        count = json.loads(job.error or "{}").get(DROPS, 0)
    except (ValueError, AttributeError):
        return 0
    return count if isinstance(count, int) else 0


def _refusals(job: Job) -> int:
    """How many times the archive refused ``job`` with a code counted for
    ``retry.max_refusals`` so far (kept in its error document)."""
    try:
        count = json.loads(job.error or "{}").get(REFUSALS, 0)
    except (ValueError, AttributeError):
        return 0
    return count if isinstance(count, int) else 0


def _doubtful(verdict: Verdict | None) -> bool:
    """A refusal that may or may not pass later (``stow.is_counted``)."""
    if verdict is None or verdict.code is None or verdict.outcome is not Outcome.RETRY:
        return False
    return is_counted(verdict.code)


def _dropped_reason(drops: int) -> str:
    return (
        f"the archive drops the connection whenever this file is sent: it closed the "
        f"connection without answering {drops} times when the file was sent alone (the "
        "archive may crash on it; check its log); stowd does not send it again"
    )


def _stage(job: Job) -> str:
    """What was being done to the file when it was prepared for sending."""
    if job.kind != "dicom":
        return "making the DICOM instance"
    if job.change_set() is None:  # copied only to convert it (transcode: explicit-vr)
        return "converting it to Explicit VR Little Endian"
    return "applying the metadata rules"


def _photographic(source: Source) -> bool:
    return source.bulkdata.images == "photographic"


def media_of(job: Job) -> Media:
    """What the file holds, read again (its headers only) when it is sent."""
    media = detect(Path(job.path))
    if media.kind != job.kind:
        raise FileVanished("the file was replaced by another kind of file", path=job.path)
    return media


def _unchanged(job: Job) -> bool:
    try:
        st = os.stat(job.path)
    except OSError:
        return False
    return st.st_size == job.size and st.st_mtime_ns == job.mtime_ns


def _metric_note(note: str | None) -> str | None:
    """The metrics' word for a settled file's queue note (``metrics.NOTES``)."""
    if note == ALREADY_STORED:
        return "already_stored"
    if note is not None and note.startswith(STORED_WITH_WARNING):
        return "warning"
    return None
