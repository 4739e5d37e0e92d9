"""A real tiny_pacs (PyPI ``tiny_pacs[dicomweb]``: waitress, SQLite) as a second test archive.

``TinyPacs(folder)`` writes a YAML configuration into *folder*, keeps its SQLite index,
its stored files and its log there, and serves DICOMweb on a free loopback port
(``dicomweb_url``).  Its DICOM (DIMSE) listener gets a free loopback port of its own, unused
by the tests.  ``kill()`` then ``start()`` brings it back on the same ports with the same
storage, like Orthanc's fixture (``tests/support/orthanc.py``).

What it answers to STOW-RS (``tiny_pacs_dicomweb/stow.py`` 0.1.0, read in the installed
package): 200 when every part was stored, 202 when some were, 409 when none; each refused
part is a FailedSOPSequence item with FailureReason 0x0110 (processing failure), and a part
it cannot parse (or whose UIDs are malformed) is listed WITHOUT its SOPInstanceUID.  The
body must carry a Content-Length (411 otherwise, so no chunked upload) and be at most
``max_part_size`` bytes (413).  An Accept header without DICOM JSON gets 406.

A SOPInstanceUID it already holds is refused with 0x0110 unless its storage has
``overwrite: true`` (``tiny_pacs/storage.py``).  The fixture turns overwrite on: a sender
that re-sends after a lost answer (stowd after kill -9) must be able to, and 0x0110 cannot
tell "already stored" from "could not store".
"""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from localserver import ChildProcess
from orthanc import free_port

PREFIX = "/dicomweb"
QIDO_LIMIT = 10_000
_MODULES = ("tiny_pacs", "tiny_pacs_dicomweb", "waitress")


_NO_HTTP = "Cannot bind the shared HTTP server"  # its log line when its port was taken
_PORT_ATTEMPTS = 5


class _PortTaken(Exception):
    """Its HTTP port, free when chosen, was taken by another process before it bound it."""


class TinyPacsError(RuntimeError):
    """tiny_pacs is not installed, did not start, or answered a helper request badly."""


