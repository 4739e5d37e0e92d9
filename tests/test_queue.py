"""The SQLite queue: states, claims, recovery, locking, holds, status queries."""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from harness import Clock
from postgres import pass_time, queue_backend  # noqa: F401 - its queue tests run on both backends

from stowd.config.model import BatchLimits
from stowd.errors import QueueError, QueueFull, QueueLockedError, SidecarNotReady
from stowd.pipeline.group import take_batch
from stowd.pipeline.queue import (
    ACTIVE,
    Classification,
    Job,
    Made,
    NewFile,
    Queue,
    SqliteQueue,
    open_readonly,
)


def new(path: str, size: int = 10, mtime: int = 1) -> NewFile:
    return NewFile("src", "pacs", path, Path(path).name, size, mtime)


def pick_all(_dest: str, jobs: list[Job]) -> list[Job]:
    return jobs


def classify_all(queue: Queue, study: str = "1.2.3") -> None:
    queue.set_classified(
        [Classification(j, "dicom", study, f"sop{j.id}", "1.2") for j in queue.unclassified(1000)]
    )


def test_enqueue_is_idempotent_for_the_same_content(queue: Queue) -> None:
    assert queue.enqueue([new("/d/a"), new("/d/b")]) == 2
    assert queue.enqueue([new("/d/a"), new("/d/b")]) == 0
    assert queue.counts() == {"pending": 2}


def test_changed_content_updates_a_pending_row_and_forgets_its_classification(
    queue: Queue,
) -> None:
    queue.enqueue([new("/d/a", size=10)])
    classify_all(queue)
    queue.enqueue([new("/d/a", size=20)])
    [job] = queue.jobs()
    assert job.size == 20
    assert job.kind is None


def test_set_classified_keeps_what_was_read_only_where_the_row_still_describes_it(
    queue: Queue,
) -> None:
    """Every key read is recorded, as read; a row whose file changed since it was read, or
    that is no longer pending, keeps what it has.  ``add_notes`` notes each row given."""
    queue.enqueue([new(f"/d/f{i}") for i in range(4)])
    read = queue.unclassified(10)
    queue.enqueue([new("/d/f1", size=20)])  # rewritten since it was read
    queue.finish(read[2].id, state="gone", was="pending")
    made = Made("2.25.1", "2.25.2", "2.25.3", 7, key="k")
    queue.set_classified(
        [
            Classification(
                j,
                "dicom",
                f"st{j.id}",
                f"sop{j.id}",
                "1.2",
                changes={"PatientName": "Ä"},
                sidecars=(("/d/x.json", "{}"),),
                digest="dg",
                made=made,
                lookup='{"asked": 1}',
            )
            for j in read
        ]
    )
    queue.add_notes({read[0].id: "one", read[3].id: "two"})
    jobs = {j.path: j for j in queue.jobs()}
    for path in ("/d/f0", "/d/f3"):
        j = jobs[path]
        assert (j.kind, j.study_uid, j.sop_uid) == ("dicom", f"st{j.id}", f"sop{j.id}")
        assert (j.change_set(), j.sidecar_texts(), j.made_uids(), j.lookup) == (
            {"PatientName": "Ä"},
            [("/d/x.json", "{}")],
            made,
            '{"asked": 1}',
        )
    assert (jobs["/d/f1"].kind, jobs["/d/f1"].size) == (None, 20)
    assert (jobs["/d/f2"].kind, jobs["/d/f2"].state) == (None, "gone")
    rows = queue._conn().execute(
        "SELECT path, sop_class, rules_digest, note FROM files ORDER BY path"
    )
    assert [tuple(r) for r in rows.fetchall()] == [
        ("/d/f0", "1.2", "dg", "one"),
        ("/d/f1", None, None, None),
        ("/d/f2", None, None, None),
        ("/d/f3", "1.2", "dg", "two"),
    ]


def test_a_file_at_a_path_already_done_is_a_new_job(queue: Queue, tmp_path: Path) -> None:
    path = tmp_path / "a.dcm"
    queue.enqueue([new(str(path))])
    [job] = queue.jobs()
    queue.finish(job.id, state="sent", was="pending")
    # The watcher's stat raced with the move: same path, size and mtime, file gone: skip.
    assert queue.enqueue([new(str(path))]) == 0
    # The same content dropped again (the file is there): a new job.
    path.write_bytes(b"again")
    assert queue.enqueue([new(str(path))]) == 1
    assert sorted(j.id for j in queue.jobs()) == [job.id, job.id + 1]


