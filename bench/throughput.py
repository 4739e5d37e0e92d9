"""Speed and memory of stowd next to plain STOW-RS senders, on one machine, in one run (issue 7).

Usage (from the repository root; needs the ``bench`` extra: ``pip install -e '.[bench]'``)::

    .venv/bin/python bench/throughput.py --out docs --update-doc docs/benchmarks.md

Generates N DICOM instances (default 2,000 x 512 KiB in 20 studies, batches of 50 files per
study, as stowd makes them), then, each against a fresh local Orthanc with empty storage, at 1
and 4 concurrent streams:

  curl             pre-built multipart/related bodies (built before timing), one curl process
                   (``--parallel-max`` streams), the file uploaded as the body (-T)
  httpx            a generator body reading the files in 256 KiB chunks, STREAMS threads
  dicomweb-client  pydicom Datasets (``dcmread`` of each whole file) to ``store_instances``
  stowd run        from the moment the study folders are moved into the drop folder until
                   every file is in sent/ (``workers: STREAMS``)
  stowd migrate    ``stowd migrate --keep`` on the tree, start to exit (``workers: STREAMS``)

With ``--verify`` each stowd sender runs a second time with verification on (``verify: true``,
``stowd migrate --verify``: one QIDO-RS query per study and batch before files count as
stored), as ``stowd run +verify`` / ``stowd migrate +verify``, and the cost is printed::

    .venv/bin/python bench/throughput.py --verify --senders "stowd run,stowd migrate" \
        --discard-files 0 --big 0 --backlog 0

Every sender runs in its own child process; its peak RSS is that process's VmHWM (reported
by the Python senders themselves at the end, sampled every 10 ms for curl and stowd).  After
each, Orthanc's instance count must equal N (else the row is marked WRONG).  Then, against a
local endpoint that reads and discards the body (bench/benchlib.py): ``stowd run`` with 20,000
files of 64 KiB (stowd's own overhead), and bench/memory.py's one 4000 MiB file and 100,000-file
backlog.  Prints a table and the targets of issue 7 as MET / MISSED (figures, never asserted);
``--out DIR`` writes results.json, throughput.png and results.md; ``--update-doc FILE``
replaces the part of FILE between the ``<!-- throughput:begin -->`` and
``<!-- throughput:end -->`` markers with results.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import memory
from benchlib import (
    ROOT,
    Child,
    count_files,
    cpu_seconds,
    discard_process,
    link_process,
    peak_rss_mb,
    stowd_env,
    wait_sampled,
    write_config,
)
from dicomgen import make_instance_bytes
from linkproxy import parse_rate
from orthanc import Orthanc
from senders import write_body

from stowd.config.model import DEFAULT_BATCH_BYTES, DEFAULT_BATCH_FILES, DEFAULT_WORKERS
from stowd.config.yamlwalk import parse_size

SENDERS = ("curl", "httpx", "dicomweb-client", "stowd run", "stowd migrate")
VERIFIED = " +verify"  # the suffix of a stowd sender run with verify on (--verify)
BASELINE = "httpx"
BEGIN, END = "<!-- throughput:begin -->", "<!-- throughput:end -->"
MB = 1e6


# -- the files -------------------------------------------------------------------------------
def generate(stage: Path, files: int, size: int, studies: int, prefix: str = "study") -> int:
    """*files* instances of about *size* bytes in *studies* folders (one study each).

    One instance per study is encoded by tests/support/dicomgen.py; the others are copies of it with
    another SOPInstanceUID of the same length, so generating 100,000 files takes seconds.
    """
    per_study = max(1, files // studies)
    total = 0
    for study in range(studies):
        folder = stage / f"{prefix}{study:03d}"
        folder.mkdir(parents=True)
        base = f"1.2.826.0.1.3680043.8.498.{os.getpid()}.{study + 1}.1"
        template, uid = make_instance_bytes(sop_uid=f"{base}.{10**8}", size_bytes=size)
        for n in range(per_study):
            data = template.replace(uid.encode(), f"{base}.{n + 10**8}".encode())
            (folder / f"IM{n:06d}.dcm").write_bytes(data)
            total += 1
    return total


def batches_of(stage: Path, per_request: int) -> list[list[str]]:
    """The requests stowd makes: per study folder, up to *per_request* files and stowd's
    default ``batch.max_bytes`` each (a larger single file alone), as stowd/pipeline/group.py."""
    batches: list[list[str]] = []
    for folder in sorted(stage.iterdir()):
        batch: list[str] = []
        total = 0
        for path in sorted(folder.iterdir()):
            size = path.stat().st_size
            if batch and (len(batch) >= per_request or total + size > DEFAULT_BATCH_BYTES):
                batches.append(batch)
                batch, total = [], 0
            batch.append(str(path))
            total += size
        batches += [batch] if batch else []
    return batches


def tree_bytes(stage: Path) -> int:
    return sum(p.stat().st_size for p in stage.rglob("*") if p.is_file())


# -- one measurement -------------------------------------------------------------------------
@dataclass
class Row:
    sender: str
    streams: int
    files: int
    bytes: int
    seconds: float
    rss_mb: float
    cpu_s: float  # CPU seconds (user + system) of the sender process
    stored: int | None  # Orthanc's instance count afterwards (None: discarding endpoint)
    problems: list[str] = field(default_factory=list)
    ratio: float | None = None  # files/s over the baseline's at the same streams
    cpu_ratio: float | None = None  # CPU seconds per file over the baseline's, same streams
    batch: int = 0  # files per request (link and ceiling rows; 0: the run's --per-request)
    where: str = ""  # what it sent to, when not a plain local Orthanc
    size: str = ""  # each file's size as asked (link rows: ``--link-size``, ...)

    @property
    def label(self) -> str:
        """The sender, with its workers and batch size where they vary (link rows)."""
        return self.sender + (f", batch {self.batch}" if self.batch else "")

    @property
    def files_s(self) -> float:
        return self.files / self.seconds

    @property
    def mb_s(self) -> float:
        return self.bytes / self.seconds / MB

    @property
    def ok(self) -> bool:
        return not self.problems and self.stored in (None, self.files)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "files_s": self.files_s, "mb_s": self.mb_s, "ok": self.ok}


@dataclass
class Setup:
    work: Path
    stage: Path
    batches: Path  # JSON list of lists of paths
    bodies: list[tuple[Path, str]]  # curl: (body file, Content-Type) per batch
    files: int
    bytes: int
    per_request: int


Sent = tuple[float, float, float, list[str]]  # seconds, peak RSS MB, CPU seconds, problems
Measure = Callable[[Setup, Path, str, int], Sent]


def measure_curl(setup: Setup, work: Path, url: str, streams: int) -> Sent:
    config = work / "curl.cfg"
    blocks = [
        f'url = "{url}/studies"\nrequest = "POST"\nupload-file = "{body}"\n'
        f'header = "Content-Type: {kind.replace(chr(34), chr(92) + chr(34))}"\n'
        'header = "Accept: application/dicom+json"\nheader = "Expect:"\n'
        'output = "/dev/null"\nwrite-out = "%{http_code}\\n"\n'
        for body, kind in setup.bodies
    ]
    config.write_text("next\n".join(blocks))  # "next" between transfers, not after the last
    parallel = ["--parallel", "--parallel-immediate", "--parallel-max", str(streams)]
    command = ["curl", "--silent", "--show-error", *(parallel if streams > 1 else []), "-K"]
    codes = work / "codes.txt"
    with open(codes, "wb") as out, open(work / "curl.err", "wb") as err:
        started = time.monotonic()
        proc = subprocess.Popen([*command, str(config)], stdout=out, stderr=err)
        code, rss, cpu = wait_sampled(proc, timeout=_timeout(setup.files))
        seconds = time.monotonic() - started
    got = codes.read_text().split()
    problems = [f"curl exited {code}: {_tail(work / 'curl.err')}"] if code else []
    problems += [f"{got.count(c)} requests answered {c}" for c in sorted(set(got)) if c != "200"]
    if len(got) != len(setup.bodies):
        problems.append(f"{len(got)} answers to {len(setup.bodies)} requests")
    return seconds, rss, cpu, problems


def measure_python(name: str) -> Measure:
    def measure(setup: Setup, work: Path, url: str, streams: int) -> Sent:
        script = Path(__file__).with_name("senders.py")
        args = [sys.executable, str(script), name, str(setup.batches), f"{url}/studies"]
        with open(work / "out.json", "wb") as out, open(work / "err.txt", "wb") as err:
            started = time.monotonic()
            proc = subprocess.Popen([*args, str(streams)], stdout=out, stderr=err)
            code, rss, cpu = wait_sampled(proc, timeout=_timeout(setup.files))
            seconds = time.monotonic() - started
        problems = [f"{name} exited {code}: {_tail(work / 'err.txt')}"] if code else []
        if not code:
            report = json.loads((work / "out.json").read_text())
            problems += report["bad"][:5]
            rss = report["rss_mb"]  # its own VmHWM at the end: exact, not sampled
        return seconds, rss, cpu, problems

    return measure


def stowd_config(
    work: Path, url: str, workers: int, per_request: int, *, verify: bool = False
) -> Path:
    dest = {"url": url, "workers": workers, "batch": {"max_files": per_request}}
    if verify:
        dest["verify"] = True
    config = write_config(work, dest)
    (work / "drop").mkdir(exist_ok=True)
    return config


def stowd_run(
    work: Path,
    url: str,
    workers: int,
    stage: Path,
    *,
    files: int,
    per_request: int,
    verify: bool = False,
) -> Sent:
    """Start ``stowd run``, move hard-linked copies of the study folders into its drop folder
    at once, and time until all are in sent/ (or failed/)."""
    config = stowd_config(work, url, workers, per_request, verify=verify)
    incoming = work / "incoming"
    for study in sorted(stage.iterdir()):
        shutil.copytree(study, incoming / study.name, copy_function=os.link)
    with open(work / "stowd.log", "wb") as log:
        command = [sys.executable, "-m", "stowd", "run", "-c", str(config)]
        proc = subprocess.Popen(command, stderr=log, env=stowd_env(), cwd=work)
        wait_started(work / "state" / "queue.db", proc)
        started = time.monotonic()
        for study in sorted(incoming.iterdir()):
            study.rename(work / "drop" / study.name)
        deadline = started + _timeout(files)
        sent = failed = 0
        while proc.poll() is None and time.monotonic() < deadline:
            sent, failed = count_files(work / "sent"), count_files(work / "failed")
            if sent + failed >= files:
                break
            time.sleep(0.05)
        seconds = time.monotonic() - started
        rss, cpu = peak_rss_mb(proc.pid), cpu_seconds(proc.pid)
        proc.terminate()
        code = proc.wait(60)
    problems = [] if sent == files else [f"{sent} of {files} in sent/, {failed} in failed/"]
    if code not in (0, -15):
        problems.append(f"stowd run exited {code}: {_tail(work / 'stowd.log')}")
    return seconds, rss, cpu, problems


def wait_started(database: Path, proc: subprocess.Popen[bytes]) -> None:
    """Until stowd has opened its queue (its watchers start right after), then a moment."""
    deadline = time.monotonic() + 30
    while not database.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)


def measure_stowd_run(
    setup: Setup, work: Path, url: str, streams: int, verify: bool = False
) -> Sent:
    return stowd_run(
        work,
        url,
        streams,
        setup.stage,
        files=setup.files,
        per_request=setup.per_request,
        verify=verify,
    )


def measure_migrate(setup: Setup, work: Path, url: str, streams: int, verify: bool = False) -> Sent:
    config = stowd_config(work, url, streams, setup.per_request)
    command = [sys.executable, "-m", "stowd", "migrate", "-c", str(config)]
    command += ["--destination", "pacs", "--keep", str(setup.stage)]
    command += ["--verify"] if verify else []
    with open(work / "migrate.out", "wb") as out, open(work / "migrate.log", "wb") as log:
        started = time.monotonic()
        proc = subprocess.Popen(command, stdout=out, stderr=log, env=stowd_env(), cwd=work)
        code, rss, cpu = wait_sampled(proc, timeout=_timeout(setup.files))
        seconds = time.monotonic() - started
    problems = [f"stowd migrate exited {code}: {_tail(work / 'migrate.log')}"] if code else []
    return seconds, rss, cpu, problems


MEASURES: dict[str, Measure] = {
    "curl": measure_curl,
    "httpx": measure_python("httpx"),
    "dicomweb-client": measure_python("dicomweb-client"),
    "stowd run": measure_stowd_run,
    "stowd migrate": measure_migrate,
    "stowd run" + VERIFIED: lambda setup, work, url, streams: measure_stowd_run(
        setup, work, url, streams, verify=True
    ),
    "stowd migrate" + VERIFIED: lambda setup, work, url, streams: measure_migrate(
        setup, work, url, streams, verify=True
    ),
}


def _timeout(files: int) -> float:
    """How long one sender may take before it is killed (and its row marked WRONG)."""
    return max(600.0, files / 5)


def _tail(path: Path, lines: int = 3) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return " | ".join(text[-lines:])


def measure_orthanc(setup: Setup, sender: str, streams: int, link: list[str] | None = None) -> Row:
    """One sender at one concurrency against a fresh Orthanc (through a fresh link emulator
    with these options when *link* is given); its storage is removed after."""
    work = _work(setup, sender, streams)
    try:
        with Orthanc(work / "orthanc") as orthanc:
            if link is None:
                sent = MEASURES[sender](setup, work, orthanc.dicomweb_url, streams)
            else:
                with link_process(orthanc.dicomweb_url, *link) as proxy:
                    sent = MEASURES[sender](setup, work, proxy.url, streams)
            stored = orthanc.instance_count()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds, rss, cpu, problems = sent
    if stored != setup.files:
        problems.append(f"Orthanc stored {stored} of {setup.files}")
    return Row(sender, streams, setup.files, setup.bytes, seconds, rss, cpu, stored, problems)


def measure_discarding(
    setup: Setup, sender: str, streams: int, endpoint: Child, link: list[str] | None = None
) -> Row:
    """One sender against the fast discarding endpoint (through a fresh link emulator with
    these options when *link* is given); ``where`` notes the endpoint's CPU meanwhile."""
    work = _work(setup, sender, streams)
    try:
        busy = endpoint.cpu_seconds()
        if link is None:
            sent = MEASURES[sender](setup, work, endpoint.url, streams)
        else:
            with link_process(endpoint.url, *link) as proxy:
                sent = MEASURES[sender](setup, work, proxy.url, streams)
        busy = endpoint.cpu_seconds() - busy
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds, rss, cpu, problems = sent
    row = Row(sender, streams, setup.files, setup.bytes, seconds, rss, cpu, None, problems)
    row.where = f"endpoint CPU {busy / seconds:.0%} of one core"
    return row


