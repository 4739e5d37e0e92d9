"""``stowd migrate``: a one-shot bulk upload of existing folder trees, then exit.

Each SRC folder becomes a source of its own (``migrate-<folder>-<hash of its path>``, the
same name on every run, ``-move`` added without ``keep``) with the config's top-level rules,
sending to ``--destination``.  The files go through the daemon's queue, classify, rules,
grouping, retries and settling; only the finding is different: one lazy walk
(``Watcher.scan``, chunks of 500 queued while the workers already send) without a quiet
period, since the files are old.

The source name is how each row remembers whether its file is moved: the rows of one mode
are never settled by a run in the other, and a run refuses to start while the other mode's
run of the same SRC is unfinished (its rows would be parked, and their files neither queued
again nor sent).

Where files go afterwards: stored ones to ``SRC.sent/`` and failed ones to ``SRC.failed/``
(beside SRC, sub-folders kept, an ``.error.json`` next to each failed file), or with
``keep`` nowhere: the source stays byte-identical and the queue remembers what was stored
(state ``sent``, outcome ``kept``), so a re-run skips those files (same path, size and
mtime) and tries the failed ones again.

What it tells (progress, summary, report) is ``migreport``'s.

Resuming is the queue's business: claims of a killed run go back to pending, moves it left
half done are finished, queued rows stay queued and are not queued twice.

Several hosts on one shared (PostgreSQL) queue: one node walks each source (a walk lease in
the queue, renewed by the fleet thread while it walks; ``Queue.take_walk``), the others
send what it queues; a node whose walker died (its walk lease ran out) takes the walk over
and walks the source again from the top (files queued or stored are not queued again).
Every node ends once each source was walked to its end (by whichever node) and none of its
files is left pending, claimed or being moved; each reports the whole run, counted from the
run's start as the queue recorded it (the walk's), with what each node stored.  Each node
also takes over the claims of a node that died (``Queue.reclaim``, every third of the lease,
as the daemon).  With SQLite there is one node: it always walks, the run begins with it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from stowd.commands.migreport import (
    Summary,
    active,
    failed_entry,
    held_note,
    progress,
    progress_bar,
    progress_line,
    unmoved_entry,
    unreadable_entry,
)
from stowd.config.model import Config, Source
from stowd.config.schedule import Schedule, local_now, paused_note
from stowd.config.yamlwalk import host_port
from stowd.dicomweb.pacing import Bucket, Pacing
from stowd.dicomweb.stow import StowClient
from stowd.errors import MigrationConflict, QueueError, StowdError
from stowd.pipeline.lookup import Finder
from stowd.pipeline.loop import Stop, Stops
from stowd.pipeline.metadata import clear_spool, digest
from stowd.pipeline.queue import Hold, Job, NewFile, Walk, open_queue
from stowd.pipeline.reader import Reader
from stowd.pipeline.settle import repair
from stowd.pipeline.verify import Tally
from stowd.pipeline.watch import Watcher
from stowd.pipeline.worker import Worker, lease
from stowd.printable import escape
from stowd.service import inflight, web
from stowd.service.fleet import Fleet

log = logging.getLogger("stowd.migrate")

TICK = 0.1  # how often the run looks whether it is done (more when counting is slow)
QUERY_SHARE = 10  # wait at least 10 times as long as counting the rows took
RESETTLE_EVERY = 60.0
# The senders start once the walk has queued its first chunk (or ended), so that their first
# look finds work instead of waiting out an idle poll; at most this long, so that files an
# earlier run left queued are not held back by a slow walk.
FIRST_CHUNK_WAIT = 1.0
EXIT_SECOND_SIGNAL = 130
TERMINAL_WIDTH = 80  # when the terminal does not say
RECLAIM_EVERY = 60.0  # a shared queue: at most; every third of the lease when shorter


class _WalkLost(Exception):
    """Another node took this node's walk over (its lease ran out): this one stops walking."""


