"""The queue in a PostgreSQL database that several stowd hosts (nodes) share (psycopg 3, the
extra ``stowd[postgresql]``).

The logic is ``core.Queue``'s; here is what PostgreSQL does its own way:

- Connections: one per thread, in autocommit mode with explicit ``BEGIN``/``COMMIT`` (as the
  SQLite backend), made with the URL of ``queue:`` and the password of ``queue_password``.
  ``_PgDb`` reads the queue's ``?`` placeholders as psycopg's, and is the one seam where
  psycopg's errors become ``QueueError`` (``QueueFull`` for a full disk, ``QueueUnreadable``
  inside ``reading``).  A connection that broke (the server restarted, the network went) is
  dropped: the next call makes a new one.
- Claims: the rows a claim reads are locked ``FOR UPDATE SKIP LOCKED``, so nodes claiming at
  the same moment each take other rows, never one another's; each claim records its
  ``node`` and ``lease_until``, a time on the database's clock (the nodes' clocks may
  differ: a host whose clock runs ahead must not see live leases as run out, nor one whose
  clock runs behind claim with leases already run out for the others).  ``renew`` extends a
  node's leases; ``recover`` (at start) returns only this node's claims; ``reclaim`` also
  takes over any node's claims (and settling rows) whose lease expired, and says whose.
- Reads: a node's reader takes the unclassified rows it reads ``FOR UPDATE SKIP LOCKED``
  with a read lease (``read_by``, ``read_until`` on the database's clock) the other nodes'
  readers skip, so each new file's header is read by one node (``unclassified``).
- Statistics: a node runs ``ANALYZE files`` once the rows it inserted outgrow those the
  statistics count (``_keep_statistics``): autovacuum's first analyze of a new queue comes
  too late for a migration's first walk.
- Shared trees: nodes watching one folder may queue one path at once; the insert skips a
  path another node queued meanwhile (``ON CONFLICT DO NOTHING`` on the unique index of
  active paths), the rest of the batch is queued.
- Ownership: every change a node makes to a row it read or claimed (settle, finish, retry,
  isolate, release) is made only while the row is still in the state the node knows it in
  and, claimed or settling, still the node's (``core.Queue._ours``, the rows locked
  ``FOR UPDATE`` first): a node whose lease ran out and whose claims another node took over
  changes nothing of them; the methods return the rows it lost, whose files it leaves to
  the node that holds them (it moves none of them, and counts none as sent or failed).
- Counts: SQLite has one writer, PostgreSQL many.  A counter row every transaction updates
  would make concurrent writers wait on it until they commit (and deadlock when two lock two
  counters in opposite orders).  So the triggers (one per statement, on its transition
  tables) only append what a statement changed to ``tally_changes`` and
  ``throughput_changes``, which never makes one writer wait for another; readers sum the
  folded counts and the appended ones (the views ``tally_now`` and ``throughput_now``), and
  ``fold`` (run by ``recover`` and ``reclaim``, one node at a time) moves the appended rows
  into ``tallies`` and ``throughput`` in one transaction: every snapshot sees each change
  exactly once.  A trigger runs once a statement, so the queue changes a batch's rows with
  one statement (``id = ANY`` of an array, ``_in``; ``unnest`` where each row has values of
  its own), never one a row.
- Paths: TEXT holds only UTF-8 without NUL.  A value that is not (a name with bytes such as
  ``ff fe``, given by ``os.fsdecode`` as lone surrogates), or that begins with ``ESCAPED``, is
  stored as ``ESCAPED`` + the base64 of its bytes, and read back as the same ``str``.
- Nodes: a running daemon holds its node's name (a session advisory lock): a second one
  started with the same name (two hosts, one name) is refused, since ``recover`` and the
  repair at start treat the node's claims and moves as its last run's.
- Clock: every time the queue keeps (a retry's time, a file's first try, a hold, when a row
  was done, the cutoffs compared with them) is on one clock for all nodes: ``clock()`` is this
  host's clock corrected by its offset to the database's, measured when the queue opens (the
  quickest of ``CLOCK_SAMPLES`` readings, half its round trip the error) and again with each
  heartbeat (a reading slower than ``CLOCK_RTT`` keeps the offset known).  A node whose
  clock runs an hour behind makes a retry due when the others see it due.  Leases and
  heartbeats are written on the database's clock itself.
- Schema: ``stowd_schema`` holds the version; ``_MIGRATIONS`` bring an older one up to it
  (under an advisory lock: several nodes may start at once); a newer one is refused.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
import os
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Self

import psycopg
from psycopg import errors as pgerrors
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from stowd.config.model import DEFAULT_LEASE, Database
from stowd.errors import (
    QueueError,
    QueueFull,
    QueueLockedError,
    QueueUnreadable,
    SecretUnavailable,
)
from stowd.pipeline.queue.core import (
    ENQUEUE_PART,
    JOB_COLUMNS,
    QUEUE_MODE,
    Db,
    Queue,
    take_lock,
)
from stowd.pipeline.queue.model import (
    ALREADY_STORED,
    HISTORY_SPAN,
    STORED_WITH_WARNING,
    ActiveView,
    Job,
    NewFile,
    Node,
    Walk,
    job,
)
from stowd.printable import escape

log = logging.getLogger("stowd.queue")

SCHEMA_VERSION = 5
FEATURES = 9  # what ``core`` asks of a schema: as SQLite's schema 9 (tallies, throughput)
ESCAPED = "\x7fstowd-bytes:"  # a stored value that is the base64 of a str's bytes follows
CONNECT_TIMEOUT = 10  # seconds
KEEPALIVE_PROBES = 3  # TCP keepalive probes (link_watch; the user timeout ends a link first)
KEEPALIVE_MAX = 32767  # seconds: the most Linux takes for TCP_KEEPIDLE and TCP_KEEPINTVL
USER_TIMEOUT_MAX = 2**31 - 1  # milliseconds: the most TCP_USER_TIMEOUT takes (an int)
SETTLE_LEASE = 300.0  # seconds: how long a settling row is its node's alone (from the decision)
_MIGRATION_LOCK = 0x73746F7764  # "stowd": the advisory lock of a schema change
_FOLD_LOCK = 0x73746F7765  # the advisory lock of a fold (one node at a time)
_ENQUEUE_LOCK = 0x73746F7766  # the advisory lock of an enqueue (one node at a time)
_NODE_LOCK = 0x7374  # with the hash of a node's name: the lock a running node holds
CLOCK_SAMPLES = 3  # readings of the database's clock when the queue opens (the quickest counts)
CLOCK_RTT = 1.0  # seconds: a reading that took longer does not replace the offset known
CLOCK_NOTED = 1.0  # seconds: a host clock off the database's by more is said at the start
ANALYZE_ROWS = 1000  # rows a node inserts before it looks whether ``files``' statistics are stale
ANALYZE_SHARE = 0.2  # stale: the rows inserted since exceed this share of the rows they count

_COUNTS = "files, bytes, stored, already, warned"
# schema 2: each node's daemon, as it last said (``heartbeat``; ``stowd status``)
_NODES = (
    "CREATE TABLE nodes (node TEXT PRIMARY KEY, pid INTEGER NOT NULL, host TEXT NOT NULL, "
    "started DOUBLE PRECISION NOT NULL, heartbeat DOUBLE PRECISION NOT NULL, "
    "version TEXT NOT NULL, lease DOUBLE PRECISION NOT NULL)",
)
# schema 3: the walk of each ``stowd migrate`` source: one node walks it (``take_walk``)
_WALKS = (
    "CREATE TABLE migrate_walks (source TEXT PRIMARY KEY, node TEXT NOT NULL, "
    "lease_until DOUBLE PRECISION NOT NULL, started DOUBLE PRECISION NOT NULL, "
    "walked DOUBLE PRECISION, skipped BIGINT NOT NULL DEFAULT 0)",
)
# schema 5: the node reading a pending row's file (``unclassified``), until when
_READS = (
    (
        "ALTER TABLE files ADD COLUMN IF NOT EXISTS read_by TEXT, "
        "ADD COLUMN IF NOT EXISTS read_until DOUBLE PRECISION"
    ),
)
_INSERT_HEAD = (
    "INSERT INTO files (source, destination, path, rel, size, mtime_ns, state, queued_at, sidecars)"
)
_SCHEMA = (
    "CREATE TABLE stowd_schema (version INTEGER NOT NULL)",
    "CREATE TABLE files (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, "
    "source TEXT NOT NULL, destination TEXT NOT NULL, path TEXT NOT NULL, rel TEXT NOT NULL, "
    "size BIGINT NOT NULL, mtime_ns BIGINT NOT NULL, state TEXT NOT NULL, kind TEXT, "
    "study_uid TEXT, sop_uid TEXT, sop_class TEXT, solo INTEGER NOT NULL DEFAULT 0, "
    "attempts INTEGER NOT NULL DEFAULT 0, queued_at DOUBLE PRECISION NOT NULL, "
    "first_try DOUBLE PRECISION, last_try DOUBLE PRECISION, "
    "next_attempt_at DOUBLE PRECISION NOT NULL DEFAULT 0, lease_until DOUBLE PRECISION, "
    "outcome TEXT, target TEXT, error TEXT, done_at DOUBLE PRECISION, changes TEXT, "
    "sidecars TEXT, rules_digest TEXT, made TEXT, lookup TEXT, note TEXT, node TEXT)",
    "CREATE UNIQUE INDEX files_active_path ON files(path) "
    "WHERE state IN ('pending', 'claimed', 'settling')",
    "CREATE INDEX files_unclassified ON files(state, kind)",
    "CREATE INDEX files_study ON files(destination, study_uid, state)",
    "CREATE INDEX files_done ON files(done_at)",
    "CREATE INDEX files_path ON files(path, size, mtime_ns)",
    "CREATE INDEX files_waiting ON files(next_attempt_at) WHERE state = 'pending'",
    "CREATE INDEX files_age ON files(source, destination, state, queued_at) "
    "WHERE state IN ('pending', 'claimed', 'settling')",
    "CREATE INDEX files_claim ON files(destination, next_attempt_at, id) "
    "WHERE state = 'pending' AND kind IS NOT NULL",
    "CREATE INDEX files_errors ON files((COALESCE(done_at, last_try, queued_at))) "
    "WHERE error IS NOT NULL",
    "CREATE INDEX files_failed ON files(done_at) WHERE state = 'failed'",
    "CREATE INDEX files_claims ON files(node, state) WHERE state IN ('claimed', 'settling')",
    "CREATE TABLE made_studies (source TEXT NOT NULL, key TEXT NOT NULL, uid TEXT NOT NULL, "
    "PRIMARY KEY (source, key))",
    "CREATE TABLE made_series (study_uid TEXT NOT NULL, kind TEXT NOT NULL, "
    "uid TEXT NOT NULL, count INTEGER NOT NULL, PRIMARY KEY (study_uid, kind))",
    "CREATE TABLE lookups (destination TEXT NOT NULL, key TEXT NOT NULL, answer TEXT NOT NULL, "
    "fetched_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (destination, key))",
    "CREATE TABLE destinations (name TEXT PRIMARY KEY, held_since DOUBLE PRECISION, "
    "held_until DOUBLE PRECISION, reason TEXT, failures INTEGER NOT NULL DEFAULT 0)",
    "CREATE TABLE troubles (name TEXT PRIMARY KEY, since DOUBLE PRECISION NOT NULL, "
    "text TEXT NOT NULL)",
    *_NODES,
    *_WALKS,
    *_READS,
    # the counts: folded (one row per group) and appended (by the triggers, never updated)
    "CREATE TABLE tallies (source TEXT NOT NULL, destination TEXT NOT NULL, "
    "state TEXT NOT NULL, files BIGINT NOT NULL, bytes BIGINT NOT NULL, stored BIGINT NOT NULL, "
    "already BIGINT NOT NULL, warned BIGINT NOT NULL, PRIMARY KEY (source, destination, state))",
    "CREATE TABLE tally_changes (LIKE tallies)",
    f"CREATE VIEW tally_now AS SELECT source, destination, state, "
    "SUM(files)::BIGINT AS files, SUM(bytes)::BIGINT AS bytes, SUM(stored)::BIGINT AS stored, "
    "SUM(already)::BIGINT AS already, SUM(warned)::BIGINT AS warned FROM ("
    f"SELECT source, destination, state, {_COUNTS} FROM tallies UNION ALL "
    f"SELECT source, destination, state, {_COUNTS} FROM tally_changes) AS t "
    "GROUP BY source, destination, state",
    "CREATE TABLE throughput (minute BIGINT NOT NULL, source TEXT NOT NULL, "
    "destination TEXT NOT NULL, sent BIGINT NOT NULL, bytes BIGINT NOT NULL, "
    "failed BIGINT NOT NULL, PRIMARY KEY (minute, source, destination))",
    "CREATE TABLE throughput_changes (LIKE throughput)",
    "CREATE INDEX throughput_changes_minute ON throughput_changes(minute)",
    "CREATE VIEW throughput_now AS SELECT minute, source, destination, "
    "SUM(sent)::BIGINT AS sent, SUM(bytes)::BIGINT AS bytes, SUM(failed)::BIGINT AS failed "
    "FROM (SELECT * FROM throughput UNION ALL SELECT * FROM throughput_changes) AS t "
    "GROUP BY minute, source, destination",
)
# the figures of the rows of a transition table ``{t}`` (OLD or NEW rows), ``{sign}`` 1 or -1
_FIGURES = (
    "SELECT source, destination, state, {sign} * COUNT(*), {sign} * SUM(size), "
    "{sign} * SUM(COALESCE(outcome = 'sent', FALSE)::INT), "
    "{sign} * SUM(COALESCE(note = '" + ALREADY_STORED + "', FALSE)::INT), "
    "{sign} * SUM(COALESCE(note LIKE '" + STORED_WITH_WARNING + " %', FALSE)::INT) "
    "FROM {t} GROUP BY source, destination, state"
)
_APPEND = "INSERT INTO tally_changes (source, destination, state, " + _COUNTS + ") "
# the files an update made sent or failed, counted in the minute they did (a join of the
# statement's old and new rows)
_BECAME_DONE = (
    "INSERT INTO throughput_changes (minute, source, destination, sent, bytes, failed) "
    "SELECT (FLOOR(n.done_at / 60) * 60)::BIGINT, n.source, n.destination, "
    "SUM((n.state = 'sent')::INT), SUM(CASE WHEN n.state = 'sent' THEN n.size ELSE 0 END), "
    "SUM((n.state = 'failed')::INT) FROM new_rows AS n JOIN old_rows AS o ON o.id = n.id "
    "WHERE n.state IN ('sent', 'failed') AND o.state IS DISTINCT FROM n.state "
    "AND n.done_at IS NOT NULL GROUP BY 1, 2, 3"
)


def _tally_function(became_done: str) -> str:
    """The counting triggers' function (``CREATE OR REPLACE``: a migration replaces it)."""
    return (
        "CREATE OR REPLACE FUNCTION stowd_tally() RETURNS TRIGGER LANGUAGE plpgsql AS $$ BEGIN "
        "IF TG_OP = 'INSERT' THEN "
        + _APPEND
        + _FIGURES.format(sign=1, t="new_rows")
        + "; ELSIF TG_OP = 'DELETE' THEN "
        + _APPEND
        + _FIGURES.format(sign=-1, t="old_rows")
        + "; ELSE "
        + _APPEND
        + "SELECT source, destination, state, SUM(files), SUM(bytes), SUM(stored), "
        "SUM(already), SUM(warned) FROM ("
        + _FIGURES.format(sign=-1, t="old_rows")
        + " UNION ALL "
        + _FIGURES.format(sign=1, t="new_rows")
        + ") AS d(source, destination, state, files, bytes, stored, already, warned) "
        "GROUP BY source, destination, state HAVING SUM(files) <> 0 OR SUM(bytes) <> 0 "
        "OR SUM(stored) <> 0 OR SUM(already) <> 0 OR SUM(warned) <> 0; "
        + became_done
        + "; END IF; RETURN NULL; END $$"
    )


