"""The running daemon: threads, signals, systemd notifications, reload and lifecycle.

One watcher thread per source, ``workers`` sender threads per destination (together a
*generation*, built from one config), and the main thread that keeps them alive, tells systemd
how things are and does housekeeping.  Signal handlers only set flags; every wait is
``Event.wait(t)``.

* SIGTERM/SIGINT: no new work is taken, requests in flight may finish for ``shutdown_timeout``
  seconds, and whatever is still claimed returns to the queue at the next start.  A second
  signal exits at once.
* SIGHUP: the config file is read again.  An invalid one is refused (each problem logged) and
  the running generation goes on.  A valid one replaces the generation: its threads stop
  between batches (uploads in flight finish, for up to ``shutdown_timeout``; one still running
  then completes in the background with the old settings), and new threads start with the new
  sources, rules and destinations.  Queued work stays in the queue: nothing is lost or re-sent.
  A destination's new ``max_rate`` applies at once, to its uploads in flight too (one token
  bucket per destination name lives as long as the daemon: ``pacing.Buckets``).
* systemd (``Type=notify``): READY=1 once the queue is open and the watchers run, STATUS= a
  line of counts, WATCHDOG=1 only while every thread is alive and making progress,
  RELOADING=1 and STOPPING=1.
* A full disk (the queue, the spool, a sent/ or failed/ folder) is logged once when it starts
  and once when it ends, and shown in STATUS=; the watchdog is still fed (a restart frees no
  space, and a restart loop would hide the reason): the threads wait and try again.
* A destination outside its transfer windows (``schedule``) is logged once when it pauses
  and once when it opens; its senders keep looping (and beating), claiming nothing new.
* A reload whose config the queue cannot take yet (a database away): the senders claim
  nothing new until it has; it is tried again each second (a thread of its own), logged
  once when it starts and once when it ends, and shown in STATUS=.
* A thread that dies is started again; one that died ``RESTART_LIMIT`` times within
  ``RESTART_WINDOW`` is reported (log, STATUS=, ``stowd status``) and the watchdog is no longer
  fed, so that systemd restarts stowd.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType

from stowd.config.load import load_config
from stowd.config.model import Config, Destination, Source
from stowd.config.schedule import local_now, paused_note
from stowd.dicomweb.pacing import Buckets, Pacing, rate_text
from stowd.dicomweb.stow import StowClient
from stowd.errors import ConfigError, QueueError, QueueFull, StowdError
from stowd.pipeline import counters, disk
from stowd.pipeline.concurrency import Concurrency, Limits
from stowd.pipeline.disk import Disks
from stowd.pipeline.lookup import Finder
from stowd.pipeline.loop import Stop, Stops
from stowd.pipeline.metadata import clear_spool, digest
from stowd.pipeline.queue import OPEN_MARK, Queue, open_queue
from stowd.pipeline.reader import Reader
from stowd.pipeline.settle import repair
from stowd.pipeline.watch import Watcher
from stowd.pipeline.worker import Worker
from stowd.service import inflight, metrics, web
from stowd.service.fleet import Fleet
from stowd.service.notify import Notifier
from stowd.service.pinning import Pinning
from stowd.service.purge import purge_sent
from stowd.service.receivers import Receivers
from stowd.service.status import short_line

log = logging.getLogger("stowd")

HOUSEKEEPING_EVERY = 3600.0
RESETTLE_EVERY = 60.0
STATUS_EVERY = 10.0
TICK = 1.0
KEEPALIVE = 5.0  # how often a reload that waits for uploads tells systemd it is alive
EXIT_SECOND_SIGNAL = 1
WATCHER_STALL = 300.0  # a watcher without progress this long is stuck (a hung share)
WORKER_SLACK = 60.0  # beyond the longest step a worker may take
RECLAIM_EVERY = 60.0  # claims whose lease ran out, and no worker holds, return to pending
RESTART_LIMIT = 5  # a thread that died more often than this within RESTART_WINDOW
RESTART_WINDOW = 600.0  # seconds: is reported, and the watchdog is no longer fed


@dataclass
class Generation:
    """The threads that run one config."""

    config: Config
    stop: threading.Event = field(default_factory=Stop)  # wakes its idle workers when set
    classify_lock: threading.Lock = field(default_factory=threading.Lock)
    clients: dict[str, StowClient] = field(default_factory=dict)
    finder: Finder | None = None  # the lookups of its workers (one HTTP client per archive)
    senders: list[Worker] = field(default_factory=list)
    reader: Reader | None = None  # reads new files, so that no upload waits for their headers
    watchers: list[Watcher] = field(default_factory=list)
    threads: dict[str, tuple[threading.Thread, Callable[[], None]]] = field(default_factory=dict)

    @property
    def workers(self) -> list[Worker | Reader]:
        """The senders and the reader: the threads that work the queue (watched)."""
        return [*self.senders, *([self.reader] if self.reader is not None else [])]

    def busy(self) -> list[str]:
        return [name for name, (thread, _) in self.threads.items() if thread.is_alive()]


class Daemon:
    """Owns the queue and the current generation of watchers and workers."""

    def __init__(
        self, config: Config, notifier: Notifier | None = None, pinning: Pinning | None = None
    ) -> None:
        self.config = config
        # ``cpu:`` (issue 19): pinned at start by ``stowd run`` (before the threads), again
        # at a reload that changes it
        self.pinning = pinning or Pinning()
        self.stop = threading.Event()
        self.queue = open_queue(config)
        self.notifier = notifier or Notifier()
        self.signals = Stops()
        self.last_signal: int | None = None
        self.reload_requested = False
        self.generation = Generation(config)
        self.lingering: list[Generation] = []  # replaced by a reload, a thread still busy
        self.unsettled: set[int] = set()  # moves that failed (disk full, permissions)
        self._repairing: set[int] = set()  # the moves the repair at start finishes
        self._stuck: str | None = None  # which thread keeps the watchdog unfed, as logged
        self.disks = Disks(config)  # which disks are full (logged once per condition)
        self._deaths: dict[str, deque[float]] = {}  # when each thread died (recent ones)
        self._dying_said: set[str] = set()  # threads recorded as dying (for stowd status)
        self._queue_failing = False  # the upkeep could not write to the queue (said once)
        self._replan_due: Config | None = None  # a reload's config, until its replan is done
        self._replanning = threading.Lock()  # one replan at a time (main thread or upkeep)
        self._due_lock = threading.Lock()  # guards ``_replan_due`` between those threads
        self._adopted: Config | None = None  # the config whose sources the queue last took
        self._held_said = False  # the senders wait for a reload's adopt (logged once)
        # replaced generations that ended (each asks for a replan), and those replanned for
        self._lingered = self._lingered_replanned = 0
        self._replanner: threading.Thread | None = None  # tries a pending replan again
        self.metrics_server: metrics.Server | None = None
        self.http_server: web.Server | None = None
        self._shared: dict[str, object] | None = None  # last written for status
        self.receivers = Receivers(self.queue)  # C-STORE receivers: they outlive reloads
        self.buckets = Buckets()  # each destination's rate cap: they outlive reloads
        self._paused: dict[str, bool] = {}  # destinations outside their windows, as logged
        self.limits = Limits()  # adaptive concurrency per destination: it outlives reloads
        # a node of a shared queue: its leases renewed, its heartbeat written (None: SQLite)
        self.fleet = Fleet.of(config, self.queue, self._held)

    # -- signals ------------------------------------------------------------------------
    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_reload)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.last_signal = signum
        if self.signals.at_once():
            os.write(2, b"stowd: second signal, exiting now; the queue recovers at next start\n")
            os._exit(EXIT_SECOND_SIGNAL)
        # the workers' stop first: a paced upload that the daemon's stop ends (pacing.Pacing)
        # then finds its worker stopping, and its files are put back without a hold
        self.generation.stop.set()
        self.stop.set()

    def _on_reload(self, _signum: int, _frame: FrameType | None) -> None:
        self.reload_requested = True

    # -- lifecycle ----------------------------------------------------------------------
    def run(self) -> None:
        """Run until stopped; raises ``QueueError`` when the queue cannot be used."""
        self.queue.open()
        try:
            self._recover()
            self.receivers.start(self.config)
            self._pace(self.config)
            self.generation = self._start(self.config)
            self.metrics_server = _serve_metrics(self.config)
            self.http_server = web.start(self.config)
            self._note_windows()
            self.notifier.ready(self._status_line())
            self._supervise()
        finally:
            self.notifier.stopping()
            self._shutdown()
            if self.fleet is not None:  # after the uploads in flight: their leases renewed
                self.fleet.close()
            inflight.remove(self.config.queue)
            if self.metrics_server is not None:
                self.metrics_server.close()
            if self.http_server is not None:
                self.http_server.close()
            self.queue.close()
            self.notifier.close()

    def _recover(self) -> None:
        for warning in self.config.warnings:
            log.warning("%s", warning)
        returned = self.queue.recover()
        self.queue.clear_troubles()
        self._adopt(self.config)
        # the fleet thread first: the moves the repair finishes (a copy across filesystems
        # may take longer than a lease) are renewed while it makes them, so that no other
        # node takes one over and moves its file at the same time
        self._repairing = {j.id for j in self.queue.settling()}
        if self.fleet is not None:
            self.fleet.start()
        try:
            repaired, self.unsettled = repair(self.queue, sources=self._sources())
        finally:
            self._repairing = set()
        clear_spool(self.config)
        self._replan(self.config)
        counts = self.queue.counts()
        log.info(
            "stowd started: queue %s (%s)%s%s",
            self.config.queue,
            ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "empty",
            f"; {returned} interrupted upload(s) will be sent again" if returned else "",
            f"; {repaired} interrupted move(s) finished" if repaired else "",
        )

    def _adopt(self, config: Config) -> None:
        orphans = self.queue.adopt({s.name: s.destination for s in config.sources})
        self._adopted = config
        for source, count in orphans.items():
            log.warning(
                "%d queued file(s) belong to source %r, which is no longer configured; "
                "they wait in the queue until it is back (a shared queue: for a node that "
                "has it; this one never sends them)",
                count,
                source,
            )

    def _start(self, config: Config) -> Generation:
        gen = Generation(config)
        gen.finder = Finder(config, self.queue)
        counters.concurrency_forgotten()  # set again below for each adaptive destination
        for name, dest in config.destinations.items():
            # a wait for the rate cap ends when the daemon stops, not at a reload
            pacing = Pacing(self.buckets.of(name), self.stop)
            client = StowClient(dest, stop=gen.stop, pacing=pacing)
            gen.clients[name] = client
            limit = self._limit(dest)
            for n in range(dest.workers):
                worker = Worker(
                    config,
                    self.queue,
                    dest,
                    client,
                    gen.stop,
                    unsettled=self.unsettled,
                    classify_lock=gen.classify_lock,  # one reader of new files at a time
                    finder=gen.finder,
                    disks=self.disks,
                    limit=limit,
                    claiming=self._claiming,
                )
                gen.senders.append(worker)
                _spawn(gen, f"send-{name}-{n}", worker.run, self.queue)
        _spawn_reader(gen, self.queue, self.unsettled, self.disks)
        for source in config.sources:
            watcher = Watcher(
                source,
                source.destination,
                self.queue.enqueue,
                exclude=self._queue_files(),
                on_queue_error=self._queue_error,
            )
            gen.watchers.append(watcher)
            _spawn(gen, f"watch-{source.name}", partial(watcher.run, gen.stop), self.queue)
            if source.receive is None:
                log.info(
                    "watching %s (source %s) -> %s", source.watch, source.name, source.destination
                )
        return gen

    def _limit(self, dest: Destination) -> Concurrency:
        """The concurrency limit of ``dest``, as learnt before a reload (issue 20)."""
        limit = self.limits.of(dest)
        if dest.adaptive:
            counters.concurrency(dest.name, limit.limit)
        return limit

    def _queue_files(self) -> tuple[Path, ...]:
        q = str(self.config.queue)
        suffixes = ("", "-wal", "-shm", "-journal", ".lock", OPEN_MARK, inflight.SUFFIX)
        return tuple(Path(q + suffix) for suffix in suffixes)

    def _supervise(self) -> None:
        upkeep = threading.Thread(target=self._upkeep, name="upkeep", daemon=True)
        upkeep.start()
        next_status = next_watchdog = next_state = 0.0
        while not self.stop.wait(TICK):
            if self.reload_requested:
                self.reload_requested = False
                self._reload()
            self._revive_dead_threads()
            self._reap_lingering()
            self._retry_replan()
            self.receivers.retry(self.config)
            self._note_windows()
            now = time.monotonic()
            if now >= next_watchdog and self.notifier.watchdog_interval is not None:
                self._feed_watchdog()
                next_watchdog = now + self.notifier.watchdog_interval
            if now >= next_status:
                self.notifier.status(self._status_line())
                next_status = now + STATUS_EVERY
            if now >= next_state:
                self._share_state()
                next_state = now + inflight.WRITE_EVERY

    def _share_state(self) -> None:
        """Tell ``stowd status`` which requests are in flight (when that changed)."""
        senders = [w for gen in (self.generation, *self.lingering) for w in gen.senders]
        destinations = inflight.in_flight((w.destination.name, w.in_flight) for w in senders)
        shared: dict[str, object] = {"destinations": destinations}
        if self.receivers.running or self.receivers.unbound:
            shared["receivers"] = self.receivers.snapshot()
        limits = self.limits.snapshot()  # adaptive concurrency (issue 20)
        shared[inflight.CONCURRENCY] = {
            n: v for n, v in limits.items() if n in self.config.destinations
        }
        if shared == self._shared:
            return
        doc = inflight.document(os.getpid(), time.time(), destinations)
        doc.update(shared)
        if inflight.publish(self.config.queue, doc):
            self._shared = shared

    def _upkeep(self) -> None:
        """Full disks, retried moves, forgotten claims and housekeeping, on a thread of their
        own: a slow share or a big purge must not keep the main thread from feeding the
        watchdog.  When a disk has space again, moves and claims are retried at once."""
        next_housekeeping = next_resettle = next_reclaim = 0.0
        while not self.stop.wait(TICK):
            now = time.monotonic()
            if self._guarded(self._disk_freed):
                next_resettle = next_reclaim = now
            if now >= next_resettle and self.unsettled:
                next_resettle = now + RESETTLE_EVERY
                self._guarded(self._resettle)
            if now >= next_reclaim:
                next_reclaim = now + self._reclaim_every()
                if self._guarded(self._reclaim):  # moves taken over from another node
                    next_resettle = now + RESETTLE_EVERY
                    self._guarded(self._resettle)
            if now >= next_housekeeping:
                next_housekeeping = now + HOUSEKEEPING_EVERY
                self._guarded(self._housekeeping)
            if self._replan_due is not None:
                self._guarded(self._replan_after_reload)
        self.queue.release_connection()

    def _retry_replan(self) -> None:
        """A reload's replan that failed is tried again each second (the upkeep tries it only
        after its housekeeping and retried moves, which may take minutes), on a thread of
        its own (a queue that cannot be written may hold a try for its busy or connect
        timeout: never the main thread's); the senders claim nothing until the queue took
        the new config's sources.  So is the replan a replaced generation's end asks for
        (``_reap_lingering``)."""
        pending = self._replan_due is not None or self._lingered > self._lingered_replanned
        if pending and (self._replanner is None or not self._replanner.is_alive()):
            self._replanner = threading.Thread(target=self._replan_pending, name="replan")
            self._replanner.daemon = True
            self._replanner.start()
        self._note_held()

    def _replan_pending(self) -> None:
        try:
            if self.stop.is_set():  # stopping: the queue is about to be closed
                return
            if self._replan_due is not None:
                self._guarded(self._replan_after_reload)
            if self._lingered > self._lingered_replanned:
                self._guarded(self._replan_after_lingering)
        finally:
            self.queue.release_connection()

    def _note_held(self) -> None:
        """Say once that the senders wait for a reload's adopt, and once when they no
        longer do (also in ``STATUS=``)."""
        held = self._adopted is not self.config
        if held == self._held_said:
            return
        self._held_said = held
        if held:
            log.warning(
                "claiming nothing new until the queue takes the reloaded config's sources "
                "(tried again every second)"
            )
        else:
            log.info("the queue took the reloaded config's sources; claiming again")

    def _replan_after_lingering(self) -> None:
        """Read again what a replaced generation read with the old rules after the reload
        replanned: one replan at a time (else tried again at the next tick)."""
        if not self._replanning.acquire(blocking=False):
            return
        try:
            asked = self._lingered  # (a generation that ends meanwhile asks again)
            self._replan(self.config)
            self._lingered_replanned = asked
        finally:
            self._replanning.release()

    def _replan_after_reload(self) -> None:
        """Queued files of sources no longer configured wait; files read with other rules
        are read again.  On the upkeep's thread, tried again until the queue takes it (a
        database away at a reload must not end the daemon, nor leave it without workers)."""
        if not self._replanning.acquire(blocking=False):
            return  # the other thread replans now; the upkeep then takes the newest config
        try:
            new = self._replan_due
            if new is None:
                return
            self._adopt(new)  # an older config's adopt never lands after a newer one's
            self._replan(new)
            with self._due_lock:
                if self._replan_due is new:  # else a newer reload came meanwhile: it is due
                    self._replan_due = None
        finally:
            self._replanning.release()

    def _guarded(self, step: Callable[[], bool | None]) -> bool:
        """Run one upkeep step; its trouble is logged (a queue that cannot be written,
        once) and never ends the upkeep."""
        try:
            done = bool(step())
        except QueueError as exc:
            self._queue_error(exc)
            return False
        except Exception:
            log.exception("unexpected error in housekeeping; going on")
            return False
        return done

    def _queue_error(self, exc: QueueError) -> None:
        """A write to the queue failed (any thread): a full disk is logged by ``Disks``."""
        if isinstance(exc, QueueFull):
            self.disks.hit(self.config.queue, at=exc.at)
        elif not self._queue_failing:
            log.error("%s; stowd waits and tries again", exc)
        self._queue_failing = True

    def _disk_freed(self) -> bool:
        """Look at the disks; True when one that was full has space again."""
        self.disks.check()
        return self.disks.freed

    def _reclaim(self) -> bool:
        """Claims that no worker holds and whose lease ran out return to pending (a
        worker died, or its release was lost; with a shared queue also another node's
        that stopped renewing them): they are sent again, not left claimed.  True when
        moves of such a node were taken over (to be finished now, as at a start)."""
        returned = self.queue.reclaim(self._senders_held())
        if self._queue_failing:
            log.info("the queue can be written again")
        self._queue_failing = False
        if returned:
            log.warning(
                "%d claimed file(s) no sender holds any more are queued again (sent again)",
                returned,
            )
        adopted, self.queue.adopted = self.queue.adopted, set()
        self.unsettled |= adopted
        return bool(adopted)

    def _reclaim_every(self) -> float:
        """A shared queue's other nodes' expired claims are looked for every third of the
        lease (taken over soon after it expires); SQLite's forgotten claims every minute."""
        return RECLAIM_EVERY if self.fleet is None else min(RECLAIM_EVERY, self.config.lease / 3)

    def _senders_held(self) -> set[int]:
        held: set[int] = set()
        for gen in (self.generation, *self.lingering):
            for worker in gen.senders:
                held |= worker.held if worker.running else frozenset()
        return held

    def _held(self) -> set[int]:
        """The rows this node holds: its senders' claims and settles, the moves it retries
        (their leases renewed by the fleet thread), and the moves the start's repair makes."""
        return self._senders_held() | set(self.unsettled) | self._repairing

    def _claiming(self) -> bool:
        """May the senders claim?  Only once the queue took the running config's sources
        (after a reload whose adopt failed, a removed source's rows would be sent, and sent
        again, until it succeeds) and, with a shared queue, while this node reaches it."""
        return self._adopted is self.config and (self.fleet is None or self.fleet.claiming)

    # -- schedule (transfer windows) --
    def _note_windows(self) -> None:
        """Log each destination's window closing (its senders claim nothing new; requests
        in flight finish) and opening; the senders look at the schedule themselves."""
        now = local_now()
        for name, dest in self.config.destinations.items():
            note = paused_note(dest.schedule, now)
            if (note is not None) == self._paused.get(name, False):
                continue
            self._paused[name] = note is not None
            windows = ", ".join(w.text for w in dest.schedule.windows)
            if note is not None:
                log.info(
                    "destination %s: %s: outside its transfer windows (%s) it sends nothing "
                    "new; new files are still found, read and queued",
                    name,
                    note,
                    windows,
                )
            elif dest.schedule.always:  # a reload took its schedule away
                log.info("destination %s: no schedule any more; sending at any time", name)
            else:
                log.info("destination %s: its transfer window is open (%s); sending", name, windows)

    # -- reload (SIGHUP) ------------------------------------------------------------------
    def _reload(self) -> None:
        self.notifier.reloading()
        new = self._read_new_config()
        if new is not None:
            self._switch_to(new)
        self.notifier.ready(self._status_line())

    def _read_new_config(self) -> Config | None:
        """The config file as it is now, or None (with every problem logged) to keep the old."""
        try:
            new = load_config(self.config.path, cores=self.pinning.start)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload refused: %s: %s", exc.path, problem)
            log.error("reload refused: %s is invalid; still running with the old config", exc.path)
            return None
        old = self.config
        if (new.queue, new.database, new.node) != (old.queue, old.database, old.node):
            log.error(
                "reload refused: the queue moved from %s to %s; that needs a restart "
                "(systemctl restart stowd); still running with the old config",
                old.queue_shown(),
                new.queue_shown(),
            )
            return None
        return new

    def _switch_to(self, new: Config) -> None:
        log.info(
            "reloading %s: stopping the watchers and workers (uploads in flight may finish "
            "for up to %gs)",
            new.path,
            new.shutdown_timeout,
        )
        self._pace(new)  # first: the uploads in flight go on at the new rates
        old = self.generation
        _stop(old, new.shutdown_timeout, closing=False, waiting=self._keep_alive, abort=self.stop)
        if old.busy():
            self.lingering.append(old)
        if self.stop.is_set():
            return  # stopping meanwhile: no new generation
        self.config = new
        self.disks.watch(new)
        for warning in new.warnings:
            log.warning("%s", warning)
        with self._due_lock:
            self._replan_due = new
        self._guarded(self._replan_after_reload)  # else again each second, until it is taken
        self._note_held()
        self.receivers.sync(new)
        self.pinning.apply(new)
        self.generation = self._start(new)
        self._restart_metrics(new)
        log.info(
            "reloaded %s: %d source(s), %d destination(s); queued files stay queued",
            new.path,
            len(new.sources),
            len(new.destinations),
        )

    # ratecap (issue 20)
    def _pace(self, config: Config) -> None:
        """Give each destination's token bucket its ``max_rate`` (a change is logged); the
        metrics show the caps (none for a destination no longer configured)."""
        for name, was in self.buckets.configure(config.destinations).items():
            rate = config.destinations[name].max_rate
            before = "" if was is None else f" (it was {rate_text(was)})"
            if rate is None:
                log.info("destination %s: no rate cap any more%s", name, before)
                continue
            log.info(
                "destination %s: all its uploads together send at most %s (max_rate)%s",
                name,
                rate_text(rate),
                before,
            )
        for name in self.config.destinations.keys() - config.destinations.keys():
            counters.max_rate(name, None)
        for name, dest in config.destinations.items():
            counters.max_rate(name, dest.max_rate)

    def _reap_lingering(self) -> None:
        """A replaced generation whose last thread ended: close its connections, and read
        again what it read with the old rules after the reload re-planned."""
        for gen in [g for g in self.lingering if not g.busy()]:
            self.lingering.remove(gen)
            _close_clients(gen)
            log.info("the threads of the previous config have finished")
            self._lingered += 1  # replanned by ``_retry_replan``: under the replan lock

    def _keep_alive(self) -> None:
        """While a reload waits for uploads in flight, the main thread is alive and busy."""
        if self.notifier.watchdog_interval is not None:
            self.notifier.watchdog()

    def _restart_metrics(self, new: Config) -> None:
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
        try:
            self.metrics_server = _serve_metrics(new)
        except StowdError as exc:
            log.error("%s; running without metrics until the next reload", exc)
        if self.http_server is not None:
            self.http_server.close()
            self.http_server = None
        try:
            self.http_server = web.start(new)
        except StowdError as exc:
            log.error("%s; running without the status page until the next reload", exc)

    # -- health ---------------------------------------------------------------------------
    def _feed_watchdog(self) -> None:
        stuck = self._stuck_thread()
        if stuck is None:
            if self._stuck is not None:
                log.warning("every thread is making progress again; watchdog fed again")
            self.notifier.watchdog()
        elif stuck[0] != self._stuck:
            log.error("%s: not telling systemd's watchdog that stowd is alive", stuck[1])
        self._stuck = None if stuck is None else stuck[0]

    def _stuck_thread(self) -> tuple[str, str] | None:
        """(which, why) when stowd is not healthy (a thread dead, dying again and again,
        or without progress)."""
        now = time.monotonic()
        for name, (thread, _) in self.generation.threads.items():
            if not thread.is_alive():
                return name, f"thread {name} is dead"
        dying = self._dying()
        if dying:
            return dying[0], dying[1]
        for gen in (self.generation, *self.lingering):
            for worker in gen.workers:
                idle = now - worker.beat
                if idle > worker.max_step + WORKER_SLACK and worker.running:
                    name = f"sender of {worker.name}"  # the reader: of the first destination
                    return name, f"a {name} made no progress for {idle:.0f}s"
        for watcher in self.generation.watchers:
            idle = now - watcher.beat
            if idle > WATCHER_STALL:
                name = f"watcher of {watcher.source.name}"
                return name, f"the {name} made no progress for {idle:.0f}s"
        return None

    def _status_line(self) -> str:
        """systemd's ``STATUS=`` line; a queue that cannot be read now (a database that went
        away) is said there and logged, and never ends the main thread."""
        alerts = [disk.short(self.disks.full), *(why for _, why in self._dying_all())]
        if self._held_said:
            alerts.append("reload not taken yet: claiming nothing new")
        paused = [name for name, closed in self._paused.items() if closed]
        try:
            return short_line(
                self.queue, list(self.config.destinations), alerts=alerts, paused=paused
            )
        except QueueError as exc:
            self._queue_error(exc)
            return "; ".join([*(a for a in alerts if a), "the queue cannot be read now"])

    def _dying_all(self) -> list[tuple[str, str]]:
        """(thread, why) of each thread that died more than ``RESTART_LIMIT`` times within
        ``RESTART_WINDOW``; one that no longer does is cleared from ``stowd status``."""
        found = []
        for name, deaths in self._deaths.items():
            _forget_old(deaths)
            if len(deaths) > RESTART_LIMIT:
                minutes = RESTART_WINDOW / 60
                found.append((name, f"thread {name} died {len(deaths)} times in {minutes:.0f} min"))
            elif name in self._dying_said:
                self._dying_said.discard(name)
                self._guarded(partial(self.queue.set_trouble, name, None))
        return found

    def _dying(self) -> tuple[str, str] | None:
        found = self._dying_all()
        return found[0] if found else None

    # -- upkeep ---------------------------------------------------------------------------
    def _replan(self, config: Config) -> None:
        """Queued files read with other rules or sidecar settings are read again."""
        for source in config.sources:
            again = self.queue.replan(source.name, digest(config, source))
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
        gen = self.generation
        for name, (thread, target) in list(gen.threads.items()):
            if not thread.is_alive() and not gen.stop.is_set():
                deaths = self._deaths.setdefault(name, deque())
                deaths.append(time.monotonic())
                _forget_old(deaths)
                self._say_death(name, len(deaths))
                _spawn(gen, name, target, self.queue)

    def _say_death(self, name: str, recent: int) -> None:
        """Each death is logged; past the limit, once, that systemd will restart stowd (and
        ``stowd status`` shows it, from the queue)."""
        if recent != RESTART_LIMIT + 1:
            log.error("thread %s died; starting it again", name)
            return
        text = f"thread {name} died {recent} times within {RESTART_WINDOW / 60:.0f} minutes"
        self._dying_said.add(name)
        self._guarded(partial(self.queue.set_trouble, name, text))
        log.error(
            "thread %s died %d times within %.0f minutes; starting it again, but no longer "
            "telling systemd's watchdog that stowd is alive (with WatchdogSec= set, systemd "
            "restarts stowd); see the errors above for why it dies",
            name,
            recent,
            RESTART_WINDOW / 60,
        )

    def _housekeeping(self) -> None:
        now = time.time()  # sent/'s files' times; a row's done_at is on the queue's clock
        forgotten = self.queue.forget_done(self.queue.clock() - self.config.history_days * 86400)
        if forgotten:
            log.info(
                "forgot %d finished job(s) older than %g days", forgotten, self.config.history_days
            )
        for node in self.queue.forget_nodes(self.config.history_days * 86400):
            log.info(
                "forgot node %s: no heartbeat for %g days and it holds no file",
                node,
                self.config.history_days,
            )
        for source in self.config.sources:
            if source.sent_retention is not None:
                purge_sent(source, source.sent_retention, now)  # logs what it deleted

    def _shutdown(self) -> None:
        self.stop.set()
        self.receivers.stop()  # first: no instance is acknowledged once stopping began
        log.info("stopping: waiting up to %gs for requests in flight", self.config.shutdown_timeout)
        for gen in self.lingering:
            gen.stop.set()
        _stop(self.generation, self.config.shutdown_timeout, closing=True)
        for gen in self.lingering:
            _stop(gen, 0.0, closing=True)
        if self._replanner is not None:  # a try under way ends before the queue is closed
            self._replanner.join(self.config.shutdown_timeout)
        log.info("stopped")