def tiny_pacs_missing_reason() -> str | None:
    """Why tiny_pacs cannot run here, or None if it can."""
    missing = [name for name in _MODULES if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (
        f"tiny_pacs with its DICOMweb extra is not installed ({', '.join(missing)} missing): "
        "pip install -e '.[test]'"
    )


class TinyPacs(ChildProcess):
    """One ``tiny-pacs run`` process whose configuration, index, storage and log are in
    *folder*; its ports are chosen when the object is made and kept across restarts."""

    stop_timeout = 10.0
    name = "tiny_pacs"

    def __init__(self, folder: str | Path, *, startup_timeout: float = 30.0) -> None:
        super().__init__()
        self.folder = Path(folder).resolve()
        self.port = free_port()
        self.dimse_port = free_port()
        self.startup_timeout = startup_timeout
        self._started_once = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        """Root of the DICOMweb API (STOW-RS is ``POST {dicomweb_url}/studies``)."""
        return f"{self.url}{PREFIX}"

    @property
    def config_path(self) -> Path:
        return self.folder / "tiny_pacs.yaml"

    @property
    def log_path(self) -> Path:
        return self.folder / "tiny_pacs.log"

    def config(self) -> dict[str, Any]:
        """The configuration written on every start (merged over tiny_pacs' defaults)."""
        line = "%(asctime)s %(levelname)s %(name)s %(message)s"
        return {
            "ae": {"ae_title": ["STOWD_TEST"], "port": self.dimse_port},
            "log": {
                "version": 1,
                "disable_existing_loggers": False,
                "formatters": {"plain": {"format": line}},
                "handlers": {
                    "out": {
                        "class": "logging.StreamHandler",
                        "level": "INFO",
                        "formatter": "plain",
                        "stream": "ext://sys.stdout",
                    }
                },
                "root": {"level": "INFO", "handlers": ["out"]},
            },
            "components": {
                "Database": {
                    "on": True,
                    "driver": "sqlite",
                    "db_name": str(self.folder / "pacs.db"),
                    "mode": "rwc",
                },
                "InMemoryStorage": {"on": False},
                "FileStorage": {
                    "on": True,
                    "overwrite": True,
                    "storage_dir": str(self.folder / "storage"),
                },
                "HttpServer": {"on": True, "host": "127.0.0.1", "port": self.port},
                "DICOMWeb": {"on": True, "prefix": PREFIX},
            },
        }

    def start(self) -> None:
        """Start it and wait until its own log says it serves DICOMweb on our port and
        QIDO-RS answers; no-op if already running."""
        if self.is_running():
            return
        # a first start moves to another port when its own was taken meanwhile (another
        # suite's server got it between free_port() and the bind); a restart keeps its URL
        attempts = 1 if self._started_once else _PORT_ATTEMPTS
        for attempt in range(attempts):
            try:
                self._start_once()
            except _PortTaken:
                if attempt == attempts - 1:
                    raise TinyPacsError(f"port {self.port} taken:\n{self.log_tail()}") from None
                self.port = free_port()
            else:
                self._started_once = True
                return

    def _start_once(self) -> None:
        self._reap()
        (self.folder / "storage").mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        since = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tiny_pacs", "run", "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.folder,
        )
        self._wait_ready(since)

    def _wait_ready(self, since: int) -> None:
        # The log line proves the port is ours: tiny_pacs keeps running without HTTP when
        # its port is taken (tiny_pacs/http.py), and another server could answer there.
        listening = f"listening on {self.url}"
        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = self._process.poll() if self._process else None
            if code is not None:
                self._reap()
                raise TinyPacsError(f"tiny_pacs exited with status {code}:\n{self.log_tail()}")
            said = self.log_tail(since=since)
            if _NO_HTTP in said:
                self.kill()
                raise _PortTaken
            if listening in said and self._answers():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise TinyPacsError(
                    f"tiny_pacs did not serve {self.dicomweb_url} within "
                    f"{self.startup_timeout:.0f} s:\n{self.log_tail(since=since)}"
                )
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            return httpx.get(f"{self.dicomweb_url}/studies", timeout=2.0).status_code in (200, 204)
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        """Ctrl-C (its clean exit), then SIGKILL after ``stop_timeout`` seconds."""
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
        self._reap()

    def kill(self) -> None:
        """SIGKILL at once, like a crash."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
        self._reap()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 40, *, since: int = 0) -> str:
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(since)
                data = handle.read()
        except OSError:
            return "(no log)"
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])

    # -- QIDO-RS helpers (tiny_pacs has no top-level /instances query) ---------------------

    def _qido(self, path: str) -> list[dict[str, Any]]:
        response = httpx.get(
            f"{self.dicomweb_url}{path}",
            params={"limit": QIDO_LIMIT},
            headers={"Accept": "application/dicom+json"},
            timeout=30.0,
        )
        if response.status_code == 204:
            return []
        if response.status_code != 200:
            raise TinyPacsError(f"GET {path}: HTTP {response.status_code}: {response.text[:300]}")
        items: list[dict[str, Any]] = response.json()
        return items

    def study_instance_uids(self) -> set[str]:
        return {_value(item, "0020000D") for item in self._qido("/studies")}

    def sop_instance_uids(self) -> set[str]:
        """SOPInstanceUID of every stored instance (study by study, series by series)."""
        found: set[str] = set()
        for study in self.study_instance_uids():
            for series in self._qido(f"/studies/{study}/series"):
                path = f"/studies/{study}/series/{_value(series, '0020000E')}/instances"
                found |= {_value(item, "00080018") for item in self._qido(path)}
        return found

    def instance_count(self) -> int:
        return len(self.sop_instance_uids())

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"TinyPacs({str(self.folder)!r}, port={self.port}, {state})"


def _value(item: dict[str, Any], tag: str) -> str:
    return str(item[tag]["Value"][0])
