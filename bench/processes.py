"""How far stowd would go spread over processes: N independent ``stowd run`` daemons together.

Usage (from the repository root)::

    .venv/bin/python bench/processes.py --files 10000 --processes 1,2 [--workers 2]

One ``stowd run`` is one Python process, and its threads share one core's worth of Python at
a time (the GIL): against a discarding endpoint it uses about one core.  This measures what
running stowd's work in several processes could reach at most, before any such design is
built: for each N in ``--processes``, N daemons, each with its own drop folder, queue and
the same ``--files`` files (hard links of one generated set), all against one fast discarding
endpoint in its own process (``bench/discard.py``).  Each daemon is started and has opened
its queue before the files are moved into every drop folder at once; the clock runs from
that move until every daemon has moved all its files to ``sent/``.  It prints the files/s of
all daemons together and each daemon's CPU per file.  The daemons share nothing (no queue,
no locks), so a real split of one daemon's work over processes would reach less than this.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import count_files, cpu_seconds, discard_process, stowd_env
from throughput import generate, stowd_config, wait_started

from stowd.config.yamlwalk import parse_size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10000, help="files per daemon")
    parser.add_argument("--size", default="64KiB")
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--processes", default="1,2", help="numbers of daemons, comma-separated")
    parser.add_argument("--workers", type=int, default=2, help="each daemon's workers")
    args = parser.parse_args()
    counts = [int(n) for n in args.processes.split(",")]
    with discard_process() as endpoint, tempfile.TemporaryDirectory(prefix="stowd-procs-") as t:
        stage = Path(t) / "stage"
        total = generate(stage, args.files, parse_size(args.size), args.studies)
        print(f"{total} files of {args.size} per daemon, workers {args.workers}, {endpoint.url}")
        for n in counts:
            measure(
                Path(t) / f"n{n}", stage, n, files=total, workers=args.workers, url=endpoint.url
            )
    return 0


def measure(tmp: Path, stage: Path, n: int, *, files: int, workers: int, url: str) -> None:
    works = [tmp / f"daemon{i}" for i in range(n)]
    for work in works:
        for study in sorted(stage.iterdir()):
            shutil.copytree(study, work / "incoming" / study.name, copy_function=os.link)
    procs = [start(work, url, workers) for work in works]
    try:
        started = time.monotonic()
        for work in works:
            for study in sorted((work / "incoming").iterdir()):
                study.rename(work / "drop" / study.name)
        deadline, left = started + 60 + files / 50, list(works)
        while left and time.monotonic() < deadline:  # counted as bench/throughput.py does
            if any(proc.poll() is not None for proc in procs):
                break
            time.sleep(0.05)
            left = [work for work in left if count_files(work / "sent") < files]
        seconds = time.monotonic() - started
        cpu = [cpu_seconds(proc.pid) for proc in procs]
        sent = [count_files(work / "sent") for work in works]
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(60)
    wrong = "" if sent == [files] * n else f"  WRONG: files in sent/ {sent}"
    per_file = ", ".join(f"{1000 * c / files:.3f}" for c in cpu)
    print(
        f"  {n} daemon(s): {n * files} files in {seconds:.2f} s = {n * files / seconds:.0f} "
        f"files/s together; CPU ms per file of each: {per_file}{wrong}",
        flush=True,
    )
    shutil.rmtree(tmp, ignore_errors=True)


def start(work: Path, url: str, workers: int) -> subprocess.Popen[bytes]:
    config = stowd_config(work, url, workers, 50)
    with open(work / "stowd.log", "wb") as log:
        command = [sys.executable, "-m", "stowd", "run", "-c", str(config)]
        proc = subprocess.Popen(command, stderr=log, env=stowd_env(), cwd=work)
    wait_started(work / "state" / "queue.db", proc)
    return proc


if __name__ == "__main__":
    sys.exit(main())
