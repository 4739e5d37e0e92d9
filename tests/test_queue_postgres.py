"""What only the PostgreSQL queue does: several nodes on one database (claims that never
overlap, leases, takeover, a node's own recovery), a lost connection, paths that are not
UTF-8 in TEXT, its schema version, and TLS with ``sslmode=verify-full``.  The behaviour both
backends share is tested by the other queue test files, on both."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import Clock, wait_for
from postgres import PostgresCluster, node_config, pass_time

from stowd.config.model import DEFAULT_LEASE, Config, Retry
from stowd.errors import QueueError, QueueLockedError
from stowd.pipeline.filing import Filing
from stowd.pipeline.queue import (
    Classification,
    Job,
    NewFile,
    Queue,
    open_queue,
    open_status,
    read_active_of,
)
from stowd.pipeline.queue.postgres import (
    ESCAPED,
    SCHEMA_VERSION,
    SETTLE_LEASE,
    TALLY_SCHEMA_3,
    PostgresQueue,
    link_watch,
)

pytestmark = pytest.mark.integration


def new(path: str, size: int = 10) -> NewFile:
    return NewFile("src", "pacs", path, os.path.basename(path), size, 1)


def pick_all(_dest: str, jobs: list[Job]) -> list[Job]:
    return jobs


def fill(queue: Queue, count: int, *, studies: int = 1) -> None:
    queue.enqueue([new(f"/d/f{i:05d}") for i in range(count)])
    jobs = queue.unclassified(count)
    queue.set_classified(
        [Classification(j, "dicom", f"st{j.id % studies}", f"sop{j.id}", "1.2") for j in jobs]
    )


def claim(queue: Queue, candidates: int = 10, lease: float = 60) -> list[Job]:
    return queue.claim_batch(["pacs"], pick=pick_all, candidates=candidates, lease=lease)


@pytest.mark.timeout(300)
def test_two_nodes_claiming_at_once_never_claim_the_same_row(nodes: tuple[Queue, Queue]) -> None:
    a, b = nodes
    fill(a, 2000, studies=40)
    taken: dict[str, list[int]] = {"a": [], "b": []}
    errors: list[BaseException] = []

    def drain(name: str, queue: Queue) -> None:
        try:
            for _ in range(5000):
                batch = claim(queue, candidates=7)
                if not batch and not queue.counts().get("pending"):
                    return
                taken[name] += [j.id for j in batch]
                queue.finish_many([(j.id, "sent") for j in batch], was="claimed")
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)
        finally:
            queue.release_connection()

    threads = [threading.Thread(target=drain, args=(n, q)) for n, q in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors
    assert not set(taken["a"]) & set(taken["b"])
    assert len(taken["a"]) + len(taken["b"]) == 2000
    assert taken["a"] and taken["b"], "both nodes did part of the work"
    assert a.counts() == {"sent": 2000}  # the counts stay exact with two writers


def test_a_claim_records_its_node_and_lease_and_renew_extends_it(
    nodes: tuple[Queue, Queue], clock: Clock
) -> None:
    a, b = nodes
    fill(a, 3)
    batch = claim(a, lease=60)
    ids = [j.id for j in batch]
    assert b.renew(ids, clock.now + 600) == 0  # not node-b's claims
    assert a.renew(ids, clock.now + 600) == 3
    pass_time(a, clock, 120)  # past the first lease, within the renewed one
    assert b.reclaim(set()) == 0
    assert a.counts() == {"claimed": 3}


def test_another_node_takes_over_claims_whose_lease_expired(
    nodes: tuple[Queue, Queue], clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = nodes
    fill(a, 4)
    claim(a, lease=60)
    assert b.reclaim(set()) == 0  # node-a's lease runs
    pass_time(a, clock, 61)
    with caplog.at_level(logging.WARNING, logger="stowd.queue"):
        assert b.reclaim(set()) == 4
    assert "took over 4 claims of node node-a" in caplog.text
    assert b.counts() == {"pending": 4}
    assert len(claim(b)) == 4
    assert b.counts() == {"claimed": 4}


def test_settling_rows_of_a_node_whose_lease_expired_are_taken_over(
    nodes: tuple[Queue, Queue], clock: Clock
) -> None:
    a, b = nodes
    fill(a, 2)
    batch = claim(a, lease=60)
    a.begin_settle([(j, "sent", f"/sent/{j.rel}", None) for j in batch])
    assert [j.id for j in a.settling()] == [j.id for j in batch]
    assert b.settling() == []
    pass_time(a, clock, SETTLE_LEASE + 1)  # the moves' own lease ran out too
    b.reclaim(set())
    assert sorted(j.id for j in b.settling()) == sorted(j.id for j in batch)
    assert a.settling() == []


def test_a_node_takes_over_no_move_of_a_source_its_config_lacks(
    nodes: tuple[Queue, Queue],
    *,
    clock: Clock,
    postgres_cluster: PostgresCluster,
    pg_database: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A dead node's settling rows of a source this node lacks (a config rolled out one node
    at a time, a ``stowd migrate`` source) are left to a node that has it: this one would
    move their files without the source's checks (its folder's links, its sidecars), and a
    row with no target yet it could not move at all (kept settling, its lease renewed by
    this node, for good).  It says so once, and ``adopt`` counts them with the source's
    other rows that wait for a node that has it."""
    a, b = nodes
    a.adopt({"src": "pacs"})
    b.adopt({"other": "pacs"})  # node-b lacks "src"
    fill(a, 2)
    batch = claim(a, lease=60)
    a.begin_settle([(j, "sent", f"/sent/{j.rel}", None) for j in batch])
    pass_time(a, clock, SETTLE_LEASE + 1)  # node-a died while moving them
    with caplog.at_level(logging.WARNING, logger="stowd.queue"):
        b.reclaim(set())
        b.reclaim(set())
    left = [r.getMessage() for r in caplog.records if "leaves them to a node" in r.getMessage()]
    assert len(left) == 1 and "2 file(s) of source src" in left[0] and "node-a" in left[0]
    assert b.settling() == []
    assert b.adopted == set()
    assert b.adopt({"other": "pacs"}) == {"src": 2}  # the daemon's warning names them
    config = node_config(postgres_cluster, pg_database, tmp_path, "node-c")
    c = open_queue(config, clock=clock).open()  # a node that has "src"
    try:
        c.adopt({"src": "pacs"})
        c.reclaim(set())
        assert sorted(j.id for j in c.settling()) == sorted(j.id for j in batch)
    finally:
        c.close()


