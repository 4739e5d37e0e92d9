"""A fast discarding STOW-RS endpoint in its own process: reads every byte, stores nothing.

    python bench/discard.py [--host 127.0.0.1] [--port 0]

Prints its DICOMweb base URL (``http://HOST:PORT/dicom-web``) as the first line on stdout, then
serves until SIGTERM or SIGINT, and prints one JSON line with what it took (requests,
instances, body bytes, CPU seconds, and when body bytes arrived: the first and last
``time.monotonic()`` and the bytes of each second since the first).
``benchlib.discard_process()`` starts and stops it.

Each ``POST .../studies`` body (``multipart/related``, with a Content-Length) is read to its
last byte and parsed as it arrives (bench/stowparse.py: each part's File Meta, or the
instances of a DICOM JSON part; the rest of a part is counted, not copied).  The answer is a
Store Instances Response (PS3.18 10.5.3 and Annex I, ``application/dicom+json``): every
instance read is listed in the ReferencedSOPSequence (0008,1199) with its
ReferencedSOPClassUID (0008,1150) and ReferencedSOPInstanceUID (0008,1155), which is what
stowd needs to count a file as stored (stowd/dicomweb/stowanswer.py ``judge``: a sent
SOPInstanceUID listed there is SENT); a part without a File Meta is a FailedSOPSequence
(0008,1198) item with FailureReason (0008,1197) C000 "cannot understand" and no UID.  Status
per PS3.18 Table 10.5.3-1: 200 all stored, 202 some stored and some failed, 409 none stored,
400 a body that is not a multipart body; other methods get 204 (the link check's small
request).

Plain asyncio, one thread: a ``BufferedProtocol`` receiving into a 1 MiB buffer per
connection (the selector transport's own reads are at most 256 KiB), HTTP/1.1 keep-alive.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from stowparse import PartReader

RECEIVE_BUFFER = 1024 * 1024
HEAD_LIMIT = 64 * 1024
CANNOT_UNDERSTAND = 0xC000  # PS3.18 Annex I FailureReason: "Cannot understand" (C000-CFFF)


@dataclass
class Totals:
    requests: int = 0
    instances: int = 0
    bytes: int = 0
    # when body bytes arrived (time.monotonic(), the clock of every process on the machine):
    # the first and the last, and the bytes of each second since the first (bench/ratecap.py)
    first: float | None = None
    last: float | None = None
    per_second: list[int] = field(default_factory=list)

    def arrived(self, size: int) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = now
        self.last = now
        second = int(now - self.first)
        self.per_second.extend([0] * (second + 1 - len(self.per_second)))
        self.per_second[second] += size


TOTALS = Totals()


def boundary_of(content_type: str) -> bytes | None:
    """The boundary parameter of a multipart Content-Type (quoted or not)."""
    for param in content_type.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "boundary":
            return value.strip().strip('"').encode("latin-1")
    return None


def store_answer(reader: PartReader) -> tuple[int, bytes]:
    """Status and DICOM JSON body of the Store Instances Response for what *reader* read."""
    doc: dict[str, object] = {}
    if reader.instances:
        doc["00081199"] = {
            "vr": "SQ",
            "Value": [
                {"00081150": {"vr": "UI", "Value": [c]}, "00081155": {"vr": "UI", "Value": [u]}}
                for c, u in reader.instances
            ],
        }
    if reader.unreadable:
        failed = {"00081197": {"vr": "US", "Value": [CANNOT_UNDERSTAND]}}
        doc["00081198"] = {"vr": "SQ", "Value": [failed] * reader.unreadable}
    status = 200 if not reader.unreadable else 202 if reader.instances else 409
    return status, json.dumps(doc).encode()


class Connection(asyncio.BufferedProtocol):
    """One client connection: requests one after the other (keep-alive)."""

    def __init__(self) -> None:
        self.buffer = bytearray(RECEIVE_BUFFER)
        self.head = bytearray()
        self.reader: PartReader | None = None
        self.in_body = False
        self.method = ""
        self.left = 0  # body bytes still to read
        self.keep_alive = True
        self.bad = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buffer)

    def buffer_updated(self, nbytes: int) -> None:
        view = memoryview(self.buffer)[:nbytes]
        while len(view):
            view = self._body(view) if self.in_body else self._head(view)

    def _head(self, view: memoryview) -> memoryview:
        start = max(0, len(self.head) - 3)
        self.head += view
        end = self.head.find(b"\r\n\r\n", start)
        if end < 0:
            if len(self.head) > HEAD_LIMIT:
                self.transport.close()
            return view[len(view) :]
        rest = len(self.head) - (end + 4)  # bytes of the body already in *view*
        self._start(bytes(self.head[:end]).decode("latin-1"))
        self.head = bytearray()
        if not self.left:
            self._answer()
        return view[len(view) - rest :]

    def _start(self, head: str) -> None:
        lines = head.split("\r\n")
        self.method = lines[0].split(" ", 1)[0]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self.left = int(headers.get("content-length", "0"))
        self.keep_alive = headers.get("connection", "").lower() != "close"
        boundary = boundary_of(headers.get("content-type", ""))
        self.reader = PartReader(boundary) if boundary and self.method == "POST" else None
        self.bad = self.method == "POST" and self.reader is None
        self.in_body = True
        if headers.get("expect", "").lower() == "100-continue":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _body(self, view: memoryview) -> memoryview:
        used = min(self.left, len(view))
        if self.reader is not None and not self.bad:
            try:
                self.reader.feed(view[:used])
            except ValueError:
                self.bad = True
        self.left -= used
        TOTALS.bytes += used
        TOTALS.arrived(used)
        if not self.left:
            self._answer()
        return view[used:]

    def _answer(self) -> None:
        self.in_body = False
        TOTALS.requests += 1
        if self.method != "POST":
            status, body, kind = 204, b"", ""
        elif self.bad or self.reader is None or not self.reader.done:
            status, body, kind = 400, b"not a multipart/related body", "text/plain"
        else:
            status, body = store_answer(self.reader)
            kind = "application/dicom+json"
            TOTALS.instances += len(self.reader.instances)
        self.reader = None
        head = f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Length: {len(body)}\r\n"
        head += f"Content-Type: {kind}\r\n" if kind else ""
        head += "" if self.keep_alive else "Connection: close\r\n"
        self.transport.write(head.encode("ascii") + b"\r\n" + body)
        if not self.keep_alive:
            self.transport.close()


REASONS = {200: "OK", 202: "Accepted", 204: "No Content", 400: "Bad Request", 409: "Conflict"}


def _stopper(stop: asyncio.Future[None]) -> Callable[[], None]:
    def handler() -> None:
        if not stop.done():
            stop.set_result(None)

    return handler


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Connection, host, port, backlog=128)
    bound = server.sockets[0].getsockname()[1]
    print(f"http://{host}:{bound}/dicom-web", flush=True)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _stopper(stop))
    await stop
    server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port (default)")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report = {**TOTALS.__dict__, "cpu_s": usage.ru_utime + usage.ru_stime, "pid": os.getpid()}
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
