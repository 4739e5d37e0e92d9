"""Tests of ``stowd.stow``: the multipart body, the request on the wire, and judging answers.

Files are real DICOM Part-10 files written with pydicom; requests go through httpx (a
``MockTransport`` whose handler reads the whole streamed body, or a real local HTTP server).
"""

from __future__ import annotations

import builtins
import email
import email.message
import email.utils
import hashlib
import io
import json
import os
import random
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import httpx
import pydicom
import pytest
from localserver import LocalServer
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import EncapsulatedPDFStorage, ExplicitVRLittleEndian, generate_uid

from stowd.config.access import Access, Tls
from stowd.config.model import Destination
from stowd.dicomweb import stow, stowbody
from stowd.dicomweb.client import http_client, tls_context
from stowd.dicomweb.httperrors import retry_after
from stowd.dicomweb.stow import StowClient
from stowd.dicomweb.stowanswer import (
    Answer,
    StowOutcome,
    Verdict,
    failure_meaning,
    is_transient,
    judge,
    parse_answer,
)
from stowd.dicomweb.stowbody import Body, Part
from stowd.errors import (
    ClientSetupError,
    DestinationBusy,
    DestinationHeld,
    FileUnreadable,
    FileVanished,
)

BASE_URL = "http://archive.test/dicom-web"
STOW_URL = BASE_URL + "/studies"
CONTENT_TYPE_RE = re.compile(
    r'^multipart/related; type="application/dicom"; boundary=(?P<boundary>[0-9A-Za-z]{16,70})$'
)
NATIVE_NS = "http://dicom.nema.org/PS3.19/models/NativeDICOM"

Handler = Callable[[httpx.Request], httpx.Response]


# -- helpers -----------------------------------------------------------------------------------
def write_dicom(path: Path, payload_bytes: int) -> Part:
    """Write a real Part-10 file (Encapsulated PDF) with ``payload_bytes`` of random content."""
    uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EncapsulatedPDFStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = EncapsulatedPDFStorage
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DOC"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    # Random bytes contain CR, LF and "--" sequences: a good test of the multipart framing.
    ds.EncapsulatedDocument = random.Random(uid).randbytes(payload_bytes + payload_bytes % 2)
    ds.save_as(path, enforce_file_format=True)
    return Part(str(path), path.stat().st_size, uid)


@pytest.fixture
def parts(tmp_path: Path) -> list[Part]:
    """Three real DICOM files of different sizes, one larger than a read chunk."""
    return [
        write_dicom(tmp_path / "a.dcm", 1_000),
        write_dicom(tmp_path / "b.dcm", 40_001),
        write_dicom(tmp_path / "c.dcm", stowbody.CHUNK + 12_345),
    ]


def read_body(body: Body) -> bytes:
    body.open()
    try:
        return b"".join(body)
    finally:
        body.close()


def split_multipart(data: bytes, boundary: str) -> list[tuple[dict[str, str], bytes]]:
    """A strict, independent multipart/related parser: (headers, content) per part."""
    delimiter = b"--" + boundary.encode("ascii")
    closing = delimiter + b"--\r\n"
    assert data.startswith(delimiter + b"\r\n"), "the body must start with the first delimiter"
    assert data.endswith(closing), "the body must end with the close delimiter"
    # The CRLF before every delimiter belongs to the delimiter (RFC 2046 5.1.1).
    segments = (b"\r\n" + data).split(b"\r\n" + delimiter)
    assert segments[0] == b"", "no preamble is expected"
    assert segments[-1] == b"--\r\n", "nothing may follow the close delimiter"
    result = []
    for segment in segments[1:-1]:
        assert segment.startswith(b"\r\n")
        head, sep, content = segment[2:].partition(b"\r\n\r\n")
        assert sep, "each part needs a blank line after its headers"
        headers = {}
        for line in head.decode("ascii").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        result.append((headers, content))
    return result


def parse_with_email(data: bytes, content_type: str) -> email.message.Message:
    raw = f"MIME-Version: 1.0\r\nContent-Type: {content_type}\r\n\r\n".encode("ascii") + data
    return email.message_from_bytes(raw)


def assert_body_carries(data: bytes, content_type: str, parts: Sequence[Part]) -> None:
    """``data`` is a valid multipart/related body holding exactly the files of ``parts``."""
    match = CONTENT_TYPE_RE.match(content_type)
    assert match, content_type
    boundary = match["boundary"]
    split = split_multipart(data, boundary)
    assert len(split) == len(parts)
    for (headers, content), part in zip(split, parts, strict=True):
        assert headers["content-type"] == "application/dicom"
        assert int(headers["content-length"]) == part.size == len(content)
        assert content == Path(part.path).read_bytes()
        assert content[128:132] == b"DICM"
    # The standard library's MIME parser agrees.
    msg = parse_with_email(data, content_type)
    assert not msg.defects
    assert msg.get_content_type() == "multipart/related"
    assert msg.get_param("type") == "application/dicom"
    subparts = msg.get_payload()
    assert isinstance(subparts, list)
    assert len(subparts) == len(parts)
    for sub, part in zip(subparts, parts, strict=True):
        assert isinstance(sub, email.message.Message)
        assert not sub.defects
        assert sub.get_content_type() == "application/dicom"
        assert sub.get_payload(decode=True) == Path(part.path).read_bytes()


