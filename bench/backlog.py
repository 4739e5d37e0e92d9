"""A very long backlog (issue 19's growth target): files already waiting in the watch folder,
in many study folders, when ``stowd run`` starts.

Usage:  .venv/bin/python bench/backlog.py --files 1000000 --per-folder 1000 [--tree DIR]
        .venv/bin/python bench/backlog.py --claims-only

The files are tiny valid DICOM instances: one made per study folder, the others of that folder
hard links to it (one inode per folder, no data blocks per file; ext4 allows 65,000 links per
inode).  ``--tree DIR`` keeps the generated tree in DIR and reuses it on the next run (only the
queue is made anew), so runs before and after a change scan the same files.

stowd runs against a destination that refuses connections (a closed loopback port): its
workers find the archive down and hold it, so every file stays queued and nothing is sent.
The queue is complete when it has a row per file (``MAX(id)``: rows are only added here, and
this costs nothing on a million rows).  Printed, never asserted:

- time to queue all (from start-up), files/s queued, stowd's peak RSS (VmHWM);
- the wall time of ``stowd status`` and ``stowd status --json`` on that queue (the command, as
  a user runs it: Python's start-up included), while the daemon still runs;
- a restart on that queue: how long the start-up scan takes when every file is queued;
- the cost of claiming a batch (claim and give back) on queues of 1,000 and of 1,000,000
  classified pending rows, and the plan SQLite chooses for the claim (an index, not a scan).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from benchlib import peak_rss_mb, stowd_env, wait_sampled, write_config
from dicomgen import make_instance_bytes

from stowd.config.model import BatchLimits
from stowd.pipeline.group import take_batch
from stowd.pipeline.queue import Queue, SqliteQueue, open_readonly

REFUSED = "http://127.0.0.1:9/dicom-web"  # the discard port: nothing listens on loopback
CLAIM_ROUNDS = 300
SCAN_LINE = re.compile(r"scan of \S+ found (\d+) new file\(s\) in ([0-9.]+)s")


def generate(drop: Path, files: int, per_folder: int) -> float:
    """``files`` files in folders of ``per_folder``; returns the seconds it took."""
    started = time.monotonic()
    for folder in range((files + per_folder - 1) // per_folder):
        where = drop / f"study{folder:05d}"
        where.mkdir(parents=True)
        data, _ = make_instance_bytes(rows=8, columns=8)
        first = where / "000000.dcm"
        fd = os.open(first, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.close(fd)
        for n in range(1, min(per_folder, files - folder * per_folder)):
            os.link(first, where / f"{n:06d}.dcm")
    return time.monotonic() - started


def tree(root: Path, files: int, per_folder: int) -> Path:
    """The drop folder under ``root``: made once, reused while it holds ``files`` files."""
    drop = root / "drop"
    mark = root / f"made-{files}-{per_folder}"
    if mark.exists():
        print(f"reusing {files} files in {drop}")
        return drop
    shutil.rmtree(drop, ignore_errors=True)
    seconds = generate(drop, files, per_folder)
    mark.touch()
    du = ["du", "-sh", str(drop)]
    used = subprocess.run(du, check=False, capture_output=True, text=True).stdout
    print(
        f"generated {files} files ({per_folder} per folder, hard links) in {seconds:.1f} s; "
        f"disk used: {used.split()[0] if used else '?'}"
    )
    return drop


def max_id(database: Path) -> int:
    """The newest row's id (0 before the queue exists)."""
    import sqlite3  # noqa: PLC0415 - a read of a running stowd's queue, from outside

    if not database.exists():
        return 0
    try:
        db = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5)
        try:
            return int(db.execute("SELECT COALESCE(MAX(id), 0) FROM files").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error:
        return 0


def timed(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system) of a command (on a busy machine the
    wall time is mostly waiting for a core)."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, env=stowd_env(), stdout=subprocess.DEVNULL)
    code, _, cpu = wait_sampled(proc)
    if code != 0:
        raise RuntimeError(f"{argv} exited {code}")
    return time.monotonic() - started, cpu


def backlog_case(root: Path, files: int, limit: float) -> None:
    state = root / "state"
    shutil.rmtree(state, ignore_errors=True)
    for done in ("sent", "failed"):
        shutil.rmtree(root / done, ignore_errors=True)
    config = write_config(root, {"url": REFUSED})
    argv = [sys.executable, "-m", "stowd"]
    proc = subprocess.Popen([*argv, "run", "-c", str(config)], env=stowd_env())
    started = time.monotonic()
    database = state / "queue.db"
    queued = None
    try:
        while proc.poll() is None and time.monotonic() - started < limit:
            if max_id(database) >= files:
                queued = time.monotonic() - started
                break
            time.sleep(0.5)
        rss = peak_rss_mb(proc.pid)
        if queued is None:
            print(f"NOT all queued after {time.monotonic() - started:.0f} s: {max_id(database)}")
            return
        print(
            f"{files} files scanned and queued in {queued:.1f} s "
            f"({files / queued:.0f} files/s), peak RSS {rss:.1f} MB"
        )
        for extra in ([], ["--json"]):
            runs = [timed([*argv, "status", "-c", str(config), *extra]) for _ in range(3)]
            each = ", ".join(f"{wall:.2f} s ({cpu:.2f} s CPU)" for wall, cpu in runs)
            print(f"stowd status {' '.join(extra)}: {each}")
        reader = open_readonly(database)
        try:
            for _ in range(3):
                took = time.perf_counter()
                with reader.reading():
                    reader.tally(time.time())
                    reader.state_totals(time.time())
                    reader.recent_errors(10)
                print(f"  its queries: {(time.perf_counter() - took) * 1000:.1f} ms")
        finally:
            reader.close()
        print(f"peak RSS at the end: {peak_rss_mb(proc.pid):.1f} MB")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    restart_case(config, argv, limit)


def restart_case(config: Path, argv: list[str], limit: float) -> None:
    """``stowd run`` again on the full queue: how long its start-up scan of the files, all
    queued already, takes (stowd's own debug line), and its peak RSS meanwhile."""
    log = config.parent / "restart.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [*argv, "run", "-c", str(config), "--log-level", "DEBUG"],
            env=stowd_env(),
            stderr=err,
        )
    started = time.monotonic()
    found = None
    try:
        while found is None and proc.poll() is None and time.monotonic() - started < limit:
            time.sleep(0.5)
            found = SCAN_LINE.search(log.read_text(errors="replace"))
        rss = peak_rss_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    if found is None:
        print("restart: the start-up scan did not end")
        return
    print(
        f"restart on the full queue: start-up scan found {found[1]} new file(s) in "
        f"{found[2]} s (stowd's log), {time.monotonic() - started:.1f} s from start; "
        f"peak RSS {rss:.1f} MB"
    )


