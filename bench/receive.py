"""How fast stowd receives DICOM C-STORE, next to dcmtk's storescp, in one run (issue 16).

Usage (from the repository root; needs dcmtk's storescu/storescp on PATH)::

    .venv/bin/python bench/receive.py                       # 64 KiB and 512 KiB, 1 and 4 streams
    .venv/bin/python bench/receive.py --cases 64KiB:3000 --streams 1 --profile 20

Generates the instances with tests/dicomgen.py ``make_study`` (for each size, ``--studies``
studies, split into 4 quarters so 4 storescu processes can each send one), then for each
size and each number of parallel associations (``--streams``: one storescu process per
association, each sending its share), measures these receivers, each fresh, on loopback:

  storescp --ignore  dcmtk's storescp reading every instance and storing nothing: what the
                     senders and the network cost on this machine (a ceiling, not a rival)
  storescp           dcmtk's storescp ``--fork`` writing each instance to disk (no fsync, no
                     queue): the anchor
  pynetdicom --ignore  pynetdicom as it comes, set up as stowd used to set it up (data sets
                     to temp files, every storage class), its C-STORE handler answering
                     Success at once: what the toolkit stowd is built on costs
  pynetdicom tuned --ignore  the same, but set up by stowd.pipeline.dimse.configure (stowd's
                     own adaptations: no file meta in the temp file, C-STORE responses
                     encoded by hand, polls that wake on work): a ceiling for stowd
  stowd eatmydata    only when named in ``--receivers``: stowd under libeatmydata (Debian
                     package ``eatmydata``), every fsync a no-op.  NOT safe; it shows what the
                     fsyncs cost, nothing else
  stowd              ``stowd run`` with a ``receive:`` source: each instance written as a
                     Part-10 file, fsynced, its header read, renamed into place and its folder
                     fsynced, queued (SQLite, synchronous=FULL), only then Success.  Its
                     destination is a loopback port where nothing listens, so every file stays
                     queued and nothing is sent while it receives (the idle CPU stowd spends
                     afterwards, with everything queued and the archive unreachable, is printed
                     to show this does not compete)

Time is wall time from starting the storescu processes until the last one has exited (its
last instance answered Success and the association released), so it includes storescu
reading its files; rate = instances / time.  Every receiver must end with every instance
(files on disk; for stowd, rows in its queue) or the row is marked WRONG.  The maximum PDU is
65536 bytes on every receiver (stowd's default ``max_pdu``; storescp ``-pdu 65536``).

``--e2e N`` adds stowd end to end against a fresh local Orthanc (``workers: 2``): from the
first C-STORE until the last file is in sent/ (and when the senders had finished).
``--profile SECONDS`` samples the stowd daemon with py-spy (``pip install py-spy``) during
the first stowd case: the thread holding the GIL (``--gil``), so the samples are Python's CPU
time (a thread waiting in fsync or on the socket has let go of the GIL and is not counted);
it prints their shares by thread, by stage of the C-STORE handler, and by leaf function.

After each size, the "durable floor" is printed: what the fsyncs and the commit alone cost
per instance on this disk (``durable_floor()``).  Figures, never asserted; the machine's load
average is printed with them.
"""

from __future__ import annotations

import argparse
import collections
import linecache
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from benchlib import ROOT, count_files, cpu_seconds, queued_rows, stowd_env
from dicomgen import make_study
from orthanc import Orthanc, free_port

from stowd.config.yamlwalk import parse_size

MB = 1e6
PDU = 65536
QUARTERS = 4
TIMEOUT = 900.0
TUNED = "pynetdicom tuned --ignore"  # pynetdicom as stowd.pipeline.dimse sets it up
RECEIVERS = ("storescp --ignore", "storescp", "pynetdicom --ignore", TUNED, "stowd")
NO_FSYNC = "stowd eatmydata"  # fsync made a no-op: NOT safe, only to see what fsync costs
# dcmtk leaves Nagle's algorithm on unless TCP_NODELAY=1 is in its environment; then the last
# short PDU of each instance waits for a delayed ACK (~40 ms): 11-23 files/s at 64 KiB here,
# whoever receives.  Off for storescu and storescp (--nagle leaves it on).
DCMTK = {**os.environ, "TCP_NODELAY": "1"}