def _work(setup: Setup, sender: str, streams: int) -> Path:
    work = setup.work / f"{sender.replace(' ', '-')}-{streams}-{setup.per_request}"
    work.mkdir()
    return work


def make_setup(
    folder: Path, files: int, size: int, studies: int, per_request: int, *, curl: bool
) -> Setup:
    """Generate the files below *folder*, their batches and (for curl) their bodies."""
    stage = folder / "stage"
    total = generate(stage, files, size, studies)
    batches = batches_of(stage, per_request)
    (folder / "batches.json").write_text(json.dumps(batches))
    bodies: list[tuple[Path, str]] = []
    if curl:
        (folder / "bodies").mkdir()
        for n, batch in enumerate(batches):
            body = folder / "bodies" / f"{n:05d}.bin"
            bodies.append((body, write_body(body, batch)))
    setup = Setup(
        folder / "runs",
        stage,
        folder / "batches.json",
        bodies,
        total,
        tree_bytes(stage),
        per_request,
    )
    setup.work.mkdir()
    return setup


def _print_row(row: Row, note: str = "") -> None:
    stored = "discarded" if row.stored is None else f"stored {row.stored}/{row.files}"
    print(
        f"  {row.label:24s} {'workers' if row.sender.startswith('stowd') else 'streams'} "
        f"{row.streams}: {row.files_s:7.1f} files/s {row.mb_s:6.1f} MB/s  "
        f"CPU {row.cpu_s:5.2f} s  peak RSS {row.rss_mb:6.1f} MB  {stored}"
        + (f"  {note}" if note else "")
        + ("" if row.ok else f"  WRONG {row.problems[:3]}"),
        flush=True,
    )


