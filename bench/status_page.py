"""What the status page costs stowd's throughput (issue 21), in one run.

Usage (from the repository root, after ``bash .ci/run``; needs Debian's ``chromium`` and
``chromium-driver``)::

    .venv/bin/python bench/status_page.py                  # 3 rounds of 3 cases, 20,000 files
    .venv/bin/python bench/status_page.py --files 1000 --rounds 1   # a quick look

Generates a backlog of N DICOM instances (default 20,000 of 16 KiB in 40 studies: a run
lasts long enough for several of the page's refreshes), then, for each round, runs ``stowd
run`` (``http.listen`` on a free loopback port, ``workers: 2``)
against the discarding STOW-RS endpoint (``bench/discard.py``: stowd itself is the limit, so
any cost of the page shows) in three cases, in a rotating order so that a drift of the
machine's load spreads over all of them:

  closed     nobody looks at the page
  open       the page open in a headless Chromium (tests/support/browser.py), refreshing
             itself with its own script (the page's tables every 5 s, ``/api/status`` for
             the charts every 6th time; no reload)
  reloading  the same, and the whole page reloaded every ``--reload`` seconds (default 1 s):
             HTML, script, style and ``/api/status`` each time, far more than anyone would

Each run: stowd is started with the page served, the browser (if any) opens the page, then
the study folders are moved into the drop folder at once; timed until every file is in
``sent/`` (seen by a thread polling every 50 ms, not by the loop that reloads the page,
which a reload blocks).  Printed per run: seconds, files/s, MB/s, stowd's CPU seconds (user
+ system, start-up included), the browser's CPU seconds (Chromium and chromedriver: on this machine
they compete with stowd for the same cores, which a browser on another desk would not), and
the page's own refreshes (its script's fetches of the page, from Resource Timing) or the
reloads.  Then
per case the median files/s and stowd CPU, and the ratios open/closed and reloading/closed.
Figures, never asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from benchlib import count_files, cpu_seconds, discard_process, stowd_env, write_config
from browser import browser_missing_reason, headless_chromium
from orthanc import free_port
from selenium.webdriver import Chrome
from throughput import generate, tree_bytes, wait_started

from stowd.config.yamlwalk import parse_size

CASES = ("closed", "open", "reloading")
MB = 1e6
PAGE_TIMEOUT = 60.0  # seconds stowd may take to answer its page after starting
RUN_TIMEOUT = 900.0  # seconds one run may take before it is given up


@dataclass
class Run:
    """One run of one case."""

    case: str
    seconds: float
    files: int
    size: int
    stowd_cpu: float
    browser_cpu: float
    refreshes: int
    problem: str = ""

    @property
    def files_per_second(self) -> float:
        return self.files / self.seconds

    @property
    def mb_per_second(self) -> float:
        return self.size / MB / self.seconds


# -- one run ---------------------------------------------------------------------------------
def run_case(case: str, work: Path, stage: Path, url: str, args: argparse.Namespace) -> Run:
    """``stowd run`` sending the staged backlog with the page in ``case``."""
    port = free_port()
    config = write_config(
        work, {"url": url, "workers": args.workers}, extra=f"http:\n  listen: 127.0.0.1:{port}\n"
    )
    (work / "drop").mkdir()
    incoming = work / "incoming"
    for study in sorted(stage.iterdir()):
        shutil.copytree(study, incoming / study.name, copy_function=os.link)
    page = f"http://127.0.0.1:{port}/"
    with _stowd(config, work) as proc, _browser(case) as driver:
        wait_started(work / "state" / "queue.db", proc)
        _wait_page(page, proc)
        if driver is not None:
            driver.get(page)
        return _timed(Live(case, work, incoming, proc, driver), args)


@dataclass
class Live:
    """A run under way: its case, folders, stowd and browser."""

    case: str
    work: Path
    incoming: Path
    proc: subprocess.Popen[bytes]
    driver: Chrome | None


@contextmanager
def _stowd(config: Path, work: Path) -> Iterator[subprocess.Popen[bytes]]:
    command = [sys.executable, "-m", "stowd", "run", "-c", str(config)]
    with open(work / "stowd.log", "wb") as log:
        proc = subprocess.Popen(command, stderr=log, env=stowd_env(), cwd=work)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(60)


@contextmanager
def _browser(case: str) -> Iterator[Chrome | None]:
    if case == "closed":
        yield None
        return
    with headless_chromium() as driver:
        yield driver


def _wait_page(page: str, proc: subprocess.Popen[bytes]) -> None:
    """Until stowd answers its status page (it serves it once started)."""
    deadline = time.monotonic() + PAGE_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(page, timeout=5).status_code == httpx.codes.OK:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"stowd did not serve {page} (exit code {proc.poll()})")


def _timed(live: Live, args: argparse.Namespace) -> Run:
    case, work, proc, driver = live.case, live.work, live.proc, live.driver
    files, size = count_files(live.incoming), tree_bytes(live.incoming)
    browser_before = _browser_cpu(driver)
    started = time.monotonic()
    for study in sorted(live.incoming.iterdir()):
        study.rename(work / "drop" / study.name)
    finished = _finish_watch(work, files, proc)
    reloads = 0
    if case == "reloading" and driver is not None:
        while not finished.wait(args.reload) and time.monotonic() < started + RUN_TIMEOUT:
            driver.refresh()  # blocks until loaded: the watch thread keeps the time
            reloads += 1
    finished.wait(RUN_TIMEOUT)
    seconds = finished.at - started
    sent = count_files(work / "sent")
    refreshes = reloads if case == "reloading" else _refreshes(driver)
    return Run(
        case,
        seconds,
        files,
        size,
        stowd_cpu=cpu_seconds(proc.pid),
        browser_cpu=_browser_cpu(driver) - browser_before,
        refreshes=refreshes,
        problem="" if sent == files else f"{sent} of {files} in sent/",
    )


class Finished(threading.Event):
    """Set by the watch thread when every file is in sent/ or failed/ (or stowd ended);
    ``at`` is when it saw that."""

    at = float("nan")


def _finish_watch(work: Path, files: int, proc: subprocess.Popen[bytes]) -> Finished:
    """A thread that polls sent/ and failed/ every 50 ms: the end of a run is seen there,
    not by the loop that reloads the page (a reload blocks it until the page has loaded)."""
    finished = Finished()

    def watch() -> None:
        deadline = time.monotonic() + RUN_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            if count_files(work / "sent") + count_files(work / "failed") >= files:
                break
            time.sleep(0.05)
        finished.at = time.monotonic()
        finished.set()

    threading.Thread(target=watch, daemon=True).start()
    return finished


def _refreshes(driver: Chrome | None) -> int:
    """How often the open page refreshed itself: its script's fetches of the page (its
    Resource Timing entries)."""
    if driver is None:
        return 0
    script = (
        "return performance.getEntriesByType('resource').filter(e => "
        "e.initiatorType === 'fetch' && new URL(e.name).pathname === '/').length"
    )
    return int(driver.execute_script(script))


def _browser_cpu(driver: Chrome | None) -> float:
    """CPU seconds of chromedriver and every process below it (the browser's processes)."""
    if driver is None:
        return 0.0
    process = driver.service.process
    if process is None:
        return 0.0
    return sum(cpu_seconds(pid) for pid in _descendants(process.pid))


def _descendants(top: int) -> list[int]:
    """``top`` and every process below it, from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents.setdefault(int(stat[1]), []).append(int(entry))
    found, pending = [], [top]
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending.extend(parents.get(pid, []))
    return found


# -- the whole benchmark ---------------------------------------------------------------------
def measure(args: argparse.Namespace, tmp: Path) -> list[Run]:
    stage = tmp / "stage"
    generate(stage, args.files, parse_size(args.size), args.studies)
    runs: list[Run] = []
    with discard_process() as endpoint:
        for round_number in range(args.rounds):
            shift = round_number % len(CASES)
            for case in CASES[shift:] + CASES[:shift]:
                work = tmp / f"run-{round_number}-{case}"
                work.mkdir()
                run = run_case(case, work, stage, endpoint.url, args)
                _print_run(round_number + 1, run)
                runs.append(run)
                shutil.rmtree(work, ignore_errors=True)
    return runs


def _print_run(round_number: int, run: Run) -> None:
    print(
        f"round {round_number} {run.case:<9} {run.seconds:7.2f} s {run.files_per_second:8.1f} "
        f"files/s {run.mb_per_second:7.1f} MB/s  stowd CPU {run.stowd_cpu:6.2f} s  "
        f"browser CPU {run.browser_cpu:6.2f} s  {_refresh_text(run)}"
        + (f"  WRONG: {run.problem}" if run.problem else ""),
        flush=True,
    )


def _refresh_text(run: Run) -> str:
    if run.case == "closed":
        return ""
    return f"{run.refreshes} {'reloads' if run.case == 'reloading' else 'refreshes'}"


def summary(runs: list[Run]) -> list[str]:
    """Median files/s and stowd CPU per case, and each case's ratio to ``closed``."""
    rate = {c: statistics.median(r.files_per_second for r in runs if r.case == c) for c in CASES}
    cpu = {c: statistics.median(r.stowd_cpu for r in runs if r.case == c) for c in CASES}
    lines = [
        f"{c:<9} median {rate[c]:8.1f} files/s, stowd CPU {cpu[c]:6.2f} s"
        + ("" if c == "closed" else f"  ratio to closed: {rate[c] / rate['closed']:.3f}")
        for c in CASES
    ]
    wrong = [r for r in runs if r.problem]
    if wrong:
        lines.append(f"WRONG: {len(wrong)} run(s) did not send every file")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=20000, help="files per run (20000)")
    parser.add_argument("--size", default="16KiB", help="size of each file (16KiB)")
    parser.add_argument("--studies", type=int, default=40, help="study folders (40)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three cases (3)")
    parser.add_argument("--workers", type=int, default=2, help="stowd's workers (2)")
    parser.add_argument(
        "--reload", type=float, default=1.0, help="seconds between reloads, 'reloading' (1)"
    )
    parser.add_argument("--tmp", help="folder for the temporary files (default: system's)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = browser_missing_reason()
    if missing:
        print(f"cannot run: {missing}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="stowd-page-bench-", dir=args.tmp) as tmp:
        runs = measure(args, Path(tmp))
    print()
    print("\n".join(summary(runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