def test_recover_returns_only_this_node_s_claims(nodes: tuple[Queue, Queue]) -> None:
    a, b = nodes
    fill(a, 6, studies=2)
    mine = claim(a, candidates=3)
    theirs = claim(b, candidates=3)
    assert len(mine) == len(theirs) == 3
    assert a.recover() == 3
    assert {j.id for j in a.jobs("claimed")} == {j.id for j in theirs}


def test_a_node_held_claim_is_not_reclaimed_by_itself(
    nodes: tuple[Queue, Queue], clock: Clock
) -> None:
    a, _ = nodes
    fill(a, 2)
    batch = claim(a, lease=10)
    pass_time(a, clock, 11)
    assert a.reclaim({batch[0].id}) == 1  # the other one a worker of node-a forgot
    assert [j.id for j in a.jobs("claimed")] == [batch[0].id]


def test_one_daemon_per_node_state_folder(
    postgres_cluster: PostgresCluster, pg_database: str, tmp_path: Path, clock: Clock
) -> None:
    config = node_config(postgres_cluster, pg_database, tmp_path, "node-a")
    first = open_queue(config, clock=clock).open()
    try:
        with pytest.raises(QueueLockedError):
            open_queue(config, clock=clock).open()
    finally:
        first.close()


def test_a_lost_connection_is_a_queue_error_and_the_next_call_connects_again(
    postgres_cluster: PostgresCluster, pg_database: str, queue_a: Queue
) -> None:
    queue_a.enqueue([new("/d/a")])
    assert postgres_cluster.terminate(pg_database) >= 1
    with pytest.raises(QueueError):
        queue_a.enqueue([new("/d/b")])
    assert queue_a.enqueue([new("/d/b")]) == 1
    assert queue_a.counts() == {"pending": 2}


