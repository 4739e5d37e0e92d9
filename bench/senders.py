"""The plain STOW-RS senders that bench/throughput.py compares stowd with.

Each runs in its own child process (so its peak RSS is its own) and works through a list of
batches (a JSON file: a list of lists of file paths, one request per batch) with STREAMS
threads::

    python bench/senders.py httpx|dicomweb-client BATCHES.json STOW_URL STREAMS

It prints one JSON line: ``{"requests": n, "bad": [...], "rss_mb": peak}``, where ``bad`` lists
requests whose answer was not a 200 referencing every instance sent, and ``rss_mb`` is the
process's own VmHWM at the end.  ``write_body()`` builds the same
multipart/related bodies as files for curl.  Only the chosen sender's library is imported.
"""

from __future__ import annotations

import json
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchlib import own_peak_rss_mb

CHUNK = 256 * 1024  # as stowd reads files
DICOM_TYPE = "application/dicom"
REFERENCED = "00081199"
FAILED = "00081198"
TIMEOUT = 600.0


def content_type(boundary: str) -> str:
    return f'multipart/related; type="{DICOM_TYPE}"; boundary={boundary}'


def part_head(boundary: str, size: int) -> bytes:
    return (f"--{boundary}\r\nContent-Type: {DICOM_TYPE}\r\nContent-Length: {size}\r\n\r\n").encode(
        "ascii"
    )


def tail(boundary: str) -> bytes:
    return f"--{boundary}--\r\n".encode("ascii")


def body_length(boundary: str, paths: list[str]) -> int:
    sizes = [Path(p).stat().st_size for p in paths]
    return sum(len(part_head(boundary, s)) + s + 2 for s in sizes) + len(tail(boundary))


def body_chunks(boundary: str, paths: list[str]) -> Iterator[bytes]:
    """The multipart body, reading each file in chunks (nothing is held but one chunk)."""
    for path in paths:
        with open(path, "rb") as fp:
            yield part_head(boundary, Path(path).stat().st_size)
            while chunk := fp.read(CHUNK):
                yield chunk
        yield b"\r\n"
    yield tail(boundary)


def write_body(target: Path, paths: list[str]) -> str:
    """Write one batch's body into *target*; return its Content-Type (curl sends the file)."""
    boundary = uuid.uuid4().hex
    with open(target, "wb") as out:
        for chunk in body_chunks(boundary, paths):
            out.write(chunk)
    return content_type(boundary)


def all_referenced(doc: Any, count: int) -> bool:
    """A DICOM JSON STOW answer that references *count* instances and fails none."""
    if not isinstance(doc, dict) or doc.get(FAILED, {}).get("Value"):
        return False
    return len(doc.get(REFERENCED, {}).get("Value", [])) == count


def httpx_sender(url: str) -> Callable[[list[str]], str | None]:
    """One shared httpx client; each batch is a generator body with a Content-Length."""
    import httpx  # noqa: PLC0415 - only in the child that uses it

    client = httpx.Client(timeout=TIMEOUT)

    def send(paths: list[str]) -> str | None:
        boundary = uuid.uuid4().hex
        headers = {
            "Content-Type": content_type(boundary),
            "Content-Length": str(body_length(boundary, paths)),
            "Accept": "application/dicom+json",
        }
        answer = client.post(url, content=body_chunks(boundary, paths), headers=headers)
        if answer.status_code == 200 and all_referenced(answer.json(), len(paths)):
            return None
        return f"HTTP {answer.status_code}: {answer.text[:200]}"

    return send


def dicomweb_client_sender(url: str) -> Callable[[list[str]], str | None]:
    """dicomweb-client as its documentation shows it: read each file into a pydicom Dataset
    (the whole file), then ``store_instances``.  One client per thread (a requests
    Session is not meant to be shared)."""
    import pydicom  # noqa: PLC0415
    from dicomweb_client.api import DICOMwebClient  # noqa: PLC0415

    base = url.removesuffix("/studies")
    local = threading.local()

    def send(paths: list[str]) -> str | None:
        if not hasattr(local, "client"):
            local.client = DICOMwebClient(url=base)
        datasets = [pydicom.dcmread(p) for p in paths]
        answer = local.client.store_instances(datasets)
        referenced = answer.get("ReferencedSOPSequence", [])
        if len(referenced) == len(paths) and not answer.get("FailedSOPSequence"):
            return None
        return f"{len(referenced)} of {len(paths)} referenced"

    return send


SENDERS = {"httpx": httpx_sender, "dicomweb-client": dicomweb_client_sender}


def main(argv: list[str]) -> int:
    name, batches_file, url, streams = argv
    batches: list[list[str]] = json.loads(Path(batches_file).read_text())
    send = SENDERS[name](url)

    def guarded(paths: list[str]) -> str | None:
        try:
            return send(paths)
        except Exception as exc:  # a failed request is a result here, not a crash
            return f"{type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(int(streams)) as pool:
        problems = list(pool.map(guarded, batches))
    bad = [f"batch {n}: {p}" for n, p in enumerate(problems) if p is not None]
    print(json.dumps({"requests": len(batches), "bad": bad, "rss_mb": own_peak_rss_mb()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