@dataclass(frozen=True)
class Options:
    folders: tuple[Path, ...]
    destination: str
    keep: bool = False
    progress_every: float = 10.0
    tty: bool = False
    verify: bool = False  # --verify: as the destination's verify: true
    now: bool = False  # --now: send at once, whatever the destination's schedule says


def source_name(folder: Path, keep: bool) -> str:
    """A name that stays the same for the same folder and mode, run after run (with ``keep``
    the name of the first version, which had no other mode in the name)."""
    tag = hashlib.sha256(str(folder).encode()).hexdigest()[:6]
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", folder.name or "root")[:40]
    return f"migrate-{base}-{tag}" + ("" if keep else "-move")


def make_sources(config: Config, opts: Options) -> tuple[Source, ...]:
    """One source per folder: no quiet period, no sidecars, the top-level rules only; an
    image cut short fails at once (nobody is still writing the folders' files)."""
    sources = []
    for folder in opts.folders:
        sources.append(
            Source(
                name=source_name(folder, opts.keep),
                watch=folder,
                sent=folder.with_name(folder.name + ".sent"),
                failed=folder.with_name(folder.name + ".failed"),
                destination=opts.destination,
                quiet_period=0.0,
                incomplete_wait=0.0,
                keep=opts.keep,
            )
        )
    return tuple(sources)


