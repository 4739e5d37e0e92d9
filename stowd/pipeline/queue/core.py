"""What both queue backends share: the ``Queue`` every part of stowd uses, its logic and the
SQL both engines read (SQLite's ``sqlite.py``, PostgreSQL's ``postgres.py`` add how they
connect, open, migrate, take a transaction and translate their errors, and the few words
their dialects write differently: class attributes such as ``_MAX``, ``_LOCK_ROWS``).

A statement here is written with ``?`` placeholders; the PostgreSQL backend's connection
reads them as its own.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol, Self, TypeVar

from stowd.errors import QueueLockedError, SidecarNotReady
from stowd.pipeline.queue.model import (
    ACTIVE,
    ALREADY_STORED,
    FIGURES,
    LOOKUP_MEMORY,
    STORED_WITH_WARNING,
    ActiveView,
    Classification,
    Counts,
    Failed,
    Figures,
    Hold,
    Holding,
    Job,
    Lost,
    Made,
    NewFile,
    Node,
    Tally,
    Throughput,
    Walk,
    classification_row,
    job,
    just_settled,
    log_queued,
    minute,
    new_row,
    taken,
)

# the one rule for "waiting": a pending row whose next attempt lies after the time bound
_WAITING = "state = 'pending' AND next_attempt_at > ?"
_STATE = f"CASE WHEN {_WAITING} THEN 'waiting' ELSE state END"
_ACTIVE_ROWS = "state IN ('pending', 'claimed', 'settling')"
_TALLY_KEY = "source, destination, state"
JOB_COLUMNS = (
    "id, source, destination, path, rel, size, mtime_ns, kind, study_uid, sop_uid, "
    "attempts, first_try, error, outcome, target, changes, sidecars, made, queued_at, lookup, "
    "state"
)
_JOB_COLUMNS = JOB_COLUMNS
ENQUEUE_PART = 300  # files per statement: 3 parameters each, under SQLite's oldest limit (999)
PARAMETERS = 999  # SQLite's oldest limit of parameters a statement (``_value_parts``)
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
    "FROM asked) AS found WHERE state IS NOT NULL"
)
_K = TypeVar("_K")
QUEUE_MODE = 0o600  # the queue's files (and a node's lock file): stowd's alone, whatever the umask


def _doc(error: dict[str, Any] | None) -> str | None:
    return json.dumps(error) if error else None


def _grouped(pairs: Iterable[tuple[_K, int]]) -> dict[_K, list[int]]:
    """The ids of each key (a change that differs only by a few values: a statement each)."""
    out: dict[_K, list[int]] = {}
    for key, i in pairs:
        out.setdefault(key, []).append(i)
    return out


def _value_parts(
    rows: Sequence[tuple[Any, ...]], more: int = 0
) -> Iterator[tuple[str, tuple[Any, ...]]]:
    """``rows`` in parts whose values (and ``more`` parameters) one statement takes, under
    ``PARAMETERS``: each part as ``VALUES (?, ...),(?, ...)`` (a mark a value of its rows)
    and those values in order; none if empty."""
    width = max(1, len(rows[0])) if rows else 1
    step = max(1, (PARAMETERS - more) // width)
    row = "(" + ", ".join("?" * width) + ")"
    for at in range(0, len(rows), step):
        part = rows[at : at + step]
        yield "VALUES " + ",".join([row] * len(part)), tuple(v for r in part for v in r)


def take_lock(anchor: Path) -> int:
    """The single-daemon lock on ``anchor`` (``<anchor>.lock``, holding the pid): one daemon per
    SQLite queue, or per node state folder of a PostgreSQL one; its file descriptor."""
    fd = os.open(str(anchor) + ".lock", os.O_RDWR | os.O_CREAT, QUEUE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise QueueLockedError(
            f"another stowd (pid {holder}) is using the queue {anchor}"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


class Cursor(Protocol):
    """What the queue reads of a cursor (sqlite3's, or the PostgreSQL backend's)."""

    @property
    def rowcount(self) -> int: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Db(Protocol):
    """A connection as the queue uses it: statements with ``?`` placeholders."""

    def execute(self, sql: str, parameters: Any = (), /) -> Any: ...
    def executemany(self, sql: str, parameters: Iterable[Any], /) -> Any: ...
    def close(self) -> None: ...


class Queue:
    """Thread-safe access to the queue database (one connection per thread)."""

    # What the two dialects write differently (the SQLite backend's words here; the
    # PostgreSQL backend sets its own).  Everything else is one SQL both engines read.
    _BY_ACTIVE_PATH = ""  # an index hint: the active rows by path
    _BY_STUDY = ""  # an index hint: a study's rows
    _ONLY_WAITING = f"WHERE {_WAITING}"  # the waiting rows, from their index where there is one
    _IS = "IS"  # equal, NULL equal to NULL
    _MAX = "MAX"  # the larger of two values
    _SENT_STATE = "state"  # the state column in ``sent_since`` (SQLite: ``+state``)
    _LOCK_ROWS = ""  # after a claim's reads: lock what was read, skip what another holds
    _SETTLE_LEASE = "lease_until = NULL"  # what ``begin_settle`` does with the lease
    _LOCK_OURS = ""  # after reading the rows a node is about to change: lock them till it does
    _SHARED = False  # nodes share the queue: a claim is its node's (SQLite: the one daemon's)
    _CLAIM_HEAD = ""  # the next ready row of one destination (see sqlite.py)
    _TALLIES = "tallies"  # the counts of each group (source, destination, state)
    _THROUGHPUT = "throughput"  # the counts of each minute
    # the queue counts ``tallies`` and ``throughput`` from the rows each statement changes
    # (``Counts``, written once a transaction): SQLite, which has no statement-level
    # triggers; PostgreSQL's statement-level triggers count them (False)
    _COUNTS = False

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.time,
        readonly: bool = False,
        node: str = "",
    ) -> None:
        self.path = path  # SQLite: the queue file; PostgreSQL: the node's anchor (lock, state)
        self.clock = clock
        self.readonly = readonly
        self.node = node  # recorded with each claim
        self._local = threading.local()
        self._lock_fd: int | None = None
        # files found with new content while their row was claimed or settling (by row id):
        # queued as new jobs when that row is done (``finish_many``), not at the next rescan
        self._after: dict[int, NewFile] = {}
        # settling rows taken over from a node whose lease expired (``reclaim``), for the
        # daemon to finish their moves (``settle.repair``) and then forget
        self.adopted: set[int] = set()

    def release_connection(self) -> None:
        """Close the calling thread's connection (a thread that ends, such as an
        association's, gives its connection back; the next call opens another)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._local.conn = None
            conn.close()

    def _conn(self) -> Db:
        conn: Db | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    # -- what each backend provides ------------------------------------------------------
    def open(self, *, lock: bool = True) -> Self:
        """Create or migrate the database; take the single-daemon lock when ``lock``."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _connect(self) -> Db:
        raise NotImplementedError

    def _tx(self) -> AbstractContextManager[Db]:
        """One write transaction; the engine's errors become ``QueueError`` (``QueueFull``)."""
        raise NotImplementedError

    def reading(self) -> AbstractContextManager[Self]:
        """The queries inside see one state of the queue; their errors: ``QueueUnreadable``."""
        raise NotImplementedError

    def reclaim(self, held: Collection[int]) -> int:
        """Return to pending the claims whose lease ran out, except ``held``; how many."""
        raise NotImplementedError

    def recover(self) -> int:
        """Return this node's claims (a dead daemon's) to pending; how many."""
        raise NotImplementedError

    def renew(self, ids: Iterable[int], until: float) -> int:
        """Extend the lease of this node's claims ``ids`` to ``until``; how many were."""
        with self._tx() as db:
            return self._each_part(
                db,
                "UPDATE files SET lease_until = ? WHERE id {ids} AND node = ? "
                "AND state IN ('claimed', 'settling')",
                ids,
                (until,),
                (self.node,),
            )

    def _ours(
        self, db: Db, known: Mapping[int, str], seen: dict[int, Figures] | None = None
    ) -> tuple[list[int], Lost]:
        """Of the rows ``known`` (id -> the state this node knows it in: ``pending``, read by
        a reader; ``claimed``, its claim; ``settling``, a move it recorded), those still so
        and still this node's to change (in id order), and those it lost (``Lost``).  A
        pending row is any node's; a claimed or settling one only its node's: one whose
        lease ran out was taken over (returned to pending, claimed or finished by another
        node), and its old node changes nothing of it and moves no file of it.  SQLite's
        rows are its one daemon's (their ``node`` is whatever this host was called then);
        the state alone is checked.  PostgreSQL locks the rows read until the transaction
        ends (in id order: never a deadlock with another node).  ``seen``: filled with the
        ``FIGURES`` of each row read, for ``Counts``."""
        ids = sorted(known)
        found: dict[int, tuple[str, str | None]] = {}
        figures = "" if seen is None else f", {FIGURES}"
        for part in self._parts(ids):
            where, args = self._in(part)
            rows = db.execute(
                f"SELECT id, state, node{figures} FROM files WHERE id {where} "
                f"ORDER BY id{self._LOCK_OURS}",
                args,
            )
            for r in rows:
                found[r[0]] = (r[1], r[2])
                if seen is not None:
                    seen[r[0]] = tuple(r[3:])
        ours: list[int] = []
        lost: Lost = {}
        for i in ids:
            state, node = found.get(i, ("", None))
            if state == known[i] and (state == "pending" or not self._SHARED or node == self.node):
                ours.append(i)
            else:
                held = state not in ("", "pending") and node is not None and node != self.node
                lost[i] = node if held and node is not None else ""
        return ours, lost

    def _mine(self) -> tuple[str, tuple[Any, ...]]:
        """A condition on ``files`` (with its parameters) that the rows this node reads and
        claims meet: SQLite, none (its one daemon parks the rows of the sources it lacks,
        ``adopt``); PostgreSQL, a source this node's config has."""
        return "", ()

    # -- the nodes of a shared queue (issue 23) ----------------------------------------------
    def heartbeat(self, *, pid: int, host: str, started: float, version: str, lease: float) -> None:
        """Say that this node's daemon is alive (a shared queue's ``nodes`` table); SQLite:
        nothing (one node, this host)."""

    def nodes(self) -> list[Node]:
        """The nodes that ever ran on this queue, as each last said (SQLite: none)."""
        return []

    def forget_nodes(self, silent_for: float) -> list[str]:
        """Forget the nodes silent that long that hold nothing; their names (SQLite: none)."""
        return []

    def leases_now(self, now: float) -> float:
        """Now on the clock leases and heartbeats are kept on, given ``now`` on this host's:
        SQLite's, this host's (``now``); PostgreSQL's, the database's (the nodes' clocks
        differ, so a lease's or a heartbeat's age is measured on the clock it was written
        on, never on this host's)."""
        return now

    def holdings(self) -> list[Holding]:
        """What each node holds now: its claims and the rows it is moving (by node)."""
        return self._holdings(self._conn())

    @staticmethod
    def _holdings(db: Db) -> list[Holding]:
        rows = db.execute(
            "SELECT COALESCE(node, ''), SUM(CASE WHEN state = 'claimed' THEN 1 ELSE 0 END), "
            "SUM(CASE WHEN state = 'settling' THEN 1 ELSE 0 END), MIN(lease_until) FROM files "
            "WHERE state IN ('claimed', 'settling') GROUP BY COALESCE(node, '') ORDER BY 1"
        )
        return [Holding(r[0], int(r[1]), int(r[2]), r[3]) for r in rows.fetchall()]

    def settled_by(self, since: float) -> dict[str, tuple[int, int]]:
        """(files, bytes) each node moved to sent/ or failed/ since ``since`` (read from the
        recent finished rows: the node that settles a row is recorded on it)."""
        rows = self._conn().execute(
            "SELECT COALESCE(node, ''), COUNT(*), CAST(SUM(size) AS BIGINT) FROM files "
            "WHERE done_at >= ? AND state IN ('sent', 'failed') GROUP BY COALESCE(node, '')",
            (since,),
        )
        return {r[0]: (int(r[1]), int(r[2] or 0)) for r in rows.fetchall()}

    # -- the walk of a migration (``stowd migrate`` on several nodes) ---------------------
    def take_walk(self, source: str, lease: float, run: float | None = None) -> Walk:
        """Walk ``source`` (a migration's) if no other node does (``run``: the start of the
        run this node joined, if any): SQLite has one node, which always walks (``mine``),
        the run beginning now.  The PostgreSQL backend keeps one
        walk lease per source (``migrate_walks``)."""
        return Walk(source, self.node, self.clock(), None, mine=True)

    def renew_walk(self, source: str, lease: float, skipped: int) -> bool:
        """Extend this node's walk lease of ``source`` by ``lease`` seconds and record how
        many files it skipped so far; False when the walk is no longer this node's (another
        took it over).  SQLite: nothing to renew."""
        return True

    def end_walk(self, source: str, skipped: int) -> bool:
        """Record that this node walked ``source`` to its end; False when the walk was taken
        over meanwhile.  SQLite: nothing to record."""
        return True

    def walks(self, sources: Sequence[str]) -> list[Walk]:
        """The walks of ``sources`` as recorded (SQLite: none; the run is this process)."""
        return []

    def run_nodes(self, sources: Sequence[str], since: float) -> dict[str, tuple[int, int]]:
        """(files, bytes) each node stored of ``sources`` since ``since`` (the node that
        settles a row is recorded on it)."""
        where, args = self._in(sources)
        rows = self._conn().execute(
            "SELECT COALESCE(node, ''), COUNT(*), CAST(SUM(size) AS BIGINT) FROM files "
            f"WHERE source {where} AND done_at >= ? AND state = 'sent' "
            "GROUP BY COALESCE(node, '') ORDER BY 1",
            (*args, since),
        )
        return {r[0]: (int(r[1]), int(r[2] or 0)) for r in rows.fetchall()}

    # ids per statement where a statement names each (SQLite limits the number of
    # parameters); PostgreSQL: None, all of them in one array (``_in``)
    _PART: int | None = 500

    @classmethod
    def _in(cls, values: Sequence[Any]) -> tuple[str, tuple[Any, ...]]:
        """The condition "is one of ``values``" (after a column) and its parameters: SQLite,
        ``IN (?, ...)`` with a parameter each (at most ``_PART`` of them); PostgreSQL, ``=
        ANY(?)`` with one array, however many (a statement takes at most 65,535 parameters)."""
        if not values:
            return "IN (NULL)", ()
        return "IN (" + ",".join("?" * len(values)) + ")", tuple(values)

    @classmethod
    def _parts(cls, values: Sequence[Any]) -> Iterator[Sequence[Any]]:
        """``values`` in parts that ``_in`` takes (PostgreSQL: all at once); none if empty."""
        step = cls._PART or len(values)
        for at in range(0, len(values), step or 1):
            yield values[at : at + step]

    def _each_part(
        self,
        db: Db,
        sql: str,
        ids: Iterable[int],
        before: tuple[Any, ...] = (),
        after: tuple[Any, ...] = (),
        *,
        was: str | None = None,
    ) -> int:
        """Run ``sql``, whose ``{ids}`` follows ``id`` (between the parameters ``before``
        and ``after``), for ``ids`` (in id order): one statement for all of them on
        PostgreSQL (one array), one for each part of ``_PART`` on SQLite, never one a row
        (a statement costs its round trip, its plan and, on PostgreSQL, a run of the
        counting triggers).  Nothing for no ids.  Returns how many rows it changed.

        ``was``: ``sql`` changes the rows' state from ``was`` (and no other column
        ``Counts`` reads but ``done_at``): where the queue counts (``_COUNTS``), counted
        from the rows it changed (``RETURNING``)."""
        counting = was is not None and self._COUNTS
        changed = 0
        for part in self._parts(sorted(ids)):
            where, args = self._in(part)
            statement = sql.replace("{ids}", where)
            if not counting:
                changed += int(db.execute(statement, (*before, *args, *after)).rowcount)
                continue
            rows = db.execute(
                f"{statement} RETURNING {FIGURES}", (*before, *args, *after)
            ).fetchall()
            self._counts().moved(rows, str(was))
            changed += len(rows)
        return changed

    def _counts(self) -> Counts:
        """What the calling thread's transaction changed in the counts (``_COUNTS``)."""
        counts: Counts = self._local.counts
        return counts

    @contextmanager
    def _changing(self, db: Db, where: str, params: tuple[Any, ...] = ()) -> Iterator[None]:
        """Count the change made inside of the rows ``where`` selects (before it), each read
        before and after (by id): for the rare changes of a few rows (a file rewritten while
        queued, the notes of files stored in place), where the queue counts."""
        if not self._COUNTS:
            yield
            return
        old = {
            r[0]: tuple(r[1:])
            for r in db.execute(f"SELECT id, {FIGURES} FROM files {where}", params)
        }
        yield
        new: dict[int, Figures] = {}
        for part in self._parts(sorted(old)):
            ids, args = self._in(part)
            rows = db.execute(f"SELECT id, {FIGURES} FROM files WHERE id {ids}", args)
            new.update({r[0]: tuple(r[1:]) for r in rows})
        counts = self._counts()
        for i, row in old.items():
            counts.change(row, new.get(i))

    def _count_groups(self, db: Db, where: str, params: tuple[Any, ...], *, to: str | None) -> None:
        """Count, before it is made, a change of the rows ``where`` selects that points them
        at the destination ``to`` and changes nothing else ``Counts`` reads (None: deletes
        them), group by group: one pass over the rows, never a value kept a row (a source's
        million queued rows parked, a long history's end), where the queue counts."""
        if not self._COUNTS:
            return
        rows = db.execute(
            "SELECT source, destination, state, COUNT(*), TOTAL(size), TOTAL(outcome = 'sent'), "
            "TOTAL(note = ?), TOTAL(note LIKE ?) "
            f"FROM files {where} GROUP BY source, destination, state",
            (ALREADY_STORED, f"{STORED_WITH_WARNING} %", *params),
        )
        counts = self._counts()
        for source, destination, state, *figures in rows:
            counts.add_group((source, destination, state), figures, -1)
            if to is not None:
                counts.add_group((source, to, state), figures)

    @classmethod
    def _schema(cls, db: Db) -> int:
        """The schema version of the queue (an older stowd's, when ``status`` reads it)."""
        raise NotImplementedError

    @classmethod
    def _hint(cls, db: Db, index: str, since: int) -> str:
        """An index hint for ``index`` (made at schema ``since``), where the engine takes one."""
        return ""

    def troubles(self) -> list[tuple[str, float, str]]:
        """(name, since, text) of each trouble the running daemon recorded."""
        rows = self._conn().execute("SELECT name, since, text FROM troubles ORDER BY since")
        return [(r[0], r[1], r[2]) for r in rows.fetchall()]

    # -- start-up ------------------------------------------------------------------
    def adopt(self, destinations: dict[str, str]) -> dict[str, int]:
        """Point the queued rows of each source at its current destination.

        ``destinations`` maps every configured source to its destination.  Rows of sources
        that are no longer configured are parked (never claimed) until the source is back;
        returns how many rows each such source has.
        """
        with self._tx() as db:
            self._repoint(db, destinations)
            marks = ",".join("?" * len(destinations))
            rows = db.execute(
                "SELECT source, COUNT(*) FROM files WHERE state IN ('pending', 'claimed') "
                f"AND source NOT IN ({marks}) GROUP BY source",
                tuple(destinations),
            ).fetchall()
            parked = f"WHERE source NOT IN ({marks}) AND state IN ('pending', 'claimed')"
            self._count_groups(db, parked, tuple(destinations), to="")
            db.execute(f"UPDATE files SET destination = '' {parked}", tuple(destinations))
        return {r[0]: r[1] for r in rows}

    def _repoint(self, db: Db, destinations: dict[str, str]) -> None:
        """Point the active rows of each source at its destination (``adopt``)."""
        for source, destination in destinations.items():
            elsewhere = (
                "WHERE source = ? AND destination != ? "
                "AND state IN ('pending', 'claimed', 'settling')"
            )
            self._count_groups(db, elsewhere, (source, destination), to=destination)
            db.execute(
                f"UPDATE files SET destination = ? {elsewhere}", (destination, source, destination)
            )

    def settling(self) -> list[Job]:
        """Rows whose move to sent/failed was decided but may not have happened."""
        rows = (
            self._conn()
            .execute(f"SELECT {_JOB_COLUMNS} FROM files WHERE state = 'settling'")
            .fetchall()
        )
        return [job(r) for r in rows]

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
        log_queued(added)
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
                f"SELECT path, size, mtime_ns FROM files {self._BY_ACTIVE_PATH}"
                f"WHERE path IN ({marks}) AND state IN ('pending', 'claimed', 'settling')",
                part,
            )
            known |= {(path, size, mtime) for path, size, mtime in rows}
        return known

    @staticmethod
    def _snapshots(files: list[NewFile]) -> dict[str, Callable[[], str | None]]:
        """Take the sidecar snapshots of the files (none of them queued with this content)."""
        return {f.path: taken(f.snapshot) for f in files if f.snapshot is not None}

    def _enqueue_many(self, db: Db, files: list[NewFile], now: float) -> list[NewFile]:
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

    def _enqueue_part(self, db: Db, files: list[NewFile], now: float) -> list[NewFile]:
        active = self._active_rows(db, [f.path for f in files])
        settled = self._settled_states(db, [f for f in files if f.path not in active])
        rows: list[tuple[Any, ...]] = []
        added: list[NewFile] = []
        for f in files:
            row = active.get(f.path)
            if row is not None:
                self._changed(db, f, row)
            elif not just_settled(f, settled.get((f.path, f.size, f.mtime_ns))):
                new = new_row(f, now)
                if new is not None:  # None: its sidecars were not ready, found again later
                    rows.append(new)
                    added.append(f)
        inserted = self._insert(db, rows)
        added = [f for f in added if f.path in inserted]
        self._count(added)
        return added

    def _enqueue_one(self, db: Db, f: NewFile, now: float) -> int:
        row = self._active_rows(db, [f.path]).get(f.path)
        if row is not None:
            self._changed(db, f, row)
            return 0
        if just_settled(f, self._settled_states(db, [f]).get((f.path, f.size, f.mtime_ns))):
            return 0
        new = new_row(f, now)
        if new is None:
            return 0  # found again by the next scan
        if not self._insert(db, [new]):
            return 0  # queued by another node meanwhile
        self._count([f])
        return 1

    def _insert(self, db: Db, rows: list[tuple[Any, ...]]) -> set[str]:
        """Insert the new rows (``_INSERT``'s); the paths inserted.  SQLite: all of them (one
        writer: what the transaction read is still so).  The PostgreSQL backend skips a path
        another node queued since it was read."""
        db.executemany(_INSERT, rows)
        return {r[2] for r in rows}

    def _count(self, files: list[NewFile]) -> None:
        """Counted in ``tallies`` once, with the others, before the commit (``_COUNTS``)."""
        if self._COUNTS:
            counts = self._counts()
            for f in files:
                counts.change(None, (f.source, f.destination, "pending", f.size, None, None, None))

    def _changed(self, db: Db, f: NewFile, row: tuple[int, int, int, str]) -> None:
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
        # only while still pending: another node may have claimed it since it was read (the
        # update then waits for that claim and finds the row no longer pending), and a row
        # being sent keeps the content it is sent with; the new one is queued after it
        with self._changing(db, "WHERE id = ?", (row[0],)):
            cursor = db.execute(
                "UPDATE files SET size = ?, mtime_ns = ?, kind = NULL, study_uid = NULL, "
                "sop_uid = NULL, sop_class = NULL, changes = NULL, sidecars = ?, solo = 0, "
                "made = NULL, lookup = NULL, attempts = 0, first_try = NULL, "
                "last_try = NULL, next_attempt_at = 0, error = NULL "
                "WHERE id = ? AND state = 'pending'",
                (f.size, f.mtime_ns, sidecars, row[0]),
            )
        if int(cursor.rowcount) == 0:
            self._after[row[0]] = f

    # -- classification --------------------------------------------------------------
    def unclassified(self, limit: int) -> list[Job]:
        """Pending rows not read yet, except parked ones (their source is gone from the
        config) and ones waiting for a retry (a file that could not be read just now)."""
        mine, known = self._mine()
        rows = (
            self._conn()
            .execute(
                f"SELECT {_JOB_COLUMNS} FROM files WHERE state = 'pending' AND kind IS NULL "
                f"AND destination != '' AND next_attempt_at <= ?{mine} ORDER BY id LIMIT ?",
                (self.clock(), *known, limit),
            )
            .fetchall()
        )
        return [job(r) for r in rows]

    def set_classified(self, items: Iterable[Classification]) -> None:
        """Record the keys (and the rules' changes) read from the files of pending rows.

        Only where the row still describes the content that was read: a row the watcher
        updated for new content meanwhile is read again.
        """
        rows = {c.job.id: classification_row(c) for c in items}  # an id twice: the last
        with self._tx() as db:
            self._classify_rows(db, list(rows.values()))

    def _classify_rows(self, db: Db, rows: list[tuple[Any, ...]]) -> None:
        """``set_classified``'s change of each of ``rows`` (``classification_row``'s, one an
        id): SQLite, one statement a part of rows (``_value_parts``), their values joined as
        a table (as ``_settle_rows``); the PostgreSQL backend changes them all in one statement."""
        for values, params in _value_parts(rows):
            db.execute(
                "WITH v(kind, study_uid, sop_uid, sop_class, changes, sidecars, digest, made, "
                f"lookup, id, size, mtime_ns) AS ({values}) "
                "UPDATE files SET kind = v.kind, study_uid = v.study_uid, "
                "sop_uid = v.sop_uid, sop_class = v.sop_class, changes = v.changes, "
                "sidecars = v.sidecars, rules_digest = v.digest, made = v.made, "
                "lookup = v.lookup FROM v WHERE files.id = v.id AND files.state = 'pending' "
                "AND files.size = v.size AND files.mtime_ns = v.mtime_ns",
                params,
            )

    def make_uids(
        self, source: str, key: str | None, study_uid: str | None, kind: str, new: Callable[[], str]
    ) -> Made:
        """UIDs for one more instance: the study of ``key`` (or ``study_uid`` when the rules
        gave one), its series for ``kind`` and the next InstanceNumber in that series."""
        with self._tx() as db:
            if study_uid is None:
                study_uid = self._made_study(db, source, key, new)
            return Made(study_uid, *self._next_in_series(db, study_uid, kind, new), key=key)

    @staticmethod
    def _made_study(db: Db, source: str, key: str | None, new: Callable[[], str]) -> str:
        """The StudyInstanceUID made for ``key``: made now if there is none.  Atomic across
        nodes: one that made another meanwhile wins (the insert does nothing, waiting for
        its transaction first), and both read the one kept."""
        found = "SELECT uid FROM made_studies WHERE source = ? AND key = ?"
        row = db.execute(found, (source, key)).fetchone()
        if row is not None:
            return str(row[0])
        db.execute(
            "INSERT INTO made_studies (source, key, uid) VALUES (?, ?, ?) "
            "ON CONFLICT (source, key) DO NOTHING",
            (source, key, new()),
        )
        return str(db.execute(found, (source, key)).fetchone()[0])

    @staticmethod
    def _next_in_series(
        db: Db, study_uid: str, kind: str, new: Callable[[], str]
    ) -> tuple[str, str, int]:
        """The series of ``study_uid`` for ``kind`` (made now if there is none) and its next
        InstanceNumber, counted by one statement: nodes making instances of one series at
        once each get their own number and the same series."""
        row = db.execute(
            "SELECT uid FROM made_series WHERE study_uid = ? AND kind = ?", (study_uid, kind)
        ).fetchone()
        made = new() if row is None else str(row[0])
        series, number = db.execute(
            "INSERT INTO made_series (study_uid, kind, uid, count) VALUES (?, ?, ?, 1) "
            "ON CONFLICT (study_uid, kind) DO UPDATE SET count = made_series.count + 1 "
            "RETURNING uid, count",
            (study_uid, kind, made),
        ).fetchone()
        return str(series), new(), int(number)

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
                "INSERT INTO lookups (destination, key, answer, fetched_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (destination, key) DO UPDATE SET answer = excluded.answer, "
                "fetched_at = excluded.fetched_at",
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
            head = self._claim_head(db, destinations, now)
            if head is None:
                return []
            jobs = self._candidates(db, head, now, candidates)
            batch = pick(head[0], jobs)
            until = self._lease_end(db, now, lease)
            self._each_part(  # the rows read as pending in this transaction
                db,
                "UPDATE files SET state = 'claimed', lease_until = ?, node = ? WHERE id {ids}",
                [j.id for j in batch],
                (until, self.node),
                was="pending",
            )
        return batch

    def _lease_end(self, db: Db, now: float, lease: float) -> float:
        """When a lease of ``lease`` seconds taken at ``now`` (this queue's clock) ends, on
        the clock leases are kept on: SQLite's, this host's (one daemon); PostgreSQL's, the
        database's (the nodes' clocks differ)."""
        return now + lease

    def _candidates(self, db: Db, head: Sequence[Any], now: float, limit: int) -> list[Job]:
        """The pending rows a batch is picked from, as jobs of the claim they are about to
        be (``state`` claimed: made so here, where a ``replace`` of each job would cost as
        much as a tenth of a claim and its settle)."""
        destination, study_uid, solo, head_id = head
        mine, known = self._mine()
        if solo:
            rows = db.execute(
                f"SELECT {_JOB_COLUMNS} FROM files WHERE id = ?{self._LOCK_ROWS}", (head_id,)
            ).fetchall()
        else:
            rows = db.execute(
                f"SELECT {_JOB_COLUMNS} FROM files {self._BY_STUDY}WHERE state = 'pending' "
                f"AND destination = ? AND study_uid {self._IS} ? AND kind IS NOT NULL "
                f"AND solo = 0 AND next_attempt_at <= ?{mine} "
                f"ORDER BY id LIMIT ?{self._LOCK_ROWS}",
                (destination, study_uid, now, *known, limit),
            ).fetchall()
        return [job((*r[:-1], "claimed")) for r in rows]

    def release(self, ids: Iterable[int], *, not_before: float = 0.0) -> Lost:
        """Give this node's claimed rows back untouched (shutdown, destination trouble); the
        rows that were not its claims any more (``Lost``: given up already, settled, or
        taken over) are left as they are.

        ``not_before`` keeps them behind rows that have not failed yet, so one batch that
        keeps failing cannot block the others.
        """
        return self._give_back(ids, not_before, "")

    def _give_back(self, ids: Iterable[int], not_before: float, also: str) -> Lost:
        """Return this node's claims ``ids`` to pending, not before ``not_before``, setting
        ``also`` too (``release``: nothing more; ``isolate``: one per request)."""
        with self._tx() as db:
            ours, lost = self._ours(db, dict.fromkeys(ids, "claimed"))
            self._each_part(
                db,
                f"UPDATE files SET state = 'pending', lease_until = NULL, {also}"
                f"next_attempt_at = {self._MAX}(next_attempt_at, ?) "
                "WHERE id {ids} AND state = 'claimed'",
                ours,
                (not_before,),
                was="claimed",
            )
        return lost

    def retry_later(
        self,
        ids: Iterable[int],
        *,
        at: float,
        error: dict[str, Any],
        solo: bool = False,
        failing: bool = True,
        was: str = "claimed",
    ) -> Lost:
        """A transient failure: count the attempt and wait until ``at``.

        ``was``: the state the rows are known in: ``claimed`` (this node's claims, by a
        sender) or ``pending`` (read by a reader); a row no longer so is left as it is
        (``Lost``).  ``failing=False``: a file that waits for something to appear (its
        study, for a lookup) rather than failing; ``first_try``, from which
        ``retry.max_age`` counts, is left unset so waiting never uses up the time allowed
        for failures."""
        now = self.clock()
        first = now if failing else None
        with self._tx() as db:
            ours, lost = self._ours(db, dict.fromkeys(ids, was))
            self._each_part(
                db,
                "UPDATE files SET state = 'pending', lease_until = NULL, "
                "attempts = attempts + 1, first_try = COALESCE(first_try, ?), last_try = ?, "
                f"next_attempt_at = ?, error = ?, solo = {self._MAX}(solo, ?) "
                "WHERE id {ids} AND state = ?",
                ours,
                (first, now, at, json.dumps(error), int(solo)),
                (was,),
                was=was,
            )
        return lost

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
            return int(cursor.rowcount) > 0

    def isolate(self, ids: Iterable[int], *, not_before: float = 0.0) -> Lost:
        """Send these claimed rows one per request from now on (to find a bad one in a
        batch); rows no longer this node's claims are left as they are (``Lost``)."""
        return self._give_back(ids, not_before, "solo = 1, ")

    # -- settling ------------------------------------------------------------------------
    def begin_settle(
        self,
        plans: Iterable[tuple[Job, str, str | None, dict[str, Any] | None]],
        *,
        notes: dict[int, str] | None = None,
    ) -> Lost:
        """Record (job, outcome, target, error) of each job before its file is moved (and
        the sidecars that go with it, for a repair after a crash).  A target of None: no
        free name could be chosen yet (the repair chooses it).  ``notes``: by job id, how
        the outcome came about (``ALREADY_STORED``); a row's note is kept otherwise.

        Only where the row is still as its job was read (``Job.state``: this node's claim,
        a pending row a reader read, or a move this node recorded before): returns the rows
        it is not (``Lost``), whose files must not be moved by this node (another node
        took its claim over after its lease ran out, and sends, moves and records them)."""
        notes, node = notes or {}, self.node  # the node that moves the files
        plans = list(plans)
        seen: dict[int, Figures] | None = {} if self._COUNTS else None
        with self._tx() as db:
            _, lost = self._ours(db, {j.id: j.state for j, _, _, _ in plans}, seen)
            rows = [
                (j.id, j.state, o, t, _doc(e), j.sidecars, notes.get(j.id))
                for j, o, t, e in plans
                if j.id not in lost
            ]
            self._settle_rows(db, node, rows)
            if seen is not None:  # as the statement did it, row by row
                counts = self._counts()
                for i, was, o, _, _, _, note in rows:
                    old = seen[i]
                    if old[2] == was:
                        new = (
                            *old[:2],
                            "settling",
                            old[3],
                            o,
                            old[5] if note is None else note,
                            old[6],
                        )
                        counts.change(old, new)
                        seen[i] = new
        return lost

    def _settle_rows(self, db: Db, node: str, rows: list[tuple[Any, ...]]) -> None:
        """``begin_settle``'s change of each of ``rows`` (id, the state it is known in,
        outcome, target, error, sidecars, note): each row has values of its own.  SQLite:
        one statement a part of rows (``_value_parts``), their values joined as a table
        (``UPDATE ... FROM``, 3.33): a quarter less CPU a row than one statement a row.  An
        id twice (never from the daemon's threads): one statement a row, as before, so the
        later one sees the earlier one's change (as ``begin_settle`` counts it).  The
        PostgreSQL backend changes them all in one statement."""
        if len({r[0] for r in rows}) < len(rows):
            db.executemany(
                "UPDATE files SET state = 'settling', outcome = ?, target = ?, error = ?, "
                "sidecars = COALESCE(?, sidecars), note = COALESCE(?, note), "
                f"node = ?, {self._SETTLE_LEASE} WHERE id = ? AND state = ?",
                [(o, t, e, sc, note, node, i, was) for i, was, o, t, e, sc, note in rows],
            )
            return
        for values, params in _value_parts(rows, 1):
            db.execute(
                f"WITH v(id, was, outcome, target, error, sidecars, note) AS ({values}) "
                "UPDATE files SET state = 'settling', outcome = v.outcome, "
                "target = v.target, error = v.error, "
                "sidecars = COALESCE(v.sidecars, files.sidecars), "
                f"note = COALESCE(v.note, files.note), node = ?, {self._SETTLE_LEASE} "
                "FROM v WHERE files.id = v.id AND files.state = v.was",
                (*params, node),
            )

    def finish(self, job_id: int, *, state: str, was: str) -> Lost:
        """The job is done: its file was moved (``was`` ``settling``), or is gone or ignored
        (``was`` ``pending`` or ``claimed``: the state this node knows the row in); see
        ``finish_many``."""
        return self.finish_many([(job_id, state)], was=was)

    def finish_many(self, done: Iterable[tuple[int, str]], *, was: str = "settling") -> Lost:
        """Mark (id, state) pairs done, in one transaction; a file found with new content
        while its row was busy is queued now, as a new job.  Only rows still ``was`` (this
        node's moves, by default) are: the others are left as they are (``Lost``: another
        node took them over after this node's lease ran out, and records them itself)."""
        now = self.clock()
        done = list(done)
        later = [(i, self._after[i]) for i, _ in done if i in self._after]
        with self._tx() as db:
            _, lost = self._ours(db, dict.fromkeys((i for i, _ in done), was))
            for state, ids in _grouped((s, i) for i, s in done if i not in lost).items():
                self._each_part(
                    db,
                    "UPDATE files SET state = ?, done_at = ?, lease_until = NULL "
                    "WHERE id {ids} AND state = ?",
                    ids,
                    (state, now),
                    (was,),
                    was=was,
                )
            queued = self._enqueue_many(db, [f for i, f in later if i not in lost], now)
        for i, _ in later:  # kept until committed: a failed write loses none of them
            self._after.pop(i, None)
        log_queued(queued)
        return lost

    def finish_kept(
        self, done: Iterable[tuple[int, str, dict[str, Any] | None]], *, was: str = "claimed"
    ) -> Lost:
        """Mark (id, state, error) done for files that stay where they are (``stowd migrate
        --keep``): outcome ``kept``, nothing was moved, so nothing is left to repair.  Only
        rows still ``was`` (this node's claims, by default; ``pending``: read by a reader)
        are: the others are left as they are (``Lost``)."""
        now = self.clock()
        done = list(done)
        seen: dict[int, Figures] | None = {} if self._COUNTS else None
        with self._tx() as db:
            _, lost = self._ours(db, dict.fromkeys((i for i, _, _ in done), was), seen)
            kept = [((s, json.dumps(e) if e else None), i) for i, s, e in done if i not in lost]
            for (state, error), ids in _grouped(kept).items():
                self._each_part(
                    db,
                    "UPDATE files SET state = ?, outcome = 'kept', target = NULL, error = ?, "
                    "done_at = ?, lease_until = NULL WHERE id {ids} AND state = ?",
                    ids,
                    (state, error, now),
                    (was,),
                )
                if seen is not None:  # as the statement did it
                    for i in ids:
                        old = seen[i]
                        if old[2] == was:
                            seen[i] = (*old[:2], state, old[3], "kept", old[5], now)
                            self._counts().change(old, seen[i])
        return lost

    def add_notes(self, notes: dict[int, str]) -> None:
        """Record by job id how a finished file's outcome came about (``ALREADY_STORED``),
        for the files ``finish_kept`` finished (a moved file's note goes with
        ``begin_settle``)."""
        with self._tx() as db:
            for part in self._parts(sorted(notes)):
                where, args = self._in(part)
                with self._changing(db, f"WHERE id {where}", args):
                    self._note_rows(db, {i: notes[i] for i in part})

    def _note_rows(self, db: Db, notes: dict[int, str]) -> None:
        """``add_notes``' change: one statement a row on SQLite, one for all on PostgreSQL."""
        db.executemany("UPDATE files SET note = ? WHERE id = ?", [(n, i) for i, n in notes.items()])

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
        for group in self._tally(self._conn(), self.clock(), where, (*sources, since)):
            files, size = out.get(group.state, (0, 0))
            out[group.state] = (files + group.files, size + group.bytes)
        return out

    def run_already(self, sources: Sequence[str], since: float) -> int:
        """How many of ``sources``' files sent since ``since`` the archive said it held
        already (note ``ALREADY_STORED``): of ``run_tally``'s ``sent``."""
        marks = ",".join("?" * len(sources))
        where = f"WHERE source IN ({marks}) AND done_at >= ?"
        groups = self._tally(self._conn(), self.clock(), where, (*sources, since))
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
            old = (
                "WHERE done_at IS NOT NULL AND done_at < ? "
                "AND state IN ('sent', 'failed', 'gone') AND NOT (state = 'sent' "
                "AND COALESCE(outcome, '') = 'kept' AND NOT EXISTS (SELECT 1 FROM files AS later "
                "WHERE later.path = files.path AND later.id > files.id "
                "AND later.state = 'sent' AND later.outcome = 'kept'))"
            )
            self._count_groups(db, old, (older_than,), to=None)
            cur = db.execute(f"DELETE FROM files {old}", (older_than,))
            return int(cur.rowcount)

    # -- destination holds -----------------------------------------------------------------
    def hold(
        self,
        name: str,
        *,
        until: float,
        reason: str,
        began: float | None = None,
        asked: bool = False,
    ) -> Hold:
        """Hold destination ``name`` until ``until`` after a failure (one more counted), and
        return the hold now.  ``began``: when the failed request was sent.  One that began
        before the hold now in force ends (``held_until``), so before it was set or last
        extended, or while it was in force, failed in the outage already counted (several
        workers' requests fail together when an archive goes down): it neither counts nor
        moves the hold, but for a longer wait the archive ``asked`` for (its
        ``Retry-After``), which is kept, with its reason.  A hold that ran out is counted
        again by any failure (a new outage, seen first by a request sent before the end).
        None: a failure of its own, always counted."""
        now = self.clock()
        counts = (
            "(destinations.held_until IS NULL OR ? >= destinations.held_until "
            "OR ? >= destinations.held_until)"
        )
        longer = "(? = 1 AND excluded.held_until > destinations.held_until)"
        at = (math.inf if began is None else began, now, int(asked))
        with self._tx() as db:
            db.execute(
                "INSERT INTO destinations (name, held_since, held_until, reason, failures) "
                "VALUES (?, ?, ?, ?, 1) ON CONFLICT(name) DO UPDATE SET "
                "held_since = COALESCE(destinations.held_since, excluded.held_since), "
                f"failures = destinations.failures + CASE WHEN {counts} THEN 1 ELSE 0 END, "
                f"reason = CASE WHEN {counts} OR {longer} THEN excluded.reason "
                "ELSE destinations.reason END, "
                f"held_until = CASE WHEN {counts} OR {longer} THEN excluded.held_until "
                "ELSE destinations.held_until END",
                (name, now, until, reason, *at[:2], *at, *at),
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
            return int(cur.rowcount) > 0

    def holds(self) -> dict[str, Hold]:
        return self._holds(self._conn())

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

    # -- status ----------------------------------------------------------------------------
    def active_of(self, sources: Sequence[str]) -> dict[str, int]:
        """How many rows of each of ``sources`` are not finished (queued, sending, moving)."""
        out: dict[str, int] = {}
        for group in self._groups(self._conn(), self.clock(), active=True):
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
        return [job(r) for r in rows]

    # -- status queries (read only) ----------------------------------------------------------
    # For ``stowd status`` and the daemon's one-line status.  None writes; each reads a range
    # of an index, or (``tally``) makes one pass over the table.

    def tally(self, now: float) -> list[Tally]:
        """Each group of rows (source, destination, state) in one pass: the count every other
        count but ``state_totals`` derives from.  Pending rows whose next attempt lies after
        ``now`` count as ``waiting``."""
        return self._groups(self._conn(), now)

    def sent_since(self, since: float) -> list[tuple[str, str, int, int]]:
        """(source, destination, files, bytes) sent at ``since`` or later.

        ``+state`` keeps SQLite on the done_at index (the recent rows) rather than the state
        index (every sent row still in the history).
        """
        rows = (
            self._conn()
            .execute(
                "SELECT source, destination, COUNT(*), CAST(SUM(size) AS BIGINT) FROM files "
                f"WHERE done_at >= ? AND {self._SENT_STATE} = 'sent' GROUP BY source, destination",
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
        if self._schema(db) < 7:  # a queue an older stowd wrote, read by ``stowd status``
            return self._state_totals_counted(db, now)
        rows = db.execute(
            f"SELECT state, SUM(files) FROM {self._TALLIES} GROUP BY state HAVING SUM(files) > 0"
        ).fetchall()
        out = {state: int(count) for state, count in rows}
        waiting = db.execute(f"SELECT COUNT(*) FROM files {self._ONLY_WAITING}", (now,)).fetchone()[
            0
        ]
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
        if self._schema(db) < 8:
            return []
        rows = db.execute(
            f"SELECT minute, source, destination, sent, bytes, failed FROM {self._THROUGHPUT} "
            "WHERE minute >= ? ORDER BY minute",
            (minute(since),),
        ).fetchall()
        return [Throughput(*r) for r in rows]

    def recent_failed(self, limit: int) -> list[tuple[float, str, str, str, str, float, str]]:
        """As ``recent_errors``, of the newest failed rows only (by ``done_at``), read from
        the ``files_failed`` index (schema 8: only failed rows), however many rows waiting
        for a retry carry an error."""
        db = self._conn()
        index = self._hint(db, "files_failed", 8)
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
        index = self._hint(db, "files_errors", 7)
        rows = db.execute(
            "SELECT COALESCE(done_at, last_try, queued_at) AS t, source, destination, path, "
            f"state, next_attempt_at, error FROM files {index}WHERE error IS NOT NULL AND "
            "state IN "
            "('pending', 'claimed', 'settling', 'failed', 'gone', 'ignored') "
            "ORDER BY COALESCE(done_at, last_try, queued_at) DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [(r[0], r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows]

    # -- the counts, as every reader shares them -------------------------------------------
    def _claim_head(
        self, db: Db, destinations: Sequence[str], now: float
    ) -> tuple[Any, ...] | None:
        """(destination, study_uid, solo, id) of the row claimed first: the one of the ready
        rows of ``destinations`` whose next attempt came first (by id among equals)."""
        mine, known = self._mine()
        sql = self._CLAIM_HEAD.format(mine=mine)
        heads = [db.execute(sql, (d, now, *known)).fetchone() for d in dict.fromkeys(destinations)]
        found = [h for h in heads if h is not None]
        if not found:
            return None
        first = min(found, key=lambda h: (h[4], h[3]))
        return tuple(first[:4])

    def _active_rows(self, db: Db, paths: list[str]) -> dict[str, tuple[int, int, int, str]]:
        """path -> (id, size, mtime_ns, state) of the active rows of ``paths`` (by path: never
        a pass over the pending rows)."""
        marks = ",".join("?" * len(paths))
        rows = db.execute(
            f"SELECT path, id, size, mtime_ns, state FROM files {self._BY_ACTIVE_PATH}"
            f"WHERE path IN ({marks}) AND state IN ('pending', 'claimed', 'settling')",
            paths,
        )
        return {r[0]: (r[1], r[2], r[3], r[4]) for r in rows}

    @staticmethod
    def _settled_states(db: Db, files: list[NewFile]) -> dict[tuple[str, int, int], str]:
        """(path, size, mtime_ns) -> state of the latest finished row of the same path and
        content, for those of ``files`` that have one."""
        if not files:
            return {}
        values = ",".join("(?, ?, ?)" for _ in files)
        rows = db.execute(
            _SETTLED.format(values=values),
            [v for f in files for v in (f.path, f.size, f.mtime_ns)],
        )
        return {(r[0], r[1], r[2]): r[3] for r in rows}

    @staticmethod
    def _tally(db: Db, now: float, where: str = "", params: tuple[Any, ...] = ()) -> list[Tally]:
        """The one count by state (``Tally`` groups) of the rows ``where`` selects."""
        rows = db.execute(
            f"SELECT source, destination, {_STATE} AS s, COUNT(*), CAST(SUM(size) AS BIGINT), "
            "MIN(queued_at), SUM(CASE WHEN outcome = 'sent' THEN 1 ELSE 0 END), "
            "SUM(CASE WHEN note = ? THEN 1 ELSE 0 END), "
            "SUM(CASE WHEN note LIKE ? THEN 1 ELSE 0 END) FROM files "
            f"{where} GROUP BY source, destination, s",
            (now, ALREADY_STORED, f"{STORED_WITH_WARNING} %", *params),
        ).fetchall()
        return [
            Tally(r[0], r[1], r[2], r[3], r[4], r[5], int(r[6]), int(r[7]), int(r[8])) for r in rows
        ]

    @staticmethod
    def _state_totals_counted(db: Db, now: float) -> dict[str, int]:
        rows = db.execute(
            f"SELECT state, COUNT(*), SUM({_WAITING}) FROM files GROUP BY state", (now,)
        ).fetchall()
        out: dict[str, int] = {}
        for state, count, waiting in rows:
            out.update({k: n for k, n in ((state, count - waiting), ("waiting", waiting)) if n})
        return out

    @classmethod
    def _groups(cls, db: Db, now: float, *, active: bool = False) -> list[Tally]:
        """``_tally`` of every row (``active``: of the active ones), read from ``tallies`` and
        the waiting rows: a few rows read, however many the queue holds.  ``oldest`` is exact
        for each active group but pending, whose oldest is that of pending and waiting rows
        together (what every reader wants: the oldest of all active rows); of a finished
        group it is 0 (never read)."""
        if cls._schema(db) < 7:
            return cls._tally(db, now, f"WHERE {_ACTIVE_ROWS}" if active else "")
        rows = db.execute(
            f"SELECT {_TALLY_KEY}, files, bytes, stored, already, warned FROM {cls._TALLIES} "
            "WHERE files > 0" + (f" AND {_ACTIVE_ROWS}" if active else "")
        ).fetchall()
        found = cls._tally(db, now, cls._ONLY_WAITING, (now,))
        waiting = {(g.source, g.destination): g for g in found}
        out = [
            cls._less_waiting(
                db, Tally(r[0], r[1], r[2], r[3], r[4], 0.0, r[5], r[6], r[7]), waiting
            )
            for r in rows
        ]
        return [g for g in out if g.files > 0] + list(waiting.values())

    @staticmethod
    def _less_waiting(db: Db, group: Tally, waiting: dict[Any, Tally]) -> Tally:
        """A group of ``tallies`` as ``Tally`` shows it: pending without the waiting rows, and
        an active group with the queued_at of its oldest row."""
        if group.state not in ACTIVE:
            return group
        oldest = db.execute(
            "SELECT MIN(queued_at) FROM files WHERE source = ? AND destination = ? "
            f"AND state = ? AND {_ACTIVE_ROWS}",
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

    @staticmethod
    def _holds(db: Db) -> dict[str, Hold]:
        rows = db.execute(
            "SELECT name, held_since, held_until, reason, failures FROM destinations "
            "WHERE held_since IS NOT NULL"
        ).fetchall()
        return {r[0]: Hold(*r) for r in rows}

    @classmethod
    def _active_view(cls, db: Db, now: float) -> ActiveView:
        view = ActiveView()
        for group in cls._groups(db, now, active=True):
            key = (group.destination, group.state)
            view.counts[key] = view.counts.get(key, 0) + group.files
            view.oldest[group.destination] = min(
                group.oldest, view.oldest.get(group.destination, group.oldest)
            )
        view.held = set(cls._holds(db))
        return view