@pytest.mark.timeout(180)
def test_the_server_stopped_and_started_again(
    postgres_cluster: PostgresCluster, queue_a: Queue
) -> None:
    queue_a.enqueue([new("/d/a")])
    postgres_cluster.stop()
    try:
        with pytest.raises(QueueError):
            queue_a.enqueue([new("/d/b")])
        with pytest.raises(QueueError):
            queue_a.counts()
    finally:
        postgres_cluster.start()
        postgres_cluster.wait_accepting()
    assert queue_a.enqueue([new("/d/b")]) == 1
    assert queue_a.counts() == {"pending": 2}


@pytest.fixture
def queue_a(
    postgres_cluster: PostgresCluster, pg_database: str, tmp_path: Path, clock: Clock
) -> Iterator[Queue]:
    q = open_queue(
        node_config(postgres_cluster, pg_database, tmp_path, "node-a"), clock=clock
    ).open()
    yield q
    q.close()


def test_paths_that_are_not_utf8_round_trip(queue_a: Queue) -> None:
    odd = [
        os.fsdecode(b"/d/\xff\xfe.dcm"),  # not UTF-8: lone surrogates in str
        "/d/bell\x07.dcm",  # a control character (not NUL)
        ESCAPED + "looks-escaped",  # a real name that begins like an escaped one
        "/d/caf\u00e9.dcm",
    ]
    assert queue_a.enqueue([new(p) for p in odd]) == 4
    assert sorted(j.path for j in queue_a.jobs()) == sorted(odd)
    assert queue_a.enqueue([new(p) for p in odd]) == 0  # found again: the same rows
    [job] = [j for j in queue_a.jobs() if j.path == odd[0]]
    assert os.fsencode(job.path) == b"/d/\xff\xfe.dcm"


def test_a_newer_schema_is_refused(
    postgres_cluster: PostgresCluster, pg_database: str, queue_a: Queue, tmp_path: Path
) -> None:
    postgres_cluster.admin(
        f"UPDATE stowd_schema SET version = {SCHEMA_VERSION + 1}", database=pg_database
    )
    config = node_config(postgres_cluster, pg_database, tmp_path, "node-b")
    with pytest.raises(QueueError, match="newer stowd"):
        open_queue(config).open()


def counted(cluster: PostgresCluster, database: str) -> dict[str, int]:
    """The rows by state, counted one by one (what ``counts`` must say)."""
    rows = cluster.admin("SELECT state, COUNT(*) FROM files GROUP BY state", database=database)
    return {state: int(n) for state, n in rows}


def test_a_schema_3_queue_is_migrated_and_keeps_exact_counts(
    postgres_cluster: PostgresCluster,
    pg_database: str,
    queue_a: Queue,
    tmp_path: Path,
    clock: Clock,
) -> None:
    """Schema 4 plans the counting trigger's join for each statement; a queue of schema 3
    (its trigger, its version) opened by this stowd is brought to 4 and its counts stay
    exact: those schema 3's trigger appended and those schema 4's appends after it."""
    assert SCHEMA_VERSION >= 4, "this test migrates from 3 to 4 (and on)"
    schema_3 = TALLY_SCHEMA_3.replace("%", "%%")  # admin's psycopg reads % as a placeholder
    for statement in (schema_3, "UPDATE stowd_schema SET version = 3"):
        postgres_cluster.admin(statement, database=pg_database)
    queue_a.release_connection()  # a session of schema 3's function
    fill(queue_a, 30)
    batch = claim(queue_a, candidates=10)
    queue_a.begin_settle([(j, "sent", f"/sent/{j.rel}", None) for j in batch])
    queue_a.finish_many([(j.id, "sent") for j in batch[:6]] + [(j.id, "failed") for j in batch[6:]])
    claim(queue_a, candidates=5)
    before = counted(postgres_cluster, pg_database)
    assert before == {"sent": 6, "failed": 4, "claimed": 5, "pending": 15}

    config = node_config(postgres_cluster, pg_database, tmp_path, "node-b")
    b = open_queue(config, clock=clock).open()
    try:
        version, body = postgres_cluster.admin(
            "SELECT version, prosrc FROM stowd_schema, pg_proc WHERE proname = 'stowd_tally'",
            database=pg_database,
        )[0]
        assert version == SCHEMA_VERSION
        assert "EXECUTE" in body
        assert b.counts() == before
        more = claim(b, candidates=15)
        b.begin_settle([(j, "sent", f"/sent/{j.rel}", None) for j in more])
        b.finish_many([(j.id, "sent") for j in more])
        assert b.reclaim(set()) == 0  # and folds the appended counts
        after = counted(postgres_cluster, pg_database)
        assert after == {"sent": 21, "failed": 4, "claimed": 5}
        assert b.counts() == after
        sent = sum(t.sent for t in b.throughput(0))
        failed = sum(t.failed for t in b.throughput(0))
        assert (sent, failed) == (21, 4)
    finally:
        b.close()