# schemas 1 to 3: the join planned once a session, for the sizes of its first statement (a
# nested loop for a row or two), and kept for every statement after it: an update of
# 70,000 rows then compared each old row with each new one (minutes)
TALLY_SCHEMA_3 = _tally_function(_BECAME_DONE)
# schema 4: planned for each statement, for the rows it changed (a hash join for many)
_TALLY = (_tally_function("EXECUTE $join$ " + _BECAME_DONE + " $join$"),)
_TRIGGERS = (
    *_TALLY,
    "CREATE TRIGGER tally_insert AFTER INSERT ON files REFERENCING NEW TABLE AS new_rows "
    "FOR EACH STATEMENT EXECUTE FUNCTION stowd_tally()",
    "CREATE TRIGGER tally_update AFTER UPDATE ON files "
    "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows "
    "FOR EACH STATEMENT EXECUTE FUNCTION stowd_tally()",
    "CREATE TRIGGER tally_delete AFTER DELETE ON files REFERENCING OLD TABLE AS old_rows "
    "FOR EACH STATEMENT EXECUTE FUNCTION stowd_tally()",
)
# version -> the statements that bring a schema of that version to the next
_MIGRATIONS: dict[int, tuple[str, ...]] = {1: _NODES, 2: _WALKS, 3: _TALLY, 4: _READS}
_FOLD = (
    "WITH moved AS (DELETE FROM tally_changes RETURNING *) INSERT INTO tallies "
    "SELECT source, destination, state, SUM(files), SUM(bytes), SUM(stored), SUM(already), "
    "SUM(warned) FROM moved GROUP BY source, destination, state "
    "ON CONFLICT (source, destination, state) DO UPDATE SET "
    "files = tallies.files + excluded.files, bytes = tallies.bytes + excluded.bytes, "
    "stored = tallies.stored + excluded.stored, already = tallies.already + excluded.already, "
    "warned = tallies.warned + excluded.warned",
    "WITH moved AS (DELETE FROM throughput_changes RETURNING *) INSERT INTO throughput "
    "SELECT minute, source, destination, SUM(sent), SUM(bytes), SUM(failed) FROM moved "
    "GROUP BY minute, source, destination ON CONFLICT (minute, source, destination) "
    "DO UPDATE SET sent = throughput.sent + excluded.sent, "
    "bytes = throughput.bytes + excluded.bytes, failed = throughput.failed + excluded.failed",
    # a day of minutes (by the newest), whatever was sent
    f"DELETE FROM throughput WHERE minute < (SELECT MAX(minute) FROM throughput) - "
    f"{HISTORY_SPAN + 60}",
)