def test_claim_takes_one_study_within_limits_and_only_classified_rows(queue: Queue) -> None:
    queue.enqueue([new(f"/d/{i}", size=100) for i in range(5)])
    jobs = {j.id: j for j in queue.jobs()}
    queue.set_classified(
        [
            Classification(jobs[1], "dicom", "A", "s1", "c"),
            Classification(jobs[2], "dicom", "B", "s2", "c"),
        ]
    )
    queue.set_classified([Classification(jobs[i], "dicom", "A", f"s{i}", "c") for i in (3, 4)])
    batch = queue.claim_batch(["pacs"], pick=pick_all, candidates=10, lease=60)
    assert [j.id for j in batch] == [1, 3, 4]
    assert queue.counts() == {"claimed": 3, "pending": 2}
    limited = queue.claim_batch(
        ["pacs"],
        pick=lambda _d, jobs: take_batch(jobs, BatchLimits(max_files=10, max_bytes=150)),
        candidates=10,
        lease=60,
    )
    assert [j.id for j in limited] == [2]


def test_claim_ignores_other_destinations_and_future_attempts(queue: Queue, clock: Clock) -> None:
    queue.enqueue([new("/d/a"), new("/d/b")])
    classify_all(queue)
    queue.retry_later([1], at=clock.now + 100, error={"reason": "x"}, was="pending")
    assert queue.claim_batch(["other"], pick=pick_all, candidates=10, lease=60) == []
    assert [j.id for j in queue.claim_batch(["pacs"], pick=pick_all, candidates=10, lease=60)] == [
        2
    ]
    assert queue.counts() == {"claimed": 1, "waiting": 1}
    clock.now += 101
    assert [j.id for j in queue.claim_batch(["pacs"], pick=pick_all, candidates=10, lease=60)] == [
        1
    ]


def test_retry_later_counts_attempts_and_keeps_the_first_try(queue: Queue, clock: Clock) -> None:
    queue.enqueue([new("/d/a")])
    first = clock.now
    queue.retry_later([1], at=first + 5, error={"reason": "busy"}, was="pending")
    clock.now += 10
    queue.retry_later([1], at=clock.now + 5, error={"reason": "busy again"}, was="pending")
    [job] = queue.jobs()
    assert job.attempts == 2
    assert job.first_try == first
    assert job.error is not None and "busy again" in job.error


def test_isolated_rows_are_claimed_one_at_a_time(queue: Queue) -> None:
    queue.enqueue([new(f"/d/{i}") for i in range(3)])
    classify_all(queue)
    claimed = queue.claim_batch(["pacs"], pick=pick_all, candidates=10, lease=60)
    assert queue.isolate([j.id for j in claimed]) == {}
    sizes = []
    for _ in range(3):
        sizes.append(len(queue.claim_batch(["pacs"], pick=pick_all, candidates=10, lease=60)))
    assert sizes == [1, 1, 1]


def test_recover_returns_claims_of_a_dead_daemon(tmp_path: Path, clock: Clock) -> None:
    q = SqliteQueue(tmp_path / "q.db", clock=clock).open()
    q.enqueue([new("/d/a")])
    classify_all(q)
    assert q.claim_batch(["pacs"], pick=pick_all, candidates=10, lease=60)
    q.close()  # the daemon died with a claim
    q2 = SqliteQueue(tmp_path / "q.db", clock=clock).open()
    assert q2.recover() == 1
    assert q2.counts() == {"pending": 1}
    q2.close()


def test_only_one_daemon_per_queue(tmp_path: Path) -> None:
    first = SqliteQueue(tmp_path / "q.db").open()
    with pytest.raises(QueueLockedError, match="another stowd"):
        SqliteQueue(tmp_path / "q.db").open()
    first.close()
    SqliteQueue(tmp_path / "q.db").open().close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "q.db")
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(QueueError, match="newer stowd"):
        SqliteQueue(tmp_path / "q.db").open()


def test_settling_rows_survive_and_finish(queue: Queue) -> None:
    queue.enqueue([new("/d/a")])
    [job] = queue.jobs()
    job = replace(job, sidecars='["/d/a.json"]')  # read with a sidecar, before its keys
    queue.begin_settle([(job, "failed", "/f/a", {"reason": "bad"})])
    assert [(j.target, j.sidecar_paths()) for j in queue.settling()] == [("/f/a", ["/d/a.json"])]
    queue.finish(1, state="failed", was="settling")
    assert queue.settling() == []
    assert queue.counts() == {"failed": 1}