@dataclass
class Row:
    receiver: str
    size: str
    streams: int
    files: int
    bytes: int
    seconds: float
    problems: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def files_s(self) -> float:
        return self.files / self.seconds

    @property
    def mb_s(self) -> float:
        return self.bytes / self.seconds / MB


# -- the instances ---------------------------------------------------------------------------
def generate(stage: Path, files: int, size: int, studies: int) -> list[list[Path]]:
    """*files* instances of about *size* bytes in *studies* studies; returned in quarters
    (every study's files dealt round robin, so each storescu sends part of every study)."""
    paths: list[Path] = []
    for study in range(studies):
        made = make_study(stage / f"study{study:02d}", files // studies, size_bytes=size)
        paths += [path for path, _ in made]
    return [paths[q::QUARTERS] for q in range(QUARTERS)]


def shares(quarters: list[list[Path]], streams: int) -> list[list[Path]]:
    """The files of each storescu process: all in one, or one quarter each."""
    if streams == 1:
        return [[p for quarter in quarters for p in quarter]]
    return quarters[:streams]


def send(port: int, called: str, groups: list[list[Path]], work: Path) -> tuple[float, list[str]]:
    """Run one storescu per group at once; the seconds until all have exited, and problems."""
    procs = []
    started = time.monotonic()
    for n, group in enumerate(groups):
        command = ["storescu", "-aet", f"MOD{n}", "-aec", called, "--max-send-pdu", str(PDU)]
        command += ["127.0.0.1", str(port), *map(str, group)]
        with open(work / f"storescu{n}.log", "wb") as log:
            procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=DCMTK))
    codes = [proc.wait(TIMEOUT) for proc in procs]
    seconds = time.monotonic() - started
    problems = [f"storescu {n} exited {code}" for n, code in enumerate(codes) if code]
    return seconds, problems


def listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} (exit code {proc.poll()})")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- storescp ----------------------------------------------------------------------------------
def measure_storescp(groups: list[list[Path]], work: Path, *, ignore: bool) -> Row:
    out = work / "storescp"
    out.mkdir()
    port = free_port()
    command = ["storescp", "--fork", "-pdu", str(PDU), "-aet", "STORESCP", "-od", str(out)]
    command += ["--ignore"] if ignore else []
    with open(work / "storescp.log", "wb") as log:
        proc = subprocess.Popen(
            [*command, str(port)], stdout=log, stderr=subprocess.STDOUT, env=DCMTK
        )
        try:
            listening(port, proc)
            seconds, problems = send(port, "STORESCP", groups, work)
        finally:
            stop(proc)
    files = sum(len(g) for g in groups)
    stored = count_files(out)
    if not ignore and stored != files:
        problems.append(f"{stored} of {files} files written")
    name = "storescp --ignore" if ignore else "storescp"
    return Row(name, "", len(groups), files, _bytes(groups), seconds, problems)