@functools.lru_cache(maxsize=1024)
def _pg(sql: str) -> bytes:
    """The queue's statement (``?`` placeholders) as psycopg reads it (``%s``)."""
    return sql.replace("%", "%%").replace("?", "%s").encode()


def _storable(value: Any) -> Any:
    """``value`` as TEXT can hold it: a ``str`` that is not UTF-8 without NUL (or that looks
    escaped) as ``ESCAPED`` + the base64 of its bytes."""
    if type(value) is not str or (value.isascii() and "\x00" not in value and "\x7f" not in value):
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:
        if "\x00" not in value and not value.startswith(ESCAPED):
            return value
    return ESCAPED + base64.b64encode(os.fsencode(value)).decode("ascii")


def _column(values: Iterable[Any]) -> list[Any]:
    """One column of an ``unnest``'s rows, as one array parameter (each value as TEXT
    stores it)."""
    return [_storable(v) for v in values]


def _unnest(rows: Sequence[tuple[Any, ...]], *types: str) -> tuple[str, tuple[Any, ...]]:
    """``unnest`` of ``rows`` (their values side by side, a column an array of its type in
    ``types``), to change rows with values of their own in one statement, and its
    parameters."""
    arrays = ", ".join(f"?::{t}[]" for t in types)
    return f"unnest({arrays})", tuple(_column(c) for c in zip(*rows, strict=True))


def _readable(value: Any) -> Any:
    if type(value) is str and value.startswith(ESCAPED):
        with suppress(binascii.Error, ValueError):
            return os.fsdecode(base64.b64decode(value[len(ESCAPED) :], validate=True))
    return value


def _bound(params: Any) -> Any:
    if isinstance(params, dict):
        return {k: _storable(v) for k, v in params.items()}
    return tuple(_storable(v) for v in params)