def test_holds_accumulate_failures_and_clear(queue: Queue, clock: Clock) -> None:
    queue.hold("pacs", until=clock.now + 10, reason="HTTP 401")
    clock.now += 20
    hold = queue.hold("pacs", until=clock.now + 10, reason="HTTP 401 again")
    assert hold.failures == 2
    assert hold.since == clock.now - 20
    assert queue.unhold("pacs") is True
    assert queue.holds() == {}
    assert queue.unhold("pacs") is False


def test_failures_of_requests_sent_before_the_hold_ends_count_once(
    queue: Queue, clock: Clock
) -> None:
    """One outage counts one failure: requests sent before the hold was set (four workers'
    requests in flight when the archive went down) or while it is in force do not grow it;
    the probe sent after it ran out does."""
    sent = clock.now
    clock.now += 5  # the archive goes down; the first failed request holds it
    first = queue.hold("pacs", until=clock.now + 10, reason="refused", began=sent)
    for _ in range(3):  # the other workers' requests, sent at the same moment, fail too
        clock.now += 1
        again = queue.hold("pacs", until=clock.now + 20, reason="reset", began=sent)
        assert (again.failures, again.until, again.since) == (1, first.until, first.since)
    assert queue.hold("pacs", until=clock.now + 20, reason="x", began=first.until - 1) == first
    clock.now = first.until + 2  # the probe, sent when the hold ran out, fails
    probe = queue.hold("pacs", until=clock.now + 20, reason="down", began=first.until)
    assert (probe.failures, probe.until, probe.reason) == (2, clock.now + 20, "down")
    queue.unhold("pacs")
    clock.now += 1  # a new outage, its request sent before the last hold's end: it counts
    assert queue.hold("pacs", until=clock.now + 10, reason="y", began=sent).failures == 1


def test_a_failure_in_a_counted_outage_keeps_a_longer_wait_the_archive_asks_for(
    queue: Queue, clock: Clock
) -> None:
    """A request of the outage already counted that the archive answers with a longer
    ``Retry-After`` (a 503 asking for 600 s) is not counted, but its wait and reason are
    kept; a shorter one changes nothing."""
    sent = clock.now
    clock.now += 1
    first = queue.hold("pacs", until=clock.now + 30, reason="refused", began=sent)
    shorter = queue.hold("pacs", until=clock.now + 5, reason="busy", began=sent, asked=True)
    assert (shorter.failures, shorter.until, shorter.reason) == (1, first.until, "refused")
    longer = queue.hold("pacs", until=clock.now + 600, reason="busy", began=sent, asked=True)
    assert (longer.failures, longer.until, longer.reason) == (1, clock.now + 600, "busy")


def test_a_hold_that_ran_out_counts_the_next_failure_whenever_its_request_was_sent(
    queue: Queue, clock: Clock
) -> None:
    """A hold ran out and no probe cleared it yet: a request sent before its end that
    fails now (a new outage) counts and holds again (it is not taken for the old one)."""
    sent = clock.now
    first = queue.hold("pacs", until=clock.now + 10, reason="down", began=None)
    clock.now = first.until + 1
    again = queue.hold("pacs", until=clock.now + 20, reason="down again", began=sent)
    assert (again.failures, again.until, again.reason) == (2, clock.now + 20, "down again")


def test_status_queries(queue: Queue, clock: Clock) -> None:
    queue.enqueue([new("/d/a"), new("/d/b")])
    clock.now += 30
    queue.begin_settle([(queue.jobs()[0], "failed", "/f/a", {"reason": "broken"})])
    queue.finish(1, state="failed", was="settling")
    active = (*ACTIVE, "waiting")
    assert min(t.oldest for t in queue.tally(clock.now) if t.state in active) == clock.now - 30
    done = queue.run_tally(["src"], clock.now - 60)
    assert {s: n for s, (n, _size) in done.items() if s not in active} == {"failed": 1}
    [(_when, _source, _dest, path, state, _next, error)] = queue.recent_errors(5)
    assert (path, state) == ("/d/a", "failed")
    assert "broken" in error
    assert queue.forget_done(clock.now + 1) == 1
    assert queue.counts() == {"pending": 1}


