"""The sender of one destination: group -> stow -> (verify) -> settle, a batch at a time.

Each step is a module of its own; this one only moves jobs between them and the queue.  New
files are read by ``reader.Reader`` (a sender reads them too when it has nothing to send);
what becomes of a file after a try is ``filing.Filing``'s; how long it waits, ``backoff``'s.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from stowd import dicomlib
from stowd.config.model import TRANSCODE_EXPLICIT, BatchLimits, Config, Destination
from stowd.config.schedule import local_now
from stowd.dicomweb.answers import answer_seconds
from stowd.dicomweb.stow import StowClient
from stowd.dicomweb.stowanswer import (
    Answer,
    StowOutcome,
    Verdict,
    is_counted,
    judge,
    refusal_advice,
)
from stowd.dicomweb.stowbody import Part
from stowd.errors import (
    ClientSetupError,
    ConnectionDropped,
    DestinationBusy,
    DestinationHeld,
    FileProblem,
    FileUnreadable,
    FileVanished,
    QueueError,
    SpoolFull,
    StowFailure,
    VerifyUnavailable,
    no_space,
)
from stowd.media import dicomfile
from stowd.media.probe import detect
from stowd.media.reading import Media
from stowd.pipeline import concurrency, counters, metadata, verify
from stowd.pipeline.bulkform import bulk_part
from stowd.pipeline.concurrency import Change, Concurrency, Ticket
from stowd.pipeline.disk import Disks
from stowd.pipeline.filing import (
    CROWDED,
    CROWDED_FACTOR,
    DROPS,
    REFUSALS,
    Behind,
    Filing,
    counted_in_error,
    refusals_so_far,
    unchanged,
)
from stowd.pipeline.group import take_batch
from stowd.pipeline.lookup import Finder
from stowd.pipeline.loop import Loop
from stowd.pipeline.queue import ALREADY_STORED, STORED_WITH_WARNING, Job, Queue
from stowd.pipeline.reader import CLASSIFY_CHUNK, Reader, photographic
from stowd.pipeline.settle import Decision
from stowd.pipeline.wire import NOT_ALONE, wire_of

log = logging.getLogger("stowd.worker")

LEASE_SLACK = 600.0
MB = 1024 * 1024
# A file whose request, sent alone, ends this many times in a dropped connection fails.
MAX_DROPS = 3
# what verify: true checks before the file moves to sent/: the archive's "stored" and its
# "already stored" (stow.StowOutcome.ALREADY) alike
STORED = (StowOutcome.SENT, StowOutcome.ALREADY)


class Worker:
    """Sends the queued files of one destination, one batch at a time (and, when there is
    nothing to send, reads new files like the reader: ``reader``)."""

    def __init__(
        self,
        config: Config,
        queue: Queue,
        destination: Destination,
        client: StowClient,
        stop: threading.Event,
        *,
        clock: Callable[[], float] | None = None,
        unsettled: set[int] | None = None,
        classify_lock: threading.Lock | None = None,
        finder: Finder | None = None,
        disks: Disks | None = None,
        verified: verify.Tally | None = None,
        now: Callable[[], datetime] = local_now,
        limit: Concurrency | None = None,
        claiming: Callable[[], bool] | None = None,
    ) -> None:
        self.config = config
        # False while this node has lost a shared queue's database (service/fleet.py)
        self._claiming = claiming
        self.now = now  # the local time, for the destination's schedule (aware)
        # the stored files the archive listed (or not), with verify (shared by a migration)
        self.verified = verified or verify.Tally()
        self.disks = disks  # told of writes that failed for lack of space (it logs them)
        self.queue = queue
        self.destination = destination
        self.name = destination.name  # its log lines and metrics name it
        self.client = client
        self.stop = stop
        self.clock = clock or queue.clock  # the queue's: the clock of the times it keeps
        self._lease = lease(destination)
        # a shared queue's claim: the node's lease, renewed while it is held (fleet.py);
        # SQLite's: the upload's deadlines (its one daemon reclaims only what none holds)
        self._claim_lease = config.lease if config.database is not None else self._lease
        self.filing = Filing(
            config, queue, name=self.name, clock=clock, unsettled=unsettled, disks=disks
        )
        self.policy = self.filing.policy  # how long a file or the destination waits
        # a reader thread reads new files beside this sender (they share a classify lock)
        self._beside = classify_lock is not None
        self.reader = Reader(
            config,
            queue,
            stop,
            name=self.name,
            max_step=self._lease,
            clock=clock,
            unsettled=self.filing.unsettled,
            classify_lock=classify_lock,  # shared by a generation: one reads at a time
            finder=finder,
            disks=disks,
        )
        self.limits = destination.batch  # halved when the archive answers 413
        self._loop = Loop(self.name, queue, stop, disks)
        self.beat = time.monotonic()  # last sign of progress (the daemon's watchdog reads it)
        self.max_step = self._lease  # one step (a batch upload) may take this long
        # (started, last progress) of the request in flight, for status (via the daemon)
        self.in_flight: tuple[float, float] | None = None
        # the requests in flight to this destination, and how many may be (adaptive:
        # ``limit``, shared by its workers and kept across reloads by the daemon)
        self._wire = wire_of(client, lambda: _limit_of(destination, limit))
        self._token = NOT_ALONE  # of this worker's request on the wire
        self._sent_at = 0.0  # when its last request was sent: a failure of it holds from then
        self._ticket = Ticket(0, 0, 0)  # what it knew of the limit when it took its seat
        # the answer being applied came to a request that was alone on the wire: its
        # refusals count for retry.max_refusals (see _doubtful_refusal)
        self._alone = False
        # The ids this worker has claimed and not given back: the daemon never reclaims
        # them (an upload in progress, or a release that failed and is tried again).
        self.held: frozenset[int] = frozenset()
        self._unreleased: set[int] = set()  # claimed rows whose release failed: released first
        # the settle of the last batch, done while the next one uploads
        self._behind = Behind(self.filing, self._release_or_keep)

    def run(self) -> None:
        try:
            self._loop.run(self.step, self._alive)
        finally:
            self._settled_behind()  # stopping: the last batch's moves are finished first

    def _settled_behind(self) -> None:
        """Wait for the batch settled behind when stopping; its error is logged (its rows
        are released, or repaired by the daemon, as after any failed settle)."""
        try:
            self._behind.wait()
        except QueueError as exc:
            log.warning("%s; the files of the last batch are moved when stowd starts again", exc)
        except Exception:
            log.exception("unexpected error while settling the last batch of %s", self.name)
        finally:
            self._behind.close()
            self.held = frozenset(self._unreleased)

    @property
    def running(self) -> bool:
        """Inside ``run`` (its loop says), or a batch is still settled behind."""
        return self._loop.running or self._behind.busy

    def _alive(self) -> None:
        """A sign of progress within a step (a chunk of an upload went out)."""
        self.beat = time.monotonic()
        request = self.in_flight
        if request is not None:
            self.in_flight = (request[0], self.clock())

    def _request(self, parts: list[Part]) -> Answer:
        """One STOW request, recorded as in flight while it runs."""
        started = self.clock()
        self._sent_at = started
        self.in_flight = (started, started)
        try:
            return self.client.store(parts, progress=self._alive)
        finally:
            self.in_flight = None

    def step(self) -> bool:
        """Do one unit of work; False when there was nothing to do.  What is ready is sent
        first: the archive never waits while this sender reads new files, which it does
        only when it has nothing to send (while the last batch is still settled behind);
        then it finishes that batch's settle."""
        self._release_unreleased()
        return self._send_ready() or self._read_new() > 0 or self._wait_behind()

    def _read_new(self) -> int:
        """Read new files, having nothing to send: one batch when a reader thread reads the
        rest (it shares its ``classify_lock``), else a reader's chunk (``Reader``)."""
        return self.classify_some(self.limits.max_files if self._beside else CLASSIFY_CHUNK)

    def classify_some(self, limit: int | None = None) -> int:
        """Read the headers of new files (when no other thread does); see ``Reader``."""
        return self.reader.classify_some(limit)

    # -- send -----------------------------------------------------------------------------
    def send_one(self) -> bool:
        """Send the next ready batch; with none, finish the batch settled behind (True when
        there was either)."""
        return self._send_ready() or self._wait_behind()

    def _send_ready(self) -> bool:
        """Claim and send the next ready batch; False when none is ready.  A settle behind
        that failed (the queue could not be written) is raised first, before anything new is
        claimed: raised only by the next batch's ``Behind.start``, once that batch was
        uploaded, its error dropped that batch's outcome too, and its files were sent again
        (a node cut off its database uploaded its first batches twice once back)."""
        if self._behind.failed:
            self._wait_behind()  # raises its error, its claimed rows given back
        name = self.destination.name
        if not self.in_window():
            return False  # outside its schedule: nothing new is sent (new files are read)
        if self._claiming is not None and not self._claiming():
            return False  # this node lost the shared queue's database: nothing new
        hold = self.queue.holds().get(name)
        if hold is not None and hold.until > self.clock():
            return False
        if hold is not None and not self._wire.idle():
            return False  # another worker probes the held destination
        ticket = self._wire.seat()
        if ticket is None:
            return False  # as many requests in flight as the archive takes now (adaptive)
        self._ticket = ticket
        try:
            return self._claim_and_send(name, hold is not None)
        finally:
            self._wire.unseat()

    def _claim_and_send(self, name: str, held: bool) -> bool:
        """Claim the next ready batch and send it; False when none is ready."""
        batch = self.queue.claim_batch(
            [name],
            pick=lambda _dest, jobs: take_batch(jobs, self.limits),
            candidates=self.limits.max_files,
            lease=self._claim_lease,
        )
        if not batch:
            return False
        self.held = frozenset(j.id for j in batch) | self._behind.ids
        try:
            self._send(batch, held=held)
        except BaseException:
            self._release_or_keep(self.held - self._behind.ids)  # never leave a batch claimed
            raise
        finally:
            self.held = frozenset(self._unreleased) | self._behind.ids
        return True

    def in_window(self) -> bool:
        """Inside the destination's transfer windows (``schedule``) now?"""
        schedule = self.destination.schedule
        return schedule.always or schedule.is_open(self.now())

    def _wait_behind(self) -> bool:
        """Nothing to send now: finish the batch settled behind (True when there was one)."""
        try:
            return self._behind.wait()
        finally:
            self.held = frozenset(self._unreleased)

    def _release_or_keep(self, ids: frozenset[int]) -> None:
        """Release ``ids``; when the queue cannot be written now, keep them to release
        before any new work is claimed (``_release_unreleased``)."""
        try:
            self.queue.release(ids)
        except QueueError:
            self._unreleased |= ids

    def _release_unreleased(self) -> None:
        """Release the rows a failed release left claimed (raises ``QueueError`` while the
        queue still cannot be written: then nothing new is claimed)."""
        if self._unreleased:
            self.queue.release(self._unreleased)
            log.info(
                "destination %s: %d file(s) whose upload could not be recorded are queued "
                "again and will be sent again",
                self.destination.name,
                len(self._unreleased),
            )
            self._unreleased.clear()
            self.held = self._behind.ids  # the batch settled behind stays held

    def _send(self, batch: list[Job], *, held: bool) -> None:
        token = self._wire.begin(only=held)  # a held destination: one probe at a time
        if token is None:  # another worker began probing meanwhile
            self._release_or_keep(frozenset(j.id for j in batch))
            return
        self._token = token
        spooled: list[Path] = []
        try:
            batch, parts = self._parts(batch, spooled)
            if batch:
                self._upload(batch, parts, held=held)
        finally:
            self._wire.end()
            for path in spooled:
                path.unlink(missing_ok=True)

    def _parts(self, batch: list[Job], spooled: list[Path]) -> tuple[list[Job], list[Part]]:
        """What to send for each job: the file itself, or its changed copy in the spool."""
        jobs, parts, refused, no_room = [], [], [], []
        for job in batch:
            try:
                parts.append(self._part_of(job, spooled))
                jobs.append(job)
            except SpoolFull:
                no_room.append(job.id)
            except FileVanished:
                self._drop_vanished([job])
            except FileUnreadable as exc:
                stage = _preparing(job)
                counted = counters.UNREADABLE
                refused.append(self.filing.retry_later(job, str(exc), stage=stage, counted=counted))
            except FileProblem as problem:
                refused.append(self.filing.fail(job, str(problem), stage=_preparing(job)))
            except Exception as exc:  # a bug must not stop the other files (nor spin on it)
                if no_space(exc):  # writing the DICOM file made from it
                    no_room.append(job.id)
                    continue
                log.exception("unexpected error while preparing %s; tried again later", job.path)
                reason = "stowd hit an unexpected error while preparing the file (see its log)"
                refused.append(self.filing.retry_later(job, reason, stage=_preparing(job)))
        self._wait_for_room(no_room)
        self.filing.settle([d for d in refused if d is not None])
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

    def _part_of(self, job: Job, spooled: list[Path]) -> Part:
        if job.kind != "dicom":
            return self._built_instance(job, spooled)
        changes = job.change_set()
        explicit = self.destination.transcode == TRANSCODE_EXPLICIT  # if the file is implicit
        if changes is None and not (explicit and dicomfile.needs_explicit(Path(job.path))):
            return Part(job.path, job.size, job.sop_uid or "", job.mtime_ns)
        if not unchanged(job):
            raise FileVanished("the file changed or vanished before it was sent", path=job.path)
        now = datetime.now()
        copy = metadata.spool_copy(self.config, job, changes, now, explicit=explicit)
        spooled.append(copy)
        return Part(str(copy), copy.stat().st_size, job.sop_uid or "", None)

    def _built_instance(self, job: Job, spooled: list[Path]) -> Part:
        """The DICOM instance made from a file that is not DICOM (a PDF, a photo, a video):
        a Part-10 file in the spool, or its metadata and bulk data (``bulkdata: metadata``)."""
        dicomlib.load()  # pydicom whole, one thread at a time
        from stowd.media import bulkdata  # noqa: PLC0415 - pydicom: not at start (issue 19)

        made = job.made_uids()
        if made is None or not unchanged(job):
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
            "photographic": photographic(source),
            "expect": (job.size, job.mtime_ns),  # the content the UIDs were made for
        }
        if self.destination.bulkdata == "metadata":
            scratch = target.with_suffix(".pixels")
            return bulk_part(job, media, values, uids, scratch=scratch, **options)
        size = bulkdata.build(Path(job.path), media, values, uids, target, **options)
        return Part(str(target), size, job.sop_uid or "", None)

    def _upload(self, batch: list[Job], parts: list[Part], *, held: bool) -> None:
        try:
            answer = self._request(parts)
        except FileVanished:
            self._drop_vanished(batch)
            return
        except FileUnreadable as exc:
            self._unreadable(batch, parts, exc)
            return
        except StowFailure as failure:
            self._wire.unanswered(p.sop_uid for p in parts)
            self._overloaded(failure)
            if held or not self._eased(batch, failure):
                self._destination_trouble(batch, failure)
            return
        except OSError as exc:  # reading a file failed mid-request (I/O error, share gone)
            reason = f"could not read the file while sending it: {exc}"
            self.filing.retry_all_later(batch, reason, counters.UNREADABLE)
            return
        counters.request(self.destination.name, answer.seconds)
        self._succeeded()
        verifying = self.destination.verify  # then a hold ends once the stored files are listed
        if held and not verifying:
            self._end_hold()
        if self._apply_answer(batch, answer, parts) and held and verifying:
            self._end_hold()

    def _end_hold(self) -> None:
        if self.queue.unhold(self.destination.name):
            log.warning("destination %s: reachable again, sending resumes", self.destination.name)

    def _drop_vanished(self, batch: list[Job]) -> None:
        """Some file changed or disappeared: forget those, put the others back."""
        keep = []
        for job in batch:
            if unchanged(job):
                keep.append(job.id)
            else:
                log.info("file vanished or changed before it was sent: %s", job.path)
                self.queue.finish(job.id, state="gone", was=job.state)
        self.queue.release(keep)

    def _unreadable(self, batch: list[Job], parts: list[Part], exc: FileUnreadable) -> None:
        """One file cannot be read now: it waits, the others go back to the queue."""
        bad = [j for j, p in zip(batch, parts, strict=True) if exc.path in (j.path, p.path)]
        decisions = [
            self.filing.retry_later(
                j, str(exc), stage="reading the file", counted=counters.UNREADABLE
            )
            for j in bad
        ]
        self.queue.release([j.id for j in batch if j not in bad])
        self.filing.settle([d for d in decisions if d is not None])

    def _destination_trouble(self, batch: list[Job], failure: StowFailure) -> None:
        """Hold the destination; the files wait behind others that have not failed yet."""
        if self.stop.is_set():
            self.queue.release([j.id for j in batch])
            return
        hold = self.queue.holds().get(self.destination.name)
        delay = self.policy.hold_delay(failure, hold.failures if hold else 0)
        # a request sent before the hold now in force failed in the outage it counts already
        asked = isinstance(failure, DestinationBusy) and failure.retry_after is not None
        held = self.queue.hold(
            self.name,
            until=self.clock() + delay,
            reason=str(failure),
            began=self._sent_at,
            asked=asked,
        )
        until, delay = held.until, max(0.0, held.until - self.clock())
        counters.retried(self.destination.name, counters.retry_reason(failure), len(batch))
        if _may_be_the_files(failure) and len(batch) > 1:
            self.queue.isolate([j.id for j in batch], not_before=until)
        elif isinstance(failure, ConnectionDropped):
            batch = [] if self._count_drop(batch[0], failure) else batch  # [] : failed
        elif _may_be_the_files(failure):
            self.filing.retry_all_later(batch, str(failure), None)  # counted above
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

    # -- adaptive concurrency (issue 20) -------------------------------------------------
    def _overloaded(self, failure: StowFailure) -> None:
        """A sign of an overloaded archive (``concurrency.overload``): fewer requests at once."""
        limit, why = self._wire.concurrency, concurrency.overload(failure)
        if limit is None or why is None:
            return
        change = limit.overloaded(self._ticket)
        if change is not None:
            line = "destination %s: %s; concurrent requests %d -> %d"
            self._changed(limit, change, line, why, change.old, change.new)

    def _succeeded(self) -> None:
        """An answer without a sign of overload: after a round of them, one request more."""
        limit = self._wire.concurrency
        if limit is None:
            return
        change = limit.succeeded(self._ticket)
        if change is not None:
            line = "destination %s: concurrent requests raised to %d after %d successful requests"
            self._changed(limit, change, line, change.new, change.successes)

    def _changed(self, limit: Concurrency, change: Change, line: str, *args: object) -> None:
        """Show a change of the limit (gauge, log): a decrease to a level not reached lately
        at WARNING, the routine ups and downs at DEBUG, summed up at INFO every 10 minutes
        (``concurrency.Narrator``)."""
        counters.concurrency(self.name, change.new)
        told = limit.narrator.tell(change, self.clock())
        log.log(logging.WARNING if told.loud else logging.DEBUG, line, self.name, *args)
        found = told.summary
        if found is not None:
            log.info(
                "destination %s: the archive was busy at times: concurrent requests lowered "
                "%d and raised %d time(s) in the last %.0f minutes, between %d and %d; now %d",
                self.name,
                found.downs,
                found.ups,
                found.seconds / 60,
                found.low,
                found.high,
                found.now,
            )

    def _eased(self, batch: list[Job], failure: StowFailure) -> bool:
        """A 429 or 503 without Retry-After to a request sent while more than one was
        allowed: the lower limit is the answer, not a hold.  The batch is queued again at
        once (no failure counted against its files, not split); True when so."""
        if self._wire.concurrency is None or self._ticket.limit <= 1:
            return False
        if not concurrency.eased(failure) or self.stop.is_set():
            return False
        self.queue.release([j.id for j in batch])
        counters.retried(self.name, counters.retry_reason(failure), len(batch))
        log.debug(
            "destination %s: %d file(s) queued again after HTTP %s; sent again with fewer "
            "requests at once",
            self.name,
            len(batch),
            failure.status,
        )
        return True

    def _count_drop(self, job: Job, failure: ConnectionDropped) -> bool:
        """The archive dropped the connection of a request that sent ``job`` alone: one drop
        more for it when no other request was on the wire meanwhile (an archive that crashes
        drops them all); ``MAX_DROPS`` of them fail it."""
        drops = _drops(job) + (1 if self._wire.alone(self._token) else 0)
        if drops < MAX_DROPS:
            decision = self.filing.retry_later(
                job, str(failure), counted=None, counts={DROPS: drops}
            )
        else:
            decision = self.filing.fail(job, _dropped_reason(drops), counts={DROPS: drops})
        self.filing.settle([decision] if decision is not None else [])
        return decision is not None

    # -- apply the verdicts ---------------------------------------------------------------
    def _apply_answer(self, batch: list[Job], answer: Answer, parts: Sequence[Part]) -> bool:
        """Act on the answer's verdicts; False when the files it stored could not be
        verified (they wait, the destination is held)."""
        if answer.status == 413 and len(batch) > 1:
            self._shrink_batches(batch)
        resent = self._wire.answered(p.sop_uid for p in parts)
        resent |= {j.sop_uid for j in batch if j.sop_uid and _answer_was_lost(j)}
        verdicts = judge(answer, parts, duplicates=self.destination.duplicates, resent=resent)
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
            decision = self._decide(job, verdict, answer)
            if decision is not None:
                decisions.append(decision)
        unlisted = self._verify(stored, verdicts, answer, decisions)
        unsettled = [j for j in stored if unlisted is None or j.sop_uid in unlisted]
        _uncount_unverified(tally, [verdicts[j.sop_uid or ""].outcome for j in unsettled], unlisted)
        # moved while the next batch uploads (the batch before is settled first)
        self._behind.start(decisions, [d.job.id for d in decisions])
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
        asked = self.clock()
        try:
            http = self.client.http
            missing = verify.unlisted(http, self.destination, instances, self._alive)
        except (VerifyUnavailable, ClientSetupError) as exc:
            self._hold_unverified(stored, str(exc), asked)
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
                decision = self._stored_but_unlisted(job, answer)
            else:
                decision = self._decide(job, verdict, answer)
            if decision is not None:
                decisions.append(decision)
        return missing

    def _stored_but_unlisted(self, job: Job, answer: Answer) -> Decision | None:
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
            return self.filing.fail(job, reason, answer=answer, counts={verify.UNLISTED: count})
        reason = f"{said}; it is sent again"
        return self.filing.retry_later(
            job, reason, answer=answer, counted=counters.FILE, counts={verify.UNLISTED: count}
        )

    def _hold_unverified(self, stored: list[Job], reason: str, asked: float) -> None:
        """The archive cannot be asked (since ``asked``): hold the destination; the stored
        files wait in the queue (neither sent/ nor failed/) and are sent and verified again
        afterwards."""
        name = self.destination.name
        hold = self.queue.holds().get(name)
        delay = self.policy.next_delay(hold.failures if hold else 0)
        why = f"cannot verify what it stored: {reason}"
        until = self.queue.hold(name, until=self.clock() + delay, reason=why, began=asked).until
        delay = max(0.0, until - self.clock())
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

    def _decide(self, job: Job, verdict: Verdict, answer: Answer) -> Decision | None:
        """What becomes of one file by its verdict: a ``Decision`` when its file is to be
        moved (sent/ or failed/); else it waits in the queue (None)."""
        if verdict.outcome is StowOutcome.SENT:
            note = None
            if verdict.reason:  # a WarningReason: stored, with a note in the queue
                log.warning("%s: %s", job.path, verdict.reason)
                note = f"{STORED_WITH_WARNING} {verdict.code or 0:04X}"
            return Decision(job, self.config.source(job.source), "sent", note=note)
        if verdict.outcome is StowOutcome.ALREADY:
            log.info("%s: %s; settled as stored", job.path, verdict.reason)
            return Decision(job, self.config.source(job.source), "sent", note=ALREADY_STORED)
        if verdict.outcome is StowOutcome.FAILED:
            return self.filing.fail(job, verdict.reason, verdict=verdict, answer=answer)
        if _doubtful(verdict):
            return self._doubtful_refusal(job, verdict, answer)
        if verdict.outcome is StowOutcome.ISOLATE and answer.status == 413:
            self.queue.release([job.id])  # sent again in the smaller batches
        elif verdict.outcome is StowOutcome.ISOLATE:
            self.queue.isolate([job.id])
        else:
            return self.filing.retry_later(job, verdict.reason, verdict=verdict, answer=answer)
        return None

    def _doubtful_refusal(self, job: Job, verdict: Verdict, answer: Answer) -> Decision | None:
        """A refusal that may be transient but may as well be permanent: tried again with
        the normal backoff; the ``retry.max_refusals``-th such refusal fails the file.  The
        count is kept in its error document (the queue), so it survives restarts.  Only a
        refusal of a request that was alone on the wire counts: a busy archive refuses for
        contention too (tiny_pacs answers 0110 when its SQLite index is locked by another
        request).  Those are counted on their own, against ``CROWDED_FACTOR`` times the
        limit, so that a permanent refusal fails even where requests always overlap."""
        if not self._alone:
            return self._crowded_refusal(job, verdict, answer)
        n, limit = refusals_so_far(job) + 1, self.config.retry.max_refusals
        return self._counted_refusal(
            job,
            verdict,
            answer,
            counts={REFUSALS: n},
            limit=limit,
            again=f"{verdict.reason} (refusal {n} of at most {limit})",
            final=f"the archive refused this file {n} times (retry.max_refusals: {limit})",
        )

    def _crowded_refusal(self, job: Job, verdict: Verdict, answer: Answer) -> Decision | None:
        """A doubtful refusal while other requests were in flight: ``CROWDED_FACTOR`` times
        ``retry.max_refusals`` of them fail the file."""
        n = counted_in_error(job, CROWDED) + 1
        limit = CROWDED_FACTOR * self.config.retry.max_refusals
        return self._counted_refusal(
            job,
            verdict,
            answer,
            counts={CROWDED: n},
            limit=limit,
            again=(
                f"{verdict.reason} (not counted: other requests were in flight), {n} such "
                f"refusals of at most {limit}"
            ),
            final=(
                f"the archive refused this file {n} times while other requests were in "
                f"flight ({CROWDED_FACTOR} times retry.max_refusals)"
            ),
        )

    def _counted_refusal(
        self,
        job: Job,
        verdict: Verdict,
        answer: Answer,
        *,
        counts: dict[str, int],
        limit: int,
        again: str,
        final: str,
    ) -> Decision | None:
        """What ``_doubtful_refusal`` and ``_crowded_refusal`` share: the file waits (reason
        ``again``) while its one count in ``counts`` (kept in its error document) is below
        ``limit``; at the limit it fails with ``final``, the refusal and the advice."""
        [count] = counts.values()
        if count < limit:
            return self.filing.retry_later(
                job, again, verdict=verdict, answer=answer, counts=counts
            )
        reason = (
            f"{final}: {verdict.reason}; stowd does not send it again: "
            f"{refusal_advice(verdict.code)}"
        )
        return self.filing.fail(job, reason, verdict=verdict, answer=answer, counts=counts)

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


