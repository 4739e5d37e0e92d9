"""``stowd migrate`` on several hosts (nodes) with one PostgreSQL queue (issue 23): one node
walks each source (a walk lease in the queue, taken over when its walker dies), every node
sends, and each node's summary covers the whole run."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pydicom
import pytest
from dicomgen import make_instance
from harness import Layout, make_layout, wait_for
from orthanc import Orthanc
from postgres import PASSWORD, PostgresCluster, node_config

from stowd.commands.migrate import Migration, Options, source_name
from stowd.config.load import load_config
from stowd.pipeline.queue import Classification, NewFile, Queue, open_queue

pytestmark = pytest.mark.integration

LEASE = 6.0  # the shortest lease a config may give
ARGS = ("--destination", "pacs")
WAITS = "node node-b sends; node node-a walks"


# -- the queue's side: the walk lease ----------------------------------------------------------
@pytest.fixture
def nodes(
    postgres_cluster: PostgresCluster, pg_database: str, tmp_path: Path
) -> Iterator[tuple[Queue, Queue]]:
    a, b = (
        open_queue(node_config(postgres_cluster, pg_database, tmp_path, n)).open()
        for n in ("node-a", "node-b")
    )
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def age_walks(queue: Queue, seconds: float) -> None:
    """The walk leases *seconds* nearer their end (on the database's clock they are kept on)."""
    with queue._tx() as db:
        db.execute("UPDATE migrate_walks SET lease_until = lease_until - ?", (seconds,))


def test_one_node_walks_and_another_takes_the_walk_over_once_its_lease_runs_out(
    nodes: tuple[Queue, Queue],
) -> None:
    a, b = nodes
    walk = a.take_walk("m", LEASE)
    assert walk.mine and walk.node == "node-a" and walk.walked is None
    seen = b.take_walk("m", LEASE)
    assert not seen.mine and seen.node == "node-a" and seen.started == walk.started
    assert a.renew_walk("m", LEASE, 3)
    age_walks(a, LEASE - 1)  # renewed: still a's
    assert not b.take_walk("m", LEASE, seen.started).mine
    age_walks(a, 2)  # a stopped renewing: its lease ran out
    taken = b.take_walk("m", LEASE, seen.started)
    assert taken.mine and taken.node == "node-b"
    assert taken.started == walk.started  # the same run: the report counts from its start
    assert not a.renew_walk("m", LEASE, 5)  # a learns it lost the walk
    assert not a.end_walk("m", 5)
    assert b.end_walk("m", 0)
    [row] = a.walks(["m", "other"])
    assert (row.node, row.started, row.walked is not None) == ("node-b", walk.started, True)


def test_a_walked_source_is_joined_while_files_are_left_and_walked_anew_once_all_are_done(
    nodes: tuple[Queue, Queue],
) -> None:
    a, b = nodes
    first = a.take_walk("m", LEASE)
    a.enqueue([NewFile("m", "pacs", "/t/f1", "f1", 10, 1)])
    assert a.end_walk("m", 0)
    joined = b.take_walk("m", LEASE)
    assert not joined.mine and joined.walked is not None  # files left: b joins the run
    [row] = a.jobs("pending")
    a.finish(row.id, state="sent", was="pending")
    # nothing left: b, which joined this run, sees it walked; a newcomer begins a new run
    assert not b.take_walk("m", LEASE, joined.started).mine
    again = a.take_walk("m", LEASE)
    assert again.mine and again.started > first.started


def test_a_node_whose_last_run_died_mid_walk_walks_again(nodes: tuple[Queue, Queue]) -> None:
    a, _ = nodes
    first = a.take_walk("m", LEASE)
    again = a.take_walk("m", LEASE)  # the lock file says no other process is node-a
    assert again.mine and again.started == first.started


@pytest.fixture
def walking(
    postgres_cluster: PostgresCluster, pg_database: str, tmp_path: Path
) -> Iterator[tuple[Migration, str]]:
    """A migration of node-a (lease 6 s) that took the walk of its source (as ``_walk_one``
    does), and the source's name."""
    tree = tmp_path / "tree"
    tree.mkdir()
    config = load_config(
        make_layout(
            tmp_path / "a", "http://127.0.0.1:9/dicom-web",
            queue=postgres_cluster.url(pg_database), queue_password={"file": str(secret(tmp_path))},
            state="./state", node="node-a", lease=f"{LEASE:g}s",
        ).config
    )  # fmt: skip
    run = Migration(config, Options((tree,), "pacs"), out=io.StringIO())
    run.queue.open()
    try:
        name = run.sources[0].name
        run.walk = run.queue.take_walk(name, LEASE)
        yield run, name
    finally:
        run.queue.close()


def test_a_walk_ended_while_its_renewal_runs_is_not_taken_for_one_taken_over(
    walking: tuple[Migration, str],
) -> None:
    """The fleet thread reads the walk to renew it and is held up before its UPDATE (the
    queue's ``renew_walk`` wrapped to wait: a thread descheduled there); meanwhile the scan
    thread ends the walk.  The renewal must not find the walk ended and say that another node
    took it over: ``walk_lost`` would then make this node give up its next source's walk.
    The walk's end waits for the renewal, then ends it."""
    run, name = walking
    renew = run.queue.renew_walk
    read, go = threading.Event(), threading.Event()

    def held_up(source: str, lease: float, skipped: int) -> bool:
        read.set()
        assert go.wait(30)
        return renew(source, lease, skipped)

    run.queue.renew_walk = held_up  # type: ignore[method-assign]
    ended: list[bool] = []

    def thread(called: str, step: Callable[[], object]) -> threading.Thread:
        def run_step() -> None:
            try:
                step()
            finally:
                run.queue.release_connection()  # each thread has a connection of its own

        started = threading.Thread(target=run_step, name=called, daemon=True)
        started.start()
        return started

    fleet = thread("fleet", run._renew_walk)
    assert read.wait(30)
    scan = thread("scan", lambda: ended.append(run._leave_walk(name)))
    scan.join(1.0)  # ended at once, or waiting for the renewal
    go.set()
    fleet.join(30)
    scan.join(30)
    assert ended == [True]
    assert not run.walk_lost.is_set(), "the walk's own end taken for a takeover"


@pytest.mark.timeout(120)
def test_a_walk_that_cannot_be_renewed_says_so_once_until_it_is_renewed_again(
    walking: tuple[Migration, str],
    postgres_cluster: PostgresCluster,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While the database is away the fleet thread's renewals of the walk fail every few
    seconds: one warning (as the fleet says it lost the database), and one line when the
    walk is renewed again."""
    run, _ = walking
    postgres_cluster.stop()
    try:
        with caplog.at_level(logging.INFO, logger="stowd.migrate"):
            for _ in range(3):
                run._renew_walk()
    finally:
        postgres_cluster.start()
        postgres_cluster.wait_accepting()
    assert caplog.text.count("cannot renew the walk") == 1, caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="stowd.migrate"):
        run._renew_walk()
        run._renew_walk()
    assert caplog.text.count("is renewed again") == 1, caplog.text
    assert not run.walk_lost.is_set()


def secret(folder: Path, node: str = "node-a") -> Path:
    path = folder / f"{node}.password"
    path.write_text(PASSWORD + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


# -- two ``stowd migrate`` processes as two nodes ----------------------------------------------
def layout(
    root: Path, orthanc: Orthanc, cluster: PostgresCluster, database: str, node: str
) -> Layout:
    secret = root.parent / f"{node}.password"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text(PASSWORD + "\n", encoding="utf-8")
    secret.chmod(0o600)
    # about 20 files/s a node: neither node is done before the other starts sending
    dest = {"url": orthanc.dicomweb_url, "workers": 1, "batch": {"max_files": 2}}
    return make_layout(
        root,
        orthanc.dicomweb_url,
        queue=cluster.url(database),
        queue_password={"file": str(secret)},
        state="./state",
        node=node,
        lease=f"{LEASE:g}s",
        destinations={"pacs": {**dest, "max_rate": "200kB/s"}},
    )


@pytest.mark.timeout(120)
def test_the_fleet_thread_keeps_the_walk_lease_while_the_main_loop_is_held_up(
    postgres_cluster: PostgresCluster, pg_database: str, tmp_path: Path
) -> None:
    """A migration walking a source holds its walk lease as long as its fleet thread runs,
    whatever its main loop does (here: nothing at all, as a loop held up by a slow count or
    a stalled terminal): node-b, looking for longer than a lease and a half, never takes
    the walk over."""
    tree = tmp_path / "tree"
    tree.mkdir()
    secret = tmp_path / "node-a.password"
    secret.write_text(PASSWORD + "\n", encoding="utf-8")
    secret.chmod(0o600)
    config = load_config(
        make_layout(
            tmp_path / "a",
            "http://127.0.0.1:9/dicom-web",
            queue=postgres_cluster.url(pg_database),
            queue_password={"file": str(secret)},
            state="./state",
            node="node-a",
            lease=f"{LEASE:g}s",
        ).config
    )
    run = Migration(config, Options((tree,), "pacs"), out=io.StringIO())
    b = open_queue(node_config(postgres_cluster, pg_database, tmp_path, "node-b")).open()
    run.queue.open()
    try:
        assert run.fleet is not None
        run.fleet.start()
        name = run.sources[0].name
        run.walk = run.queue.take_walk(name, LEASE)  # as ``_walk_one`` does
        assert run.walk.mine
        until = time.monotonic() + LEASE * 1.5
        while time.monotonic() < until:
            seen = b.take_walk(name, LEASE, run.walk.started)
            assert not seen.mine and seen.node == "node-a", "node-b took a live walk over"
            time.sleep(0.5)
        assert not run.walk_lost.is_set()
    finally:
        if run.fleet is not None:
            run.fleet.close()
        run.queue.close()
        b.close()


def make_tree(tree: Path, folders: int, per_folder: int) -> list[str]:
    uids = []
    for f in range(folders):
        for i in range(per_folder):
            uids.append(make_instance(tree / f"d{f:03d}" / f"i{i}.dcm", size_bytes=8_000))
    return uids


def start(layout: Layout, tree: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "stowd", "migrate", "-c", str(layout.config), *ARGS, str(tree)],
            stdout=out,
            stderr=out,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


@contextlib.contextmanager
def running() -> Iterator[list[subprocess.Popen[bytes]]]:
    """The processes the test adds to the list, killed on the way out if they still run."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(60)


def admin(cluster: PostgresCluster, database: str) -> psycopg.Connection[Any]:
    return psycopg.connect(cluster.url(database), password=PASSWORD, autocommit=True)


def walk_row(conn: psycopg.Connection[Any]) -> tuple[Any, ...] | None:
    return conn.execute("SELECT node, walked FROM migrate_walks").fetchone()


@contextlib.contextmanager
def walk_blocked(
    cluster: PostgresCluster, database: str, tree: Path, first: str
) -> Iterator[psycopg.Connection[Any]]:
    """The walker's first chunk waits to be queued: an uncommitted row of the same path
    (``first``) makes its insert wait on the unique index of active paths, while everything
    else (its walk lease, the other node) goes on.  Rolled back on the way out."""
    name = source_name(tree, keep=False)
    block = psycopg.connect(cluster.url(database), password=PASSWORD)
    try:
        block.execute(
            "INSERT INTO files (source, destination, path, rel, size, mtime_ns, state, queued_at)"
            " VALUES (%s, 'pacs', %s, 'x', 1, 1, 'pending', 0)",
            (name, first),
        )
        yield block
    finally:
        block.rollback()
        block.close()


def waiting_insert(conn: psycopg.Connection[Any]) -> bool:
    """A session waits for a lock to queue files (the walker's chunk)."""
    row = conn.execute(
        "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND query LIKE 'INSERT INTO files%%'"
    ).fetchone()
    return bool(row and row[0])


def summary(log: Path) -> str:
    text = log.read_text(errors="replace")
    return text[text.rindex("stowd migrate finished") :] if "migrate finished" in text else text


def nodes_line(log: Path) -> dict[str, int]:
    line = re.search(r"nodes: +(.*)", summary(log))
    assert line, log.read_text()
    return {n: int(c) for n, c in re.findall(r"(node-\w) stored (\d+) file", line.group(1))}


def prepared(
    tmp_path: Path, orthanc: Orthanc, cluster: PostgresCluster, database: str
) -> tuple[Layout, Layout]:
    setup = open_queue(node_config(cluster, database, tmp_path, "setup")).open()
    setup.close()  # the schema is there before the test's own row is
    return (
        layout(tmp_path / "a", orthanc, cluster, database, "node-a"),
        layout(tmp_path / "b", orthanc, cluster, database, "node-b"),
    )


@pytest.mark.timeout(180)
def test_two_nodes_migrate_one_tree_each_file_stored_once_and_both_report_it_all(
    tmp_path: Path, orthanc: Orthanc, postgres_cluster: PostgresCluster, pg_database: str
) -> None:
    """node-a walks (its first chunk held back until node-b runs too), both send; each file
    is sent once and moved to tree.sent, and either node's summary counts all of them."""
    tree = tmp_path / "tree"
    uids = make_tree(tree, folders=40, per_folder=3)
    la, lb = prepared(tmp_path, orthanc, postgres_cluster, pg_database)
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    with admin(postgres_cluster, pg_database) as conn, running() as procs:
        with walk_blocked(postgres_cluster, pg_database, tree, str(tree / "d000" / "i0.dcm")):
            procs.append(a := start(la, tree, log_a))
            wait_for(lambda: waiting_insert(conn), 60, "a walks", log_a.read_text)
            assert walk_row(conn) == ("node-a", None)
            procs.append(b := start(lb, tree, log_b))
            wait_for(lambda: WAITS in log_b.read_text(), 60, "b waits", log_b.read_text)
        assert a.wait(120) == 0, log_a.read_text()
        assert b.wait(120) == 0, log_b.read_text()
        node, walked = walk_row(conn) or ("", None)
        assert node == "node-a" and walked is not None
        rows = conn.execute(
            "SELECT path, state, attempts, node FROM files WHERE path LIKE %s",
            (f"{tree}/%",),
        ).fetchall()
    assert len(rows) == len(uids) == 120
    assert {r[1] for r in rows} == {"sent"} and {r[2] for r in rows} == {
        0
    }  # sent once, never tried again
    assert len({r[0] for r in rows}) == 120
    assert orthanc.instance_count() == 120 and orthanc.sop_instance_uids() == set(uids)
    assert len(list((tmp_path / "tree.sent").rglob("*.dcm"))) == 120
    for log in (log_a, log_b):
        assert re.search(r"stored: +120 file\(s\)", summary(log)), log.read_text()
        stored = nodes_line(log)
        assert sum(stored.values()) == 120 and stored["node-a"] > 0 and stored["node-b"] > 0
        assert "walked by node-a" in summary(log)


@pytest.mark.timeout(180)
def test_a_walker_killed_mid_walk_is_taken_over_and_everything_is_migrated(
    tmp_path: Path, orthanc: Orthanc, postgres_cluster: PostgresCluster, pg_database: str
) -> None:
    """node-a dies (kill -9) while its walk waits to queue its first chunk; node-b, which
    was waiting for that walk, takes it over once a's walk lease runs out, walks the tree
    again and migrates every file."""
    tree = tmp_path / "tree"
    uids = make_tree(tree, folders=20, per_folder=2)
    la, lb = prepared(tmp_path, orthanc, postgres_cluster, pg_database)
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    with admin(postgres_cluster, pg_database) as conn, running() as procs:
        with walk_blocked(postgres_cluster, pg_database, tree, str(tree / "d000" / "i0.dcm")):
            procs.append(a := start(la, tree, log_a))
            wait_for(lambda: waiting_insert(conn), 60, "a walks", log_a.read_text)
            procs.append(b := start(lb, tree, log_b))
            wait_for(lambda: WAITS in log_b.read_text(), 60, "b waits", log_b.read_text)
            a.send_signal(signal.SIGKILL)
            a.wait(30)
            assert walk_row(conn) == ("node-a", None)  # killed mid-walk
        assert b.wait(120) == 0, log_b.read_text()
        assert walk_row(conn)[0] == "node-b"  # type: ignore[index]
    text = log_b.read_text()
    assert "took over the walk of" in text and "from node node-a" in text
    assert orthanc.instance_count() == 40 and orthanc.sop_instance_uids() == set(uids)
    assert len(list((tmp_path / "tree.sent").rglob("*.dcm"))) == 40
    assert not list(tree.rglob("*.dcm"))
    assert re.search(r"stored: +40 file\(s\)", summary(log_b)), text
    assert nodes_line(log_b) == {"node-b": 40}


@pytest.mark.timeout(180)
def test_the_claims_of_a_node_that_died_are_taken_over_during_the_run(
    tmp_path: Path, orthanc: Orthanc, postgres_cluster: PostgresCluster, pg_database: str
) -> None:
    """node-x had queued and claimed the tree's files when it died; node-b's migration does
    not queue them again, takes the claims over once their lease runs out, and sends them."""
    tree = tmp_path / "tree"
    uids = make_tree(tree, folders=5, per_folder=2)
    _, lb = prepared(tmp_path, orthanc, postgres_cluster, pg_database)
    x = open_queue(node_config(postgres_cluster, pg_database, tmp_path, "node-x")).open()
    try:
        name = source_name(tree, keep=False)
        files = sorted(tree.rglob("*.dcm"))
        x.enqueue(
            [
                NewFile(name, "pacs", str(p), str(p.relative_to(tree)), p.stat().st_size,
                        p.stat().st_mtime_ns)
                for p in files
            ]
        )  # fmt: skip
        keys = {}
        for p in files:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            keys[str(p)] = (ds.StudyInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID)
        jobs = x.unclassified(100)
        x.set_classified([Classification(j, "dicom", *keys[j.path]) for j in jobs])
        claimed = 0
        while batch := x.claim_batch(["pacs"], pick=lambda _d, js: js, candidates=9, lease=LEASE):
            claimed += len(batch)  # a study at a time
        assert claimed == 10
    finally:
        x.close()  # and never renews them: node-x died
    log_b = tmp_path / "b.log"
    with running() as procs:
        procs.append(b := start(lb, tree, log_b))
        assert b.wait(120) == 0, log_b.read_text()
    text = log_b.read_text()
    assert "took over 10 claims of node node-x" in text
    assert orthanc.instance_count() == 10 and orthanc.sop_instance_uids() == set(uids)
    assert len(list((tmp_path / "tree.sent").rglob("*.dcm"))) == 10
    assert re.search(r"stored: +10 file\(s\)", summary(log_b)), text
