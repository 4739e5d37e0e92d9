"""Is a disk stowd writes to full?  The queue, the spool, and every source's sent/ and failed/.

A place is full when its filesystem has less than ``FULL_BELOW`` bytes free for stowd
(``statvfs``: the blocks available to an unprivileged user), or when a write there failed
for lack of space (ENOSPC, EDQUOT, SQLITE_FULL) and no space was freed since.  ``stowd
status`` (another process) sees the first kind only; the daemon sees both, logs each
condition once when it starts (ERROR) and once when it ends (WARNING), and puts it into
systemd's ``STATUS=`` line.  Nothing here writes: it only looks.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stowd.config.model import Config

log = logging.getLogger("stowd.disk")

FULL_BELOW = 1024 * 1024  # bytes free below which a filesystem counts as full
HIT_MEMORY = 600.0  # a failed write counts this long at most, if nothing fails again


@dataclass(frozen=True)
class Place:
    """A folder stowd writes to, and what stops while its filesystem is full."""

    name: str  # "the queue", "the spool", "sent/ of source ct1"
    path: Path
    stops: str
    short: str  # for the 80-character STATUS= line


@dataclass(frozen=True)
class Full:
    """A full filesystem: the places on it, and the bytes free (None: unknown)."""

    places: tuple[Place, ...]
    free: int | None

    @property
    def key(self) -> Path:
        return self.places[0].path

    @property
    def paths(self) -> list[Path]:
        return [p.path for p in self.places]

    def message(self) -> str:
        free = "an unknown amount" if self.free is None else _bytes(self.free)
        if self.free is not None and self.free >= FULL_BELOW:  # a quota, or just filled
            free += ", but a write there failed for lack of space (a quota?)"
        return (
            f"DISK FULL: {_whose(self.places)} ({self.key}) has {free} free: "
            f"{'; '.join(p.stops for p in self.places)} until space is freed"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "places": [p.name for p in self.places],
            "path": str(self.key),
            "free_bytes": self.free,
            "message": self.message(),
        }


def places(config: Config) -> list[Place]:
    """Every place of ``config`` that stowd writes to (each folder once)."""
    found = [
        Place("the queue", config.queue.parent, "nothing can be queued or settled", "queue"),
        Place(
            "the spool",
            config.spool,
            "files the rules change, and files made DICOM, cannot be sent",
            "spool",
        ),
    ]
    for source in config.sources:
        name = source.name
        stored = "files the archive stored cannot be moved to sent/"
        found.append(Place(f"sent/ of source {name}", source.sent, stored, f"sent/ {name}"))
        failed = "files that failed cannot be moved to failed/"
        found.append(Place(f"failed/ of source {name}", source.failed, failed, f"failed/ {name}"))
    unique: dict[Path, Place] = {}
    for place in found:
        unique.setdefault(place.path, place)
    return list(unique.values())


def free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged user may still write on ``path``'s filesystem (the nearest
    existing folder's); None when it cannot be looked at."""
    return _look(path)[0]


def _look(path: Path) -> tuple[int | None, int | None]:
    """(bytes free, device) of ``path``'s filesystem (of the nearest existing folder)."""
    for folder in (path, *path.parents):
        try:
            st = os.statvfs(folder)
            dev = os.stat(folder).st_dev
        except FileNotFoundError:
            continue
        except OSError:
            return None, None
        return st.f_bavail * st.f_frsize, dev
    return None, None


def _by_filesystem(places: list[Place]) -> list[tuple[tuple[Place, ...], int | None]]:
    """The places grouped by filesystem (in their order), with its bytes free."""
    groups: dict[object, tuple[list[Place], int | None]] = {}
    for place in places:
        free, dev = _look(place.path)
        group = groups.setdefault(place.path if dev is None else dev, ([], free))
        group[0].append(place)
    return [(tuple(found), free) for found, free in groups.values()]


def full_places(config: Config) -> list[Full]:
    """The filesystems of ``config``'s places with less than ``FULL_BELOW`` bytes free
    (what ``stowd status``, another process, can see)."""
    return [
        Full(group, free)
        for group, free in _by_filesystem(places(config))
        if free is not None and free < FULL_BELOW
    ]


