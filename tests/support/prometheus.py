"""A real Prometheus (Debian's ``prometheus`` package) scraping a test's stowd.

``Prometheus(folder, targets)`` writes a configuration scraping each ``host:port`` of *targets*
every second (job ``stowd``), keeps its TSDB and log in *folder* and serves its HTTP API on a
free loopback port; ``query`` and ``query_range`` ask ``/api/v1/query`` and
``/api/v1/query_range`` and return the result list (an answer with an error raises
``PrometheusError`` with Prometheus's own words); ``label_values`` asks
``/api/v1/label/NAME/values`` as Grafana's ``label_values(metric, label)`` variables do.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml
from localserver import ChildProcess, find_program
from orthanc import free_port

PROMETHEUS_ENV = "STOWD_TEST_PROMETHEUS"
"""Environment variable naming the prometheus binary to use instead of the default search."""
_CANDIDATES = ("/usr/bin/prometheus",)
_PORT_IN_USE = "address already in use"
_PORT_ATTEMPTS = 5
SCRAPE_INTERVAL = 1.0  # seconds: short, so a test sees its samples soon


class PrometheusError(RuntimeError):
    """Prometheus is missing, did not start, or answered a query with an error."""


def find_prometheus() -> str | None:
    return find_program(PROMETHEUS_ENV, _CANDIDATES, "prometheus")


def prometheus_missing_reason() -> str | None:
    """Why a test Prometheus cannot run here, or None if it can."""
    if find_prometheus() is not None:
        return None
    if os.environ.get(PROMETHEUS_ENV):
        return f"{PROMETHEUS_ENV}={os.environ[PROMETHEUS_ENV]} is not an executable"
    return (
        "prometheus is missing (looked at /usr/bin/prometheus and on PATH; "
        "apt-get install prometheus)"
    )


class Prometheus(ChildProcess):
    """One Prometheus process on a free loopback port scraping *targets* every second."""

    def __init__(
        self,
        folder: str | os.PathLike[str],
        targets: Sequence[str],
        *,
        startup_timeout: float = 60.0,
    ) -> None:
        self.folder = Path(folder).resolve()
        self.targets = list(targets)
        self.startup_timeout = startup_timeout
        self._port = free_port()
        super().__init__()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def log_path(self) -> Path:
        return self.folder / "prometheus.log"

    @property
    def config_path(self) -> Path:
        return self.folder / "prometheus.yml"

    def config(self) -> dict[str, Any]:
        interval = f"{SCRAPE_INTERVAL:g}s"
        return {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": [
                {
                    "job_name": "stowd",
                    "scrape_timeout": interval,
                    "static_configs": [{"targets": self.targets}],
                }
            ],
        }

    def start(self) -> None:
        """Start it and wait until ``/-/ready`` answers 200 (another port if its was taken)."""
        if self.is_running():
            return
        binary = find_prometheus()
        if binary is None:
            raise PrometheusError(prometheus_missing_reason() or "prometheus not found")
        for attempt in range(_PORT_ATTEMPTS):
            try:
                self._start_once(binary)
                return
            except PrometheusError as exc:
                if _PORT_IN_USE not in str(exc) or attempt == _PORT_ATTEMPTS - 1:
                    raise
                self._port = free_port()

    def _start_once(self, binary: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config()), encoding="utf-8")
        since = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            [
                binary,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self._port}",
                "--log.level=info",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.folder,
        )
        self._wait_ready(since)

    def _wait_ready(self, since: int) -> None:
        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while True:
                assert self._process is not None
                code = self._process.poll()
                if code is not None:
                    self._reap()
                    raise PrometheusError(
                        f"prometheus exited with status {code} while starting on port "
                        f"{self._port}; log {self.log_path}:\n{self.log_tail(since=since)}"
                    )
                if _answers(client, f"{self.url}/-/ready"):
                    return
                if time.monotonic() > deadline:
                    self.stop()
                    raise PrometheusError(
                        f"prometheus was not ready on port {self._port} within "
                        f"{self.startup_timeout:.0f} s; log:\n{self.log_tail(since=since)}"
                    )
                time.sleep(0.1)

    def log_tail(self, lines: int = 40, *, since: int = 0) -> str:
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(since)
                data = handle.read()
        except OSError:
            return "(no log)"
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])

    # -- the HTTP API ------------------------------------------------------------------------
    def query(self, expr: str) -> list[dict[str, Any]]:
        """``/api/v1/query`` at the current time: the result (a vector's samples)."""
        samples: list[dict[str, Any]] = self._api("/api/v1/query", {"query": expr})
        return samples

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """``/api/v1/query_range`` (as Grafana asks for a time series panel): the series."""
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
        series: list[dict[str, Any]] = self._api("/api/v1/query_range", params)
        return series

    def label_values(self, label: str, match: str) -> list[str]:
        """``/api/v1/label/LABEL/values?match[]=MATCH``: what Grafana's variable query
        ``label_values(MATCH, LABEL)`` lists."""
        values: list[str] = self._api(f"/api/v1/label/{label}/values", {"match[]": match})
        return values

    def _api(self, path: str, params: dict[str, str]) -> Any:
        answer = httpx.get(f"{self.url}{path}", params=params, timeout=30, trust_env=False)
        body = answer.json()
        if answer.status_code != 200 or body.get("status") != "success":
            raise PrometheusError(
                f"{path} {params}: HTTP {answer.status_code}: "
                f"{body.get('errorType')}: {body.get('error')}"
            )
        data = body["data"]
        return data["result"] if isinstance(data, dict) else data


def _answers(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(url).status_code == 200
    except httpx.TransportError:
        return False
