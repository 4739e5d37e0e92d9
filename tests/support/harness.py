"""Run the real daemon as a subprocess against a folder layout made in a temp dir."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import yaml
from orthanc import free_port

from stowd.config.model import Source
from stowd.fileops import TMP_SUFFIX

POLL = 0.1


@dataclass
class Layout:
    """The folders and config of one test run."""

    root: Path
    config: Path

    @property
    def drop(self) -> Path:
        return self.root / "drop"

    @property
    def sent(self) -> Path:
        return self.root / "done" / "sent"

    @property
    def failed(self) -> Path:
        return self.root / "done" / "failed"

    def files(self, folder: Path) -> set[str]:
        """Relative paths of the files below ``folder`` (error files and stowd's temporary
        files excluded: a reason note is written under a temporary name, then renamed, and
        counting it made a test see one file more than had settled)."""
        if not folder.exists():
            return set()
        return {
            str(p.relative_to(folder))
            for p in folder.rglob("*")
            if p.is_file() and not p.name.endswith((".error.json", TMP_SUFFIX))
        }

    def error_files(self) -> dict[str, Path]:
        return {
            str(p.relative_to(self.failed)).removesuffix(".error.json"): p
            for p in self.failed.rglob("*.error.json")
        }


class Clock:
    """A clock the test sets by hand (``now``), for queues, workers and logins."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_layout(
    root: Path, url: str, *, source: dict[str, object] | None = None, **overrides: object
) -> Layout:
    """Write a config with fast timings for tests.

    ``source`` overrides keys of the single source, ``overrides`` top-level keys.
    """
    doc: dict[str, object] = {
        "queue": "./state/queue.db",
        "log_level": "DEBUG",
        "shutdown_timeout": "10s",
        "retry": {"initial": "500ms", "maximum": "2s", "hold_probe": "1s", "max_age": "1h"},
        "sources": [
            {
                "name": "ct1",
                "watch": "./drop",
                "sent": "./done/sent",
                "failed": "./done/failed",
                "destination": "pacs",
                "quiet_period": "500ms",
                "rescan_interval": "3s",
                "incomplete_wait": "2s",  # an image cut short fails soon (default 10m)
                **(source or {}),
            }
        ],
        "destinations": {"pacs": {"url": url, "workers": 2, "timeouts": {"read": "30s"}}},
    }
    doc.update(overrides)
    root.mkdir(parents=True, exist_ok=True)
    config = root / "stowd.yaml"
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    layout = Layout(root, config)
    layout.drop.mkdir(parents=True, exist_ok=True)
    return layout


def make_watch_folders(config: Path) -> None:
    """Make each watch folder a config names inside the config's own folder, as an
    administrator makes the scanner's folder before stowd watches it (stowd does not make
    them).  Tests of other problems write configs that do not parse: their ``watch:`` lines
    are read as written."""
    text = config.read_text(encoding="utf-8")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:  # such as a refused tag
        doc = {"sources": [{"watch": w} for w in re.findall(r"watch: ([^\s,}]+)", text)]}
    sources = doc.get("sources") if isinstance(doc, dict) else None
    for source in sources if isinstance(sources, list) else []:
        watch = source.get("watch") if isinstance(source, dict) else None
        if isinstance(watch, str) and watch and not watch.startswith("~"):
            folder = Path(os.path.abspath(config.parent / watch))
            if folder.is_relative_to(config.parent) and not folder.exists():
                folder.mkdir(parents=True)


