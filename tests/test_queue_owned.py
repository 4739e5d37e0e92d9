"""A node changes a row only while it is still its own (issue 23's review): every change of a
claimed or settling row (settle, finish, retry, isolate, release) is made only while the row
is in the state the node knows it in and, on a shared queue, still the node's; the methods
say which rows it lost, and the worker moves none of their files and counts none of them.

The reviewer's sequence: node A's lease runs out while it uploads, node B takes the files
over and claims them; A's late ``begin_settle`` overwrote B's claim, A moved the files and
marked them sent, then B's ``begin_settle`` turned those sent rows back into settling rows
with new targets: uploaded twice (acceptable: at least once), recorded twice, and B moving
files already gone (not acceptable).  Reproduced here on the queue (two ``Queue`` objects
as two nodes of one PostgreSQL database, leases aged with ``pass_time``: the database's
clock cannot be moved) and with two real workers."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from dicomgen import make_study
from harness import Clock, drop_source
from postgres import PostgresCluster, node_config, pass_time
from postgres import queue_backend as queue_backend  # noqa: PLC0414 - the fixture, both backends
from test_worker import sop_uids_in, stow_json

from stowd.config.model import BatchLimits, Destination
from stowd.dicomweb.stow import StowClient
from stowd.pipeline import counters
from stowd.pipeline.queue import Classification, Job, NewFile, Queue, open_queue
from stowd.pipeline.settle import Decision, settle_all
from stowd.pipeline.watch import Watcher
from stowd.pipeline.worker import Worker

LEASE = 60.0


def new(path: str) -> NewFile:
    return NewFile("src", "pacs", path, path.rsplit("/", 1)[-1], 10, 1)


def claim(queue: Queue) -> list[Job]:
    return queue.claim_batch(["pacs"], pick=lambda _d, js: js, candidates=10, lease=LEASE)


def classify(queue: Queue) -> None:
    jobs = queue.unclassified(100)
    queue.set_classified([Classification(j, "dicom", "st", f"sop{j.id}", "1.2") for j in jobs])


def plans(jobs: list[Job], where: str) -> list[tuple[Job, str, str | None, None]]:
    return [(j, "sent", f"{where}/{j.rel}", None) for j in jobs]


def rows(queue: Queue) -> list[tuple[str, str | None]]:
    return [(j.state, j.target) for j in queue.jobs()]


# -- the queue ---------------------------------------------------------------------------
@pytest.mark.integration
def test_a_late_settle_of_a_claim_taken_over_changes_nothing_and_says_whose_it_is(
    nodes: tuple[Queue, Queue], clock: Clock
) -> None:
    """The reviewer's sequence, at the queue: neither node's late settle lands on a row the
    other holds or finished; each learns which rows it lost, and to which node."""
    a, b = nodes
    a.enqueue([new(f"/t/f{i}") for i in range(3)])
    classify(a)
    mine = claim(a)
    pass_time(a, clock, LEASE + 1)  # A's upload outlived its lease: B takes the files over
    assert b.reclaim(set()) == 3
    theirs = claim(b)
    assert {j.id for j in theirs} == {j.id for j in mine}
    ids = {j.id: "node-b" for j in mine}
    assert a.begin_settle(plans(mine, "/a-sent")) == ids  # A's late settle: lost to B
    assert rows(a) == [("claimed", None)] * 3  # B's claim, untouched
    assert b.begin_settle(plans(theirs, "/b-sent")) == {}
    assert b.finish_many([(j.id, "sent") for j in theirs]) == {}
    assert rows(a) == [("sent", f"/b-sent/{j.rel}") for j in mine]
    # and the other way round: a claim of B's that A took over and finished meanwhile
    b.enqueue([new("/t/g")])
    classify(b)
    [late] = claim(b)
    pass_time(b, clock, LEASE + 1)
    assert a.reclaim(set()) == 1
    [took] = claim(a)
    assert a.begin_settle(plans([took], "/a-sent")) == {}
    assert a.finish_many([(took.id, "sent")]) == {}
    assert b.begin_settle(plans([late], "/b-sent")) == {late.id: "node-a"}  # sent stays sent
    assert b.finish_many([(late.id, "failed")]) == {late.id: "node-a"}
    assert [(j.state, j.target) for j in b.jobs() if j.id == late.id] == [("sent", "/a-sent/g")]
    assert b.counts() == {"sent": 4}


@pytest.mark.integration
def test_a_claim_given_back_after_its_lease_is_no_longer_its_old_node_s(
    nodes: tuple[Queue, Queue], clock: Clock
) -> None:
    """B returned A's expired claims to pending and has not claimed them yet: A's late
    changes, which all start from its claim, change nothing (a pending row is anyone's to
    read, but not a claim's to settle, finish, retry, isolate or release)."""
    a, b = nodes
    a.enqueue([new(f"/t/f{i}") for i in range(2)])
    classify(a)
    mine = claim(a)
    ids = [j.id for j in mine]
    pass_time(a, clock, LEASE + 1)
    assert b.reclaim(set()) == 2
    nobody = dict.fromkeys(ids, "")
    assert a.begin_settle(plans(mine, "/a-sent")) == nobody
    assert a.retry_later(ids, at=clock.now + 10, error={"reason": "x"}) == nobody
    assert a.isolate(ids) == nobody
    assert a.release(ids, not_before=clock.now + 999) == nobody
    assert a.finish(ids[0], state="gone", was="claimed") == {ids[0]: ""}
    assert a.finish_kept([(i, "sent", None) for i in ids]) == nobody
    assert [(j.state, j.attempts, j.error) for j in a.jobs()] == [("pending", 0, None)] * 2
    assert [j.id for j in claim(b)] == ids  # ready at once, for whichever node claims next


@pytest.mark.integration
def test_a_move_taken_over_after_its_settle_lease_is_recorded_by_the_node_that_took_it(
    nodes: tuple[Queue, Queue], clock: Clock
) -> None:
    """A recorded its moves, then was silent past their own lease: B took the settling rows
    over (its repair finishes them).  A's late ``finish_many`` records nothing of them."""
    a, b = nodes
    a.enqueue([new("/t/f")])
    classify(a)
    [job] = claim(a)
    assert a.begin_settle(plans([job], "/a-sent")) == {}
    pass_time(a, clock, 10 * 3600)
    b.reclaim(set())
    assert a.finish_many([(job.id, "sent")]) == {job.id: "node-b"}
    assert [(j.state, j.target) for j in b.settling()] == [("settling", "/a-sent/f")]


def test_each_change_is_made_only_from_the_state_the_row_is_known_in(
    queue: Queue, clock: Clock
) -> None:
    """Both backends (SQLite's one daemon too): a row already settled or finished is never
    settled again, nor finished twice; a reader's pending row is settled as before."""
    queue.enqueue([new("/t/a"), new("/t/b")])
    classify(queue)
    [read] = [j for j in queue.jobs() if j.path == "/t/b"]
    [job] = queue.claim_batch(["pacs"], pick=lambda _d, js: js[:1], candidates=1, lease=LEASE)
    assert job.state == "claimed"
    assert queue.begin_settle(plans([job], "/sent")) == {}
    assert queue.begin_settle(plans([job], "/again")) == {job.id: ""}  # settling already
    assert queue.finish_many([(job.id, "sent")]) == {}
    assert queue.finish_many([(job.id, "failed")]) == {job.id: ""}
    assert queue.begin_settle(plans([job], "/again")) == {job.id: ""}
    assert queue.release([job.id]) == {job.id: ""}
    assert [(j.state, j.target) for j in queue.jobs() if j.id == job.id] == [("sent", "/sent/a")]
    assert read.state == "pending"  # the reader's failures and vanished files, as before
    assert queue.begin_settle([(read, "failed", "/failed/b", {"reason": "bad"})]) == {}
    assert queue.finish(read.id, state="failed", was="settling") == {}
    assert queue.counts() == {"sent": 1, "failed": 1}


def test_settle_all_moves_no_file_of_a_row_that_is_not_its_own(
    queue: Queue, tmp_path: Path
) -> None:
    """The settle path: a decision on a row this node lost moves nothing and is reported
    (``Settled.lost``); the others move as ever."""
    source = drop_source(tmp_path)
    source.watch.mkdir()
    paths = [source.watch / n for n in ("mine.dcm", "lost.dcm")]
    for p in paths:
        p.write_bytes(b"x")
    queue.enqueue([NewFile("ct", "pacs", str(p), p.name, 1, p.stat().st_mtime_ns) for p in paths])
    classify(queue)
    claimed = queue.claim_batch(["pacs"], pick=lambda _d, js: js, candidates=10, lease=LEASE)
    mine, lost = sorted(claimed, key=lambda j: j.path != str(paths[0]))
    queue.release([lost.id])  # no longer this claim's: as if taken over
    results = settle_all(queue, [Decision(j, source, "sent") for j in (mine, lost)])
    assert {(r.decision.job.id, r.target, r.lost) for r in results} == {
        (mine.id, source.sent / "mine.dcm", None),
        (lost.id, None, ""),
    }
    assert paths[1].exists() and not (source.sent / "lost.dcm").exists()
    assert {j.path: j.state for j in queue.jobs()} == {
        str(paths[0]): "sent",
        str(paths[1]): "pending",
    }


# -- two workers -------------------------------------------------------------------------
def _sent_total(source: str) -> float:
    labels = {"source": source, "destination": "pacs"}
    return counters.REGISTRY.get_sample_value("stowd_files_sent_total", labels) or 0.0


class TwoNodes:
    """Node A's and node B's workers on one PostgreSQL queue, one drop folder and one archive
    (scripted: each node's request is answered when the test says; the archive stores what
    it is sent).  While A's request is in flight, A's lease runs out and B takes its files
    over and sends them; A's answer comes while B's request is in flight, B's once A settled
    what it still could (``a_settled``)."""

    def __init__(self, cluster: PostgresCluster, database: str, tmp_path: Path, clock: Clock):
        self.cluster, self.database, self.tmp_path, self.clock = cluster, database, tmp_path, clock
        self.source = drop_source(tmp_path)
        self.source.watch.mkdir()
        self.dest = Destination("pacs", "http://archive.test/dicom-web", BatchLimits(max_files=10))
        self.stop = threading.Event()
        self.b_in_flight, self.a_settled = threading.Event(), threading.Event()
        self.stored: list[tuple[str, list[str]]] = []  # (node, SOPInstanceUIDs) per request
        self.errors: list[BaseException] = []
        self.b_thread = threading.Thread(target=self._drain_b, name="node-b")
        self.opened: list[tuple[Queue, StowClient]] = []
        self.a = self._worker("node-a", self._archive_a)
        self.b = self._worker("node-b", self._archive_b)

    def _worker(self, node: str, handler: Callable[[httpx.Request], httpx.Response]) -> Worker:
        made = node_config(self.cluster, self.database, self.tmp_path, node)
        config = dataclasses.replace(made, sources=(self.source,), destinations={"pacs": self.dest})
        queue = open_queue(config, clock=self.clock).open()
        client = StowClient(self.dest, stop=self.stop, transport=httpx.MockTransport(handler))
        self.opened.append((queue, client))
        return Worker(config, queue, self.dest, client, self.stop, clock=self.clock)

    def _archive_a(self, request: httpx.Request) -> httpx.Response:
        uids = sop_uids_in(request)
        self.stored.append(("node-a", uids))
        pass_time(self.a.queue, self.clock, 10 * 3600)  # A's upload outlives its lease
        assert self.b.queue.reclaim(set()) == 3
        self.b_thread.start()
        assert self.b_in_flight.wait(60)
        return httpx.Response(200, json=stow_json(uids))

    def _archive_b(self, request: httpx.Request) -> httpx.Response:
        uids = sop_uids_in(request)
        self.stored.append(("node-b", uids))
        self.b_in_flight.set()
        assert self.a_settled.wait(60)
        return httpx.Response(200, json=stow_json(uids))

    def _drain_b(self) -> None:
        try:
            _drain(self.b)
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            self.b.queue.release_connection()

    def run(self) -> None:
        """Node A reads and sends the files; the rest happens in the archive's answers."""
        Watcher(self.source, "pacs", self.a.queue.enqueue, clock=lambda: self.clock.now + 60).scan()
        _drain(self.a)
        self.a_settled.set()
        self.b_thread.join(60)
        assert self.errors == []

    def close(self) -> None:
        self.stop.set()
        self.a_settled.set()
        for worker in (self.a, self.b):
            worker._settled_behind()  # its settle thread ends, with its connection
        for queue, client in self.opened:
            client.close()
            queue.close()


def _drain(worker: Worker, rounds: int = 20) -> None:
    for _ in range(rounds):
        if not worker.step():
            return


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_worker_whose_claims_were_taken_over_during_its_upload_moves_none_of_them(
    postgres_cluster: PostgresCluster,
    pg_database: str,
    tmp_path: Path,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The reviewer's sequence with two real workers: while node A uploads, its lease runs
    out and node B takes the files over and uploads them too (the archive is sent them
    twice: at least once).  A's answer comes while B's upload is in flight; then B's.
    Each file is moved once, by B, and recorded sent once, by B; A moves nothing, counts
    nothing and says once that node B took its files over."""
    nodes = TwoNodes(postgres_cluster, pg_database, tmp_path, clock)
    source = nodes.source
    try:
        make_study(source.watch / "s", 3)
        sent_before = _sent_total("ct")
        with caplog.at_level(logging.INFO):
            nodes.run()
        assert [node for node, _ in nodes.stored] == ["node-a", "node-b"]
        assert sorted(nodes.stored[0][1]) == sorted(nodes.stored[1][1])
        moved = {str(p) for p in source.sent.rglob("*") if p.is_file()}
        assert len(moved) == 3 and not any("~" in n for n in moved)  # each moved once
        assert not [p for p in source.watch.rglob("*") if p.is_file()]
        assert nodes.a.queue.counts() == {"sent": 3}
        assert {j.target for j in nodes.a.queue.jobs()} == moved
        assert _sent_total("ct") - sent_before == 3  # B's three, none of A's
        said = [r.getMessage() for r in caplog.records if r.name == "stowd.settle"]
        assert said == [
            "node node-b took over 3 file(s) of this node (node-a) after its lease ran out; "
            "this node leaves them to it"
        ]
        assert not [r for r in caplog.records if "vanished" in r.getMessage()]
    finally:
        nodes.close()


MANY = 70_000  # ids: more than a PostgreSQL statement's 65,535 parameters (SQLite's: 32,766)


def hold_many(queue: Queue) -> list[Job]:
    """``MANY`` rows of one study, claimed by ``queue`` in one batch."""
    for at in range(0, MANY, 10_000):
        queue.enqueue([new(f"/d/many/f{i:05d}") for i in range(at, at + 10_000)])
    queue.set_classified(
        [Classification(j, "dicom", "st", f"sop{j.id}", "1.2") for j in queue.unclassified(MANY)]
    )
    batch = queue.claim_batch(["pacs"], pick=lambda _d, js: js, candidates=MANY, lease=LEASE)
    assert len(batch) == MANY
    return batch


@pytest.mark.timeout(600)
def test_a_node_holding_more_ids_than_a_statement_takes_changes_them_all(
    queue: Queue, clock: Clock
) -> None:
    """Renew, release (its check of what is still the node's), settle and finish of more
    claims than one statement has parameters for: each id is one parameter no more."""
    batch = hold_many(queue)
    ids = [j.id for j in batch]
    assert queue.renew(ids, clock.now + 600) == MANY
    assert queue.release(ids) == {}
    assert queue.counts() == {"pending": MANY}
    batch = queue.claim_batch(["pacs"], pick=lambda _d, js: js, candidates=MANY, lease=LEASE)
    assert queue.begin_settle(plans(batch, "/sent")) == {}
    assert len(queue.settling()) == MANY
    assert queue.finish_many([(j.id, "sent") for j in batch]) == {}
    assert queue.counts() == {"sent": MANY}
    assert queue.jobs("sent")[-1].target == f"/sent/{batch[-1].rel}"