class Pauses:
    """How long the run's destination has been held (not answering, or refusing the login):
    the rates and the ETA leave that time out, so that an archive that is down does not make
    the ETA grow."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.done = 0.0  # seconds of the holds that ended
        self.hold: Hold | None = None  # the hold now, if any
        self.since: float | None = None  # when the hold now began to count
        self.carried = 0  # failed tries of a hold left by an earlier run, when the run began

    def carry(self, hold: Hold | None) -> None:
        """The hold an earlier run left (the archive may be back: the first try tells)."""
        self.carried = 0 if hold is None else hold.failures

    def update(self, hold: Hold | None, now: float) -> None:
        """Seen at ``now``: the destination is held (``hold``) or not (None)."""
        if hold is None:
            self.done += 0.0 if self.since is None else now - self.since
            self.since, self.carried = None, 0
        elif self.since is None:
            self.since = self._began(hold, now)
        self.hold = hold

    def _began(self, hold: Hold, now: float) -> float | None:
        """A hold of this run counts from its start; one left by an earlier run only once a
        try of this run failed too (then from the run's start), not while the first try,
        which may well succeed, is under way."""
        if hold.since >= self.started:
            return min(hold.since, now)
        return self.started if hold.failures > self.carried else None

    def answering(self, now: float) -> float:
        """The run's seconds so far without the time the destination was held."""
        held = self.done + (now - self.since if self.since is not None else 0.0)
        return max(0.0, now - self.started - held)


class Migration:
    """Scan, send and settle until every file of the folders is done (or a signal)."""

    def __init__(self, config: Config, opts: Options, out: TextIO = sys.stderr) -> None:
        self.opts = opts
        self.sources = make_sources(config, opts)
        self.names = [s.name for s in self.sources]
        # the report covers the folders' files whichever mode failed them
        self.all_names = self.names + [source_name(f, not opts.keep) for f in opts.folders]
        self.config = replace(config, sources=config.sources + self.sources)
        self.config = _verifying(self.config, opts)
        self.config = _unscheduled(self.config, opts)
        self.schedule = self.config.destinations[opts.destination].schedule
        # the status page (http.listen) while it runs; its folders are runs there, not sources
        self.page_config = replace(self.config, sources=config.sources)
        self.page: web.Server | None = None
        self.paused = Paused()  # the time outside the destination's windows (no rate)
        self.verified = Tally()  # the stored files the archive listed, or did not
        self.queue = open_queue(config)
        self.stop: threading.Event = Stop()  # wakes the idle workers when set
        self.scanned = threading.Event()
        self.walking = threading.Event()  # set once the walk queued its first chunk, or ended
        self.skipped = 0
        self.unsettled: set[int] = set()
        self.repairing: set[int] = set()  # the moves the repair at start finishes
        self.move_problems: dict[int, OSError] = {}  # why each stuck move failed last
        self.finder: Finder | None = None  # made with the workers, closed after them
        self.senders: list[Worker] = []  # their requests in flight: status and the page
        self.shared: dict[str, Any] | None = None  # what the state file last said
        self.scan_errors: list[tuple[str, OSError]] = []  # folders/files that cannot be read
        self.signals = Stops()
        self.crashed = False
        self.out = out
        self.started = time.time()  # the run's start: this host's, or the queue's (walks)
        self.pauses = Pauses(self.started)
        # a shared queue: this node's leases renewed while it sends, and its walk lease
        # while it walks, on a thread of their own (None: SQLite)
        self.fleet = Fleet.of(self.config, self.queue, self._held, also=self._renew_walk)
        self.walk: Walk | None = None  # the walk this node does now (renewed by ``fleet``)
        self.walk_skipped = 0  # files the walk now skipped as stored before
        self.walk_lost = threading.Event()  # another node took ``walk`` over
        # ``walk`` renewed, and ``walk`` ended, one at a time: a renewal that read the walk
        # before its end would else find it ended and take it for taken over
        self._walk_lock = threading.Lock()
        self._walk_failing = False  # a renewal of the walk failed (said once)

    # -- signals ------------------------------------------------------------------------
    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, _signum: int, _frame: FrameType | None) -> None:
        if self.signals.at_once():
            os.write(2, b"stowd migrate: second signal, exiting now; a re-run continues\n")
            os._exit(EXIT_SECOND_SIGNAL)
        self.stop.set()

    # -- the run ------------------------------------------------------------------------
    def run(self) -> Summary:
        """Raises ``QueueError`` when the queue cannot be used (another stowd holds it)."""
        self.queue.open()
        self.started = self.pauses.started = self.queue.clock()  # the clock of the queue's times
        self._serve_page()
        try:
            self.pauses.carry(self.queue.holds().get(self.opts.destination))
            self._refuse_other_mode()
            self._recover()
            self._say_paused()
            threads = self._start()
            self._wait()
            self._finish(threads)
            return self._summary()
        finally:
            if self.fleet is not None:
                self.fleet.close()
            if self.page is not None:
                self.page.close()
            inflight.remove(self.config.queue)
            self.queue.close()

    def _serve_page(self) -> None:
        """The status page (``http.listen``) shows the run while it goes on.  A listener that
        cannot be bound (a daemon on another queue serves it) leaves the run without it."""
        try:
            self.page = web.start(self.page_config)
        except StowdError as exc:
            log.warning("%s; the migration goes on without it", exc)
        if self.page is not None:
            where = host_port(self.page.host, self.page.port)
            print(f"stowd migrate: its status page is at http://{where}/", file=self.out)

    def _refuse_other_mode(self) -> None:
        """Raises ``MigrationConflict`` when a run of a SRC in the other mode is unfinished:
        resuming it in this mode would move files a ``keep`` run promised to leave alone (or
        leave its files queued where neither mode sends them)."""
        others = {source_name(f, not self.opts.keep): f for f in self.opts.folders}
        for name, count in self.queue.active_of(list(others)).items():
            mode = "with --keep" if self.opts.keep else "without --keep"
            other = "without --keep" if self.opts.keep else "with --keep"
            raise MigrationConflict(
                f"{count} file(s) of an unfinished migration of {others[name]} {other} are "
                f"still queued; this run is {mode}.  Finish that one first: run it again "
                f"{other} (once it is done, a run {mode} skips the files it stored)"
            )

    def _recover(self) -> None:
        returned = self.queue.recover()
        self.queue.adopt({s.name: s.destination for s in self.config.sources})
        sources = {s.name: s for s in self.config.sources}
        # the fleet thread first: the repair's moves are renewed while it makes them
        self.repairing = {j.id for j in self.queue.settling()}
        if self.fleet is not None:
            self.fleet.start()
        try:
            _, self.unsettled = repair(self.queue, sources=sources, problems=self.move_problems)
        finally:
            self.repairing = set()
        clear_spool(self.config)
        for source in self.sources:
            self.queue.replan(source.name, digest(self.config, source))
        if returned:
            log.info("%d upload(s) interrupted by the last run are sent again", returned)

    def _start(self) -> tuple[list[threading.Thread], list[StowClient]]:
        """The walk first, then (once it queued its first chunk) the reader and senders."""
        scan = threading.Thread(target=self._scan, name="scan", daemon=True)
        scan.start()
        self.walking.wait(FIRST_CHUNK_WAIT)
        threads, clients = self._senders()
        return [*threads, scan], clients

    def _senders(self) -> tuple[list[threading.Thread], list[StowClient]]:
        dest = self.config.destinations[self.opts.destination]
        pacing = Pacing(Bucket(dest.max_rate), self.stop)  # max_rate, as stowd run
        client = StowClient(dest, stop=self.stop, pacing=pacing)
        self.finder = Finder(self.config, self.queue)  # one lookup client for all workers
        lock = threading.Lock()
        threads = []
        for n in range(dest.workers):
            worker = Worker(
                self.config,
                self.queue,
                dest,
                client,
                self.stop,
                unsettled=self.unsettled,
                classify_lock=lock,
                finder=self.finder,
                verified=self.verified,
                claiming=None if self.fleet is None else self._claiming,
            )
            threads.append(threading.Thread(target=worker.run, name=f"send-{n}", daemon=True))
            self.senders.append(worker)
        reader = Reader(  # only reads new files, so that no upload waits for their headers
            self.config,
            self.queue,
            self.stop,
            name=dest.name,
            max_step=lease(dest),
            unsettled=self.unsettled,
            classify_lock=lock,
            finder=self.finder,
        )
        threads.append(threading.Thread(target=reader.run, name="read-new", daemon=True))
        for thread in threads:
            thread.start()
        return threads, [client]

    def _held(self) -> set[int]:
        """The rows this run holds (its senders' claims and settles, its retried moves, the
        moves the repair at start makes)."""
        held = self.unsettled | self.repairing
        for worker in list(self.senders):
            held |= worker.held
        return held

    def _claiming(self) -> bool:
        return self.fleet is None or self.fleet.claiming

    def _scan(self) -> None:
        try:
            self._walk()
        finally:
            self.walking.set()

    def _walk(self) -> None:
        try:
            for source in self.sources:
                if not self._walk_source(source):
                    return  # stopped
        except Exception:
            log.exception("unexpected error while scanning; stopping the migration")
            self.crashed = True
            self.stop.set()
            return
        if not self.stop.is_set():
            self.scanned.set()

    def _walk_source(self, source: Source) -> bool:
        """Walk ``source``, or wait until another node has walked it (taking the walk over
        if that node dies); False when stopped first."""
        run: float | None = None  # the start of the run this node joined (another walks)
        while not self.stop.is_set():
            try:
                walk = self.queue.take_walk(source.name, self.config.lease, run)
            except QueueError as exc:
                log.warning("cannot look at the walk of %s: %s; trying again", source.name, exc)
                self.stop.wait(self._walk_poll())
                continue
            self.started = min(self.started, walk.started)
            if walk.mine:
                if self._walk_one(source, walk):
                    return True
                continue  # taken over by another node: it walks, this one sends
            if walk.walked is not None:
                return True
            if run is None:
                self._say(f"node {self.config.node} sends; node {walk.node} walks {source.watch}")
            run = walk.started
            self.walking.set()  # another node walks: the senders may start
            self.stop.wait(self._walk_poll())
        return False

    def _walk_one(self, source: Source, walk: Walk) -> bool:
        """Walk ``source`` to its end holding ``walk``; False when another node took it
        over meanwhile (or on a stop)."""
        if self.fleet is not None:
            self._say(f"node {self.config.node} walks {source.watch}")
        self.walk_skipped = 0
        with self._walk_lock:
            self.walk_lost.clear()
            self.walk = walk
        watcher = Watcher(
            source, source.destination, self._sink, exclude=self._own(), on_error=self._unreadable
        )
        try:
            watcher.scan(self.stop)
        except _WalkLost:
            self._leave_walk(None)
            return False
        except BaseException:
            self._leave_walk(None)
            raise
        return self._leave_walk(None if self.stop.is_set() else source.name)

    def _leave_walk(self, end: str | None) -> bool:
        """This node walks no more; given ``end`` (a source's name), the walk of it ended in
        the queue (True), both at once for the fleet thread's renewal (``_renew_walk``)."""
        with self._walk_lock:
            self.walk = None
            return end is not None and self.queue.end_walk(end, self.walk_skipped)

    def _say(self, text: str) -> None:
        """Which node walks, on the progress's stream (one line, a terminal's bar redrawn)."""
        print(f"stowd migrate: {escape(text)}", file=self.out, flush=True)

    def _walk_poll(self) -> float:
        """How often a node that does not walk looks whether the walker still lives."""
        return max(TICK, self.config.lease / 3)

    def _unreadable(self, path: str, exc: OSError) -> None:
        """A folder or file the scan cannot read: a failure (its files are not sent)."""
        self.scan_errors.append((path, exc))

    def _own(self) -> tuple[Path, ...]:
        q = str(self.config.queue)
        files = (Path(q + s) for s in ("", "-wal", "-shm", "-journal", ".lock"))
        return (*files, self.config.spool)

    def _sink(self, files: list[NewFile]) -> int:
        """Queue a chunk of found files, minus those a run before stored with this content,
        and minus the SRC.sent/SRC.failed of a migration of a sub-folder done before."""
        if self.walk_lost.is_set():
            raise _WalkLost
        files = [f for f in files if not _in_migrate_output(f.rel)]
        done = self.queue.finished_before(files)
        self.skipped += len(done)
        self.walk_skipped += len(done)
        added = self.queue.enqueue([f for f in files if f.path not in done])
        if added:
            self.walking.set()  # the senders may start: there is work for them
        return added

    def _wait(self) -> None:
        """Until everything is done, a signal came or the scan crashed (``stop``)."""
        next_line = time.monotonic() + self.opts.progress_every
        next_resettle = time.monotonic() + RESETTLE_EVERY
        next_state = time.monotonic()
        next_reclaim = time.monotonic() + self._reclaim_every()
        tick = TICK
        while not self.stop.wait(tick):
            began = time.monotonic()
            if began >= next_state:
                self._share_state()
                next_state = began + inflight.WRITE_EVERY
            if self.fleet is not None and began >= next_reclaim:
                self._reclaim()
                next_reclaim = began + self._reclaim_every()
            self.pauses.started = self.started  # the run's (another node may have begun it)
            tally = self.queue.run_tally(self.names, self.started)
            self._update_pauses(self.queue.clock())
            # counting a million rows takes a while: look less often, never hog the queue
            tick = max(TICK, QUERY_SHARE * (time.monotonic() - began))
            if self.scanned.is_set() and self._nothing_left(tally):
                return
            now = time.monotonic()
            if self.opts.tty:
                self._show(tally, end="\r")
            elif now >= next_line:
                self._show(tally)
                next_line = now + self.opts.progress_every
            if self.unsettled and now >= next_resettle:
                self._resettle()
                next_resettle = now + RESETTLE_EVERY

    def _renew_walk(self) -> None:
        """Keep this node's walk lease (if it walks); a walk another node took over (this
        node was too long away from the database) is given up: that node walks it."""
        with self._walk_lock:  # the walk is not ended meanwhile (``_leave_walk``)
            walk = self.walk
            if walk is None or self.fleet is None:
                return
            try:
                renewed = self.queue.renew_walk(walk.source, self.config.lease, self.walk_skipped)
            except QueueError as exc:
                if not self._walk_failing:  # said once, as the fleet says it lost the database
                    log.warning("cannot renew the walk of %s: %s", walk.source, exc)
                self._walk_failing = True
                return
            if self._walk_failing:
                log.info("the walk of %s is renewed again", walk.source)
            self._walk_failing = False
            if renewed:
                return
            log.warning("another node took the walk of %s over; this node only sends", walk.source)
            self.walk_lost.set()

    def _reclaim(self) -> None:
        """Another node's claims whose lease ran out (it died, or lost the database) go back
        to pending, sent by whichever node claims them; its moves are finished here."""
        try:
            returned = self.queue.reclaim(self._held())
        except QueueError as exc:
            log.warning("cannot look for claims to take over: %s", exc)
            return
        if returned:
            log.warning("%d claimed file(s) no node holds any more are queued again", returned)
        adopted, self.queue.adopted = self.queue.adopted, set()
        if adopted:
            self.unsettled |= adopted
            self._resettle()

    def _reclaim_every(self) -> float:
        return min(RECLAIM_EVERY, self.config.lease / 3)

    def _share_state(self) -> None:
        """Tell ``stowd status`` and the status page which requests are in flight (as the
        daemon does), when that changed."""
        requests = inflight.in_flight((w.destination.name, w.in_flight) for w in self.senders)
        if requests == self.shared:
            return
        doc = inflight.document(os.getpid(), time.time(), requests)
        if inflight.publish(self.config.queue, doc):
            self.shared = requests

    def _say_paused(self) -> None:
        """Outside the destination's windows at the start: say so before anything else."""
        note = paused_note(self.schedule, local_now())
        if note is None:
            return
        windows = ", ".join(w.text for w in self.schedule.windows)
        print(
            f"stowd migrate: destination {self.opts.destination}: {note}: outside its "
            f"transfer windows ({windows}) nothing is sent; the files are found, read and "
            "queued now and sent once it opens (--now sends at once)",
            file=self.out,
            flush=True,
        )

    def _update_pauses(self, now: float) -> None:
        """The destination held, or outside its windows, as seen at ``now``."""
        self.pauses.update(self.queue.holds().get(self.opts.destination), now)
        local = local_now()
        note = paused_note(self.schedule, local)
        opens = None if note is None else self.schedule.next_open(local)
        when = None if opens is None else opens.timestamp()
        self.paused.update(note, self.pauses.since is not None, now, opens=when)

    def _nothing_left(self, tally: dict[str, tuple[int, int]]) -> bool:
        """Every file is done, or all that is left are moves that keep failing (disk full,
        permissions): tried once more, then they end the run as failures, not a hang."""
        left = active(tally)
        if not left:
            return True
        if tally.get("settling", (0, 0))[0] != left or len(self._stuck()) != left:
            return False
        self._resettle()
        return active(self.queue.run_tally(self.names, self.started)) == len(self._stuck())

    def _stuck(self) -> list[Job]:
        """This run's rows whose move to SRC.sent/SRC.failed failed and is not done yet."""
        rows = self.queue.settling()
        return [j for j in rows if j.source in self.names and j.id in self.unsettled]

    def _resettle(self) -> None:
        ids = set(self.unsettled)
        sources = {s.name: s for s in self.config.sources}
        _, stuck = repair(self.queue, only=ids, sources=sources, problems=self.move_problems)
        self.unsettled.difference_update(ids - stuck)

    def _finish(self, started: tuple[list[threading.Thread], list[StowClient]]) -> None:
        threads, clients = started
        self.stop.set()
        deadline = time.monotonic() + self.config.shutdown_timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for client in clients:
            client.close()
        if self.finder is not None:
            self.finder.close()

    def _show(self, tally: dict[str, tuple[int, int]], end: str = "\n") -> None:
        at = self.queue.clock()
        seconds = max(0.0, self.pauses.answering(at) - self.paused.seconds)
        errors = len(self.scan_errors)
        hold = self.pauses.hold
        held = None if hold is None else held_note(hold, at, self.paused.opens)
        scanned = self.scanned.is_set()
        now = progress(tally, self.skipped, seconds, scanned, errors, held=held)
        now = replace(now, paused=self.paused.note)
        line = progress_line(now)
        if self.opts.tty:  # one line redrawn in place: never wider than the terminal
            width = self._width() - 1
            line = "\r" + progress_bar(now)[:width].ljust(width)
        print(line, end=end, file=self.out, flush=True)

    def _width(self) -> int:
        try:
            return os.get_terminal_size(self.out.fileno()).columns or TERMINAL_WIDTH
        except (OSError, ValueError):
            return TERMINAL_WIDTH

    def _summary(self) -> Summary:
        tally = self.queue.run_tally(self.names, self.started)
        self._show(tally)  # the last state, also on a terminal (where it ends the line)
        failures = [
            *self._failed(),
            *(unmoved_entry(j, self.move_problems.get(j.id)) for j in self._stuck()),
            *(unreadable_entry(path, exc) for path, exc in self.scan_errors),
        ]
        seconds = self.queue.clock() - self.started
        interrupted = self.signals.count > 0 and not self.crashed
        walks = self.queue.walks(self.names)
        skipped = sum(w.skipped for w in walks) if walks else self.skipped
        summary = Summary(tally, skipped, seconds, interrupted, self.crashed, failures)
        summary.already = self.queue.run_already(self.names, self.started)
        if self.fleet is not None:
            summary.nodes = self.queue.run_nodes(self.names, self.started)
            summary.walkers = sorted({w.node for w in walks})
        if self.config.destinations[self.opts.destination].verify:
            summary.verified = self.verified.listed
            summary.unlisted = self.verified.unlisted
        return summary

    def _failed(self) -> list[dict[str, Any]]:
        """The folders' files that failed, in this run or before, and still lie where the
        migration left them (SRC.failed, or SRC with keep): fixed ones put back into SRC
        were queued again, and ones the administrator deleted are no longer reported."""
        found = []
        for row in self.queue.last_failures(self.all_names):
            now_at = row.target or row.path
            if os.path.lexists(now_at):
                kind = "failed" if row.done_at >= self.started else "failed_before"
                found.append(failed_entry(row, now_at, kind))
        return found


