"""Several nodes on one PostgreSQL queue (issue 23's fleet): a shared tree queued once, UIDs
made once across nodes, and a node never changing a row another node holds.  The queue's
own behaviour on one node is tested, on both backends, by the other queue test files."""

from __future__ import annotations

import os
import threading
from typing import Any

import psycopg
import pytest
from harness import Clock
from postgres import PASSWORD, PostgresCluster, pass_time

from stowd.pipeline.queue import Classification, Job, NewFile, Queue

pytestmark = pytest.mark.integration


def new(path: str, size: int = 10) -> NewFile:
    return NewFile("src", "pacs", path, os.path.basename(path), size, 1)


def pick_all(_dest: str, jobs: list[Job]) -> list[Job]:
    return jobs


def claim(queue: Queue, candidates: int = 10, lease: float = 60) -> list[Job]:
    return queue.claim_batch(["pacs"], pick=pick_all, candidates=candidates, lease=lease)


def classify(queue: Queue, count: int) -> None:
    jobs = queue.unclassified(count)
    queue.set_classified([Classification(j, "dicom", "st", f"sop{j.id}", "1.2") for j in jobs])


def test_a_path_queued_by_another_node_meanwhile_is_skipped_and_the_rest_queued(
    postgres_cluster: PostgresCluster, pg_database: str, nodes: tuple[Queue, Queue]
) -> None:
    """Node B's transaction holds a new row of ``/t/x`` (not committed) while node A queues
    ``/t/x`` and ``/t/y``: A waits for it, then skips ``/t/x`` and queues ``/t/y``."""
    a, b = nodes
    b.enqueue([new("/t/other")])  # the row B's open transaction copies
    other = psycopg.connect(postgres_cluster.url(pg_database), password=PASSWORD, autocommit=False)
    try:
        other.execute(
            "INSERT INTO files (source, destination, path, rel, size, mtime_ns, state, "
            "queued_at) VALUES ('src', 'pacs', '/t/x', 'x', 10, 1, 'pending', 0)"
        )
        done: list[int | BaseException] = []

        def queue_both() -> None:
            try:
                done.append(a.enqueue([new("/t/x"), new("/t/y")]))
            except BaseException as exc:
                done.append(exc)
            finally:
                a.release_connection()

        thread = threading.Thread(target=queue_both)
        thread.start()
        _until_it_waits_for_a_lock(postgres_cluster, pg_database, thread, done)
        other.commit()
        thread.join(30)
    finally:
        other.close()
    assert done == [1]
    assert sorted(j.path for j in a.jobs("pending")) == ["/t/other", "/t/x", "/t/y"]