def _forget_old(deaths: deque[float]) -> None:
    """Keep the deaths of the last ``RESTART_WINDOW`` seconds only."""
    now = time.monotonic()
    while deaths and deaths[0] < now - RESTART_WINDOW:
        deaths.popleft()


def _serve_metrics(config: Config) -> metrics.Server | None:
    """Serve Prometheus metrics when ``metrics.listen`` is set; raises ``StowdError``."""
    if config.metrics is None:
        return None
    host, port = config.metrics.host, config.metrics.port
    server = metrics.serve_registry(host, port, metrics.for_config(config))
    log.info("serving Prometheus metrics on http://%s:%d/metrics", host, server.port)
    return server


def _spawn_reader(gen: Generation, queue: Queue, unsettled: set[int], disks: Disks) -> None:
    """A thread that only reads new files, so that no upload waits for a batch's headers.
    Its log lines, retry metrics and watchdog limit are those of the first sender's
    destination, as when it was a sender that did not send."""
    if not gen.senders:
        return
    first = gen.senders[0]
    gen.reader = Reader(
        gen.config,
        queue,
        gen.stop,
        name=first.name,
        max_step=first.max_step,
        unsettled=unsettled,
        classify_lock=gen.classify_lock,
        finder=gen.finder,
        disks=disks,
    )
    _spawn(gen, "read-new", gen.reader.run, queue)


