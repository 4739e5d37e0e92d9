"""A node's link to a shared queue's database that dies silently (issue 23): no FIN, no RST,
packets just stop arriving.  The node's connections carry TCP keepalives and a user timeout
derived from its lease (``postgres.link_watch``), so a query in flight fails within a
fraction of the lease, not after the kernel's ~15 minutes of retransmissions.

A silent drop needs the kernel's help (a user-space proxy's own kernel would answer the
keepalive probes): the node runs in a network namespace of its own, joined to this one by a
veth pair, and the link is cut by taking this side of the pair down (what the node sends is
then dropped without a word).  It needs root and ``ip``.

The server's end of the link is watched too (from the same lease, sent as ``options``): a
node cut off while it holds its name finds it free again once the link is back, the server
having ended its old sessions within seconds (there the node reaches a server of its own
listening on the pair, and both ends are taken down)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from harness import wait_for
from needs import require
from postgres import PASSWORD, PostgresCluster, postgres_missing_reason

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
LINKPROXY = ROOT / "bench" / "linkproxy.py"
LEASE = 6.0  # the shortest a config may give: the link is watched every lease/12..lease/4
BOUND = 30.0  # seconds: far below the ~15 min of retransmissions, well above the ~3 s expected

# node ``cut`` (its queue made, not opened) from argv: url, secret file, anchor, lease
QUEUE = """
import logging, os, sys, time
from pathlib import Path
from stowd.config.model import Config, Database, Secret
from stowd.errors import QueueError
from stowd.pipeline.queue import open_queue

url, secret, anchor, lease = sys.argv[1:5]
database = Database(url, Secret("file", secret))
queue = open_queue(
    Config(
        path=Path(anchor).parent / "cut.yaml", queue=Path(anchor), sources=(), destinations={},
        database=database, node="cut", lease=float(lease),
    )
)
"""

NODE = (
    QUEUE
    + """
queue.open(lock=False)
print("querying", flush=True)
began = time.monotonic()
try:
    queue._conn().execute("SELECT pg_sleep(60)")
    print("answered", flush=True)
except QueueError as exc:
    print(f"failed after {time.monotonic() - began:.1f}s: {exc}", flush=True)
"""
)

# a node that holds its name (``open()``) and beats once for each line it reads
BEATING = (
    QUEUE
    + """
logging.basicConfig(level=logging.WARNING, format="log: %(message)s", stream=sys.stdout)
queue.open()
print("open", flush=True)
for _ in sys.stdin:
    try:
        queue.heartbeat(pid=os.getpid(), host="h", started=0.0, version="t", lease=float(lease))
        print("beat ok", flush=True)
    except QueueError as exc:
        print(f"beat failed: {type(exc).__name__}: {exc}", flush=True)
