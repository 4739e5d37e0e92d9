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
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import memory
from benchlib import (
    ROOT,
    count_files,
    cpu_seconds,
    discard_server,
    peak_rss_mb,
    stowd_env,
    wait_sampled,
    write_config,
)
from dicomgen import make_instance_bytes
from orthanc import Orthanc
from senders import write_body

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
    """The requests stowd makes: per study folder, up to *per_request* files each."""
    batches = []
    for folder in sorted(stage.iterdir()):
        paths = [str(p) for p in sorted(folder.iterdir())]
        batches += [paths[i : i + per_request] for i in range(0, len(paths), per_request)]
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


def measure_orthanc(setup: Setup, sender: str, streams: int) -> Row:
    """One sender at one concurrency against a fresh Orthanc; its storage is removed after."""
    work = setup.work / f"{sender.replace(' ', '-')}-{streams}"
    work.mkdir()
    try:
        with Orthanc(work / "orthanc") as orthanc:
            seconds, rss, cpu, problems = MEASURES[sender](
                setup, work, orthanc.dicomweb_url, streams
            )
            stored = orthanc.instance_count()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if stored != setup.files:
        problems.append(f"Orthanc stored {stored} of {setup.files}")
    return Row(sender, streams, setup.files, setup.bytes, seconds, rss, cpu, stored, problems)


# -- the cases against the discarding endpoint ------------------------------------------------
def discard_case(tmp: Path, url: str, args: argparse.Namespace) -> Row:
    """``stowd run`` against the discarding endpoint: stowd's own cost per file."""
    stage = tmp / "small"
    total = generate(stage, args.discard_files, parse_size(args.discard_size), args.studies)
    work = tmp / "discard"
    work.mkdir()
    workers = args.discard_workers
    try:
        seconds, rss, cpu, problems = stowd_run(
            work, url, workers, stage, files=total, per_request=args.per_request
        )
        size = tree_bytes(stage)
        return Row("stowd run", workers, total, size, seconds, rss, cpu, None, problems)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(stage, ignore_errors=True)


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


def targets(
    rows: list[Row], discard: Row | None, big: dict[str, Any] | None, backlog: dict[str, Any] | None
) -> list[Target]:
    found: list[Target] = []
    by = {(r.sender, r.streams): r for r in rows}
    for streams in sorted({r.streams for r in rows}):
        for stowd in ("stowd run", "stowd migrate"):
            for other, factor in ((BASELINE, 0.95), ("dicomweb-client", 2.0)):
                found.append(_ratio_target(by, (stowd, other), factor, streams))
    if discard is not None:
        found.append(
            Target(
                f"stowd run, {discard.files} files of {_size(discard.bytes / discard.files)}, "
                "discarding endpoint",
                ">= 1000 files/s",
                f"{discard.files_s:.0f} files/s",
                discard.files_s >= 1000 if discard.ok else None,
            )
        )
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
        ["sender", "streams", "files/s", "MB/s", "peak RSS MB", "CPU s", f"x {BASELINE}", "stored"]
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
    rows: list[Row]  # against Orthanc
    others: list[Row]  # against the discarding endpoint
    big: dict[str, Any] | None
    backlog: dict[str, Any] | None
    found: list[Target]

    def to_json(self) -> dict[str, Any]:
        return {
            "info": self.info,
            "orthanc": [r.to_json() for r in self.rows],
            "discarding": [r.to_json() for r in self.others],
            "big_file": self.big,
            "backlog": self.backlog,
            "targets": [{**asdict(t), "verdict": t.verdict} for t in self.found],
        }


def markdown(results: Results) -> str:
    info, rows, big, backlog = results.info, results.rows, results.big, results.backlog
    parts = [f"**{info['label']}**", ""] if info.get("label") else []
    parts += [
        f"Run {info['date']} on {info['machine']}; {info['archive']}; "
        f"{info['files']} files of {info['size']} in {info['studies']} studies, "
        f"{info['per_request']} files per request; stowd {info['stowd']}.",
        "",
        markdown_table(table(rows)),
        "",
        "![throughput by sender and streams](throughput.png)",
        "",
        "Against the discarding endpoint (stowd alone):",
        "",
    ]
    extra = [["case", "figure", "peak RSS MB"]]
    for r in results.others:
        extra.append(
            [
                f"stowd run, workers {r.streams}, {r.files} files of "
                f"{_size(r.bytes / r.files)}" + ("" if r.ok else " WRONG"),
                f"{r.files_s:.0f} files/s",
                f"{r.rss_mb:.1f}",
            ]
        )
    if big is not None:
        extra.append(
            [f"one file of {_size(big['size'])}", f"{big['mb_s']:.0f} MB/s", f"{big['rss_mb']:.1f}"]
        )
    if backlog is not None:
        extra.append(
            [
                f"backlog of {backlog['files']} files",
                f"scanned and queued in {backlog['queued_seconds']:.1f} s, "
                f"{backlog['files_s']:.0f} files/s end to end",
                f"{backlog['rss_mb']:.1f}",
            ]
        )
    parts += [markdown_table(extra), "", markdown_table(target_cells(results.found)), ""]
    return "\n".join(parts)


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