def test_status_and_metrics_read_it(
    postgres_cluster: PostgresCluster, pg_database: str, queue_a: Queue, tmp_path: Path
) -> None:
    fill(queue_a, 3)
    claim(queue_a, candidates=1)
    config = node_config(postgres_cluster, pg_database, tmp_path, "node-b")
    reader = open_status(config)
    try:
        with reader.reading():
            assert reader.state_totals(0) == {"pending": 2, "claimed": 1}
    finally:
        reader.close()
    view = read_active_of(config.queue, config.database, 0, busy_timeout=5)
    assert view.counts == {("pacs", "pending"): 2, ("pacs", "claimed"): 1}


def test_status_of_a_database_without_a_queue_says_so(
    postgres_cluster: PostgresCluster, pg_database: str, tmp_path: Path
) -> None:
    config = node_config(postgres_cluster, pg_database, tmp_path, "node-b")
    with pytest.raises(QueueError, match="no stowd queue"):
        open_status(config)


def test_tls_verify_full_with_the_right_ca_and_name(
    postgres_cluster: PostgresCluster, pg_database: str, tmp_path: Path
) -> None:
    right = str(postgres_cluster.ca_cert)
    config = node_config(
        postgres_cluster, pg_database, tmp_path, "node-a", sslmode="verify-full", sslrootcert=right
    )
    q = open_queue(config).open()
    try:
        assert q.enqueue([new("/d/a")]) == 1
        conn = q._conn()
        [[ssl]] = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        assert ssl is True
    finally:
        q.close()


def test_tls_verify_full_refuses_another_ca(
    postgres_cluster: PostgresCluster, pg_database: str, tmp_path: Path
) -> None:
    from tlsproxy import make_pki  # noqa: PLC0415

    other = make_pki(tmp_path / "other").ca_cert
    config = node_config(
        postgres_cluster, pg_database, tmp_path, "node-a", sslmode="verify-full",
        sslrootcert=str(other),
    )  # fmt: skip
    with pytest.raises(QueueError, match="certificate verify failed"):
        open_queue(config).open()


def test_tls_verify_full_refuses_a_wrong_host_name(
    postgres_cluster: PostgresCluster, pg_database: str, tmp_path: Path
) -> None:
    config = node_config(
        postgres_cluster, pg_database, tmp_path, "node-a", sslmode="verify-full",
        sslrootcert=str(postgres_cluster.ca_cert),
    )  # fmt: skip
    assert config.database is not None
    # the server's address, under a name its certificate does not hold
    wrong = config.database.url.replace("@127.0.0.1:", "@db.invalid:") + "&hostaddr=127.0.0.1"
    config = dataclasses.replace(config, database=dataclasses.replace(config.database, url=wrong))
    with pytest.raises(QueueError, match=r"does not match|server certificate"):
        open_queue(config).open()


def _node(
    cluster: PostgresCluster, database: str, folder: Path, name: str, clock: Callable[[], float]
) -> PostgresQueue:
    """A node on a host whose clock is ``clock`` (its queue corrects it to the database's)."""
    config = node_config(cluster, database, folder, name)
    assert config.database is not None
    node = PostgresQueue(config.database, anchor=config.queue, node=name, host_clock=clock)
    return node.open()


@pytest.mark.parametrize("skew", [120.0, -120.0, 3600.0])
def test_a_host_whose_clock_is_off_never_takes_over_live_claims(
    postgres_cluster: PostgresCluster, pg_database: str, tmp_path: Path, skew: float
) -> None:
    """Leases are times on the database's clock: a host whose clock runs ahead (skew > 0)
    does not see another node's live lease as expired, and one whose clock runs behind
    (skew < 0) does not claim with a lease already expired for the others."""
    right = _node(postgres_cluster, pg_database, tmp_path, "node-a", time.time)
    off = _node(postgres_cluster, pg_database, tmp_path, "node-b", lambda: time.time() + skew)
    try:
        fill(right, 4, studies=2)
        assert len(claim(right, candidates=2, lease=60)) == 2
        assert len(claim(off, candidates=2, lease=60)) == 2
        assert off.reclaim(set()) == 0  # node-a's upload runs: its lease has a minute left
        assert right.reclaim(set()) == 0  # and node-b's too
        assert right.counts() == {"claimed": 4}
    finally:
        right.close()
        off.close()


