"""A proxy in front of Orthanc's DICOMweb for the tests of ``verify: true``: POST /studies
(STOW-RS) and GET (QIDO-RS) go to Orthanc, and a test can make the QIDO-RS side lie or fail
in the ways Orthanc itself never does:

- ``hide``: SOPInstanceUID -> how many more QIDO answers leave that instance out (an archive
  that answers "stored" and then does not list it);
- ``qido_status``: answer every GET with this status instead (an archive whose QIDO-RS is
  down: 503 is what a gateway in front of a stopped service answers, RFC 9110 15.6.4);
- ``qido_gate``: while clear, a GET is held before it is passed on (a window between the
  STOW answer and the verification, for a kill -9 in it); ``qido_waiting`` is set meanwhile.

It keeps every POST body (``posted``) and the query of every GET (``queries``)."""

from __future__ import annotations

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
from localserver import LocalServer
from stowproxy import sop_instance_uids

GATE_LIMIT = 120.0  # seconds a GET is held back at most by a closed gate
SOP = "00080018"


class VerifyProxy(LocalServer):
    """Started when made; ``base`` is the DICOMweb base URL to give stowd."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.hide: dict[str, int] = {}
        self.qido_status: int | None = None
        self.qido_gate = threading.Event()
        self.qido_gate.set()
        self.qido_waiting = threading.Event()
        self.bodies: list[bytes] = []
        self.queries: list[list[tuple[str, str]]] = []
        self.lock = threading.Lock()
        super().__init__(_Handler)
        self.start()

    @property
    def base(self) -> str:
        return f"{self.url}/dicom-web"

    def times_posted(self, uids: set[str]) -> dict[str, int]:
        with self.lock:
            bodies = list(self.bodies)
        seen = Counter(uid for body in bodies for uid in sop_instance_uids(body))
        return {uid: seen[uid] for uid in uids}

    def asked_for(self) -> set[str]:
        """Every SOPInstanceUID a query asked for (UID list matching, comma-separated)."""
        with self.lock:
            queries = list(self.queries)
        return {
            uid
            for query in queries
            for key, value in query
            if key == "SOPInstanceUID"
            for uid in value.split(",")
        }

    def filtered(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``items`` without the hidden instances (each hiding used up once per answer)."""
        kept = []
        with self.lock:
            for item in items:
                uid = (item.get(SOP, {}).get("Value") or [""])[0]
                if self.hide.get(uid, 0) > 0:
                    self.hide[uid] -= 1
                    continue
                kept.append(item)
        return kept


class _Handler(BaseHTTPRequestHandler):
    @property
    def proxy(self) -> VerifyProxy:
        owner: VerifyProxy = self.server.owner  # type: ignore[attr-defined]
        return owner

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        headers = {"Content-Type": self.headers["Content-Type"]}
        answer = httpx.post(
            self.proxy.target + "/studies", content=body, headers=headers, timeout=60
        )
        with self.proxy.lock:
            self.proxy.bodies.append(body)
        self._answer(answer.status_code, answer.headers.get("Content-Type", ""), answer.content)

    def do_GET(self) -> None:
        proxy = self.proxy
        url = urlsplit(self.path)
        with proxy.lock:
            proxy.queries.append(parse_qsl(url.query))
        proxy.qido_waiting.set()
        proxy.qido_gate.wait(GATE_LIMIT)
        if proxy.qido_status is not None:
            self._answer(proxy.qido_status, "text/plain", b"service unavailable")
            return
        path = url.path.removeprefix("/dicom-web")
        answer = httpx.get(
            f"{proxy.target}{path}",
            params=url.query,
            headers={"Accept": "application/dicom+json"},
            timeout=60,
        )
        if answer.status_code != 200:
            self._answer(answer.status_code, answer.headers.get("Content-Type", ""), answer.content)
            return
        items = proxy.filtered(answer.json())
        self._answer(200, "application/dicom+json", json.dumps(items).encode())

    def _answer(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type or "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass
