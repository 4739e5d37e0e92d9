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
in the last day (the status page's charts and ``stowd status``'s "today"), kept bounded as
they are counted.  Until schema 10 triggers counted both, row by row; since, the queue
counts each transaction's changes once a group (``Counts``, written by ``_write_counts``).

Paths are kept exactly, whatever bytes their names hold.  A value that is not valid UTF-8 (a
name with bytes such as ``ff fe``, which ``os.fsdecode`` gives as lone surrogates) is stored
as the BLOB of its bytes (``os.fsencode``) in its TEXT column (SQLite keeps a value's own type)
and read back as the same ``str``; every other value is stored as TEXT as it always was.  That
happens in one place, the connection (``_Connection``), so the rest of stowd sees ``str``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Self

from stowd.errors import QueueError, QueueFull, QueueUnreadable
from stowd.pipeline import disk
from stowd.pipeline.queue.core import _WAITING, QUEUE_MODE, Db, Queue, take_lock
from stowd.pipeline.queue.model import (
    ALREADY_STORED,
    FIGURES,
    HISTORY_SPAN,
    STORED_WITH_WARNING,
    ActiveView,
    Counts,
)

log = logging.getLogger("stowd.queue")

SCHEMA_VERSION = 10
BUSY_TIMEOUT_MS = 30_000
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
    note TEXT,
    node TEXT
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
# for updates and deletes until schema 10, by ``Counts`` since; the rows a transaction
# inserts by ``Queue._count``, since ``_INSERT`` is the one statement that inserts), so
# ``stowd status`` reads a few rows
# instead of passing over the table.  Which pending rows are "waiting" depends on the time
# asked about: those are read from ``files_waiting`` (only the waiting rows).  ``files_age``
# gives the oldest active row of a group in one step, and ``files_claim`` the next row to
# claim, in claim order, without reading the pending rows before it; ``files_errors`` the
# newest rows with an error.
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
    "INSERT OR REPLACE INTO tallies SELECT source, destination, state, COUNT(*), TOTAL(size), "
    "TOTAL(outcome = 'sent'), TOTAL(note IS '" + ALREADY_STORED + "'), "
    "TOTAL(note LIKE '" + STORED_WITH_WARNING + " %') FROM files "
    "GROUP BY source, destination, state",
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

# Schema 10: no triggers.  SQLite has no statement-level triggers, and its per-row ones (two
# upserts into ``tallies`` and one into ``throughput`` for each row of every change of state)
# were a sixth of the queue's time; the queue counts each transaction's changes from the rows
# it changes, once a group (``Counts``, written by ``_write_counts`` before the commit).  The
# counts the triggers kept are carried on as they are.  An older stowd refuses the queue (its
# schema is newer), so none writes it without counting.
_SCHEMA_10 = (
    "DROP TRIGGER IF EXISTS tally_update",
    "DROP TRIGGER IF EXISTS tally_delete",
    "DROP TRIGGER IF EXISTS throughput_done",
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
    8: ("ALTER TABLE files ADD COLUMN node TEXT",),  # schema 9: the node of a claim
    9: _SCHEMA_10,
}


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


_THROUGHPUT_ADD = (
    "INSERT INTO throughput (minute, source, destination, sent, bytes, failed) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (minute, source, destination) DO UPDATE SET "
    "sent = sent + excluded.sent, bytes = bytes + excluded.bytes, failed = failed + excluded.failed"
)


def _write_counts(db: sqlite3.Connection, counts: Counts) -> None:
    """Write what a transaction changed in the counts (``Counts``: the rows it inserted,
    changed and deleted), before its commit: one upsert a group, not a trigger a row; and
    drop the minutes of ``throughput`` older than a day before its newest file."""
    db.executemany(
        _TALLY_ADD.format(values="?, ?, ?, ?, ?, ?, ?, ?"),
        [(*key, *figures) for key, figures in counts.tallies().items() if any(figures)],
    )
    throughput, latest = counts.throughput()
    if latest is None:
        return
    db.executemany(_THROUGHPUT_ADD, [(*key, *figures) for key, figures in throughput.items()])
    db.execute("DELETE FROM throughput WHERE minute < ?", (latest - HISTORY_SPAN - 60,))


def _roll_back(conn: sqlite3.Connection) -> None:
    """End a failed transaction (SQLite may have ended it already, e.g. on a full disk)."""
    if conn.in_transaction:
        with suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


# The next row to claim of one destination: read from the start of ``files_claim`` (in claim
# order), however many rows wait before it.
_CLAIM_HEAD = (
    "SELECT destination, study_uid, solo, id, next_attempt_at FROM files INDEXED BY files_claim "
    "WHERE state = 'pending' AND kind IS NOT NULL AND destination = ? AND next_attempt_at <= ?"
    "{mine} ORDER BY next_attempt_at, id LIMIT 1"
)


# every change of state reads back the rows it changed (``UPDATE ... RETURNING``: 3.35)
SQLITE_NEEDED = (3, 35, 0)


def _check_sqlite(version: tuple[int, int, int] = sqlite3.sqlite_version_info) -> None:
    """Refuse, with what to do, an SQLite library older than the queue needs (RHEL 9's
    Python has 3.34), rather than fail at the first claim."""
    if version < SQLITE_NEEDED:
        have, need = ".".join(map(str, version)), ".".join(map(str, SQLITE_NEEDED))
        raise QueueError(
            f"the queue needs SQLite {need} or newer; this Python's sqlite3 module has {have} "
            "(use a Python built with a newer SQLite, or a PostgreSQL queue)"
        )


class SqliteQueue(Queue):
    """The queue in one SQLite file (``config.queue``): one daemon writes it (the lock file),
    ``stowd status`` and the metrics read it beside the daemon (WAL readers)."""

    _BY_ACTIVE_PATH = "INDEXED BY files_active_path "
    _BY_STUDY = "INDEXED BY files_study "
    # the waiting rows, read from their index (schema 7) and nothing else, however many pending
    _ONLY_WAITING = f"INDEXED BY files_waiting WHERE {_WAITING}"
    # keeps SQLite on the done_at index (the recent rows) rather than the state index
    _SENT_STATE = "+state"
    _CLAIM_HEAD = _CLAIM_HEAD
    _COUNTS = True

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.time,
        readonly: bool = False,
        node: str = "",
    ) -> None:
        super().__init__(path, clock=clock, readonly=readonly, node=node)
        self._marked = False  # this process wrote the open marker

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    # -- opening -----------------------------------------------------------------
    def open(self, *, lock: bool = True) -> Self:
        """Create or migrate the database; take the single-daemon lock when ``lock``."""
        _check_sqlite()
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
            fresh = (*_SCHEMA.split(";"), *_SCHEMA_7, *_SCHEMA_8, *_SCHEMA_10)
            for statement in fresh if version == 0 else ():
                if statement.strip():
                    db.execute(statement)
            for step in range(version or SCHEMA_VERSION, SCHEMA_VERSION):
                for statement in _MIGRATIONS[step]:
                    if not _column_there(db, statement):
                        db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _take_lock(self) -> None:
        self._lock_fd = take_lock(self.path)

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
        self._local.counts = counts = Counts()
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            _write_counts(conn, counts)
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
            self._each_part(
                db,
                "UPDATE files SET state = 'pending', lease_until = NULL "
                "WHERE id {ids} AND state = 'claimed'",
                ids,
                was="claimed",
            )
        return len(ids)

    def recover(self) -> int:
        """Return claims of a dead daemon to pending; returns how many."""
        with self._tx() as db:
            rows = db.execute(
                "UPDATE files SET state = 'pending', lease_until = NULL WHERE state = 'claimed' "
                f"RETURNING {FIGURES}"
            ).fetchall()
            self._counts().moved(rows, "claimed")
            return len(rows)

    def claim_plan(self, destinations: Sequence[str]) -> list[str]:
        """How SQLite finds the next row to claim (EXPLAIN QUERY PLAN; diagnostics, tests)."""
        db = self._conn()
        rows = [
            db.execute(
                f"EXPLAIN QUERY PLAN {_CLAIM_HEAD.format(mine='')}", (d, self.clock())
            ).fetchall()
            for d in destinations
        ]
        return [str(r[3]) for found in rows for r in found]

    @contextmanager
    def reading(self) -> Iterator[Self]:
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

    def troubles(self) -> list[tuple[str, float, str]]:
        """(name, since, text) of each trouble the running daemon recorded."""
        try:
            rows = self._conn().execute("SELECT name, since, text FROM troubles ORDER BY since")
        except sqlite3.OperationalError:  # read-only, a queue an older stowd wrote: none
            return []
        return [(r[0], r[1], r[2]) for r in rows.fetchall()]

    @classmethod
    def _schema(cls, db: Db) -> int:
        return int(db.execute("PRAGMA user_version").fetchone()[0])

    @classmethod
    def _hint(cls, db: Db, index: str, since: int) -> str:
        return f"INDEXED BY {index} " if cls._schema(db) >= since else ""


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
        return SqliteQueue._active_view(conn, now)
    except sqlite3.Error as exc:
        raise QueueError(str(exc)) from exc
    finally:
        conn.close()


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


def open_readonly(path: Path) -> SqliteQueue:
    """A queue for ``stowd status``: no lock, no schema change, never blocks the daemon."""
    if not path.exists():
        raise QueueError(f"no queue at {path} (has stowd run with this config yet?)")
    return SqliteQueue(path, readonly=True)