def dicom_json(
    referenced: Sequence[str | tuple[str, int]] = (),
    failed: Sequence[tuple[str, int]] = (),
) -> bytes:
    """A STOW-RS response in DICOM JSON, as dcm4chee or Orthanc write it."""

    def ui(value: str) -> dict[str, Any]:
        return {"vr": "UI", "Value": [value]}

    def us(value: int) -> dict[str, Any]:
        return {"vr": "US", "Value": [value]}

    doc: dict[str, Any] = {"00081190": {"vr": "UR", "Value": [BASE_URL + "/studies/1.2.3"]}}
    if referenced:
        items = []
        for ref in referenced:
            sop, warning = (ref, None) if isinstance(ref, str) else ref
            item = {
                "00081150": ui(EncapsulatedPDFStorage),
                "00081155": ui(sop),
                "00081190": {"vr": "UR", "Value": [f"{BASE_URL}/studies/1.2.3/x/{sop}"]},
            }
            if warning is not None:
                item["00081196"] = us(warning)
            items.append(item)
        doc["00081199"] = {"vr": "SQ", "Value": items}
    if failed:
        doc["00081198"] = {
            "vr": "SQ",
            "Value": [
                {"00081150": ui(EncapsulatedPDFStorage), "00081155": ui(sop), "00081197": us(code)}
                for sop, code in failed
            ],
        }
    return json.dumps(doc).encode()


def native_xml(
    referenced: Sequence[tuple[str, int | None]], failed: Sequence[tuple[str, int]], ns: bool
) -> bytes:
    """A STOW-RS response in the Native DICOM Model (PS3.19), with or without its namespace."""

    def attr(tag: str, vr: str, value: str) -> str:
        value_xml = f'<Value number="1">{value}</Value>'
        return f'<DicomAttribute tag="{tag}" vr="{vr}">{value_xml}</DicomAttribute>'

    def item(n: int, sop: str, extra: str) -> str:
        return (
            f'<Item number="{n}">{attr("00081150", "UI", EncapsulatedPDFStorage)}'
            f"{attr('00081155', 'UI', sop)}{extra}</Item>"
        )

    refs = "".join(
        item(n, sop, attr("00081196", "US", str(w)) if w is not None else "")
        for n, (sop, w) in enumerate(referenced, 1)
    )
    fails = "".join(
        item(n, sop, attr("00081197", "US", str(code))) for n, (sop, code) in enumerate(failed, 1)
    )
    xmlns = f' xmlns="{NATIVE_NS}"' if ns else ""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<NativeDicomModel{xmlns}>"
        f"{attr('00081190', 'UR', BASE_URL + '/studies/1.2.3')}"
        f'<DicomAttribute tag="00081199" vr="SQ" keyword="ReferencedSOPSequence">{refs}'
        "</DicomAttribute>"
        f'<DicomAttribute tag="00081198" vr="SQ" keyword="FailedSOPSequence">{fails}'
        "</DicomAttribute>"
        "</NativeDicomModel>"
    ).encode()


@dataclass
class Seen:
    """What a mock archive received: one entry per request, body read in full."""

    requests: list[httpx.Request] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)

    def record(self, request: httpx.Request) -> bytes:
        body = request.read()
        self.requests.append(request)
        self.bodies.append(body)
        return body


class MakeClient(Protocol):
    def __call__(
        self, handler: Handler, *, stop: threading.Event | None = None, url: str = BASE_URL
    ) -> StowClient: ...