# -- the ceiling: stowd against the fast discarding endpoint ---------------------------------
def ceiling_rows(args: argparse.Namespace, tmp: Path, endpoint: Child) -> list[Row]:
    """``stowd run`` against the fast discarding endpoint (stowd's own cost per file, its
    ceiling), first, then curl with the same requests at 1 and 4 streams: what the endpoint
    takes.  The endpoint is not the limit when curl gets at least twice stowd's files/s."""
    size = parse_size(args.discard_size)
    folder = tmp / "ceiling"
    setup = make_setup(folder, args.discard_files, size, args.studies, args.per_request, curl=True)
    print(
        f"ceiling: {setup.files} files of {args.discard_size}, {len(setup.bodies)} requests, "
        f"fast discarding endpoint {endpoint.url} (bench/discard.py, own process)",
        flush=True,
    )
    rows = [measure_discarding(setup, "stowd run", args.discard_workers, endpoint)]
    rows += [measure_discarding(setup, "curl", k, endpoint) for k in (1, 4)]
    for row in rows:
        _print_row(row, row.where)
    ratio = endpoint_ratio(rows)
    if ratio is not None:
        print(f"  {ratio[1]}", flush=True)
    shutil.rmtree(tmp / "ceiling", ignore_errors=True)
    return rows


def endpoint_ratio(rows: list[Row]) -> tuple[float, str] | None:
    """The best curl's files/s over stowd's against the endpoint, and what it shows."""
    stowd = next((r for r in rows if r.sender == "stowd run" and r.ok), None)
    curls = [r for r in rows if r.sender == "curl" and r.ok]
    if stowd is None or not curls:
        return None
    best = max(curls, key=lambda r: r.files_s)
    ratio = best.files_s / stowd.files_s
    verdict = (
        "MET: the endpoint is not the limit"
        if ratio >= 2
        else "MISSED: the endpoint (or curl) may be the limit"
    )
    text = (
        f"endpoint takes {best.files_s:.0f} files/s from curl ({_streams(best.streams)}), "
        f"{ratio:.2f}x stowd's {stowd.files_s:.0f} files/s (wanted >= 2x): {verdict}"
    )
    return ratio, text


# -- through the link emulator ---------------------------------------------------------------
def link_options(args: argparse.Namespace) -> list[str]:
    return ["--delay", args.link_delay, "--rate", args.link_rate]


