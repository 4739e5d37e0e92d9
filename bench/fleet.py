"""Several stowd nodes on one PostgreSQL queue (issue 23): files/s of 1, 2 and 3 nodes, and the
claims/s the database sustains with many light claimers.

    .venv/bin/python bench/fleet.py [--files 6000] [--size 64KiB] [--nodes 1,2,3]
        [--archives discard,orthanc] [--claimers 1,4,8,16] [--claim-seconds 10]

Needs PostgreSQL's server programs (Debian's ``postgresql``; a private cluster is made in a
temporary folder by tests/support/postgres.py, as the tests do) and the ``postgresql`` extra.

**Nodes.** For each archive (the discarding endpoint of bench/discard.py in its own process,
and a fresh local Orthanc per run) and each node count: a fresh database, N ``stowd run``
processes with their own ``node:`` and ``state:``, all watching one drop tree by polling
(as on a share), all sending to the one archive.  The study folders (hard links of one
generated set) are renamed into the drop tree at once; the time runs until every file is in
``sent/``.  Per node: the files it settled (the queue's rows by node) and its CPU seconds;
the total files/s.  All of it runs on this machine: the nodes, PostgreSQL and the archive
share its cores, so the sum is bounded by the CPU, not by the queue (the output says so).

**Claims.** K processes (light claimers, each a node of its own through stowd's own queue
code: ``claim_batch``, ``begin_settle``, ``finish_many``) claim and settle batches of 50 rows
(empty files that are never read) from a table filled beforehand, for ``--claim-seconds``;
claims/s and rows/s in total.  A node claims one batch per request it sends, so this is the
ceiling the database puts on a fleet, to compare with the batches/s the nodes needed above.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from benchlib import count_files, cpu_seconds, discard_process, stowd_env
from dicomgen import make_instance_bytes
from orthanc import Orthanc
from postgres import PASSWORD, PostgresCluster, node_config, postgres_missing_reason

from stowd.config.model import Config, Database
from stowd.config.secrets import Secret
from stowd.config.yamlwalk import parse_size
from stowd.pipeline.queue import Classification, NewFile, open_queue

BATCH = 50  # files per request (stowd's default batch.max_files) and rows per claim
STARTED = "stowd started: "


@dataclass
class NodeRun:
    name: str
    settled: int
    cpu: float


@dataclass
class Run:
    archive: str
    nodes: list[NodeRun]
    files: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.files / self.seconds


def generate(stage: Path, files: int, size: int) -> None:
    """``files`` DICOM files of about ``size`` bytes in studies of 100, written fast: one
    encoded file per study, its SOPInstanceUID's last component replaced per file."""
    marker = "1.2.826.0.1.3680043.8.498.24.199999999999"
    for study in range(-(-files // 100)):
        template, _ = make_instance_bytes(sop_uid=marker, size_bytes=size, patient_id=f"B{study}")
        folder = stage / f"study{study:04d}"
        folder.mkdir(parents=True)
        for i in range(min(100, files - study * 100)):
            uid = f"1.2.826.0.1.3680043.8.498.24.{10**11 + study * 100 + i}"
            (folder / f"IM{i:05d}.dcm").write_bytes(template.replace(marker.encode(), uid.encode()))


def node_doc(work: Path, cluster: PostgresCluster, database: str, name: str, url: str) -> Path:
    folder = work / "nodes" / name
    folder.mkdir(parents=True)
    secret = work / "db.password"
    if not secret.exists():
        secret.write_text(PASSWORD + "\n")
        secret.chmod(0o600)
    share = work / "share"
    doc: dict[str, Any] = {
        "queue": cluster.url(database, sslmode="verify-full", sslrootcert=str(cluster.ca_cert)),
        "queue_password": {"file": str(secret)},
        "node": name,
        "state": str(folder / "state"),
        "log_level": "INFO",
        "sources": [
            {
                "name": "share",
                "watch": str(share / "drop"),
                "sent": str(share / "sent"),
                "failed": str(share / "failed"),
                "destination": "pacs",
                "polling": True,
                "quiet_period": "1s",
            }
        ],
        "destinations": {"pacs": {"url": url}},
    }
    config = folder / "stowd.yaml"
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    return config


def run_nodes(
    cluster: PostgresCluster, stage: Path, archive: str, url: str, *, nodes: int, files: int
) -> Run:
    work = Path(tempfile.mkdtemp(prefix="fleet-", dir=stage.parent))
    database = cluster.new_database()
    incoming = work / "incoming"
    for study in sorted(stage.iterdir()):
        shutil.copytree(study, incoming / study.name, copy_function=os.link)
    (work / "share" / "drop").mkdir(parents=True)
    names = [f"node{i + 1}" for i in range(nodes)]
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = {n: work / f"{n}.log" for n in names}
    try:
        for name in names:
            config = node_doc(work, cluster, database, name, url)
            with open(logs[name], "wb") as log:
                procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "stowd", "run", "-c", str(config)],
                    stderr=log, env=stowd_env(),
                )  # fmt: skip
        deadline = time.monotonic() + 120
        while not all(STARTED in logs[n].read_text(errors="replace") for n in names):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs.values()):
                raise RuntimeError(f"a node did not start: see {work}")
            time.sleep(0.1)
        cpu0 = {n: cpu_seconds(p.pid) for n, p in procs.items()}
        started = time.monotonic()
        for study in sorted(incoming.iterdir()):
            study.rename(work / "share" / "drop" / study.name)
        deadline = started + 120 + files / 20
        while count_files(work / "share" / "sent") < files:
            if time.monotonic() > deadline:
                raise RuntimeError(f"not every file sent in time: see {work}")
            time.sleep(0.05)
        seconds = time.monotonic() - started
        cpu = {n: cpu_seconds(p.pid) - cpu0[n] for n, p in procs.items()}
        settled = dict(
            cluster.admin(
                "SELECT node, count(*) FROM files WHERE state = 'sent' GROUP BY node",
                database=database,
            )
        )
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(60)
    failed = count_files(work / "share" / "failed")
    if failed:
        raise RuntimeError(f"{failed} files in failed/: see {work}")
    shutil.rmtree(work)
    cluster.drop_database(database)
    runs = [NodeRun(n, int(settled.get(n, 0)), cpu[n]) for n in names]
    return Run(archive, runs, files, seconds)