@contextmanager
def discarding() -> Iterator[str]:
    server, url = discard_server()
    try:
        yield url
    finally:
        server.shutdown()


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
        help="stowd workers for that run (default 2, stowd's default)",
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
    parser.add_argument("--tmp", help="folder for the generated files (default: system temp)")
    parser.add_argument("--out", type=Path, help="write results.json, throughput.png, results.md")
    parser.add_argument(
        "--update-doc", type=Path, help="put results.md between the throughput markers of this file"
    )
    args = parser.parse_args(argv)
    unknown = set(args.senders.split(",")) - set(SENDERS)
    if unknown:
        parser.error(f"unknown senders {sorted(unknown)}; known: {', '.join(SENDERS)}")
    if args.update_doc and not args.out:
        parser.error("--update-doc needs --out (the plot it links to lives there)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    begun = time.monotonic()
    size = parse_size(args.size)
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
        }
        rows = orthanc_rows(args, tmp, size, info)
        others, big, backlog = discard_rows(args, tmp)
    found = targets(rows, others[0] if others else None, big, backlog)
    info["seconds"] = round(time.monotonic() - begun)
    print()
    print(text_table(table(rows + others)))
    print()
    print(text_table(target_cells(found)))
    print(f"\n(whole run {info['seconds']} s)")
    if args.out:
        write_outputs(args, Results(info, rows, others, big, backlog, found))
    return 0


def orthanc_rows(args: argparse.Namespace, tmp: Path, size: int, info: dict[str, Any]) -> list[Row]:
    stage = tmp / "stage"
    files = generate(stage, args.files, size, args.studies)
    info["files"] = files
    batches = batches_of(stage, args.per_request)
    (tmp / "batches.json").write_text(json.dumps(batches))
    senders = [s for s in SENDERS if s in args.senders.split(",")]
    if args.verify:
        senders += [s + VERIFIED for s in senders if s.startswith("stowd")]
    bodies: list[tuple[Path, str]] = []
    if "curl" in senders:
        (tmp / "bodies").mkdir()
        for n, batch in enumerate(batches):
            body = tmp / "bodies" / f"{n:05d}.bin"
            bodies.append((body, write_body(body, batch)))
    setup = Setup(
        tmp / "runs",
        stage,
        tmp / "batches.json",
        bodies,
        files,
        tree_bytes(stage),
        args.per_request,
    )
    setup.work.mkdir()
    print(
        f"{files} files of {args.size} in {args.studies} studies, {len(batches)} requests; "
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
                f"{row.mb_s:6.1f} MB/s  peak RSS {row.rss_mb:6.1f} MB  "
                f"stored {row.stored}/{files}" + ("" if row.ok else f"  WRONG {row.problems}"),
                flush=True,
            )
    shutil.rmtree(tmp / "bodies", ignore_errors=True)
    shutil.rmtree(stage, ignore_errors=True)
    for row in rows:
        base = next((r for r in rows if r.sender == BASELINE and r.streams == row.streams), None)
        row.ratio = row.files_s / base.files_s if base is not None else None
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


def discard_rows(
    args: argparse.Namespace, tmp: Path
) -> tuple[list[Row], dict[str, Any] | None, dict[str, Any] | None]:
    others: list[Row] = []
    big = backlog = None
    with discarding() as url:
        if args.discard_files:
            row = discard_case(tmp, url, args)
            print(
                f"  discarding endpoint: {row.files} files of {args.discard_size}: "
                f"{row.files_s:.0f} files/s, peak RSS {row.rss_mb:.1f} MB",
                flush=True,
            )
            others.append(row)
        if parse_size(args.big):
            big = memory.big_file_case(tmp / "memory", url, parse_size(args.big))
            print(
                f"  one file of {args.big}: {big['mb_s']:.0f} MB/s, "
                f"peak RSS {big['rss_mb']:.1f} MB",
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
    return others, big, backlog


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