def _verifying(config: Config, opts: Options) -> Config:
    """``config`` with ``--verify`` applied to the run's destination."""
    dest = config.destinations.get(opts.destination)
    if not opts.verify or dest is None or dest.verify:
        return config
    destinations = {**config.destinations, dest.name: replace(dest, verify=True)}
    return replace(config, destinations=destinations)


# -- schedule (transfer windows) --
class Paused:
    """How long the run was outside its destination's transfer windows (and not held,
    which ``Pauses`` counts): the rates and the ETA leave that time out as well."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.note: str | None = None  # "paused until Mon 19:00 (schedule)", while paused
        self.opens: float | None = None  # when the next window opens, while paused
        self._last: float | None = None  # when it was last seen

    def update(self, note: str | None, held: bool, now: float, opens: float | None = None) -> None:
        """Seen at ``now``: paused (``note``, until ``opens``) or not; time already counted
        as held is not counted twice."""
        if self.note is not None and not held and self._last is not None:
            self.seconds += max(0.0, now - self._last)
        self.note, self.opens, self._last = note, opens, now


def _unscheduled(config: Config, opts: Options) -> Config:
    """``config`` without the run's destination's schedule, with ``--now``."""
    dest = config.destinations.get(opts.destination)
    if not opts.now or dest is None or dest.schedule.always:
        return config
    destinations = {**config.destinations, dest.name: replace(dest, schedule=Schedule())}
    return replace(config, destinations=destinations)


def _in_migrate_output(rel: str) -> bool:
    """``rel`` lies in a ``X.sent`` or ``X.failed`` folder: what migrating a sub-folder ``X``
    before left beside it.  Those files were already handled: never sent again."""
    parts = rel.split("/")[:-1]
    return any(part.endswith((".sent", ".failed")) for part in parts)