class DurableCluster(PostgresCluster):
    """The tests' private cluster with PostgreSQL's durable defaults back (the tests turn
    fsync, synchronous_commit and full_page_writes off for speed; a real queue has them)."""

    def _init(self) -> None:
        super()._init()
        with (self.data / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("fsync = on\nsynchronous_commit = on\nfull_page_writes = on\n")


# -- claims ------------------------------------------------------------------------------
def fill(cluster: PostgresCluster, database: str, folder: Path, rows: int) -> None:
    """``rows`` pending rows of empty files, classified, in studies of ``BATCH``."""
    queue = open_queue(node_config(cluster, database, folder, "filler")).open()
    try:
        for start in range(0, rows, 5000):
            count = min(5000, rows - start)
            new = [
                NewFile("bench", "pacs", f"/bench/f{start + i}", f"f{start + i}", 0, 0)
                for i in range(count)
            ]
            queue.enqueue(new)
            jobs = queue.unclassified(count)
            queue.set_classified(
                Classification(j, "dicom", f"2.25.{j.id // BATCH}", f"2.25.1{j.id}", "1.2")
                for j in jobs
            )
    finally:
        queue.close()


def claimer(args: tuple[str, str, str, float, Any]) -> tuple[int, int]:
    """One light claimer: claim a batch, record its settle, finish it; until ``seconds``."""
    folder, url, name, seconds, start = args
    secret = Path(folder) / "db.password"
    config = Config(
        path=Path(folder) / f"{name}.yaml",
        queue=Path(folder) / name / "node.queue",
        sources=(),
        destinations={},
        database=Database(url, Secret("file", str(secret))),
        node=name,
    )
    queue = open_queue(config).open()
    claims = rows = 0
    start.wait()
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            batch = queue.claim_batch(["pacs"], pick=lambda _d, jobs: jobs, candidates=BATCH,
                                      lease=60)  # fmt: skip
            if not batch:
                break
            queue.begin_settle([(j, "sent", f"/bench/sent/{j.rel}", None) for j in batch])
            queue.finish_many([(j.id, "sent") for j in batch])
            claims += 1
            rows += len(batch)
    finally:
        queue.close()
    return claims, rows


def claim_rate(
    cluster: PostgresCluster, folder: Path, claimers: int, seconds: float
) -> tuple[float, float]:
    database = cluster.new_database()
    try:
        fill(cluster, database, folder, int(claimers * seconds * 600) + 20_000)
        manager = multiprocessing.Manager()
        start = manager.Event()
        (folder / "db.password").write_text(PASSWORD + "\n")
        url = cluster.url(database)  # loopback: no TLS, as for a database beside the nodes
        jobs = [(str(folder), url, f"claimer{i}", seconds, start) for i in range(claimers)]
        with multiprocessing.Pool(claimers) as pool:
            pending = pool.map_async(claimer, jobs)
            time.sleep(2)  # every claimer connected
            began = time.monotonic()
            start.set()
            done = pending.get(timeout=seconds + 300)
            took = time.monotonic() - began
        manager.shutdown()
    finally:
        cluster.drop_database(database)
    return sum(c for c, _ in done) / took, sum(r for _, r in done) / took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=6000)
    parser.add_argument("--size", default="64KiB")
    parser.add_argument("--nodes", default="1,2,3")
    parser.add_argument("--archives", default="discard,orthanc")
    parser.add_argument("--claimers", default="1,4,8,16")
    parser.add_argument("--claim-seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    missing = postgres_missing_reason()
    if missing:
        print(f"fleet.py: {missing}", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="stowd-bench-fleet-"))
    cluster = DurableCluster()
    try:
        cluster.start()
        stage = tmp / "stage"
        generate(stage, args.files, parse_size(args.size))
        print(f"{os.cpu_count()} CPUs; {args.files} files of {args.size}; PostgreSQL on loopback")
        needed = 0.0
        for archive in args.archives.split(","):
            for n in [int(x) for x in args.nodes.split(",")]:
                run = nodes_run(cluster, stage, archive, n, args.files)
                needed = max(needed, run.rate / BATCH)
                per = ", ".join(
                    f"{r.name} {r.settled / run.seconds:.0f} files/s ({r.cpu:.0f} s CPU)"
                    for r in run.nodes
                )
                print(f"{archive:8} {n} node(s): {run.rate:6.0f} files/s total in "
                      f"{run.seconds:.1f} s; {per}", flush=True)  # fmt: skip
        cores = os.cpu_count()
        print(f"(one machine: the nodes, PostgreSQL and the archive share its {cores} cores, "
              "so the total is bounded by the CPU, not by the queue)")  # fmt: skip
        for k in [int(x) for x in args.claimers.split(",")]:
            claims, rows = claim_rate(cluster, tmp, k, args.claim_seconds)
            print(f"claims: {k:2} claimers: {claims:6.0f} claims/s of {BATCH} rows "
                  f"({rows:.0f} rows/s) claimed, recorded and finished", flush=True)  # fmt: skip
        print(f"the nodes above needed at most {needed:.0f} claims/s")
    finally:
        cluster.remove()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def nodes_run(cluster: PostgresCluster, stage: Path, archive: str, n: int, files: int) -> Run:
    if archive == "discard":
        with discard_process() as endpoint:
            return run_nodes(cluster, stage, archive, endpoint.url, nodes=n, files=files)
    orthanc = Orthanc(stage.parent / f"orthanc-{n}")
    try:
        orthanc.start()
        return run_nodes(cluster, stage, archive, orthanc.dicomweb_url, nodes=n, files=files)
    finally:
        orthanc.kill()
        shutil.rmtree(orthanc.folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
