"""A small QIDO-style modality worklist for tests: ``GET /mwlitems?...`` like dcm4chee-arc.

It serves the items given to it as DICOM JSON, matching the query's keys exactly (a key
``ScheduledProcedureStepSequence.X`` inside that sequence's items) and counting every
request, so tests can tell how many lookups stowd made.  ``status`` makes it answer an error.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from localserver import LocalServer
from pydicom.datadict import dictionary_VR, tag_for_keyword


def element(keyword: str, *values: Any) -> tuple[str, dict[str, Any]]:
    """One DICOM JSON attribute: ``element("PatientName", "Doe^Jane")``."""
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    vr = dictionary_VR(tag)
    if vr == "PN":
        values = tuple({"Alphabetic": v} for v in values)
    return f"{tag:08X}", {"vr": vr, "Value": list(values)} if values else {"vr": vr}


def item(**attributes: Any) -> dict[str, Any]:
    """A DICOM JSON object from keywords; a list of dicts is a sequence of such objects."""
    out = {}
    for keyword, value in attributes.items():
        tag, elem = element(keyword, *([] if isinstance(value, list) else [value]))
        if isinstance(value, list):
            elem["Value"] = value
        out[tag] = elem
    return out


class Worklist:
    """The server's state: its items, the requests it got, the status it answers."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items
        self.requests: list[str] = []
        self.status = 200
        self.lock = threading.Lock()

    def answer(self, path: str) -> tuple[int, list[dict[str, Any]]]:
        with self.lock:
            self.requests.append(path)
        url = urlsplit(path)
        if url.path.rstrip("/") != "/mwlitems":
            return 404, []
        query = [(k, v) for k, v in parse_qsl(url.query) if k != "includefield"]
        return self.status, [i for i in self.items if all(_has(i, k, v) for k, v in query)]


def _has(obj: dict[str, Any], key: str, wanted: str) -> bool:
    outer, _, inner = key.partition(".")
    tag = f"{tag_for_keyword(outer) or 0:08X}"
    values = obj.get(tag, {}).get("Value", [])
    if inner:
        return any(_has(v, inner, wanted) for v in values)
    texts = [v.get("Alphabetic", "") if isinstance(v, dict) else str(v) for v in values]
    return wanted in texts


@contextmanager
def serve(worklist: Worklist) -> Iterator[str]:
    """Run the server on a free loopback port; yields its base URL (``.../mwlitems`` below)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, found = worklist.answer(self.path)
            body = json.dumps(found).encode() if status == 200 else b"worklist trouble"
            self.send_response(status)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    with LocalServer(Handler) as server:
        yield server.url