def link_rate(args: argparse.Namespace) -> float:
    """The link's rate in bytes per second."""
    return parse_rate(args.link_rate)


def link_check(args: argparse.Namespace, tmp: Path, endpoint: Child) -> dict[str, float]:
    """What the link emulator does, measured: the time of a first small request (its
    connection's handshake and one round trip), the median of ten more on that connection
    (one round trip each), and the rate of one big upload by curl (PUT, read and dropped by
    the endpoint), to the discarding endpoint."""
    big = tmp / "link-check.bin"
    with open(big, "wb") as out:
        out.truncate(parse_size(args.link_check_size))
    with link_process(endpoint.url, *link_options(args)) as proxy:
        parts = urlsplit(proxy.url)
        connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=60)
        times = []
        for _ in range(11):
            started = time.monotonic()
            connection.request("GET", parts.path)
            connection.getresponse().read()
            times.append(time.monotonic() - started)
        connection.close()
        command = ["curl", "--silent", "--show-error", "-T", str(big), "-H", "Expect:"]
        command += ["-o", "/dev/null", "-w", "%{size_upload} %{time_total}", proxy.url + "/x"]
        done = subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    big.unlink()
    size, seconds = (float(x) for x in done.stdout.split())
    return {
        "migrate_start_s": migrate_start(tmp / "migrate-start", endpoint.url),
        "first_request_ms": times[0] * 1000,
        "rtt_ms": statistics.median(times[1:]) * 1000,
        "upload_mb_s": size / seconds / MB,
        "link_mb_s": link_rate(args) / MB,
        "upload_x_link": size / seconds / link_rate(args),
    }


@dataclass(frozen=True)
class LinkCase:
    """Files sent through the link, and the stowd workers and batch sizes they are sent at."""

    files: int
    size: str
    studies: int
    workers: list[int]
    batches: list[int]


def link_cases(args: argparse.Namespace) -> list[LinkCase]:
    """The big files at every workers and batch size asked, then the small files (64 KiB,
    where the archive's cost per file counts) at stowd's defaults."""
    cases = []
    if args.link_files:
        workers, batches = _ints(args.link_workers), _ints(args.link_batches)
        cases.append(LinkCase(args.link_files, args.link_size, args.link_studies, workers, batches))
    if args.link_small_files:
        cases.append(
            LinkCase(
                args.link_small_files,
                args.link_small_size,
                args.link_small_studies,
                [DEFAULT_WORKERS],
                [DEFAULT_BATCH_FILES],
            )
        )
    return cases


def migrate_start(work: Path, url: str, runs: int = 3) -> float:
    """The median seconds of ``stowd migrate`` on an empty folder, start to exit: what each
    migrate row counts besides sending (the daemon's rows start the clock with it running)."""
    (work / "empty").mkdir(parents=True)
    config = stowd_config(work, url, DEFAULT_WORKERS, DEFAULT_BATCH_FILES)
    command = [sys.executable, "-m", "stowd", "migrate", "-c", str(config)]
    command += ["--destination", "pacs", "--keep", str(work / "empty")]
    times = []
    for _ in range(runs):
        started = time.monotonic()
        subprocess.run(command, check=True, capture_output=True, env=stowd_env(), cwd=work)
        times.append(time.monotonic() - started)
    shutil.rmtree(work)
    return statistics.median(times)


def link_rows(args: argparse.Namespace, tmp: Path, endpoint: Child) -> list[Row]:
    """Each of ``link_cases``: curl at 1 and 4 streams, then stowd run and stowd migrate at
    each of its workers and batch sizes, each through a fresh link emulator, to a fresh
    Orthanc and to the discarding endpoint."""
    return [row for case in link_cases(args) for row in link_case_rows(args, case, tmp, endpoint)]


def link_case_rows(
    args: argparse.Namespace, case: LinkCase, tmp: Path, endpoint: Child
) -> list[Row]:
    folder = tmp / "link"
    setup = make_setup(
        folder, case.files, parse_size(case.size), case.studies, args.per_request, curl=True
    )
    options, rate = link_options(args), link_rate(args)
    print(
        f"link: {setup.files} files of {case.size} in {case.studies} studies, "
        f"{len(setup.bodies)} requests for curl; "
        f"link emulator {args.link_delay} each way, {args.link_rate} "
        f"({rate / MB:.1f} MB/s) each direction",
        flush=True,
    )
    rows = []
    for archive in args.link_archives.split(","):
        cases = [(setup, "curl", k) for k in _ints(args.link_streams)]
        for batch in case.batches:
            batched = replace(setup, per_request=batch)
            for sender in ("stowd run", "stowd migrate"):
                if sender in args.senders.split(","):
                    cases += [(batched, sender, w) for w in case.workers]
        for each, sender, streams in cases:
            if archive == "orthanc":
                row = measure_orthanc(each, sender, streams, options)
            else:
                row = measure_discarding(each, sender, streams, endpoint, options)
            row.where = archive
            row.batch, row.size = each.per_request, case.size
            rows.append(row)
            _print_row(row, f"{archive}, {row.mb_s * MB / rate:.2f}x link")
    shutil.rmtree(folder, ignore_errors=True)
    return rows


def _streams(n: int) -> str:
    return f"{n} stream" + ("" if n == 1 else "s")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


# -- targets ----------------------------------------------------------------------------------
@dataclass
class Target:
    name: str
    wanted: str
    got: str
    met: bool | None  # None: not measured or a row it needs was wrong

    @property
    def verdict(self) -> str:
        return {True: "MET", False: "MISSED", None: "NOT MEASURED"}[self.met]


def targets(results: Results) -> list[Target]:
    """Issue 7's targets, then issue 19's."""
    rows, ceiling = results.rows, results.ceiling
    found: list[Target] = []
    by = {(r.sender, r.streams): r for r in rows}
    for streams in sorted({r.streams for r in rows}):
        for stowd in ("stowd run", "stowd migrate"):
            for other, factor in ((BASELINE, 0.95), ("dicomweb-client", 2.0)):
                found.append(_ratio_target(by, (stowd, other), factor, streams))
    discard = next((r for r in ceiling if r.sender == "stowd run"), None)
    if discard is not None:
        found.append(_ceiling_target(discard, 1000))
    found += memory_targets(results.big, results.backlog)
    found += issue19_targets(results)
    return found