class Stowd:
    """``python -m stowd run`` as a child process, its stderr kept in a log file.

    ``with Stowd(layout) as daemon:`` starts it and stops it (SIGTERM, then SIGKILL after 30 s)
    when the block ends, pass or fail; ``daemon.log`` stays readable after the block.
    """

    def __init__(
        self, layout: Layout, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
    ) -> None:
        self.layout = layout
        self.env = env or {}
        self.args = args
        runs = len(list(layout.root.glob("stowd-*.log")))
        self.log_path = layout.root / f"stowd-{runs + 1}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Stowd:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "stowd", "run", "-c", str(self.layout.config), *self.args],
                stdout=log,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            )
        return self

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_started(self, timeout: float = 60.0) -> None:
        """Until its queue is open with its tables (its "stowd started" line): the queue file
        exists a moment before its tables do, and ``stowd status`` fails in between."""
        wait_for(
            lambda: "stowd started: " in self.log, timeout, "the daemon started", lambda: self.log
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """kill -9: no chance to clean up."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(60)  # reaped, never left to a later test's garbage collection

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        if self.alive():
            try:
                self.terminate()
            except subprocess.TimeoutExpired:
                self.kill()


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, log: Callable[[], str] | None = None
) -> None:
    """Poll ``predicate`` until true; fail with ``what`` (and the daemon's log tail) if not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(POLL)
    tail = "\n".join(log().splitlines()[-40:]) if log else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{tail}")


def run_until(layout: Layout, done: Callable[[], bool], what: str, timeout: float) -> None:
    """Run the daemon until ``done``, then stop it; it must exit cleanly (0)."""
    with Stowd(layout) as daemon:
        wait_for(done, timeout, what, lambda: daemon.log)
        assert daemon.terminate() == 0


METRICS_SERVED = "serving Prometheus metrics on "
_METRICS_ATTEMPTS = 5


@contextmanager
def serving_metrics(layout: Layout) -> Iterator[tuple[Stowd, int]]:
    """The daemon running with ``metrics.listen`` on a free port: (daemon, port).

    The port is chosen by ``free_port()`` and bound later by the daemon, so another process
    may take it in between; the daemon then exits saying it cannot serve metrics, and it is
    started again on another port.  Its counters live in the process: drop the files once
    this yields, so that a daemon that could not serve them has handled none."""
    for _ in range(_METRICS_ATTEMPTS):
        port = free_port()
        doc = yaml.safe_load(layout.config.read_text())
        doc["metrics"] = {"listen": f"127.0.0.1:{port}"}
        layout.config.write_text(yaml.safe_dump(doc, sort_keys=False))
        with Stowd(layout) as daemon:
            if _serves_metrics(daemon, port):
                yield daemon, port
                return
        assert "cannot serve metrics" in daemon.log, daemon.log
    raise AssertionError(f"no free port for the metrics in {_METRICS_ATTEMPTS} tries")


def _says(daemon: Stowd, served: str) -> bool:
    """Until its log says ``served`` (True) or it has exited (False)."""
    wait_for(
        lambda: served in daemon.log or not daemon.alive(),
        60,
        f"the daemon's line {served!r} (or its exit)",
        lambda: daemon.log,
    )
    return served in daemon.log


def _serves_metrics(daemon: Stowd, port: int) -> bool:
    """Until it serves its metrics on ``port`` (True) or has exited (False)."""
    served = f"{METRICS_SERVED}http://127.0.0.1:{port}/"
    wait_for(
        lambda: served in daemon.log or not daemon.alive(),
        60,
        "the metrics served (or the daemon's exit)",
        lambda: daemon.log,
    )
    return served in daemon.log


PAGE_SERVED = "serving the status page on "


@contextmanager
def serving_page(
    layout: Layout, env: dict[str, str] | None = None, **http: object
) -> Iterator[tuple[Stowd, str]]:
    """The daemon running with ``http.listen`` on a free loopback port (``http`` adds keys
    such as ``auth``): (daemon, its base URL such as ``http://127.0.0.1:PORT/``).  A port
    taken in between is tried again on another, as ``serving_metrics`` does."""
    for _ in range(_METRICS_ATTEMPTS):
        port = free_port()
        doc = yaml.safe_load(layout.config.read_text())
        doc["http"] = {"listen": f"127.0.0.1:{port}", **http}
        layout.config.write_text(yaml.safe_dump(doc, sort_keys=False))
        with Stowd(layout, env) as daemon:
            if _says(daemon, f"{PAGE_SERVED}http://127.0.0.1:{port}/"):
                yield daemon, f"http://127.0.0.1:{port}/"
                return
        assert "cannot serve the status page" in daemon.log, daemon.log
    raise AssertionError(f"no free port for the status page in {_METRICS_ATTEMPTS} tries")


def run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``python -m stowd ARGS`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "stowd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def drop_source(tmp_path: Path, **options: Any) -> Source:
    """Source "ct" of folders drop/, sent/ and failed/ under ``tmp_path``, to "pacs", with no
    quiet period (the in-process tests' source; ``options`` as ``Source`` takes them)."""
    options.setdefault("quiet_period", 0.0)
    return Source(
        "ct", tmp_path / "drop", tmp_path / "sent", tmp_path / "failed", "pacs", **options
    )


def written_together(folder: Path) -> None:
    """Give every file under ``folder`` the newest mtime among them: their quiet periods end
    at the same instant, so the daemon queues them in one go and sends them in one request
    (it sends what is queued at once; files written a few ms apart under load could
    otherwise go out one request each)."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    newest = max(p.stat().st_mtime_ns for p in files)
    for path in files:
        os.utime(path, ns=(newest, newest))
