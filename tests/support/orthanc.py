"""A real Orthanc (with its DICOMweb plugin) for tests and for the quick-start demo.

``Orthanc(folder)`` writes a JSON configuration into *folder*, keeps its storage, index and log
there, and serves HTTP on a free loopback port (``RemoteAccessAllowed`` is false, so only
clients on this machine are answered; Orthanc 1.10 has no option to bind one address and
listens on all of them).  ``restart()`` brings it back on the same port with the same storage.

``Orthanc(folder, users={"alice": "secret"})`` turns on HTTP Basic authentication
(``AuthenticationEnabled`` with ``RegisteredUsers``); the REST helpers of this class then log in
as the first of those users.

Run as a script it serves in the foreground until Ctrl-C or SIGTERM::

    python tests/support/orthanc.py --port 8042 --dir ./demo-run/orthanc
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
from localserver import ChildProcess, find_program

ORTHANC_ENV = "STOWD_TEST_ORTHANC"
"""Environment variable naming the Orthanc binary to use instead of the default search."""
PLUGIN_ENV = "STOWD_TEST_ORTHANC_DICOMWEB"
"""Environment variable naming the DICOMweb plugin (.so) instead of the default search."""

_ORTHANC_CANDIDATES = ("/usr/sbin/Orthanc",)
_PLUGIN_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
)
_PLUGIN_GLOB_DIRS = ("/usr/lib/orthanc", "/usr/share/orthanc/plugins", "/usr/local/share/orthanc")
_PORT_IN_USE = "already in use"
_PORT_ATTEMPTS = 5


class OrthancError(RuntimeError):
    """Orthanc could not be found, did not start, or answered a helper request badly."""


def find_orthanc() -> str | None:
    """Path of the Orthanc server binary, or None when it is not installed."""
    return find_program(ORTHANC_ENV, _ORTHANC_CANDIDATES, "Orthanc")


def find_dicomweb_plugin() -> str | None:
    """Path of Orthanc's DICOMweb plugin shared library, or None when it is not installed."""
    override = os.environ.get(PLUGIN_ENV)
    if override:
        return override if os.path.isfile(override) else None
    for candidate in _PLUGIN_CANDIDATES:
        if os.path.isfile(candidate):
            return candidate
    for folder in _PLUGIN_GLOB_DIRS:
        matches = sorted(Path(folder).glob("libOrthancDicomWeb.so*"))
        if matches:
            return str(matches[0])
    return None


