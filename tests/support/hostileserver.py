"""A misbehaving archive for tests (issue 14): answers Orthanc never gives.

``HostileArchive`` listens on a free loopback port:

* ``POST .../studies`` (STOW-RS) answers as ``stow`` says: ``"bomb"``, a gzip-encoded answer
  of about 1 MB that inflates to ``BOMB_BYTES`` of zeros (the issue's "1 MB gzip-encoded STOW
  answer that inflates to 1 GiB"); ``"trickle"``, a 200 whose body comes one byte a second
  (the issue's "answer trickled one byte every 3 s": each byte arrives well within the read
  timeout, so only a deadline for the whole answer ends it); ``"ok"``, a DICOM JSON STOW answer
  (PS3.18 10.5.3) listing every SOPInstanceUID sent in ReferencedSOPSequence (0008,1199);
  ``"slow-headers"``, a status line and then a header trickled one byte a second (the issue's
  trickle, in the header instead of the body: an HTTP/1.1 header may be up to h11's 16 KiB,
  RFC 9112 2.2 sets no limit, so each byte arriving within the read timeout keeps it open);
  ``"deep"``, a 200 whose DICOM JSON body (RFC 8259 allows any nesting, section 9) is
  ``DEEP`` arrays one inside the other: 200 KB, far below the answer limit.
* ``GET`` with ``qido="deep"`` answers that deep body as a QIDO-RS lookup answer, and
  ``POST /token`` with ``token="deep"`` as the token endpoint's answer; ``"slow-headers"``
  trickles their header the same way.
* ``GET`` anything (a QIDO-RS lookup) answers the gzip bomb ("the same as a QIDO answer").
* ``POST /token`` (an OAuth2 token endpoint, RFC 6749 4.4) answers the gzip bomb.

``Content-Encoding: gzip`` is what httpx decodes on its own (RFC 9110 8.4.1).
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler
from typing import Any

from localserver import LocalServer
from stowproxy import sop_instance_uids

BOMB_BYTES = 1024 * 1024 * 1024  # decoded
DEEP = 100_000  # arrays nested in a "deep" answer
TRICKLE_SECONDS = 60  # bytes trickled, one a second, before the answer is complete
_MIB = 1024 * 1024


@functools.cache
def gzip_bomb(size: int = BOMB_BYTES) -> bytes:
    """``size`` zero bytes gzip-compressed, made a MiB at a time (about 1 MB for 1 GiB)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: the gzip container
    zeros = bytes(_MIB)
    parts = [packer.compress(zeros) for _ in range(size // _MIB)]
    return b"".join([*parts, packer.compress(bytes(size % _MIB)), packer.flush()])


class HostileArchive(LocalServer):
    """See the module docstring; ``stow`` may be changed while it runs."""

    def __init__(self, stow: str = "bomb") -> None:
        super().__init__(_Handler)
        # Made here, before anyone asks: made inside the first request it took seconds of
        # CPU, and a client's 5 s read timeout ran out on a loaded machine.
        gzip_bomb()
        self.stow = stow
        self.qido = "bomb"
        self.token = "bomb"
        self.lock = threading.Lock()
        self.requests: list[str] = []  # "POST /dicom-web/studies", ...
        self.trickles: list[tuple[float, float]] = []  # (body read, client gone), monotonic

    @property
    def base(self) -> str:
        return f"{self.url}/dicom-web"

    def seen(self, request: str) -> int:
        with self.lock:
            return sum(1 for r in self.requests if r.startswith(request))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    @property
    def owner(self) -> HostileArchive:
        owner: HostileArchive = self.server.owner  # type: ignore[attr-defined]
        return owner

    def handle(self) -> None:
        with contextlib.suppress(OSError):  # stowd hung up in the middle of an answer
            super().handle()

    def _record(self) -> None:
        with self.owner.lock:
            self.owner.requests.append(f"{self.command} {self.path}")

    def do_GET(self) -> None:
        self._record()
        if self.owner.qido == "deep":
            self._deep()
        elif self.owner.qido == "slow-headers":
            self._slow_headers()
        else:
            self._bomb()

    def do_POST(self) -> None:
        self._record()
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.split("?")[0] == "/token" and self.owner.token == "deep":
            self._deep()
        elif self.path.split("?")[0] == "/token" and self.owner.token == "slow-headers":
            self._slow_headers()
        elif self.path.split("?")[0] == "/token" or self.owner.stow == "bomb":
            self._bomb()
        elif self.owner.stow == "trickle":
            self._trickle()
        elif self.owner.stow == "slow-headers":
            self._slow_headers()
        elif self.owner.stow == "deep":
            self._deep()
        else:
            self._stored(sop_instance_uids(body))

    def _bomb(self) -> None:
        bomb = gzip_bomb()
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(bomb)))
        self.end_headers()
        with contextlib.suppress(OSError):  # stowd stopped reading, as it should
            self.wfile.write(bomb)

    def _trickle(self) -> None:
        read = time.monotonic()
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(TRICKLE_SECONDS))
        self.end_headers()
        try:
            for _ in range(TRICKLE_SECONDS):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(1.0)
        except OSError:
            with self.owner.lock:
                self.owner.trickles.append((read, time.monotonic()))
            self.close_connection = True

    def _deep(self) -> None:
        body = b"[" * DEEP + b"]" * DEEP
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _slow_headers(self) -> None:
        read = time.monotonic()
        try:
            self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            for _ in range(TRICKLE_SECONDS):
                self.wfile.flush()
                time.sleep(1.0)
                self.wfile.write(b"a")
            self.wfile.write(b"\r\nContent-Length: 0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            with self.owner.lock:
                self.owner.trickles.append((read, time.monotonic()))
        self.close_connection = True

    def _stored(self, uids: list[str]) -> None:
        items = [{"00081155": {"vr": "UI", "Value": [uid]}} for uid in uids]
        body = json.dumps({"00081199": {"vr": "SQ", "Value": items}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