@pytest.mark.timeout(300)
def test_two_nodes_scanning_one_tree_queue_each_file_once(nodes: tuple[Queue, Queue]) -> None:
    files = [new(f"/tree/f{i:04d}") for i in range(600)]
    totals: list[int] = []
    errors: list[BaseException] = []
    for round_ in range(5):
        part = files[round_ * 120 : (round_ + 1) * 120]
        start = threading.Barrier(2)

        def scan(
            queue: Queue, part: list[NewFile] = part, start: threading.Barrier = start
        ) -> None:
            try:
                start.wait()
                totals.append(queue.enqueue(part))
            except BaseException as exc:
                errors.append(exc)
            finally:
                queue.release_connection()

        threads = [threading.Thread(target=scan, args=(q,)) for q in nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert errors == []
    assert sum(totals) == 600  # each file counted by the node that queued it
    a, _ = nodes
    assert a.counts() == {"pending": 600}
    assert len({j.path for j in a.jobs()}) == 600


@pytest.mark.timeout(300)
def test_uids_made_for_one_study_by_two_nodes_at_once_are_one_study_and_series(
    nodes: tuple[Queue, Queue],
) -> None:
    made: list[tuple[str, str, str, int]] = []
    errors: list[BaseException] = []
    counter = iter(range(1_000_000))
    lock = threading.Lock()

    def uid() -> str:
        with lock:
            return f"2.25.{next(counter)}"

    for round_ in range(10):
        start = threading.Barrier(2)

        def make(queue: Queue, key: str = f"k{round_}", start: threading.Barrier = start) -> None:
            try:
                start.wait()
                for _ in range(5):
                    m = queue.make_uids("src", key, None, "pdf", uid)
                    made.append((key, m.study, m.series, m.number))
            except BaseException as exc:
                errors.append(exc)
            finally:
                queue.release_connection()

        threads = [threading.Thread(target=make, args=(q,)) for q in nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert errors == []
    for round_ in range(10):
        mine = [m for m in made if m[0] == f"k{round_}"]
        assert len({m[1] for m in mine}) == 1  # one StudyInstanceUID
        assert len({m[2] for m in mine}) == 1  # one SeriesInstanceUID
        assert sorted(m[3] for m in mine) == list(range(1, 11))  # each number once


def test_a_node_never_changes_rows_another_node_took_over(
    nodes: tuple[Queue, Queue], clock: Clock
) -> None:
    a, b = nodes
    a.enqueue([new(f"/t/f{i}") for i in range(3)])
    classify(a, 3)
    batch = claim(a, lease=60)
    pass_time(a, clock, 61)  # node-a lost the database past its lease: node-b takes over
    assert b.reclaim(set()) == 3
    theirs = claim(b)
    assert {j.id for j in theirs} == {j.id for j in batch}
    ids = [j.id for j in batch]
    # what node-a's worker would still do with its old batch: nothing of it is recorded
    theirs_now = dict.fromkeys(ids, "node-b")
    assert a.begin_settle([(j, "sent", f"/sent/{j.rel}", None) for j in batch]) == theirs_now
    assert a.release(ids) == theirs_now
    assert a.retry_later(ids, at=clock.now + 10, error={"why": "x"}) == theirs_now
    assert a.isolate(ids) == theirs_now
    assert a.finish_many([(i, "gone") for i in ids], was="claimed") == theirs_now
    assert a.finish_kept([(i, "sent", None) for i in ids]) == theirs_now
    rows = b.jobs()
    assert [(j.id, j.error) for j in rows] == [(j.id, None) for j in batch]
    assert b.counts() == {"claimed": 3}
    # node-b's own settle is recorded as ever
    assert b.begin_settle([(j, "sent", f"/sent/{j.rel}", None) for j in theirs]) == {}
    b.finish_many([(i, "sent") for i in ids])
    assert b.counts() == {"sent": 3}


def test_a_reader_finding_a_file_gone_leaves_a_row_another_node_claimed(
    nodes: tuple[Queue, Queue],
) -> None:
    """Node B read a pending row; node A claimed it, sent it and moved its file meanwhile:
    B, finding the file vanished, must not mark A's row ``gone``."""
    a, b = nodes
    a.enqueue([new("/t/x")])
    classify(a, 1)
    [job] = claim(a)
    assert b.finish(job.id, state="gone", was="pending") == {job.id: "node-a"}
    assert a.counts() == {"claimed": 1}
    assert a.begin_settle([(job, "sent", "/sent/x", None)]) == {}
    assert b.finish(job.id, state="gone", was="pending") == {job.id: "node-a"}
    assert a.counts() == {"settling": 1}
    a.finish(job.id, state="sent", was="settling")
    assert a.counts() == {"sent": 1}


def test_a_pending_row_is_anyone_s_to_finish(nodes: tuple[Queue, Queue]) -> None:
    """A file that vanished before any node claimed it is forgotten by the node that
    notices (the reader of either)."""
    a, b = nodes
    a.enqueue([new("/t/x")])
    [job] = a.jobs()
    assert b.finish(job.id, state="gone", was="pending") == {}
    assert a.counts() == {"gone": 1}


def test_a_file_rewritten_while_another_node_claims_it_leaves_that_claim_alone(
    postgres_cluster: PostgresCluster, pg_database: str, nodes: tuple[Queue, Queue]
) -> None:
    """Node A finds ``/t/x`` rewritten (other size) while node B is claiming its pending row
    (B's claim locked the row, not committed yet): A's update of the pending row waits for
    B, then must not rewrite the row B now holds.  Else B, uploading the old content, would
    settle a row saying it sent the new one, and the new content would count as sent."""
    a, b = nodes
    a.enqueue([new("/t/x", size=10)])
    other = psycopg.connect(postgres_cluster.url(pg_database), password=PASSWORD, autocommit=False)
    try:
        other.execute("SELECT id FROM files WHERE path = '/t/x' FOR UPDATE")
        done: list[int | BaseException] = []

        def rescan() -> None:
            try:
                done.append(a.enqueue([new("/t/x", size=20)]))
            except BaseException as exc:
                done.append(exc)
            finally:
                a.release_connection()

        thread = threading.Thread(target=rescan)
        thread.start()
        _until_it_waits_for_a_lock(postgres_cluster, pg_database, thread, done)
        other.execute(
            "UPDATE files SET state = 'claimed', node = 'node-b', lease_until = "
            "EXTRACT(EPOCH FROM clock_timestamp()) + 60 WHERE path = '/t/x'"
        )
        other.commit()
        thread.join(30)
    finally:
        other.close()
    assert done == [0]
    [held] = b.jobs("claimed")
    assert (held.path, held.size) == ("/t/x", 10)  # as B claimed it


def test_a_node_without_a_source_neither_parks_nor_claims_its_files(
    nodes: tuple[Queue, Queue],
) -> None:
    """Node B's config lacks source ``mr`` that node A has (a config change rolled out one
    node at a time, or ``stowd migrate``'s own source): B starting (or reloading) must not
    park A's queued files, which A would then never send (nothing un-parks them until A
    restarts), and B must never claim them (it cannot know where they go)."""
    a, b = nodes
    a.adopt({"src": "pacs", "mr": "pacs"})
    a.enqueue([new("/t/ct"), NewFile("mr", "pacs", "/t/mr", "mr", 10, 1)])
    assert b.adopt({"src": "pacs"}) == {"mr": 1}  # B says so
    assert [j.path for j in b.unclassified(10)] == ["/t/ct"]
    assert [j.path for j in a.unclassified(10)] == ["/t/mr"]  # ct: B reads it (a read lease)
    classify(a, 10)
    classify(b, 10)
    assert [j.path for j in claim(b)] == ["/t/ct"]
    assert [j.path for j in claim(a)] == ["/t/mr"]


def _until_it_waits_for_a_lock(
    cluster: PostgresCluster, database: str, thread: threading.Thread, done: list[Any]
) -> None:
    """Wait until a session of ``database`` waits for a lock (``thread``'s, held up by the
    test's open transaction); ``thread`` must not end first (``done``: what it did)."""
    waiting = (
        "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'"
    )
    while not cluster.admin(waiting, (database,))[0][0]:
        thread.join(0.05)
        assert thread.is_alive(), done