@pytest.fixture
def make_client() -> Iterator[MakeClient]:
    clients: list[StowClient] = []

    def make(
        handler: Handler, *, stop: threading.Event | None = None, url: str = BASE_URL
    ) -> StowClient:
        client = StowClient(
            Destination(name="archive", url=url), stop=stop, transport=httpx.MockTransport(handler)
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Make every StowClient's in-process backoff instant, recording the waits asked for."""
    asked: list[float] = []

    def fake_sleep(self: StowClient, seconds: float) -> None:
        asked.append(seconds)

    monkeypatch.setattr(StowClient, "_sleep", fake_sleep)
    return asked


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[BinaryIO]:
    """Every file ``stowd.stowbody`` opens, so a test can check none is left open."""
    files: list[BinaryIO] = []

    def tracking_open(path: str, mode: str = "r", buffering: int = -1) -> BinaryIO:
        fp = builtins.open(path, mode, buffering)  # noqa: SIM115 - the test checks it gets closed
        assert isinstance(fp, io.FileIO)  # raw: the body reads through its descriptor
        files.append(fp)
        return fp

    monkeypatch.setattr(stowbody, "open", tracking_open, raising=False)
    return files


# -- Body --------------------------------------------------------------------------------------
def test_body_is_a_valid_multipart_related_body_of_the_files(parts: list[Part]) -> None:
    body = Body(parts)
    data = read_body(body)
    assert_body_carries(data, body.content_type, parts)


def test_body_length_is_the_number_of_bytes_yielded(parts: list[Part]) -> None:
    for subset in (parts[:1], parts[:2], parts):
        body = Body(subset)
        data = read_body(body)
        assert body.length == len(data)
        assert body.length > sum(p.size for p in subset)


def test_body_streams_large_files_in_chunks(parts: list[Part]) -> None:
    body = Body([parts[2]])
    body.open()
    try:
        pieces = list(body)
    finally:
        body.close()
    assert parts[2].size > stowbody.CHUNK
    assert len(pieces) >= 4  # head, at least two file chunks, CRLF, tail
    assert max(len(p) for p in pieces) <= stowbody.CHUNK
    assert sum(len(p) for p in pieces) == body.length


def test_body_hands_small_files_on_together(parts: list[Part], tmp_path: Path) -> None:
    """Each piece is a send (and a GIL handover) in httpx: small files share one piece of
    at most CHUNK bytes, a large one after them still goes in CHUNKs (issue 19)."""
    small = [write_dicom(tmp_path / f"s{n}.dcm", 20_000) for n in range(20)]
    body = Body([*small, parts[2]])
    body.open()
    try:
        pieces = list(body)
    finally:
        body.close()
    assert max(len(p) for p in pieces) <= stowbody.CHUNK
    assert sum(len(p) for p in pieces) == body.length
    # 20 files of ~20 KB: two pieces (not 3 per file); then head, 2 chunks, CRLF + tail
    assert len(pieces) <= 2 + 4
    data = b"".join(pieces)
    assert_body_carries(data, body.content_type, [*small, parts[2]])


def test_body_can_be_iterated_again_after_opening(parts: list[Part]) -> None:
    body = Body(parts)
    body.open()
    try:
        first, second = b"".join(body), b"".join(body)
    finally:
        body.close()
    assert first == second
    assert len(first) == body.length


@pytest.mark.parametrize("which", [0, 2])  # a small part (read into its piece), a large one
def test_a_file_cut_short_after_it_was_opened_is_never_sent_short(
    parts: list[Part], which: int
) -> None:
    body = Body(parts)
    body.open()
    try:
        os.truncate(parts[which].path, 10)
        with pytest.raises(FileVanished, match="became shorter while it was being sent"):
            b"".join(body)
    finally:
        body.close()


def test_every_body_has_a_fresh_boundary(parts: list[Part]) -> None:
    boundaries = {Body(parts).boundary for _ in range(200)}
    assert len(boundaries) == 200
    for boundary in boundaries:
        assert CONTENT_TYPE_RE.match(
            f'multipart/related; type="application/dicom"; boundary={boundary}'
        )


def test_body_content_type_names_dicom_parts_and_its_boundary(parts: list[Part]) -> None:
    body = Body(parts)
    match = CONTENT_TYPE_RE.match(body.content_type)
    assert match and match["boundary"] == body.boundary


def test_body_close_closes_every_file(parts: list[Part], opened: list[BinaryIO]) -> None:
    body = Body(parts)
    body.open()
    assert len(opened) == 3
    assert not any(fp.closed for fp in opened)
    body.close()
    assert all(fp.closed for fp in opened)


def test_open_raises_file_vanished_for_a_deleted_file(
    parts: list[Part], opened: list[BinaryIO]
) -> None:
    os.remove(parts[1].path)
    body = Body(parts)
    with pytest.raises(FileVanished, match=re.escape(parts[1].path)):
        body.open()
    assert len(opened) == 1  # the first file was opened...
    assert all(fp.closed for fp in opened)  # ...and closed again


@pytest.mark.parametrize("change", [+1, -1], ids=["grew", "shrank"])
def test_open_raises_file_vanished_when_the_size_changed(
    parts: list[Part], opened: list[BinaryIO], change: int
) -> None:
    path = Path(parts[2].path)
    os.truncate(path, path.stat().st_size + change)
    body = Body(parts)
    with pytest.raises(FileVanished, match=re.escape(parts[2].path)):
        body.open()
    assert len(opened) == 3
    assert all(fp.closed for fp in opened)


def test_open_closes_files_on_any_error(
    parts: list[Part], monkeypatch: pytest.MonkeyPatch, opened: list[BinaryIO]
) -> None:
    def refuse_third(path: str, mode: str = "r", buffering: int = -1) -> BinaryIO:
        if path == parts[2].path:
            raise PermissionError(13, "Permission denied", path)
        fp = builtins.open(path, mode, buffering)  # noqa: SIM115 - the test checks it gets closed
        assert isinstance(fp, io.FileIO)  # raw: the body reads through its descriptor
        opened.append(fp)
        return fp

    monkeypatch.setattr(stowbody, "open", refuse_third, raising=False)
    with pytest.raises(FileUnreadable, match="may not read") as caught:
        Body(parts).open()
    assert caught.value.path == parts[2].path  # only that file waits, not the batch
    assert len(opened) == 2
    assert all(fp.closed for fp in opened)


def test_a_file_shrinking_while_sent_raises_file_vanished(parts: list[Part]) -> None:
    body = Body(parts)
    body.open()
    try:
        os.truncate(parts[1].path, 100)
        with pytest.raises(FileVanished, match="shorter"):
            b"".join(body)
    finally:
        body.close()


# -- the request -------------------------------------------------------------------------------
def test_store_sends_one_well_formed_request(parts: list[Part], make_client: MakeClient) -> None:
    seen = Seen()

    def handler(request: httpx.Request) -> httpx.Response:
        seen.record(request)
        return httpx.Response(200, content=dicom_json([p.sop_uid for p in parts]))

    answer = make_client(handler).store(parts)

    assert len(seen.requests) == 1
    request, data = seen.requests[0], seen.bodies[0]
    assert request.method == "POST"
    assert str(request.url) == STOW_URL
    assert "transfer-encoding" not in request.headers
    assert "expect" not in request.headers
    assert int(request.headers["content-length"]) == len(data)
    assert "application/dicom+json" in request.headers["accept"]
    assert_body_carries(data, request.headers["content-type"], parts)
    match = CONTENT_TYPE_RE.match(request.headers["content-type"])
    assert match
    expected = Body(parts)
    expected.boundary = match["boundary"]
    assert len(data) == expected.length

    assert answer.status == 200
    assert set(answer.referenced) == {p.sop_uid for p in parts}
    assert answer.seconds >= 0.0
    assert {v.outcome for v in judge(answer, parts).values()} == {StowOutcome.SENT}


@pytest.mark.parametrize("url", [BASE_URL, BASE_URL + "/"])
def test_store_posts_to_the_studies_resource(
    parts: list[Part], make_client: MakeClient, url: str
) -> None:
    seen = Seen()

    def handler(request: httpx.Request) -> httpx.Response:
        seen.record(request)
        return httpx.Response(200, content=dicom_json([parts[0].sop_uid]))

    make_client(handler, url=url).store(parts[:1])
    assert [str(r.url) for r in seen.requests] == [STOW_URL]


def test_each_store_uses_a_fresh_boundary(parts: list[Part], make_client: MakeClient) -> None:
    seen = Seen()

    def handler(request: httpx.Request) -> httpx.Response:
        seen.record(request)
        return httpx.Response(200, content=dicom_json([parts[0].sop_uid]))

    client = make_client(handler)
    client.store(parts[:1])
    client.store(parts[:1])
    types = [r.headers["content-type"] for r in seen.requests]
    assert types[0] != types[1]
    for data, content_type in zip(seen.bodies, types, strict=True):
        assert_body_carries(data, content_type, parts[:1])


def test_store_raises_file_vanished_before_sending(
    parts: list[Part], make_client: MakeClient, opened: list[BinaryIO]
) -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(200)

    os.remove(parts[0].path)
    with pytest.raises(FileVanished):
        make_client(handler).store(parts)
    assert calls == []
    assert opened == []


def test_store_raises_file_vanished_when_a_file_shrinks_during_the_upload(
    parts: list[Part],
    make_client: MakeClient,
    opened: list[BinaryIO],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_read_exactly = stowbody._read_exactly

    def shrink_last(fp: BinaryIO, part: Part) -> Iterator[bytes]:
        if part == parts[2]:  # the first two parts are on the wire already
            os.truncate(part.path, 10)
        return real_read_exactly(fp, part)

    monkeypatch.setattr(stowbody, "_read_exactly", shrink_last)
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(200)

    with pytest.raises(FileVanished, match="shorter"):
        make_client(handler).store(parts)
    assert calls == []  # the broken body never made a complete request
    assert len(opened) == 3
    assert all(fp.closed for fp in opened)


def test_store_closes_its_files_after_the_request(
    parts: list[Part], make_client: MakeClient, opened: list[BinaryIO]
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        assert opened and not any(fp.closed for fp in opened)
        return httpx.Response(200, content=dicom_json([p.sop_uid for p in parts]))

    make_client(handler).store(parts)
    assert len(opened) == 3
    assert all(fp.closed for fp in opened)


# -- status mapping ----------------------------------------------------------------------------
@pytest.mark.parametrize("status", [401, 403, 404, 405, 407, 415])
def test_configuration_statuses_hold_the_destination(
    parts: list[Part], make_client: MakeClient, status: int
) -> None:
    seen = Seen()

    def handler(request: httpx.Request) -> httpx.Response:
        seen.record(request)
        return httpx.Response(status, headers={"Warning": '299 archive "nope"'})

    with pytest.raises(DestinationHeld) as caught:
        make_client(handler).store(parts)
    assert caught.value.status == status
    assert f"HTTP {status}" in str(caught.value)
    assert caught.value.server_message == '299 archive "nope"'
    assert len(seen.requests) == 1  # not retried in-process


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_holds_the_destination_instead_of_failing_files(
    parts: list[Part], make_client: MakeClient, status: int
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        return httpx.Response(status, headers={"Location": "https://archive.test/dicom-web"})

    with pytest.raises(
        DestinationHeld, match=re.escape("https://archive.test/dicom-web")
    ) as caught:
        make_client(handler).store(parts[:1])
    assert caught.value.status == status


@pytest.mark.parametrize("status", [408, 429, 502, 503, 504])
def test_busy_statuses_raise_destination_busy_with_retry_after_seconds(
    parts: list[Part], make_client: MakeClient, status: int
) -> None:
    seen = Seen()

    def handler(request: httpx.Request) -> httpx.Response:
        seen.record(request)
        return httpx.Response(status, headers={"Retry-After": "120"}, content=b"come back later")

    with pytest.raises(DestinationBusy) as caught:
        make_client(handler).store(parts)
    assert caught.value.status == status
    assert caught.value.retry_after == 120.0
    assert caught.value.server_message == "come back later"
    assert len(seen.requests) == 1  # the caller backs off, not the client


def test_busy_retry_after_as_an_http_date(parts: list[Part], make_client: MakeClient) -> None:
    when = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=90), usegmt=True)

    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        return httpx.Response(503, headers={"Retry-After": when, "Warning": '299 x "busy"'})

    with pytest.raises(DestinationBusy) as caught:
        make_client(handler).store(parts)
    assert caught.value.retry_after is not None
    assert 85.0 <= caught.value.retry_after <= 90.0
    assert caught.value.server_message == '299 x "busy"'


def test_busy_without_retry_after_or_body(parts: list[Part], make_client: MakeClient) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        return httpx.Response(503)

    with pytest.raises(DestinationBusy) as caught:
        make_client(handler).store(parts)
    assert caught.value.retry_after is None
    assert caught.value.server_message is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [("7", 7.0), (" 30 ", 30.0), ("0", 0.0), (None, None), ("", None), ("soon", None)],
)
def test_retry_after_seconds(value: str | None, expected: float | None) -> None:
    assert retry_after(value) == expected


def test_retry_after_http_dates() -> None:
    future = email.utils.format_datetime(datetime.now(UTC) + timedelta(hours=1), usegmt=True)
    seconds = retry_after(future)
    assert seconds is not None
    assert 3595.0 <= seconds <= 3600.0
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: go now


@pytest.mark.parametrize(
    "error",
    [
        httpx.ConnectError("[Errno 111] Connection refused"),
        httpx.ReadTimeout("timed out"),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
    ],
    ids=["connect", "timeout", "protocol"],
)
def test_transport_errors_are_retried_in_process_then_busy(
    parts: list[Part], make_client: MakeClient, sleeps: list[float], error: httpx.TransportError
) -> None:
    seen = Seen()

    def handler(request: httpx.Request) -> httpx.Response:
        seen.record(request)  # each attempt streams a complete, fresh body
        raise error

    with pytest.raises(DestinationBusy) as caught:
        make_client(handler).store(parts)
    assert len(seen.requests) == stow.IN_PROCESS_ATTEMPTS == 3
    assert sleeps == [1.0, 2.0]  # exponential backoff between the attempts
    assert caught.value.__cause__ is error
    assert caught.value.status is None
    types = [r.headers["content-type"] for r in seen.requests]
    assert len(set(types)) == 3  # a fresh boundary per attempt
    for data, content_type in zip(seen.bodies, types, strict=True):
        assert_body_carries(data, content_type, parts)


def test_a_blip_then_success_returns_the_answer(
    parts: list[Part], make_client: MakeClient, sleeps: list[float]
) -> None:
    seen = Seen()

    def handler(request: httpx.Request) -> httpx.Response:
        seen.record(request)
        if len(seen.requests) == 1:
            raise httpx.ConnectError("[Errno 104] Connection reset by peer")
        return httpx.Response(200, content=dicom_json([p.sop_uid for p in parts]))

    answer = make_client(handler).store(parts)
    assert len(seen.requests) == 2
    assert sleeps == [1.0]
    assert set(answer.referenced) == {p.sop_uid for p in parts}


def test_tls_failure_holds_the_destination_without_retrying(
    parts: list[Part], make_client: MakeClient, sleeps: list[float]
) -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectError(
            "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate"
        )

    with pytest.raises(DestinationHeld, match="TLS"):
        make_client(handler).store(parts)
    assert len(calls) == 1
    assert sleeps == []


def test_a_set_stop_event_ends_the_in_process_retries_at_once(
    parts: list[Part], make_client: MakeClient
) -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectError("[Errno 111] Connection refused")

    stop = threading.Event()
    stop.set()
    started = time.monotonic()
    with pytest.raises(DestinationBusy, match="shutting down"):
        make_client(handler, stop=stop).store(parts)
    assert time.monotonic() - started < 0.5
    assert len(calls) == 1


def test_the_backoff_sleep_is_interrupted_by_stop(
    parts: list[Part], make_client: MakeClient
) -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectError("[Errno 111] Connection refused")

    stop = threading.Event()
    timer = threading.Timer(0.2, stop.set)
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(DestinationBusy, match="shutting down"):
            make_client(handler, stop=stop).store(parts)
    finally:
        timer.cancel()
        timer.join()
    elapsed = time.monotonic() - started
    assert 0.15 <= elapsed < 0.95  # the first backoff is 1 s: it was cut short
    assert len(calls) == 1


def test_warning_header_is_carried_into_the_answer(
    parts: list[Part], make_client: MakeClient
) -> None:
    warning = '299 DCM4CHEE "Study deletion in progress"'

    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        body = dicom_json([parts[0].sop_uid], failed=[(parts[1].sop_uid, 0xA77A)])
        return httpx.Response(202, headers={"Warning": warning}, content=body)

    answer = make_client(handler).store(parts[:2])
    assert answer.status == 202
    assert answer.server_message == warning
    assert answer.failed == {parts[1].sop_uid: 0xA77A}


def test_orthanc_400_through_the_client(parts: list[Part], make_client: MakeClient) -> None:
    """Orthanc: one unreadable part makes the whole answer 400, stored ones are still listed."""

    def handler(request: httpx.Request) -> httpx.Response:
        request.read()  # Orthanc sends no Content-Type on errors
        return httpx.Response(400, content=dicom_json([p.sop_uid for p in parts[:2]]))

    answer = make_client(handler).store(parts)
    verdicts = judge(answer, parts)
    assert [verdicts[p.sop_uid].outcome for p in parts] == [
        StowOutcome.SENT,
        StowOutcome.SENT,
        StowOutcome.ISOLATE,
    ]


# -- parse_answer ------------------------------------------------------------------------------
def test_parse_dicom_json() -> None:
    body = dicom_json(
        ["1.2.3.1", ("1.2.3.2", 0xB000)], failed=[("1.2.3.3", 0xA700), ("1.2.3.4", 0xC000)]
    )
    answer = parse_answer(202, body)
    assert answer.status == 202
    assert answer.referenced == {"1.2.3.1": None, "1.2.3.2": 0xB000}
    assert answer.failed == {"1.2.3.3": 0xA700, "1.2.3.4": 0xC000}
    assert answer.server_message is None


def test_parse_dicom_json_as_a_list() -> None:
    body = b"[" + dicom_json(["1.2.3.1"]) + b"]"
    answer = parse_answer(200, body)
    assert answer.referenced == {"1.2.3.1": None}


def test_parse_dicom_json_failed_without_reason_counts_as_code_zero() -> None:
    doc = {"00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["9.9"]}}]}}
    answer = parse_answer(409, json.dumps(doc).encode())
    assert answer.failed == {"9.9": 0}
    assert judge(answer, [Part("x", 1, "9.9")])["9.9"].outcome is StowOutcome.FAILED


@pytest.mark.parametrize("ns", [True, False], ids=["namespaced", "plain"])
def test_parse_native_dicom_xml(ns: bool) -> None:
    body = native_xml(
        [("1.2.3.1", None), ("1.2.3.2", 0xB007)], [("1.2.3.3", 0xA700), ("1.2.3.4", 0x0122)], ns
    )
    answer = parse_answer(202, body)
    assert answer.referenced == {"1.2.3.1": None, "1.2.3.2": 0xB007}
    assert answer.failed == {"1.2.3.3": 0xA700, "1.2.3.4": 0x0122}
    assert answer.server_message is None


@pytest.mark.parametrize("body", [b"", b"   \r\n  "], ids=["empty", "blank"])
def test_parse_empty_body(body: bytes) -> None:
    answer = parse_answer(200, body)
    assert answer == Answer(200)


@pytest.mark.parametrize(
    "body",
    [
        b"Internal Server Error: java.lang.NullPointerException",
        b'{"00081199": {"vr": "SQ", "Value": [',
        b"<html><body>Bad Gateway</body>",
        b'"just a string"',
    ],
    ids=["text", "truncated-json", "broken-html", "json-string"],
)
def test_parse_garbage_keeps_the_server_message(body: bytes) -> None:
    answer = parse_answer(500, body)
    assert answer.referenced == {}
    assert answer.failed == {}
    assert answer.server_message == body.decode()


def test_parse_garbage_message_is_shortened() -> None:
    answer = parse_answer(500, b"x" * 5000)
    assert answer.server_message == "x" * 500


# -- judge -------------------------------------------------------------------------------------
def sops(*names: str) -> list[Part]:
    return [Part(f"/drop/{name}.dcm", 1000, f"1.2.3.{name}") for name in names]


def outcomes(verdicts: dict[str, Verdict]) -> dict[str, StowOutcome]:
    return {sop: v.outcome for sop, v in verdicts.items()}


def test_judge_200_referencing_all_is_sent() -> None:
    batch = sops("1", "2", "3")
    answer = parse_answer(200, dicom_json([p.sop_uid for p in batch]))
    verdicts = judge(answer, batch)
    assert outcomes(verdicts) == {p.sop_uid: StowOutcome.SENT for p in batch}
    assert all(v.reason == "" and v.code is None for v in verdicts.values())


def test_judge_200_with_a_warning_is_sent_with_a_note() -> None:
    batch = sops("1")
    answer = parse_answer(200, dicom_json([("1.2.3.1", 0xB000)]))
    verdict = judge(answer, batch)["1.2.3.1"]
    assert verdict.outcome is StowOutcome.SENT
    assert verdict.code == 0xB000
    assert "B000" in verdict.reason and "coercion" in verdict.reason


def test_judge_200_missing_one_retries_that_one() -> None:
    batch = sops("1", "2", "3")
    answer = parse_answer(200, dicom_json(["1.2.3.1", "1.2.3.3", "1.2.3.99"]))
    verdicts = judge(answer, batch)
    assert outcomes(verdicts) == {
        "1.2.3.1": StowOutcome.SENT,
        "1.2.3.2": StowOutcome.RETRY,
        "1.2.3.3": StowOutcome.SENT,
    }
    assert "did not list" in verdicts["1.2.3.2"].reason


def test_judge_200_with_nothing_referenced_retries_everything() -> None:
    """Orthanc answers 200 to a body whose closing boundary is missing: not proof of storage."""
    batch = sops("1", "2")
    verdicts = judge(parse_answer(200, b""), batch)
    assert outcomes(verdicts) == {p.sop_uid: StowOutcome.RETRY for p in batch}


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (0xA700, StowOutcome.RETRY),
        (0xA77A, StowOutcome.RETRY),
        (0x0110, StowOutcome.RETRY),
        (0xA900, StowOutcome.FAILED),
        (0xC000, StowOutcome.FAILED),
        (0x0122, StowOutcome.FAILED),
        (0x0124, StowOutcome.FAILED),
        (0xA770, StowOutcome.FAILED),
        (0xA77B, StowOutcome.FAILED),
    ],
    ids=lambda v: f"{v:04X}" if isinstance(v, int) else v.name,
)
def test_judge_202_per_instance_failure(code: int, outcome: StowOutcome) -> None:
    batch = sops("1", "2")
    answer = parse_answer(202, dicom_json(["1.2.3.1"], failed=[("1.2.3.2", code)]))
    verdicts = judge(answer, batch)
    assert verdicts["1.2.3.1"].outcome is StowOutcome.SENT
    failed = verdicts["1.2.3.2"]
    assert failed.outcome is outcome
    assert failed.code == code
    assert f"{code:04X}" in failed.reason
    assert failure_meaning(code) in failed.reason
    assert "HTTP 202" in failed.reason


