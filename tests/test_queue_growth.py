"""A queue of a million rows (issue 19's growth target): the counts ``stowd status`` shows are
kept in ``tallies`` by the queue's triggers and stay equal to the rows; the claim, the status
queries and a rescan of files already queued read indexes, never the whole table, and write
nothing when there is nothing new.  Plans are asserted, never times."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from harness import Clock
from postgres import queue_backend  # noqa: F401 - its queue tests run on both backends

from stowd.errors import QueueError
from stowd.pipeline.queue import (
    ALREADY_STORED,
    Classification,
    Job,
    NewFile,
    Queue,
    SqliteQueue,
    Tally,
    open_readonly,
)
from stowd.pipeline.queue import sqlite as queue_module
from stowd.pipeline.queue.model import _warned

ERROR = {"reason": "the archive said no", "stage": "send"}


def new(path: str, source: str = "src", dest: str = "pacs", size: int = 10) -> NewFile:
    return NewFile(source, dest, path, Path(path).name, size, 1)


def pick_all(_dest: str, jobs: list[Job]) -> list[Job]:
    return jobs


def classify(queue: Queue, study: str = "1.2.3") -> None:
    queue.set_classified(
        [Classification(j, "dicom", study, f"sop{j.id}", "1.2") for j in queue.unclassified(1000)]
    )


def counted(queue: Queue, now: float) -> set[tuple[object, ...]]:
    """Each group as the kept tallies give it (without ``oldest``)."""
    return {_figures(g) for g in queue.tally(now)}


def truth(queue: Queue, now: float) -> set[tuple[object, ...]]:
    """Each group counted over the rows themselves (the one pass status made before)."""
    return {_figures(g) for g in queue_module.SqliteQueue._tally(queue._conn(), now)}


def _figures(g: Tally) -> tuple[object, ...]:
    return (g.source, g.destination, g.state, g.files, g.bytes, g.stored, g.already, g.warned)


def oldest_active(groups: list[Tally]) -> dict[str, float]:
    out: dict[str, float] = {}
    for g in groups:
        if g.state in ("pending", "waiting", "claimed", "settling"):
            out[g.destination] = min(g.oldest, out.get(g.destination, g.oldest))
    return out


def assert_true_counts(queue: Queue, clock: Clock) -> None:
    for now in (clock.now, clock.now + 1000):  # waiting rows depend on the time asked about
        assert counted(queue, now) == truth(queue, now)
        reference = queue_module.SqliteQueue._tally(queue._conn(), now)
        assert oldest_active(queue.tally(now)) == oldest_active(reference)
        totals: dict[str, int] = {}
        for g in reference:
            totals[g.state] = totals.get(g.state, 0) + g.files
        assert queue.state_totals(now) == totals


def test_the_kept_counts_equal_the_rows_through_a_queue_s_life(
    queue: Queue, clock: Clock, tmp_path: Path
) -> None:
    queue.enqueue([new(f"/d/a{i}", size=100 + i) for i in range(30)])
    clock.now += 5
    queue.enqueue([new(f"/d/b{i}", source="other", dest="lab", size=7) for i in range(10)])
    assert_true_counts(queue, clock)
    queue.enqueue([new("/d/a0", size=999)])  # rewritten while pending: its size changes
    classify(queue)
    assert_true_counts(queue, clock)
    batch = queue.claim_batch(["pacs"], pick=pick_all, candidates=10, lease=60)
    assert len(batch) == 10
    assert_true_counts(queue, clock)
    queue.retry_later([j.id for j in batch[:4]], at=clock.now + 300, error=ERROR)
    queue.release([j.id for j in batch[4:6]])
    settled = batch[6:]
    queue.begin_settle(
        [(settled[0], "sent", "/s/0", None), (settled[1], "failed", "/f/1", ERROR)],
        notes={settled[0].id: ALREADY_STORED},
    )
    queue.begin_settle(
        [(settled[2], "sent", "/s/2", None)], notes={settled[2].id: "stored with warning B100"}
    )
    queue.begin_settle([(settled[3], "sent", None, None)])
    assert_true_counts(queue, clock)  # settling: stored or not
    queue.finish_many([(settled[0].id, "sent"), (settled[1].id, "failed"), (settled[2].id, "sent")])
    assert_true_counts(queue, clock)
    queue.isolate([j.id for j in queue.claim_batch(["lab"], pick=pick_all, candidates=5, lease=60)])
    queue.adopt({"src": "pacs"})  # "other" is gone from the config: its rows are parked
    assert_true_counts(queue, clock)
    clock.now += 10
    queue.forget_done(clock.now)  # the finished rows leave the history
    assert_true_counts(queue, clock)
    queue.recover()
    assert_true_counts(queue, clock)
    assert not [g for g in queue.tally(clock.now) if g.files <= 0]


def test_a_row_changed_in_the_transaction_that_queued_it_is_counted_once(
    queue: Queue, clock: Clock
) -> None:
    """The rows a transaction inserts are counted at its end, after the triggers counted any
    change of those rows: a file found twice in one batch with other content (queued, then
    updated in place) is one pending file of its new size, even as its group's first row."""
    assert queue.enqueue([new("/d/a", size=5), new("/d/a", size=9)]) == 1
    assert counted(queue, clock.now) == {("src", "pacs", "pending", 1, 9, 0, 0, 0)}
    assert_true_counts(queue, clock)
    queue.enqueue([new("/d/b", dest="lab", size=3), new("/d/c", dest="lab", size=4)])
    queue.enqueue([new("/d/d", dest="lab", size=1), new("/d/d", dest="lab", size=2)])
    assert_true_counts(queue, clock)


