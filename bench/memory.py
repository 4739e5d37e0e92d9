"""Peak memory of ``stowd run`` while it sends one very large file, and while a large backlog
is queued, against a local discarding STOW endpoint (reads and drops the body).

Usage:  .venv/bin/python bench/memory.py --size 1GiB --backlog 20000 [--rules]
        .venv/bin/python bench/memory.py --video 4500MiB   (needs /usr/bin/ffmpeg)

``--rules`` adds a metadata rule that changes every file, so each is sent as a rewritten
copy from the spool folder (the cost of rules).  ``--video`` drops one MPEG-2 video of that
size (a real clip at both ends, a sparse hole between) and sends it in both bulkdata modes:
``encapsulate`` (a Part-10 copy built in the spool, then sent) and ``metadata``.

Prints the peak RSS (VmHWM) of the stowd process for each case, and for the backlog the time
from start-up until every file is scanned and queued (read from the queue while stowd runs).
Figures, not assertions.  bench/throughput.py runs the same cases through ``big_file_case``
and ``backlog_case``.
"""

from __future__ import annotations

import argparse
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import (
    CHUNK,
    count_files,
    discard_process,
    peak_rss_mb,
    queued_rows,
    stowd_env,
    write_config,
)
from dicomgen import make_instance, make_instance_bytes

from stowd.config.yamlwalk import parse_size
from stowd.pipeline.classify import classify


def big_dicom(path: Path, size: int) -> str:
    """A Part-10 file whose PixelData (OB) is ``size`` zero bytes, written without RAM."""
    data, uid = make_instance_bytes(rows=1, columns=1)
    at = data.rfind(b"\xe0\x7f\x10\x00")
    with open(path, "wb") as fp:
        fp.write(data[:at] + b"\xe0\x7f\x10\x00OB\x00\x00" + struct.pack("<I", size))
        zeros = bytes(CHUNK)
        for _ in range(size // CHUNK):
            fp.write(zeros)
        fp.write(bytes(size % CHUNK))
    return str(uid)


RULES = """rules:
  - set: {InstitutionName: 'Bench {source}', PatientID: 'B-{dicom.PatientID}'}
"""


def sparse_video(path: Path, size: int) -> None:
    """An MPEG-2 program stream of ``size`` bytes: a real clip, a sparse hole, the clip again
    (so the headers at the start and the time codes at the end are real); no disk used."""
    clip = path.with_suffix(".clip.mpg")
    source = ["-f", "lavfi", "-i", "testsrc=size=640x480:rate=25", "-t", "2"]
    subprocess.run(
        ["/usr/bin/ffmpeg", "-v", "error", "-y", *source, "-c:v", "mpeg2video", str(clip)],
        check=True,
    )
    data = clip.read_bytes()
    clip.unlink()
    with open(path, "wb") as fp:
        fp.write(data)
        fp.truncate(size - len(data))
        fp.seek(size - len(data))
        fp.write(data)


def config(folder: Path, url: str, rules: bool, mode: str = "encapsulate") -> Path:
    dest = {"url": url, "timeouts": {"read": "30m", "write": "30m"}, "bulkdata": mode}
    return write_config(folder, dest, extra=RULES if rules else "")


def run(
    folder: Path, url: str, expect: int, rules: bool, mode: str = "encapsulate"
) -> dict[str, float]:
    """Start ``stowd run`` on *folder* and wait until *expect* files are in sent/.

    Returns ``seconds`` (start-up to the last file moved), ``queued_seconds`` (start-up until
    every file has its row in the queue: scanned and queued) and ``rss_mb`` (stowd's VmHWM).
    """
    path = config(folder, url, rules, mode)
    proc = subprocess.Popen(
        [sys.executable, "-m", "stowd", "run", "-c", str(path)], env=stowd_env()
    )
    started = time.monotonic()
    sent = folder / "sent"
    database = folder / "state" / "queue.db"
    queued: float | None = None
    while proc.poll() is None:
        now = time.monotonic()
        if queued is None and queued_rows(database) >= expect:
            queued = now - started
        if count_files(sent) >= expect:
            break
        time.sleep(0.2)
    seconds = time.monotonic() - started
    if queued is None:
        queued = seconds  # all were queued by the time all were sent (a very short run)
    rss = peak_rss_mb(proc.pid)
    proc.terminate()
    proc.wait(60)
    return {"seconds": seconds, "queued_seconds": queued, "rss_mb": rss}


def video_case(url: str, text: str) -> None:
    size = parse_size(text)
    for mode in ("encapsulate", "metadata"):
        with tempfile.TemporaryDirectory(prefix="stowd-video-") as tmp:
            folder = Path(tmp)
            (folder / "drop").mkdir()
            sparse_video(folder / "drop" / "long.mpg", size)
            got = run(folder, url, 1, False, mode)
            print(
                f"one MPEG-2 video of {text}, bulkdata: {mode}: "
                f"{size / got['seconds'] / 1e6:.0f} MB/s end to end, "
                f"peak RSS {got['rss_mb']:.1f} MB"
            )


def big_file_case(tmp: Path, url: str, size: int, rules: bool = False) -> dict[str, Any]:
    """One file of *size* bytes dropped and sent: MB/s end to end and stowd's peak RSS."""
    one = tmp / "one"
    (one / "drop").mkdir(parents=True)
    big_dicom(one / "drop" / "big.dcm", size)
    classify(str(one / "drop" / "big.dcm"))  # the file is valid for stowd
    got = run(one, url, 1, rules)
    (one / "sent" / "big.dcm").unlink()  # 4 GB less on the disk right away
    return {"size": size, "mb_s": size / got["seconds"] / 1e6, **got}


def backlog_case(tmp: Path, url: str, files: int, rules: bool = False) -> dict[str, Any]:
    """*files* small files waiting in the drop folder when stowd starts: the time until all
    are scanned and queued, files/s end to end and stowd's peak RSS."""
    many = tmp / "many"
    (many / "drop").mkdir(parents=True)
    study = "1.2.826.0.1.3680043.8.498.7"
    for n in range(files):
        make_instance(many / "drop" / f"{n:06d}.dcm", study_uid=study)
    got = run(many, url, files, rules)
    return {"files": files, "files_s": files / got["seconds"], **got}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--backlog", type=int, default=20000)
    parser.add_argument(
        "--rules",
        action="store_true",
        help="with a metadata rule that changes every file (each is sent as a rewritten copy)",
    )
    parser.add_argument("--video", help="instead: one MPEG-2 video of this size, both modes")
    args = parser.parse_args()
    with discard_process() as endpoint:
        return cases(args, endpoint.url)


def cases(args: argparse.Namespace, url: str) -> int:
    if args.video:
        video_case(url, args.video)
        return 0
    with tempfile.TemporaryDirectory(prefix="stowd-mem-") as tmp:
        big = big_file_case(Path(tmp), url, parse_size(args.size), args.rules)
        print(f"one file of {args.size}: {big['mb_s']:.0f} MB/s, peak RSS {big['rss_mb']:.1f} MB")
        many = backlog_case(Path(tmp), url, args.backlog, args.rules)
        print(
            f"backlog of {args.backlog} small files: scanned and queued in "
            f"{many['queued_seconds']:.1f} s, {many['files_s']:.0f} files/s end to end, "
            f"peak RSS {many['rss_mb']:.1f} MB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