def test_judge_orthanc_400_settles_the_stored_and_isolates_the_rest() -> None:
    batch = sops("1", "2", "3")
    answer = parse_answer(400, dicom_json(["1.2.3.1", "1.2.3.3"]))
    verdicts = judge(answer, batch)
    assert outcomes(verdicts) == {
        "1.2.3.1": StowOutcome.SENT,
        "1.2.3.2": StowOutcome.ISOLATE,
        "1.2.3.3": StowOutcome.SENT,
    }
    assert "one by one" in verdicts["1.2.3.2"].reason


def test_judge_400_for_a_single_file_fails_it() -> None:
    batch = sops("2")
    answer = parse_answer(400, dicom_json(["1.2.3.1", "1.2.3.3"]))
    verdict = judge(answer, batch)["1.2.3.2"]
    assert verdict.outcome is StowOutcome.FAILED
    assert "could not read" in verdict.reason
    assert "HTTP 400" in verdict.reason


def test_judge_413_splits_a_batch_and_fails_a_single_file() -> None:
    answer = parse_answer(413, b"<html>Request Entity Too Large</html>")
    assert outcomes(judge(answer, sops("1", "2"))) == {
        "1.2.3.1": StowOutcome.ISOLATE,
        "1.2.3.2": StowOutcome.ISOLATE,
    }
    single = judge(answer, sops("1"))["1.2.3.1"]
    assert single.outcome is StowOutcome.FAILED
    assert "413" in single.reason and "larger" in single.reason


