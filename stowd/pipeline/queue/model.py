"""What the queue holds and hands out, whichever database keeps it: the rows as the pipeline
sees them (``Job``, ``NewFile``, ``Classification``, ...), the counts ``stowd status`` reads
(``Tally``, ``Throughput``, ``ActiveView``), the states and notes, and the helpers of both
backends that speak no SQL."""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from stowd.errors import SidecarNotReady

log = logging.getLogger("stowd.queue")

ALREADY_STORED = "already stored"  # the note of a file the archive said it already held
# the note of a file stored with the archive's WarningReason, followed by its code ("... B100")
STORED_WITH_WARNING = "stored with warning"
ACTIVE = ("pending", "claimed", "settling")
DONE = ("sent", "failed", "gone")
HISTORY_SPAN = 25 * 3600  # seconds of throughput kept: a day, and a day with a DST change
LOOKUP_MEMORY = 86_400.0  # cached lookup answers older than this are deleted


@dataclass(frozen=True)
class Job:
    """One queued file as the workers see it."""

    id: int
    source: str
    destination: str
    path: str
    rel: str
    size: int
    mtime_ns: int
    kind: str | None
    study_uid: str | None
    sop_uid: str | None
    attempts: int
    first_try: float | None
    error: str | None = None
    outcome: str | None = None
    target: str | None = None
    changes: str | None = None  # JSON {"set": {...}, "remove": [...]} from the rules
    sidecars: str | None = None  # JSON [[path, text], ...]: the sidecars it was read with
    made: str | None = None  # JSON of the UIDs made for a file that is not DICOM
    queued_at: float | None = None
    lookup: str | None = None  # JSON of the archive entry a rule's lookup chose (lookup.py)
    # the row's state when this node read it; ``claimed`` for a claim's jobs: a change this
    # node makes to the row is made only while it is still so (and, claimed or settling,
    # still this node's): ``Queue.begin_settle`` and the others report the rows it lost
    state: str = "pending"

    def made_uids(self) -> Made | None:
        return None if self.made is None else Made(**json.loads(self.made))

    def change_set(self) -> dict[str, Any] | None:
        """What the rules change in this file; None when it is sent as it is."""
        return None if self.changes is None else dict(json.loads(self.changes))

    def sidecar_paths(self) -> list[str]:
        return [path for path, _ in self.sidecar_texts()]

    def sidecar_texts(self) -> list[tuple[str, str | None]]:
        """Each sidecar with the text the file was found with (None: not readable as text)."""
        return [(path, text) for path, text, _ in self.sidecar_entries()]

    def sidecar_bytes(self, path: str) -> bytes | None:
        """The bytes of a sidecar that could not be read as text, as they were found."""
        entries = [] if self.sidecars is None else json.loads(self.sidecars)
        for e in entries:
            if isinstance(e, list) and len(e) > 3 and e[0] == path and e[3] is not None:
                return base64.b64decode(e[3])
        return None

    def sidecar_entries(self) -> list[tuple[str, str | None, str | None]]:
        """(path, text, why it could not be read) of each sidecar found with the file."""
        entries = [] if self.sidecars is None else json.loads(self.sidecars)
        return [entry(e) for e in entries]


# The rows a change was not made to, no longer this node's (``Queue.begin_settle``,
# ``finish_many``, ...): id -> the node that holds the row now, or finished it; '' when none
# does (its lease ran out and the row waits for the next claim)
Lost = dict[int, str]


@dataclass(frozen=True)
class Made:
    """The UIDs and number of an instance stowd builds (stored, reused on every attempt)."""

    study: str
    series: str
    instance: str
    number: int
    key: str | None = None  # the study key it was made for (None: the rules gave the study)


@dataclass(frozen=True)
class Classification:
    """The keys of a job read from its file (after the rules), for ``set_classified``."""

    job: Job
    kind: str
    study_uid: str
    sop_uid: str
    sop_class: str
    changes: dict[str, Any] | None = None
    sidecars: tuple[tuple[str, str | None], ...] | None = None  # (path, text); None: off
    digest: str | None = None  # of the rules and sidecar settings it was read with
    made: Made | None = None  # the UIDs of an instance stowd builds
    lookup: str | None = None  # JSON: the lookup asked and the archive entry it chose


@dataclass(frozen=True)
class NewFile:
    """A complete file found by the watcher."""

    source: str
    destination: str
    path: str
    rel: str
    size: int
    mtime_ns: int
    sidecars: str | None = None  # JSON [[path, text], ...] when the file was found complete
    # Takes that snapshot; called only when the row is new or its file changed (a rescan
    # finds every queued file again).  May raise SidecarNotReady: then it is not queued.
    snapshot: Callable[[], str | None] | None = field(default=None, compare=False, repr=False)

    def sidecar_json(self) -> str | None:
        return self.snapshot() if self.snapshot is not None else self.sidecars


@dataclass(frozen=True)
class Failed:
    """A failed row as ``stowd migrate`` reports it: ``target`` is where its file was
    moved (None when it stayed, outcome ``kept``)."""

    path: str
    outcome: str | None
    target: str | None
    error: str | None
    done_at: float


