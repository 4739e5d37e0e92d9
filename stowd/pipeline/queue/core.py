"""The persistent SQLite queue: the source of truth, and the only module that speaks SQL.

States of a row (one row per job: a file that appeared at a path with a given content)::

    pending ──claim──▶ claimed ──▶ settling ──move──▶ sent | failed
       ▲                  │
       └──── retry ───────┘      (a pending row whose next_attempt_at lies ahead is "waiting")

    gone: the file vanished before it could be sent (nothing to move)
    ignored: a file of a type the source ignores (left where it is, never sent)

UIDs made for files that are not DICOM (a PDF, a photo) are generated once and stored with
the row (``made``), so every retry and restart sends the same instance; ``made_studies`` and
``made_series`` give files with the same study key one StudyInstanceUID, and one
SeriesInstanceUID (with its running InstanceNumber) per study and type.

The archive entry a rule's ``lookup`` chose is recorded with the row (``lookup``: the query
and the values copied), so a retry, restart or replan with the same query never asks again;
``lookups`` caches each destination's answers per query for a rule's ``cache`` time.

A row is claimed (with a lease) before it is uploaded; it is marked ``sent``/``failed`` only
after the file was moved.  ``settling`` records the target before the move, so a crash between
the move and the bookkeeping is repaired at the next start.  On open, claims left by a dead
daemon return to ``pending``: delivery is at least once, safe because STOW is idempotent.
While the daemon runs, ``reclaim`` returns claims whose lease ran out and that none of its
workers holds (a worker that died).

Every write transaction translates sqlite3's errors here, at one seam: ``QueueFull`` when the
queue's filesystem is full (nothing was written), ``QueueError`` otherwise; the reads of
``stowd status`` and ``stowd retry`` (inside ``reading``) become ``QueueUnreadable``.  ``troubles``
(schema 5) holds what the running daemon reports about itself for ``stowd status`` (a thread
that keeps dying).  ``note`` (schema 6) says how a settled file's outcome came about where the
outcome alone does not: ``already stored`` for a file the archive said it held already.
``tallies`` (schema 7) keeps the count of each source's, destination's and state's rows as
they change, and indexes serve the claim order and the status queries: a queue of a million
rows is claimed from, counted and rescanned as quickly as one of a thousand.  ``throughput``
(schema 8) counts, per minute, source and destination, the files that became sent or failed
in the last day (the status page's charts and ``stowd status``'s "today"), kept bounded by
the trigger that counts them.

Paths are kept exactly, whatever bytes their names hold.  A value that is not valid UTF-8 (a
name with bytes such as ``ff fe``, which ``os.fsdecode`` gives as lone surrogates) is stored
as the BLOB of its bytes (``os.fsencode``) in its TEXT column (SQLite keeps a value's own type)
and read back as the same ``str``; every other value is stored as TEXT as it always was.  That
happens in one place, the connection (``_Connection``), so the rest of stowd sees ``str``.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from stowd.errors import (
    QueueError,
    QueueFull,
    QueueLockedError,
    QueueUnreadable,
    SidecarNotReady,
)
from stowd.pipeline import disk

log = logging.getLogger("stowd.queue")

SCHEMA_VERSION = 8
ALREADY_STORED = "already stored"  # the note of a file the archive said it already held
# the note of a file stored with the archive's WarningReason, followed by its code ("... B100")
STORED_WITH_WARNING = "stored with warning"
ACTIVE = ("pending", "claimed", "settling")
DONE = ("sent", "failed", "gone")
BUSY_TIMEOUT_MS = 30_000
QUEUE_MODE = 0o600  # queue.db and the files beside it: stowd's alone, whatever the umask
OPEN_MARK = ".open"  # beside the queue while a stowd has it open; left behind by a crash
WAL_HEADER = 32  # bytes: a write-ahead log shorter than its header holds nothing

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    destination TEXT NOT NULL,
    path TEXT NOT NULL,
    rel TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    state TEXT NOT NULL,
    kind TEXT,
    study_uid TEXT,
    sop_uid TEXT,
    sop_class TEXT,
    solo INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    queued_at REAL NOT NULL,
    first_try REAL,
    last_try REAL,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    lease_until REAL,
    outcome TEXT,
    target TEXT,
    error TEXT,
    done_at REAL,
    changes TEXT,
    sidecars TEXT,
    rules_digest TEXT,
    made TEXT,
    lookup TEXT,
    note TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS files_active_path ON files(path)
    WHERE state IN ('pending', 'claimed', 'settling');
CREATE INDEX IF NOT EXISTS files_unclassified ON files(state, kind);
CREATE INDEX IF NOT EXISTS files_ready ON files(state, destination, next_attempt_at);
CREATE INDEX IF NOT EXISTS files_study ON files(destination, study_uid, state);
CREATE INDEX IF NOT EXISTS files_done ON files(done_at);
CREATE INDEX IF NOT EXISTS files_path ON files(path, size, mtime_ns);
CREATE TABLE IF NOT EXISTS made_studies (
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    uid TEXT NOT NULL,
    PRIMARY KEY (source, key)
);
CREATE TABLE IF NOT EXISTS made_series (
    study_uid TEXT NOT NULL,
    kind TEXT NOT NULL,
    uid TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (study_uid, kind)
);
CREATE TABLE IF NOT EXISTS lookups (
    destination TEXT NOT NULL,
    key TEXT NOT NULL,
    answer TEXT NOT NULL,
    fetched_at REAL NOT NULL,
    PRIMARY KEY (destination, key)
);
CREATE TABLE IF NOT EXISTS destinations (
    name TEXT PRIMARY KEY,
    held_since REAL,
    held_until REAL,
    reason TEXT,
    failures INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS troubles (
    name TEXT PRIMARY KEY,
    since REAL NOT NULL,
    text TEXT NOT NULL
);
"""

# Schema 7: what makes a queue of a million rows as quick as one of a thousand.  ``tallies``
# holds the count (and bytes, and how many the archive stored) of the rows of each source,
# destination and state, kept in the same transaction as every change of a row (by triggers
# for updates and deletes; the rows a transaction inserts by ``_count_added``, since
# ``_INSERT`` is the one statement that inserts), so ``stowd status`` reads a few rows
# instead of passing over the table.  Which pending rows are "waiting" depends on the time
# asked about: those are read from ``files_waiting`` (only the waiting rows).  ``files_age``
# gives the oldest active row of a group in one step, and ``files_claim`` the next row to
# claim, in claim order, without reading the pending rows before it; ``files_errors`` the
# newest rows with an error.
_TALLY_KEY = "source, destination, state"
_TALLY_OF = (  # the figures one row adds to its group (OLD or NEW)
    "{r}.source, {r}.destination, {r}.state, 1, {r}.size, "
    "COALESCE({r}.outcome = 'sent', 0), COALESCE({r}.note IS '" + ALREADY_STORED + "', 0), "
    "COALESCE({r}.note LIKE '" + STORED_WITH_WARNING + " %', 0)"
)
_TALLY_ADD = (
    "INSERT INTO tallies (source, destination, state, files, bytes, stored, already, warned) "
    "VALUES ({values}) ON CONFLICT (source, destination, state) DO UPDATE SET "
    "files = files + excluded.files, bytes = bytes + excluded.bytes, "
    "stored = stored + excluded.stored, already = already + excluded.already, "
    "warned = warned + excluded.warned;"
)
# the figures one row takes from its group (OLD): an upsert too, never an update that finds
# no group, since a row may change in the transaction that inserted it, before
# ``_count_added`` counts it (its group may have no row in ``tallies`` yet)
_TALLY_TAKE = _TALLY_ADD.format(
    values="OLD.source, OLD.destination, OLD.state, -1, -OLD.size, "
    "-COALESCE(OLD.outcome = 'sent', 0), -COALESCE(OLD.note IS '" + ALREADY_STORED + "', 0), "
    "-COALESCE(OLD.note LIKE '" + STORED_WITH_WARNING + " %', 0)"
)
_TALLIED = ("source", "destination", "state", "size", "outcome", "note")
_SCHEMA_7 = (
    "CREATE TABLE IF NOT EXISTS tallies (source TEXT NOT NULL, destination TEXT NOT NULL, "
    "state TEXT NOT NULL, files INTEGER NOT NULL, bytes INTEGER NOT NULL, "
    "stored INTEGER NOT NULL, already INTEGER NOT NULL, warned INTEGER NOT NULL, "
    "PRIMARY KEY (source, destination, state)) WITHOUT ROWID",
    "CREATE TRIGGER IF NOT EXISTS tally_delete AFTER DELETE ON files BEGIN " + _TALLY_TAKE + " END",
    f"CREATE TRIGGER IF NOT EXISTS tally_update AFTER UPDATE OF {', '.join(_TALLIED)} ON files "
    "WHEN "
    + " OR ".join(f"OLD.{c} IS NOT NEW.{c}" for c in _TALLIED)
    + " BEGIN "
    + _TALLY_TAKE
    + " "
    + _TALLY_ADD.format(values=_TALLY_OF.format(r="NEW"))
    + " END",
    # a queue written before: its groups counted once, as the triggers count from here on
    "DELETE FROM tallies",
    f"INSERT OR REPLACE INTO tallies SELECT {_TALLY_KEY}, COUNT(*), TOTAL(size), "
    "TOTAL(outcome = 'sent'), TOTAL(note IS '" + ALREADY_STORED + "'), "
    "TOTAL(note LIKE '" + STORED_WITH_WARNING + " %') FROM files "
    f"GROUP BY {_TALLY_KEY}",
    "CREATE INDEX IF NOT EXISTS files_waiting ON files(next_attempt_at) WHERE state = 'pending'",
    # its uses are files_waiting's and files_claim's now; one index less to write per row
    "DROP INDEX IF EXISTS files_ready",
    "CREATE INDEX IF NOT EXISTS files_age ON files(source, destination, state, queued_at) "
    "WHERE state IN ('pending', 'claimed', 'settling')",
    "CREATE INDEX IF NOT EXISTS files_claim ON files(destination, next_attempt_at, id) "
    "WHERE state = 'pending' AND kind IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS files_errors ON files(COALESCE(done_at, last_try, queued_at)) "
    "WHERE error IS NOT NULL",
)

# Schema 8: the throughput of the last day, per minute, source and destination (the status
# page's charts and its "sent today"): a trigger counts each row that becomes sent or failed
# in the transaction that settles it, and drops the minutes more than ``HISTORY_SPAN`` older
# than that row, so the table holds at most a day's minutes of each pair, whatever was sent.
HISTORY_SPAN = 25 * 3600  # seconds of throughput kept: a day, and a day with a DST change
_MINUTE_OF = "CAST({t} / 60 AS INTEGER) * 60"
_SCHEMA_8 = (
    "CREATE TABLE IF NOT EXISTS throughput (minute INTEGER NOT NULL, source TEXT NOT NULL, "
    "destination TEXT NOT NULL, sent INTEGER NOT NULL, bytes INTEGER NOT NULL, "
    "failed INTEGER NOT NULL, PRIMARY KEY (minute, source, destination)) WITHOUT ROWID",
    "CREATE TRIGGER IF NOT EXISTS throughput_done AFTER UPDATE OF state ON files "
    "WHEN NEW.state IN ('sent', 'failed') AND OLD.state IS NOT NEW.state "
    "AND NEW.done_at IS NOT NULL BEGIN "
    "INSERT INTO throughput (minute, source, destination, sent, bytes, failed) VALUES ("
    + _MINUTE_OF.format(t="NEW.done_at")
    + ", NEW.source, NEW.destination, NEW.state = 'sent', "
    "CASE NEW.state WHEN 'sent' THEN NEW.size ELSE 0 END, NEW.state = 'failed') "
    "ON CONFLICT (minute, source, destination) DO UPDATE SET sent = sent + excluded.sent, "
    "bytes = bytes + excluded.bytes, failed = failed + excluded.failed; "
    f"DELETE FROM throughput WHERE minute < NEW.done_at - {HISTORY_SPAN + 60}; END",
    # a queue written before: the last day of its done rows (by the newest one), counted once
    "INSERT OR REPLACE INTO throughput SELECT "
    + _MINUTE_OF.format(t="done_at")
    + ", source, destination, TOTAL(state = 'sent'), "
    "TOTAL(CASE state WHEN 'sent' THEN size ELSE 0 END), TOTAL(state = 'failed') FROM files "
    "WHERE state IN ('sent', 'failed') AND done_at >= "
    f"(SELECT MAX(done_at) FROM files) - {HISTORY_SPAN} GROUP BY 1, 2, 3",
    # the newest failed files, however many rows waiting for a retry carry an error
    "CREATE INDEX IF NOT EXISTS files_failed ON files(done_at) WHERE state = 'failed'",
)


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
        return [_entry(e) for e in entries]


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


@dataclass
class ActiveView:
    """The active rows by destination and the holds, as one metrics scrape reads them."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)  # (destination, state)
    oldest: dict[str, float] = field(default_factory=dict)  # destination -> queued_at
    held: set[str] = field(default_factory=set)


# the one rule for "waiting": a pending row whose next attempt lies after the time bound
_WAITING = "state = 'pending' AND next_attempt_at > ?"
_STATE = f"CASE WHEN {_WAITING} THEN 'waiting' ELSE state END"
# the waiting rows, read from their index (schema 7) and nothing else, however many are pending
_ONLY_WAITING = f"INDEXED BY files_waiting WHERE {_WAITING}"
_ACTIVE_ROWS = "state IN ('pending', 'claimed', 'settling')"
_JOB_COLUMNS = (
    "id, source, destination, path, rel, size, mtime_ns, kind, study_uid, sop_uid, "
    "attempts, first_try, error, outcome, target, changes, sidecars, made, queued_at, lookup"
)
_MIGRATIONS = {
    1: (
        "ALTER TABLE files ADD COLUMN changes TEXT",
        "ALTER TABLE files ADD COLUMN sidecars TEXT",
        "ALTER TABLE files ADD COLUMN rules_digest TEXT",
    ),
    2: (
        "ALTER TABLE files ADD COLUMN made TEXT",
        "CREATE TABLE IF NOT EXISTS made_studies (source TEXT NOT NULL, key TEXT NOT NULL, "
        "uid TEXT NOT NULL, PRIMARY KEY (source, key))",
        "CREATE TABLE IF NOT EXISTS made_series (study_uid TEXT NOT NULL, kind TEXT NOT NULL, "
        "uid TEXT NOT NULL, count INTEGER NOT NULL, PRIMARY KEY (study_uid, kind))",
    ),
    3: (
        "ALTER TABLE files ADD COLUMN lookup TEXT",
        "CREATE TABLE IF NOT EXISTS lookups (destination TEXT NOT NULL, key TEXT NOT NULL, "
        "answer TEXT NOT NULL, fetched_at REAL NOT NULL, PRIMARY KEY (destination, key))",
    ),
    4: (
        "CREATE TABLE IF NOT EXISTS troubles (name TEXT PRIMARY KEY, since REAL NOT NULL, "
        "text TEXT NOT NULL)",
    ),
    5: ("ALTER TABLE files ADD COLUMN note TEXT",),
    6: _SCHEMA_7,
    7: _SCHEMA_8,
}
LOOKUP_MEMORY = 86_400.0  # cached lookup answers older than this are deleted


def _column_there(db: sqlite3.Connection, statement: str) -> bool:
    """An ``ALTER TABLE t ADD COLUMN c`` whose column ``t`` has already (an older schema
    version with a later column added by hand, as the tests make old queues): skipped."""
    words = statement.split()
    if words[:2] != ["ALTER", "TABLE"] or words[3:5] != ["ADD", "COLUMN"]:
        return False
    columns = {row[1] for row in db.execute(f"PRAGMA table_info({words[2]})")}
    return words[5] in columns


def _storable(value: Any) -> Any:
    """``value`` as SQLite can store it: a ``str`` that is not valid UTF-8 as its bytes."""
    if isinstance(value, str) and not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return os.fsencode(value)
    return value


def _bound(params: Any) -> Any:
    if isinstance(params, dict):
        return {k: _storable(v) for k, v in params.items()}
    if not isinstance(params, (tuple, list)):
        params = tuple(params)  # an iterator is read once
    for v in params:  # most parameters (every ASCII path) are bound as they are
        if type(v) is not str or v.isascii():
            continue
        return tuple(_storable(v) for v in params)
    return params


def _read_row(_cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> tuple[Any, ...]:
    """A row with each BLOB (a value stored by ``_storable`` as bytes) back as ``str``."""
    if any(type(v) is bytes for v in row):
        return tuple(os.fsdecode(v) if type(v) is bytes else v for v in row)
    return row


class _Connection(sqlite3.Connection):
    """The one seam where values that are not UTF-8 become bytes, and become ``str`` again."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.row_factory = _read_row

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        try:  # every value valid UTF-8 (nearly always): bound as it is, nothing checked
            return super().execute(sql, parameters)
        except UnicodeEncodeError:  # raised binding, before the statement ran
            return super().execute(sql, _bound(parameters))

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> sqlite3.Cursor:
        return super().executemany(sql, (_bound(p) for p in parameters))


def _entry(e: Any) -> tuple[str, str | None, str | None]:
    if isinstance(e, str):  # a row written before texts were kept
        return e, None, None
    return str(e[0]), e[1], e[2] if len(e) > 2 else None


def _taken(snapshot: Callable[[], str | None]) -> Callable[[], str | None]:
    """The snapshot taken now, handed on as a callable (it may be not ready)."""
    try:
        value = snapshot()
    except SidecarNotReady as exc:
        problem = exc

        def not_ready() -> str | None:
            raise problem

        return not_ready
    return lambda: value


# The next row to claim of one destination: read from the start of ``files_claim`` (in claim
# order), however many rows wait before it.
_CLAIM_HEAD = (
    "SELECT destination, study_uid, solo, id, next_attempt_at FROM files INDEXED BY files_claim "
    "WHERE state = 'pending' AND kind IS NOT NULL AND destination = ? AND next_attempt_at <= ? "
    "ORDER BY next_attempt_at, id LIMIT 1"
)


def _claim_head(
    db: sqlite3.Connection, destinations: Sequence[str], now: float
) -> tuple[Any, ...] | None:
    """(destination, study_uid, solo, id) of the row claimed first: the one of the ready
    rows of ``destinations`` whose next attempt came first (by id among equals)."""
    heads = [db.execute(_CLAIM_HEAD, (d, now)).fetchone() for d in dict.fromkeys(destinations)]
    found = [h for h in heads if h is not None]
    if not found:
        return None
    first = min(found, key=lambda h: (h[4], h[3]))
    return tuple(first[:4])


ENQUEUE_PART = 300  # files per statement: 3 parameters each, under SQLite's oldest limit (999)
_INSERT = (
    "INSERT INTO files (source, destination, path, rel, size, mtime_ns, state, "
    "queued_at, sidecars) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?)"
)
# of each (path, size, mtime_ns) asked about that has a finished row, the state of its latest,
# read through ``files_path`` as one statement for each file did
_SETTLED = (
    "WITH asked(p, s, m) AS (VALUES {values}) SELECT * FROM ("
    "SELECT p, s, m, (SELECT state FROM files WHERE path = p AND size = s AND mtime_ns = m "
    "AND state IN ('sent', 'failed', 'gone', 'ignored') ORDER BY id DESC LIMIT 1) AS state "
    "FROM asked) WHERE state IS NOT NULL"
)


def _active_rows(db: sqlite3.Connection, paths: list[str]) -> dict[str, tuple[int, int, int, str]]:
    """path -> (id, size, mtime_ns, state) of the active rows of ``paths`` (by path: never a
    pass over the pending rows)."""
    marks = ",".join("?" * len(paths))
    rows = db.execute(
        "SELECT path, id, size, mtime_ns, state FROM files INDEXED BY files_active_path "
        f"WHERE path IN ({marks}) AND state IN ('pending', 'claimed', 'settling')",
        paths,
    )
    return {r[0]: (r[1], r[2], r[3], r[4]) for r in rows}


def _settled_states(
    db: sqlite3.Connection, files: list[NewFile]
) -> dict[tuple[str, int, int], str]:
    """(path, size, mtime_ns) -> state of the latest finished row of the same path and
    content, for those of ``files`` that have one."""
    if not files:
        return {}
    values = ",".join("(?, ?, ?)" for _ in files)
    rows = db.execute(
        _SETTLED.format(values=values), [v for f in files for v in (f.path, f.size, f.mtime_ns)]
    )
    return {(r[0], r[1], r[2]): r[3] for r in rows}


def _just_settled(f: NewFile, state: str | None) -> bool:
    """The watcher saw this very file before it was moved away: not a new job.

    The same path, size and mtime as a finished row (its ``state``), and no file there any
    more: the stat raced with the move.  If the file *is* there, it was dropped again: a new
    job.  A file of a type its source ignores (``ignored``) is left where it is.
    """
    if state == "ignored":
        return True
    return state is not None and not os.path.lexists(f.path)


def _new_row(f: NewFile, now: float) -> tuple[Any, ...] | None:
    """The row to insert for ``f``; None when its sidecars are not ready."""
    try:
        sidecars = f.sidecar_json()
    except SidecarNotReady:
        return None
    return (f.source, f.destination, f.path, f.rel, f.size, f.mtime_ns, now, sidecars)


def _count_added(db: sqlite3.Connection, added: dict[tuple[str, str], list[int]]) -> None:
    """Count the rows a transaction inserted (``Queue._count``, beside the one statement that
    inserts, keeps them by source and destination) in ``tallies``: one statement per group, not a
    trigger per row, which doubled the cost of queueing a file."""
    db.executemany(
        _TALLY_ADD.format(values="?, ?, 'pending', ?, ?, 0, 0, 0"),
        [(source, dest, files, size) for (source, dest), (files, size) in added.items()],
    )


def _log_queued(files: list[NewFile]) -> None:
    """Said only once committed: a rolled-back insert queued nothing."""
    for f in files:
        log.info("queued %s (%d bytes, source %s)", f.path, f.size, f.source)


def _roll_back(conn: sqlite3.Connection) -> None:
    """End a failed transaction (SQLite may have ended it already, e.g. on a full disk)."""
    if conn.in_transaction:
        with suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _job(row: Sequence[Any]) -> Job:
    return Job(*row)


def _classification_row(c: Classification) -> tuple[Any, ...]:
    changes = None if c.changes is None else json.dumps(c.changes, ensure_ascii=False)
    sidecars = None if c.sidecars is None else json.dumps([list(e) for e in c.sidecars])
    made = None if c.made is None else json.dumps(c.made.__dict__)
    keys = (c.kind, c.study_uid, c.sop_uid, c.sop_class, changes, sidecars, c.digest, made)
    return (*keys, c.lookup, c.job.id, c.job.size, c.job.mtime_ns)


class Queue:
    """Thread-safe access to the queue database (one connection per thread)."""

    def __init__(
        self, path: Path, *, clock: Callable[[], float] = time.time, readonly: bool = False
    ) -> None:
        self.path = path
        self.clock = clock
        self.readonly = readonly
        self._local = threading.local()
        self._lock_fd: int | None = None
        self._marked = False  # this process wrote the open marker
        # files found with new content while their row was claimed or settling (by row id):
        # queued as new jobs when that row is done (``finish_many``), not at the next rescan
        self._after: dict[int, NewFile] = {}

    # -- opening -----------------------------------------------------------------
    def open(self, *, lock: bool = True) -> Queue:
        """Create or migrate the database; take the single-daemon lock when ``lock``."""
        try:
            self.path.parent.mkdir(mode=QUEUE_MODE | 0o100, parents=True, exist_ok=True)
        except OSError as exc:
            raise QueueError(f"cannot create the queue folder {self.path.parent}: {exc}") from exc
        try:
            if lock:
                self._take_lock()
                self._check_history()
            self._private()
            self._migrate()
            if lock:
                self._mark_open()
        except (OSError, sqlite3.Error) as exc:
            self.close()
            raise QueueError(_cannot_write(self.path, exc)) from exc
        return self

    def _private(self) -> None:
        """The queue (patient names, sidecar texts) is stowd's alone, whatever the umask:
        ``queue.db`` is made 0600 before SQLite opens it, which gives its ``-wal`` and
        ``-shm`` the same mode; a queue made wider by an older stowd is narrowed."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, QUEUE_MODE)
        os.close(fd)
        for suffix in ("", "-wal", "-shm", "-journal", ".lock"):
            path = Path(str(self.path) + suffix)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_IMODE(path.stat().st_mode) & ~QUEUE_MODE:
                    path.chmod(QUEUE_MODE)

    @property
    def _open_mark(self) -> Path:
        return Path(str(self.path) + OPEN_MARK)

    def _check_history(self) -> None:
        """Say so when the last run ended without closing the queue (kill -9, a crash, a
        power cut) and its write-ahead log is gone: what it held (every transaction since
        the last checkpoint) is lost, and SQLite opens the older state without a word."""
        if not self._open_mark.exists():
            return  # a fresh queue, or a clean stop (a clean close checkpoints the log)
        wal = Path(str(self.path) + "-wal")
        try:
            size = wal.stat().st_size
        except FileNotFoundError:
            size = 0
        if size < WAL_HEADER:
            log.warning(
                "the queue %s lost its recent history: stowd did not stop cleanly last time "
                "and the queue's write-ahead log %s is missing (deleted?), so what was queued, "
                "sent or failed since its last checkpoint is forgotten; files still in the "
                "watch folders are found again by the scan and sent again (an archive keeps "
                "one copy of an instance), files already in sent/ or failed/ stay there",
                self.path,
                wal,
            )

    def _mark_open(self) -> None:
        """A marker beside the queue while this process has it open (removed by ``close``);
        written after the first transaction, when the write-ahead log exists."""
        fd = os.open(self._open_mark, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self._marked = True

    def _migrate(self) -> None:
        """Create the tables of a new queue, or bring an older one up to this schema."""
        with self._tx() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise QueueError(
                    f"{self.path} was written by a newer stowd (schema {version}, "
                    f"this one knows {SCHEMA_VERSION})"
                )
            for statement in (*_SCHEMA.split(";"), *_SCHEMA_7, *_SCHEMA_8) if version == 0 else ():
                if statement.strip():
                    db.execute(statement)
            for step in range(version or SCHEMA_VERSION, SCHEMA_VERSION):
                for statement in _MIGRATIONS[step]:
                    if not _column_there(db, statement):
                        db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _take_lock(self) -> None:
        lock_path = str(self.path) + ".lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, QUEUE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise QueueLockedError(
                f"another stowd (pid {holder}) is using the queue {self.path}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def close(self) -> None:
        if self._marked:  # first: a close cut short must never look like a lost log
            self._marked = False
            self._open_mark.unlink(missing_ok=True)
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def release_connection(self) -> None:
        """Close the calling thread's connection (a thread that ends, such as an
        association's, gives its connection back; the next call opens another)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._local.conn = None
            conn.close()

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    def _connect(self) -> sqlite3.Connection:
        try:
            if self.readonly:  # status: a WAL reader never blocks the daemon, and writes nothing
                uri = f"{self.path.resolve().as_uri()}?mode=ro"
                conn = sqlite3.connect(
                    uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000, factory=_Connection
                )
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                return conn
            conn = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,
                factory=_Connection,
            )
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as exc:
            raise QueueError(_cannot_write(self.path, exc)) from exc
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; sqlite3's errors become ``QueueError`` here (the one seam),
        ``QueueFull`` when the queue's filesystem has no space left."""
        conn = self._conn()
        self._local.added = {}
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            _count_added(conn, self._local.added)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _roll_back(conn)
            raise self._translated(exc) from exc
        except BaseException:
            _roll_back(conn)
            raise

    def _translated(self, exc: sqlite3.Error) -> QueueError:
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return QueueFull(f"the queue {self.path} cannot be written: its disk is full ({exc})")
        return QueueError(f"the queue {self.path} cannot be written: {exc}")

    # -- start-up ------------------------------------------------------------------
    def reclaim(self, held: Collection[int]) -> int:
        """Return to pending the claims whose lease ran out, except ``held`` (the rows a
        worker of this daemon still has: an upload in progress, or a release it retries).
        The daemon owns its queue alone (the lock file), so the rest were forgotten (a worker
        that died); returns how many."""
        now = self.clock()
        with self._tx() as db:
            rows = db.execute(
                "SELECT id FROM files WHERE state = 'claimed' "
                "AND (lease_until IS NULL OR lease_until < ?)",
                (now,),
            ).fetchall()
            ids = [r[0] for r in rows if r[0] not in held]
            db.executemany(
                "UPDATE files SET state = 'pending', lease_until = NULL "
                "WHERE id = ? AND state = 'claimed'",
                [(i,) for i in ids],
            )
        return len(ids)

    def recover(self) -> int:
        """Return claims of a dead daemon to pending; returns how many."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE files SET state = 'pending', lease_until = NULL WHERE state = 'claimed'"
            )
            return cur.rowcount

    def adopt(self, destinations: dict[str, str]) -> dict[str, int]:
        """Point the queued rows of each source at its current destination.

        ``destinations`` maps every configured source to its destination.  Rows of sources
        that are no longer configured are parked (never claimed) until the source is back;
        returns how many rows each such source has.
        """
        with self._tx() as db:
            for source, destination in destinations.items():
                db.execute(
                    "UPDATE files SET destination = ? WHERE source = ? AND destination != ? "
                    "AND state IN ('pending', 'claimed', 'settling')",
                    (destination, source, destination),
                )
            marks = ",".join("?" * len(destinations))
            rows = db.execute(
                "SELECT source, COUNT(*) FROM files WHERE state IN ('pending', 'claimed') "
                f"AND source NOT IN ({marks}) GROUP BY source",
                tuple(destinations),
            ).fetchall()
            db.execute(
                f"UPDATE files SET destination = '' WHERE source NOT IN ({marks}) "
                "AND state IN ('pending', 'claimed')",
                tuple(destinations),
            )
        return {r[0]: r[1] for r in rows}

    def settling(self) -> list[Job]:
        """Rows whose move to sent/failed was decided but may not have happened."""
        rows = (
            self._conn()
            .execute(f"SELECT {_JOB_COLUMNS} FROM files WHERE state = 'settling'")
            .fetchall()
        )
        return [_job(r) for r in rows]

    # -- the watcher's side --------------------------------------------------------
    def enqueue(self, files: Iterable[NewFile]) -> int:
        """Queue complete files; a path already active with the same content is skipped.

        A path whose active row has other content (the file was rewritten while queued and
        not yet claimed) is updated in place.  Returns the number of new jobs.
        """
        known = self._known(files := list(files))
        files = [f for f in files if (f.path, f.size, f.mtime_ns) not in known]
        if not files:  # a rescan finding queued files again: no write, no write lock
            return 0
        snapshots = self._snapshots(files)  # file reads happen before the write lock
        files = [
            replace(f, snapshot=snapshots[f.path]) if f.path in snapshots else f for f in files
        ]
        now = self.clock()
        with self._tx() as db:
            added = self._enqueue_many(db, files, now)
        _log_queued(added)
        return len(added)

    def _known(self, files: list[NewFile]) -> set[tuple[str, int, int]]:
        """(path, size, mtime_ns) of the ``files`` queued already with this content (an
        active row), read before the write transaction.  Skipping them is what the write
        would decide too; a row that finished meanwhile took its file away (a file still
        there is found again by the next rescan)."""
        known: set[tuple[str, int, int]] = set()
        for at in range(0, len(files), 500):  # SQLite limits the number of parameters
            part = [f.path for f in files[at : at + 500]]
            marks = ",".join("?" * len(part))
            rows = self._conn().execute(  # by path: never a pass over the pending rows
                "SELECT path, size, mtime_ns FROM files INDEXED BY files_active_path "
                f"WHERE path IN ({marks}) AND state IN ('pending', 'claimed', 'settling')",
                part,
            )
            known |= {(path, size, mtime) for path, size, mtime in rows}
        return known

    @staticmethod
    def _snapshots(files: list[NewFile]) -> dict[str, Callable[[], str | None]]:
        """Take the sidecar snapshots of the files (none of them queued with this content)."""
        return {f.path: _taken(f.snapshot) for f in files if f.snapshot is not None}

    def _enqueue_many(
        self, db: sqlite3.Connection, files: list[NewFile], now: float
    ) -> list[NewFile]:
        """Queue ``files`` inside the write transaction ``db``; returns those added as new
        jobs.  Each part of ``ENQUEUE_PART`` files costs one read of their active rows, one of
        their finished rows and one insert of all its new rows, not three statements a file;
        what is decided for each file is what ``_enqueue_one`` decides.  A list naming a path
        twice (each file must see the row the one before made) goes file by file."""
        if len({f.path for f in files}) < len(files):
            return [f for f in files if self._enqueue_one(db, f, now)]
        added: list[NewFile] = []
        for at in range(0, len(files), ENQUEUE_PART):
            added += self._enqueue_part(db, files[at : at + ENQUEUE_PART], now)
        return added

    def _enqueue_part(
        self, db: sqlite3.Connection, files: list[NewFile], now: float
    ) -> list[NewFile]:
        active = _active_rows(db, [f.path for f in files])
        settled = _settled_states(db, [f for f in files if f.path not in active])
        rows: list[tuple[Any, ...]] = []
        added: list[NewFile] = []
        for f in files:
            row = active.get(f.path)
            if row is not None:
                self._changed(db, f, row)
            elif not _just_settled(f, settled.get((f.path, f.size, f.mtime_ns))):
                new = _new_row(f, now)
                if new is not None:  # None: its sidecars were not ready, found again later
                    rows.append(new)
                    added.append(f)
        db.executemany(_INSERT, rows)
        self._count(added)
        return added

    def _enqueue_one(self, db: sqlite3.Connection, f: NewFile, now: float) -> int:
        row = _active_rows(db, [f.path]).get(f.path)
        if row is not None:
            self._changed(db, f, row)
            return 0
        if _just_settled(f, _settled_states(db, [f]).get((f.path, f.size, f.mtime_ns))):
            return 0
        new = _new_row(f, now)
        if new is None:
            return 0  # found again by the next scan
        db.execute(_INSERT, new)
        self._count([f])
        return 1

    def _count(self, files: list[NewFile]) -> None:
        """Counted in ``tallies`` once, with the others, before the commit."""
        for f in files:
            added = self._local.added.setdefault((f.source, f.destination), [0, 0])
            added[0] += 1
            added[1] += f.size

    def _changed(self, db: sqlite3.Connection, f: NewFile, row: tuple[int, int, int, str]) -> None:
        """``f`` found where an active row is: other content updates a pending row in place;
        one being sent or moved becomes a new job once that is done."""
        if (row[1], row[2]) == (f.size, f.mtime_ns):
            return
        if row[3] != "pending":
            self._after[row[0]] = f
            return
        try:
            sidecars = f.sidecar_json()
        except SidecarNotReady:
            return
        db.execute(
            "UPDATE files SET size = ?, mtime_ns = ?, kind = NULL, study_uid = NULL, "
            "sop_uid = NULL, sop_class = NULL, changes = NULL, sidecars = ?, solo = 0, "
            "made = NULL, lookup = NULL, attempts = 0, first_try = NULL, "
            "last_try = NULL, next_attempt_at = 0, error = NULL WHERE id = ?",
            (f.size, f.mtime_ns, sidecars, row[0]),
        )

    # -- classification --------------------------------------------------------------
    def unclassified(self, limit: int) -> list[Job]:
        """Pending rows not read yet, except parked ones (their source is gone from the
        config) and ones waiting for a retry (a file that could not be read just now)."""
        rows = (
            self._conn()
            .execute(
                f"SELECT {_JOB_COLUMNS} FROM files WHERE state = 'pending' AND kind IS NULL "
                "AND destination != '' AND next_attempt_at <= ? ORDER BY id LIMIT ?",
                (self.clock(), limit),
            )
            .fetchall()
        )
        return [_job(r) for r in rows]

    def set_classified(self, items: Iterable[Classification]) -> None:
        """Record the keys (and the rules' changes) read from the files of pending rows.

        Only where the row still describes the content that was read: a row the watcher
        updated for new content meanwhile is read again.
        """
        with self._tx() as db:
            db.executemany(
                "UPDATE files SET kind = ?, study_uid = ?, sop_uid = ?, sop_class = ?, "
                "changes = ?, sidecars = ?, rules_digest = ?, made = ?, lookup = ? "
                "WHERE id = ? AND state = 'pending' AND size = ? AND mtime_ns = ?",
                [_classification_row(c) for c in items],
            )

    def make_uids(
        self, source: str, key: str | None, study_uid: str | None, kind: str, new: Callable[[], str]
    ) -> Made:
        """UIDs for one more instance: the study of ``key`` (or ``study_uid`` when the rules
        gave one), its series for ``kind`` and the next InstanceNumber in that series."""
        with self._tx() as db:
            if study_uid is None:
                row = db.execute(
                    "SELECT uid FROM made_studies WHERE source = ? AND key = ?", (source, key)
                ).fetchone()
                study_uid = new() if row is None else str(row[0])
                if row is None:
                    db.execute(
                        "INSERT INTO made_studies (source, key, uid) VALUES (?, ?, ?)",
                        (source, key, study_uid),
                    )
            return Made(study_uid, *self._next_in_series(db, study_uid, kind, new), key=key)

    @staticmethod
    def _next_in_series(
        db: sqlite3.Connection, study_uid: str, kind: str, new: Callable[[], str]
    ) -> tuple[str, str, int]:
        row = db.execute(
            "SELECT uid, count FROM made_series WHERE study_uid = ? AND kind = ?",
            (study_uid, kind),
        ).fetchone()
        series, number = (new(), 1) if row is None else (str(row[0]), int(row[1]) + 1)
        db.execute(
            "INSERT OR REPLACE INTO made_series (study_uid, kind, uid, count) VALUES (?, ?, ?, ?)",
            (study_uid, kind, series, number),
        )
        return series, new(), number

    def replan(self, source: str, digest: str) -> int:
        """Read again the pending files of ``source`` that were read with other rules.

        Their sidecars are not read again: the text they had when the file was first read
        stays with the row (the folder's sidecar may describe the next patient by now).
        """
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE files SET kind = NULL, study_uid = NULL, sop_uid = NULL, "
                "sop_class = NULL, changes = NULL, rules_digest = NULL, solo = 0 "
                "WHERE state = 'pending' AND source = ? AND kind IS NOT NULL "
                "AND COALESCE(rules_digest, '') != ?",
                (source, digest),
            )
            return int(cursor.rowcount)

    # -- lookups (lookup.py) ----------------------------------------------------------------
    def cached_lookup(self, destination: str, key: str, since: float) -> str | None:
        """The answer to ``key`` fetched at ``since`` or later, if any."""
        row = (
            self._conn()
            .execute(
                "SELECT answer FROM lookups WHERE destination = ? AND key = ? AND fetched_at >= ?",
                (destination, key, since),
            )
            .fetchone()
        )
        return None if row is None else str(row[0])

    def cache_lookup(self, destination: str, key: str, answer: str) -> None:
        """Keep an archive's answer for other files with the same query (and forget old ones)."""
        now = self.clock()
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO lookups (destination, key, answer, fetched_at) "
                "VALUES (?, ?, ?, ?)",
                (destination, key, answer, now),
            )
            db.execute("DELETE FROM lookups WHERE fetched_at < ?", (now - LOOKUP_MEMORY,))

    # -- the workers' side -------------------------------------------------------------
    def claim_batch(
        self,
        destinations: Sequence[str],
        *,
        pick: Callable[[str, list[Job]], list[Job]],
        candidates: int,
        lease: float,
    ) -> list[Job]:
        """Claim the next batch: rows of the oldest ready study of a ready destination.

        ``pick`` (pure, from group.py) chooses which of the candidate rows form the batch.
        """
        if not destinations:
            return []
        now = self.clock()
        with self._tx() as db:
            head = _claim_head(db, destinations, now)
            if head is None:
                return []
            jobs = self._candidates(db, head, now, candidates)
            batch = pick(head[0], jobs)
            db.executemany(
                "UPDATE files SET state = 'claimed', lease_until = ? WHERE id = ?",
                [(now + lease, j.id) for j in batch],
            )
        return batch

    def claim_plan(self, destinations: Sequence[str]) -> list[str]:
        """How SQLite finds the next row to claim (EXPLAIN QUERY PLAN; diagnostics, tests)."""
        db = self._conn()
        rows = [
            db.execute(f"EXPLAIN QUERY PLAN {_CLAIM_HEAD}", (d, self.clock())).fetchall()
            for d in destinations
        ]
        return [str(r[3]) for found in rows for r in found]

    @staticmethod
    def _candidates(
        db: sqlite3.Connection, head: Sequence[Any], now: float, limit: int
    ) -> list[Job]:
        destination, study_uid, solo, head_id = head
        if solo:
            rows = db.execute(
                f"SELECT {_JOB_COLUMNS} FROM files WHERE id = ?", (head_id,)
            ).fetchall()
        else:
            rows = db.execute(
                f"SELECT {_JOB_COLUMNS} FROM files INDEXED BY files_study WHERE state = 'pending' "
                "AND destination = ? "
                "AND study_uid IS ? AND kind IS NOT NULL AND solo = 0 AND next_attempt_at <= ? "
                "ORDER BY id LIMIT ?",
                (destination, study_uid, now, limit),
            ).fetchall()
        return [_job(r) for r in rows]

    def release(self, ids: Iterable[int], *, not_before: float = 0.0) -> None:
        """Give claimed rows back untouched (shutdown, destination trouble).

        ``not_before`` keeps them behind rows that have not failed yet, so one batch that
        keeps failing cannot block the others.
        """
        with self._tx() as db:
            db.executemany(
                "UPDATE files SET state = 'pending', lease_until = NULL, "
                "next_attempt_at = MAX(next_attempt_at, ?) WHERE id = ? AND state = 'claimed'",
                [(not_before, i) for i in ids],
            )

    def retry_later(
        self,
        ids: Iterable[int],
        *,
        at: float,
        error: dict[str, Any],
        solo: bool = False,
        failing: bool = True,
    ) -> None:
        """A transient failure: count the attempt and wait until ``at``.

        ``failing=False``: a file that waits for something to appear (its study, for a
        lookup) rather than failing; ``first_try``, from which ``retry.max_age`` counts, is
        left unset so waiting never uses up the time allowed for failures."""
        now = self.clock()
        first = now if failing else None
        with self._tx() as db:
            db.executemany(
                "UPDATE files SET state = 'pending', lease_until = NULL, "
                "attempts = attempts + 1, first_try = COALESCE(first_try, ?), last_try = ?, "
                "next_attempt_at = ?, error = ?, solo = MAX(solo, ?) WHERE id = ?",
                [(first, now, at, json.dumps(error), int(solo), i) for i in ids],
            )

    def wait_for_rest(self, job: Job, *, at: float, error: dict[str, Any]) -> bool:
        """A file found incomplete (an image cut short): read it again at ``at``.

        ``first_try`` is when this content was first found incomplete; the watcher resets it
        (with the row) when the file changes, so the wait counts from the last change and
        never uses up the complete file's ``retry.max_age``.  Only while the row still holds
        the content that was read: a row the watcher updated meanwhile is read again at
        once.  Returns whether the row was updated."""
        now = self.clock()
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE files SET attempts = attempts + 1, first_try = COALESCE(first_try, ?), "
                "last_try = ?, next_attempt_at = ?, error = ? WHERE id = ? AND state = 'pending' "
                "AND size = ? AND mtime_ns = ?",
                (now, now, at, json.dumps(error), job.id, job.size, job.mtime_ns),
            )
            return cursor.rowcount > 0

    def isolate(self, ids: Iterable[int], *, not_before: float = 0.0) -> None:
        """Send these rows one per request from now on (to find a bad one in a batch)."""
        with self._tx() as db:
            db.executemany(
                "UPDATE files SET state = 'pending', lease_until = NULL, solo = 1, "
                "next_attempt_at = MAX(next_attempt_at, ?) WHERE id = ?",
                [(not_before, i) for i in ids],
            )

    # -- settling ------------------------------------------------------------------------
    def begin_settle(
        self,
        plans: Iterable[tuple[Job, str, str | None, dict[str, Any] | None]],
        *,
        notes: dict[int, str] | None = None,
    ) -> None:
        """Record (job, outcome, target, error) of each job before its file is moved (and
        the sidecars that go with it, for a repair after a crash).  A target of None: no
        free name could be chosen yet (the repair chooses it).  ``notes``: by job id, how
        the outcome came about (``ALREADY_STORED``); a row's note is kept otherwise."""
        notes = notes or {}
        with self._tx() as db:
            db.executemany(
                "UPDATE files SET state = 'settling', outcome = ?, target = ?, error = ?, "
                "sidecars = COALESCE(?, sidecars), note = COALESCE(?, note), "
                "lease_until = NULL WHERE id = ?",
                [
                    (o, t, json.dumps(e) if e else None, j.sidecars, notes.get(j.id), j.id)
                    for j, o, t, e in plans
                ],
            )

    def finish(self, job_id: int, *, state: str) -> None:
        """The file was moved (or is gone): the job is done."""
        self.finish_many([(job_id, state)])

    def finish_many(self, done: Iterable[tuple[int, str]]) -> None:
        """Mark (id, state) pairs done, in one transaction; a file found with new content
        while its row was busy is queued now, as a new job."""
        now = self.clock()
        done = list(done)
        later = [(i, self._after[i]) for i, _ in done if i in self._after]
        with self._tx() as db:
            db.executemany(
                "UPDATE files SET state = ?, done_at = ?, lease_until = NULL WHERE id = ?",
                [(state, now, i) for i, state in done],
            )
            queued = self._enqueue_many(db, [f for _, f in later], now)
        for i, _ in later:  # kept until committed: a failed write loses none of them
            self._after.pop(i, None)
        _log_queued(queued)

    def finish_kept(self, done: Iterable[tuple[int, str, dict[str, Any] | None]]) -> None:
        """Mark (id, state, error) done for files that stay where they are (``stowd migrate
        --keep``): outcome ``kept``, nothing was moved, so nothing is left to repair."""
        now = self.clock()
        with self._tx() as db:
            db.executemany(
                "UPDATE files SET state = ?, outcome = 'kept', target = NULL, error = ?, "
                "done_at = ?, lease_until = NULL WHERE id = ?",
                [(s, json.dumps(e) if e else None, now, i) for i, s, e in done],
            )

    def add_notes(self, notes: dict[int, str]) -> None:
        """Record by job id how a finished file's outcome came about (``ALREADY_STORED``),
        for the files ``finish_kept`` finished (a moved file's note goes with
        ``begin_settle``)."""
        with self._tx() as db:
            db.executemany(
                "UPDATE files SET note = ? WHERE id = ?", [(n, i) for i, n in notes.items()]
            )

    def finished_before(self, files: Sequence[NewFile]) -> set[str]:
        """Paths of ``files`` already stored (or ignored) with this very content: a re-run
        of ``stowd migrate --keep`` skips them."""
        found: set[str] = set()
        for at in range(0, len(files), 500):  # SQLite limits the number of parameters
            part = {(f.path, f.size, f.mtime_ns) for f in files[at : at + 500]}
            marks = ",".join("?" * len(part))
            rows = self._conn().execute(
                f"SELECT path, size, mtime_ns FROM files WHERE path IN ({marks}) "
                "AND state IN ('sent', 'ignored')",
                [p for p, _, _ in part],
            )
            found |= {r[0] for r in rows if (r[0], r[1], r[2]) in part}
        return found

    def run_tally(self, sources: Sequence[str], since: float) -> dict[str, tuple[int, int]]:
        """(files, bytes) by state of ``sources``' rows still active or done since ``since``;
        pending rows whose next attempt lies ahead count as ``waiting``."""
        marks = ",".join("?" * len(sources))
        where = f"WHERE source IN ({marks}) AND ({_ACTIVE_ROWS} OR done_at >= ?)"
        out: dict[str, tuple[int, int]] = {}
        for group in _tally(self._conn(), self.clock(), where, (*sources, since)):
            files, size = out.get(group.state, (0, 0))
            out[group.state] = (files + group.files, size + group.bytes)
        return out

    def run_already(self, sources: Sequence[str], since: float) -> int:
        """How many of ``sources``' files sent since ``since`` the archive said it held
        already (note ``ALREADY_STORED``): of ``run_tally``'s ``sent``."""
        marks = ",".join("?" * len(sources))
        where = f"WHERE source IN ({marks}) AND done_at >= ?"
        groups = _tally(self._conn(), self.clock(), where, (*sources, since))
        return sum(g.already for g in groups if g.state == "sent")

    def last_failures(self, sources: Sequence[str]) -> list[Failed]:
        """``sources``' files that failed, in any run, and were not queued again since (the
        newest row of their path is the failed one)."""
        marks = ",".join("?" * len(sources))
        rows = self._conn().execute(
            "SELECT path, outcome, target, error, done_at FROM files "
            f"WHERE source IN ({marks}) AND state = 'failed' AND NOT EXISTS "
            "(SELECT 1 FROM files AS later WHERE later.path = files.path AND later.id > files.id) "
            "ORDER BY id",
            tuple(sources),
        )
        return [Failed(*r) for r in rows]

    def forget_done(self, older_than: float) -> int:
        """Delete finished rows older than ``older_than`` (a timestamp).

        Files stored in place (``stowd migrate --keep``: state ``sent``, outcome ``kept``)
        stay: their row is the only record that they were stored, which lets a re-run skip
        them.  Only a later such row of the same path (the file changed and was stored
        again) replaces one.
        """
        with self._tx() as db:
            cur = db.execute(
                "DELETE FROM files WHERE done_at IS NOT NULL AND done_at < ? "
                "AND state IN ('sent', 'failed', 'gone') AND NOT (state = 'sent' "
                "AND outcome IS 'kept' AND NOT EXISTS (SELECT 1 FROM files AS later "
                "WHERE later.path = files.path AND later.id > files.id "
                "AND later.state = 'sent' AND later.outcome IS 'kept'))",
                (older_than,),
            )
            return cur.rowcount

    # -- destination holds -----------------------------------------------------------------
    def hold(self, name: str, *, until: float, reason: str) -> Hold:
        now = self.clock()
        with self._tx() as db:
            db.execute(
                "INSERT INTO destinations (name, held_since, held_until, reason, failures) "
                "VALUES (?, ?, ?, ?, 1) ON CONFLICT(name) DO UPDATE SET "
                "held_since = COALESCE(held_since, excluded.held_since), "
                "held_until = excluded.held_until, reason = excluded.reason, "
                "failures = failures + 1",
                (name, now, until, reason),
            )
        held = self.holds().get(name)
        assert held is not None
        return held

    def unhold(self, name: str) -> bool:
        """Clear a hold; True when there was one."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE destinations SET held_since = NULL, held_until = NULL, reason = NULL, "
                "failures = 0 WHERE name = ? AND held_since IS NOT NULL",
                (name,),
            )
            return cur.rowcount > 0

    def holds(self) -> dict[str, Hold]:
        return _holds(self._conn())

    # -- the daemon's troubles (a thread that keeps dying), for stowd status ----------------
    def set_trouble(self, name: str, text: str | None) -> None:
        """Record what is wrong with the daemon's ``name`` (None: nothing any more)."""
        with self._tx() as db:
            if text is None:
                db.execute("DELETE FROM troubles WHERE name = ?", (name,))
            else:
                db.execute(
                    "INSERT INTO troubles (name, since, text) VALUES (?, ?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET text = excluded.text",
                    (name, self.clock(), text),
                )

    def clear_troubles(self) -> None:
        """A daemon starting: the troubles of the last one are over."""
        with self._tx() as db:
            db.execute("DELETE FROM troubles")

    def troubles(self) -> list[tuple[str, float, str]]:
        """(name, since, text) of each trouble the running daemon recorded."""
        try:
            rows = self._conn().execute("SELECT name, since, text FROM troubles ORDER BY since")
        except sqlite3.OperationalError:  # read-only, a queue an older stowd wrote: none
            return []
        return [(r[0], r[1], r[2]) for r in rows.fetchall()]

    # -- status ----------------------------------------------------------------------------
    def active_of(self, sources: Sequence[str]) -> dict[str, int]:
        """How many rows of each of ``sources`` are not finished (queued, sending, moving)."""
        out: dict[str, int] = {}
        for group in _groups(self._conn(), self.clock(), active=True):
            if group.source in sources:
                out[group.source] = out.get(group.source, 0) + group.files
        return out

    def counts(self) -> dict[str, int]:
        """Counts by state; pending rows that wait for a later attempt count as ``waiting``."""
        return self.state_totals(self.clock())

    def jobs(self, state: str | None = None) -> list[Job]:
        """Every row (tests and diagnostics; not for hot paths)."""
        where, args = ("WHERE state = ?", (state,)) if state else ("", ())
        rows = (
            self._conn()
            .execute(f"SELECT {_JOB_COLUMNS} FROM files {where} ORDER BY id", args)
            .fetchall()
        )
        return [_job(r) for r in rows]

    # -- status queries (read only) ----------------------------------------------------------
    # For ``stowd status`` and the daemon's one-line status.  None writes; each reads a range
    # of an index, or (``tally``) makes one pass over the table.

    @contextmanager
    def reading(self) -> Iterator[Queue]:
        """The queries inside see one state of the queue (one WAL read snapshot); sqlite3's
        errors of those reads become ``QueueUnreadable`` here (the reads' one seam)."""
        conn = self._conn()
        try:
            conn.execute("BEGIN")
            try:
                yield self
            finally:
                conn.execute("COMMIT")  # ends the read transaction; nothing was written
        except sqlite3.Error as exc:
            raise QueueUnreadable(f"cannot read the queue {self.path}: {exc}") from exc

    def tally(self, now: float) -> list[Tally]:
        """Each group of rows (source, destination, state) in one pass: the count every other
        count but ``state_totals`` derives from.  Pending rows whose next attempt lies after
        ``now`` count as ``waiting``."""
        return _groups(self._conn(), now)

    def sent_since(self, since: float) -> list[tuple[str, str, int, int]]:
        """(source, destination, files, bytes) sent at ``since`` or later.

        ``+state`` keeps SQLite on the done_at index (the recent rows) rather than the state
        index (every sent row still in the history).
        """
        rows = (
            self._conn()
            .execute(
                "SELECT source, destination, COUNT(*), SUM(size) FROM files "
                "WHERE done_at >= ? AND +state = 'sent' GROUP BY source, destination",
                (since,),
            )
            .fetchall()
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def state_totals(self, now: float) -> dict[str, int]:
        """Counts by state, pending rows whose next attempt lies after ``now`` as ``waiting``
        (``counts`` at the queue's clock): the ``tallies`` summed, and the waiting rows
        counted (cheap enough for the daemon's status line every few seconds, however long
        the queue and its history)."""
        db = self._conn()
        if not _tallied(db):  # a queue an older stowd wrote, read by ``stowd status``
            return _state_totals_counted(db, now)
        rows = db.execute(
            "SELECT state, SUM(files) FROM tallies GROUP BY state HAVING SUM(files) > 0"
        ).fetchall()
        out = {state: int(count) for state, count in rows}
        waiting = db.execute(f"SELECT COUNT(*) FROM files {_ONLY_WAITING}", (now,)).fetchone()[0]
        if waiting:
            out["waiting"] = waiting
            out["pending"] = out.get("pending", 0) - waiting
            if not out["pending"]:
                del out["pending"]
        return out

    def throughput(self, since: float) -> list[Throughput]:
        """What was sent and failed per minute (at ``since`` or later), source and
        destination, oldest minute first; nothing from a queue an older stowd wrote (no
        ``throughput`` table before schema 8)."""
        db = self._conn()
        if _schema(db) < 8:
            return []
        rows = db.execute(
            "SELECT minute, source, destination, sent, bytes, failed FROM throughput "
            "WHERE minute >= ? ORDER BY minute",
            (_minute(since),),
        ).fetchall()
        return [Throughput(*r) for r in rows]

    def recent_failed(self, limit: int) -> list[tuple[float, str, str, str, str, float, str]]:
        """As ``recent_errors``, of the newest failed rows only (by ``done_at``), read from
        the ``files_failed`` index (schema 8: only failed rows), however many rows waiting
        for a retry carry an error."""
        db = self._conn()
        index = "INDEXED BY files_failed " if _schema(db) >= 8 else ""
        rows = db.execute(
            "SELECT done_at, source, destination, path, state, next_attempt_at, "
            f"COALESCE(error, '') FROM files {index}WHERE state = 'failed' "
            "ORDER BY done_at DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [(r[0], r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows]

    def recent_errors(self, limit: int) -> list[tuple[float, str, str, str, str, float, str]]:
        """(time, source, destination, path, state, next_attempt_at, error JSON) of the latest
        rows that carry an error, newest first, read from the newest end of the
        ``files_errors`` index (only rows with an error), however many rows the queue holds."""
        db = self._conn()
        index = "INDEXED BY files_errors " if _tallied(db) else ""
        rows = db.execute(
            "SELECT COALESCE(done_at, last_try, queued_at) AS t, source, destination, path, "
            f"state, next_attempt_at, error FROM files {index}WHERE error IS NOT NULL AND "
            "state IN "
            "('pending', 'claimed', 'settling', 'failed', 'gone', 'ignored') "
            "ORDER BY COALESCE(done_at, last_try, queued_at) DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [(r[0], r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows]


def _minute(when: float) -> int:
    """The start of the minute ``when`` lies in, as the throughput table keys it."""
    return int(when // 60) * 60


def _tally(
    db: sqlite3.Connection, now: float, where: str = "", params: tuple[Any, ...] = ()
) -> list[Tally]:
    """The one count by state (``Tally`` groups) of the rows ``where`` selects."""
    rows = db.execute(
        f"SELECT source, destination, {_STATE} AS s, COUNT(*), SUM(size), MIN(queued_at), "
        "TOTAL(outcome = 'sent'), TOTAL(note IS ?), TOTAL(note LIKE ?) FROM files "
        f"{where} GROUP BY source, destination, s",
        (now, ALREADY_STORED, f"{STORED_WITH_WARNING} %", *params),
    ).fetchall()
    return [
        Tally(r[0], r[1], r[2], r[3], r[4], r[5], int(r[6]), int(r[7]), int(r[8])) for r in rows
    ]


def _schema(db: sqlite3.Connection) -> int:
    """The schema version of the queue (an older stowd's, when ``status`` reads it)."""
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def _tallied(db: sqlite3.Connection) -> bool:
    """Does this queue keep ``tallies`` (schema 7)?  One an older stowd wrote, which ``stowd
    status`` reads without changing it, does not: its rows are counted."""
    return int(db.execute("PRAGMA user_version").fetchone()[0]) >= 7


def _state_totals_counted(db: sqlite3.Connection, now: float) -> dict[str, int]:
    rows = db.execute(
        f"SELECT state, COUNT(*), SUM({_WAITING}) FROM files GROUP BY state", (now,)
    ).fetchall()
    out: dict[str, int] = {}
    for state, count, waiting in rows:
        out.update({k: n for k, n in ((state, count - waiting), ("waiting", waiting)) if n})
    return out


def _groups(db: sqlite3.Connection, now: float, *, active: bool = False) -> list[Tally]:
    """``_tally`` of every row (``active``: of the active ones), read from ``tallies`` and
    the waiting rows: a few rows read, however many the queue holds.  ``oldest`` is exact
    for each active group but pending, whose oldest is that of pending and waiting rows
    together (what every reader wants: the oldest of all active rows); of a finished
    group it is 0 (never read)."""
    if not _tallied(db):
        return _tally(db, now, f"WHERE {_ACTIVE_ROWS}" if active else "")
    rows = db.execute(
        f"SELECT {_TALLY_KEY}, files, bytes, stored, already, warned FROM tallies "
        "WHERE files > 0" + (f" AND {_ACTIVE_ROWS}" if active else "")
    ).fetchall()
    found = _tally(db, now, _ONLY_WAITING, (now,))
    waiting = {(g.source, g.destination): g for g in found}
    out = [
        _less_waiting(db, Tally(r[0], r[1], r[2], r[3], r[4], 0.0, r[5], r[6], r[7]), waiting)
        for r in rows
    ]
    return [g for g in out if g.files > 0] + list(waiting.values())


def _less_waiting(db: sqlite3.Connection, group: Tally, waiting: dict[Any, Tally]) -> Tally:
    """A group of ``tallies`` as ``Tally`` shows it: pending without the waiting rows, and
    an active group with the queued_at of its oldest row."""
    if group.state not in ACTIVE:
        return group
    oldest = db.execute(
        "SELECT MIN(queued_at) FROM files WHERE source = ? AND destination = ? AND state = ? "
        f"AND {_ACTIVE_ROWS}",
        (group.source, group.destination, group.state),
    ).fetchone()[0]
    group = group._replace(oldest=oldest if oldest is not None else 0.0)
    less = waiting.get((group.source, group.destination)) if group.state == "pending" else None
    if less is None:
        return group
    return group._replace(
        files=group.files - less.files,
        bytes=group.bytes - less.bytes,
        stored=group.stored - less.stored,
        already=group.already - less.already,
        warned=group.warned - less.warned,
    )


def _holds(db: sqlite3.Connection) -> dict[str, Hold]:
    rows = db.execute(
        "SELECT name, held_since, held_until, reason, failures FROM destinations "
        "WHERE held_since IS NOT NULL"
    ).fetchall()
    return {r[0]: Hold(*r) for r in rows}


def read_active(path: Path, now: float, *, busy_timeout: float) -> ActiveView:
    """The active rows by destination and state, and the holds, for a metrics scrape.

    Read in one transaction of a read-only connection of its own, closed before returning:
    a scrape runs in a thread of the metrics server, so it never shares the daemon's
    per-thread connections, never blocks the daemon (a WAL reader), and waits at most
    ``busy_timeout`` seconds for a locked database.  sqlite3's errors become ``QueueError``
    with the same text (a missing queue, a file that is not a database).
    """
    uri = f"{path.resolve().as_uri()}?mode=ro"
    try:
        conn = sqlite3.connect(
            uri, uri=True, timeout=busy_timeout, isolation_level=None, factory=_Connection
        )
    except sqlite3.Error as exc:
        raise QueueError(str(exc)) from exc
    try:
        conn.execute("BEGIN")  # one snapshot for both queries
        return _active_view(conn, now)
    except sqlite3.Error as exc:
        raise QueueError(str(exc)) from exc
    finally:
        conn.close()


def _active_view(db: sqlite3.Connection, now: float) -> ActiveView:
    view = ActiveView()
    for group in _groups(db, now, active=True):
        key = (group.destination, group.state)
        view.counts[key] = view.counts.get(key, 0) + group.files
        view.oldest[group.destination] = min(
            group.oldest, view.oldest.get(group.destination, group.oldest)
        )
    view.held = set(_holds(db))
    return view


def _cannot_write(path: Path, exc: OSError | sqlite3.Error) -> str:
    """One line for an administrator: which file, and why stowd cannot write it."""
    cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    where = getattr(exc, "filename", None) or path
    why = _folder_problem(path.parent)
    return f"cannot use the queue {where}: {cause}" + (f"; {why}" if why else "")


def _folder_problem(folder: Path) -> str | None:
    """Why the queue folder cannot be written, when it plainly cannot (else None)."""
    readonly = read_only_note(folder)
    if readonly is not None:
        return readonly
    free = disk.free_bytes(folder)
    if free is not None and free < disk.FULL_BELOW:
        return (
            f"DISK FULL: the queue folder {folder} has {free} bytes free, and SQLite needs room "
            "there for the queue's -wal and -shm files: free space on that filesystem "
            f"(df -h {folder}); stowd can open its queue once there is"
        )
    if not os.access(folder, os.W_OK):
        return (
            f"this user may not write in the queue folder {folder}: run stowd as the user "
            "that owns it"
        )
    return None


def read_only_note(folder: Path) -> str | None:
    """What to say when the queue folder is on a read-only filesystem (else None)."""
    try:
        if not os.statvfs(folder).f_flag & os.ST_RDONLY:
            return None
    except OSError:
        return None
    return (
        f"the queue folder {folder} is on a read-only filesystem; stowd writes the queue, "
        "its -wal, -shm and .lock files there: mount it read-write, or set `queue` to a path "
        "on a writable local disk"
    )


def open_readonly(path: Path) -> Queue:
    """A queue for ``stowd status``: no lock, no schema change, never blocks the daemon."""
    if not path.exists():
        raise QueueError(f"no queue at {path} (has stowd run with this config yet?)")
    return Queue(path, readonly=True)
