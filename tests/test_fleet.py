"""A node's part in a fleet on one PostgreSQL queue (issue 23, ``service/fleet.py``): its
leases renewed while it holds files, its heartbeat, and what it does when it loses the
database.  The queue's side of several nodes is ``test_fleet_queue.py``'s."""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from dicomgen import make_instance
from harness import Clock, Layout, Stowd, make_layout, make_watch_folders, wait_for
from orthanc import Orthanc
from postgres import PASSWORD, PostgresCluster, node_config, pass_time

from stowd.config.load import load_config
from stowd.config.model import Config
from stowd.pipeline.queue import Classification, Job, NewFile, Queue, open_queue
from stowd.pipeline.settle import MOVING
from stowd.service import status
from stowd.service.daemon import Daemon, Generation
from stowd.service.fleet import Fleet
from stowd.service.notify import Notifier

pytestmark = pytest.mark.integration


def new(path: str, size: int = 10) -> NewFile:
    return NewFile("src", "pacs", path, os.path.basename(path), size, 1)


def pick_all(_dest: str, jobs: list[Job]) -> list[Job]:
    return jobs


def claimed(queue: Queue, count: int, lease: float) -> list[Job]:
    queue.enqueue([new(f"/t/f{i}") for i in range(count)])
    jobs = queue.unclassified(count)
    queue.set_classified([Classification(j, "dicom", "st", f"sop{j.id}", "1.2") for j in jobs])
    return queue.claim_batch(["pacs"], pick=pick_all, candidates=count, lease=lease)


@pytest.fixture
def two(
    postgres_cluster: PostgresCluster, pg_database: str, tmp_path: Path, clock: Clock
) -> Iterator[tuple[Fleet, Queue, Queue]]:
    """Node A (with its fleet part, lease 6 s) and node B on one database."""
    configs = [
        replace(node_config(postgres_cluster, pg_database, tmp_path, n), lease=6.0)
        for n in ("node-a", "node-b")
    ]
    a, b = (open_queue(c, clock=clock).open() for c in configs)
    held: set[int] = set()
    fleet = Fleet(configs[0], a, lambda: held, clock=clock)
    try:
        yield fleet, a, b
    finally:
        a.close()
        b.close()


def test_a_node_silent_for_the_history_span_that_holds_nothing_is_forgotten(
    two: tuple[Fleet, Queue, Queue], clock: Clock
) -> None:
    """A node retired from the fleet is not shown as vanished forever: node-a, silent for
    longer than ``silent_for``, is forgotten by node-b once it holds no claim; never while
    it holds one, and never before it has been silent that long."""
    fleet, a, b = two
    days = 30 * 86400.0
    assert fleet.beat()
    batch = claimed(a, 2, lease=fleet.lease)
    pass_time(b, clock, days + 60)
    assert b.forget_nodes(days) == []  # it holds claims: they are taken over first
    assert b.reclaim(set()) == len(batch)
    assert a.forget_nodes(days) == []  # a node never forgets itself
    assert b.forget_nodes(days + 3600) == []  # not silent that long
    assert b.forget_nodes(days) == ["node-a"]
    assert b.nodes() == []


def test_renewals_keep_a_held_claim_however_long_its_upload_takes(
    two: tuple[Fleet, Queue, Queue], clock: Clock
) -> None:
    fleet, a, b = two
    batch = claimed(a, 3, lease=fleet.lease)
    held = {j.id for j in batch}
    fleet.held = lambda: held
    for _ in range(20):  # two minutes of upload, renewed every third of the lease
        pass_time(a, clock, fleet.every)  # on the database's clock, which leases are kept on
        assert fleet.beat()
        assert b.reclaim(set()) == 0
    assert a.counts() == {"claimed": 3}
    held = set()  # the worker gave them up (died, say): no more renewals
    pass_time(a, clock, fleet.lease + 1)
    assert b.reclaim(set()) == 3


def test_the_heartbeat_says_who_the_node_is_at_a_time_on_the_database_s_clock(
    two: tuple[Fleet, Queue, Queue], clock: Clock
) -> None:
    """The heartbeat is the database's now (as leases are), not the node's clock (the test
    clock, decades off)."""
    fleet, _, b = two
    before = b.leases_now(clock.now)
    assert fleet.beat()
    [node] = b.nodes()
    assert (node.node, node.pid, node.lease) == ("node-a", os.getpid(), 6)
    assert before <= node.heartbeat <= b.leases_now(clock.now)
    pass_time(b, clock, 5)
    assert b.leases_now(clock.now) - b.nodes()[0].heartbeat >= 5
    fleet.beat()
    assert b.leases_now(clock.now) - b.nodes()[0].heartbeat < 5