def test_judge_409_with_nothing_listed_isolates_a_batch() -> None:
    answer = parse_answer(409, b"")
    assert outcomes(judge(answer, sops("1", "2", "3"))) == {
        f"1.2.3.{n}": StowOutcome.ISOLATE for n in "123"
    }
    single = judge(answer, sops("1"))["1.2.3.1"]
    assert single.outcome is StowOutcome.FAILED
    assert "409" in single.reason


def test_judge_409_with_failure_reasons_uses_them() -> None:
    """Orthanc: POST /studies/{S} with an instance of another study -> 409, reason 0110."""
    answer = parse_answer(409, dicom_json(["1.2.3.1"], failed=[("1.2.3.2", 0x0110)]))
    verdicts = judge(answer, sops("1", "2"))
    assert outcomes(verdicts) == {"1.2.3.1": StowOutcome.SENT, "1.2.3.2": StowOutcome.RETRY}
    assert verdicts["1.2.3.2"].code == 0x0110


def test_judge_500_for_a_single_file_retries() -> None:
    answer = parse_answer(500, b"java.lang.NullPointerException")
    verdict = judge(answer, sops("1"))["1.2.3.1"]
    assert verdict.outcome is StowOutcome.RETRY
    assert "500" in verdict.reason


def test_judge_gives_one_verdict_per_part_sent() -> None:
    batch = sops("1", "2")
    answer = parse_answer(200, dicom_json(["1.2.3.1", "1.2.3.2", "1.2.3.77"]))
    assert set(judge(answer, batch)) == {"1.2.3.1", "1.2.3.2"}


