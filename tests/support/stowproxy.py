"""A proxy in front of Orthanc's STOW-RS endpoint for tests: it passes each request on, can
hold the answer back (a window in which Orthanc has stored instances that stowd has not been
told about yet: for ``delay`` seconds, or while ``gate`` is clear), and keeps every request
body so a test can count what was POSTed.  ``on_arrival`` is called with each request's
number as it arrives, before its body is read (a test kills or stops stowd there); when it
returns False the request goes no further and is not answered."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
from localserver import LocalServer

GATE_LIMIT = 120.0  # seconds an answer is held back at most by a closed gate
_SOP_TAG = re.compile(re.escape(b"\x08\x00\x18\x00"))


class StowProxy(LocalServer):
    """Started when made; ``base`` is a DICOMweb base URL whose POST /studies goes to
    ``target`` + /studies."""

    def __init__(self, target: str, delay: float = 0.0) -> None:
        proxy = self
        self.delay = delay
        self.gate = threading.Event()  # answers are held back while it is clear
        self.gate.set()
        self.bodies: list[bytes] = []
        self._lock = threading.Lock()
        self.arrivals = 0
        self.on_arrival: Callable[[int], bool] = lambda _n: True

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                with proxy._lock:
                    proxy.arrivals += 1
                    number = proxy.arrivals
                if not proxy.on_arrival(number):
                    self.close_connection = True
                    return
                body = self.rfile.read(int(self.headers["Content-Length"]))
                answer = post_on(self, target, body)
                with proxy._lock:
                    proxy.bodies.append(body)
                time.sleep(proxy.delay)
                proxy.gate.wait(GATE_LIMIT)
                relay(self, answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(Handler)
        self.start()

    @property
    def base(self) -> str:
        return f"{self.url}/dicom-web"

    def times_posted(self, uids: set[str]) -> dict[str, int]:
        """How many times each of ``uids`` went to Orthanc as an instance's SOPInstanceUID."""
        with self._lock:
            bodies = list(self.bodies)
        seen = Counter(uid for body in bodies for uid in sop_instance_uids(body))
        return {uid: seen[uid] for uid in uids}


def sop_instance_uids(body: bytes) -> list[str]:
    """The SOPInstanceUID (0008,0018) values in a body of Part-10 files (little endian)."""
    found = []
    for tag in _SOP_TAG.finditer(body):
        at = tag.end()
        explicit = body[at : at + 2] == b"UI"  # explicit VR: a 2-byte length after "UI"
        size = body[at + 2 : at + 4] if explicit else body[at : at + 4]
        length = int.from_bytes(size, "little")
        value = body[at + 4 : at + 4 + length]
        found.append(value.rstrip(b"\x00 ").decode("ascii", "replace"))
    return found


def post_on(handler: BaseHTTPRequestHandler, target: str, body: bytes) -> httpx.Response:
    """POST the STOW ``body`` stowd sent to ``handler`` on to Orthanc at ``target``."""
    headers = {"Content-Type": handler.headers["Content-Type"]}
    return httpx.post(target + "/studies", content=body, headers=headers, timeout=60)


def relay(handler: BaseHTTPRequestHandler, answer: httpx.Response) -> None:
    """Hand Orthanc's ``answer`` back to stowd as it came (status, type and body)."""
    handler.send_response(answer.status_code)
    handler.send_header("Content-Type", answer.headers.get("Content-Type", "text/plain"))
    handler.send_header("Content-Length", str(len(answer.content)))
    handler.end_headers()
    handler.wfile.write(answer.content)
