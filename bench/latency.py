"""Latency of one file dropped into an idle ``stowd run`` (issue 19's latency target).

Usage (from the repository root)::

    .venv/bin/python bench/latency.py             # 50 drops; 100ms and 5s; discard and Orthanc
    .venv/bin/python bench/latency.py --quiet 100ms --archives discard --drops 50

For each quiet period and archive, starts ``stowd run`` (stowd's default ``workers``) and
drops ``--drops`` files of 64 KiB into its drop folder one at a time: each is written there
directly (open, write, close) after the previous one reached ``sent/`` and a random pause of
``--pause`` (so the daemon is idle, and each drop falls at another moment of any timer it
has).  For each drop it measures, from the end of the write:

  archive   the discarding endpoint (bench/benchlib.py, in this process) received the STOW
            request that carries the file; or a fresh local Orthanc lists one more instance
            (``/statistics``, asked every 5 ms)
  sent/     the file is in ``sent/`` (looked for every 5 ms)

and prints p50, p95 and max of each beyond the quiet period, and the target (the archive
within quiet period + 0.3 s at the 95th percentile) as MET / MISSED with its figure.
Figures, never asserted.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import yaml
from benchlib import Discard, stowd_env
from dicomgen import make_instance_bytes
from orthanc import Orthanc

from stowd.config.yamlwalk import parse_duration, parse_size

TARGET = 0.3  # seconds beyond the quiet period, 95th percentile (issue 19)
LOOK = 0.005  # how often sent/ and Orthanc are looked at
ARRIVAL_TIMEOUT = 60.0  # one drop that does not arrive in this long ends the case


class _Timed(Discard):
    """The discarding endpoint; the moment each STOW request began is noted (``arrivals``)."""

    arrivals: ClassVar[list[float]] = []

    def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
        type(self).arrivals.append(time.monotonic())
        super().do_POST()


@dataclass
class Case:
    quiet: float
    archive: str
    archive_s: list[float]  # per drop: end of write -> archive, minus the quiet period
    sent_s: list[float]  # per drop: end of write -> in sent/, minus the quiet period
    problem: str = ""


# -- the archives ----------------------------------------------------------------------------


@contextmanager
def discard_archive() -> Iterator[tuple[str, Callable[[int], float | None]]]:
    """The discarding endpoint; ``arrived(n)``: when its n-th request (from 1) began."""
    _Timed.arrivals = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Timed)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def arrived(n: int) -> float | None:
        return _Timed.arrivals[n - 1] if len(_Timed.arrivals) >= n else None

    try:
        yield f"http://127.0.0.1:{server.server_port}/dicom-web", arrived
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def orthanc_archive(work: Path) -> Iterator[tuple[str, Callable[[int], float | None]]]:
    """A fresh Orthanc; ``arrived(n)``: now, once it lists n instances (else None)."""
    with Orthanc(work / "orthanc") as orthanc, httpx.Client(base_url=orthanc.url) as http:

        def arrived(n: int) -> float | None:
            count = int(http.get("/statistics").json()["CountInstances"])
            return time.monotonic() if count >= n else None

        yield orthanc.dicomweb_url, arrived


# -- one case --------------------------------------------------------------------------------


def write_config(work: Path, url: str, quiet: float) -> Path:
    source = {
        "name": "bench",
        "watch": "./drop",
        "sent": "./sent",
        "failed": "./failed",
        "destination": "pacs",
        "quiet_period": f"{int(quiet * 1000)}ms",
    }
    config = {
        "queue": "./state/queue.db",
        "log_level": "WARNING",
        "sources": [source],
        "destinations": {"pacs": {"url": url}},
    }
    path = work / "stowd.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    (work / "drop").mkdir(parents=True, exist_ok=True)
    return path


def wait_until(check: Callable[[], float | None], timeout: float) -> float | None:
    """Look every ``LOOK`` seconds until ``check`` gives a time; None after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found is not None:
            return found
        time.sleep(LOOK)
    return None


def in_sent(path: Path) -> Callable[[], float | None]:
    return lambda: time.monotonic() if path.exists() else None


def wait_started(work: Path, proc: subprocess.Popen[bytes]) -> None:
    """Until its queue exists and then a second (its watcher and workers start, go idle)."""
    database = work / "state" / "queue.db"
    deadline = time.monotonic() + 60
    while not database.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)