@pytest.mark.timeout(180)
def test_a_node_that_lost_the_database_stops_claiming_says_so_once_and_resumes(
    two: tuple[Fleet, Queue, Queue],
    postgres_cluster: PostgresCluster,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fleet, a, _ = two
    held = {j.id for j in claimed(a, 2, lease=fleet.lease)}
    fleet.held = lambda: held
    assert fleet.beat() and fleet.claiming
    postgres_cluster.stop()
    try:
        with caplog.at_level(logging.INFO, logger="stowd.fleet"):
            assert not fleet.beat()
            assert not fleet.beat()
            assert not fleet.claiming
    finally:
        postgres_cluster.start()
        postgres_cluster.wait_accepting()
    assert caplog.text.count("node node-a lost the database") == 1
    assert "claiming nothing new" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="stowd.fleet"):
        assert fleet.beat()
    assert fleet.claiming
    assert "node node-a reaches the database again" in caplog.text
    assert a.counts() == {"claimed": 2}  # its claims kept (renewed again)


@pytest.mark.timeout(60)
def test_the_other_renewals_go_on_when_a_beat_fails_unexpectedly(
    two: tuple[Fleet, Queue, Queue], caplog: pytest.LogCaptureFixture
) -> None:
    """A beat that raises something unexpected (here: the held rows cannot be listed) is
    logged, and the fleet thread's other renewals (a migration's walk lease) still run."""
    fleet, _, _ = two
    also = threading.Event()

    def held() -> set[int]:
        raise RuntimeError("the held rows cannot be listed")

    fleet.held = held
    fleet.also = also.set
    fleet.every = 0.05
    fleet._thread = threading.Thread(target=fleet._run, name="fleet", daemon=True)
    with caplog.at_level(logging.ERROR, logger="stowd.fleet"):
        fleet._thread.start()
        try:
            assert also.wait(30), "the other renewals were skipped"
        finally:
            fleet.close()
    assert "unexpected error renewing" in caplog.text


def _pg_layout(
    root: Path, url: str, cluster: PostgresCluster, database: str, node: str, **over: object
) -> Layout:
    secret = root.parent / f"{node}.password"
    secret.write_text(PASSWORD + "\n", encoding="utf-8")
    secret.chmod(0o600)
    keys: dict[str, Any] = {
        "queue": cluster.url(database),
        "queue_password": {"file": str(secret)},
        "state": "./state",
        "node": node,
        **over,
    }
    return make_layout(root, url, **keys)


@pytest.mark.timeout(240)
def test_an_upload_longer_than_the_lease_keeps_its_files(
    orthanc: Orthanc,
    postgres_cluster: PostgresCluster,
    pg_database: str,
    tmp_path: Path,
) -> None:
    """A daemon (node-a, lease 6 s) uploads one file at 40 kB/s for about 12 s: its fleet
    thread renews the claim, so node-b, reclaiming all the while, never takes it over; the
    file is stored once and moved to sent/ by node-a."""
    layout = _pg_layout(
        tmp_path / "a",
        orthanc.dicomweb_url,
        postgres_cluster,
        pg_database,
        "node-a",
        lease="6s",
        destinations={"pacs": {"url": orthanc.dicomweb_url, "workers": 1, "max_rate": "40kB/s"}},
    )
    b = open_queue(node_config(postgres_cluster, pg_database, tmp_path, "node-b")).open()
    try:
        path = layout.drop / "big.dcm"
        make_instance(path, size_bytes=480_000)
        with Stowd(layout) as daemon:
            daemon.wait_started()
            wait_for(lambda: b.counts().get("claimed") == 1, 60, "claimed", lambda: daemon.log)
            started = time.monotonic()
            while b.counts().get("claimed") == 1:
                assert b.reclaim(set()) == 0, daemon.log
                time.sleep(0.5)
            assert time.monotonic() - started > 6 * 1.2, "the upload outlasted a lease"
            wait_for(lambda: b.counts() == {"sent": 1}, 60, "sent", lambda: daemon.log)
        assert not path.exists()
        assert len(list((layout.root / "done" / "sent").rglob("*.dcm"))) == 1
        assert orthanc.instance_count() == 1
    finally:
        b.close()


