"""Pieces shared by the benchmark scripts in bench/ (not a test, not part of stowd).

- ``Discard``: the same answers from a handler in the calling process, for a benchmark
  that must see when each request arrives (bench/latency.py); it can itself be the limit
  (about 600 files/s of 64 KiB), so the throughput benchmarks use ``discard_process()``.
- ``discard_process()``: the discarding STOW endpoint (bench/discard.py) in its own process:
  it reads and drops the body and answers that every instance was stored, so stowd's own
  overhead is measured, not an archive's.
- ``link_process()``: the link emulator (bench/linkproxy.py) in its own process.
- ``peak_rss_mb()`` (VmHWM of a running process), ``cpu_seconds()`` and ``wait_sampled()``
  (exit code, peak VmHWM sampled until it ends, CPU seconds): what a sender process costs.
- ``stowd_env()``: the environment for stowd child processes, with this checkout first on
  PYTHONPATH, so a bench run measures the code next to it and not another installed copy.
- ``count_files()`` and ``queued_rows()``: progress of a running stowd, seen from outside.

Importing this module also puts tests/support/ on sys.path (dicomgen, orthanc).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "tests" / "support") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests" / "support"))

CHUNK = 1024 * 1024


META_SOP_UID = b"\x02\x00\x03\x00UI"
JSON_SOP_UID = re.compile(rb'"00080018": \{"vr": "UI", "Value": \["([0-9.]+)"\]')


class Discard(BaseHTTPRequestHandler):
    """Reads the whole body, keeps nothing but the SOPInstanceUIDs of its File Meta headers,
    and answers that every one was stored."""

    def do_POST(self) -> None:
        left = int(self.headers["Content-Length"])
        uids: list[str] = []
        carry = b""  # the end of the previous chunk: a File Meta UID may straddle two chunks
        while left:
            chunk = self.rfile.read(min(CHUNK, left))
            left -= len(chunk)
            uids += [m.decode() for m in JSON_SOP_UID.findall(chunk)]  # the metadata form
            carry = _meta_uids(carry + chunk, uids)
        items = [{"00081155": {"vr": "UI", "Value": [u]}} for u in uids]
        body = json.dumps({"00081199": {"vr": "SQ", "Value": items}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


def _meta_uids(data: bytes, uids: list[str]) -> bytes:
    """Append the MediaStorageSOPInstanceUIDs found in *data* to *uids*; return the tail to
    search again with the next chunk (an element cut off at the end, or the last bytes,
    which can hold the start of a tag but never a whole element)."""
    at = data.find(META_SOP_UID)
    while at >= 0:
        if at + 8 > len(data):
            return data[at:]
        end = at + 8 + struct.unpack("<H", data[at + 6 : at + 8])[0]
        if end > len(data):
            return data[at:]
        uids.append(data[at + 8 : end].rstrip(b"\x00 ").decode())
        at = data.find(META_SOP_UID, end)
    return data[-(len(META_SOP_UID) - 1) :]


@dataclass
class Child:
    """A helper process started by ``discard_process`` or ``link_process``: its first line
    of output was *url*; ``report`` is its last (JSON) line, once it has stopped."""

    url: str
    proc: subprocess.Popen[str]
    report: dict[str, Any] = field(default_factory=dict)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)


@contextlib.contextmanager
def _child(script: str, *args: str) -> Iterator[Child]:
    command = [sys.executable, str(Path(__file__).with_name(script)), *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().strip()
        if not first:
            raise RuntimeError(f"{script} did not start (exit code {proc.wait(10)})")
        child = Child(first, proc)
        yield child
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    last = out.strip().splitlines()[-1:] if out else []
    child.report = json.loads(last[0]) if last else {}


@contextlib.contextmanager
def discard_process() -> Iterator[Child]:
    """The fast discarding endpoint (bench/discard.py) in its own process; ``.url`` is its
    DICOMweb base URL."""
    with _child("discard.py") as child:
        yield child


@contextlib.contextmanager
def link_process(target: str, *options: str) -> Iterator[Child]:
    """The link emulator (bench/linkproxy.py) in front of *target* (an ``http://host:port/...``
    URL); ``.url`` is *target* with the proxy's host and port.  *options*: its options
    (``--delay 10ms``, ``--rate 200Mbit``, ...)."""
    parts = urlsplit(target)
    upstream = f"{parts.hostname}:{parts.port}"
    with _child("linkproxy.py", "--target", upstream, *options) as child:
        child.url = urlunsplit(parts._replace(netloc=child.url))
        yield child


def peak_rss_mb(pid: int) -> float:
    """VmHWM of a running process in MB (MiB), or NaN when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def wait_sampled(
    proc: subprocess.Popen[bytes], interval: float = 0.01, timeout: float | None = None
) -> tuple[int, float, float]:
    """Wait for *proc* to end; return its exit code, the highest VmHWM (MB) seen meanwhile,
    read every *interval* seconds (growth in its last moments can be missed), and the CPU
    seconds (user + system) it used, exact, from ``wait4``.

    Not ``ru_maxrss``: on Linux an exec'd child's ru_maxrss starts from its parent's
    high-water mark (the parent's memory it shared until exec), so a 10 MB curl started by
    a 60 MB Python would show 60 MB.  VmHWM belongs to the process's own memory map.
    After *timeout* seconds the process is killed (its exit code is then -9).
    """
    peak = 0.0
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        if deadline is not None and time.monotonic() > deadline:
            proc.kill()
            deadline = None
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, peak, usage.ru_utime + usage.ru_stime
        peak = max(peak, peak_rss_mb(proc.pid))
        time.sleep(interval)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process so far (NaN when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_peak_rss_mb() -> float:
    """This process's own VmHWM in MB (see ``wait_sampled`` for why not ru_maxrss)."""
    return peak_rss_mb(os.getpid())


def write_config(
    folder: Path, destination: dict[str, Any], *, done: str = ".", extra: str = ""
) -> Path:
    """``folder/stowd.yaml``: one source (``./drop``; ``sent``/``failed`` below ``done``) to
    the destination ``pacs``, quiet period 100 ms, warnings only; ``extra`` is appended YAML."""
    source = {
        "name": "bench",
        "watch": "./drop",
        "sent": f"{done}/sent",
        "failed": f"{done}/failed",
        "destination": "pacs",
        "quiet_period": "100ms",
    }
    config = {
        "queue": "./state/queue.db",
        "log_level": "WARNING",
        "sources": [source],
        "destinations": {"pacs": destination},
    }
    path = folder / "stowd.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False) + extra)
    return path


def stowd_env() -> dict[str, str]:
    """The environment for ``python -m stowd`` children: this checkout first on PYTHONPATH,
    and its bytecode cached as an installed stowd's is (pip compiles it when it installs):
    with ``PYTHONDONTWRITEBYTECODE`` set, as on the development machine, each start of the
    checkout compiled its ~80 modules again (about 0.08 CPU seconds, counted as stowd's)."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    rest = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + rest if rest else "")
    return env


def count_files(folder: Path) -> int:
    """Files below *folder* (0 when it does not exist yet)."""
    return sum(len(files) for _, _, files in os.walk(folder)) if folder.exists() else 0


def queued_rows(database: Path) -> int:
    """Rows in a running stowd's queue, read through a read-only connection (0 before the
    queue exists or while it is being created)."""
    if not database.exists():
        return 0
    try:
        db = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5)
        with contextlib.closing(db):
            return int(db.execute("SELECT count(*) FROM files").fetchone()[0])
    except sqlite3.Error:
        return 0