def test_many_rows_claim_stays_cheap(sqlite_queue: SqliteQueue) -> None:
    """100,000 pending rows: a claim uses the indexes (measured loosely, not asserted in time)."""
    rows = [new(f"/d/{i}") for i in range(100_000)]
    sqlite_queue.enqueue(rows)
    sqlite_queue.set_classified(
        [
            Classification(j, "dicom", f"st{j.id % 100}", f"s{j.id}", "c")
            for j in sqlite_queue.jobs()
        ]
    )
    plan = (
        sqlite_queue._conn()
        .execute(
            "EXPLAIN QUERY PLAN SELECT id FROM files WHERE state = 'pending' AND destination = ? "
            "AND study_uid IS ? AND kind IS NOT NULL AND solo = 0 AND next_attempt_at <= ? "
            "ORDER BY id LIMIT 50",
            ("pacs", "st1", time.time()),
        )
        .fetchall()
    )
    assert any("USING INDEX" in str(step) for step in plan)
    batch = sqlite_queue.claim_batch(["pacs"], pick=pick_all, candidates=50, lease=60)
    assert len(batch) == 50
    assert {j.study_uid for j in batch} == {"st1"}


def test_adopt_follows_a_changed_destination_and_parks_removed_sources(queue: Queue) -> None:
    queue.enqueue([new("/d/a"), NewFile("old", "pacs", "/o/b", "b", 1, 1)])
    classify_all(queue)
    orphans = queue.adopt({"src": "archive2"})
    assert orphans == {"old": 1}
    # SQLite parks them; a shared queue leaves them to the nodes that have the source
    parked = "" if isinstance(queue, SqliteQueue) else "pacs"
    assert [j.destination for j in queue.jobs()] == ["archive2", parked]
    assert queue.claim_batch(["pacs"], pick=pick_all, candidates=10, lease=60) == []
    assert len(queue.claim_batch(["archive2"], pick=pick_all, candidates=10, lease=60)) == 1
    queue.adopt({"src": "archive2", "old": "pacs"})  # the source is back
    assert len(queue.claim_batch(["pacs"], pick=pick_all, candidates=10, lease=60)) == 1


def test_a_readonly_queue_reads_while_the_daemon_writes(
    sqlite_queue: SqliteQueue, tmp_path: Path
) -> None:
    sqlite_queue.enqueue([new("/d/a")])
    reader = open_readonly(tmp_path / "q.db")
    assert reader.counts() == {"pending": 1}
    sqlite_queue.enqueue([new("/d/b")])
    assert reader.counts() == {"pending": 2}
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader._conn().execute("DELETE FROM files")
    reader.close()
    with pytest.raises(QueueError, match="no queue"):
        open_readonly(tmp_path / "missing.db")


def test_keys_read_from_old_content_are_not_written_onto_new_content(queue: Queue) -> None:
    queue.enqueue([new("/d/a", size=10)])
    [old] = queue.unclassified(10)
    queue.retry_later([old.id], at=0, error={"reason": "x"}, was="pending")
    queue.enqueue([new("/d/a", size=20)])  # rewritten while its header was being read
    queue.set_classified([Classification(old, "dicom", "1.2", "old-sop", "c")])
    [job] = queue.jobs()
    assert job.kind is None  # read again, from the new content
    assert (job.attempts, job.first_try, job.error) == (0, None, None)  # a new job's record


def test_a_version_1_queue_is_migrated_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    q = SqliteQueue(path).open()
    q.enqueue([new("/d/a")])
    q.close()
    db = sqlite3.connect(path)  # make it look like a queue written before the rules existed
    db.execute("ALTER TABLE files DROP COLUMN changes")
    db.execute("ALTER TABLE files DROP COLUMN sidecars")
    db.execute("ALTER TABLE files DROP COLUMN rules_digest")
    db.execute("ALTER TABLE files DROP COLUMN made")
    db.execute("ALTER TABLE files DROP COLUMN lookup")
    db.execute("DROP TABLE lookups")
    db.execute("DROP TABLE made_studies")
    db.execute("DROP TABLE made_series")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    q = SqliteQueue(path).open()
    try:
        [job] = q.unclassified(10)
        changes = {"set": {"PatientID": "P1"}, "remove": []}
        used = (("/d/a.json", "PatientID: X"),)
        found = Classification(job, "dicom", "1.2", "1.3", "1.4", changes, used)
        q.set_classified([found])
        [job] = q.jobs()
        assert job.path == "/d/a"
        assert job.change_set() == changes
        assert job.sidecar_texts() == [("/d/a.json", "PatientID: X")]
        made = q.make_uids("src", "folder", None, "pdf", iter(["1.1", "1.2", "1.3"]).__next__)
        assert made == Made("1.1", "1.2", "1.3", 1, "folder")
    finally:
        q.close()