@pytest.mark.timeout(180)
def test_a_running_daemon_finishes_the_moves_of_a_node_whose_lease_expired(
    orthanc: Orthanc, postgres_cluster: PostgresCluster, pg_database: str, tmp_path: Path
) -> None:
    """node-x decided a file was sent, recorded its move and died before moving it: the
    daemon of node-a takes the move over once node-x's lease expired (not only at its next
    start) and moves the file to sent/, as a start's repair does."""
    layout = _pg_layout(
        tmp_path / "a", orthanc.dicomweb_url, postgres_cluster, pg_database, "node-a", lease="6s"
    )
    path = layout.drop / "x.dcm"
    make_instance(path)
    st = path.stat()
    clock = Clock(time.time())
    x = open_queue(
        node_config(postgres_cluster, pg_database, tmp_path, "node-x"), clock=clock
    ).open()
    try:
        x.enqueue([NewFile("ct1", "pacs", str(path), "x.dcm", st.st_size, st.st_mtime_ns)])
        [job] = x.unclassified(1)
        x.set_classified([Classification(job, "dicom", "st", "sop", "1.2")])
        [job] = x.claim_batch(["pacs"], pick=pick_all, candidates=1, lease=6)
        target = layout.root / "done" / "sent" / "x.dcm"
        assert x.begin_settle([(job, "sent", str(target), None)]) == {}
        pass_time(x, clock, 3600)  # node-x died then: the lease of its move ran out long ago
        with Stowd(layout) as daemon:
            daemon.wait_started()
            wait_for(lambda: x.counts() == {"sent": 1}, 60, "moved", lambda: daemon.log)
            assert "took over 1 files being moved of node node-x" in daemon.log
        assert target.exists() and not path.exists()
        assert orthanc.instance_count() == 0  # moved, not sent again: it was stored
    finally:
        x.close()


def _in(thread: threading.Thread, function: str) -> bool:
    """Is ``thread`` inside ``function`` now (waiting in it, say)?"""
    frame = sys._current_frames().get(thread.ident or 0)
    return any(f.f_code.co_name == function for f, _ in traceback.walk_stack(frame))


@pytest.mark.timeout(180)
def test_the_moves_the_repair_at_start_makes_keep_their_lease_however_long_it_takes(
    postgres_cluster: PostgresCluster, pg_database: str, tmp_path: Path
) -> None:
    """node-a died with a move recorded but not made; at its next start its repair makes
    it, held up here for longer than a lease (by the lock of moves, as a copy of a big file
    across filesystems would): the fleet thread renews the move's lease from before the
    repair, so node-b, reclaiming all the while, never takes the move over to make it too."""
    layout = _pg_layout(
        tmp_path / "a", "http://127.0.0.1:9/dicom-web", postgres_cluster, pg_database, "node-a",
        lease="6s",
    )  # fmt: skip
    config = load_config(layout.config)
    path = layout.drop / "x.dcm"
    make_instance(path)
    st = path.stat()
    clock = Clock(time.time())
    last = open_queue(config, clock=clock).open()  # node-a's last run, which died
    try:
        last.enqueue([NewFile("ct1", "pacs", str(path), "x.dcm", st.st_size, st.st_mtime_ns)])
        [job] = last.unclassified(1)
        last.set_classified([Classification(job, "dicom", "st", "sop", "1.2")])
        [job] = last.claim_batch(["pacs"], pick=pick_all, candidates=1, lease=6)
        target = layout.sent / "x.dcm"
        assert last.begin_settle([(job, "sent", str(target), None)]) == {}
        pass_time(last, clock, 3600)  # the lease of its move ran out long ago
    finally:
        last.close()
    b = open_queue(node_config(postgres_cluster, pg_database, tmp_path, "node-b")).open()
    daemon = Daemon(config, Notifier({}))

    def start() -> None:  # a daemon's start up to its workers (``Daemon.run``)
        daemon.queue.open()
        try:
            daemon._recover()
        finally:
            if daemon.fleet is not None:
                daemon.fleet.close()
            daemon.queue.close()

    runner = threading.Thread(target=start, name="daemon-a-start", daemon=True)
    try:
        with MOVING:  # the repair waits here
            runner.start()
            wait_for(lambda: _in(runner, "repair"), 60, "the repair at start")
            until = time.monotonic() + 6 * 1.5
            while time.monotonic() < until:
                assert b.reclaim(set()) == 0
                assert not b.settling(), "node-b took over a move node-a is making"
                time.sleep(0.5)
        wait_for(lambda: b.counts() == {"sent": 1}, 60, "the move made")
        assert target.exists() and not path.exists()
    finally:
        runner.join(60)
        b.close()
    assert not runner.is_alive()


