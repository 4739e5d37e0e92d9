"""A proxy in front of an archive's STOW-RS endpoint that measures the rate at which request
bodies arrive (issue 20's rate caps): every read of a body is recorded with its time
(``time.monotonic()``, the clock stowd's own process keeps too) and size, as it comes off the
socket (``read1``: what the kernel has, at most ``READ`` bytes).  The whole body is then passed
on to ``target`` + /studies and the archive's answer relayed as it is (Orthanc answers; the
proxy scripts none)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

from localserver import LocalServer
from stowproxy import post_on, relay

READ = 64 * 1024


@dataclass(frozen=True)
class Arrival:
    """``size`` body bytes of request ``request`` (1, 2, ...) read at ``at``."""

    request: int
    at: float
    size: int


class RateProxy(LocalServer):
    """Started when made; ``base`` is a DICOMweb base URL whose POST /studies goes on to
    ``target`` + /studies once its body has arrived."""

    def __init__(self, target: str) -> None:
        proxy = self
        self._lock = threading.Lock()
        self.arrivals: list[Arrival] = []
        self.requests = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                number = proxy._number()
                body = proxy._read(self, number)
                if body is None:
                    self.close_connection = True
                    return
                answer = post_on(self, target, body)
                relay(self, answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(Handler)
        self.start()

    @property
    def base(self) -> str:
        return f"{self.url}/dicom-web"

    def _number(self) -> int:
        with self._lock:
            self.requests += 1
            return self.requests

    def _read(self, handler: BaseHTTPRequestHandler, number: int) -> bytes | None:
        """The body, each read recorded; None when the connection ended before its end."""
        left = int(handler.headers["Content-Length"])
        pieces = []
        while left:
            data = handler.rfile.read1(min(READ, left))
            if not data:
                return None
            with self._lock:
                self.arrivals.append(Arrival(number, time.monotonic(), len(data)))
            pieces.append(data)
            left -= len(data)
        return b"".join(pieces)

    def received(self, since: float = 0.0, until: float = float("inf")) -> int:
        """Body bytes read at times in (``since``, ``until``]."""
        with self._lock:
            return sum(a.size for a in self.arrivals if since < a.at <= until)

    def span(self) -> tuple[float, float]:
        """When the first and the last body bytes were read."""
        with self._lock:
            return self.arrivals[0].at, self.arrivals[-1].at

    def worst_excess(self, rate: float, since: float = 0.0) -> float:
        """The most bytes read in any stretch of reads (after ``since``) beyond ``rate`` times
        the stretch's length.  Against a cap of ``rate`` with a burst of B this is at most B,
        plus what a read found waiting in the socket's buffers when the stretch began."""
        with self._lock:
            reads = [a for a in self.arrivals if a.at > since]
        total, worst, base = 0, 0.0, float("inf")
        for read in reads:  # in time order (recorded under the lock)
            base = min(base, total - rate * read.at)  # a stretch starting with this read
            total += read.size
            worst = max(worst, total - rate * read.at - base)
        return worst
