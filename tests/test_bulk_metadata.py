"""``bulkdata: metadata``: the PS3.18 metadata + bulkdata request, captured by a small local
archive (Orthanc answers 415 to this form), checked against the seed's structure and rebuilt
into Part-10 objects that dciodvfy accepts."""

from __future__ import annotations

import email
import email.policy
import json
from collections.abc import Iterator
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pydicom
import pytest
from harness import Stowd, make_layout, wait_for, written_together
from localserver import LocalServer
from mediagen import dciodvfy_errors, make_jpeg, make_pdf, make_png, make_video
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, ExplicitVRLittleEndian

from stowd.media.probe import detect

PIXEL_DATA = "7FE00010"
DOCUMENT = "00420011"


class CaptureArchive(LocalServer):
    """A STOW-RS endpoint (``localserver``) that keeps every request and stores every instance
    it is sent."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, bytes]] = []  # (Content-Type, body)
        archive = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                archive.requests.append((self.headers["Content-Type"], body))
                answer = json.dumps(archive.answer(self.headers["Content-Type"], body)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(Handler)

    @property
    def url(self) -> str:
        return f"{super().url}/dicom-web"

    @staticmethod
    def answer(content_type: str, body: bytes) -> dict[str, Any]:
        items = json.loads(parts_of(content_type, body)[0].get_content())
        referenced = [
            {"00081150": item["00080016"], "00081155": item["00080018"]} for item in items
        ]
        return {"00081199": {"vr": "SQ", "Value": referenced}}


@pytest.fixture
def archive() -> Iterator[CaptureArchive]:
    with CaptureArchive() as server:
        yield server


def parts_of(content_type: str, body: bytes) -> list[EmailMessage]:
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.message_from_bytes(head + body, policy=email.policy.HTTP)
    assert isinstance(message, EmailMessage) and message.is_multipart()
    return [part for part in message.iter_parts() if isinstance(part, EmailMessage)]


def bulk_uri(item: dict[str, Any]) -> str:
    return str((item.get(PIXEL_DATA) or item[DOCUMENT])["BulkDataURI"])


def rebuild(item: dict[str, Any], bulk: dict[str, EmailMessage], target: Path) -> Dataset:
    """A Part-10 file from one JSON instance and its bulk part, as an archive would make it."""
    tag = PIXEL_DATA if PIXEL_DATA in item else DOCUMENT
    part = bulk[bulk_uri(item)]
    data = part.get_payload(decode=True)
    assert isinstance(data, bytes)
    syntax = part.get_param("transfer-syntax") or ExplicitVRLittleEndian
    ds = Dataset.from_json(item, bulk_data_uri_handler=lambda _tag, _vr, _uri: b"")
    if tag == DOCUMENT:
        ds.EncapsulatedDocument = data + b"\0" * (len(data) % 2)
    elif UID(str(syntax)).is_compressed:
        ds.PixelData = encapsulate([data])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = data
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(str(syntax))
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(target, enforce_file_format=True)
    return pydicom.dcmread(target)


def test_metadata_mode_sends_the_seeds_form_one_type_per_request(
    tmp_path: Path, archive: CaptureArchive
) -> None:
    layout = make_layout(
        tmp_path / "run",
        archive.url,
        rules=[{"match": {"regex": "^(?P<pid>[^/]+)/"}, "set": {"PatientID": "{regex.pid}"}}],
        destinations={"pacs": {"url": archive.url, "workers": 1, "bulkdata": "metadata"}},
    )
    drop = layout.drop
    originals = {
        "P1/a.jpg": make_jpeg(drop / "P1/a.jpg", seed=3),
        "P1/b.jpg": make_jpeg(drop / "P1/b.jpg", seed=4),
        "P1/report.pdf": make_pdf(drop / "P1/report.pdf"),
        "P1/clip.mp4": make_video(drop / "P1/clip.mp4", "h264"),
        "P1/chart.png": make_png(drop / "P1/chart.png"),
    }
    written_together(drop)  # the two photos go out in one request only if queued together
    media = {rel: detect(drop / rel) for rel in originals}
    with Stowd(layout) as daemon:
        wait_for(
            lambda: layout.files(layout.sent) == set(originals), 90, "all sent", lambda: daemon.log
        )
        assert daemon.terminate() == 0

    rebuilt: dict[str, Dataset] = {}
    for content_type, body in archive.requests:
        assert content_type.startswith('multipart/related; type="application/dicom+json"')
        first, *bulk_parts = parts_of(content_type, body)
        assert first.get_content_type() == "application/dicom+json"
        items = json.loads(first.get_content())
        assert isinstance(items, list) and len(items) == len(bulk_parts) >= 1
        types = {part.get_content_type() for part in bulk_parts}
        assert len(types) == 1, f"one bulk type per request, got {types}"
        bulk = {str(part["Content-Location"]): part for part in bulk_parts}
        uris = [bulk_uri(item) for item in items]
        assert sorted(uris) == sorted(bulk), "every BulkDataURI has its Content-Location"
        for item in items:
            target = tmp_path / f"{len(rebuilt)}.dcm"
            ds = rebuild(item, bulk, target)
            assert dciodvfy_errors(target) == [], item["00080016"]
            part = bulk[bulk_uri(item)]
            payload = part.get_payload(decode=True)
            same = [rel for rel, data in originals.items() if data == payload]
            native = part.get_content_type() == "application/octet-stream"
            [rel] = same or (["P1/chart.png"] if native else [])
            rebuilt[rel] = ds
    assert set(rebuilt) == set(originals)
    assert all(ds.PatientID == "P1" for ds in rebuilt.values())
    assert len({ds.StudyInstanceUID for ds in rebuilt.values()}) == 1
    photo = rebuilt["P1/a.jpg"]
    assert (photo.Rows, photo.Columns) == (media["P1/a.jpg"].rows, media["P1/a.jpg"].columns)
    clip = rebuilt["P1/clip.mp4"]
    assert clip.file_meta.TransferSyntaxUID == media["P1/clip.mp4"].transfer_syntax
    assert len(archive.requests) == 4  # jpeg (2 files), pdf, mp4, png: one type each