def orthanc_missing_reason() -> str | None:
    """Why a test Orthanc cannot run here (binary or plugin missing), or None if it can."""
    problems = []
    if find_orthanc() is None:
        if os.environ.get(ORTHANC_ENV):
            problems.append(f"{ORTHANC_ENV}={os.environ[ORTHANC_ENV]} is not an executable")
        else:
            problems.append(
                "the Orthanc binary is missing (looked at /usr/sbin/Orthanc and on PATH; "
                "apt-get install orthanc)"
            )
    if find_dicomweb_plugin() is None:
        if os.environ.get(PLUGIN_ENV):
            problems.append(f"{PLUGIN_ENV}={os.environ[PLUGIN_ENV]} is not a file")
        else:
            problems.append(
                "Orthanc's DICOMweb plugin is missing (looked for libOrthancDicomWeb.so* in "
                + ", ".join(_PLUGIN_GLOB_DIRS)
                + "; apt-get install orthanc-dicomweb)"
            )
    return "; ".join(problems) if problems else None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on *host* right now (the OS picks it for a bound socket)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class Orthanc(ChildProcess):
    """One Orthanc process whose configuration, storage and log live in *folder*.

    The port is fixed when the object is made (a free one unless *port* is given), so ``url``
    is known before ``start()``.  If an automatically chosen port is taken by someone else
    before the first start, another one is chosen; after a successful start the port never
    changes, so ``restart()`` keeps every URL that clients were given.
    """

    stop_timeout = 15.0  # Orthanc flushes its index on SIGTERM

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        port: int | None = None,
        binary: str | None = None,
        plugin: str | None = None,
        stable_age: int = 1,
        config: Mapping[str, Any] | None = None,
        startup_timeout: float = 20.0,
        users: Mapping[str, str] | None = None,
    ) -> None:
        self.folder = Path(folder).resolve()
        self._auto_port = port is None or port == 0
        self._port = free_port() if self._auto_port else int(port or 0)
        self._binary = binary
        self._plugin = plugin
        self._stable_age = stable_age
        self._extra_config = dict(config or {})
        self.users = dict(users or {})
        self._auth = next(iter(self.users.items()), None)  # the helpers' login
        self.startup_timeout = startup_timeout
        super().__init__()
        self._started_once = False
        # Unique, so that start() can tell its own server from another one on the same port.
        self.name = f"stowd-test-{uuid.uuid4().hex[:12]}"

    # -- locations ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """Base URL of Orthanc's REST API, e.g. ``http://127.0.0.1:41234``."""
        return f"http://127.0.0.1:{self._port}"

    @property
    def dicomweb_url(self) -> str:
        """Root of the DICOMweb API (STOW-RS is ``POST {dicomweb_url}/studies``)."""
        return f"{self.url}/dicom-web"

    @property
    def config_path(self) -> Path:
        return self.folder / "orthanc.json"

    @property
    def log_path(self) -> Path:
        """Orthanc's stdout and stderr; every start appends to it."""
        return self.folder / "orthanc.log"

    @property
    def storage_dir(self) -> Path:
        return self.folder / "storage"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # -- life cycle --------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The configuration written to ``config_path`` on every start."""
        plugin = self._plugin or find_dicomweb_plugin()
        if plugin is None:
            raise OrthancError(orthanc_missing_reason() or "DICOMweb plugin not found")
        cfg: dict[str, Any] = {
            "Name": self.name,
            "StorageDirectory": str(self.storage_dir),
            "IndexDirectory": str(self.storage_dir),
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": self._port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "DicomServerEnabled": False,
            "WebDavEnabled": False,
            "ExecuteLuaEnabled": False,
            "SaveJobs": False,
            "StableAge": self._stable_age,
            "HttpDescribeErrors": True,
            "Plugins": [plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        }
        if self.users:
            cfg["RegisteredUsers"] = dict(self.users)
        cfg.update(self._extra_config)
        return cfg

    def start(self) -> None:
        """Start Orthanc and wait until ``GET /system`` answers; no-op if already running."""
        if self.is_running():
            return
        self._reap()  # a process that died on its own
        binary = self._binary or find_orthanc()
        if binary is None:
            raise OrthancError(orthanc_missing_reason() or "Orthanc not found")
        attempts = _PORT_ATTEMPTS if self._auto_port and not self._started_once else 1
        for attempt in range(attempts):
            try:
                self._start_once(binary)
            except OrthancError as exc:
                port_taken = _PORT_IN_USE in str(exc)
                if not port_taken or attempt == attempts - 1:
                    raise
                self._port = free_port()
            else:
                self._started_once = True
                return

    def _start_once(self, binary: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2) + "\n", encoding="utf-8")
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            [binary, "--no-jobs", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.folder,
        )
        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(timeout=2.0, auth=self._auth) as client:
            while True:
                code = self._process.poll()
                if code is not None:
                    self._reap()
                    raise OrthancError(
                        f"Orthanc exited with status {code} while starting on port {self._port}"
                        f"; log {self.log_path}:\n{self.log_tail(since=log_start)}"
                    )
                try:
                    answer = client.get(f"{self.url}/system")
                    if answer.status_code == 200 and answer.json().get("Name") == self.name:
                        return
                except (httpx.TransportError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise OrthancError(
                        f"Orthanc did not answer GET /system on port {self._port} within "
                        f"{self.startup_timeout:.0f} s; log {self.log_path}:\n"
                        f"{self.log_tail(since=log_start)}"
                    )
                time.sleep(0.05)

    def restart(self) -> None:
        """Stop and start again on the same port with the same storage."""
        self.stop()
        self.start()

    def log_tail(self, lines: int = 40, *, since: int = 0) -> str:
        """The last *lines* lines of the log (from byte offset *since*)."""
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(since)
                data = handle.read()
        except OSError:
            return "(no log)"
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"Orthanc({str(self.folder)!r}, port={self._port}, {state})"

    # -- REST helpers ------------------------------------------------------------------------

    def get_json(self, path: str, *, timeout: float = 30.0) -> Any:
        """``GET {url}{path}`` and decode the JSON answer (raises OrthancError if not 200)."""
        response = httpx.get(f"{self.url}{path}", timeout=timeout, auth=self._auth)
        if response.status_code != 200:
            raise OrthancError(f"GET {path}: HTTP {response.status_code}: {response.text[:500]}")
        return response.json()

    def get_bytes(self, path: str, *, timeout: float = 30.0) -> bytes:
        """``GET {url}{path}`` and return the body (raises OrthancError if not 200)."""
        response = httpx.get(f"{self.url}{path}", timeout=timeout, auth=self._auth)
        if response.status_code != 200:
            raise OrthancError(f"GET {path}: HTTP {response.status_code}: {response.text[:500]}")
        return response.content

    def post_json(self, path: str, body: Any, *, timeout: float = 60.0) -> Any:
        """``POST {url}{path}`` with a JSON body and decode the JSON answer."""
        response = httpx.post(f"{self.url}{path}", json=body, timeout=timeout, auth=self._auth)
        if response.status_code != 200:
            raise OrthancError(f"POST {path}: HTTP {response.status_code}: {response.text[:500]}")
        return response.json()

    def statistics(self) -> dict[str, Any]:
        """Orthanc's ``/statistics`` (CountPatients, CountStudies, CountInstances, ...)."""
        stats: dict[str, Any] = self.get_json("/statistics")
        return stats

    def instance_count(self) -> int:
        return int(self.statistics()["CountInstances"])

    def study_count(self) -> int:
        return int(self.statistics()["CountStudies"])

    def _expanded(self, level: str, page: int = 10_000) -> list[dict[str, Any]]:
        """Every resource of a level (``instances``, ``series``, ``studies``), expanded.

        Reads Orthanc's index only (no DICOM file is opened), in pages of *page* items:
        3,000 instances take about 0.1 s.
        """
        items: list[dict[str, Any]] = []
        while True:
            chunk: list[dict[str, Any]] = self.get_json(
                f"/{level}?expand&since={len(items)}&limit={page}"
            )
            items.extend(chunk)
            if len(chunk) < page:
                return items

    def sop_instance_uids(self) -> set[str]:
        """SOPInstanceUID of every stored instance."""
        return {item["MainDicomTags"]["SOPInstanceUID"] for item in self._expanded("instances")}

    def study_instance_uids(self) -> set[str]:
        """StudyInstanceUID of every stored study."""
        return {item["MainDicomTags"]["StudyInstanceUID"] for item in self._expanded("studies")}

    def kill(self) -> None:
        """SIGKILL at once, like a crash (no clean shutdown; Orthanc's SQLite index survives)."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
        self._reap()

    def wait_for_instance_count(
        self, expected: int, *, timeout: float = 30.0, interval: float = 0.2
    ) -> int:
        """Poll until at least *expected* instances are stored; return the last count seen."""
        deadline = time.monotonic() + timeout
        count = self.instance_count()
        while count < expected and time.monotonic() < deadline:
            time.sleep(interval)
            count = self.instance_count()
        return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run a local Orthanc with DICOMweb in the foreground until Ctrl-C."
    )
    parser.add_argument("--dir", required=True, help="folder for config, storage and log")
    parser.add_argument("--port", type=int, default=0, help="HTTP port (default: a free one)")
    parser.add_argument("--ready-file", help="write the base URL to this file once Orthanc answers")
    args = parser.parse_args(argv)

    reason = orthanc_missing_reason()
    if reason is not None:
        print(f"orthanc.py: cannot run Orthanc: {reason}", file=sys.stderr)
        return 2

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    server = Orthanc(args.dir, port=args.port)
    try:
        server.start()
        print(f"Orthanc {server.url} (DICOMweb {server.dicomweb_url}), log {server.log_path}")
        print("Press Ctrl-C to stop.", flush=True)
        if args.ready_file:
            Path(args.ready_file).write_text(server.url + "\n", encoding="utf-8")
        while server.is_running():
            time.sleep(0.5)
        print(f"Orthanc exited; log tail:\n{server.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except OrthancError as exc:
        print(f"orthanc.py: {exc}", file=sys.stderr)
        return 1
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
