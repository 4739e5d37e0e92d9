"""Measure stowd end to end against a real Orthanc for several batch sizes and worker counts.

Usage (from the repository root, with the project installed in .venv):

    .venv/bin/python bench/batch_size.py --files 1000 --size 512KiB

For each setting it starts a fresh Orthanc (tests/support/orthanc.py), starts ``stowd run`` on
an empty drop folder, moves the pre-generated files in at once, and times until every file is
in ``sent/``; it then checks Orthanc's instance count.  It prints files/s, MB/s and the peak
RSS of the stowd process.  Figures, not assertions: this is not a test.
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

from benchlib import count_files, peak_rss_mb, stowd_env, write_config
from dicomgen import make_study
from orthanc import Orthanc

from stowd.config.yamlwalk import parse_size


def stowd_config(folder: Path, url: str, batch_files: int, workers: int) -> Path:
    batch = {"max_files": batch_files, "max_bytes": "1GiB"}
    return write_config(folder, {"url": url, "workers": workers, "batch": batch}, done="./done")


def run_one(stage: Path, work: Path, total: int, batch_files: int, workers: int) -> str:
    with Orthanc(work / "orthanc") as orthanc:
        config = stowd_config(work, orthanc.dicomweb_url, batch_files, workers)
        (work / "drop").mkdir()
        proc = subprocess.Popen(
            [sys.executable, "-m", "stowd", "run", "-c", str(config)],
            env=stowd_env(),
            stderr=open(work / "stowd.log", "wb"),  # noqa: SIM115
        )
        time.sleep(1.0)
        started = time.monotonic()
        for study in stage.iterdir():
            shutil.copytree(study, work / "drop" / study.name, copy_function=os.link)
        sent = work / "done" / "sent"
        while count_files(sent) < total and proc.poll() is None:
            time.sleep(0.05)
        seconds = time.monotonic() - started
        rss = peak_rss_mb(proc.pid)
        proc.terminate()
        proc.wait(30)
        stored = orthanc.instance_count()
    size = sum(p.stat().st_size for p in sent.rglob("*") if p.is_file())
    return (
        f"batch {batch_files:4d}  workers {workers}  {total / seconds:7.1f} files/s  "
        f"{size / seconds / 1e6:6.1f} MB/s  peak RSS {rss:5.1f} MB  "
        f"orthanc has {stored}/{total}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--size", default="512KiB")
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--batches", default="1,10,25,50,100")
    parser.add_argument("--workers", default="1,2,4")
    args = parser.parse_args()
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(prefix="stowd-bench-") as tmp:
        stage = Path(tmp) / "stage"
        per_study = args.files // args.studies
        for n in range(args.studies):
            make_study(stage / f"study{n:03d}", per_study, size_bytes=size)
        total = per_study * args.studies
        print(f"{total} files of {args.size} in {args.studies} studies, Orthanc on loopback")
        for workers in (int(w) for w in args.workers.split(",")):
            for batch in (int(b) for b in args.batches.split(",")):
                work = Path(tmp) / f"run-{batch}-{workers}"
                work.mkdir()
                print(run_one(stage, work, total, batch, workers), flush=True)
                shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