def run_case(
    work: Path, archive: str, quiet: float, args: argparse.Namespace, rng: random.Random
) -> Case:
    case = Case(quiet, archive, [], [])
    work.mkdir(parents=True)
    opened = discard_archive() if archive == "discard" else orthanc_archive(work)
    with opened as (url, arrived):
        config = write_config(work, url, quiet)
        with open(work / "stowd.log", "wb") as log:
            command = [sys.executable, "-m", "stowd", "run", "-c", str(config)]
            proc = subprocess.Popen(command, stderr=log, env=stowd_env(), cwd=work)
            try:
                wait_started(work, proc)
                drop_all(work, case, arrived, args, rng)
            finally:
                proc.terminate()
                proc.wait(60)
    return case


def drop_all(
    work: Path,
    case: Case,
    arrived: Callable[[int], float | None],
    args: argparse.Namespace,
    rng: random.Random,
) -> None:
    for n in range(1, args.drops + 1):
        time.sleep(rng.uniform(*args.pause))
        data, _ = make_instance_bytes(size_bytes=args.size, instance_number=n)
        name = f"drop-{n:03d}.dcm"
        with open(work / "drop" / name, "wb") as fp:
            fp.write(data)
        written = time.monotonic()
        at_archive = wait_until(partial(arrived, n), ARRIVAL_TIMEOUT)
        at_sent = wait_until(in_sent(work / "sent" / name), ARRIVAL_TIMEOUT)
        if at_archive is None or at_sent is None:
            case.problem = f"drop {n} did not arrive within {ARRIVAL_TIMEOUT:.0f}s"
            return
        case.archive_s.append(at_archive - written - case.quiet)
        case.sent_s.append(at_sent - written - case.quiet)


# -- the figures -----------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))  # ceil
    return ordered[int(rank) - 1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def report(cases: list[Case]) -> None:
    head = ["quiet", "archive", "drops", "archive p50/p95/max", "sent/ p50/p95/max", "target"]
    rows = [head]
    for case in cases:
        rows.append(_row(case))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    print("\nbeyond the quiet period, from the end of each write:")
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    for case in cases:
        if case.problem:
            print(f"{ms(case.quiet)} {case.archive}: {case.problem}")


def _row(case: Case) -> list[str]:
    n = len(case.archive_s)
    if not n:
        return [ms(case.quiet), case.archive, "0", "-", "-", "MISSED (nothing arrived)"]
    p95 = percentile(case.archive_s, 95)
    verdict = "MET" if p95 <= TARGET and not case.problem else "MISSED"
    return [
        ms(case.quiet),
        case.archive,
        str(n),
        _spread(case.archive_s),
        _spread(case.sent_s),
        f"{verdict}: p95 {ms(p95)} (<= {ms(TARGET)})",
    ]


def _spread(values: list[float]) -> str:
    median = statistics.median(values)
    return f"{ms(median)} / {ms(percentile(values, 95))} / {ms(max(values))}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--drops", type=int, default=50, help="files per case (default 50)")
    parser.add_argument(
        "--quiet", default="100ms,5s", help="quiet periods, comma separated (default 100ms,5s)"
    )
    parser.add_argument(
        "--archives", default="discard,orthanc", help="discard and/or orthanc (default both)"
    )
    parser.add_argument("--size", default="64KiB", help="size of each file (default 64KiB)")
    parser.add_argument(
        "--pause", default="0.2,0.7", help="random pause before each drop, seconds (min,max)"
    )
    parser.add_argument("--seed", type=int, default=19)
    parser.add_argument("--tmp", help="folder for the work files (default: system temp)")
    args = parser.parse_args(argv)
    args.size = parse_size(args.size)
    args.quiets = [parse_duration(q) for q in args.quiet.split(",")]
    args.archives = args.archives.split(",")
    if set(args.archives) - {"discard", "orthanc"}:
        parser.error("--archives: discard and/or orthanc")
    low, high = (float(p) for p in args.pause.split(","))
    args.pause = (low, high)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    cases = []
    with tempfile.TemporaryDirectory(prefix="stowd-latency-", dir=args.tmp) as tmp:
        for quiet in args.quiets:
            for archive in args.archives:
                work = Path(tmp) / f"{archive}-{int(quiet * 1000)}ms"
                print(f"{ms(quiet)} quiet period, {archive}: {args.drops} drops ...", flush=True)
                cases.append(run_case(work, archive, quiet, args, rng))
    report(cases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