def test_status_on_a_queue_an_older_stowd_wrote_counts_its_rows(tmp_path: Path) -> None:
    """``stowd status`` reads a queue without changing it: one still at schema 6 (a daemon
    of the older stowd) has no tallies, and its rows are counted as before."""
    path = tmp_path / "v6.db"
    old = sqlite3.connect(path)
    old.executescript(queue_module._SCHEMA)
    old.execute("PRAGMA user_version = 6")
    old.execute(
        "INSERT INTO files (source, destination, path, rel, size, mtime_ns, state, queued_at, "
        "next_attempt_at) VALUES ('src', 'pacs', '/d/a', 'a', 5, 1, 'pending', 10, 0), "
        "('src', 'pacs', '/d/b', 'b', 6, 1, 'pending', 11, 5000)"
    )
    old.commit()
    old.close()
    reader = open_readonly(path)
    try:
        with reader.reading():
            assert reader.state_totals(100.0) == {"pending": 1, "waiting": 1}
            assert sorted((g.state, g.files, g.bytes) for g in reader.tally(100.0)) == [
                ("pending", 1, 5),
                ("waiting", 1, 6),
            ]
    finally:
        reader.close()


def test_a_version_6_queue_is_upgraded_without_losing_rows(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "v6.db"
    old = sqlite3.connect(path)  # the schema as stowd wrote it up to version 6
    old.executescript(queue_module._SCHEMA)
    old.execute("PRAGMA user_version = 6")
    states = ["pending"] * 5 + ["claimed", "settling", "sent", "sent", "failed", "gone"]
    old.executemany(
        "INSERT INTO files (source, destination, path, rel, size, mtime_ns, state, kind, "
        "study_uid, queued_at, outcome, note, done_at) VALUES ('src', 'pacs', ?, 'r', ?, 1, ?, "
        "'dicom', '1.2.3', ?, ?, ?, ?)",
        [
            (
                f"/d/{i}",
                10 + i,
                state,
                1000.0 + i,
                "sent" if state in ("sent", "settling") else None,
                ALREADY_STORED if i == 7 else None,
                2000.0 if state in ("sent", "failed", "gone") else None,
            )
            for i, state in enumerate(states)
        ],
    )
    old.commit()
    old.close()
    queue = SqliteQueue(path, clock=clock).open()
    try:
        assert len(queue.jobs()) == len(states)
        assert (
            queue._conn().execute("PRAGMA user_version").fetchone()[0]
            == queue_module.SCHEMA_VERSION
        )
        assert_true_counts(queue, clock)
        assert counted(queue, clock.now) == {
            ("src", "pacs", "pending", 5, 60, 0, 0, 0),
            ("src", "pacs", "claimed", 1, 15, 0, 0, 0),
            ("src", "pacs", "settling", 1, 16, 1, 0, 0),
            ("src", "pacs", "sent", 2, 35, 2, 1, 0),
            ("src", "pacs", "failed", 1, 19, 0, 0, 0),
            ("src", "pacs", "gone", 1, 20, 0, 0, 0),
        }
        batch = queue.claim_batch(["pacs"], pick=pick_all, candidates=50, lease=60)
        assert [j.path for j in batch] == [f"/d/{i}" for i in range(5)]
        assert_true_counts(queue, clock)
    finally:
        queue.close()


def claim_statements(queue: SqliteQueue) -> list[str]:
    """The SELECTs one claim of a batch runs."""
    seen: list[str] = []
    queue._conn().set_trace_callback(seen.append)
    try:
        queue.claim_batch(["pacs"], pick=pick_all, candidates=50, lease=60)
    finally:
        queue._conn().set_trace_callback(None)
    return [s for s in seen if s.lstrip().startswith("SELECT")]


def plan(queue: SqliteQueue, sql: str) -> str:
    rows = queue._conn().execute("EXPLAIN QUERY PLAN " + sql).fetchall()
    return "; ".join(str(r[3]) for r in rows)


def test_a_claim_reads_its_rows_in_claim_order_from_an_index(
    sqlite_queue: SqliteQueue, clock: Clock
) -> None:
    """Claiming costs the same at 1,000 and at 1,000,000 rows: the first ready row comes
    from the start of an index in claim order (next attempt, then id), and the batch from the
    rows of its study, never from a pass over the pending rows or a sort of them."""
    sqlite_queue.enqueue([new(f"/d/{i}") for i in range(200)])
    classify(sqlite_queue)
    waiting = sqlite_queue.claim_batch(["pacs"], pick=pick_all, candidates=20, lease=60)
    sqlite_queue.retry_later([j.id for j in waiting], at=clock.now + 60, error=ERROR)
    plans = [plan(sqlite_queue, sql) for sql in claim_statements(sqlite_queue)]
    assert plans[0] == (
        "SEARCH files USING INDEX files_claim (destination=? AND next_attempt_at<?)"
    )
    assert all(p.startswith("SEARCH files USING INDEX") for p in plans[1:])
    assert not [p for p in plans if "TEMP B-TREE" in p or "SCAN" in p]
    assert sqlite_queue.claim_plan(["pacs"]) == [plans[0]]


def test_the_claim_order_is_kept_over_several_destinations(
    sqlite_queue: SqliteQueue, clock: Clock
) -> None:
    """Each destination's first row is read from the index; the one whose next attempt came
    first (then the lower id) is claimed, as one query over all of them chose before."""
    sqlite_queue.enqueue([new("/d/p1"), new("/d/l1", dest="lab"), new("/d/p2")])
    found = sqlite_queue.unclassified(10)  # each file a study of its own
    sqlite_queue.set_classified([Classification(j, "dicom", j.path, j.path, "1.2") for j in found])
    [first] = sqlite_queue.claim_batch(["pacs"], pick=lambda _d, j: j[:1], candidates=1, lease=60)
    sqlite_queue.retry_later([first.id], at=clock.now + 5, error=ERROR)
    clock.now += 10
    order = []
    for _ in range(3):
        [job] = sqlite_queue.claim_batch(
            ["lab", "pacs"], pick=lambda _d, j: j[:1], candidates=1, lease=60
        )
        order.append(job.path)
    assert order == ["/d/l1", "/d/p2", "/d/p1"]


def test_a_rescan_of_files_already_queued_writes_nothing(sqlite_queue: SqliteQueue) -> None:
    """A rescan finds every queued file again: those are known from a read, and no write
    transaction (which would wait for, and hold up, the workers' settling) is begun."""
    files = [new(f"/d/{i}") for i in range(1200)]
    assert sqlite_queue.enqueue(files) == 1200
    seen: list[str] = []
    sqlite_queue._conn().set_trace_callback(seen.append)
    try:
        assert sqlite_queue.enqueue(files) == 0
    finally:
        sqlite_queue._conn().set_trace_callback(None)
    assert not [s for s in seen if s.startswith(("BEGIN", "INSERT", "UPDATE"))]
    assert sqlite_queue.counts() == {"pending": 1200}
    assert sqlite_queue.enqueue([*files[:3], new("/d/new")]) == 1  # a new one among them: queued
    assert sqlite_queue.counts() == {"pending": 1201}


def test_a_schema_8_queue_gains_the_node_of_each_claim(tmp_path: Path, clock: Clock) -> None:
    """Schema 9 records the node of a claim (the PostgreSQL queue's shape): a queue an older
    stowd wrote gains the column, its rows kept, and claims record the node."""
    path = tmp_path / "v8.db"
    SqliteQueue(path, clock=clock).open().close()
    old = sqlite3.connect(path)
    old.execute("ALTER TABLE files DROP COLUMN node")
    old.execute("PRAGMA user_version = 8")
    old.close()
    queue = SqliteQueue(path, clock=clock, node="gw-1").open()
    try:
        queue.enqueue([NewFile("src", "pacs", "/d/a", "a", 1, 1)])
        [job] = queue.unclassified(1)
        queue.set_classified([Classification(job, "dicom", "1.2", "1.2.3", "1.2")])
        queue.claim_batch(["pacs"], pick=pick_all, candidates=1, lease=60)
        node = queue._conn().execute("SELECT node FROM files").fetchone()[0]
        assert node == "gw-1"
        assert (
            queue._conn().execute("PRAGMA user_version").fetchone()[0]
            == queue_module.SCHEMA_VERSION
        )
    finally:
        queue.close()


# The per-row triggers of schema 9, kept by the test as a witness on tables of its own: the
# counts the queue writes once a statement (schema 10) must be the ones they kept.
def _witness(sql: str) -> str:
    return (
        sql.replace(" tallies ", " witness_tallies ")
        .replace(" throughput ", " witness_throughput ")
        .replace("TRIGGER IF NOT EXISTS ", "TRIGGER IF NOT EXISTS witness_")
    )


def watch_counts(queue: SqliteQueue) -> None:
    """Count every change of ``files`` row by row as schema 9's triggers did, into
    ``witness_tallies`` and ``witness_throughput`` (starting from the queue's counts)."""
    db = queue._conn()
    inserted = queue_module._TALLY_ADD.format(values=queue_module._TALLY_OF.format(r="NEW"))
    for statement in (
        queue_module._SCHEMA_7[0],
        queue_module._SCHEMA_8[0],
        queue_module._SCHEMA_7[1],
        queue_module._SCHEMA_7[2],
        queue_module._SCHEMA_8[1],
        f"CREATE TRIGGER IF NOT EXISTS tally_insert AFTER INSERT ON files BEGIN {inserted} END",
        "INSERT INTO tallies SELECT * FROM tallies",
        "INSERT INTO throughput SELECT * FROM throughput",
    ):
        db.execute(_witness(statement))


def assert_counted_as_each_row(queue: SqliteQueue, clock: Clock) -> None:
    """The queue's counts are those of the rows (``truth``), and its ``throughput`` what the
    per-row triggers kept (a file deleted from the history stays counted in its minute)."""
    assert_true_counts(queue, clock)
    db = queue._conn()
    nonzero = " WHERE files != 0 OR bytes != 0 OR stored != 0 OR already != 0 OR warned != 0"
    for table, where in (("tallies", nonzero), ("throughput", "")):
        kept = db.execute(f"SELECT * FROM {table}{where} ORDER BY 1, 2, 3").fetchall()
        witness = db.execute(f"SELECT * FROM witness_{table}{where} ORDER BY 1, 2, 3").fetchall()
        assert kept == witness, table


def test_each_way_a_row_changes_is_counted_as_the_triggers_counted_it(
    tmp_path: Path, clock: Clock
) -> None:
    """Schema 10 counts ``tallies`` and ``throughput`` from each statement's rows, not by a
    trigger a row: every path that changes a counted column (state, destination, size,
    outcome, note; a row deleted) keeps the counts exact, in a queue migrated from schema 9
    (whose triggers are dropped, their counts carried on)."""
    path = tmp_path / "q.db"
    queue = SqliteQueue(path, clock=clock).open()
    queue.enqueue([new(f"/d/a{i}", size=100 + i) for i in range(30)])
    queue.enqueue([new(f"/d/b{i}", source="other", dest="lab", size=7) for i in range(10)])
    queue.close()
    old = sqlite3.connect(path)  # a queue schema 9 kept: its triggers count row by row
    for statement in (*queue_module._SCHEMA_7[1:3], queue_module._SCHEMA_8[1]):
        old.execute(statement)
    old.execute("PRAGMA user_version = 9")
    old.commit()
    old.close()
    queue = SqliteQueue(path, clock=clock).open()
    db = queue._conn()
    assert db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall() == []
    watch_counts(queue)
    try:
        _mixed_workload(queue, clock)
        assert_counted_as_each_row(queue, clock)
        queue.close()
        queue = SqliteQueue(path, clock=clock).open()  # a restart: claims back, moves repaired
        queue.recover()
        assert_counted_as_each_row(queue, clock)
        repair = queue.settling()
        queue.begin_settle([(j, "failed", f"/f/{j.id}", ERROR) for j in repair])
        queue.finish_many([(j.id, "failed") for j in repair])
        assert_counted_as_each_row(queue, clock)
        assert {g.state for g in queue.tally(clock.now)} >= {"sent", "failed", "ignored", "pending"}
        assert queue.throughput(0)
    finally:
        queue.close()


def _mixed_workload(queue: SqliteQueue, clock: Clock) -> None:
    """Every change of a row the daemon and its commands make, checked after each step."""

    def check() -> None:
        clock.now += 7
        assert_counted_as_each_row(queue, clock)

    queue.enqueue([new("/d/a0", size=999), new("/d/c", size=5), new("/d/c", size=6)])
    check()  # a pending file rewritten (its size), one found twice in one batch
    [unread] = [j for j in queue.unclassified(100) if j.path == "/d/c"]
    queue.retry_later([unread.id], at=clock.now + 60, error=ERROR, was="pending")  # a reader's
    classify(queue)
    check()
    batch = queue.claim_batch(["pacs"], pick=pick_all, candidates=16, lease=60)
    assert len(batch) == 16
    check()
    queue.retry_later([j.id for j in batch[:3]], at=clock.now + 300, error=ERROR)
    queue.release([j.id for j in batch[3:5]], not_before=clock.now + 5)
    queue.isolate([batch[5].id])
    check()
    a, b, c, d, e, f, g = batch[6:13]
    queue.begin_settle(
        [(a, "sent", "/s/a", None), (b, "failed", "/f/b", ERROR), (c, "sent", "/s/c", None)],
        notes={a.id: ALREADY_STORED, c.id: "stored with warning B100"},
    )
    queue.begin_settle(
        [(d, "sent", None, None), (e, "sent", "/s/e", None), (e, "failed", "/f/e", ERROR)],
        notes={d.id: "Stored With Warning B1", e.id: "stored with warning"},
    )
    check()  # settling: stored or not, noted; a plan twice (the second finds it settling)
    [again] = [j for j in queue.settling() if j.id == d.id]
    queue.begin_settle([(again, "failed", "/f/d", ERROR)])  # a repair records it again
    check()
    queue.finish_many([(a.id, "sent"), (b.id, "failed"), (b.id, "sent"), (c.id, "sent")])
    queue.finish(f.id, state="gone", was="claimed")
    check()  # an id twice: the first change made, the second finds it done
    queue.finish_kept([(g.id, "sent", None), (batch[13].id, "failed", ERROR)])
    queue.add_notes({g.id: ALREADY_STORED, batch[13].id: "stored with warning B2"})
    check()
    claims = queue.claim_batch(["lab"], pick=pick_all, candidates=3, lease=60)
    clock.now += 120
    # a worker that died: its lease ran out (and the two claims of ``batch`` left)
    assert queue.reclaim(held={claims[0].id}) == 4
    check()
    queue.finish(claims[0].id, state="ignored", was="claimed")
    gone = queue.unclassified(100)[:1]
    queue.finish_many([(j.id, "gone") for j in gone], was="pending")
    queue.claim_batch(["pacs", "lab"], pick=pick_all, candidates=4, lease=60)
    queue.recover()
    check()
    queue.adopt({"src": "pacs2"})  # a new destination; "other" left the config: parked
    check()
    queue.adopt({"src": "pacs", "other": "lab"})  # both back
    check()
    clock.now += 2 * 86_400  # two days later: the history's older minutes go
    queue.finish_many([(e.id, "failed"), (d.id, "failed")])
    check()
    queue.forget_done(clock.now - 3600)
    check()


def test_a_warned_note_is_read_as_sqlites_like_reads_it() -> None:
    """The counts made in Python (``Counts``) call a note warned exactly where the recount's
    ``note LIKE 'stored with warning %'`` does: ``%`` matches nothing too, and LIKE ignores
    the case of ASCII letters only."""
    notes = [
        None,
        "",
        "stored with warning",
        "stored with warning ",
        "stored with warning 0001",
        "STORED WITH WARNING b000: x",
        "stored with warning\t0001",
        "stored with wärning 0001",
        "stored  with warning 0001",
        "note: stored with warning 0001",
    ]
    db = sqlite3.connect(":memory:")
    for note in notes:
        (like,) = db.execute("SELECT ? LIKE 'stored with warning %'", (note,)).fetchone()
        assert _warned(note) == bool(like), note


def test_an_sqlite_too_old_for_the_queue_is_refused_at_open_with_what_to_do() -> None:
    """Every change of state reads its rows back (``RETURNING``, SQLite 3.35): an older
    library (RHEL 9's 3.34.1) is refused when the queue opens, not at the first claim."""
    with pytest.raises(QueueError, match=r"needs SQLite 3\.35\.0 or newer.*has 3\.34\.1"):
        queue_module._check_sqlite((3, 34, 1))
    queue_module._check_sqlite((3, 35, 0))
    queue_module._check_sqlite(sqlite3.sqlite_version_info)  # this machine's runs the suite
