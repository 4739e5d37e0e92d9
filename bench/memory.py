"""Peak memory of ``stowd run`` while it sends one very large file, and while a large backlog
is queued, against a local discarding STOW endpoint (reads and drops the body).

Usage:  .venv/bin/python bench/memory.py --size 1GiB --backlog 20000 [--rules]
        .venv/bin/python bench/memory.py --video 4500MiB   (needs /usr/bin/ffmpeg)

``--rules`` adds a metadata rule that changes every file, so each is sent as a rewritten
copy from the spool folder (the cost of rules).  ``--video`` drops one MPEG-2 video of that
size (a real clip at both ends, a sparse hole between) and sends it in both bulkdata modes:
``encapsulate`` (a Part-10 copy built in the spool, then sent) and ``metadata``.

Prints the peak RSS (VmHWM) of the stowd process for each case.  Figures, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from dicomgen import make_instance, make_instance_bytes  # noqa: E402

from stowd.classify import classify  # noqa: E402
from stowd.config import parse_size  # noqa: E402

CHUNK = 1024 * 1024


META_SOP_UID = b"\x02\x00\x03\x00UI"
JSON_SOP_UID = re.compile(rb'"00080018": \{"vr": "UI", "Value": \["([0-9.]+)"\]')


class Discard(BaseHTTPRequestHandler):
    """Reads the whole body, keeps nothing but the SOPInstanceUIDs of its File Meta headers,
    and answers that every one was stored."""

    def do_POST(self) -> None:
        left = int(self.headers["Content-Length"])
        uids = []
        while left:
            chunk = self.rfile.read(min(CHUNK, left))
            left -= len(chunk)
            uids += [m.decode() for m in JSON_SOP_UID.findall(chunk)]  # the metadata form
            at = chunk.find(META_SOP_UID)
            while at >= 0:
                length = struct.unpack("<H", chunk[at + 6 : at + 8])[0]
                uids.append(chunk[at + 8 : at + 8 + length].rstrip(b"\x00 ").decode())
                at = chunk.find(META_SOP_UID, at + 8)
        items = [{"00081155": {"vr": "UI", "Value": [u]}} for u in uids]
        body = json.dumps({"00081199": {"vr": "SQ", "Value": items}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


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
    path = folder / "stowd.yaml"
    path.write_text(
        f"""queue: ./state/queue.db
log_level: WARNING
sources:
  - {{name: b, watch: ./drop, sent: ./sent, failed: ./failed, destination: d,
      quiet_period: 100ms}}
destinations:
  d: {{url: "{url}", timeouts: {{read: 30m, write: 30m}}, bulkdata: {mode}}}
"""
        + (RULES if rules else "")
    )
    return path


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(
    folder: Path, url: str, expect: int, rules: bool, mode: str = "encapsulate"
) -> tuple[float, float]:
    path = config(folder, url, rules, mode)
    proc = subprocess.Popen([sys.executable, "-m", "stowd", "run", "-c", str(path)])
    started = time.monotonic()
    sent = folder / "sent"
    while proc.poll() is None:
        done = sum(len(f) for _, _, f in os.walk(sent)) if sent.exists() else 0
        if done >= expect:
            break
        time.sleep(0.2)
    seconds = time.monotonic() - started
    rss = peak_rss_mb(proc.pid)
    proc.terminate()
    proc.wait(60)
    return seconds, rss


def video_case(url: str, text: str) -> None:
    size = parse_size(text)
    for mode in ("encapsulate", "metadata"):
        with tempfile.TemporaryDirectory(prefix="stowd-video-") as tmp:
            folder = Path(tmp)
            (folder / "drop").mkdir()
            sparse_video(folder / "drop" / "long.mpg", size)
            seconds, rss = run(folder, url, 1, False, mode)
            print(
                f"one MPEG-2 video of {text}, bulkdata: {mode}: {size / seconds / 1e6:.0f} MB/s "
                f"end to end, peak RSS {rss:.1f} MB"
            )


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
    server = ThreadingHTTPServer(("127.0.0.1", 0), Discard)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/dicom-web"
    if args.video:
        video_case(url, args.video)
        server.shutdown()
        return 0
    with tempfile.TemporaryDirectory(prefix="stowd-mem-") as tmp:
        one = Path(tmp) / "one"
        (one / "drop").mkdir(parents=True)
        size = parse_size(args.size)
        big_dicom(one / "drop" / "big.dcm", size)
        classify(str(one / "drop" / "big.dcm"))  # the file is valid for stowd
        seconds, rss = run(one, url, 1, args.rules)
        print(f"one file of {args.size}: {size / seconds / 1e6:.0f} MB/s, peak RSS {rss:.1f} MB")
        many = Path(tmp) / "many"
        (many / "drop").mkdir(parents=True)
        study = "1.2.826.0.1.3680043.8.498.7"
        for n in range(args.backlog):
            make_instance(many / "drop" / f"{n:06d}.dcm", study_uid=study)
        seconds, rss = run(many, url, args.backlog, args.rules)
        print(
            f"backlog of {args.backlog} small files: {args.backlog / seconds:.0f} files/s "
            f"end to end, peak RSS {rss:.1f} MB"
        )
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