def _rows(n: int, per_study: int) -> Iterator[tuple[object, ...]]:
    for i in range(n):
        study = f"1.2.3.{i // per_study}"
        yield (
            "bench",
            "pacs",
            f"/drop/{i}.dcm",
            f"{i}.dcm",
            4096,
            1,
            "pending",
            "image",
            study,
            f"{study}.{i}",
            "1.2.840.10008.5.1.4.1.1.7",
            0.0,
        )


def fill(path: Path, rows: int) -> None:
    """``rows`` classified pending rows, written straight into the queue file."""
    import sqlite3  # noqa: PLC0415 - test data, written from outside

    db = sqlite3.connect(path)
    with db:
        db.executemany(
            "INSERT INTO files (source, destination, path, rel, size, mtime_ns, state, kind, "
            "study_uid, sop_uid, sop_class, queued_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            _rows(rows, 1000),
        )
    db.close()


def claimed_queue(folder: Path, rows: int) -> Queue:
    """A queue of ``rows`` classified pending rows in studies of 1,000."""
    path = folder / f"claims-{rows}.db"
    SqliteQueue(path).open().close()  # the schema, made by stowd
    fill(path, rows)
    return SqliteQueue(path).open()


def claim_cost(queue: Queue) -> float:
    """Seconds per claim (and give back: two transactions, each synced) of a batch of 50."""
    limits = BatchLimits()
    started = time.perf_counter()
    for _ in range(CLAIM_ROUNDS):
        batch = queue.claim_batch(
            ["pacs"],
            pick=lambda _d, jobs: take_batch(jobs, limits),
            candidates=50,
            lease=60.0,
        )
        queue.release([j.id for j in batch], not_before=0.0)
    return (time.perf_counter() - started) / CLAIM_ROUNDS


def claims_case() -> None:
    """1,000 and 1,000,000 rows, measured in turns (the machine's load changes meanwhile)."""
    with tempfile.TemporaryDirectory(prefix="stowd-claims-") as tmp:
        queues = {rows: claimed_queue(Path(tmp), rows) for rows in (1_000, 1_000_000)}
        try:
            times: dict[int, list[float]] = {rows: [] for rows in queues}
            for _ in range(3):
                for rows, queue in queues.items():
                    times[rows].append(claim_cost(queue))
            for rows, queue in queues.items():
                each = ", ".join(f"{t * 1000:.2f}" for t in times[rows])
                print(f"claim a batch of 50 at {rows} rows: {each} ms per claim (3 turns)")
                plan = queue.claim_plan(["pacs"]) if hasattr(queue, "claim_plan") else []
                for line in plan:
                    print(f"    plan: {line}")
        finally:
            for queue in queues.values():
                queue.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--per-folder", type=int, default=1000)
    parser.add_argument("--tree", type=Path, help="keep the generated files here, reuse them")
    parser.add_argument("--limit", type=float, default=900.0, help="give up after (s)")
    parser.add_argument("--claims-only", action="store_true")
    args = parser.parse_args()
    if not args.claims_only:
        with tempfile.TemporaryDirectory(prefix="stowd-backlog-") as tmp:
            root = args.tree or Path(tmp)
            root.mkdir(parents=True, exist_ok=True)
            tree(root, args.files, args.per_folder)
            backlog_case(root, args.files, args.limit)
    claims_case()
    return 0


if __name__ == "__main__":
    sys.exit(main())