def memory_targets(big: dict[str, Any] | None, backlog: dict[str, Any] | None) -> list[Target]:
    found = []
    if big is not None:
        found.append(
            Target(
                f"peak RSS, one file of {_size(big['size'])}",
                "< 150 MB",
                f"{big['rss_mb']:.1f} MB",
                big["rss_mb"] < 150,
            )
        )
    if backlog is not None:
        found.append(
            Target(
                f"peak RSS, backlog of {backlog['files']} files",
                "< 150 MB",
                f"{backlog['rss_mb']:.1f} MB",
                backlog["rss_mb"] < 150,
            )
        )
        found.append(
            Target(
                f"backlog of {backlog['files']} files scanned and queued",
                "< 60 s",
                f"{backlog['queued_seconds']:.1f} s",
                backlog["queued_seconds"] < 60,
            )
        )
    return found


def issue19_targets(results: Results) -> list[Target]:
    """Issue 19: the best raw sender and CPU per file (Orthanc rows), the ceiling, the link."""
    rows, found = results.rows, []
    by = {(r.sender, r.streams): r for r in rows}
    for streams in sorted({r.streams for r in rows}):
        raw = [by[s, streams] for s in ("curl", "httpx") if (s, streams) in by]
        best = max(raw, key=lambda r: r.files_s) if raw else None
        for stowd in ("stowd run", "stowd migrate"):
            found.append(_best_raw_target(by.get((stowd, streams)), best, raw, streams))
        for stowd in ("stowd run", "stowd migrate"):
            found.append(_cpu_target(by.get((stowd, streams)), by.get((BASELINE, streams))))
    discard = next((r for r in results.ceiling if r.sender == "stowd run"), None)
    if discard is not None:
        found.append(_ceiling_target(discard, 3000))
        ratio = endpoint_ratio(results.ceiling)
        found.append(
            Target(
                "discarding endpoint: best curl's files/s over stowd's",
                ">= 2 x",
                "-" if ratio is None else f"{ratio[0]:.2f} x",
                None if ratio is None else ratio[0] >= 2,
            )
        )
    found += link_targets(results.link, results.info.get("link_rate", 0.0))
    return found


def _best_raw_target(row: Row | None, best: Row | None, raw: list[Row], streams: int) -> Target:
    plural = "stream" if streams == 1 else "streams"
    name = f"{row.sender if row else 'stowd'} vs the best raw sender, {streams} {plural}"
    if row is None or best is None:
        return Target(name, ">= 1.0 x", "-", None)
    ratio = row.files_s / best.files_s
    met = ratio >= 1.0 if row.ok and all(r.ok for r in raw) else None
    return Target(name, ">= 1.0 x", f"{ratio:.2f} x ({best.sender})", met)


def _cpu_target(row: Row | None, base: Row | None) -> Target:
    if row is None or base is None:
        return Target("CPU per file vs raw httpx", "<= 1.5 x", "-", None)
    plural = "stream" if row.streams == 1 else "streams"
    ratio = (row.cpu_s / row.files) / (base.cpu_s / base.files)
    met = ratio <= 1.5 if row.ok and base.ok else None
    name = f"{row.sender} CPU per file vs raw httpx, {row.streams} {plural}"
    return Target(name, "<= 1.5 x", f"{ratio:.2f} x", met)


def _ceiling_target(row: Row, wanted: float) -> Target:
    what = "fast discarding endpoint (the ceiling)" if wanted >= 3000 else "discarding endpoint"
    return Target(
        f"stowd run, {row.files} files of {_size(row.bytes / row.files)}, {what}",
        f">= {wanted:.0f} files/s",
        f"{row.files_s:.0f} files/s",
        row.files_s >= wanted if row.ok else None,
    )


def link_targets(rows: list[Row], rate: float) -> list[Target]:
    """Per file size, archive and stowd sender: the best of its workers and batch sizes
    (when more than one was measured), and stowd's defaults (``workers``,
    ``batch.max_files``; ``max_bytes`` is never set here, so it is the default in every row)
    where measured, as a fraction of the link rate."""
    found = []
    for size, where in dict.fromkeys((file_size(r), r.where) for r in rows):
        for sender in ("stowd run", "stowd migrate"):
            mine = [r for r in rows if (file_size(r), r.where, r.sender) == (size, where, sender)]
            if not mine or not rate:
                continue
            best = max(mine, key=lambda r: r.mb_s)
            defaults = (DEFAULT_WORKERS, DEFAULT_BATCH_FILES)
            default = [r for r in mine if (r.streams, r.batch) == defaults]
            shown = [(best, "best")] if len(mine) > 1 else []
            for row, what in [*shown, *((r, "defaults") for r in default)]:
                found.append(
                    Target(
                        f"{sender} through the link to {where}, {size} files, {what} "
                        f"(workers {row.streams}, batch {row.batch})",
                        ">= 0.9 x link rate",
                        f"{row.mb_s * MB / rate:.2f} x ({row.mb_s:.1f} MB/s)",
                        row.mb_s * MB / rate >= 0.9 if row.ok else None,
                    )
                )
    return found


def file_size(row: Row) -> str:
    """The size of each file the row sent as asked (``512KiB``), else the mean measured."""
    return row.size or _size(row.bytes / row.files)


def _ratio_target(
    by: dict[tuple[str, int], Row], pair: tuple[str, str], factor: float, streams: int
) -> Target:
    """*pair*[0]'s files/s over *pair*[1]'s at the same streams, wanted >= *factor*."""
    plural = "stream" if streams == 1 else "streams"
    name = f"{pair[0]} vs {pair[1]}, {streams} {plural}"
    wanted = f">= {factor:g} x"
    row, other = by.get((pair[0], streams)), by.get((pair[1], streams))
    if row is None or other is None:
        return Target(name, wanted, "-", None)
    ratio = row.files_s / other.files_s
    met = ratio >= factor if row.ok and other.ok else None
    return Target(name, wanted, f"{ratio:.2f} x", met)