@pytest.mark.parametrize(
    ("code", "transient", "meaning"),
    [
        (0xA700, True, "out of resources"),
        (0xA701, True, "out of resources"),
        (0xA7FF, True, "out of resources"),
        (0xA77A, True, "study deletion in progress"),
        (0x0110, True, "processing failure"),
        (0xA770, False, "policy"),
        (0xA775, False, "policy"),
        (0xA77B, False, "policy"),
        (0xA77F, False, "policy"),
        (0xA900, False, "does not match SOP class"),
        (0xA9AB, False, "does not match SOP class"),
        (0xA922, False, "missing bulkdata"),
        (0xC000, False, "cannot understand"),
        (0xC122, False, "transfer syntax not supported"),
        (0xC409, False, "study does not match"),
        (0xC499, False, "could not parse"),
        (0xCFFF, False, "cannot understand"),
        (0x0122, False, "SOP class not supported"),
        (0x0124, False, "not authorized"),
        (0x0000, False, "unknown"),
        (0x1234, False, "unknown"),
    ],
    ids=lambda v: f"{v:04X}" if isinstance(v, int) and not isinstance(v, bool) else str(v),
)
def test_failure_reason_table(code: int, transient: bool, meaning: str) -> None:
    assert is_transient(code) is transient
    assert meaning in failure_meaning(code)