@pytest.mark.parametrize("skew", [120.0, -120.0, 3600.0, -3600.0])
def test_a_retry_set_by_a_node_whose_clock_is_off_is_due_when_the_others_see_it_due(
    postgres_cluster: PostgresCluster, pg_database: str, tmp_path: Path, skew: float
) -> None:
    """Every time the queue keeps is on one clock for all nodes (the database's): a retry
    that node-b, whose clock is ``skew`` seconds off, sets for within ``retry.initial`` is
    due for node-a within that too (not an hour early or late); the file's first try (from
    which ``retry.max_age`` counts), a hold and a row's done time are the same moment for
    both, and node-a's ``forget_done`` does not take node-b's file done just now for old."""
    right = _node(postgres_cluster, pg_database, tmp_path, "node-a", time.time)
    off = _node(postgres_cluster, pg_database, tmp_path, "node-b", lambda: time.time() + skew)
    try:
        assert abs(off.clock() - right.clock()) < 1  # the host's skew is corrected
        fill(right, 2)
        [job, done] = claim(off, candidates=2)
        initial = 10.0
        config = dataclasses.replace(
            node_config(postgres_cluster, pg_database, tmp_path, "node-b"),
            retry=Retry(initial=initial),
        )
        Filing(config, off, name="pacs").retry_later(job, "the archive is down")  # as a sender
        due, first_try = (
            right._conn()
            .execute("SELECT next_attempt_at, first_try FROM files WHERE id = ?", (job.id,))
            .fetchone()
        )
        assert right.clock() < due <= right.clock() + initial
        assert abs(first_try - right.clock()) < initial / 2
        assert claim(right) == []  # not due yet for node-a either
        wait_for(lambda: right.clock() >= due, 2 * initial, "the retry's time")
        assert [j.id for j in claim(right)] == [job.id]  # due for node-a at that moment

        off.hold("pacs", until=off.clock() + 60, reason="down", began=off.clock())
        hold = right.holds()["pacs"]
        assert 58 < hold.until - right.clock() <= 60 and abs(hold.since - right.clock()) < 2
        off.finish_many([(done.id, "sent")], was="claimed")
        assert right.forget_done(right.clock() - 60) == 0  # done just now, not an hour ago
        assert right.forget_done(right.clock() + 2) == 1
    finally:
        right.close()
        off.close()


def test_a_second_daemon_with_the_same_node_name_is_refused(
    postgres_cluster: PostgresCluster, pg_database: str, tmp_path: Path, clock: Clock
) -> None:
    """Two hosts given one node name (a copied config, cloned machines with one host name)
    each have their own state folder, so the lock file cannot see it; the second's start
    would return the first's live claims to pending (``recover``) and repair its moves in
    progress.  The node's name is locked in the database while a daemon uses it."""
    for host in ("host1", "host2", "host3"):
        (tmp_path / host).mkdir()
    first = open_queue(
        node_config(postgres_cluster, pg_database, tmp_path / "host1", "gw-1"), clock=clock
    ).open()
    try:
        fill(first, 2)
        assert len(claim(first)) == 2
        twin = open_queue(
            node_config(postgres_cluster, pg_database, tmp_path / "host2", "gw-1"), clock=clock
        )
        with pytest.raises(QueueLockedError, match="gw-1"):
            twin.open()
        assert first.counts() == {"claimed": 2}
        status = open_status(node_config(postgres_cluster, pg_database, tmp_path / "host3", "gw-1"))
        status.close()  # a reader (stowd status) of the same node name is not a daemon
    finally:
        first.close()
    again = open_queue(
        node_config(postgres_cluster, pg_database, tmp_path / "host2", "gw-1"), clock=clock
    ).open()  # the first one stopped: its name is free
    again.close()


