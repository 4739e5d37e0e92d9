"""What ``transcode: explicit-vr`` costs: ``stowd run`` on Implicit VR files, with and without.

Usage (from the repository root)::

    .venv/bin/python bench/transcode.py [--files 300] [--size 2MiB] [--studies 6]

Generates FILES Implicit VR Little Endian instances of about SIZE bytes in STUDIES folders,
then runs ``stowd run`` (``workers: 2``) on hard-linked copies of them, once with
``transcode: none`` (sent as they are) and once with ``transcode: explicit-vr`` (each
converted to a spool copy, then sent), against a local endpoint that reads and discards the
body (stowd's own cost) and against a fresh local Orthanc.  Prints files/s, MB/s (of the
original files), the daemon's peak RSS and CPU seconds per case.  Figures, not assertions.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
from benchlib import (
    count_files,
    cpu_seconds,
    discard_process,
    peak_rss_mb,
    stowd_env,
    write_config,
)
from dicomgen import make_instance_bytes
from orthanc import Orthanc
from pydicom.uid import UID, ImplicitVRLittleEndian, generate_uid

from stowd.config.yamlwalk import parse_size

MODES = ("none", "explicit-vr")
MB = 1e6


def generate(stage: Path, files: int, size: int, studies: int) -> int:
    """FILES implicit instances in STUDIES folders; their total size in bytes."""
    total = 0
    study_uids = [generate_uid() for _ in range(studies)]
    for n in range(files):
        data, _ = make_instance_bytes(study_uid=study_uids[n % studies], size_bytes=size)
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.file_meta.TransferSyntaxUID = UID(ImplicitVRLittleEndian)
        ds["PixelData"].VR = "OW"
        target = stage / f"s{n % studies:02d}" / f"{n:05d}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target, implicit_vr=True, little_endian=True, enforce_file_format=True)
        total += target.stat().st_size
    return total


def run(work: Path, url: str, stage: Path, files: int, mode: str) -> tuple[float, float, float]:
    """Seconds until every file is in sent/, the daemon's peak RSS (MB) and CPU seconds."""
    destination = {"url": url, "workers": 2, "transcode": mode}
    config = write_config(work, destination)
    (work / "drop").mkdir()
    incoming = work / "incoming"
    for study in sorted(stage.iterdir()):
        shutil.copytree(study, incoming / study.name, copy_function=os.link)
    with open(work / "stowd.log", "wb") as log:
        command = [sys.executable, "-m", "stowd", "run", "-c", str(config)]
        proc = subprocess.Popen(command, stderr=log, env=stowd_env(), cwd=work)
        while not (work / "state" / "queue.db").exists() and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.5)
        started = time.monotonic()
        for study in sorted(incoming.iterdir()):
            study.rename(work / "drop" / study.name)
        while proc.poll() is None and count_files(work / "sent") < files:
            if count_files(work / "failed"):
                raise SystemExit(f"a file failed; see {work / 'stowd.log'}")
            time.sleep(0.05)
        seconds = time.monotonic() - started
        rss, cpu = peak_rss_mb(proc.pid), cpu_seconds(proc.pid)
        proc.terminate()
        proc.wait(60)
    return seconds, rss, cpu


@contextmanager
def discarding() -> Iterator[str]:
    with discard_process() as endpoint:
        yield endpoint.url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--size", default="2MiB")
    parser.add_argument("--studies", type=int, default=6)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="stowd-transcode-") as tmp:
        stage = Path(tmp) / "stage"
        total = generate(stage, args.files, parse_size(args.size), args.studies)
        print(f"{args.files} implicit files, {total / MB:.0f} MB, workers: 2")
        heads = ("archive", "transcode", "s", "files/s", "MB/s", "RSS MB", "CPU s")
        print("{:<10} {:<12} {:>7} {:>8} {:>7} {:>7} {:>6}".format(*heads))
        for archive in ("discard", "orthanc"):
            for mode in MODES:
                work = Path(tmp) / f"{archive}-{mode}"
                work.mkdir()
                if archive == "discard":
                    with discarding() as url:
                        seconds, rss, cpu = run(work, url, stage, args.files, mode)
                else:
                    with Orthanc(work / "orthanc") as orthanc:
                        seconds, rss, cpu = run(work, orthanc.dicomweb_url, stage, args.files, mode)
                        stored = orthanc.instance_count()
                        if stored != args.files:
                            raise SystemExit(f"Orthanc stored {stored} of {args.files}")
                shutil.rmtree(work, ignore_errors=True)
                rate, mb = args.files / seconds, total / MB / seconds
                print(
                    f"{archive:<10} {mode:<12} {seconds:7.1f} {rate:8.1f} {mb:7.1f} "
                    f"{rss:7.1f} {cpu:6.1f}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