# -- a real HTTP server ------------------------------------------------------------------------
@dataclass
class Received:
    headers: dict[str, str]
    body: bytes


Reply = tuple[int, dict[str, str], bytes]


class LocalArchive(LocalServer):
    """A real HTTP server on 127.0.0.1 (``localserver``) that reads each request by its
    Content-Length."""

    def __init__(self, reply: Callable[[Received], Reply]) -> None:
        self.received: list[Received] = []
        archive = self

        class RequestHandler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                headers = {k.lower(): v for k, v in self.headers.items()}
                length = int(headers.get("content-length", "-1"))
                body = self.rfile.read(length) if length >= 0 else b""
                got = Received(headers, body)
                archive.received.append(got)
                status, reply_headers, content = reply(got)
                self.send_response(status)
                for name, value in reply_headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(RequestHandler)

    @property
    def url(self) -> str:
        return f"{super().url}/dicom-web"


def real_client(url: str) -> StowClient:
    return StowClient(Destination(name="local", url=url))


def test_real_server_503_with_retry_after(tmp_path: Path) -> None:
    part = write_dicom(tmp_path / "one.dcm", 2_000)
    with LocalArchive(lambda _: (503, {"Retry-After": "7"}, b"Service Unavailable")) as archive:
        client = real_client(archive.url)
        try:
            with pytest.raises(DestinationBusy) as caught:
                client.store([part])
        finally:
            client.close()
    assert caught.value.status == 503
    assert caught.value.retry_after == 7.0
    assert caught.value.server_message == "Service Unavailable"
    assert len(archive.received) == 1
    assert len(archive.received[0].body) == int(archive.received[0].headers["content-length"])