def test_a_move_begun_at_the_end_of_a_lease_is_not_taken_over_while_it_runs(
    nodes: tuple[Queue, Queue], clock: Clock
) -> None:
    """An upload that took nearly all its lease is settled (its files moved) after it: the
    settling rows get a lease of their own from then on, or another node would take over
    (and repair) files that node-a is moving at that moment."""
    a, b = nodes
    fill(a, 2)
    batch = claim(a, lease=60)
    pass_time(a, clock, 59)
    a.begin_settle([(j, "sent", f"/sent/{j.rel}", None) for j in batch])
    pass_time(a, clock, 2)  # past the claim's lease: the move takes a moment
    b.reclaim(set())
    assert b.settling() == []
    assert sorted(j.id for j in a.settling()) == sorted(j.id for j in batch)


def test_a_node_takes_its_name_again_after_the_database_dropped_its_session(
    postgres_cluster: PostgresCluster, pg_database: str, tmp_path: Path, clock: Clock
) -> None:
    """The session that holds a node's name ends with the database (a restart, a failover,
    the session killed): the running node's next heartbeat takes the name again, so that a
    twin started after that is still refused (else its ``recover`` would return the running
    node's live claims to pending and its repair move the files the first is moving)."""
    for host in ("host1", "host2"):
        (tmp_path / host).mkdir()
    first = open_queue(
        node_config(postgres_cluster, pg_database, tmp_path / "host1", "gw-1"), clock=clock
    ).open()
    try:
        postgres_cluster.admin(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
            "AND pid != pg_backend_pid()"
        )
        until_gone = time.monotonic() + 30
        while postgres_cluster.admin("SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory'")[
            0
        ][0]:
            assert time.monotonic() < until_gone
            time.sleep(0.05)
        first.heartbeat(pid=1, host="host1", started=0.0, version="t", lease=60.0)
        twin = open_queue(
            node_config(postgres_cluster, pg_database, tmp_path / "host2", "gw-1"), clock=clock
        )
        try:
            with pytest.raises(QueueLockedError, match="gw-1"):
                twin.open()
        finally:
            twin.close()
    finally:
        first.close()


def _server_watch(config: Config) -> tuple[dict[str, str], str]:
    """The server's end of a queue's connection: its keepalive settings as the server has
    them for the session, and the session's ``statement_timeout``."""
    queue = open_queue(config).open(lock=False)
    try:
        rows = (
            queue._conn()
            .execute("SELECT name, setting FROM pg_settings WHERE name LIKE 'tcp_%'")
            .fetchall()
        )
        [(timeout,)] = queue._conn().execute("SHOW statement_timeout").fetchall()
    finally:
        queue.close()
    return {r[0]: r[1] for r in rows}, timeout


@pytest.mark.timeout(60)
def test_a_lease_of_days_connects_with_the_keepalives_capped_on_both_ends(
    postgres_cluster: PostgresCluster, pg_database: str, tmp_path: Path
) -> None:
    """A lease of 5 days would make keepalive times of 10 hours and more, which the kernel
    refuses (a connection then fails at once): they are capped to what it takes, on this
    end and on the server's."""
    config = node_config(postgres_cluster, pg_database, tmp_path, "long")
    assert _server_watch(dataclasses.replace(config, lease=5 * 86400.0))[0] == {
        "tcp_keepalives_idle": "32767",
        "tcp_keepalives_interval": "18000",
        "tcp_keepalives_count": "3",
        "tcp_user_timeout": "108000000",
    }


@pytest.mark.timeout(60)
@pytest.mark.parametrize("given_by", ["url", "PGOPTIONS"])
def test_the_server_s_end_of_a_node_s_connection_watches_the_link_too(
    postgres_cluster: PostgresCluster,
    pg_database: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    given_by: str,
) -> None:
    """The server probes a node's connection as the node does (from the lease), so that the
    sessions of a node cut off end within the lease, not after the server's two hours; a
    setting the user's own ``options`` give (in the URL, or in ``PGOPTIONS``, which libpq
    reads only where the URL names none) wins, and their other settings are kept."""
    options = "-c tcp_keepalives_count=7 -c statement_timeout=5min"
    extra = {}
    if given_by == "url":
        extra["options"] = options.replace(" ", "%20").replace("=", "%3D")
    else:
        monkeypatch.setenv("PGOPTIONS", options)
    config = node_config(postgres_cluster, pg_database, tmp_path, "opts", **extra)
    assert _server_watch(dataclasses.replace(config, lease=120.0)) == (
        {
            "tcp_keepalives_idle": "10",
            "tcp_keepalives_interval": "5",
            "tcp_keepalives_count": "7",
            "tcp_user_timeout": "30000",
        },
        "5min",
    )