def _limit_of(destination: Destination, given: Concurrency | None) -> Concurrency | None:
    """The concurrency limit of ``destination``'s wire: none unless ``adaptive``."""
    if not destination.adaptive:
        return None
    return given if given is not None else concurrency.of(destination)


def _uncount_unverified(
    tally: dict[str, int], unsettled: list[StowOutcome], unlisted: set[str] | None
) -> None:
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


def _doubtful(verdict: Verdict | None) -> bool:
    """A refusal that may or may not pass later (``stow.is_counted``)."""
    if verdict is None or verdict.code is None or verdict.outcome is not StowOutcome.RETRY:
        return False
    return is_counted(verdict.code)


def _dropped_reason(drops: int) -> str:
    return (
        f"the archive drops the connection whenever this file is sent: it closed the "
        f"connection without answering {drops} times when the file was sent alone (the "
        "archive may crash on it; check its log); stowd does not send it again"
    )


def _preparing(job: Job) -> str:
    """What was being done to the file when it was prepared for sending."""
    if job.kind != "dicom":
        return "making the DICOM instance"
    if job.change_set() is None:  # copied only to convert it (transcode: explicit-vr)
        return "converting it to Explicit VR Little Endian"
    return "applying the metadata rules"


def media_of(job: Job) -> Media:
    """What the file holds, read again (its headers only) when it is sent."""
    media = detect(Path(job.path))
    if media.kind != job.kind:
        raise FileVanished("the file was replaced by another kind of file", path=job.path)
    return media


def lease(destination: Destination) -> float:
    """How long a sender's claim of a batch lasts: its upload's deadlines, and slack."""
    answer = answer_seconds(destination.timeouts.read)  # a whole answer's deadline
    return destination.timeouts.write + answer + LEASE_SLACK


def _drops(job: Job) -> int:
    """How many times the archive dropped the connection of a request that sent ``job``
    alone, so far (kept in its error document while it waits)."""
    return counted_in_error(job, DROPS)


def _answer_was_lost(job: Job) -> bool:
    """Was ``job`` sent before without an answer saying it was not stored (no answer at
    all, or a 500/502/504 of a server or gateway that may have stored it first)?  The
    archive may then hold the instance from stowd's own request: ``duplicates: fail``
    does not flag that one."""
    if job.attempts == 0:
        return False
    try:
        doc = json.loads(job.error or "{}")
    except ValueError:
        return False
    if not isinstance(doc, dict) or doc.get("failure_reason") is not None:
        return False
    return doc.get("http_status") in (None, 500, 502, 504)