@pytest.mark.timeout(120)
def test_of_two_reloads_replanned_at_once_the_newest_config_s_adopt_lands_last(
    postgres_cluster: PostgresCluster, pg_database: str, tmp_path: Path
) -> None:
    """The upkeep retries the replan of a reload (ct1 -> pacs) and is held up in its adopt
    (here by a row another session has locked); meanwhile the main thread replans a newer
    reload (ct1 -> archive2).  The queue ends with the newest config: ct1's files go to
    archive2, never back to pacs by the older adopt landing last."""
    layout = _pg_layout(
        tmp_path / "a", "http://127.0.0.1:9/dicom-web", postgres_cluster, pg_database, "node-a"
    )
    doc = yaml.safe_load(layout.config.read_text())
    ct1 = doc["sources"][0]
    ct2 = {**ct1, "name": "ct2", "watch": "./drop2", "sent": "./done2/sent"}
    ct2["failed"] = "./done2/failed"
    (layout.root / "drop2").mkdir()
    doc["destinations"]["archive2"] = doc["destinations"]["pacs"]
    layout.config.write_text(yaml.safe_dump({**doc, "sources": [ct2, ct1]}))
    older = load_config(layout.config)
    layout.config.write_text(
        yaml.safe_dump({**doc, "sources": [{**ct1, "destination": "archive2"}]})
    )
    newer = load_config(layout.config)
    daemon = Daemon(older, Notifier({}))
    daemon.queue.open()
    locker = psycopg.connect(postgres_cluster.url(pg_database), password=PASSWORD)
    try:
        daemon._recover()
        daemon.queue.enqueue([NewFile("ct1", "pacs", "/d/a.dcm", "a.dcm", 10, 1)])
        daemon.queue.enqueue([NewFile("ct2", "archive2", "/d2/b.dcm", "b.dcm", 10, 1)])

        def replan(config: Config) -> threading.Thread:
            def run() -> None:
                daemon._replan_due = config
                daemon._guarded(daemon._replan_after_reload)
                daemon.queue.release_connection()

            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            return thread

        def waiting() -> bool:  # (a session of its own: a transaction's view is a snapshot)
            with psycopg.connect(
                postgres_cluster.url(pg_database), password=PASSWORD, autocommit=True
            ) as look:
                row = look.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND datname = current_database()"
                ).fetchone()
            return bool(row and row[0])

        locker.execute("SELECT id FROM files WHERE source = 'ct2' FOR UPDATE")
        upkeep = replan(older)  # its adopt waits for ct2's row
        wait_for(waiting, 30, "the older replan's adopt to wait")
        main = replan(newer)
        main.join(30)  # done, or left to the upkeep
        locker.commit()
        upkeep.join(30)
        for _ in range(3):  # the upkeep's next rounds
            daemon._guarded(daemon._replan_after_reload)
        assert daemon._replan_due is None
        [job] = [j for j in daemon.queue.jobs() if j.source == "ct1"]
        assert job.destination == "archive2", "the older config's adopt landed last"
    finally:
        locker.close()
        if daemon.fleet is not None:
            daemon.fleet.close()
        daemon.queue.close()


def stop(daemon: Daemon) -> None:
    """Stop a daemon whose main loop ran on a thread (``supervise``), and close its queue."""
    daemon.stop.set()
    for thread in threading.enumerate():  # the main loop's, its upkeep's, its replanner's
        if thread.name in ("main", "upkeep", "replan"):
            thread.join(30)
    daemon._shutdown()
    if daemon.fleet is not None:
        daemon.fleet.close()
    daemon.queue.close()


def supervise(daemon: Daemon) -> None:
    """The daemon's main loop (``Daemon.run``'s) on a thread, which gives its connection back
    when it ends."""
    try:
        daemon._supervise()
    finally:
        daemon.queue.release_connection()