@dataclass(frozen=True)
class Hold:
    """A destination that is held: its files wait in the queue."""

    name: str
    since: float
    until: float
    reason: str
    failures: int


class Tally(NamedTuple):
    """One group of rows of ``Queue.tally``: a source, a destination and a state."""

    source: str
    destination: str
    state: str  # pending rows whose next attempt lies ahead: "waiting"
    files: int
    bytes: int
    oldest: float  # the earliest queued_at
    stored: int  # how many the archive stored (of ``settling`` ones: not yet in sent/)
    already: int  # how many the archive said it held already (note ``ALREADY_STORED``)
    warned: int  # how many it stored with a warning (note ``STORED_WITH_WARNING ...``)


class Throughput(NamedTuple):
    """One minute of one source's files to one destination (``Queue.throughput``)."""

    minute: int  # epoch seconds of the minute's start
    source: str
    destination: str
    sent: int  # files that became sent in it
    bytes: int  # their bytes
    failed: int  # files that became failed in it


@dataclass(frozen=True)
class Node:
    """A node of a shared queue as its daemon last told (the ``nodes`` table)."""

    node: str
    pid: int
    host: str
    started: float
    heartbeat: float  # when its daemon last said it was alive (``Queue.leases_now``'s clock)
    version: str
    lease: float  # its claims' lease: it renews them every third of it


@dataclass(frozen=True)
class Walk:
    """The walk of one ``stowd migrate`` source (``Queue.take_walk``): which node walks it
    (or walked it), until when its lease runs (on the database's clock), when the run began
    (on the database's clock: the start every node's report counts from), when the walk
    ended (None: still walking), how many files it skipped as stored before, and ``mine``:
    this node walks it now."""

    source: str
    node: str
    started: float
    walked: float | None
    skipped: int = 0
    mine: bool = False


class Holding(NamedTuple):
    """What one node holds (``Queue.holdings``): its claims and the rows it is moving."""

    node: str
    claimed: int
    settling: int
    expires: float | None  # the earliest lease_until (``Queue.leases_now``'s clock; None: none)


@dataclass
class ActiveView:
    """The active rows by destination and the holds, as one metrics scrape reads them."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)  # (destination, state)
    oldest: dict[str, float] = field(default_factory=dict)  # destination -> queued_at
    held: set[str] = field(default_factory=set)
    # a shared queue's nodes (SQLite: none): each one's heartbeat age and lease (seconds, on
    # the database's clock) and the rows it holds by state (claimed, settling)
    beats: dict[str, tuple[float, float]] = field(default_factory=dict)
    holding: dict[tuple[str, str], int] = field(default_factory=dict)  # (node, state)
    # when it was read, on the clock of the queue's times (a shared queue's: the database's;
    # None: the reader's own ``now``)
    at: float | None = None


# the columns of a row that its counts depend on (``Counts``), in this order
FIGURES = "source, destination, state, size, outcome, note, done_at"
Figures = tuple[str, str, str, int, str | None, str | None, float | None]
_WARNED = STORED_WITH_WARNING + " "


def _warned(note: str | None) -> bool:
    """``note LIKE 'stored with warning %'`` as SQLite reads it (ASCII letters in any case)."""
    if note is None or len(note) < len(_WARNED):
        return False
    head = note[: len(_WARNED)]
    return head.isascii() and head.lower() == _WARNED


class Counts:
    """What one transaction changes in the counts ``stowd status`` reads, from the rows it
    changes: in ``tallies`` the files, bytes, stored, already and warned of each source,
    destination and state; in ``throughput`` the files that became sent or failed in each
    minute.  SQLite's queue counts them here and writes them once a group a transaction (it
    has no statement-level triggers, and a trigger a row cost a sixth of the queue's time);
    PostgreSQL's statement-level triggers count them in the database.

    The rows are kept by kind of change (the same group, outcome and note before, the same
    after): a batch's rows are one or a few kinds, each summed once when written."""

    def __init__(self) -> None:
        # (before, after) -> [rows, their bytes before, after]; before: (source,
        # destination, state, outcome, note), None for a row inserted; after: the same and
        # done_at, None for a row deleted
        self.kinds: dict[tuple[Any, Any], list[int]] = {}
        self.groups: dict[tuple[str, str, str], list[int]] = {}  # counted a group at once

    def change(self, old: Figures | None, new: Figures | None) -> None:
        """A row changed from ``old`` (None: inserted) to ``new`` (None: deleted)."""
        if old is not None and new is not None and old[:6] == new[:6]:
            return
        before = None if old is None else (old[0], old[1], old[2], old[4], old[5])
        after = None if new is None else (new[0], new[1], new[2], new[4], new[5], new[6])
        kind = self.kinds.get((before, after))
        if kind is None:
            kind = self.kinds[before, after] = [0, 0, 0]
        kind[0] += 1
        kind[1] += 0 if old is None else old[3]
        kind[2] += 0 if new is None else new[3]

    def moved(self, rows: Iterable[Figures], was: str) -> None:
        """``rows`` as a statement that changed only their state (from ``was``) and maybe
        their ``done_at`` left them."""
        kinds = self.kinds
        for source, destination, state, size, outcome, note, done_at in rows:
            key = (
                (source, destination, was, outcome, note),
                (source, destination, state, outcome, note, done_at),
            )
            kind = kinds.get(key)
            if kind is None:
                kinds[key] = [1, size, size]
            else:
                kind[0] += 1
                kind[1] += size
                kind[2] += size

    def add_group(self, key: tuple[str, str, str], figures: Sequence[int], sign: int = 1) -> None:
        """Count (``sign`` -1: take away) the figures of many rows of one group at once."""
        kept = self.groups.get(key)
        if kept is None:
            kept = self.groups[key] = [0, 0, 0, 0, 0]
        for at, figure in enumerate(figures):
            kept[at] += sign * int(figure)

    def tallies(self) -> dict[tuple[str, str, str], list[int]]:
        """The change of each group: files, bytes, stored, already, warned."""
        out = {key: list(figures) for key, figures in self.groups.items()}
        for (before, after), (rows, old_bytes, new_bytes) in self.kinds.items():
            for side, size, sign in ((before, old_bytes, -1), (after, new_bytes, 1)):
                if side is None:
                    continue
                source, destination, state, outcome, note = side[:5]
                figures = out.get((source, destination, state))
                if figures is None:
                    figures = out[source, destination, state] = [0, 0, 0, 0, 0]
                figures[0] += sign * rows
                figures[1] += sign * size
                figures[2] += sign * rows * (outcome == "sent")
                figures[3] += sign * rows * (note == ALREADY_STORED)
                figures[4] += sign * rows * _warned(note)
        return out

    def throughput(self) -> tuple[dict[tuple[int, str, str], list[int]], float | None]:
        """The files that became sent or failed, by minute, source and destination (sent,
        bytes, failed), and the newest such file's ``done_at`` (None: none)."""
        out: dict[tuple[int, str, str], list[int]] = {}
        latest: float | None = None
        for (before, after), (rows, _, size) in self.kinds.items():
            if before is None or after is None:
                continue
            state, done_at = after[2], after[5]
            if state not in ("sent", "failed") or before[2] == state or done_at is None:
                continue
            key = (minute(done_at), after[0], after[1])
            figures = out.get(key)
            if figures is None:
                figures = out[key] = [0, 0, 0]
            sent = state == "sent"
            figures[0] += rows if sent else 0
            figures[1] += size if sent else 0
            figures[2] += 0 if sent else rows
            latest = done_at if latest is None else max(latest, done_at)
        return out, latest