def _size(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{n:.0f} B"


# -- output -----------------------------------------------------------------------------------
def table(rows: list[Row]) -> list[list[str]]:
    out = [
        [
            "sender",
            "streams",
            "files/s",
            "MB/s",
            "peak RSS MB",
            "CPU s",
            f"x {BASELINE}",
            f"CPU/file x {BASELINE}",
            "stored",
        ]
    ]
    for r in rows:
        stored = f"{r.stored}/{r.files}" if r.stored is not None else "discarded"
        out.append(
            [
                r.sender,
                str(r.streams),
                f"{r.files_s:.1f}",
                f"{r.mb_s:.1f}",
                f"{r.rss_mb:.1f}",
                f"{r.cpu_s:.2f}",
                "-" if r.ratio is None else f"{r.ratio:.2f}",
                "-" if r.cpu_ratio is None else f"{r.cpu_ratio:.2f}",
                stored + ("" if r.ok else " WRONG"),
            ]
        )
    return out


def text_table(cells: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells
    )


def markdown_table(cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(row) + " |" for row in cells]
    lines.insert(1, "|" + " --- |" * len(cells[0]))
    return "\n".join(lines)


def target_cells(found: list[Target]) -> list[list[str]]:
    return [["target", "wanted", "measured", "verdict"]] + [
        [t.name, t.wanted, t.got, t.verdict] for t in found
    ]


@dataclass
class Results:
    info: dict[str, Any]
    rows: list[Row] = field(default_factory=list)  # against Orthanc
    ceiling: list[Row] = field(default_factory=list)  # against the fast discarding endpoint
    link: list[Row] = field(default_factory=list)  # through the link emulator
    link_check: dict[str, float] | None = None
    big: dict[str, Any] | None = None
    backlog: dict[str, Any] | None = None
    found: list[Target] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "info": self.info,
            "orthanc": [r.to_json() for r in self.rows],
            "discarding": [r.to_json() for r in self.ceiling],
            "link_check": self.link_check,
            "link": [r.to_json() for r in self.link],
            "big_file": self.big,
            "backlog": self.backlog,
            "targets": [{**asdict(t), "verdict": t.verdict} for t in self.found],
        }


def markdown(results: Results) -> str:
    info = results.info
    parts = [f"**{info['label']}**", ""] if info.get("label") else []
    parts.append(
        f"Run {info['date']} on {info['machine']}; {info['archive']}; stowd {info['stowd']}."
    )
    if results.rows:
        parts += [
            "",
            f"{info['files']} files of {info['size']} in {info['studies']} studies, "
            f"{info['per_request']} files per request:",
            "",
            markdown_table(table(results.rows)),
            "",
            "![throughput by sender and streams](throughput.png)",
        ]
    parts += ceiling_markdown(results)
    parts += link_markdown(results)
    parts += ["", markdown_table(target_cells(results.found)), ""]
    return "\n".join(parts)


def ceiling_markdown(results: Results) -> list[str]:
    big, backlog = results.big, results.backlog
    if not results.ceiling and big is None and backlog is None:
        return []
    extra = [["case", "figure", "CPU s", "peak RSS MB", "endpoint CPU"]]
    for r in results.ceiling:
        who = (
            f"stowd run, workers {r.streams}"
            if r.sender == "stowd run"
            else f"curl, {r.streams} stream" + ("s" if r.streams > 1 else "")
        )
        extra.append(
            [
                f"{who}, {r.files} files of {_size(r.bytes / r.files)}"
                + ("" if r.ok else " WRONG"),
                f"{r.files_s:.0f} files/s, {r.mb_s:.0f} MB/s",
                f"{r.cpu_s:.2f}",
                f"{r.rss_mb:.1f}",
                r.where.removeprefix("endpoint CPU "),
            ]
        )
    if big is not None:
        extra.append(
            [
                f"one file of {_size(big['size'])}",
                f"{big['mb_s']:.0f} MB/s",
                "-",
                f"{big['rss_mb']:.1f}",
                "-",
            ]
        )
    if backlog is not None:
        extra.append(
            [
                f"backlog of {backlog['files']} files",
                f"scanned and queued in {backlog['queued_seconds']:.1f} s, "
                f"{backlog['files_s']:.0f} files/s end to end",
                "-",
                f"{backlog['rss_mb']:.1f}",
                "-",
            ]
        )
    lines = ["", "Against the fast discarding endpoint (bench/discard.py, its own process):", ""]
    lines.append(markdown_table(extra))
    ratio = endpoint_ratio(results.ceiling)
    return lines + (["", ratio[1][0].upper() + ratio[1][1:] + "."] if ratio else [])


def link_markdown(results: Results) -> list[str]:
    check, rate = results.link_check, results.info.get("link_rate", 0.0)
    if check is None and not results.link:
        return []
    info = results.info
    lines = [
        "",
        f"Through the link emulator (bench/linkproxy.py: {info.get('link_delay')} each way, "
        f"{info.get('link_rate_text')} each direction, {rate / MB:.1f} MB/s)"
        + (f", {link_files_text(info)}:" if results.link else ":"),
    ]
    if check is not None:
        lines += [
            "",
            f"Measured: a first request {check['first_request_ms']:.1f} ms (handshake and one "
            f"round trip), one round trip {check['rtt_ms']:.1f} ms, one big upload by curl "
            f"{check['upload_mb_s']:.1f} MB/s ({check['upload_x_link']:.2f}x the link rate). "
            f"`stowd migrate` of an empty folder, start to exit (counted in each migrate row, "
            f"not in the run rows): {check['migrate_start_s']:.2f} s.",
        ]
    if results.link:
        lines += ["", markdown_table(link_cells(results.link, rate))]
    return lines


def link_files_text(info: dict[str, Any]) -> str:
    """Which files went through the link, as ``400 files of 512KiB and 3000 of 64KiB``."""
    cases = [(info.get("link_files"), info.get("link_size"))]
    cases.append((info.get("link_small_files"), info.get("link_small_size")))
    shown = [f"{files} of {size}" for files, size in cases if files]
    return " and ".join(shown).replace(" of ", " files of ", 1)


def link_cells(rows: list[Row], rate: float) -> list[list[str]]:
    cells = [
        ["files", "to", "sender", "streams/workers", "batch", "files/s", "MB/s", "x link", "CPU s"]
    ]
    return cells + [
        [
            file_size(r),
            r.where,
            r.sender,
            str(r.streams),
            str(r.batch),
            f"{r.files_s:.1f}",
            f"{r.mb_s:.1f}",
            f"{r.mb_s * MB / rate:.2f}" + ("" if r.ok else " WRONG"),
            f"{r.cpu_s:.2f}",
        ]
        for r in rows
    ]


