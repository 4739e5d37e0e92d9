"""Finding complete files in a drop folder: watchdog events, a start-up scan, periodic rescans.

Events are hints; the scan is the truth.  A file is complete when it is not a temporary name
and its size and mtime have not changed for the quiet period.  For a file whose mtime lies in
the past that is one ``stat``; a file with an mtime in the future (a share with a skewed clock)
is watched until the same size and mtime have been seen for the quiet period.  Nothing here
raises into watchdog's thread: a handler exception would silently stop every event.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import heapq
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from stowd.config.model import INCOMING, Sidecars, Source
from stowd.errors import (
    FileProblem,
    FileUnreadable,
    FileVanished,
    QueueError,
    QueueFull,
    SidecarNotReady,
)
from stowd.fileops import remove_empty_parents, walk_folders
from stowd.pipeline import counters, sidecar
from stowd.pipeline.loop import ring
from stowd.pipeline.places import Places
from stowd.pipeline.queue import NewFile
from stowd.pipeline.settle import has_copy

try:  # watchdog 7 on Linux: one thread reads the events of every inotify watch
    from watchdog.observers.inotify_c import InotifyFD as _SharedReader
except ImportError:  # pragma: no cover - another platform or watchdog version
    _SharedReader = None  # type: ignore[assignment,misc]
try:  # what holds an inotify "moved from" event back to pair it with its "moved to"
    from watchdog.observers.inotify_move_event_grouper import (
        InotifyMoveEventGrouper as _MovePairing,
    )
except ImportError:  # pragma: no cover - watchdog before 7 (InotifyBuffer), or no inotify
    try:
        from watchdog.observers.inotify_buffer import (  # type: ignore[no-redef]
            InotifyBuffer as _MovePairing,
        )
    except ImportError:
        _MovePairing = None  # type: ignore[assignment,misc]

log = logging.getLogger("stowd.watch")

ENQUEUE_CHUNK = 500
IDLE_WAIT = 1.0
TEXT_CACHE = 10_000  # sidecar texts kept between scans
RAW_LIMIT = 1024 * 1024  # a sidecar that is not text is kept up to this size
POLL_INTERVAL = 2.0
PATH_MAX = os.pathconf("/", "PC_PATH_MAX")  # bytes of a path the system opens (Linux: 4096)
# How often the watch folder itself is looked at (one stat): deleted, or deleted and created
# again, its events stop (watchdog's emitter ends with the folder it watched).
FOLDER_CHECK = 1.0
# watchdog holds an inotify "moved from" event back for half a second to pair it with its
# "moved to", and every event behind it waits as long: each file stowd moved to sent/ held
# the events of the next file dropped within that half second back.  The two events of a
# rename come together; one left unpaired is a deleted and a created file, hints either way.
MOVE_PAIRING = 0.02
# Files that become complete within this long of each other are queued together, so files
# written together go out in one request, not one request each (the readers and senders
# are woken at once, issue 19): the first of them waits this much longer than its quiet period.
GATHER = 0.05
QUEUE_RETRY = 5.0  # a queue that could not be written is tried again after this
# The events that can mean a file is new or changed.  Not 'opened' and 'closed_no_write':
# stowd opens every file twice itself (to read its header, to send it), and each of those
# events was a hint that re-checked the file and asked the queue about it again.
# 'attrib' (not a kind of 'modified' in watchdog 7) is a touch or a chmod: a file made
# readable, or touched to have it sent again, is seen at once and not at the next rescan.
EVENTS = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    DirCreatedEvent,
    DirMovedEvent,
]
Sink = Callable[[list[NewFile]], int]
OnError = Callable[[str, OSError], None]


class _Handler(FileSystemEventHandler):
    """Turns file events into candidate paths; never raises.  ``gone`` hears of files
    deleted or moved away (``hint`` does when it is not given)."""

    def __init__(
        self, hint: Callable[[str, bool], None], gone: Callable[[str], None] | None = None
    ) -> None:
        self._hint = hint
        self._gone = gone

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            self._tell(event)
        except Exception:  # pragma: no cover - defensive: must never reach watchdog
            log.exception("error while handling a file event")

    def _tell(self, event: FileSystemEvent) -> None:
        if event.is_synthetic:
            return  # made up by watchdog for what a folder moved in holds: stowd walks it
        path = os.fsdecode(getattr(event, "dest_path", "") or event.src_path)
        if event.is_directory:
            if event.event_type in ("created", "moved"):
                self._hint(path, True)  # a folder moved in: scan what it holds
        elif self._gone is not None and event.event_type == "deleted":
            self._gone(path)
        else:
            self._hint(path, False)


class Watcher:
    """One drop folder: its observer, its scans and its quiet-period bookkeeping."""

    def __init__(
        self,
        source: Source,
        destination: str,
        sink: Sink,
        *,
        exclude: tuple[Path, ...] = (),
        clock: Callable[[], float] = time.time,
        on_error: OnError | None = None,
        on_queue_error: Callable[[QueueError], None] | None = None,
    ) -> None:
        """``on_error(path, exc)`` hears of every folder or file that cannot be read (not of
        ones that vanish): the daemon finds them again at its next rescan, a one-shot scan
        (``stowd migrate``) counts them as failures."""
        self.source = source
        self.on_error = on_error
        # The sink failed: the daemon's watchers say so (a full disk) and rescan later; without
        # it (a one-shot scan) the error is raised to the caller, never swallowed.
        self.on_queue_error = on_queue_error
        self.destination = destination
        self.sink = sink
        self.clock = clock
        # a receiving source's finished files wait in its own hidden folder for their name
        parts = () if source.receive is None else (source.watch / INCOMING,)
        self.exclude = tuple(str(p) for p in (source.sent, source.failed, *parts, *exclude))
        self._places = Places(source.watch, self.exclude, source.ignore)
        self._hints: set[str] = set()
        self._gone: set[str] = set()
        self._folders: set[str] = set()
        self._hint_lock = threading.Lock()
        self._wake = threading.Event()
        self._due: list[tuple[float, str]] = []
        self._instant: float | None = None  # while files are checked: see _now
        self._scheduled: set[str] = set()
        self._unlisted: set[str] = set()  # folders the walk under way could not list whole
        self._linked_folders: set[str] = set()
        self._too_long: set[str] = set()  # folders whose path the system cannot open
        self._too_deep = False  # watched without recursion: watchdog's walk ran out of stack
        self._lonely: set[str] = set()  # sidecars without a file, warned about once
        # folders holding only sidecars: since when, and (folder, sidecar) mtimes then
        self._idle_since: dict[str, tuple[float, tuple[int, int]]] = {}
        self._texts: dict[str, tuple[tuple[int, ...], str]] = {}  # sidecar texts
        self._said: set[str] = set()  # files whose sidecar trouble was logged
        # (size, mtime_ns, first seen) of files whose mtime cannot be trusted to say how
        # long they have been quiet (in the future, or on a share)
        self._future: dict[str, tuple[int, int, float]] = {}
        self._observer: BaseObserver | None = None
        self._rescan_requested = False
        self._folder: tuple[int, int] | None = None  # (st_dev, st_ino) of the watched folder
        self._missing = False  # the watch folder was deleted and is not back yet
        self._next_folder_check = 0.0
        self._rescan_not_before = 0.0  # a queue that could not be written: not sooner
        self._sink_failing = False
        self.beat = time.monotonic()  # last sign of progress (the daemon's watchdog reads it)

    @property
    def waiting(self) -> int:
        """Files seen but not complete yet (still being written, or the quiet period runs)."""
        return len(self._scheduled)

    # -- hints from watchdog --------------------------------------------------------------
    def hint(self, path: str, folder: bool = False) -> None:
        with self._hint_lock:
            (self._folders if folder else self._hints).add(path)
        self._wake.set()

    def wake(self) -> None:
        """Look at ``stop`` (and at hints) now rather than after the idle wait."""
        self._wake.set()

    def gone(self, path: str) -> None:
        """A file was deleted or moved away: stowd's own moves to sent/ say so for each file.
        It wakes the watcher only when the file's quiet period is being watched: any other
        is dropped by ``_take_hints`` (a file watched since, after this look, has its recheck
        due, which wakes the watcher and takes it)."""
        with self._hint_lock:
            self._gone.add(path)
        if path in self._future:
            self._wake.set()

    def _take_hints(self) -> tuple[list[str], list[str]]:
        """The files and the folders to look at.  A file gone matters only when its state
        was being watched (``_future``): were it back, its return has an event of its own."""
        with self._hint_lock:
            gone, self._gone = self._gone, set()
            self._hints.update(path for path in gone if path in self._future)
            hints, self._hints = list(self._hints), set()
            folders, self._folders = list(self._folders), set()
        return hints, folders

    # -- observer -----------------------------------------------------------------------
    def start_observer(self) -> None:
        if hasattr(_MovePairing, "delay"):  # read by each new inotify watch (not an API: may go)
            _MovePairing.delay = min(_MovePairing.delay, MOVE_PAIRING)
        cls = PollingObserver if self.source.polling else Observer
        observer = cls(timeout=POLL_INTERVAL) if self.source.polling else cls()
        try:
            self.source.watch.mkdir(parents=True, exist_ok=True)
            self._folder = _folder_identity(self.source.watch)
            observer = self._started(observer, recursive=True)
        except RecursionError:  # watchdog walks the folders recursively to watch them
            observer = self._top_only()
        except OSError as exc:
            log.error(
                "source %s: cannot watch %s for events (%s); relying on rescans every %ss",
                self.source.name,
                self.source.watch,
                exc,
                self.source.rescan_interval,
            )
            return
        self._observer = observer

    def _started(self, observer: BaseObserver, *, recursive: bool) -> BaseObserver:
        handler = _Handler(self.hint, self.gone)
        observer.schedule(handler, str(self.source.watch), recursive=recursive, event_filter=EVENTS)
        observer.daemon = True
        observer.start()
        return observer

    def _top_only(self) -> BaseObserver:
        """Folders nested too deep for watchdog's recursive walk: events from the watch
        folder itself only; the rescans find the files below it (said once)."""
        if not self._too_deep:
            self._too_deep = True
            log.warning(
                "source %s: folders in %s are nested too deep to watch them all for events "
                "(RecursionError); only files dropped directly into it are seen at once, the "
                "others at the next rescan (every %ss)",
                self.source.name,
                self.source.watch,
                self.source.rescan_interval,
            )
        cls = PollingObserver if self.source.polling else Observer
        observer = cls(timeout=POLL_INTERVAL) if self.source.polling else cls()
        return self._started(observer, recursive=False)

    def observer_alive(self) -> bool:
        return self._observer is not None and self._observer.is_alive()

    def stop_observer(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def _ensure_observer(self) -> None:
        if self._missing:
            return  # started again when the folder is back (starting creates the folder)
        if self._observer is not None and not self._observer_works(self._observer):
            log.warning("source %s: the file observer died; restarting it", self.source.name)
            self.stop_observer()
            self._observer = None
            _forget_dead_reader()
            self.start_observer()
            self._rescan_requested = True

    # -- the loop -------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Watch until ``stop`` is set: scan now, then handle hints, rechecks and rescans.
        A receiving source's folder is only scanned: its receiver queues what it writes, and a
        scan finds a file it wrote but could not queue (a crash in between)."""
        if self.source.receive is None:
            self.start_observer()
        try:
            self._loop(stop)
        finally:
            self.stop_observer()

    def _loop(self, stop: threading.Event) -> None:
        next_scan = 0.0
        while not stop.is_set():
            self.beat = time.monotonic()
            hints, folders = self._take_hints()
            if self._rescan_due() or time.monotonic() >= next_scan:
                self._rescan_requested = False
                self.scan(stop)
                next_scan = time.monotonic() + self.source.rescan_interval
            listed = self._walk_folders(folders, stop)
            self._check_all(self._unchecked(hints, listed))
            self._check_all(self._pop_due(), checked=True)
            self._check_folder()
            self._ensure_observer()
            self._wake.wait(self._wait_time(next_scan))
            self._wake.clear()

    def _walk_folders(self, folders: list[str], stop: threading.Event) -> set[str]:
        """Walk the folders events named (moved in, created): the folders listed whole.
        One inside another is walked once, with the outer one."""
        listed: set[str] = set()
        for folder in sorted(folders, key=len):
            if folder not in listed and self._wanted(folder):
                self._check_all(self._walk(folder, listed), stop, checked=True)
        return listed

    def _unchecked(self, hints: list[str], listed: set[str]) -> Iterator[str]:
        """The hinted files not looked at already: not waiting for a recheck (it looks;
        but a file whose unchanged look is being counted is looked at, so that a change
        starts the count when it happened), not in a folder just listed whole (events came
        before the listing, which saw the file as it is now).  The events of a file being
        written, or of a folder moved in, cost a check each otherwise."""
        for path in hints:
            if path in self._scheduled and path not in self._future:
                continue
            if os.path.dirname(path) not in listed:
                yield path

    # -- the watch folder itself ----------------------------------------------------------
    def _check_folder(self) -> None:
        """Deleted: say so once.  Back (or replaced by a new folder): say so, watch the new
        folder at once and scan it, since its events went to the old one."""
        now = time.monotonic()
        if now < self._next_folder_check:
            return
        self._next_folder_check = now + FOLDER_CHECK
        try:
            current = _folder_identity(self.source.watch)
        except (FileNotFoundError, NotADirectoryError):
            self._folder_gone()
            return
        except OSError:
            return  # unreadable: the scans say why
        if self._missing:
            self._folder_back("is back")
        elif self._folder is not None and current != self._folder:
            self._folder_back("was deleted and created again")
        elif self._watch_ended():  # the same inode number, given to the new folder
            self._folder_back("is watched no more (deleted and created again?)")

    @staticmethod
    def _observer_works(observer: BaseObserver) -> bool:
        """Alive, and none of its watches died of an error: a folder nested too deep moved in
        makes watchdog's walk raise ``RecursionError`` in a thread of its own (in watchdog 7
        the one thread that reads the events of every watch of the process)."""
        return observer.is_alive() and not any(
            (not e.is_alive() and not e.stopped_event.is_set()) or _reader_died(e)
            for e in observer.emitters
        )

    def _watch_ended(self) -> bool:
        """watchdog ends a watch whose folder was deleted, while its observer lives on."""
        observer = self._observer
        return observer is not None and any(e.stopped_event.is_set() for e in observer.emitters)

    def _folder_gone(self) -> None:
        if self._missing:
            return
        self._missing = True
        self.stop_observer()
        log.warning(
            "source %s: the watch folder %s was deleted; files dropped there now are lost to "
            "stowd until it is back; watching resumes when it is created again",
            self.source.name,
            self.source.watch,
        )

    def _folder_back(self, was: str) -> None:
        self._missing = False
        log.warning(
            "source %s: the watch folder %s %s; watching it again",
            self.source.name,
            self.source.watch,
            was,
        )
        self.stop_observer()
        self.start_observer()
        self._rescan_requested = True
        self._wake.set()

    def _rescan_due(self) -> bool:
        return self._rescan_requested and time.monotonic() >= self._rescan_not_before

    def _wait_time(self, next_scan: float) -> float:
        wait = min(IDLE_WAIT, max(0.0, next_scan - time.monotonic()))
        if self._due:
            wait = min(wait, max(0.0, self._due[0][0] + GATHER - self.clock()))
        return wait

    def _pop_due(self) -> list[str]:
        now = self.clock()
        paths = []
        while self._due and self._due[0][0] <= now:
            path = heapq.heappop(self._due)[1]
            self._scheduled.discard(path)
            paths.append(path)
        return paths

    # -- scanning and checking ------------------------------------------------------------
    def scan(self, stop: threading.Event | None = None) -> None:
        """Walk the whole drop folder once (lazily: memory does not grow with its size)."""
        started = time.monotonic()
        top = str(self.source.watch)
        found = self._check_all(self._walk(top), stop, checked=True) if self._wanted(top) else 0
        self._forget_gone()
        log.debug(
            "source %s: scan of %s found %d new file(s) in %.1fs",
            self.source.name,
            self.source.watch,
            found,
            time.monotonic() - started,
        )

    def _forget_gone(self) -> None:
        """Forget what was seen of files that are no longer there (sidecars removed after
        their files were sent), so that this memory does not grow over months."""
        for path in list(self._future):
            if not os.path.lexists(path):
                del self._future[path]

    def _walk(self, top: str, listed: set[str] | None = None) -> Iterator[str]:
        """The files below ``top``, walked lazily and without recursion (``walk_folders``:
        folders nested thousands deep once killed the watcher with ``RecursionError``).
        Only names are checked on the way: ``top`` must be wanted.  ``listed`` gets each
        folder whose files were all yielded (and so checked) without an error."""
        unlisted = self._unlisted = set()
        for folder, entries in walk_folders(top, self._enters, self._cannot_list):
            yield from self._files_in(folder, entries)
            if listed is not None and folder not in unlisted:
                listed.add(folder)

    def _enters(self, entry: os.DirEntry[str]) -> bool:
        """Is the sub-folder ``entry`` walked (not an ignored name, not excluded)?"""
        return not self._ignored(entry.name) and entry.path not in self.exclude

    def _files_in(self, folder: str, entries: Iterator[os.DirEntry[str]]) -> Iterator[str]:
        """The files among ``folder``'s entries (its sub-folders are walked by the caller).
        An entry that cannot be checked is never the end of its folder's listing."""
        try:
            for entry in entries:
                if self._ignored(entry.name) or entry.path in self.exclude:
                    continue
                if self._is_file(entry):
                    yield entry.path
        except OSError as exc:
            self._cannot_list(folder, exc)

    def _is_file(self, entry: os.DirEntry[str]) -> bool:
        """Is ``entry`` a file to queue?  A regular file, or a link to one (sent, or refused
        with its reason when links are not followed).  A link that loops (checking it
        raises ELOOP), or leads to nothing, is queued when links are not followed, so that
        it goes to failed/ with the reason for links instead of staying unmentioned; a
        followed one that cannot be checked stays, as a FIFO or a socket does."""
        try:
            if entry.is_dir(follow_symlinks=False):
                return False
            if entry.is_file():
                return True
            if entry.is_dir():
                self._skip_linked_folder(entry.path)
                return False
        except OSError:
            pass  # vanished, or a link that loops
        try:
            return entry.is_symlink() and not self.source.follow_links
        except OSError:
            return False

    def _cannot_list(self, folder: str, exc: OSError) -> None:
        self._unlisted.add(folder)
        level = logging.ERROR if folder == str(self.source.watch) else logging.WARNING
        if isinstance(exc, FileNotFoundError):
            level = logging.DEBUG  # a folder removed while the scan ran
        if exc.errno == errno.ENAMETOOLONG:
            self._say_too_long(folder, "folder")
            self._unreadable(folder, exc)
            return
        log.log(level, "source %s: cannot read %s: %s", self.source.name, folder, exc)
        self._unreadable(folder, exc)

    def _say_too_long(self, path: str, what: str) -> None:
        """A path the system cannot open (ENAMETOOLONG): said once, not at every rescan."""
        if path in self._too_long:
            return
        self._too_long.add(path)
        below = "no file below it is" if what == "folder" else "it is not"
        log.warning(
            "source %s: cannot read the %s %s: its path is %d bytes long, longer than the "
            "system can open (%d); %s sent; move it to a shorter path",
            self.source.name,
            what,
            path,
            len(os.fsencode(path)),
            PATH_MAX,
            below,
        )

    def _unreadable(self, path: str, exc: OSError) -> None:
        if self.on_error is not None and not isinstance(exc, FileNotFoundError):
            self.on_error(path, exc)

    def _skip_linked_folder(self, path: str) -> None:
        """Symlinked folders are not followed (loops); say so once, not at every scan."""
        if path not in self._linked_folders:
            self._linked_folders.add(path)
            log.warning(
                "source %s: not following the symlinked folder %s; drop files into real "
                "folders or watch its target as a source of its own",
                self.source.name,
                path,
            )

    def _check_all(
        self,
        paths: Iterator[str] | list[str],
        stop: threading.Event | None = None,
        *,
        checked: bool = False,
    ) -> int:
        """Check ``paths`` and queue the complete files; ``checked``: they are known to be
        wanted (found by a walk, or scheduled after a check), only their state is looked at."""
        chunk: list[NewFile] = []
        added = 0
        self._instant = self.clock()  # the files of one chunk are judged at one instant
        try:
            for path in paths:
                if stop is not None and stop.is_set():
                    break
                self.beat = time.monotonic()  # a long scan is progress too
                new = self._check(path, checked)
                if new is not None:
                    chunk.append(new)
                if len(chunk) >= ENQUEUE_CHUNK:
                    added += self._flush(chunk)
                    self._instant = self.clock()
            return added + self._flush(chunk)
        finally:
            self._instant = None

    def _now(self) -> float:
        """The instant files are judged at: one per chunk of a walk or a list of due files,
        so that files whose quiet periods end at the same moment are never split between a
        chunk queued now and a file scheduled a few ms later (they go out in one request)."""
        return self.clock() if self._instant is None else self._instant

    def _flush(self, chunk: list[NewFile]) -> int:
        if not chunk:
            return 0
        try:
            added = self.sink(list(chunk))
        except QueueError as exc:
            if self.on_queue_error is None:  # a one-shot scan (stowd migrate): it must know
                raise
            self._sink_failed(exc, self.on_queue_error)
            return 0
        finally:
            chunk.clear()
        if added:  # a write went through (a chunk of known files may write nothing)
            ring()  # the readers and senders waiting for work look now
            self._sink_works()
            counters.queued(self.source.name, self.destination, added)
        return added

    def _sink_failed(self, exc: QueueError, tell: Callable[[QueueError], None]) -> None:
        """The queue cannot be written (its disk is full): nothing was queued.  The files
        are found again by a rescan once ``QUEUE_RETRY`` has passed; said once."""
        self._rescan_requested = True
        self._rescan_not_before = time.monotonic() + QUEUE_RETRY
        tell(exc)
        if not self._sink_failing:
            level = logging.DEBUG if isinstance(exc, QueueFull) else logging.WARNING
            log.log(
                level, "source %s: cannot queue files now: %s; tried again", self.source.name, exc
            )
        self._sink_failing = True

    def _sink_works(self) -> None:
        if self._sink_failing:
            log.info("source %s: files are queued again", self.source.name)
        self._sink_failing = False

    def _check(self, path: str, checked: bool = False) -> NewFile | None:
        """A ``NewFile`` when ``path`` is complete; otherwise maybe schedule a recheck."""
        if not checked and not self._wanted(path):
            return None
        st: os.stat_result | None
        try:
            st = os.stat(path)
        except OSError as exc:
            st = self._unfollowed_link(path)
            if st is None:
                self._future.pop(path, None)
                if exc.errno == errno.ENAMETOOLONG:
                    self._say_too_long(path, "file")
                self._unreadable(path, exc)  # a folder listed but not searchable (mode r--)
                return None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            return None
        if self._is_sidecar(path):
            self._look_at_sidecar(path, st)
            return None
        return self._if_complete(path, st)

    def _unfollowed_link(self, path: str) -> os.stat_result | None:
        """The link itself, when ``path`` is a link that loops or leads nowhere and links are
        not followed: it is queued like any link, to go to failed/ with the reason."""
        if self.source.follow_links:
            return None
        try:
            st = os.lstat(path)
        except OSError:
            return None
        return st if stat.S_ISLNK(st.st_mode) else None

    def _if_complete(self, path: str, st: os.stat_result) -> NewFile | None:
        """A ``NewFile`` when the file and its sidecars were quiet long enough."""
        try:
            found = self._sidecars_of(path)
        except FileUnreadable as exc:
            self._say_once(path, f"not queued yet, its sidecar cannot be read: {exc}")
            return None
        wait = max(self._quiet_left(path, st.st_size, st.st_mtime_ns), self._sidecars_left(found))
        if wait > 0:
            if path not in self._scheduled:
                self._scheduled.add(path)
                heapq.heappush(self._due, (self._now() + wait, path))
            return None
        rel = self._places.relative(path) or os.path.relpath(path, self.source.watch)
        snapshot = None if self.source.sidecars is None else partial(self._snapshot, path, found)
        return NewFile(
            self.source.name,
            self.destination,
            path,
            rel,
            st.st_size,
            st.st_mtime_ns,
            snapshot=snapshot,
        )

    def _sidecars_of(self, path: str) -> list[tuple[Path, os.stat_result]]:
        """The sidecars of a file, each with its stat (checked for quiet, then read)."""
        settings = self.source.sidecars
        if settings is None:
            return []
        found = []
        for p in sidecar.sidecars_of(Path(path), settings):
            try:
                found.append((p, p.stat()))
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise FileUnreadable.from_os_error(exc, str(p)) from exc
        return found

    def _sidecars_left(self, found: list[tuple[Path, os.stat_result]]) -> float:
        """A file is complete only when its sidecars (its own, its folder's) are complete too."""
        waits = [self._quiet_left(str(p), st.st_size, st.st_mtime_ns, keep=True) for p, st in found]
        return max(waits, default=0.0)

    def _snapshot(self, path: str, found: list[tuple[Path, os.stat_result]]) -> str:
        """The sidecars checked for quiet and their text: they belong to the file from here
        on (a folder's sidecar may describe the next patient by the time the file is read).
        A sidecar that changed since, or cannot be read now, keeps the file back."""
        entries: list[list[str | None]] = []  # [path, text, problem, base64 of raw bytes]
        for p, st in found:
            try:
                text, problem = self._text_of(p, st), None
            except (FileVanished, OSError) as exc:  # being replaced: look again next scan
                raise SidecarNotReady(f"sidecar {p} changed while it was read") from exc
            except FileProblem as exc:  # not UTF-8, too large: the file fails with this
                entries.append(_problem_entry(p, st, exc))
                continue
            except FileUnreadable as exc:
                self._say_once(path, f"not queued yet, its sidecar cannot be read: {exc}")
                raise SidecarNotReady(str(exc)) from exc
            entries.append([str(p), text, problem])
        return json.dumps(entries)

    def _text_of(self, path: Path, checked: os.stat_result) -> str:
        """A sidecar's text as it was when checked for quiet (else ``SidecarNotReady``);
        read again only when it changed, since a folder's sidecar serves all its files."""
        key = _identity(checked)
        cached = self._texts.get(str(path))
        if cached is None or cached[0] != key:
            text = sidecar.read_text(path)
            if _identity(path.stat()) != key:
                raise SidecarNotReady(f"sidecar {path} changed while it was read")
            if len(self._texts) > TEXT_CACHE:
                self._texts.clear()
            cached = self._texts[str(path)] = (key, text)
        return cached[1]

    def _say_once(self, path: str, message: str) -> None:
        if path not in self._said:
            self._said.add(path)
            log.warning("source %s: %s: %s", self.source.name, path, message)

    def _is_sidecar(self, path: str) -> bool:
        settings = self.source.sidecars
        return settings is not None and sidecar.is_sidecar(Path(path), settings)

    def _look_at_sidecar(self, path: str, st: os.stat_result) -> None:
        """A complete sidecar no file uses: a folder's is retired once the folder was idle
        for ``folder_linger`` (it was copied with its files); any other is reported once."""
        settings = self.source.sidecars
        if settings is None or self._quiet_left(path, st.st_size, st.st_mtime_ns, keep=True) > 0:
            return
        try:
            if Path(path).name == settings.folder:
                self._retire_folder_sidecar(Path(path), settings)
            elif not sidecar.still_needed(Path(path), settings, leaving=()):
                self._say_lonely(path)
        except (OSError, FileUnreadable) as exc:
            log.debug("source %s: cannot look at sidecar %s: %s", self.source.name, path, exc)

    def _retire_folder_sidecar(self, path: Path, settings: Sidecars) -> None:
        """Idle time is counted by this watcher's own clock from the first look that found
        the folder without other files, and starts over whenever the folder or the sidecar
        changed between two looks (files came and went; a share's clock may be off)."""
        folder = path.parent
        if sidecar.folder_in_use(folder, settings):
            self._idle_since.pop(str(folder), None)
            return
        look = (folder.stat().st_mtime_ns, path.stat().st_mtime_ns)
        since, seen = self._idle_since.get(str(folder), (self.clock(), look))
        if seen != look:
            since = self.clock()
        self._idle_since[str(folder)] = (since, look)
        if self.clock() - since < settings.folder_linger:
            return  # looked at again by a later scan
        rel = folder.relative_to(self.source.watch)
        copies = (self.source.sent / rel, self.source.failed / rel)
        if not any(has_copy(path, place) for place in copies):
            self._say_lonely(str(path))  # this content was never used by a file
            return
        if sidecar.folder_in_use(folder, settings):  # a file arrived meanwhile
            return
        path.unlink(missing_ok=True)
        self._idle_since.pop(str(folder), None)
        log.info(
            "source %s: removed %s: its folder held no other file for %.0fs and a copy went "
            "with its files to sent/ or failed/",
            self.source.name,
            path,
            settings.folder_linger,
        )
        if self.source.remove_empty_dirs:
            remove_empty_parents(path, self.source.watch)

    def _say_lonely(self, path: str) -> None:
        if path in self._lonely:
            return
        self._lonely.add(path)
        log.warning(
            "source %s: sidecar %s describes no file in its folder; it is not sent and "
            "stays there until its file arrives (or remove it)",
            self.source.name,
            path,
        )

    def _quiet_left(self, path: str, size: int, mtime_ns: int, *, keep: bool = False) -> float:
        """Seconds until the file has been quiet for the quiet period (0: complete now).

        An mtime in the past was stamped by this machine's clock on a local folder, so one
        look tells how long the file has been quiet.  On a share (``polling``) the mtime
        comes from another machine's clock, which may run behind ours: a file written just
        now could look quiet for minutes.  There, as for an mtime in the future, the file
        must show the same size and mtime for the quiet period by stowd's own clock.
        ``keep``: a sidecar, which many files may ask about in turn: what was seen of it is
        kept while it stays the same (a file's is forgotten once it is complete).
        """
        now = self._now()
        mtime = mtime_ns / 1e9
        quiet = self.source.quiet_period
        if mtime <= now and not self.source.polling:
            self._future.pop(path, None)
            return max(0.0, quiet - (now - mtime))
        return self._seen_quiet(path, size, mtime_ns, now, keep)

    def _seen_quiet(self, path: str, size: int, mtime_ns: int, now: float, keep: bool) -> float:
        """Seconds left until ``path`` was seen unchanged for the quiet period."""
        quiet = self.source.quiet_period
        if quiet <= 0:
            return 0.0  # nothing to wait for, nothing to remember
        seen = self._future.get(path)
        if seen is None or seen[:2] != (size, mtime_ns):
            self._future[path] = (size, mtime_ns, now)
            return quiet
        left = quiet - (now - seen[2])
        if left <= 0 and not keep:
            del self._future[path]
        return max(0.0, left)

    def _wanted(self, path: str) -> bool:
        return self._places.wanted(path)

    def _ignored(self, name: str) -> bool:
        return self._places.ignored(name)