def user_seconds(pid: int) -> float:
    """User CPU seconds of a running process so far (without the kernel's)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / os.sysconf("SC_CLK_TCK")


def _bytes(groups: list[list[Path]]) -> int:
    return sum(p.stat().st_size for g in groups for p in g)


# -- pynetdicom alone ---------------------------------------------------------------------------
def pynetdicom_child(port: int, folder: str, tuned: bool) -> int:
    """pynetdicom (unrestricted storage, data sets written to a temp file in *folder*, PDUs up
    to 64 KiB; *tuned*: set up by ``stowd.pipeline.dimse.configure``), with a C-STORE handler
    that answers Success at once: what pynetdicom itself costs per instance."""
    import functools  # noqa: PLC0415 - only in this child
    import threading  # noqa: PLC0415

    from pynetdicom import AE, _config, dimse_messages, evt  # noqa: PLC0415

    from stowd.pipeline import dimse  # noqa: PLC0415

    if tuned:
        dimse.configure(Path(folder))
    else:
        dimse_messages.NamedTemporaryFile = functools.partial(  # type: ignore[attr-defined,assignment]
            tempfile.NamedTemporaryFile, dir=folder
        )
        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.UNRESTRICTED_STORAGE_SERVICE = True
    ae = AE(ae_title="PYNETDICOM")
    ae.maximum_pdu_size = PDU
    ae.maximum_associations = 10

    def stored(event: evt.Event) -> int:
        dimse.done_with(Path(event.dataset_path))
        return 0x0000

    handlers: list[Any] = [(evt.EVT_C_STORE, stored if tuned else lambda event: 0x0000)]
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    if server is not None:
        server.shutdown()
    return 0


def measure_pynetdicom(groups: list[list[Path]], work: Path, *, tuned: bool = False) -> Row:
    port = free_port()
    command = [sys.executable, __file__, "--pynetdicom-child", str(port), str(work)]
    command += ["tuned"] if tuned else []
    with open(work / "pynetdicom.log", "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=stowd_env())
        try:
            listening(port, proc)
            cpu = cpu_seconds(proc.pid)
            seconds, problems = send(port, "PYNETDICOM", groups, work)
            cpu = cpu_seconds(proc.pid) - cpu
        finally:
            stop(proc)
    files = sum(map(len, groups))
    note = f"pynetdicom CPU {cpu:.1f} s ({cpu / files * 1000:.1f} ms per instance)"
    name = TUNED if tuned else "pynetdicom --ignore"
    return Row(name, "", len(groups), files, _bytes(groups), seconds, problems, note)


# -- stowd -------------------------------------------------------------------------------------
def stowd_config(work: Path, port: int, url: str) -> Path:
    source = {
        "name": "ct",
        "receive": {"ae_title": "STOWD", "port": port, "bind": "127.0.0.1", "max_pdu": PDU},
        "sent": "./sent",
        "failed": "./failed",
        "destination": "pacs",
    }
    doc = {
        "queue": "./state/queue.db",
        "log_level": "WARNING",
        "sources": [source],
        "destinations": {"pacs": {"url": url, "workers": 2}},
    }
    path = work / "stowd.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@contextmanager
def stowd(
    work: Path, url: str, *, fsync: bool = True
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    config = stowd_config(work, port, url)
    with open(work / "stowd.log", "wb") as log:
        command = [sys.executable, "-m", "stowd", "run", "-c", str(config)]
        command = command if fsync else ["eatmydata", *command]
        proc = subprocess.Popen(command, stderr=log, env=stowd_env(), cwd=work)
        try:
            listening(port, proc)
            yield proc, port
        finally:
            stop(proc)


def measure_stowd(
    groups: list[list[Path]], work: Path, profile: float, *, fsync: bool = True
) -> Row:
    unreachable = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens there
    files = sum(len(g) for g in groups)
    with stowd(work, unreachable, fsync=fsync) as (proc, port):
        cpu, user = cpu_seconds(proc.pid), user_seconds(proc.pid)
        spy = start_profile(proc.pid, work, profile) if profile else None
        seconds, problems = send(port, "STOWD", groups, work)
        busy, user = cpu_seconds(proc.pid) - cpu, user_seconds(proc.pid) - user
        if spy is not None:
            spy.wait(TIMEOUT)
        time.sleep(1.0)
        before = cpu_seconds(proc.pid)
        time.sleep(3.0)
        idle = (cpu_seconds(proc.pid) - before) / 3.0
        queued = queued_rows(work / "state" / "queue.db")
    if queued != files:
        problems.append(f"{queued} of {files} queued")
    note = (
        f"stowd CPU {busy:.1f} s ({busy / files * 1000:.1f} ms per instance, "
        f"{user / busy:.0%} of it user, the rest kernel); afterwards, "
        f"all queued: {idle * 100:.0f} % of a core"
    )
    name = "stowd" if fsync else NO_FSYNC
    row = Row(name, "", len(groups), files, _bytes(groups), seconds, problems, note)
    if spy is not None:
        row.note += "\n" + profile_report(work / "pyspy.txt")
        shutil.copy(work / "pyspy.txt", Path(tempfile.gettempdir()) / "stowd-receive-pyspy.txt")
    return row


def measure_e2e(groups: list[list[Path]], work: Path) -> Row:
    """stowd against a fresh Orthanc: first C-STORE until the last file is in sent/."""
    files = sum(len(g) for g in groups)
    with Orthanc(work / "orthanc") as archive, stowd(work, archive.dicomweb_url) as (proc, port):
        started = time.monotonic()
        received, problems = send(port, "STOWD", groups, work)
        deadline = started + TIMEOUT
        while count_files(work / "sent") + count_files(work / "failed") < files:
            if time.monotonic() > deadline or proc.poll() is not None:
                problems.append("stowd stopped or timed out before every file was done")
                break
            time.sleep(0.05)
        seconds = time.monotonic() - started
        stored = archive.instance_count()
    if stored != files:
        problems.append(f"Orthanc holds {stored} of {files}")
    note = f"senders done after {received:.1f} s ({files / received:.0f} files/s received)"
    return Row("stowd -> Orthanc", "", len(groups), files, _bytes(groups), seconds, problems, note)


# -- what durability costs on this disk, without any DICOM --------------------------------------
def durable_floor(folder: Path, size: int, files: int) -> float:
    """Seconds per instance for what stowd's promise needs and storescp does not do, one
    after another: write *size* bytes and fsync, rename into a folder and fsync it, insert a
    row and commit (SQLite WAL, synchronous=FULL).  No DICOM, no network, no threads."""
    folder.mkdir()
    (folder / "in").mkdir()
    db = sqlite3.connect(folder / "q.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE files (path TEXT)")
    data = os.urandom(size)
    started = time.monotonic()
    for n in range(files):
        part, final = folder / f"{n}.part", folder / "in" / f"{n}.dcm"
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        os.rename(part, final)
        _fsync_dir(final.parent)
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO files VALUES (?)", (str(final),))
        db.execute("COMMIT")
    seconds = (time.monotonic() - started) / files
    db.close()
    shutil.rmtree(folder)
    return seconds


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- profile -----------------------------------------------------------------------------------
def start_profile(pid: int, work: Path, seconds: float) -> subprocess.Popen[bytes]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    command = [spy, "record", "--gil", "--threads", "--format", "raw", "-r", "200"]
    command += ["-d", str(int(seconds)), "-o", str(work / "pyspy.txt"), "-p", str(pid)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # py-spy attaches
    return proc


STAGES = {  # a function in a stack: what it is (the innermost one found names the sample)
    "fsync": "fsync of the Part-10 file",
    "fsync_dir": "fsync of the study folder (and its parent)",
    "Queue.enqueue": "queue: SQLite insert + commit",
    "classify_dicom": "header read (classify)",
    "write_file_meta_info": "writing a file meta (pydicom; pynetdicom too, for its temp file)",
    "_data_set_start": "reading pynetdicom's file meta",
    "_copy_rest": "copying the data set (sendfile)",
    "Receiver._place": "rename and folders",
    "Receiver._queue": "queue: stat and the rest",
    "Receiver._store": "stowd's handler, the rest",
    "AssociationSocket.recv": "pynetdicom: socket recv",
    "AssociationSocket.send": "pynetdicom: socket send",
    "Association._run_reactor": "pynetdicom: association reactor (polls every 1 ms)",
    "DULServiceProvider.run_reactor": "pynetdicom: DUL reactor (polls, reads, decodes PDUs)",
}
THREADS = {  # thread name (before any @ or -number) -> what it is
    "AcceptorThread": "association (pynetdicom reactor + stowd's C-STORE handler)",
    "Thread (run_reactor)": "association DUL (pynetdicom: socket, PDUs, its temp file)",
    "read-new": "stowd read-new (the header read of queued files)",
    "send-pacs": "stowd sender (destination unreachable)",
}


def profile_report(raw: Path, top: int = 12) -> str:
    """Where the GIL-holding samples of the stowd process went: by thread, by stage, and
    the top leaf functions."""
    threads: collections.Counter[str] = collections.Counter()
    stages: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames, n = stack.split(";"), int(count)
        name = re.sub(r"@\d+|-\d+", "", frames[0].partition(": ")[2])
        threads[THREADS.get(name, name)] += n
        stages[_stage(frames)] += n
        leaves[frames[-1]] += n
    total = sum(threads.values())
    lines = [f"py-spy: {total} samples of the thread holding the GIL (Python's CPU time)"]
    for title, counts in (("by thread", threads), ("by stage", stages), ("leaves", leaves)):
        lines.append(f"  {title}:")
        lines += [f"  {n / total:6.1%}  {what}" for what, n in counts.most_common(top)]
    return "\n".join(lines)


CALLS = {"os.fsync(": "fsync", "os.sendfile(": "copying the data set (sendfile)"}


def _stage(frames: list[str]) -> str:
    call = _builtin_call(frames[-1])  # py-spy shows no built-in: the line calling it
    if call:
        return CALLS[call] + " (in " + frames[-1].partition(" (")[0] + ")"
    for frame in reversed(frames[1:]):
        function = frame.partition(" (")[0]
        if function in STAGES:
            return STAGES[function]
    return "other: " + frames[-1].partition(" (")[0]


def _builtin_call(frame: str) -> str | None:
    """The known built-in call on a stowd source line, e.g. ``os.fsync(``."""
    where = frame.rpartition(" (")[2].rstrip(")")
    file, _, line = where.rpartition(":")
    if not file.startswith("stowd/") or not line.isdigit():
        return None
    text = linecache.getline(str(ROOT / file), int(line))
    return next((call for call in CALLS if call in text), None)


# -- the run -----------------------------------------------------------------------------------
def run_case(size: str, files: int, args: argparse.Namespace, tmp: Path) -> list[Row]:
    stage = tmp / f"stage-{size}"
    quarters = generate(stage, files, parse_size(size), args.studies)
    rows: list[Row] = []
    for streams in args.streams:
        groups = shares(quarters, streams)
        for receiver in args.receivers:
            work = Path(tempfile.mkdtemp(prefix="case-", dir=tmp))
            if receiver in ("pynetdicom --ignore", TUNED):
                row = measure_pynetdicom(groups, work, tuned=receiver == TUNED)
            elif receiver == NO_FSYNC:
                row = measure_stowd(groups, work, 0.0, fsync=False)
            elif receiver == "stowd":
                profile = args.profile if args.profile and not _profiled(rows) else 0.0
                row = measure_stowd(groups, work, profile)
            else:
                row = measure_storescp(groups, work, ignore=receiver.endswith("--ignore"))
            row.size = size
            rows.append(row)
            _print(row)
            shutil.rmtree(work)
    shutil.rmtree(stage)
    floor = durable_floor(tmp / "floor", parse_size(size), min(files, 500))
    print(
        f"durable floor      {size:>7}: {floor * 1000:.2f} ms per instance "
        f"({1 / floor:.0f} files/s, one at a time): write+fsync, rename+fsync dir, commit",
        flush=True,
    )
    return rows


def _profiled(rows: list[Row]) -> bool:
    return any("py-spy" in r.note for r in rows)


def _print(row: Row) -> None:
    mark = f"  WRONG: {'; '.join(row.problems)}" if row.problems else ""
    print(
        f"{row.receiver:18} {row.size:>7} x{row.streams} {row.files:6d} files "
        f"{row.seconds:7.2f} s {row.files_s:7.0f} files/s {row.mb_s:7.1f} MB/s{mark}",
        flush=True,
    )
    if row.note:
        print("    " + row.note.replace("\n", "\n    "), flush=True)


def table(rows: list[Row]) -> str:
    names = [n for n in (*RECEIVERS, NO_FSYNC) if any(r.receiver == n for r in rows)]
    heads = [n + " (anchor)" if n == "storescp" else n for n in names]
    ratios = [n for n in (TUNED, "stowd") if n in names]
    lines = [
        f"| size | streams | {' | '.join(heads)} | "
        + " | ".join(f"{n} / storescp" for n in ratios)
        + " |",
        "| --- | --- |" + " --- |" * (len(names) + len(ratios)),
    ]
    shown = {(r.size, r.streams) for r in rows if r.receiver in names}
    cases = sorted(shown, key=lambda c: (parse_size(c[0]), c[1]))
    for size, streams in cases:
        found = {r.receiver: r for r in rows if (r.size, r.streams) == (size, streams)}
        cells = [_cell(found.get(name)) for name in names]
        cells += [_ratio(found.get(name), found.get("storescp")) for name in ratios]
        lines.append(f"| {size} | {streams} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _ratio(ours: Row | None, anchor: Row | None) -> str:
    return f"{ours.files_s / anchor.files_s:.2f}x" if anchor and ours else "-"


def _cell(row: Row | None) -> str:
    if row is None:
        return "-"
    wrong = " WRONG" if row.problems else ""
    return f"{row.files_s:.0f} files/s, {row.mb_s:.1f} MB/s{wrong}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cases", default="64KiB:3000,512KiB:1000", help="SIZE:FILES,... (default %(default)s)"
    )
    parser.add_argument("--streams", default="1,4", help="parallel associations: 1, 4 or both")
    parser.add_argument("--receivers", default=",".join(RECEIVERS))
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--e2e", type=int, default=0, help="files of 512 KiB sent end to end")
    parser.add_argument("--profile", type=float, default=0.0, help="py-spy seconds (stowd)")
    parser.add_argument("--nagle", action="store_true", help="dcmtk without TCP_NODELAY=1")
    args = parser.parse_args(argv)
    if args.nagle:
        DCMTK.pop("TCP_NODELAY", None)
    args.cases = [(s, int(n)) for s, _, n in (c.partition(":") for c in args.cases.split(","))]
    args.streams = [int(s) for s in args.streams.split(",")]
    if any(s not in (1, QUARTERS) for s in args.streams):
        parser.error("--streams: 1 or 4")
    args.receivers = [r.strip() for r in args.receivers.split(",") if r.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["--pynetdicom-child"]:
        return pynetdicom_child(int(sys.argv[2]), sys.argv[3], sys.argv[4:5] == ["tuned"])
    args = parse_args(argv)
    for tool in ("storescu", "storescp"):
        if not shutil.which(tool):
            print(f"{tool} (dcmtk) is not on PATH", file=sys.stderr)
            return 2
    print(f"load average before: {os.getloadavg()[0]:.1f}; cores: {os.cpu_count()}", flush=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="stowd-receive-") as name:
        tmp = Path(name)
        for size, files in args.cases:
            rows += run_case(size, files, args, tmp)
        if args.e2e:
            rows += e2e(args, tmp)
    print(f"load average after: {os.getloadavg()[0]:.1f}\n")
    print(table(rows))
    return 1 if any(r.problems for r in rows) else 0


def e2e(args: argparse.Namespace, tmp: Path) -> list[Row]:
    quarters = generate(tmp / "stage-e2e", args.e2e, parse_size("512KiB"), args.studies)
    rows: list[Row] = []
    for streams in args.streams:
        work = Path(tempfile.mkdtemp(prefix="e2e-", dir=tmp))
        row = measure_e2e(shares(quarters, streams), work)
        row.size = "512KiB"
        rows.append(row)
        _print(row)
    return rows


if __name__ == "__main__":
    sys.exit(main())