def plot(rows: list[Row], info: dict[str, Any], target: Path) -> None:
    import matplotlib  # noqa: PLC0415 - only when writing the outputs

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    senders = [s for s in SENDERS if any(r.sender == s for r in rows)]
    streams = sorted({r.streams for r in rows})
    width = 0.8 / len(streams)
    figure, axes = plt.subplots(figsize=(9, 4.8))
    for i, k in enumerate(streams):
        found = {r.sender: r for r in rows if r.streams == k}
        xs = [n + (i - (len(streams) - 1) / 2) * width for n in range(len(senders))]
        values = [found[s].files_s if s in found else 0.0 for s in senders]
        bars = axes.bar(xs, values, width, label=f"{k} stream" + ("" if k == 1 else "s"))
        labels = [_bar_label(found.get(s)) for s in senders]
        axes.bar_label(bars, labels=labels, fontsize=8, padding=2)
    axes.set_xticks(range(len(senders)), senders)
    axes.set_ylabel("files/s (higher is better)")
    axes.set_title(
        f"STOW-RS to a local Orthanc: {info['files']} files of {info['size']}, "
        f"{info['per_request']} per request",
        fontsize=10,
    )
    axes.legend()
    axes.margins(y=0.15)
    figure.tight_layout()
    figure.savefig(target, dpi=110)
    plt.close(figure)


def _bar_label(row: Row | None) -> str:
    if row is None:
        return ""
    return f"{row.files_s:.0f}\n{row.mb_s:.0f} MB/s" + ("" if row.ok else "\nWRONG")


def update_doc(doc: Path, fragment: str) -> None:
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{fragment}\n{END}{tail}")


# -- the run ----------------------------------------------------------------------------------
def machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    memory_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return f"{os.cpu_count()} cores ({model}), {memory_kb / 1024**2:.0f} GiB, " + (
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    )


def archive_versions(work: Path) -> str:
    with Orthanc(work / "orthanc-version") as orthanc:
        system = httpx.get(f"{orthanc.url}/system").json()
        plugin = httpx.get(f"{orthanc.url}/plugins/dicom-web").json()
    shutil.rmtree(work / "orthanc-version", ignore_errors=True)
    return f"Orthanc {system['Version']} + DICOMweb {plugin['Version']} on loopback"


def stowd_version() -> str:
    def git(*args: str) -> str:
        command = ["git", "-C", str(ROOT), *args]
        done = subprocess.run(command, check=False, capture_output=True, text=True)
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" (with uncommitted changes)" if git("status", "--porcelain") else "")