"""
)


def _problem() -> str | None:
    if os.geteuid() != 0:
        return "a silent link cut needs root (a network namespace and a veth pair)"
    if shutil.which("ip") is None:
        return "a silent link cut needs iproute2's ip"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def veth() -> Iterator[tuple[str, str, str, str]]:
    """A network namespace joined to this one by a veth pair: (namespace, this side's
    interface, this side's address, the namespace's side's interface); removed afterwards."""
    require(_problem())
    tag = f"{os.getpid() % 100000}"
    ns, here, there = f"stowd-cut{tag}", f"stc{tag}a", f"stc{tag}b"
    net = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
    _ip("netns", "add", ns)
    try:
        _ip("link", "add", here, "type", "veth", "peer", "name", there)
        _ip("link", "set", there, "netns", ns)
        _ip("addr", "add", f"{net}.1/30", "dev", here)
        _ip("link", "set", here, "up")
        _ip("-n", ns, "addr", "add", f"{net}.2/30", "dev", there)
        _ip("-n", ns, "link", "set", there, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        yield ns, here, f"{net}.1", there
    finally:
        subprocess.run(["ip", "link", "del", here], check=False, capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=30)


def _secret(tmp_path: Path) -> Path:
    secret = tmp_path / "cut.password"
    secret.write_text(PASSWORD + "\n", encoding="utf-8")
    secret.chmod(0o600)
    return secret


def _sessions(cluster: PostgresCluster, database: str) -> int:
    """The server's sessions of node ``cut`` (that the server still believes alive)."""
    with psycopg.connect(cluster.url(database), password=PASSWORD, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'stowd cut'"
        ).fetchone()
    return int(row[0]) if row else 0


def _sleeping(cluster: PostgresCluster, database: str) -> bool:
    with psycopg.connect(cluster.url(database), password=PASSWORD, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%' "
            "AND state = 'active' AND application_name = 'stowd cut'"
        ).fetchone()
    return bool(row and row[0])


@pytest.mark.timeout(180)
def test_a_query_on_a_link_that_died_silently_fails_within_a_lease(
    veth: tuple[str, str, str, str],
    postgres_cluster: PostgresCluster,
    pg_database: str,
    tmp_path: Path,
) -> None:
    """A node (lease 6 s) in a namespace of its own waits for a query's answer through a
    link that then drops every packet without a word: the query fails within seconds (the
    keepalive probes go unanswered), not after the kernel's ~15 minutes."""
    ns, here, address, _ = veth
    link = subprocess.Popen(
        [sys.executable, str(LINKPROXY), "--listen", f"{address}:0",
         "--target", f"127.0.0.1:{postgres_cluster.port}", "--delay", "0ms", "--rate", "10Gbit"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    node: subprocess.Popen[str] | None = None
    try:
        assert link.stdout is not None
        port = int(link.stdout.readline().strip().rpartition(":")[2])
        secret = tmp_path / "cut.password"
        secret.write_text(PASSWORD + "\n", encoding="utf-8")
        secret.chmod(0o600)
        url = f"postgresql://stowd@{address}:{port}/{pg_database}?sslmode=disable"
        node = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", NODE,
             url, str(secret), str(tmp_path / "cut" / "node.queue"), str(LEASE)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        assert node.stdout is not None
        first = node.stdout.readline()
        assert first.strip() == "querying", first + node.stdout.read()
        wait_for(lambda: _sleeping(postgres_cluster, pg_database), 30, "the query in flight")
        _ip("link", "set", here, "down")  # from now on the node's packets vanish
        cut = time.monotonic()
        try:
            out, _ = node.communicate(timeout=BOUND)
        except subprocess.TimeoutExpired:
            node.kill()
            node.communicate(timeout=30)
            pytest.fail(f"the query still waits {BOUND:g}s after the link died")
        assert out.startswith("failed after"), out
        assert time.monotonic() - cut < BOUND
    finally:
        if node is not None and node.poll() is None:
            node.kill()
            node.communicate(timeout=30)
        link.terminate()
        link.communicate(timeout=30)


@pytest.mark.timeout(240)
def test_a_node_cut_off_silently_takes_its_name_again_once_the_link_is_back(
    veth: tuple[str, str, str, str], tmp_path: Path
) -> None:
    """A node (lease 6 s) holding its name loses its link without a word; its own end gives
    its connections up, but the server's end must too: else the server keeps the node's old
    sessions, and the name's lock with them, for its default two hours of keepalive idle, and
    the node, once the link is back, finds its name "taken by another stowd" (its own dead
    session) and claims nothing.  With the server's keepalives from the lease, the old
    sessions end within seconds and the node takes its name again.  The node reaches the
    server itself (a cluster of its own, listening on this side of the veth pair): a relay
    between them would end the server's sessions itself."""
    ns, here, address, there = veth
    require(postgres_missing_reason())
    cluster = PostgresCluster(listen=(address,))
    node: subprocess.Popen[str] | None = None
    try:
        cluster.start()
        database = cluster.new_database()
        url = f"postgresql://stowd@{address}:{cluster.port}/{database}?sslmode=disable"
        node = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", BEATING,
             url, str(_secret(tmp_path)), str(tmp_path / "cut" / "node.queue"), str(LEASE)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        assert node.stdin is not None and node.stdout is not None
        first = node.stdout.readline()
        assert first.strip() == "open", first + node.stdout.read()
        assert _sessions(cluster, database) >= 1

        def beat() -> str:
            assert node is not None and node.stdin is not None and node.stdout is not None
            node.stdin.write("beat\n")
            node.stdin.flush()
            lines: list[str] = []
            while True:  # the node's log lines, then the beat's own
                line = node.stdout.readline()
                assert line, "".join(lines) + "the node ended"
                lines.append(line)
                if line.startswith("beat "):
                    return "".join(lines)

        # both ends down: what either sends vanishes (with this end down only, the node's
        # packets still arrive, and the server's answers, retransmitted once the link is
        # back, would meet the node's reset and end its sessions anyway)
        _ip("link", "set", here, "down")
        _ip("-n", ns, "link", "set", there, "down")
        out = beat()
        assert "beat failed" in out, out
        # the server gives the node's sessions up (their probes, or its answers, are never
        # acknowledged): within seconds, not after two hours of idle or ~15 minutes of
        # retransmissions
        wait_for(
            lambda: _sessions(cluster, database) == 0,
            BOUND,
            "the server ending the node's sessions",
        )
        _ip("-n", ns, "link", "set", there, "up")
        _ip("link", "set", here, "up")  # the link is back
        said: list[str] = []
        deadline = time.monotonic() + BOUND
        while True:
            out = beat()
            said.append(out)
            if out.endswith("beat ok\n"):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the node has not its name {BOUND:g}s after the link came back: "
                            + "".join(said))  # fmt: skip
            time.sleep(0.5)  # a beat a half second: a node's own beats come far less often
        assert "took its name again" in "".join(said), said
    finally:
        if node is not None and node.poll() is None:
            node.kill()
            node.communicate(timeout=30)
        cluster.remove()