def test_real_server_receives_a_multi_megabyte_file_streamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    part = write_dicom(tmp_path / "big.dcm", 6 * 1024 * 1024 + 3)
    chunks: list[int] = []
    real_read_exactly = stowbody._read_exactly

    def spy(fp: BinaryIO, p: Part) -> Iterator[bytes]:
        for chunk in real_read_exactly(fp, p):
            chunks.append(len(chunk))
            yield chunk

    monkeypatch.setattr(stowbody, "_read_exactly", spy)

    def reply(got: Received) -> Reply:
        match = CONTENT_TYPE_RE.match(got.headers.get("content-type", ""))
        if not match:
            return 415, {}, b""
        [(_, content)] = split_multipart(got.body, match["boundary"])
        uid = pydicom.dcmread(io.BytesIO(content)).SOPInstanceUID
        return 200, {"Content-Type": "application/dicom+json"}, dicom_json([str(uid)])

    with LocalArchive(reply) as archive:
        client = real_client(archive.url)
        try:
            answer = client.store([part])
        finally:
            client.close()

    [got] = archive.received
    assert "transfer-encoding" not in got.headers
    assert "expect" not in got.headers
    assert int(got.headers["content-length"]) == len(got.body)
    assert_body_carries(got.body, got.headers["content-type"], [part])
    digest = hashlib.sha256(Path(part.path).read_bytes()).hexdigest()
    [(_, content)] = split_multipart(got.body, got.headers["content-type"].rsplit("=", 1)[1])
    assert hashlib.sha256(content).hexdigest() == digest
    # The file went out in pieces, never read whole into memory.
    assert sum(chunks) == part.size
    assert len(chunks) > 1 and max(chunks) <= stowbody.CHUNK
    assert answer.status == 200
    assert judge(answer, [part]) == {part.sop_uid: Verdict(StowOutcome.SENT)}


def test_real_connection_refused_is_busy_after_three_attempts(
    tmp_path: Path, sleeps: list[float]
) -> None:
    part = write_dicom(tmp_path / "one.dcm", 100)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before the client connects
    client = real_client(f"http://127.0.0.1:{port}/dicom-web")
    try:
        with pytest.raises(DestinationBusy, match="cannot connect"):
            client.store([part])
    finally:
        client.close()
    assert sleeps == [1.0, 2.0]


def test_every_chunk_sent_is_a_sign_of_progress(tmp_path: Path, make_client: MakeClient) -> None:
    part = write_dicom(tmp_path / "big.dcm", 3 * stowbody.CHUNK)
    signs: list[float] = []

    def archive(request: httpx.Request) -> httpx.Response:
        request.read()
        return httpx.Response(200, json={"00081199": {"vr": "SQ", "Value": []}})

    make_client(archive).store([part], progress=lambda: signs.append(time.monotonic()))
    assert len(signs) >= 4  # one per chunk of the file: a long upload keeps the watchdog fed


# -- TLS failures and TLS-proxy refusals in plain words ----------------------------------------
def verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] {message}")
    error.verify_code = code
    error.verify_message = message
    return error


@pytest.mark.parametrize(
    ("code", "message", "plain"),
    [
        (20, "unable to get local issuer certificate", "not signed by a trusted CA"),
        (19, "self-signed certificate in certificate chain", "not signed by a trusted CA"),
        (62, "hostname mismatch", "made out to another host name"),
        (10, "certificate has expired", "certificate has expired"),
    ],
)
def test_certificate_verification_failures_in_plain_words(
    parts: list[Part], make_client: MakeClient, code: int, message: str, plain: str
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(str(verify_error(code, message))) from verify_error(code, message)

    with pytest.raises(DestinationHeld, match=plain) as caught:
        make_client(handler).store(parts)
    assert str(caught.value).startswith("TLS failure: the archive's certificate")
    assert f"OpenSSL: {message}" in str(caught.value)


def test_an_ssl_error_after_the_handshake_is_still_a_blip(
    parts: list[Part], make_client: MakeClient, sleeps: list[float]
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadError("EOF occurred in violation of protocol") from ssl.SSLEOFError(
            8, "EOF occurred in violation of protocol"
        )

    with pytest.raises(DestinationBusy, match="connection failed"):
        make_client(handler).store(parts)
    assert sleeps == [1.0, 2.0]


def test_a_tls_proxy_asking_for_a_client_certificate_holds_plainly(
    parts: list[Part], make_client: MakeClient
) -> None:
    page = (
        b"<html><head><title>400 No required SSL certificate was sent</title></head>"
        b"<body><center><h1>400 Bad Request</h1></center></body></html>"
    )

    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        return httpx.Response(400, content=page)

    with pytest.raises(DestinationHeld, match="wants a client certificate") as caught:
        make_client(handler).store(parts[:1])
    assert caught.value.status == 400


def test_a_401_without_auth_says_to_set_it(parts: list[Part], make_client: MakeClient) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        return httpx.Response(401)

    with pytest.raises(DestinationHeld, match=r"HTTP 401\): set auth"):
        make_client(handler).store(parts)


def test_extra_headers_go_to_the_archive_host_only() -> None:
    seen: dict[str, str | None] = {}

    def network(request: httpx.Request) -> httpx.Response:
        seen[request.url.host] = request.headers.get("X-Api-Key")
        return httpx.Response(200)

    dest = Destination("archive", BASE_URL, access=Access(headers=(("X-Api-Key", "k-123"),)))
    with http_client(dest, transport=httpx.MockTransport(network)) as client:
        client.get(BASE_URL + "/studies")
        client.post("https://sso.example/token")
    assert seen == {"archive.test": "k-123", "sso.example": None}


def test_an_encrypted_client_key_is_refused_plainly_and_min_version_always_applies(
    tmp_path: Path,
) -> None:
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-keyout", str(key), "-out",
         str(cert), "-days", "1", "-subj", "/CN=stowd", "-passout", "pass:abc"],
        check=True, capture_output=True,
    )  # fmt: skip
    tls = Tls(client_cert=cert, client_key=key)
    with pytest.raises(ClientSetupError, match="is encrypted"):
        tls_context(Destination("a", BASE_URL, access=Access(tls=tls)))
    loose = Destination("a", BASE_URL, verify_tls=False, access=Access(tls=Tls(min_version="1.3")))
    context = tls_context(loose)
    assert isinstance(context, ssl.SSLContext)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_3 and not context.check_hostname