def _reader_died(emitter: object) -> bool:
    """watchdog 7's inotify watches share one reading thread; it ended with an error."""
    reader = getattr(emitter, "_inotify_fd", None)
    return isinstance(reader, threading.Thread) and not reader.is_alive()


def _forget_dead_reader() -> None:
    """watchdog 7 keeps its shared reading thread once made, even dead: no watch made after
    it died would ever see an event.  Forget a dead one, so the next watch starts a new one
    (the watchdog versions without it are left alone)."""
    lock = getattr(_SharedReader, "_global_lock", None)
    if lock is None:
        return
    with lock:
        shared = getattr(_SharedReader, "_instance", None)
        if isinstance(shared, threading.Thread) and not shared.is_alive():
            with contextlib.suppress(Exception):
                shared.close()  # type: ignore[attr-defined]  # its inotify descriptor
            _SharedReader._instance = None


def _problem_entry(path: Path, checked: os.stat_result, exc: FileProblem) -> list[str | None]:
    """A sidecar that is not text: its problem and bytes, unless it was caught mid-rewrite."""
    raw = _raw(path)
    try:
        same = _identity(path.stat()) == _identity(checked)
    except OSError:
        same = False
    if not same:
        raise SidecarNotReady(f"sidecar {path} changed while it was read") from exc
    return [str(path), None, str(exc), raw]


def _raw(path: Path) -> str | None:
    """A small sidecar's bytes (base64), kept to copy it to failed/ as it was found."""
    try:
        with sidecar.open_plain(path) as fp:  # never through a link (a planted secret)
            data = fp.read(RAW_LIMIT + 1)
    except (OSError, FileProblem):
        return None
    return None if len(data) > RAW_LIMIT else base64.b64encode(data).decode()


def _folder_identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"{path} is not a folder")
    return st.st_dev, st.st_ino


def _identity(st: os.stat_result) -> tuple[int, ...]:
    """What changes when a file is rewritten, even to the same size within one mtime tick."""
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
