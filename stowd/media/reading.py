"""The record of what a bulkdata file holds, and the bounded readers its parsers share.

``stowd.media`` (documents, JPEG, JPEG 2000, PNG, GIF) and ``stowd.video`` (MPEG-2, MP4) read
headers with these: ``read_at``/``read_exact`` (a header cut short raises ``TruncatedHeader``, which
``probe.detect`` reports as damage of the file's kind), ``check_size`` for the pixel size, and
``boxes`` for the ISO base media boxes of MP4, QuickTime and JP2.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple

from stowd.errors import FileProblem

HEAD = 64 * 1024  # what is read first to recognise a file; a CDA root element must be in it
MAX_BOXES = 100_000  # more boxes than this in one container is damage, not a video
MAX_SIDE = 65535  # Rows and Columns are 16-bit (US)

TS = "1.2.840.10008.1.2.4."
DAMAGED = {
    "jpeg": "the file is a truncated or damaged JPEG",
    "jp2": "the JPEG 2000 image is truncated or damaged",
    "png": "the PNG image is truncated or damaged",
    "gif": "the GIF image is truncated or damaged",
    "mpeg": "the MPEG-2 video is truncated or damaged",
    "mp4": "the video is truncated or damaged",
}


@dataclass(frozen=True)
class Media:
    """What a bulkdata file is; the pixel fields are set for images and video only."""

    kind: str
    media_type: str
    transfer_syntax: str | None
    rows: int | None = None
    columns: int | None = None
    samples_per_pixel: int | None = None
    bits_stored: int | None = None
    photometric: str | None = None
    lossy: bool | None = None
    frames: int | None = None
    frame_time_ms: float | None = None
    duration_s: float | None = None
    codestream_offset: int | None = None  # a .jp2 file: where its codestream (jp2c box) starts
    codestream_length: int | None = None  # ... and its length (None: the stream is the file)
    document_id: str | None = None  # a CDA document: its ClinicalDocument/id as root^extension


class TruncatedHeader(Exception):
    """A header ended before all its fields (turned into a FileProblem for the file's kind)."""


def read_at(fp: BinaryIO, offset: int, count: int) -> bytes:
    fp.seek(offset)
    return fp.read(count)


def read_exact(fp: BinaryIO, count: int) -> bytes:
    data = fp.read(count)
    if len(data) < count:
        raise TruncatedHeader
    return data


def check_size(kind: str, rows: int, columns: int) -> None:
    if not rows or not columns:
        raise FileProblem(f"{DAMAGED[kind]}: its header gives a zero width or height")
    if rows > MAX_SIDE or columns > MAX_SIDE:
        raise FileProblem(
            f"the image is {columns} x {rows} pixels, too large for DICOM (Rows and Columns "
            f"are at most {MAX_SIDE}): scale or split it"
        )


# --- boxes (MP4, QuickTime, JP2) ---------------------------------------------------------------


class IsoBox(NamedTuple):
    kind: bytes
    start: int  # where the payload starts
    end: int


def boxes(fp: BinaryIO, start: int, end: int, what: str) -> Iterator[IsoBox]:
    """The boxes between ``start`` and ``end``, read by their headers only (seeks, no reads)."""
    pos = start
    for _ in range(MAX_BOXES):
        if pos + 8 > end:
            return
        box = _box_at(fp, pos, end, what)
        yield box
        pos = box.end
    raise FileProblem(f"{what} is damaged: it has more than {MAX_BOXES} boxes in one place")


def _box_at(fp: BinaryIO, pos: int, end: int, what: str) -> IsoBox:
    size, kind = struct.unpack(">I4s", read_at(fp, pos, 8))
    header = 8
    if size == 1:  # 64-bit largesize follows
        size, header = struct.unpack(">Q", read_exact(fp, 8))[0], 16
    elif size == 0:  # the box runs to the end of its container
        size = end - pos
    if size < header or pos + size > end:
        raise FileProblem(
            f"{what} is truncated or damaged: its '{fourcc(kind)}' box at byte {pos} runs "
            "past the end of the file or of the box around it (was it copied completely?)"
        )
    return IsoBox(kind, pos + header, pos + size)


def fourcc(kind: bytes) -> str:
    return kind.decode("latin-1").strip() or kind.hex()