@pytest.mark.timeout(60)
def test_the_server_s_end_takes_the_keepalive_times_the_url_gives(
    postgres_cluster: PostgresCluster, pg_database: str, tmp_path: Path
) -> None:
    """``keepalives_idle`` and ``tcp_user_timeout`` in the URL: both ends use them."""
    config = node_config(
        postgres_cluster, pg_database, tmp_path, "given", keepalives_idle="600",
        tcp_user_timeout="90000",
    )  # fmt: skip
    assert _server_watch(dataclasses.replace(config, lease=120.0))[0] == {
        "tcp_keepalives_idle": "600",
        "tcp_keepalives_interval": "5",
        "tcp_keepalives_count": "3",
        "tcp_user_timeout": "90000",
    }


def test_keepalives_0_in_the_url_turns_the_link_watch_off() -> None:
    """``keepalives=0``: no keepalives, no user timeout, on neither end (the user's word)."""
    assert link_watch("postgresql://db.example/q?keepalives=0", 120.0) == {}
    assert "tcp_user_timeout" in link_watch("postgresql://db.example/q?keepalives=1", 120.0)


def test_an_empty_list_of_names_selects_nothing(nodes: tuple[Queue, Queue]) -> None:
    """No names: nothing, not an error (an empty array has no type to take from its values,
    and an empty ``BIGINT[]`` compared with a TEXT column is refused)."""
    a, _ = nodes
    fill(a, 2)
    assert a.run_nodes([], 0.0) == {}
    assert a.walks([]) == []


def test_a_batch_is_changed_by_one_statement_not_one_per_row(nodes: tuple[Queue, Queue]) -> None:
    """Claim, settle and finish of a batch of 10 each run the counting triggers once (one
    statement for the batch: a change of two states appends two rows), not once a row."""
    a, _ = nodes
    fill(a, 10)

    def appended(step: Callable[[], object]) -> int:
        count = "SELECT COUNT(*) FROM tally_changes"
        before = a._conn().execute(count).fetchone()[0]
        step()
        return int(a._conn().execute(count).fetchone()[0] - before)

    batch: list[Job] = []
    assert appended(lambda: batch.extend(claim(a, candidates=10))) == 2
    assert len(batch) == 10
    assert appended(lambda: a.begin_settle([(j, "sent", f"/s/{j.rel}", None) for j in batch])) == 2
    assert appended(lambda: a.finish_many([(j.id, "sent") for j in batch])) == 2


def _plan(queue: Queue, sql: str, params: list[str]) -> str:
    rows = queue._conn().execute("EXPLAIN " + sql, params).fetchall()
    return "\n".join(r[0] for r in rows)


def test_a_large_first_enqueue_reads_active_rows_by_path_from_their_index(queue_a: Queue) -> None:
    """A new queue has no statistics until autovacuum's first analyze (a minute or so): the
    planner took ``files`` for a table of a few pages and read an enqueue part's active rows
    through ``files_age`` (every active row, the path a filter), so each part read all the
    rows queued before it (70,000 files in one call: 47 s).  The queue analyzes ``files``
    itself once the rows it inserted outgrow the statistics, within the enqueue: the next
    part's read is an index lookup of its paths."""
    queue_a.enqueue([new(f"/d/f{i:05d}") for i in range(3_000)])  # one call, a fresh table
    counted = (
        queue_a._conn()
        .execute("SELECT reltuples FROM pg_class WHERE oid = 'files'::regclass")
        .fetchone()[0]
    )
    assert counted >= 2_000  # -1: never analyzed
    paths = [f"/d/f{i:05d}" for i in range(0, 3_000, 300)]
    marks = ",".join("?" * len(paths))
    plan = _plan(  # the statement of ``Queue._active_rows`` (and ``_known``)
        queue_a,
        f"SELECT path, id, size, mtime_ns, state FROM files WHERE path IN ({marks}) "
        "AND state IN ('pending', 'claimed', 'settling')",
        paths,
    )
    assert plan.startswith("Index Scan using files_active_path on files"), plan


