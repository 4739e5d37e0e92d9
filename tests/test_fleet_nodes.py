"""Three stowd nodes share one PostgreSQL queue and one drop tree (issue 23), all real: three
``stowd run`` processes (own ``node:`` names, own ``state:`` folders), one PostgreSQL database
of the session's cluster (tests/support/postgres.py; TLS with ``sslmode=verify-full`` and the
test CA, the password from a secret file), one drop tree watched by polling as on a share, one
Orthanc.  Each node reaches Orthanc through its own counting proxy (tests/support/stowproxy.py),
so the test sees every SOPInstanceUID POSTed, and by which node.

- 5,000 files: each stored once (Orthanc's instances, and the POSTed UIDs: each once), every
  node did part of the work (its own POSTs and the queue's rows it settled), every file in
  ``sent/`` once, nothing in ``failed/``, nothing left in the drop tree.
- kill -9 of a node while it holds claims (its uploads held in its proxy): the others take its
  claims over once their lease ran out; nothing is lost, and a UID is POSTed twice only for a
  claim that was taken over.
- PostgreSQL stopped for 60 s mid-run (``pg_ctl stop -m fast``, 60 s, start): every node stays
  up, moves nothing while the database is away, and finishes afterwards; nothing in ``failed/``.
- One node cut off from the database (its connections go through bench/linkproxy.py, cut with
  SIGUSR1) while it holds claims: the other two finish everything, its claims included, the
  cut-off node settles nothing meanwhile, and once mended (SIGUSR2) it works again: it alone
  sends a second set of files after the other two stopped.

The fault tests use 1,500 files (the spec asks for 5,000 in the main run; a fault is about
the claims in flight when it strikes, not about the total, and three runs of 5,000 on a busy
2-core machine would take most of an hour).  The lease is short in the test config
(``LEASE``), so that a takeover happens within a minute or two.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from dicomgen import make_instance_bytes
from harness import Layout, Stowd
from orthanc import Orthanc
from postgres import PASSWORD, PostgresCluster
from stowproxy import StowProxy, sop_instance_uids

pytestmark = pytest.mark.timeout(1200)

NODES = ("gw-a", "gw-b", "gw-c")
FILES = 5000
FAULT_FILES = 1500
PER_STUDY = 100
OUTAGE = 60.0  # seconds PostgreSQL is stopped (the spec's figure)
LEASE = "20s"  # a claim's lease without renewal (top-level `lease:`, default 2 minutes)
REPO = Path(__file__).resolve().parent.parent
LINKPROXY = REPO / "bench" / "linkproxy.py"
_PLACEHOLDER = "199999999999"  # a UID's last component in a template, replaced per file


@dataclass
class Node:
    """One stowd host: its folder (config, state, logs), its proxy before Orthanc, its
    daemon once started."""

    name: str
    layout: Layout
    proxy: StowProxy
    daemon: Stowd | None = None

    def start(self) -> None:
        self.daemon = Stowd(self.layout).start()

    @property
    def log(self) -> str:
        return self.daemon.log if self.daemon else ""

    def alive(self) -> bool:
        return self.daemon is not None and self.daemon.alive()

    def posted(self) -> Counter[str]:
        """SOPInstanceUIDs this node POSTed (that reached Orthanc), with how often."""
        with self.proxy._lock:
            bodies = list(self.proxy.bodies)
        return Counter(uid for body in bodies for uid in sop_instance_uids(body))


@dataclass
class Fleet:
    """The shared tree, the database, Orthanc and the nodes of one test."""

    root: Path
    orthanc: Orthanc
    cluster: PostgresCluster
    database: str
    nodes: dict[str, Node] = field(default_factory=dict)
    links: list[subprocess.Popen[str]] = field(default_factory=list)
    batches: int = 0

    @property
    def share(self) -> Path:
        return self.root / "share"

    @property
    def drop(self) -> Path:
        return self.share / "drop"

    @property
    def sent(self) -> Path:
        return self.share / "sent"

    @property
    def failed(self) -> Path:
        return self.share / "failed"

    # -- nodes ---------------------------------------------------------------------------
    def add_node(self, name: str, port: int | None = None, *, lease: str | None = LEASE) -> Node:
        """Node ``name`` configured (its database connections to ``port``, another than the
        server's when they go through a link; ``lease`` None: the default), not started."""
        folder = self.root / "nodes" / name
        folder.mkdir(parents=True)
        secret = self.root / "db.password"
        if not secret.exists():
            secret.write_text(f"{PASSWORD}\n", encoding="utf-8")
            secret.chmod(0o600)
        url = self.cluster.url(
            self.database, sslmode="verify-full", sslrootcert=str(self.cluster.ca_cert)
        )
        if port is not None:
            url = url.replace(f":{self.cluster.port}/", f":{port}/")
        proxy = StowProxy(self.orthanc.dicomweb_url)
        doc: dict[str, Any] = {
            "queue": url,
            "queue_password": {"file": str(secret)},
            "node": name,
            "state": str(folder / "state"),
            **({"lease": lease} if lease else {}),
            "log_level": "INFO",
            "shutdown_timeout": "10s",
            "retry": {"initial": "500ms", "maximum": "2s", "hold_probe": "1s", "max_age": "1h"},
            "sources": [
                {
                    "name": "share",
                    "watch": str(self.drop),
                    "sent": str(self.sent),
                    "failed": str(self.failed),
                    "destination": "pacs",
                    "polling": True,  # as on NFS/SMB: inotify sees no other host's writes
                    "quiet_period": "1s",
                    "rescan_interval": "10s",
                }
            ],
            "destinations": {
                "pacs": {
                    "url": proxy.base,
                    "workers": 2,
                    "timeouts": {"read": "30s"},
                }
            },
        }
        config = folder / "stowd.yaml"
        config.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        node = Node(name, Layout(folder, config), proxy)
        self.nodes[name] = node
        return node

    def start(self, *names: str) -> None:
        for name in names or tuple(self.nodes):
            self.nodes[name].start()
        for name in names or tuple(self.nodes):
            self.wait(
                lambda n=name: "stowd started: " in self.nodes[n].log,  # type: ignore[misc]
                120,
                f"node {name} started",
            )

    def link(self) -> int:
        """A link before the database (``db_link``) that ``close`` stops: its port."""
        port, proc = db_link(self.cluster)
        self.links.append(proc)
        return port

    def close(self) -> None:
        for node in self.nodes.values():
            if node.daemon is not None:
                node.daemon.stop()
        for node in self.nodes.values():
            node.proxy.gate.set()
            node.proxy.stop()
        for proc in self.links:
            stop_link(proc)

    # -- files ---------------------------------------------------------------------------
    def drop_files(self, count: int) -> dict[str, str]:
        """``count`` small DICOM files in studies of ``PER_STUDY``, each study written in a
        folder beside the drop tree and renamed into it (a writer's atomic rename on the
        share); path below drop/ -> SOPInstanceUID.  One encoded file per study, its last
        UID component replaced per file: 5,000 files in about a second."""
        self.batches += 1
        base = f"1.2.826.0.1.3680043.8.498.23.{self.batches}"
        marker = f"{base}.{_PLACEHOLDER}".encode()
        stage = self.root / "stage"
        stage.mkdir(exist_ok=True)
        uids: dict[str, str] = {}
        for study in range(-(-count // PER_STUDY)):
            template, _ = make_instance_bytes(sop_uid=marker.decode(), patient_id=f"F{study}")
            assert template.count(marker) == 2, "the UID in the File Meta and in the data set"
            name = f"b{self.batches}-study{study:03d}"
            folder = stage / name
            folder.mkdir()
            for i in range(min(PER_STUDY, count - study * PER_STUDY)):
                uid = f"{base}.{10**11 + study * PER_STUDY + i}"  # as long as the placeholder
                (folder / f"IM{i:05d}.dcm").write_bytes(template.replace(marker, uid.encode()))
                uids[f"{name}/IM{i:05d}.dcm"] = uid
            folder.rename(self.drop / name)
        return uids

    @staticmethod
    def files(folder: Path) -> list[str]:
        """Every file below ``folder`` (error notes too), as paths below it."""
        if not folder.exists():
            return []
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())

    # -- the queue, seen from the database ---------------------------------------------
    def sql(self, query: str, *params: Any) -> list[Any]:
        return self.cluster.admin(query, params, database=self.database)

    def states(self) -> dict[str, int]:
        return {s: n for s, n in self.sql("SELECT state, count(*) FROM files GROUP BY state")}

    def settled_by(self) -> dict[str, int]:
        rows = self.sql("SELECT node, count(*) FROM files WHERE state = 'sent' GROUP BY node")
        return {node: n for node, n in rows}

    def claims(self, node: str) -> int:
        rows = self.sql("SELECT count(*) FROM files WHERE state = 'claimed' AND node = %s", node)
        return int(rows[0][0])

    def sent_rows(self) -> set[str]:
        rows = self.sql("SELECT path FROM files WHERE state = 'sent'")
        return {str(Path(p).relative_to(self.drop)) for (p,) in rows}

    # -- waiting -------------------------------------------------------------------------
    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Until ``predicate``; else fail with what the fleet looks like and every node's log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.report()}")

    def report(self) -> str:
        lines = [
            f"drop: {len(self.files(self.drop))} files, sent: {len(self.files(self.sent))}, "
            f"failed: {len(self.files(self.failed))} {self.files(self.failed)[:5]}"
        ]
        try:
            lines.append(f"queue states: {self.states()}, settled by: {self.settled_by()}")
        except Exception as exc:  # the database is down in this test
            lines.append(f"queue: cannot read ({exc})")
        for node in self.nodes.values():
            state = "running" if node.alive() else "not running"
            tail = "\n    ".join(node.log.splitlines()[-25:])
            lines.append(f"--- node {node.name} ({state}), POSTs {len(node.proxy.bodies)}:\n"
                         f"    {tail}")  # fmt: skip
        return "\n".join(lines)

    def wait_all_sent(self, expected: dict[str, str], timeout: float) -> None:
        """Until every expected file is in sent/, the drop tree is empty and the queue
        holds nothing but sent rows."""
        want = set(expected)

        def done() -> bool:
            return (
                want <= set(self.files(self.sent))
                and not self.files(self.drop)
                and set(self.states()) <= {"sent"}
            )

        self.wait(done, timeout, f"{len(want)} files in sent/ and the queue at rest")

    # -- the checks every test makes -----------------------------------------------------
    def check_delivered(self, expected: dict[str, str], *, resent: int = 0) -> Counter[str]:
        """Each file stored in Orthanc, in sent/ once, nothing in failed/ or in the drop
        tree; each UID POSTed at least once and at most ``resent`` UIDs more than once.
        The POSTs of every node summed, per UID."""
        uids = set(expected.values())
        stored = self.orthanc.sop_instance_uids()
        assert stored == uids, (
            f"Orthanc holds {len(stored)} instances: {len(uids - stored)} missing "
            f"{sorted(uids - stored)[:5]}, {len(stored - uids)} unknown\n{self.report()}"
        )
        assert self.orthanc.instance_count() == len(uids)
        posted: Counter[str] = Counter()
        for node in self.nodes.values():
            posted.update(node.posted())
        assert set(posted) == uids, f"POSTed other UIDs than dropped\n{self.report()}"
        twice = {uid: n for uid, n in posted.items() if n > 1}
        assert len(twice) <= resent, (
            f"{len(twice)} UIDs POSTed more than once (at most {resent} may be): "
            f"{sorted(twice.items())[:5]}\n{self.report()}"
        )
        sent = self.files(self.sent)
        assert sent == sorted(expected), (
            f"sent/ holds {len(sent)} files, not exactly the {len(expected)} dropped: "
            f"{sorted(set(sent) ^ set(expected))[:5]}\n{self.report()}"
        )
        assert self.files(self.failed) == [], f"failed/ is not empty\n{self.report()}"
        assert not set(sent) & set(self.files(self.failed))
        assert self.files(self.drop) == [], f"files left in the drop tree\n{self.report()}"
        assert self.sent_rows() >= set(expected), "a file in sent/ without its sent row"
        return posted


def db_link(cluster: PostgresCluster) -> tuple[int, subprocess.Popen[str]]:
    """bench/linkproxy.py before the database (no delay, no rate cap to speak of): the port
    it listens on, and its process (SIGUSR1 cuts the link, SIGUSR2 mends it)."""
    proc = subprocess.Popen(
        [sys.executable, str(LINKPROXY), "--target", f"127.0.0.1:{cluster.port}",
         "--delay", "0ms", "--rate", "10Gbit"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line:
        proc.communicate(timeout=30)
        raise AssertionError(f"linkproxy did not start (exit code {proc.returncode})")
    return int(line.rpartition(":")[2]), proc


def stop_link(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    proc.communicate(timeout=30)


@pytest.fixture
def fleet(
    tmp_path: Path, orthanc: Orthanc, postgres_cluster: PostgresCluster, pg_database: str
) -> Iterator[Fleet]:
    crew = Fleet(tmp_path, orthanc, postgres_cluster, pg_database)
    for folder in (crew.drop, crew.sent, crew.failed):
        folder.mkdir(parents=True)
    try:
        yield crew
    finally:
        crew.close()


def _sent_timeout(files: int) -> float:
    """Generous on a busy 2-core machine: 20 files/s at worst, and a takeover's minute."""
    return 120 + files / 20


def test_three_nodes_store_5000_files_from_one_tree_once_each(fleet: Fleet) -> None:
    for name in NODES:
        fleet.add_node(name, lease=None)  # nothing fails: the default lease
    fleet.start()
    expected = fleet.drop_files(FILES)
    fleet.wait_all_sent(expected, _sent_timeout(FILES))

    posted = fleet.check_delivered(expected, resent=0)
    assert all(n == 1 for n in posted.values())
    by_node = fleet.settled_by()
    assert set(by_node) == set(NODES), f"not every node settled files: {by_node}"
    assert sum(by_node.values()) == FILES
    for node in fleet.nodes.values():
        assert node.posted(), f"node {node.name} POSTed nothing\n{fleet.report()}"
        assert node.alive()
        quiet(node)


def quiet(node: Node) -> None:
    """A node that met nothing wrong logged no error, no traceback, and no trouble with
    the queue (a file another node queued meanwhile is no trouble)."""
    for line in node.log.splitlines():
        assert " ERROR " not in line and "Traceback" not in line, f"{node.name}: {line}"
        assert "cannot queue files now" not in line, f"{node.name}: {line}"


def test_a_node_killed_mid_run_loses_nothing(fleet: Fleet) -> None:
    for name in NODES:
        fleet.add_node(name)
    victim = fleet.nodes["gw-c"]
    victim.proxy.gate.clear()  # its answers held: its uploads are in flight when it dies
    fleet.start()
    expected = fleet.drop_files(FAULT_FILES)
    fleet.wait(
        lambda: len(victim.proxy.bodies) >= 1 and fleet.claims(victim.name) > 0,
        120,
        f"node {victim.name} holding claims with an upload in Orthanc",
    )
    held = fleet.claims(victim.name)
    assert victim.daemon is not None
    victim.daemon.kill()
    victim.proxy.gate.set()
    fleet.wait_all_sent(expected, _sent_timeout(FAULT_FILES))

    fleet.check_delivered(expected, resent=held)
    survivors = [fleet.nodes[n] for n in NODES if n != victim.name]
    took = [node for node in survivors if f"of node {victim.name}: its lease expired" in node.log]
    assert took, f"no node says it took over {victim.name}'s claims\n{fleet.report()}"
    assert fleet.claims(victim.name) == 0
    assert all(node.alive() for node in survivors)


def test_postgresql_stopped_for_a_minute_every_node_holds_and_resumes(fleet: Fleet) -> None:
    for name in NODES:
        fleet.add_node(name)
    fleet.start()
    expected = fleet.drop_files(FAULT_FILES)
    fleet.wait(lambda: len(fleet.files(fleet.sent)) >= 300, 300, "300 files sent")

    fleet.cluster.stop()
    stopped = time.monotonic()
    try:
        time.sleep(15)  # what was being moved when the database went has been moved
        before = fleet.files(fleet.sent)
        time.sleep(max(0.0, stopped + OUTAGE - time.monotonic()))  # the outage lasts 60 s
        after = fleet.files(fleet.sent)
        down = {n.name: n.alive() for n in fleet.nodes.values()}
    finally:
        fleet.cluster.start()
        fleet.cluster.wait_accepting()
    assert all(down.values()), f"a node ended while the database was away: {down}\n{fleet.report()}"
    assert after == before, (
        f"{len(set(after) - set(before))} files moved to sent/ while the database was away "
        f"(settled without a record)\n{fleet.report()}"
    )
    assert fleet.files(fleet.failed) == []

    fleet.wait_all_sent(expected, _sent_timeout(FAULT_FILES))
    fleet.check_delivered(expected, resent=FAULT_FILES)  # re-sends: claims whose settle failed
    for node in fleet.nodes.values():
        assert node.alive()
        assert "tries again" in node.log, f"node {node.name} never said it waits\n{node.log}"


def test_a_node_cut_off_from_the_database_settles_nothing_and_resumes(fleet: Fleet) -> None:
    port = fleet.link()
    link = fleet.links[-1]
    for name in NODES[:2]:
        fleet.add_node(name)
    cut = fleet.add_node(NODES[2], port=port)
    cut.proxy.gate.clear()  # its answers held: it holds claims when it is cut off
    fleet.start()
    expected = fleet.drop_files(FAULT_FILES)
    fleet.wait(
        lambda: len(cut.proxy.bodies) >= 1 and fleet.claims(cut.name) > 0,
        120,
        f"node {cut.name} holding claims with an upload in Orthanc",
    )
    held = fleet.claims(cut.name)
    settled_before = fleet.settled_by().get(cut.name, 0)
    link.send_signal(signal.SIGUSR1)
    cut.proxy.gate.set()  # its uploads end now, with no database to record them in

    fleet.wait_all_sent(expected, _sent_timeout(FAULT_FILES))
    assert cut.alive(), f"the cut-off node ended\n{fleet.report()}"
    assert fleet.settled_by().get(cut.name, 0) == settled_before
    assert set(fleet.files(fleet.sent)) == fleet.sent_rows(), "a file moved without its record"
    fleet.check_delivered(expected, resent=held)
    others = [fleet.nodes[n] for n in NODES[:2]]
    assert any(f"of node {cut.name}: its lease expired" in n.log for n in others), fleet.report()

    link.send_signal(signal.SIGUSR2)  # mended: the node works again, alone now
    for node in others:
        assert node.daemon is not None
        assert node.daemon.terminate() == 0
    more = fleet.drop_files(200)
    fleet.wait_all_sent({**expected, **more}, _sent_timeout(200))
    assert set(cut.posted()) >= set(more.values()), f"{cut.name} did not resume\n{fleet.report()}"
    fleet.check_delivered({**expected, **more}, resent=held)


def test_linkproxy_cut_closes_connections_and_mend_lets_them_in(
    postgres_cluster: PostgresCluster,
) -> None:
    """The tool of the cut-off test: a connection through the link works, is closed by a cut,
    a new one is refused while cut, and works again once mended."""
    import psycopg  # noqa: PLC0415 - postgres_cluster requires it

    port, link = db_link(postgres_cluster)

    def connect() -> psycopg.Connection[Any]:
        return psycopg.connect(
            host="127.0.0.1", port=port, user="stowd", password=PASSWORD,
            dbname="postgres", connect_timeout=5, sslmode="disable",
        )  # fmt: skip

    def fails(attempt: Callable[[], object]) -> bool:
        try:
            attempt()
        except psycopg.OperationalError:
            return True
        return False

    try:
        with connect() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            link.send_signal(signal.SIGUSR1)
            until(lambda: fails(lambda: conn.execute("SELECT 1")), "the connection cut")
        assert fails(connect), "a connection made through a cut link"
        link.send_signal(signal.SIGUSR2)
        until(lambda: not fails(lambda: connect().close()), "a connection once mended")
    finally:
        stop_link(link)


def until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.1)