def test_a_version_3_queue_gets_the_lookup_column_and_cache(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "v3.db"
    q = SqliteQueue(path).open()
    q.enqueue([new("/d/a")])
    q.close()
    db = sqlite3.connect(path)  # a queue written before lookups existed
    db.execute("ALTER TABLE files DROP COLUMN lookup")
    db.execute("DROP TABLE lookups")
    db.execute("PRAGMA user_version = 3")
    db.commit()
    db.close()
    q = SqliteQueue(path, clock=clock).open()
    try:
        [job] = q.unclassified(10)
        record = '{"key": "k", "values": {"PatientID": "P1"}}'
        q.set_classified([Classification(job, "dicom", "1.2", "1.3", "1.4", lookup=record)])
        [job] = q.jobs()
        assert job.lookup == record and job.queued_at is not None
        q.cache_lookup("pacs", "k", "[]")
        assert q.cached_lookup("pacs", "k", clock.now) == "[]"
        assert q.cached_lookup("pacs", "k", clock.now + 1) is None  # older than asked for
        assert q.cached_lookup("other", "k", 0) is None
    finally:
        q.close()


def counter() -> Callable[[], str]:
    numbers = iter(range(1, 1000))
    return lambda: f"2.25.{next(numbers)}"


def test_made_uids_share_a_study_per_key_and_a_series_per_type(queue: Queue) -> None:
    new_uid = counter()
    a = queue.make_uids("src", "P1", None, "jpeg", new_uid)
    b = queue.make_uids("src", "P1", None, "jpeg", new_uid)
    c = queue.make_uids("src", "P1", None, "pdf", new_uid)
    d = queue.make_uids("src", "P2", None, "jpeg", new_uid)
    e = queue.make_uids("other", "P1", None, "jpeg", new_uid)
    assert a.study == b.study == c.study and len({a.study, d.study, e.study}) == 3
    assert a.series == b.series != c.series
    assert (a.number, b.number, c.number, d.number) == (1, 2, 1, 1)
    assert len({a.instance, b.instance, c.instance, d.instance, e.instance}) == 5
    given = queue.make_uids("src", None, "1.2.3", "jpeg", new_uid)
    assert given.study == "1.2.3" and given.number == 1


def test_made_uids_are_stored_with_the_row_and_survive_a_replan(queue: Queue) -> None:
    queue.enqueue([new("/d/a.pdf")])
    [job] = queue.unclassified(10)
    made = queue.make_uids("src", "k", None, "pdf", counter())
    queue.set_classified(
        [Classification(job, "pdf", made.study, made.instance, "1.4", None, None, "old", made)]
    )
    assert queue.replan(job.source, "new") == 1
    [again] = queue.unclassified(10)
    assert again.made_uids() == made  # read again with the new rules, the same instance
    queue.enqueue([replace(new("/d/a.pdf"), size=2)])  # new content: a new instance
    [changed] = queue.unclassified(10)
    assert changed.made_uids() is None


def test_files_read_with_other_rules_are_read_again(queue: Queue) -> None:
    queue.enqueue([new("/d/a"), new("/d/b")])
    a, b = queue.unclassified(10)
    changes = {"set": {"PatientID": "X"}, "remove": []}
    queue.set_classified([Classification(a, "dicom", "1.2", "1.3", "1.4", changes, (), "old")])
    queue.set_classified([Classification(b, "dicom", "1.2", "1.5", "1.4", None, (), "new")])
    assert queue.replan(a.source, "new") == 1  # a was read with the old rules
    [again] = queue.unclassified(10)
    assert again.path == "/d/a" and again.changes is None
    assert queue.replan(a.source, "new") == 0


def test_the_sidecar_snapshot_is_taken_only_for_new_or_changed_rows(queue: Queue) -> None:
    calls: list[str] = []

    def snapshot() -> str:
        calls.append("read")
        return "[]"

    def found(mtime: int) -> NewFile:
        return dataclasses.replace(new("/d/a", mtime=mtime), snapshot=snapshot)

    queue.enqueue([found(1)])
    queue.enqueue([found(1)])  # a rescan finds it again: already queued
    assert calls == ["read"]
    queue.enqueue([found(2)])  # rewritten while queued
    assert calls == ["read", "read"]

    def not_ready() -> str:
        raise SidecarNotReady("changing")

    queue.enqueue([dataclasses.replace(new("/d/b"), snapshot=not_ready)])
    assert [j.path for j in queue.jobs()] == ["/d/a"]  # b waits for the next scan


def test_parked_and_waiting_rows_are_not_read_again_at_once(queue: Queue, clock: Clock) -> None:
    queue.enqueue([new("/d/a"), new("/d/b"), replace(new("/d/c"), source="gone")])
    queue.adopt({"src": "pacs"})  # source "gone" is no longer configured: parked
    a, _ = queue.unclassified(10)  # c is parked: not read
    queue.retry_later([a.id], at=clock.now + 60, error={"reason": "unreadable"}, was="pending")
    assert [j.path for j in queue.unclassified(10)] == ["/d/b"]  # no hot loop on a or c
    clock.now += 61
    assert [j.path for j in queue.unclassified(10)] == ["/d/a", "/d/b"]


def test_forget_done_keeps_the_record_of_files_stored_in_place(queue: Queue, clock: Clock) -> None:
    """``stowd migrate --keep`` rows (outcome ``kept``) are what lets a re-run skip the files
    stored before: housekeeping must not delete them.  The daemon's rows still go, and so
    does a kept row that a later one of the same path replaced (the file changed and was
    stored again): the record stays one row per file."""
    queue.enqueue([new("/d/moved"), new("/old/kept"), new("/old/failed"), new("/old/changed")])
    moved, kept, failed, changed = queue.jobs()
    queue.begin_settle([(moved, "sent", "/sent/moved", None)])
    queue.finish(moved.id, state="sent", was="settling")
    queue.finish_kept([(kept.id, "sent", None), (changed.id, "sent", None)], was="pending")
    queue.finish_kept([(failed.id, "failed", {"reason": "not DICOM"})], was="pending")
    queue.enqueue([new("/old/changed", size=20)])
    queue.finish_kept([(queue.jobs("pending")[0].id, "sent", None)], was="pending")
    clock.now += 100
    assert queue.forget_done(clock.now) == 3  # moved, failed (tried again by a re-run), changed
    assert [(j.path, j.size) for j in queue.jobs()] == [("/old/kept", 10), ("/old/changed", 20)]
    assert queue.finished_before([new("/old/kept"), new("/old/changed", size=20)]) == {
        "/old/kept",
        "/old/changed",
    }


def test_reclaim_returns_expired_claims_that_no_worker_holds(queue: Queue, clock: Clock) -> None:
    queue.enqueue([new("/d/a"), new("/d/b"), new("/d/c")])
    classify_all(queue)
    a, b, c = queue.claim_batch(["pacs"], pick=pick_all, candidates=10, lease=60)
    pass_time(queue, clock, 30)
    assert queue.reclaim(held=set()) == 0  # the lease runs: a claim just made is left alone
    pass_time(queue, clock, 31)
    assert queue.reclaim(held={a.id}) == 2  # a's upload still runs (its worker holds it)
    assert [j.id for j in queue.jobs("claimed")] == [a.id]
    assert [j.id for j in queue.jobs("pending")] == [b.id, c.id]
    assert queue.reclaim(held=set()) == 1  # its worker died: a goes back too
    assert queue.counts() == {"pending": 3}


def limit_size(queue: Queue) -> None:
    """Let the queue's database grow no more: its next write fails as on a full disk."""
    db = queue._conn()
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages}")


def test_a_full_queue_raises_queue_full_and_logs_no_queued_file(
    sqlite_queue: SqliteQueue, caplog: pytest.LogCaptureFixture
) -> None:
    sqlite_queue.enqueue([new("/d/a")])
    limit_size(sqlite_queue)
    many = [new(f"/d/{'x' * 200}{n}") for n in range(200)]  # more than the free pages hold
    caplog.set_level("INFO", logger="stowd.queue")
    with pytest.raises(QueueFull, match="its disk is full"):
        sqlite_queue.enqueue(many)
    assert "queued" not in caplog.text  # the insert was rolled back: nothing was queued
    assert sqlite_queue.counts() == {"pending": 1}
    sqlite_queue._conn().execute("PRAGMA max_page_count = 1073741823")
    assert sqlite_queue.enqueue(many) == 200
    assert caplog.text.count("queued /d/x") == 200  # once each, after the commit