def entry(e: Any) -> tuple[str, str | None, str | None]:
    if isinstance(e, str):  # a row written before texts were kept
        return e, None, None
    return str(e[0]), e[1], e[2] if len(e) > 2 else None


def taken(snapshot: Callable[[], str | None]) -> Callable[[], str | None]:
    """The snapshot taken now, handed on as a callable (it may be not ready)."""
    try:
        value = snapshot()
    except SidecarNotReady as exc:
        problem = exc

        def not_ready() -> str | None:
            raise problem

        return not_ready
    return lambda: value


def just_settled(f: NewFile, state: str | None) -> bool:
    """The watcher saw this very file before it was moved away: not a new job.

    The same path, size and mtime as a finished row (its ``state``), and no file there any
    more: the stat raced with the move.  If the file *is* there, it was dropped again: a new
    job.  A file of a type its source ignores (``ignored``) is left where it is.
    """
    if state == "ignored":
        return True
    return state is not None and not os.path.lexists(f.path)


def new_row(f: NewFile, now: float) -> tuple[Any, ...] | None:
    """The row to insert for ``f``; None when its sidecars are not ready."""
    try:
        sidecars = f.sidecar_json()
    except SidecarNotReady:
        return None
    return (f.source, f.destination, f.path, f.rel, f.size, f.mtime_ns, now, sidecars)


def log_queued(files: list[NewFile]) -> None:
    """Said only once committed: a rolled-back insert queued nothing."""
    for f in files:
        log.info("queued %s (%d bytes, source %s)", f.path, f.size, f.source)


def job(row: Sequence[Any]) -> Job:
    return Job(*row)


def classification_row(c: Classification) -> tuple[Any, ...]:
    changes = None if c.changes is None else json.dumps(c.changes, ensure_ascii=False)
    sidecars = None if c.sidecars is None else json.dumps([list(e) for e in c.sidecars])
    made = None if c.made is None else json.dumps(c.made.__dict__)
    keys = (c.kind, c.study_uid, c.sop_uid, c.sop_class, changes, sidecars, c.digest, made)
    return (*keys, c.lookup, c.job.id, c.job.size, c.job.mtime_ns)


def minute(when: float) -> int:
    """The start of the minute ``when`` lies in, as the throughput table keys it."""
    return int(when // 60) * 60
