"""``stowd migrate``: a one-shot bulk upload of existing folder trees, then exit.

Each SRC folder becomes a source of its own (``migrate-<folder>-<hash of its path>``, the
same name on every run, ``-move`` added without ``keep``) with the config's top-level rules,
sending to ``--destination``.  The name is how each row remembers whether its files are moved:
the rows of one mode are never settled by a run in the other, and a run refuses to start
while the other mode's run of the same SRC is unfinished (its rows would be parked, and their
files neither queued again nor sent).  The
files go through the daemon's queue, classify, rules, grouping, retries and settling; only
the finding is different: one lazy walk (``Watcher.scan``, chunks of 500 queued while the
workers already send) without a quiet period, since the files are old.

Where files go afterwards: stored ones to ``SRC.sent/`` and failed ones to ``SRC.failed/``
(beside SRC, sub-folders kept, an ``.error.json`` next to each failed file), or with
``keep`` nowhere: the source stays byte-identical and the queue remembers what was stored
(state ``sent``, outcome ``kept``), so a re-run skips those files (same path, size and
mtime) and tries the failed ones again.

Resuming is the queue's business: claims of a killed run go back to pending, moves it left
half done are finished, queued rows stay queued and are not queued twice.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from stowd.config import Config, Source
from stowd.errors import MigrationConflict
from stowd.metadata import clear_spool, digest
from stowd.queue import Failed, Job, NewFile, Queue
from stowd.settle import repair
from stowd.stow import StowClient
from stowd.watch import Watcher
from stowd.worker import Worker

log = logging.getLogger("stowd.migrate")

TICK = 0.5
QUERY_SHARE = 10  # wait at least 10 times as long as counting the rows took
RESETTLE_EVERY = 60.0
DONE_STATES = ("sent", "failed", "gone", "ignored")
REPORT_FIELDS = ("path", "reason", "http_status", "stage")
EXIT_SECOND_SIGNAL = 130
BAR_WIDTH = 10
TERMINAL_WIDTH = 80  # when the terminal does not say


@dataclass(frozen=True)
class Options:
    folders: tuple[Path, ...]
    destination: str
    keep: bool = False
    progress_every: float = 10.0
    tty: bool = False


@dataclass
class Summary:
    """What a run did (this run's rows, plus the files skipped as stored before), and
    ``failures``: every file of the folders that is not stored, or not where it belongs,
    whichever run it was (the report, and exit code 1 unless it is empty)."""

    tally: dict[str, tuple[int, int]] = field(default_factory=dict)
    skipped: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    crashed: bool = False  # stopped by an unexpected error (logged), not by a signal
    failures: list[dict[str, Any]] = field(default_factory=list)

    def count(self, kind: str) -> int:
        """Failures of one ``kind``: failed, failed_before, unmoved, unreadable."""
        return sum(1 for f in self.failures if f["kind"] == kind)

    def files(self, state: str) -> int:
        return self.tally.get(state, (0, 0))[0]

    def bytes(self, state: str) -> int:
        return self.tally.get(state, (0, 0))[1]


def source_name(folder: Path, keep: bool) -> str:
    """A name that stays the same for the same folder and mode, run after run (with ``keep``
    the name of the first version, which had no other mode in the name)."""
    tag = hashlib.sha256(str(folder).encode()).hexdigest()[:6]
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", folder.name or "root")[:40]
    return f"migrate-{base}-{tag}" + ("" if keep else "-move")


def make_sources(config: Config, opts: Options) -> tuple[Source, ...]:
    """One source per folder: no quiet period, no sidecars, the top-level rules only."""
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
                keep=opts.keep,
            )
        )
    return tuple(sources)


class Migration:
    """Scan, send and settle until every file of the folders is done (or a signal)."""

    def __init__(self, config: Config, opts: Options, out: TextIO = sys.stderr) -> None:
        self.opts = opts
        self.sources = make_sources(config, opts)
        self.names = [s.name for s in self.sources]
        # the report covers the folders' files whichever mode failed them
        self.all_names = self.names + [source_name(f, not opts.keep) for f in opts.folders]
        self.config = replace(config, sources=config.sources + self.sources)
        self.queue = Queue(config.queue)
        self.stop = threading.Event()
        self.scanned = threading.Event()
        self.skipped = 0
        self.unsettled: set[int] = set()
        self.move_problems: dict[int, OSError] = {}  # why each stuck move failed last
        self.scan_errors: list[tuple[str, OSError]] = []  # folders/files that cannot be read
        self.signals = 0
        self.crashed = False
        self.out = out
        self.started = time.time()

    # -- signals ------------------------------------------------------------------------
    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, _signum: int, _frame: FrameType | None) -> None:
        self.signals += 1
        if self.signals > 1:
            os.write(2, b"stowd migrate: second signal, exiting now; a re-run continues\n")
            os._exit(EXIT_SECOND_SIGNAL)
        self.stop.set()

    # -- the run ------------------------------------------------------------------------
    def run(self) -> Summary:
        """Raises ``QueueError`` when the queue cannot be used (another stowd holds it)."""
        self.queue.open()
        try:
            self._refuse_other_mode()
            self._recover()
            threads = self._start()
            self._wait()
            self._finish(threads)
            return self._summary()
        finally:
            self.queue.close()

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
        _, self.unsettled = repair(self.queue, sources=sources)
        clear_spool(self.config)
        for source in self.sources:
            self.queue.replan(source.name, digest(self.config, source))
        if returned:
            log.info("%d upload(s) interrupted by the last run are sent again", returned)

    def _start(self) -> tuple[list[threading.Thread], list[StowClient]]:
        dest = self.config.destinations[self.opts.destination]
        client = StowClient(dest, stop=self.stop)
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
            )
            threads.append(threading.Thread(target=worker.run, name=f"send-{n}", daemon=True))
        threads.append(threading.Thread(target=self._scan, name="scan", daemon=True))
        for thread in threads:
            thread.start()
        return threads, [client]

    def _scan(self) -> None:
        try:
            for source in self.sources:
                watcher = Watcher(
                    source,
                    source.destination,
                    self._sink,
                    exclude=self._own(),
                    on_error=self._unreadable,
                )
                watcher.scan(self.stop)
        except Exception:
            log.exception("unexpected error while scanning; stopping the migration")
            self.crashed = True
            self.stop.set()
            return
        if not self.stop.is_set():
            self.scanned.set()

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
        files = [f for f in files if not _in_migrate_output(f.rel)]
        done = self.queue.finished_before(files)
        self.skipped += len(done)
        return self.queue.enqueue([f for f in files if f.path not in done])

    def _wait(self) -> None:
        """Until everything is done, a signal came or the scan crashed (``stop``)."""
        next_line = time.monotonic() + self.opts.progress_every
        next_resettle = time.monotonic() + RESETTLE_EVERY
        tick = TICK
        while not self.stop.wait(tick):
            began = time.monotonic()
            tally = self.queue.run_tally(self.names, self.started)
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

    def _nothing_left(self, tally: dict[str, tuple[int, int]]) -> bool:
        """Every file is done, or all that is left are moves that keep failing (disk full,
        permissions): tried once more, then they end the run as failures, not a hang."""
        active = _active(tally)
        if not active:
            return True
        if tally.get("settling", (0, 0))[0] != active or len(self._stuck()) != active:
            return False
        self._resettle()
        return _active(self.queue.run_tally(self.names, self.started)) == len(self._stuck())

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

    def _show(self, tally: dict[str, tuple[int, int]], end: str = "\n") -> None:
        seconds = time.time() - self.started
        errors = len(self.scan_errors)
        now = progress(tally, self.skipped, seconds, self.scanned.is_set(), errors)
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
            *(_unmoved(j, self.move_problems.get(j.id)) for j in self._stuck()),
            *(_unreadable(path, exc) for path, exc in self.scan_errors),
        ]
        seconds = time.time() - self.started
        interrupted = self.signals > 0 and not self.crashed
        return Summary(tally, self.skipped, seconds, interrupted, self.crashed, failures)

    def _failed(self) -> list[dict[str, Any]]:
        """The folders' files that failed, in this run or before, and still lie where the
        migration left them (SRC.failed, or SRC with keep): fixed ones put back into SRC
        were queued again, and ones the administrator deleted are no longer reported."""
        found = []
        for row in self.queue.last_failures(self.all_names):
            now_at = row.target or row.path
            if os.path.lexists(now_at):
                kind = "failed" if row.done_at >= self.started else "failed_before"
                found.append(_failure(row, now_at, kind))
        return found


def _active(tally: dict[str, tuple[int, int]]) -> int:
    return sum(n for state, (n, _) in tally.items() if state not in DONE_STATES)


def _failure(row: Failed, now_at: str, kind: str) -> dict[str, Any]:
    return _entry(row.path, row.error, now_at, kind)


def _entry(path: str, error: str | None, now_at: str, kind: str) -> dict[str, Any]:
    doc = json.loads(error) if error else {}
    return {
        "path": path,
        "reason": doc.get("reason") or "",
        "http_status": doc.get("http_status"),
        "stage": doc.get("stage") or "",
        "failure_reason": doc.get("failure_reason"),
        "server_message": doc.get("server_message"),
        "now_at": now_at,
        "kind": kind,
    }


def _unmoved(job: Job, problem: OSError | None) -> dict[str, Any]:
    """A file whose move keeps failing: stored (or failed) but still in SRC."""
    where = job.target or ("SRC.sent" if job.outcome == "sent" else "SRC.failed")
    why = f"cannot be moved to {where}: {problem or 'see the log'}"
    now_at = job.path if os.path.lexists(job.path) else job.target or job.path
    entry = _entry(job.path, job.error, now_at, "unmoved")
    if job.outcome == "sent":
        entry.update(reason=f"stored, but {why}", stage="moving the file")
    else:
        entry.update(reason=f"{entry['reason']}; and it {why}")
    return entry


def _unreadable(path: str, exc: OSError) -> dict[str, Any]:
    """A folder (or file) the scan could not read: none of its files were sent."""
    reason = f"cannot be read, nothing in it was sent: {exc.strerror or exc}"
    entry = _entry(path, None, path, "unreadable")
    entry.update(reason=reason, stage="listing the folder")
    return entry


@dataclass(frozen=True)
class Progress:
    """Where a run stands: ``done`` of ``total`` files (skipped ones count as done; the
    total grows until the walk is ``scanned``)."""

    done: int
    total: int
    scanned: bool
    stored_bytes: int
    failed: int
    seconds: float
    rate: float  # files finished per second in this run

    @property
    def eta(self) -> str:
        if not self.scanned:
            return "scanning"
        return _clock((self.total - self.done) / self.rate) if self.rate > 0 else "-"

    @property
    def files(self) -> str:
        return f"{self.done}/{self.total}{'' if self.scanned else '+'} files"


def progress(
    tally: dict[str, tuple[int, int]], skipped: int, seconds: float, scanned: bool, errors: int
) -> Progress:
    done = sum(tally.get(s, (0, 0))[0] for s in DONE_STATES)
    total = done + _active(tally) + skipped
    failed = tally.get("failed", (0, 0))[0] + errors
    rate = done / seconds if seconds > 0 else 0.0
    stored = tally.get("sent", (0, 0))[1]
    return Progress(done + skipped, total, scanned, stored, failed, seconds, rate)


def progress_line(p: Progress) -> str:
    """``files done/total, MB stored, rate, failures, ETA``: a line of its own."""
    mb = p.stored_bytes / 1e6
    return (
        f"stowd migrate: {p.files}, {mb:.1f} MB stored, {p.rate:.1f} files/s, "
        f"{mb / max(p.seconds, 1e-9):.1f} MB/s, {p.failed} failed, ETA {p.eta}"
    )


def progress_bar(p: Progress) -> str:
    """For a terminal: ``[####......]  40% 400/1000 files, 12.3 MB, 0 failed, ETA 0:02:00,
    5.1 files/s`` (the most wanted first, as a narrow terminal cuts the end off).  Before the
    walk is complete the bar shows the share of the files found so far, and no percentage."""
    filled = BAR_WIDTH * p.done // p.total if p.total else 0
    share = f"{100 * p.done // p.total:3d}%" if p.scanned and p.total else "   -"
    return (
        f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {share} {p.files}, "
        f"{_size(p.stored_bytes)}, {p.failed} failed, ETA {p.eta}, {p.rate:.1f} files/s"
    )


def _size(n: int) -> str:
    unit, scale = next(((u, s) for u, s in (("TB", 1e12), ("GB", 1e9)) if n >= s), ("MB", 1e6))
    return f"{n / scale:.1f} {unit}"


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"


def render(summary: Summary, opts: Options, report: Path | None) -> str:
    """The closing summary, for people."""
    mb = summary.bytes("sent") / 1e6
    word = "interrupted" if summary.interrupted else "finished"
    word = "stopped by an unexpected error (see the log)" if summary.crashed else word
    lines = [
        f"stowd migrate {word} after {summary.seconds:.1f}s",
        f"  stored:   {summary.files('sent')} file(s), {mb:.1f} MB",
        f"  skipped:  {summary.skipped} file(s) already stored by an earlier run",
        f"  failed:   {_failed_line(summary)}",
    ]
    if summary.count("unmoved"):
        lines.append(
            f"  not moved: {summary.count('unmoved')} file(s) could not be moved to "
            "SRC.sent / SRC.failed and are still in SRC (see the log)"
        )
    if summary.count("unreadable"):
        lines.append(
            f"  unreadable: {summary.count('unreadable')} folder(s) or file(s) could not be "
            "read; nothing in them was sent (see the log)"
        )
    if report and summary.failures:
        lines.append(f"  every file not stored or not moved is listed in {report}")
    if summary.files("gone") or summary.files("ignored"):
        lines.append(f"  vanished: {summary.files('gone')}; ignored: {summary.files('ignored')}")
    if summary.interrupted or summary.crashed:
        left = _active(summary.tally)
        lines.append(f"  {left} file(s) stay queued; run the same command again to go on")
    elif not opts.keep and opts.folders:
        where = ", ".join(f"{f}.sent / {f}.failed" for f in opts.folders)
        lines.append(f"  moved to {where}")
    return "\n".join(lines)


def _failed_line(summary: Summary) -> str:
    now, before = summary.count("failed"), summary.count("failed_before")
    if not before:
        return f"{now} file(s)"
    return f"{now + before} file(s) ({now} in this run, {before} by earlier runs and not fixed)"


def write_report(path: Path, failures: list[dict[str, Any]]) -> None:
    """Every failed file with its reason: JSON for ``.json``, else CSV."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fp:
        if path.suffix.lower() == ".json":
            json.dump(failures, fp, indent=2, ensure_ascii=False)
            fp.write("\n")
        else:
            writer = csv.DictWriter(fp, REPORT_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(failures)
    os.replace(tmp, path)


def _in_migrate_output(rel: str) -> bool:
    """``rel`` lies in a ``X.sent`` or ``X.failed`` folder: what migrating a sub-folder ``X``
    before left beside it.  Those files were already handled: never sent again."""
    parts = rel.split("/")[:-1]
    return any(part.endswith((".sent", ".failed")) for part in parts)