def _spawn(gen: Generation, name: str, target: Callable[[], None], queue: Queue) -> None:
    """Start a thread of ``gen``; it gives its connection to the queue back when it ends (a
    reload's old threads, a dead thread started again: none left to the garbage collector)."""

    def run() -> None:
        try:
            target()
        finally:
            queue.release_connection()

    thread = threading.Thread(target=run, name=name, daemon=True)
    gen.threads[name] = (thread, target)
    thread.start()


def _close_clients(gen: Generation) -> None:
    for client in gen.clients.values():
        client.close()
    if gen.finder is not None:
        gen.finder.close()


def _stop(
    gen: Generation,
    timeout: float,
    *,
    closing: bool,
    waiting: Callable[[], None] | None = None,
    abort: threading.Event | None = None,
) -> None:
    """Stop ``gen``'s threads, waiting up to ``timeout`` for uploads in flight (calling
    ``waiting`` every ``KEEPALIVE`` seconds meanwhile).

    A thread still busy then is left to finish in the background (``closing``: the process is
    ending, so its connection is closed and its files are sent again at the next start).
    """
    gen.stop.set()
    for watcher in gen.watchers:
        watcher.wake()  # it waits for hints up to a second; stop now
    deadline = time.monotonic() + timeout
    for thread, _ in gen.threads.values():
        while thread.is_alive() and time.monotonic() < deadline:
            if abort is not None and abort.is_set():
                break  # the daemon is stopping: its own shutdown waits for these
            thread.join(min(KEEPALIVE, max(0.0, deadline - time.monotonic())))
            if waiting is not None:
                waiting()
    alive = [t.name for t, _ in gen.threads.values() if t.is_alive()]
    if alive and closing:
        log.warning(
            "still busy at shutdown (%s); their files are sent again at next start",
            ", ".join(alive),
        )
    elif alive:
        log.warning("still busy (%s); finishing with the old config", ", ".join(alive))
    if closing or not alive:
        _close_clients(gen)