@pytest.mark.timeout(120)
def test_a_reload_whose_adopt_failed_is_taken_within_seconds_while_the_upkeep_is_busy(
    postgres_cluster: PostgresCluster,
    pg_database: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A reload comes while the database is away: the queue cannot take the new config's
    sources, and the senders claim nothing until it has.  The upkeep is held up (a retried
    move waits for the lock of moves, as a slow share would hold it); the main loop tries
    the replan again each second, so the queue takes the reload as soon as the database is
    back.  That the senders wait is logged once and shown in STATUS=, and its end logged."""
    layout = _pg_layout(
        tmp_path / "a", "http://127.0.0.1:9/dicom-web", postgres_cluster, pg_database, "node-a"
    )
    config = load_config(layout.config)
    new = load_config(layout.config)  # the reload's: the same file read again
    daemon = Daemon(config, Notifier({}))
    daemon.queue.open()
    main = threading.Thread(target=supervise, args=(daemon,), name="main", daemon=True)
    try:
        with caplog.at_level(logging.INFO, logger="stowd"):
            daemon._recover()
            daemon.unsettled = {1}  # the upkeep retries a move first: held up below
            with MOVING:
                postgres_cluster.stop()
                try:
                    daemon._switch_to(new)
                finally:
                    postgres_cluster.start()
                    postgres_cluster.wait_accepting()
                assert daemon._replan_due is new and not daemon._claiming()
                assert caplog.text.count("claiming nothing new until the queue takes") == 1
                assert "reload not taken yet" in daemon._status_line()
                main.start()
                wait_for(lambda: daemon._replan_due is None, 30, "the reload's replan")
                wait_for(lambda: "claiming again" in caplog.text, 30, "its end said")
                assert "reload not taken yet" not in daemon._status_line()
        assert caplog.text.count("claiming nothing new until the queue takes") == 1
        assert daemon._adopted is new
    finally:
        stop(daemon)


@pytest.mark.timeout(120)
def test_the_replan_after_a_replaced_generation_ends_waits_for_the_database(
    postgres_cluster: PostgresCluster, pg_database: str, tmp_path: Path
) -> None:
    """A replaced generation's threads end while the database is away: the replan its end
    asks for fails, and the main loop goes on (it ended there, before) and makes the replan
    once the database is back."""
    layout = _pg_layout(
        tmp_path / "a", "http://127.0.0.1:9/dicom-web", postgres_cluster, pg_database, "node-a"
    )
    config = load_config(layout.config)
    daemon = Daemon(config, Notifier({}))
    daemon.queue.open()
    main = threading.Thread(target=supervise, args=(daemon,), name="main", daemon=True)
    try:
        daemon._recover()
        postgres_cluster.stop()
        try:
            daemon.lingering.append(Generation(config))  # its threads all ended
            main.start()
            wait_for(lambda: not daemon.lingering, 30, "the old generation reaped")
            assert main.is_alive(), "the main loop ended"
        finally:
            postgres_cluster.start()
            postgres_cluster.wait_accepting()
        wait_for(
            lambda: daemon._lingered_replanned == daemon._lingered == 1,
            30,
            "the replan once the database is back",
        )
        assert main.is_alive()
    finally:
        stop(daemon)


def test_status_shows_each_node_alive_or_vanished_with_its_claims_and_rate(
    postgres_cluster: PostgresCluster, pg_database: str, tmp_path: Path, clock: Clock
) -> None:
    configs = {
        n: replace(node_config(postgres_cluster, pg_database, tmp_path, n), lease=6.0)
        for n in ("node-a", "node-b")
    }
    a, b = (open_queue(c, clock=clock).open() for c in configs.values())
    try:
        Fleet(configs["node-b"], b, set).beat()  # node-b said it was alive, then died
        held = [j.id for j in claimed(b, 2, lease=6)]
        pass_time(b, clock, 60)  # ten leases later
        b.begin_settle([(j, "sent", f"/sent/{j.rel}", None) for j in b.jobs("claimed")[:1]])
        b.finish(held[0], state="sent", was="settling")  # node-b settled one file in the window
        Fleet(configs["node-a"], a, set).beat()
        pass_time(a, clock, 1)
        data = status.gather(configs["node-a"], now=clock.now)
        by_node = {n["node"]: n for n in data["nodes"]}
        assert by_node["node-a"]["state"] == "alive"
        assert 1 <= by_node["node-a"]["heartbeat_age"] < 6  # a second, and the test's pace
        assert by_node["node-b"]["state"] == "vanished"
        assert (by_node["node-b"]["claimed"], by_node["node-b"]["settling"]) == (1, 0)
        assert by_node["node-b"]["claims_expire_in"] < 0
        assert by_node["node-b"]["files_per_minute"] == 1 / 5
        text = status.render(data)
        assert "node:         node-a: alive on " in text
        assert "node:         node-b: vanished on " in text
        assert "holds 1 claimed, 0 being moved (leases expired " in text
    finally:
        a.close()
        b.close()


def test_status_judges_heartbeats_on_the_database_s_clock_whatever_the_hosts_clocks(
    postgres_cluster: PostgresCluster, pg_database: str, tmp_path: Path
) -> None:
    """node-b's host clock runs an hour behind, node-c's an hour ahead, and stowd status runs
    on a third host: each heartbeat's age is read on the database's clock it was written on,
    so both live nodes are alive (not node-b vanished for an hour), and once they stop both
    are silent, then vanished (not node-c alive for an hour after it died)."""
    hour = 3600.0
    clocks = {
        "node-b": Clock(time.time() - hour),
        "node-c": Clock(time.time() + hour),
        "node-s": Clock(time.time()),
    }
    configs = {
        n: replace(node_config(postgres_cluster, pg_database, tmp_path, n), lease=6.0)
        for n in clocks
    }
    queues = {n: open_queue(c, clock=clocks[n]).open() for n, c in configs.items()}
    s = queues["node-s"]
    try:

        def states() -> dict[str, str]:
            data = status.gather(configs["node-s"], now=clocks["node-s"].now)
            return {n["node"]: n["state"] for n in data["nodes"] if n["node"] != "node-s"}

        for n in ("node-b", "node-c"):
            Fleet(configs[n], queues[n], set, clock=clocks[n]).beat()
        assert states() == {"node-b": "alive", "node-c": "alive"}
        pass_time(s, clocks["node-s"], 7)  # past one lease without a heartbeat
        assert states() == {"node-b": "silent", "node-c": "silent"}
        pass_time(s, clocks["node-s"], 12)  # past three
        assert states() == {"node-b": "vanished", "node-c": "vanished"}
    finally:
        for q in queues.values():
            q.close()


def test_a_sqlite_queue_shows_one_node_this_host(tmp_path: Path) -> None:
    from test_config import MINIMAL  # noqa: PLC0415

    (tmp_path / "stowd.yaml").write_text(MINIMAL + "node: gw-1\n", encoding="utf-8")
    make_watch_folders(tmp_path / "stowd.yaml")
    config = load_config(tmp_path / "stowd.yaml")
    open_queue(config).open().close()
    data = status.gather(config)
    assert [(n["node"], n["state"], n["claimed"]) for n in data["nodes"]] == [
        ("gw-1", "stopped", 0)
    ]
    assert "node:         gw-1 (this host)" in status.render(data)


def _link_options(queue: Queue) -> dict[str, int]:
    """The TCP options the kernel holds for ``queue``'s connection of this thread."""
    raw = queue._conn().raw  # type: ignore[attr-defined]
    sock = socket.socket(fileno=os.dup(raw.fileno()))
    try:
        return {
            "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            "idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            "interval": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            "count": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            "user_timeout": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
        }
    finally:
        sock.close()  # the duplicate only


@pytest.mark.parametrize(
    "case",
    [
        # a link that died without a word is noticed well within a lease: probes after
        # lease/12 of silence, three of them lease/24 apart; unacknowledged data: lease/4
        (120.0, {}, {"keepalive": 1, "idle": 10, "interval": 5, "count": 3, "user_timeout": 30000}),
        (6.0, {}, {"keepalive": 1, "idle": 1, "interval": 1, "count": 3, "user_timeout": 1500}),
        # what the user's URL says wins
        (
            120.0,
            {"keepalives_idle": "7", "tcp_user_timeout": "45000"},
            {"keepalive": 1, "idle": 7, "interval": 5, "count": 3, "user_timeout": 45000},
        ),
    ],
)
def test_a_node_s_database_connections_watch_the_link_within_a_lease(
    postgres_cluster: PostgresCluster,
    pg_database: str,
    tmp_path: Path,
    case: tuple[float, dict[str, str], dict[str, int]],
) -> None:
    """Without keepalives a connection whose link died silently (no FIN, no RST) holds a
    query for the kernel's retransmissions, about 15 minutes: the node's TCP sockets to
    the database carry keepalives and a user timeout derived from its lease."""
    lease, params, expected = case
    config = replace(
        node_config(postgres_cluster, pg_database, tmp_path, "node-a", **params), lease=lease
    )
    queue = open_queue(config).open()
    try:
        assert _link_options(queue) == expected
    finally:
        queue.close()