def test_a_reader_s_batch_is_classified_and_noted_in_one_statement(queue_a: Queue) -> None:
    """``set_classified`` and ``add_notes`` change a batch's rows with one statement (an
    ``unnest`` of their values), not one a row: each statement costs a round trip, its
    plan and a run of the counting triggers (70,000 rows classified in 11 s, not 2)."""
    queue_a.enqueue([new(f"/d/f{i:02d}") for i in range(50)])
    read = queue_a.unclassified(50)
    with queue_a._tx() as db:  # a statement-level trigger counts the statements
        db.execute("CREATE TABLE statements (n INTEGER)")
        db.execute(
            "CREATE FUNCTION count_statement() RETURNS TRIGGER LANGUAGE plpgsql AS "
            "$$ BEGIN INSERT INTO statements VALUES (1); RETURN NULL; END $$"
        )
        db.execute(
            "CREATE TRIGGER count_updates AFTER UPDATE ON files FOR EACH STATEMENT "
            "EXECUTE FUNCTION count_statement()"
        )

    def statements() -> int:
        return int(queue_a._conn().execute("SELECT COUNT(*) FROM statements").fetchone()[0])

    queue_a.set_classified([Classification(j, "dicom", "st", f"sop{j.id}", "1.2") for j in read])
    assert statements() == 1
    assert {(j.kind, j.sop_uid) for j in queue_a.jobs()} == {("dicom", f"sop{j.id}") for j in read}
    queue_a.add_notes({j.id: f"n{j.id}" for j in read})
    assert statements() == 2
    notes = queue_a._conn().execute("SELECT id, note FROM files").fetchall()
    assert dict(notes) == {j.id: f"n{j.id}" for j in read}


def read(queue: Queue, limit: int = 10) -> list[str]:
    return [j.path for j in queue.unclassified(limit)]


def test_nodes_read_the_new_files_of_a_shared_tree_once(nodes: tuple[Queue, Queue]) -> None:
    """Each node's reader reads other new files than the others (a read lease on the rows
    it took, on the database's clock): a shared tree's headers are read once, not once a
    node.  A node reads its own leased rows again (a retry, a file found changed)."""
    a, b = nodes
    a.enqueue([new(f"/d/f{i}") for i in range(6)])
    first = read(a, 4)
    assert first == [f"/d/f{i}" for i in range(4)]
    assert read(b) == ["/d/f4", "/d/f5"]  # not A's
    assert read(a) == first  # its own, again; B's are B's
    assert read(b) == ["/d/f4", "/d/f5"]


def test_a_lapsed_read_lease_is_read_by_another_node(
    nodes: tuple[Queue, Queue], clock: Clock
) -> None:
    """A node that died mid-read holds its rows only until the read lease ends: another
    node then reads them, and they are its own."""
    a, b = nodes
    a.enqueue([new("/d/a"), new("/d/b")])
    assert read(a) == ["/d/a", "/d/b"]
    assert read(b) == []
    pass_time(b, clock, DEFAULT_LEASE + 1)  # A died reading them (its lease: the default)
    assert read(b) == ["/d/a", "/d/b"]
    assert read(a) == []  # B's now


def test_a_schema_4_queue_gets_the_read_leases(
    postgres_cluster: PostgresCluster, pg_database: str, nodes: tuple[Queue, Queue], tmp_path: Path
) -> None:
    """A queue of schema 4 (no read leases) opened by this stowd is brought to 5."""
    assert SCHEMA_VERSION == 5, "this test migrates from 4 to 5"
    a, b = nodes
    for statement in (
        "ALTER TABLE files DROP COLUMN read_by, DROP COLUMN read_until",
        "UPDATE stowd_schema SET version = 4",
    ):
        postgres_cluster.admin(statement, database=pg_database)
    a.enqueue([new("/d/a")])
    b.close()  # node B restarts with this stowd
    b = open_queue(node_config(postgres_cluster, pg_database, tmp_path, "node-b")).open()
    try:
        assert read(b) == ["/d/a"]
        assert read(a) == []
    finally:
        b.close()
    [(version,)] = postgres_cluster.admin("SELECT version FROM stowd_schema", database=pg_database)
    assert version == 5