def _row_maker(_cursor: Any) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    def make(values: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(_readable(v) for v in values)

    return make


class _PgDb:
    """A psycopg connection as the queue uses it (``?`` placeholders, escaped values), and the
    one seam where psycopg's errors become the queue's."""

    def __init__(self, conn: psycopg.Connection[Any], translate: Callable[[Exception], Exception]):
        self.raw = conn
        self._translate = translate
        self.reading = False

    @property
    def broken(self) -> bool:
        return self.raw.closed or self.raw.broken

    def execute(self, sql: str, parameters: Any = (), /) -> Any:
        try:
            if not parameters:  # nothing to bind: the statement as it is (a ``%`` too)
                return self.raw.execute(sql.encode())
            return self.raw.execute(_pg(sql), _bound(parameters))
        except psycopg.Error as exc:
            raise self._translate(exc) from exc

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> Any:
        rows = [_bound(p) for p in parameters]
        cursor = self.raw.cursor()
        if not rows:
            return cursor
        try:
            cursor.executemany(_pg(sql), rows)
        except psycopg.Error as exc:
            raise self._translate(exc) from exc
        return cursor

    def close(self) -> None:
        self.raw.close()


def link_watch(url: str, lease: float) -> dict[str, int | str]:
    """libpq's TCP keepalives and ``tcp_user_timeout`` for a connection of a node whose
    leases last ``lease`` seconds, but those ``url`` sets itself (the user's word wins).

    A link that dies without a word (a firewall's state dropped, a cable pulled: no FIN, no
    RST) otherwise holds a query in flight for the kernel's retransmissions, about 15
    minutes, and its thread (a sender, the fleet's renewals) with it.  With these, a waiting
    connection probes the link after ``lease``/12 of silence, ``lease``/24 apart, and a
    link that answers nothing is given up once ``lease``/4 passed without an answer (with a
    user timeout Linux ends a connection by it, not by the count of probes): well within a
    lease, so the node reconnects (or says it lost the database) before other nodes take its
    files over.  The server's end does the same (``server_watch``).

    The kernel refuses keepalive times above ``KEEPALIVE_MAX`` seconds (a lease of days):
    they are capped.  ``keepalives=0`` in ``url`` turns all of it off."""
    given = conninfo_to_dict(url)
    if str(given.get("keepalives", "1")).strip() == "0":
        return {}
    watch: dict[str, int | str] = {"keepalives": 1, **_watch_values(lease)}
    return {k: v for k, v in watch.items() if k not in given}


def _watch_values(lease: float) -> dict[str, int]:
    """The keepalive times and user timeout (milliseconds) for a lease, capped."""
    return {
        "keepalives_idle": min(KEEPALIVE_MAX, max(1, round(lease / 12))),
        "keepalives_interval": min(KEEPALIVE_MAX, max(1, round(lease / 24))),
        "keepalives_count": KEEPALIVE_PROBES,
        "tcp_user_timeout": min(USER_TIMEOUT_MAX, max(1000, round(lease / 4 * 1000))),
    }


def server_watch(url: str, lease: float) -> dict[str, str]:
    """The server's settings for its end of the connection: the same times as this end
    (``link_watch``; those ``url`` sets itself, as it sets them), so that the sessions of
    a node cut off (its node's name among their locks, ``_take_node``) end within the bound
    too, not after the server's default two hours: the node takes its name again once the
    link is back.  ``keepalives=0`` in ``url``: none."""
    given = conninfo_to_dict(url)
    if str(given.get("keepalives", "1")).strip() == "0":
        return {}
    values = {k: str(given.get(k) or v) for k, v in _watch_values(lease).items()}
    return {
        "tcp_keepalives_idle": values["keepalives_idle"],
        "tcp_keepalives_interval": values["keepalives_interval"],
        "tcp_keepalives_count": values["keepalives_count"],
        "tcp_user_timeout": values["tcp_user_timeout"],
    }


def _watch_server_end(conn: psycopg.Connection[Any], settings: dict[str, str]) -> None:
    """Set the server's end of ``conn`` watching the link (``server_watch``), in one round
    trip, after the connection is made rather than as its startup ``options``: those would
    replace the ``options`` a user gives through ``PGOPTIONS`` or a service file (libpq
    reads them only where the connection names none: a ``search_path`` lost, a second
    queue made), and a pooler may refuse them.  A setting the session's start already set
    (``options`` of any kind: the user's word) is kept, and one this server does not know
    (``tcp_user_timeout`` before PostgreSQL 12) is left out."""
    if not settings:
        return
    rows = ", ".join(["(%s, %s)"] * len(settings))
    conn.execute(
        "SELECT set_config(v.name, v.value, false) FROM (VALUES "
        f"{rows}) AS v (name, value) JOIN pg_settings AS s ON s.name = v.name "
        "WHERE s.source <> 'client'",
        [x for pair in settings.items() for x in pair],
    )


def _connect(
    database: Database, node: str, timeout: float, lease: float = DEFAULT_LEASE
) -> psycopg.Connection[Any]:
    password = database.password.value() if database.password is not None else None
    conn = psycopg.connect(
        make_conninfo(database.url, **link_watch(database.url, lease)),
        password=password,
        autocommit=True,
        connect_timeout=max(1, int(timeout)),
        application_name=f"stowd {node}"[:63],
        row_factory=_row_maker,
    )
    try:
        _watch_server_end(conn, server_watch(database.url, lease))
    except BaseException:
        conn.close()
        raise
    return conn


class PostgresQueue(Queue):
    """The queue in a PostgreSQL database shared by nodes; ``anchor`` (``config.queue``) is
    this node's own: its lock file (one daemon per node state folder) and state files."""

    _IS = "IS NOT DISTINCT FROM"
    _MAX = "GREATEST"
    _LOCK_ROWS = " FOR UPDATE SKIP LOCKED"
    _LOCK_OURS = " FOR UPDATE"  # a row another node changes now: wait for it, then read it
    _SHARED = True
    # a settling row's lease says its node lives: at least SETTLE_LEASE from the decision
    # (the claim's lease may be all but spent by the upload), so that no other node takes
    # over (and repairs) a move this node is making
    _SETTLE_LEASE = (
        "lease_until = GREATEST(lease_until, "
        f"EXTRACT(EPOCH FROM clock_timestamp()) + {SETTLE_LEASE})"
    )
    _TALLIES = "tally_now"
    _THROUGHPUT = "throughput_now"
    _PART = None  # any number of ids in one statement: one array (``_in``)
    _CLAIM_HEAD = (
        "SELECT destination, study_uid, solo, id, next_attempt_at FROM files "
        "WHERE state = 'pending' AND kind IS NOT NULL AND destination = ? "
        "AND next_attempt_at <= ?{mine} ORDER BY next_attempt_at, id LIMIT 1 "
        "FOR UPDATE SKIP LOCKED"
    )

    def __init__(
        self,
        database: Database,
        *,
        anchor: Path,
        node: str,
        clock: Callable[[], float] | None = None,
        readonly: bool = False,
        lease: float = DEFAULT_LEASE,
        host_clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock``: None, this host's (``host_clock``) corrected to the database's (see the
        module's docstring); given, the queue's clock exactly (a test's time, set by hand)."""
        self._host_clock = host_clock
        self._offset: float | None = None if clock is None else 0.0  # None: not measured yet
        self._corrected = clock is None
        super().__init__(anchor, clock=clock or self._database_clock, readonly=readonly, node=node)
        self.database = database
        self.lease = lease  # a dead link to the database is noticed well within it
        self._node_db: _PgDb | None = None  # holds the node's name (``_take_node``)
        self._named = False  # this daemon holds the node's name (keeps it: ``_keep_node``)
        self._sources: tuple[str, ...] | None = None  # this node's config's (``adopt``)
        # rows this node inserted since its last ``ANALYZE files``, and when to look again
        # (``_keep_statistics``; a count lost to two threads' race only delays a look)
        self._inserted = 0
        self._look_at = ANALYZE_ROWS
        self._moves_told: set[tuple[str, str]] = set()  # ``_say_moves_left``'s, said once

    # -- opening ---------------------------------------------------------------------
    def open(self, *, lock: bool = True) -> Self:
        try:
            if lock:
                self.path.parent.mkdir(mode=QUEUE_MODE | 0o100, parents=True, exist_ok=True)
                self._lock_fd = take_lock(self.path)
            if self.readonly:
                self._check_version()
            else:
                self._migrate()
            self._measure_clock(CLOCK_SAMPLES)
            if lock:
                self._take_node()
                self._named = True
        except OSError as exc:
            self.close()
            raise QueueError(f"cannot use the node folder {self.path.parent}: {exc}") from exc
        except BaseException:
            self.close()
            raise
        return self

    def _take_node(self) -> None:
        """Hold the node's name for as long as this daemon runs (a session advisory lock, on a
        connection of its own): the lock file guards a state folder, but two hosts given one
        name have two, and the second's ``recover`` would return the first's live claims to
        pending and its ``repair`` move the files the first is moving.  Checked at start,
        and at each heartbeat (``_keep_node``)."""
        db = self._connect()
        self._node_db = db
        taken = db.execute(
            "SELECT pg_try_advisory_lock(?, hashtext(?))", (_NODE_LOCK, self.node)
        ).fetchone()[0]
        if not taken:
            raise QueueLockedError(
                f"another stowd is running as node {self.node} on the queue "
                f"{self.database.shown()}: each host needs a node name of its own (`node:`)"
            )

    def _keep_node(self) -> None:
        """Take the node's name again when the session that held it ended (the database
        restarted or failed over, or the session was killed: its advisory lock went with
        it), so that a twin started later is still refused.  Should another process have
        taken the name meanwhile, this node says so (``QueueLockedError``): it then claims
        nothing new, as a node that lost the database."""
        if not self._named:
            return  # not a daemon's queue (a reader's), or closed
        db = self._node_db
        if db is not None:
            try:
                db.execute("SELECT 1")
                return
            except QueueError:
                self._release_node()
        try:
            self._take_node()  # a database still away: QueueError, tried at the next beat
        except QueueLockedError:
            self._release_node()
            log.error(
                "node %s: its name is taken by another stowd since the database dropped "
                "this one's session; claiming nothing new (each host needs its own `node:`)",
                self.node,
            )
            raise
        log.warning("node %s took its name again (the database had dropped its session)", self.node)

    def _release_node(self) -> None:
        node_db, self._node_db = self._node_db, None
        if node_db is not None:
            with suppress(psycopg.Error):
                node_db.close()

    def close(self) -> None:
        self.release_connection()
        self._named = False
        self._release_node()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _check_version(self) -> int:
        db = self._conn()
        if db.execute("SELECT to_regclass('stowd_schema')").fetchone()[0] is None:
            raise QueueError(f"no stowd queue in {self.database.shown()} (has stowd run yet?)")
        version = int(db.execute("SELECT version FROM stowd_schema").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise QueueError(
                f"{self.database.shown()} was written by a newer stowd (schema {version}, "
                f"this one knows {SCHEMA_VERSION})"
            )
        return version

    def _migrate(self) -> None:
        """Create the tables of a new queue, or bring an older one up to this schema (one
        node at a time: the others wait for the advisory lock, then find it done)."""
        with self._tx() as db:
            db.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
            fresh = db.execute("SELECT to_regclass('stowd_schema')").fetchone()[0] is None
            version = 0 if fresh else self._check_version()
            for statement in (*_SCHEMA, *_TRIGGERS) if fresh else ():
                db.execute(statement)
            for step in range(version or SCHEMA_VERSION, SCHEMA_VERSION):
                for statement in _MIGRATIONS[step]:
                    db.execute(statement)
            if fresh:
                db.execute("INSERT INTO stowd_schema (version) VALUES (?)", (SCHEMA_VERSION,))
            else:
                db.execute("UPDATE stowd_schema SET version = ?", (SCHEMA_VERSION,))

    # -- connections and transactions -------------------------------------------------
    def _conn(self) -> Db:
        conn: _PgDb | None = getattr(self._local, "conn", None)
        if conn is not None and conn.broken:  # the server went away: a new one next
            self._local.conn = None
            with suppress(psycopg.Error):
                conn.close()
            conn = None
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    def _connect(self) -> _PgDb:
        try:
            raw = _connect(self.database, self.node, CONNECT_TIMEOUT, self.lease)
        except SecretUnavailable as exc:
            raise QueueError(f"cannot connect to the queue {self.database.shown()}: {exc}") from exc
        except psycopg.Error as exc:
            raise self._translated(exc) from exc
        return _PgDb(raw, self._translated)

    def _translated(self, exc: Exception) -> QueueError:
        if isinstance(exc, QueueError):
            return exc
        where = self.database.shown()
        text = str(exc).strip().replace("\n", "; ")
        conn: _PgDb | None = getattr(self._local, "conn", None)
        if conn is not None and conn.reading:
            return QueueUnreadable(f"cannot read the queue {where}: {text}")
        if isinstance(exc, pgerrors.DiskFull):
            return QueueFull(f"the queue {where} cannot be written: its disk is full ({text})")
        return QueueError(f"the queue {where} cannot be written: {text}")

    @contextmanager
    def _tx(self) -> Iterator[Db]:
        conn = self._conn()
        try:
            conn.execute("BEGIN")
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            self._roll_back(conn)
            raise

    @staticmethod
    def _roll_back(conn: Db) -> None:
        if isinstance(conn, _PgDb) and not conn.broken:
            with suppress(psycopg.Error, QueueError):
                conn.execute("ROLLBACK")

    @contextmanager
    def reading(self) -> Iterator[Self]:
        """The queries inside see one snapshot (a read-only REPEATABLE READ transaction);
        their errors become ``QueueUnreadable``."""
        conn = self._conn()
        assert isinstance(conn, _PgDb)
        conn.reading = True
        try:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            try:
                yield self
            finally:
                if not conn.broken:
                    conn.execute("COMMIT")
        except QueueError as exc:
            if isinstance(exc, QueueUnreadable):
                raise
            raise QueueUnreadable(str(exc)) from exc
        finally:
            conn.reading = False

    @classmethod
    def _schema(cls, db: Db) -> int:
        return FEATURES

    @classmethod
    def _in(cls, values: Sequence[Any]) -> tuple[str, tuple[Any, ...]]:
        """``= ANY(?)``, ``values`` one array parameter (each stored as TEXT stores it), typed
        as the column: ids, BIGINT (psycopg sends small ints as INTEGER[], and ``id = ANY``
        of another type than the column's compares each row with each id, not in a hash: a
        node's 70,000 claims renewed in 9 s, not 1), the rest TEXT."""
        if not values:  # no array to type (an empty BIGINT[] against a TEXT column fails)
            return "IN (NULL)", ()
        if all(type(v) is int for v in values):
            return "= ANY(?::BIGINT[])", (list(values),)
        return "= ANY(?::TEXT[])", (_column(values),)

    def _settle_rows(self, db: Db, node: str, rows: list[tuple[Any, ...]]) -> None:
        """One statement for all the rows: their own values as arrays, side by side."""
        if not rows:
            return
        values, args = _unnest(rows, "BIGINT", *["TEXT"] * 6)
        db.execute(
            "UPDATE files SET state = 'settling', outcome = v.outcome, target = v.target, "
            "error = v.error, sidecars = COALESCE(v.sidecars, files.sidecars), "
            f"note = COALESCE(v.note, files.note), node = ?, {self._SETTLE_LEASE} "
            f"FROM {values} AS v(id, was, outcome, target, error, sidecars, note) "
            "WHERE files.id = v.id AND files.state = v.was",
            (node, *args),
        )

    def unclassified(self, limit: int) -> list[Job]:
        """``Queue.unclassified``, but not the rows another node reads now: each node's reader
        would otherwise read the header of every new file of a shared tree (the share's
        reads times the nodes).  The rows returned are locked (``FOR UPDATE SKIP LOCKED``:
        two nodes at once take other rows) and leased to this node for ``lease`` seconds on
        the database's clock (``read_until``); another node skips them until the lease
        ends: a node that dies mid-read lets it lapse, and the others read them then.  This
        node reads its own again (a file found changed, a retry due)."""
        mine, known = self._mine()
        with self._tx() as db:
            rows = db.execute(
                f"SELECT {JOB_COLUMNS} FROM files WHERE state = 'pending' AND kind IS NULL "
                f"AND destination != '' AND next_attempt_at <= ?{mine} AND (read_by = ? "
                "OR read_until IS NULL OR read_until < EXTRACT(EPOCH FROM clock_timestamp())) "
                f"ORDER BY id LIMIT ?{self._LOCK_ROWS}",
                (self.clock(), *known, self.node, limit),
            ).fetchall()
            self._each_part(
                db,
                "UPDATE files SET read_by = ?, "
                "read_until = EXTRACT(EPOCH FROM clock_timestamp()) + ? WHERE id {ids}",
                [r[0] for r in rows],
                (self.node, self.lease),
            )
        return [job(r) for r in rows]

    def _classify_rows(self, db: Db, rows: list[tuple[Any, ...]]) -> None:
        """One statement for all the rows (a run of the counting triggers, not one a row:
        70,000 rows in 11 s, not 2), with the same condition as SQLite's: each row only
        while still pending with the content that was read."""
        if not rows:
            return
        values, args = _unnest(rows, *["TEXT"] * 9, "BIGINT", "BIGINT", "BIGINT")
        db.execute(
            "UPDATE files SET kind = v.kind, study_uid = v.study_uid, sop_uid = v.sop_uid, "
            "sop_class = v.sop_class, changes = v.changes, sidecars = v.sidecars, "
            "rules_digest = v.digest, made = v.made, lookup = v.lookup "
            f"FROM {values} AS v(kind, study_uid, sop_uid, sop_class, changes, sidecars, "
            "digest, made, lookup, id, size, mtime_ns) WHERE files.id = v.id "
            "AND files.state = 'pending' AND files.size = v.size "
            "AND files.mtime_ns = v.mtime_ns",
            args,
        )

    def _note_rows(self, db: Db, notes: dict[int, str]) -> None:
        """One statement for all the rows."""
        if notes:
            values, args = _unnest(list(notes.items()), "BIGINT", "TEXT")
            db.execute(
                f"UPDATE files SET note = v.note FROM {values} AS v(id, note) "
                "WHERE files.id = v.id",
                args,
            )

    # -- nodes: shared trees, claims, leases, takeover ------------------------------------
    def _enqueue_many(self, db: Db, files: list[NewFile], now: float) -> list[NewFile]:
        """Nodes watching one tree enqueue one at a time (a lock held until the commit).
        Two nodes inserting overlapping paths wait on each other's uncommitted rows in the
        unique index of active paths; an enqueue of several statements (parts, or rows
        updated in place) takes them in no one order, so three nodes deadlocked now and
        then (test_fleet_nodes, 5,000 files).  An enqueue is short: the files' reads
        happened before the transaction.  Nothing to queue takes no lock (every settle asks
        for the files found while their rows were busy: mostly none)."""
        if not files:
            return []
        db.execute("SELECT pg_advisory_xact_lock(?)", (_ENQUEUE_LOCK,))
        return super()._enqueue_many(db, files, now)

    def _insert(self, db: Db, rows: list[tuple[Any, ...]]) -> set[str]:
        """Insert the new rows as one statement; a path another node queued since this one
        read it (two nodes watching one tree) is skipped, not an error that would lose the
        other files of the batch: the unique index of active paths makes the insert wait
        for that node's transaction, then do nothing.  In path order, so that two nodes
        inserting the same paths take them in one order (never a deadlock)."""
        rows = sorted(rows, key=lambda r: str(_storable(r[2])))
        inserted: set[str] = set()
        for at in range(0, len(rows), ENQUEUE_PART):
            part = rows[at : at + ENQUEUE_PART]
            values = ",".join("(?, ?, ?, ?, ?, ?, 'pending', ?, ?)" for _ in part)
            found = db.execute(
                f"{_INSERT_HEAD} VALUES {values} ON CONFLICT (path) WHERE "
                "state IN ('pending', 'claimed', 'settling') DO NOTHING RETURNING path",
                [v for r in part for v in r],
            ).fetchall()
            inserted |= {r[0] for r in found}
        self._keep_statistics(db, len(inserted))
        return inserted

    def _keep_statistics(self, db: Db, inserted: int) -> None:
        """Run ``ANALYZE files`` (in the enqueue's transaction: it counts the rows inserted
        so far) once the rows this node inserted since its last one exceed ``ANALYZE_SHARE``
        of the rows the statistics count (looked up each ``ANALYZE_ROWS`` rows inserted).

        Without statistics (a new queue: autovacuum analyzes within a minute or so, and a
        migration's first walk queues tens of thousands of files before it does) the
        planner takes ``files`` for a table of a few pages and reads a part's active rows
        by path through ``files_age`` (every active row, the path a filter) rather than the
        unique index of active paths: each part of an enqueue read all the rows queued
        before it, quadratic (70,000 files in one call: 47 s, not 4).  Once analyzed, the
        estimates follow the table's growth (rows per page times its pages)."""
        self._inserted += inserted
        if self._inserted < self._look_at:
            return
        counted = float(
            db.execute("SELECT reltuples FROM pg_class WHERE oid = 'files'::regclass").fetchone()[0]
        )
        if counted > 0 and self._inserted <= ANALYZE_SHARE * counted:  # -1: never analyzed
            self._look_at = self._inserted + ANALYZE_ROWS
            return
        db.execute("ANALYZE files")
        self._inserted, self._look_at = 0, ANALYZE_ROWS

    def adopt(self, destinations: dict[str, str]) -> dict[str, int]:
        """Point the queued rows of this node's sources at their destinations (and take back
        any an older stowd parked).  The rows of a source this node's config lacks are left
        as they are, for the nodes that have it (a config change rolled out one node at a
        time, a ``stowd migrate`` source): parking them would stop those nodes too, and
        nothing would take them back until such a node restarts.  This node never reads or
        claims them (``_mine``); returns how many there are by source."""
        self._sources = tuple(destinations)
        with self._tx() as db:
            self._repoint(db, destinations)
            rows = db.execute(
                "SELECT source, COUNT(*) FROM files "
                "WHERE state IN ('pending', 'claimed', 'settling') "
                "AND NOT source = ANY(?) GROUP BY source",
                (list(destinations),),
            ).fetchall()
        return {r[0]: r[1] for r in rows}

    def _mine(self) -> tuple[str, tuple[Any, ...]]:
        if self._sources is None:  # not adopted: a queue opened by a command, or a test
            return "", ()
        return " AND source = ANY(?)", (list(self._sources),)

    def recover(self) -> int:
        """Return this node's claims (its last run's) to pending; other nodes' stay theirs."""
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE files SET state = 'pending', lease_until = NULL "
                "WHERE state = 'claimed' AND node = ?",
                (self.node,),
            )
            returned = int(cursor.rowcount)
        self.fold()
        return returned

    def settling(self) -> list[Job]:
        """This node's rows whose move to sent/failed was decided but may not have happened
        (and those it took over from a node whose lease expired)."""
        rows = (
            self._conn()
            .execute(
                f"SELECT {JOB_COLUMNS} FROM files WHERE state = 'settling' AND node = ?",
                (self.node,),
            )
            .fetchall()
        )
        return [job(r) for r in rows]

    def _lease_end(self, db: Db, now: float, lease: float) -> float:
        return _database_now(db) + lease

    def renew(self, ids: Iterable[int], until: float) -> int:
        """Extend the lease of this node's claims ``ids`` to ``until`` (this host's clock):
        by as long from the database's clock, which leases are kept on."""
        with self._tx() as db:
            end = self._lease_end(db, self.clock(), until - self.clock())
            return self._each_part(
                db,
                "UPDATE files SET lease_until = ? WHERE id {ids} AND node = ? "
                "AND state IN ('claimed', 'settling')",
                ids,
                (end,),
                (self.node,),
            )

    def reclaim(self, held: Collection[int]) -> int:
        """Return to pending this node's claims whose lease ran out but ``held`` (the rows a
        worker still has) and any other node's claims whose lease ran out (a node that died
        or lost the database), and take over the settling rows of such a node (repaired by
        this node's next ``settling``); returns how many claims.  Whether a lease ran out
        is read on the database's clock, the one every node's leases are kept on: a host
        whose clock is off never takes over another's live claims."""
        with self._tx() as db:
            now = _database_now(db)
            rows = db.execute(
                "SELECT id, node FROM files WHERE state = 'claimed' "
                "AND (lease_until IS NULL OR lease_until < ?) FOR UPDATE SKIP LOCKED",
                (now,),
            ).fetchall()
            ids = [i for i, node in rows if not (node == self.node and i in held)]
            self._each_part(
                db, "UPDATE files SET state = 'pending', lease_until = NULL WHERE id {ids}", ids
            )
            # only the moves of this node's sources: one it lacks, it could not make (the
            # rows would stay settling, their lease renewed by this node, for good)
            mine, known = self._mine()
            settling = db.execute(
                "SELECT id, node FROM files WHERE state = 'settling' AND node IS DISTINCT FROM ? "
                f"AND lease_until < ?{mine} FOR UPDATE SKIP LOCKED",
                (self.node, now, *known),
            ).fetchall()
            self._each_part(
                db,
                "UPDATE files SET node = ?, lease_until = ? WHERE id {ids}",
                [i for i, _ in settling],
                (self.node, now + SETTLE_LEASE),
            )
            left = self._moves_left(db, now) if mine else []
        self.adopted |= {i for i, _ in settling}
        taken = set(ids)
        _log_takeover(self.node, [n for i, n in rows if i in taken], "claims")
        _log_takeover(self.node, [n for _, n in settling], "files being moved")
        self._say_moves_left(left)
        self.fold()
        return len(ids)

    def _moves_left(self, db: Db, now: float) -> list[tuple[str, str, int]]:
        """(source, node, count) of other nodes' moves whose lease ran out, of sources this
        node's config lacks: left to a node that has the source (``reclaim``)."""
        rows = db.execute(
            "SELECT source, COALESCE(node, ''), COUNT(*) FROM files WHERE state = 'settling' "
            "AND node IS DISTINCT FROM ? AND lease_until < ? AND NOT source = ANY(?) "
            "GROUP BY 1, 2 ORDER BY 1, 2",
            (self.node, now, list(self._sources or ())),
        ).fetchall()
        return [(r[0], r[1] or "?", int(r[2])) for r in rows]

    def _say_moves_left(self, left: list[tuple[str, str, int]]) -> None:
        """Say once (per source and node) that a vanished node's moves wait for a node
        whose config has their source: none may have it any more, and nothing else would
        say why they stay (``stowd status`` shows them as the vanished node's)."""
        for source, node, count in left:
            if (source, node) in self._moves_told:
                continue
            self._moves_told.add((source, node))
            log.warning(
                "%d file(s) of source %s were being moved by node %s, whose lease ran out; "
                "this node's config lacks that source, so it leaves them to a node that has "
                "it (if none has it any more, add the source back on one node)",
                count,
                escape(source),
                escape(node),
            )

    def heartbeat(self, *, pid: int, host: str, started: float, version: str, lease: float) -> None:
        """Say this node is alive, at a time on the database's clock (as its leases): a
        heartbeat on this host's clock, read against another host's, would make a live node
        whose clock runs behind look vanished, and a dead one whose clock ran ahead alive.
        The node's name is taken again first if the database dropped the session holding it."""
        self._keep_node()
        with self._tx() as db:
            db.execute(
                "INSERT INTO nodes (node, pid, host, started, heartbeat, version, lease) "
                "VALUES (?, ?, ?, ?, EXTRACT(EPOCH FROM clock_timestamp()), ?, ?) "
                "ON CONFLICT (node) DO UPDATE SET pid = excluded.pid, "
                "host = excluded.host, started = excluded.started, "
                "heartbeat = excluded.heartbeat, version = excluded.version, "
                "lease = excluded.lease",
                (self.node, pid, host, started, version, lease),
            )
        self._measure_clock(1)

    # -- the clock ---------------------------------------------------------------------
    def _database_clock(self) -> float:
        """This host's clock corrected by its offset to the database's (``clock``)."""
        return self._host_clock() + (self._offset or 0.0)

    def _measure_clock(self, samples: int) -> None:
        """Measure this host's clock's offset to the database's: the quickest of ``samples``
        readings, kept unless it took longer than ``CLOCK_RTT`` (a slow network, a busy
        server) and an offset is known."""
        if not self._corrected:
            return
        db = self._conn()
        best: tuple[float, float] | None = None
        for _ in range(samples):
            host, start = self._host_clock(), time.monotonic()
            there = _database_now(db)
            rtt = time.monotonic() - start
            if best is None or rtt < best[0]:
                best = (rtt, there - (host + rtt / 2))
        assert best is not None
        rtt, offset = best
        if rtt > CLOCK_RTT and self._offset is not None:
            log.debug("the database's clock read in %.1fs: its offset stays as it was", rtt)
            return
        first, self._offset = self._offset is None, offset
        if first and abs(offset) > CLOCK_NOTED:
            log.warning(
                "node %s: this host's clock is %.1fs %s the database's; stowd keeps the "
                "queue's times on the database's clock (check this host's NTP)",
                self.node,
                abs(offset),
                "behind" if offset > 0 else "ahead of",
            )

    def nodes(self) -> list[Node]:
        db = self._conn()
        if db.execute("SELECT to_regclass('nodes')").fetchone()[0] is None:
            return []  # a queue of schema 1, read by stowd status
        rows = db.execute(
            "SELECT node, pid, host, started, heartbeat, version, lease FROM nodes ORDER BY node"
        )
        return [Node(*r) for r in rows.fetchall()]

    def leases_now(self, now: float) -> float:
        return _database_now(self._conn())

    def forget_nodes(self, silent_for: float) -> list[str]:
        """Forget the nodes silent for ``silent_for`` seconds (on the database's clock) that
        hold no claim and no move: a node retired from the fleet is not shown as vanished
        forever.  One that holds rows stays (its files are taken over, then it goes)."""
        with self._tx() as db:
            rows = db.execute(
                "DELETE FROM nodes WHERE node != ? AND heartbeat < "
                "EXTRACT(EPOCH FROM clock_timestamp()) - ? AND NOT EXISTS (SELECT 1 FROM "
                "files WHERE files.node = nodes.node AND files.state IN ('claimed', 'settling')) "
                "RETURNING node",
                (self.node, silent_for),
            ).fetchall()
        return sorted(r[0] for r in rows)

    # -- the walk of a migration: one node walks, the others send ------------------------
    def take_walk(self, source: str, lease: float, run: float | None = None) -> Walk:
        """Walk ``source`` unless another node does (its lease runs, on the database's
        clock).  This node walks (``mine``): a source never walked; one whose walk lease
        ran out before the walk ended (its walker died: the walk starts again from the top,
        in the same run, which is safe since files queued or stored are not queued again);
        one this node was walking (its last run died: no other process is this node); one
        walked whose files are all done (the run was finished: a new run begins), unless it
        is the run ``run`` (its start) this node joined.  A walk ended whose files are not
        all done is that run's, which this node joins to send."""
        with self._tx() as db:
            now = _database_now(db)
            fresh = db.execute(
                "INSERT INTO migrate_walks (source, node, lease_until, started) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (source) DO NOTHING RETURNING source",
                (source, self.node, now + lease, now),
            ).fetchone()
            if fresh is not None:
                return Walk(source, self.node, now, None, mine=True)
            node, until, started, walked, skipped = db.execute(
                "SELECT node, lease_until, started, walked, skipped FROM migrate_walks "
                "WHERE source = ? FOR UPDATE",
                (source,),
            ).fetchone()
            if walked is None and node != self.node and until >= now:
                return Walk(source, node, started, None, int(skipped))
            if walked is not None and started == run:
                return Walk(source, node, started, walked, int(skipped))
            if walked is not None:
                left = db.execute(
                    "SELECT EXISTS (SELECT 1 FROM files WHERE source = ? "
                    "AND state IN ('pending', 'claimed', 'settling'))",
                    (source,),
                ).fetchone()[0]
                if left:
                    return Walk(source, node, started, walked, int(skipped))
                started = now  # the last run is over: this one begins now
            db.execute(
                "UPDATE migrate_walks SET node = ?, lease_until = ?, started = ?, "
                "walked = NULL, skipped = 0 WHERE source = ?",
                (self.node, now + lease, started, source),
            )
        if walked is None and node != self.node:
            log.warning(
                "took over the walk of %s from node %s: its lease expired (the node stopped, "
                "or lost the database); walking it again from the top",
                source,
                node,
            )
        return Walk(source, self.node, started, None, mine=True)

    def renew_walk(self, source: str, lease: float, skipped: int) -> bool:
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE migrate_walks SET lease_until = EXTRACT(EPOCH FROM clock_timestamp()) "
                "+ ?, skipped = ? WHERE source = ? AND node = ? AND walked IS NULL",
                (lease, skipped, source, self.node),
            )
            return int(cursor.rowcount) == 1

    def end_walk(self, source: str, skipped: int) -> bool:
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE migrate_walks SET walked = EXTRACT(EPOCH FROM clock_timestamp()), "
                "skipped = ? WHERE source = ? AND node = ? AND walked IS NULL",
                (skipped, source, self.node),
            )
            return int(cursor.rowcount) == 1

    def walks(self, sources: Sequence[str]) -> list[Walk]:
        where, args = self._in(sources)
        rows = self._conn().execute(
            "SELECT source, node, started, walked, skipped FROM migrate_walks "
            f"WHERE source {where} ORDER BY source",
            args,
        )
        return [Walk(s, n, st, w, int(k), mine=False) for s, n, st, w, k in rows.fetchall()]

    @classmethod
    def _active_view(cls, db: Db, now: float) -> ActiveView:
        """The scrape's view, with each node's heartbeat age (on the database's clock, as
        ``stowd status`` reads it) and what it holds."""
        view = super()._active_view(db, now)
        if db.execute("SELECT to_regclass('nodes')").fetchone()[0] is None:
            return view  # a queue of schema 1
        kept = _database_now(db)
        rows = db.execute("SELECT node, heartbeat, lease FROM nodes").fetchall()
        for node, heartbeat, lease in rows:
            view.beats[node] = (max(0.0, kept - heartbeat), lease)
        for held in cls._holdings(db):
            view.holding[(held.node, "claimed")] = held.claimed
            view.holding[(held.node, "settling")] = held.settling
        return view

    def fold(self) -> None:
        """Move the appended counts into ``tallies`` and ``throughput`` (by one node at a
        time; another node folding already: nothing to do now)."""
        if self.readonly:
            return
        with self._tx() as db:
            if db.execute("SELECT pg_try_advisory_xact_lock(?)", (_FOLD_LOCK,)).fetchone()[0]:
                for statement in _FOLD:
                    db.execute(statement)


def _database_now(db: Db) -> float:
    """The database's clock (seconds since the epoch): leases are times on it, so that
    nodes whose clocks differ agree on when one runs out."""
    return float(db.execute("SELECT EXTRACT(EPOCH FROM clock_timestamp())::FLOAT8").fetchone()[0])


def _log_takeover(me: str, nodes: list[str | None], what: str) -> None:
    others: dict[str, int] = {}
    for node in nodes:
        if node != me:
            others[node or "?"] = others.get(node or "?", 0) + 1
    for node, count in sorted(others.items()):
        log.warning(
            "took over %d %s of node %s: its lease expired (the node stopped, or lost the "
            "database)",
            count,
            what,
            node,
        )


def read_active_pg(database: Database, now: float, *, timeout: float) -> ActiveView:
    """``sqlite.read_active`` for a PostgreSQL queue: one read-only snapshot on a connection
    of its own, closed before returning; psycopg's errors become ``QueueError``."""
    try:
        raw = _connect(database, "metrics", timeout)
    except (psycopg.Error, SecretUnavailable) as exc:
        raise QueueError(f"cannot read the queue {database.shown()}: {exc}") from exc

    def translate(exc: Exception) -> Exception:
        return QueueError(f"cannot read the queue {database.shown()}: {exc}")

    db = _PgDb(raw, translate)
    try:
        db.execute(f"SET statement_timeout = {int(timeout * 1000)}")
        db.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        now = _database_now(db)  # the clock of the queue's times, whatever this host's says
        view = PostgresQueue._active_view(db, now)
        view.at = now
        return view
    finally:
        with suppress(psycopg.Error):
            raw.close()