class Disks:
    """The daemon's view: which places are full, logged once per condition."""

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.places = places(config)
        self.clock = clock
        self._lock = threading.Lock()
        self._hits: dict[Path, tuple[float, int | None]] = {}  # when, bytes free then
        self._full: dict[Path, Full] = {}
        self._ended: dict[Path, float] = {}  # place -> when a check logged its space back
        self._freed = False  # the last check found space again where there was none

    def watch(self, config: Config) -> None:
        """Look at the places of ``config`` from now on (a reload)."""
        with self._lock:
            self.places = places(config)

    def hit(self, path: Path, *, at: float | None = None) -> None:
        """A write at or below ``path`` failed for lack of space (any thread), ``at`` this
        time (``clock``; None: now).  A write that failed before a check logged the space
        back on its filesystem belongs to the full disk that was logged then and ended: told
        late (a sender raises its settle thread's error when it waits for that batch), it is
        not a new one."""
        place = self._place_of(path)
        if place is None:
            return
        with self._lock:
            if at is not None and at <= self._ended.get(place.path, float("-inf")):
                return
        free = free_bytes(place.path)
        with self._lock:  # it failed then, maybe freed since: the fewest bytes free count
            before = self._seen_full(place), self._hits.get(place.path, (0.0, None))[1]
            if free is not None:
                free = _least([free, *before])
            self._hits[place.path] = (self.clock(), free)

    def check(self) -> list[Full]:
        """Look at every place now; log the conditions that started or ended.  A condition
        that started and ended between two looks (a write failed for lack of space, and
        space was freed before this look) is logged too: its start, then its end."""
        now = self.clock()
        with self._lock:
            watched, before = list(self.places), dict(self._full)
        current, passed = {}, {}
        for group, free in _by_filesystem(watched):
            freed: list[int | None] = []  # bytes free when each freed write failed
            if any(self._is_full(place, free, now, freed) for place in group):
                full = Full(group, free)
                current[full.key] = full
            elif freed and group[0].path not in before:
                passed[group[0].path] = Full(group, _least(freed))
        ended = [*(before[key] for key in before.keys() - current.keys()), *passed.values()]
        with self._lock:
            self._full = current
            self._freed = bool(ended)
            self._ended.update((place.path, now) for full in ended for place in full.places)
        for full in [*(current[key] for key in current.keys() - before.keys()), *passed.values()]:
            log.error("%s; stowd waits and tries again (nothing is lost)", full.message())
        for full in ended:
            _say_resumed(full)
        return list(current.values())

    @property
    def freed(self) -> bool:
        """The last ``check`` found space again on a filesystem that was full, or where a
        write had failed for lack of space."""
        with self._lock:
            return self._freed

    @property
    def full(self) -> list[Full]:
        """The full places as the last ``check`` found them."""
        with self._lock:
            return list(self._full.values())

    def _is_full(self, place: Place, free: int | None, now: float, freed: list[int | None]) -> bool:
        """Is ``place`` full?  A failed write that space was freed since is added to
        ``freed`` (its bytes free then), and forgotten."""
        if free is not None and free < FULL_BELOW:
            return True
        with self._lock:
            hit = self._hits.get(place.path)
            if hit is None:
                return False
            when, free_then = hit
            if free is not None and (free_then is None or free >= free_then + FULL_BELOW):
                del self._hits[place.path]
                freed.append(free_then)
                return False
            if now - when > HIT_MEMORY:
                del self._hits[place.path]
                return False
        return True

    def _seen_full(self, place: Place) -> int | None:
        """The bytes free the last check saw on ``place``'s filesystem, if it had fewer
        than ``FULL_BELOW`` then (None otherwise).  Holds ``_lock``."""
        for full in self._full.values():
            if place in full.places and full.free is not None and full.free < FULL_BELOW:
                return full.free
        return None

    def _place_of(self, path: Path) -> Place | None:
        """The place ``path`` is in (the longest folder that holds it)."""
        holding = [p for p in self.places if path == p.path or p.path in path.parents]
        return max(holding, key=lambda p: len(p.path.parts), default=None)


def short(full: Iterable[Full]) -> str:
    """``DISK FULL: queue, sent/ ct1`` for the STATUS= line ("" when none)."""
    names = [p.short for f in full for p in f.places]
    return f"DISK FULL: {', '.join(names)}" if names else ""


def _whose(places: tuple[Place, ...]) -> str:
    """``the queue's filesystem``, or ``the filesystem of the queue and the spool``."""
    if len(places) == 1:
        return f"{places[0].name}'s filesystem"
    names = [p.name for p in places]
    return f"the filesystem of {', '.join(names[:-1])} and {names[-1]}"


def _say_resumed(full: Full) -> None:
    free = free_bytes(full.key)
    room = "" if free is None else f" ({_bytes(free)} free)"
    log.warning("%s (%s) has space again%s; resuming", _whose(full.places), full.key, room)


def _least(free: list[int | None]) -> int | None:
    """The fewest bytes free of ``free`` (None: unknown, when all are; unknown ones are
    left out)."""
    known = [n for n in free if n is not None]
    return min(known, default=None)


def _bytes(n: int) -> str:
    return f"{n} bytes" if n < 10**6 else f"{n / 10**6:.1f} MB"