def _link_files_options(
    parser: argparse.ArgumentParser, name: str, *, files: int, size: str, studies: int, what: str
) -> None:
    """``--NAME-files``, ``--NAME-size`` and ``--NAME-studies`` of one link case."""
    parser.add_argument(f"--{name}-files", type=int, default=files, help=what)
    parser.add_argument(f"--{name}-size", default=size, help=f"their size (default {size})")
    each = files // studies
    parser.add_argument(
        f"--{name}-studies",
        type=int,
        default=studies,
        help=f"their studies (default {studies}: {each} files each, so batches of 50 are full)",
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=2000, help="instances (default 2000)")
    parser.add_argument("--size", default="512KiB", help="size of each (default 512KiB)")
    parser.add_argument("--studies", type=int, default=20, help="studies (default 20)")
    parser.add_argument("--per-request", type=int, default=50, help="files per request")
    parser.add_argument("--streams", default="1,4", help="concurrencies (default 1,4)")
    parser.add_argument(
        "--senders", default=",".join(SENDERS), help="which senders, comma separated (default all)"
    )
    parser.add_argument(
        "--discard-files",
        type=int,
        default=20000,
        help="files for the discarding-endpoint run (0: skip)",
    )
    parser.add_argument("--discard-size", default="64KiB")
    parser.add_argument(
        "--discard-workers",
        type=int,
        default=2,
        help="stowd workers for that run (default 2)",
    )
    parser.add_argument("--big", default="4000MiB", help="memory.py's one large file (0: skip)")
    parser.add_argument(
        "--backlog", type=int, default=100000, help="memory.py's backlog of small files (0: skip)"
    )
    parser.add_argument(
        "--label", default="", help="a line put first in results.md (e.g. 'development run')"
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="run each stowd sender also with verify on (QIDO-RS after each batch)",
    )
    what = "files sent through the link (0: skip)"
    _link_files_options(parser, "link", files=400, size="512KiB", studies=4, what=what)
    _link_files_options(
        parser,
        "link-small",
        files=3200,
        size="64KiB",
        studies=16,
        what="small files sent through the link, at stowd's defaults only (0: skip; default 3200, "
        "as many bytes as 400 of 512KiB)",
    )
    parser.add_argument("--link-delay", default="10ms", help="one-way delay (default 10ms)")
    parser.add_argument("--link-rate", default="200Mbit", help="per direction (default 200Mbit)")
    parser.add_argument("--link-streams", default="1,4", help="curl's streams (default 1,4)")
    parser.add_argument("--link-workers", default="1,2,4", help="stowd's (default 1,2,4)")
    parser.add_argument("--link-batches", default="10,50", help="batch max_files (default 10,50)")
    parser.add_argument(
        "--link-archives",
        default="orthanc,discarding",
        help="through the link to: orthanc, discarding (default both)",
    )
    parser.add_argument(
        "--link-check-size", default="100MB", help="the big upload that checks the link's rate"
    )
    parser.add_argument(
        "--link-only", action="store_true", help="only the link cases (and --ceiling-only's)"
    )
    parser.add_argument(
        "--ceiling-only",
        action="store_true",
        help="only the discarding-endpoint case with curl beside it (and --link-only's)",
    )
    parser.add_argument("--tmp", help="folder for the generated files (default: system temp)")
    parser.add_argument("--out", type=Path, help="write results.json, throughput.png, results.md")
    parser.add_argument(
        "--update-doc", type=Path, help="put results.md between the throughput markers of this file"
    )
    args = parser.parse_args(argv)
    unknown = set(args.senders.split(",")) - set(SENDERS)
    if unknown:
        parser.error(f"unknown senders {sorted(unknown)}; known: {', '.join(SENDERS)}")
    unknown = set(args.link_archives.split(",")) - {"orthanc", "discarding"}
    if unknown:
        parser.error(f"unknown --link-archives {sorted(unknown)}; known: orthanc, discarding")
    if args.update_doc and not args.out:
        parser.error("--update-doc needs --out (the plot it links to lives there)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    begun = time.monotonic()
    size = parse_size(args.size)
    only = args.link_only or args.ceiling_only
    with tempfile.TemporaryDirectory(prefix="stowd-throughput-", dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        info = {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(),
            "archive": archive_versions(tmp),
            "stowd": stowd_version(),
            "size": args.size,
            "studies": args.studies,
            "per_request": args.per_request,
            "label": args.label,
            "link_delay": args.link_delay,
            "link_rate_text": args.link_rate,
            "link_rate": link_rate(args),
            "link_files": args.link_files,
            "link_size": args.link_size,
            "link_small_files": args.link_small_files,
            "link_small_size": args.link_small_size,
        }
        results = Results(info)
        if not only:
            results.rows = orthanc_rows(args, tmp, size, info)
        with discard_process() as endpoint:
            if args.discard_files and (args.ceiling_only or not only):
                results.ceiling = ceiling_rows(args, tmp, endpoint)
            if not only:
                results.big, results.backlog = memory_cases(args, tmp, endpoint.url)
            if link_cases(args) and (args.link_only or not only):
                results.link_check = link_check(args, tmp, endpoint)
                print("  link check: " + link_check_text(results.link_check), flush=True)
                results.link = link_rows(args, tmp, endpoint)
    results.found = targets(results)
    info["seconds"] = round(time.monotonic() - begun)
    print()
    if results.rows or results.ceiling:
        print(text_table(table(results.rows + results.ceiling)), end="\n\n")
    if results.link:
        print(text_table(link_cells(results.link, link_rate(args))), end="\n\n")
    print(text_table(target_cells(results.found)))
    print(f"\n(whole run {info['seconds']} s)")
    if args.out:
        write_outputs(args, results)
    return 0


def link_check_text(check: dict[str, float]) -> str:
    return (
        f"first request {check['first_request_ms']:.1f} ms, round trip "
        f"{check['rtt_ms']:.1f} ms; one big upload {check['upload_mb_s']:.1f} MB/s of "
        f"{check['link_mb_s']:.1f} ({check['upload_x_link']:.2f}x the link rate); "
        f"stowd migrate of an empty folder {check['migrate_start_s']:.2f} s"
    )


def orthanc_rows(args: argparse.Namespace, tmp: Path, size: int, info: dict[str, Any]) -> list[Row]:
    senders = [s for s in SENDERS if s in args.senders.split(",")]
    if args.verify:
        senders += [s + VERIFIED for s in senders if s.startswith("stowd")]
    folder = tmp / "orthanc-rows"
    setup = make_setup(
        folder, args.files, size, args.studies, args.per_request, curl="curl" in senders
    )
    info["files"] = files = setup.files
    requests = len(json.loads(setup.batches.read_text()))
    print(
        f"{files} files of {args.size} in {args.studies} studies, {requests} requests; "
        f"{info['archive']}; {info['machine']}",
        flush=True,
    )
    rows: list[Row] = []
    for streams in (int(s) for s in args.streams.split(",")):
        for sender in senders:
            row = measure_orthanc(setup, sender, streams)
            rows.append(row)
            print(
                f"  {sender:16s} streams {streams}: {row.files_s:7.1f} files/s "
                f"{row.mb_s:6.1f} MB/s  CPU {row.cpu_s:5.2f} s  peak RSS {row.rss_mb:6.1f} MB  "
                f"stored {row.stored}/{files}" + ("" if row.ok else f"  WRONG {row.problems}"),
                flush=True,
            )
    shutil.rmtree(folder, ignore_errors=True)
    for row in rows:
        base = next((r for r in rows if r.sender == BASELINE and r.streams == row.streams), None)
        row.ratio = row.files_s / base.files_s if base is not None else None
        if base is not None and base.cpu_s > 0:
            row.cpu_ratio = (row.cpu_s / row.files) / (base.cpu_s / base.files)
    for line in verify_costs(rows):
        print(line, flush=True)
    return rows


def verify_costs(rows: list[Row]) -> list[str]:
    """What verify costs: each stowd sender's files/s with and without it, same streams."""
    by = {(r.sender, r.streams): r for r in rows}
    lines = []
    for (sender, streams), row in sorted(by.items()):
        plain = by.get((sender.removesuffix(VERIFIED), streams))
        if not sender.endswith(VERIFIED) or plain is None:
            continue
        change = (row.files_s / plain.files_s - 1) * 100
        lines.append(
            f"  verify: {plain.sender}, streams {streams}: {plain.files_s:.1f} files/s without, "
            f"{row.files_s:.1f} files/s with ({change:+.1f}%)"
        )
    return lines


def memory_cases(
    args: argparse.Namespace, tmp: Path, url: str
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """bench/memory.py's one big file and backlog, against the discarding endpoint *url*."""
    big = backlog = None
    if parse_size(args.big):
        big = memory.big_file_case(tmp / "memory", url, parse_size(args.big))
        print(
            f"  one file of {args.big}: {big['mb_s']:.0f} MB/s, peak RSS {big['rss_mb']:.1f} MB",
            flush=True,
        )
        shutil.rmtree(tmp / "memory", ignore_errors=True)
    if args.backlog:
        backlog = memory.backlog_case(tmp / "memory", url, args.backlog)
        print(
            f"  backlog of {args.backlog}: queued in {backlog['queued_seconds']:.1f} s, "
            f"{backlog['files_s']:.0f} files/s, peak RSS {backlog['rss_mb']:.1f} MB",
            flush=True,
        )
        shutil.rmtree(tmp / "memory", ignore_errors=True)
    return big, backlog


def write_outputs(args: argparse.Namespace, results: Results) -> None:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results.to_json(), indent=2) + "\n")
    fragment = markdown(results)
    (out / "results.md").write_text(fragment)
    if results.rows:
        plot(results.rows, results.info, out / "throughput.png")
    if args.update_doc:
        update_doc(args.update_doc, fragment)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'throughput.png'}")


if __name__ == "__main__":
    sys.exit(main())
