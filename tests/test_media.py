"""Recognising bulkdata files from their headers, and refusing what cannot be used.

Every test file is built here, byte by byte: minimal but valid headers of each format.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import zlib
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import pytest

from stowd.errors import FileProblem, FileUnreadable, FileVanished
from stowd.media import probe
from stowd.media.probe import detect
from stowd.media.reading import Media

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

TS = "1.2.840.10008.1.2.4."
GIB = 2**30


# --- builders: JPEG ------------------------------------------------------------------------------


def seg(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


JFIF = seg(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
DQT = seg(0xDB, b"\x00" + bytes(range(1, 65)))
DHT = seg(0xC4, b"\x00" + bytes([0, 1] + [0] * 14) + b"\x00")
SCAN = b"\x12\x34\xff\x00\x56\xff\xd0\x78"


def adobe(transform: int) -> bytes:
    return seg(0xEE, b"Adobe\x00\x64\x00\x00\x00\x00" + bytes([transform]))


def jpeg(
    sof: int = 0xC0,
    size: tuple[int, int] = (480, 640),
    *,
    components: bytes = b"\x01\x02\x03",
    sampling: bytes = b"\x22\x11\x11",
    precision: int = 8,
    app: bytes = JFIF,
    predictor: int = 0,
) -> bytes:
    rows, columns = size
    frame = struct.pack(">BHHB", precision, rows, columns, len(components))
    frame += b"".join(bytes([c, s, 0]) for c, s in zip(components, sampling, strict=True))
    scan = bytes([len(components)]) + b"".join(bytes([c, 0]) for c in components)
    scan += bytes([predictor, 0 if sof == 0xC3 else 63, 0])
    big_app1 = seg(0xE1, b"Exif\x00\x00" + bytes(30_000))
    head = b"\xff\xd8" + app + big_app1 + seg(0xFE, b"made by a test") + DQT + b"\xff\xff"
    return head + seg(sof, frame) + DHT + seg(0xDA, scan) + SCAN + b"\xff\xd9"


# --- builders: JPEG 2000 -------------------------------------------------------------------------


def box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload) + 8) + kind + payload


def full(kind: bytes, version: int, payload: bytes) -> bytes:
    return box(kind, bytes([version, 0, 0, 0]) + payload)


def j2seg(code: int, payload: bytes) -> bytes:
    return struct.pack(">HH", code, len(payload) + 2) + payload


def codestream(
    size: tuple[int, int] = (300, 400), comps: int = 3, bits: int = 8, rev: int = 1, mct: int = 1
) -> bytes:
    rows, columns = size
    siz = struct.pack(">HIIIIIIIIH", 0, columns + 10, rows + 4, 10, 4, columns, rows, 0, 0, comps)
    siz += bytes([bits - 1, 1, 1]) * comps
    cod = bytes([0, 0, 0, 1, mct, 5, 4, 4, 0, rev])
    main = j2seg(0xFF51, siz) + j2seg(0xFF52, cod) + j2seg(0xFF5C, b"\x40" + bytes(16))
    tile = j2seg(0xFF90, struct.pack(">HIBB", 0, 0, 0, 1)) + b"\xff\x93" + bytes(range(40))
    return b"\xff\x4f" + main + tile + b"\xff\xd9"


def jp2(stream: bytes, open_ended: bool = False) -> bytes:
    signature = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
    ftyp = box(b"ftyp", b"jp2 \x00\x00\x00\x00jp2 ")
    ihdr = box(b"ihdr", struct.pack(">IIHBBBB", 300, 400, 3, 7, 7, 0, 0))
    jp2h = box(b"jp2h", ihdr + box(b"colr", b"\x01\x00\x00\x00\x00\x00\x10"))
    jp2c = b"\x00\x00\x00\x00jp2c" + stream if open_ended else box(b"jp2c", stream)
    return signature + ftyp + jp2h + jp2c


# --- builders: MPEG-2 ----------------------------------------------------------------------------


def bits(*fields: tuple[int, int]) -> bytes:
    value, total = 0, 0
    for field, length in fields:
        value, total = value << length | field, total + length
    assert total % 8 == 0
    return value.to_bytes(total // 8, "big")


def gop_header(seconds: int, pictures: int, drop: bool = False) -> bytes:
    """A GOP header at time code ``seconds`` (as hh:mm:ss) plus ``pictures``, closed GOP."""
    hours, minutes, secs = seconds // 3600, seconds // 60 % 60, seconds % 60
    code = bits(
        (int(drop), 1), (hours, 5), (minutes, 6), (1, 1), (secs, 6), (pictures, 6),
        (1, 1), (0, 1), (0, 5),
    )  # fmt: skip
    return b"\x00\x00\x01\xb8" + code


def mpeg2(
    size: tuple[int, int] = (576, 720),
    rate: int = 3,
    level: int = 8,
    ext: bool = True,
    *,
    gops: list[tuple[int, int]] | None = None,
    pictures: int = 1,
    drop: bool = False,
) -> bytes:
    rows, columns = size
    header = b"\x00\x00\x01\xb3" + bits(
        (columns & 0xFFF, 12), (rows & 0xFFF, 12), (2, 4), (rate, 4),
        (20000, 18), (1, 1), (112, 10), (0, 1), (0, 1), (0, 1),
    )  # fmt: skip
    extension = b"\x00\x00\x01\xb5" + bits(
        (1, 4), (0x40 | level, 8), (0, 1), (1, 2), (columns >> 12, 2), (rows >> 12, 2),
        (0, 12), (1, 1), (0, 8), (0, 1), (0, 2), (0, 5),
    )  # fmt: skip
    picture = b"\x00\x00\x01\x00\x00\x0f\xff\xf8" + bytes(100)
    body = b"".join(
        gop_header(*at, drop) + picture * pictures for at in ([(0, 0)] if gops is None else gops)
    )
    return header + (extension if ext else b"") + (body or picture) + b"\x00\x00\x01\xb7"


def program_stream(payload: bytes, padding: int) -> bytes:
    pack = b"\x00\x00\x01\xba\x44\x00\x04\x00\x04\x01\x01\x89\xc3\xf8"
    return pack + b"\xff" * padding + b"\x00\x00\x01\xe0\x00\x00\x80\x00\x00" + payload


# --- builders: MP4 -------------------------------------------------------------------------------

MATRIX = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)


def visual_entry(codec: bytes, size: tuple[int, int], config: bytes) -> bytes:
    columns, rows = size
    fields = bytes(6) + struct.pack(">H", 1) + bytes(16) + struct.pack(">HH", columns, rows)
    fields += struct.pack(">II", 0x480000, 0x480000) + bytes(4) + struct.pack(">H", 1)
    return box(codec, fields + bytes(32) + struct.pack(">Hh", 24, -1) + config)


def avcc(profile: int = 100, level: int = 40) -> bytes:
    return box(b"avcC", bytes([1, profile, 0, level, 0xFF, 0xE0, 0]))


def hvcc(profile: int = 1, bit_depth: int = 8) -> bytes:
    record = bytes([1, profile]) + bytes(10) + bytes([120, 0xF0, 0, 0xFC, 0xFD])
    return box(b"hvcC", record + bytes([0xF8 | (bit_depth - 8), 0xF8 | (bit_depth - 8)]) + bytes(4))


def trak(
    handler: bytes, entry: bytes, frames: int, timescale: int, duration: int, *, v1: bool = False
) -> bytes:
    if v1:
        times = struct.pack(">QQIIQ", 0, 0, 1, 0, duration)
        mdhd = full(b"mdhd", 1, struct.pack(">QQIQHH", 0, 0, timescale, duration, 0, 0))
    else:
        times = struct.pack(">5I", 0, 0, 1, 0, duration)
        mdhd = full(b"mdhd", 0, struct.pack(">4IHH", 0, 0, timescale, duration, 0, 0))
    display = struct.pack(">II", 999 << 16, 777 << 16)  # what a player shows, not the coded size
    tkhd = full(b"tkhd", 1 if v1 else 0, times + bytes(16) + MATRIX + display)
    hdlr = full(b"hdlr", 0, struct.pack(">I4s", 0, handler) + bytes(12) + b"handler\x00")
    stsd = full(b"stsd", 0, struct.pack(">I", 1) + entry)
    stsz = full(b"stsz", 0, struct.pack(">II", 0, frames) + struct.pack(">I", 1000) * frames)
    stbl = box(b"stbl", stsd + stsz + full(b"stco", 0, struct.pack(">II", 1, 48)))
    minf = box(b"minf", box(b"vmhd", bytes(12)) + stbl)
    return box(b"trak", tkhd + box(b"mdia", mdhd + hdlr + minf))


def moov(entry: bytes | None = None, frames: int = 30, v1: bool = False) -> bytes:
    video = entry if entry is not None else visual_entry(b"avc1", (640, 480), avcc())
    sound = box(b"mp4a", bytes(28))
    tracks = trak(b"soun", sound, 47, 48000, 48000)
    tracks += trak(b"vide", video, frames, 15360, 15360, v1=v1)
    return box(b"moov", full(b"mvhd", 0, bytes(96)) + tracks + box(b"udta", b"\x00" * 20))


FTYP = box(b"ftyp", b"isom\x00\x00\x02\x00isomiso2avc1mp41")
MDAT = box(b"mdat", bytes(1000))


# --- builders: documents, models, PNG, GIF -------------------------------------------------------

PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
CDA = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<?xml-stylesheet type="text/xsl" href="cda.xsl"?>\n'
    b'<!-- a discharge letter -->\n<ClinicalDocument xmlns="urn:hl7-org:v3" '
    b'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">\n<realmCode code="DE"/>\n'
    + b"<title>Entlassbrief</title>\n" * 5000
    + b"</ClinicalDocument>\n"
)
STL_ASCII = (
    b"solid cube\n  facet normal 0 0 1\n    outer loop\n      vertex 0 0 0\n      vertex 1 0 0\n"
    b"      vertex 0 1 0\n    endloop\n  endfacet\nendsolid cube\n"
)
STL_BINARY = b"solid exported by a CAD tool".ljust(80, b" ") + struct.pack("<I", 2) + bytes(100)
OBJ = b"# Blender\nmtllib cube.mtl\no Cube\nv 1.0 1.0 -1.0\nv 1.0 -1.0 -1.0\nvn 0 1 0\nf 1 2 3\n"
MTL = b"# Blender MTL\n\nnewmtl Material\nNs 250\nKa 1 1 1\nKd 0.8 0.8 0.8\nillum 2\n"
IHDR = b"IHDR" + struct.pack(">IIBBBBB", 320, 200, 8, 2, 0, 0, 0)
PNG = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + IHDR + struct.pack(">I", zlib.crc32(IHDR))
GIF = b"GIF89a" + struct.pack("<HH", 64, 48) + b"\xf7\x00\x00" + bytes(50) + b";"


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def image(
    kind: str,
    ts: str,
    size: tuple[int, int],
    pixel: tuple[int, int, str],
    *,
    lossy: bool = True,
    file: bytes = b"",
) -> Media:
    """The expected Media of an image; ``pixel``: samples per pixel, bits stored, photometric.

    A .jp2 ``file`` gives the codestream range: from after the jp2c box header to the end.
    """
    media_type = {"jpeg": "image/jpeg", "jp2": "image/jp2", "j2c": "image/j2c"}[kind]
    kind = "jp2" if kind == "j2c" else kind
    rows, columns = size
    found = Media(kind, media_type, TS + ts, rows, columns, *pixel, lossy=lossy)
    if not file:
        return found
    start = file.index(b"jp2c") + 4
    return replace(found, codestream_offset=start, codestream_length=len(file) - start)


# --- images --------------------------------------------------------------------------------------

JP2 = jp2(codestream())
JP2_LOSSY = jp2(codestream(rev=0))
JP2_OPEN = jp2(codestream(comps=1, bits=12, rev=0), open_ended=True)
JP2_NO_MCT = jp2(codestream(mct=0))

IMAGES = {
    "baseline.jpg": (jpeg(), image("jpeg", "50", (480, 640), (3, 8, "YBR_FULL_422"))),
    "grey.jpg": (
        jpeg(components=b"\x01", sampling=b"\x11"),
        image("jpeg", "50", (480, 640), (1, 8, "MONOCHROME2")),
    ),
    "not_subsampled.jpeg": (
        jpeg(sampling=b"\x11\x11\x11"),
        image("jpeg", "50", (480, 640), (3, 8, "YBR_FULL_422")),
    ),
    "adobe_rgb.jpg": (jpeg(app=adobe(0)), image("jpeg", "50", (480, 640), (3, 8, "RGB"))),
    "adobe_ycc.jpg": (jpeg(app=adobe(1)), image("jpeg", "50", (480, 640), (3, 8, "YBR_FULL_422"))),
    "ids_rgb.jpg": (jpeg(components=b"RGB"), image("jpeg", "50", (480, 640), (3, 8, "RGB"))),
    "extended.jpg": (
        jpeg(0xC1, (1024, 1280), components=b"\x01", sampling=b"\x11", precision=12),
        image("jpeg", "51", (1024, 1280), (1, 12, "MONOCHROME2")),
    ),
    "progressive.jpg": (jpeg(0xC2), image("jpeg", "55", (480, 640), (3, 8, "YBR_FULL_422"))),
    "lossless_sv1.jpg": (
        jpeg(0xC3, (512, 512), components=b"\x01", sampling=b"\x11", precision=16, predictor=1),
        image("jpeg", "70", (512, 512), (1, 16, "MONOCHROME2"), lossy=False),
    ),
    "lossless_sv6.jpg": (
        jpeg(0xC3, (512, 512), sampling=b"\x11\x11\x11", predictor=6),
        image("jpeg", "57", (512, 512), (3, 8, "RGB"), lossy=False),
    ),
    "padded.jpg": (jpeg() + bytes(300), image("jpeg", "50", (480, 640), (3, 8, "YBR_FULL_422"))),
    "named_wrongly.png": (jpeg(), image("jpeg", "50", (480, 640), (3, 8, "YBR_FULL_422"))),
    "lossless.jp2": (
        JP2,
        image("jp2", "90", (300, 400), (3, 8, "YBR_RCT"), lossy=False, file=JP2),
    ),
    "lossy.jp2": (
        JP2_LOSSY,
        image("jp2", "91", (300, 400), (3, 8, "YBR_ICT"), file=JP2_LOSSY),
    ),
    "open_ended.jp2": (
        JP2_OPEN,
        image("jp2", "91", (300, 400), (1, 12, "MONOCHROME2"), file=JP2_OPEN),
    ),
    "no_mct.jp2": (
        JP2_NO_MCT,
        image("jp2", "90", (300, 400), (3, 8, "RGB"), lossy=False, file=JP2_NO_MCT),
    ),
    "raw.j2c": (
        codestream((2048, 1536), comps=1, bits=16),
        image("j2c", "90", (2048, 1536), (1, 16, "MONOCHROME2"), lossy=False),
    ),
    "picture.png": (PNG, Media("png", "image/png", None, rows=200, columns=320)),
    "picture.gif": (GIF, Media("gif", "image/gif", None, rows=48, columns=64)),
}


@pytest.mark.parametrize("name", IMAGES)
def test_images_give_their_pixel_description(name: str, tmp_path: Path) -> None:
    data, expected = IMAGES[name]
    assert detect(write(tmp_path, name, data)) == expected


# --- documents and models ------------------------------------------------------------------------

DOCUMENTS = {
    "report.pdf": (PDF, "pdf", "application/pdf"),
    "scan.PDF": (b"\xef\xbb\xbf" + PDF + b"\n" * 500, "pdf", "application/pdf"),
    "letter.xml": (CDA, "cda", "text/xml"),
    "letter.txt": (CDA, "cda", "text/xml"),
    "letter16.xml": (CDA.replace(b"UTF-8", b"UTF-16").decode().encode("utf-16"), "cda", "text/xml"),
    "cube.stl": (STL_ASCII, "stl", "model/stl"),
    "binary.stl": (STL_BINARY, "stl", "model/stl"),
    "binary_unnamed": (STL_BINARY, "stl", "model/stl"),
    "cube.obj": (OBJ, "obj", "model/obj"),
    "cube.mtl": (MTL, "mtl", "model/mtl"),
    "material.obj": (MTL, "mtl", "model/mtl"),
}


@pytest.mark.parametrize("name", DOCUMENTS)
def test_documents_and_models_are_recognised(name: str, tmp_path: Path) -> None:
    data, kind, media_type = DOCUMENTS[name]
    assert detect(write(tmp_path, name, data)) == Media(kind, media_type, None)


def cda(body: bytes, encoding: str = "utf-8") -> bytes:
    head = f'<?xml version="1.0" encoding="{encoding}"?>\n'
    root = b'<ClinicalDocument xmlns="urn:hl7-org:v3">\n<typeId root="2.16.840.1.113883.1.3"/>\n'
    text = head.encode() + root + body + b"<title>Brief</title>\n</ClinicalDocument>\n"
    return text if encoding == "utf-8" else text.decode().encode(encoding)


DOC_ID = b'<id root="2.16.840.1.113883.19.5" extension="c266"/>\n'
CDA_IDS = {
    "root and extension": (cda(DOC_ID), "2.16.840.1.113883.19.5^c266"),
    "root only": (cda(b'<id root="1.2.3.4"/>'), "1.2.3.4"),
    "utf-16": (cda(DOC_ID, "utf-16"), "2.16.840.1.113883.19.5^c266"),
    "after 500 KiB": (
        cda(b"<!--" + b"x" * 500_000 + b"-->" + DOC_ID),
        "2.16.840.1.113883.19.5^c266",
    ),
    "after 1 MiB": (cda(b"<!--" + b"x" * 1_100_000 + b"-->" + DOC_ID), None),
    "only nested ids": (cda(b'<recordTarget><id root="9.9"/></recordTarget>'), None),
    "id without root": (cda(b'<id extension="c266"/>'), None),
    "damaged xml": (cda(b"<code></title>" + DOC_ID), None),
}


@pytest.mark.parametrize("case", CDA_IDS)
def test_the_id_of_a_cda_document(case: str, tmp_path: Path) -> None:
    data, expected = CDA_IDS[case]
    found = detect(write(tmp_path, "letter.xml", data))
    assert (found.kind, found.document_id) == ("cda", expected)


# --- video ---------------------------------------------------------------------------------------


def video(
    ts: str,
    size: tuple[int, int],
    frames: int | None,
    frame_ms: float,
    *,
    bits: int = 8,
    media_type: str | None = None,
) -> Media:
    rows, columns = size
    kind = "mpeg" if ts in ("100", "101") else "mp4"
    media_type = media_type or ("video/mpeg" if kind == "mpeg" else "video/mp4")
    duration = (1.0 if kind == "mp4" else frames * frame_ms / 1000) if frames else None
    return Media(
        kind, media_type, TS + ts, rows, columns, 3, bits, "YBR_PARTIAL_420", True,
        frames, frame_ms, duration,
    )  # fmt: skip


HEVC_MAIN10 = visual_entry(b"hvc1", (3840, 2160), hvcc(2, 10))
WIDE = box(b"wide", b"")
VIDEOS = {
    "sd.m2v": (mpeg2(), video("100", (576, 720), 1, 40.0)),
    "ntsc.mpg": (mpeg2((480, 720), rate=4), video("100", (480, 720), 1, 1001 / 30)),
    "hd_by_level.mpg": (mpeg2((1080, 1920), 3, level=4), video("101", (1080, 1920), 1, 40.0)),
    "hd_by_size.mpg": (mpeg2((1080, 1920), 6, ext=False), video("101", (1080, 1920), 1, 20.0)),
    "program.mpg": (
        program_stream(mpeg2(), 65_534 - 23),  # the sequence header straddles two reads
        video("100", (576, 720), 1, 40.0),
    ),
    "timecode.m2v": (
        mpeg2(gops=[(0, 0), (2, 5)], pictures=3),  # 2 s 5 pictures at 25/s, then 3 pictures
        video("100", (576, 720), 58, 40.0),
    ),
    "drop_frame.m2v": (  # 29.97/s, 00:10:00;00 drop-frame: 10 min * 60 * 30 - 9 * 2, then 3
        mpeg2(rate=4, gops=[(0, 0), (600, 0)], pictures=3, drop=True),
        video("100", (576, 720), 18_000 - 18 + 3, 1001 / 30),
    ),
    "no_time_codes.m2v": (
        mpeg2(gops=[(0, 0), (0, 0)]),  # a later GOP at 00:00:00:00: time codes not kept
        video("100", (576, 720), None, 40.0),
    ),
    "no_gop.m2v": (mpeg2(gops=[]), video("100", (576, 720), None, 40.0)),
    "faststart.mp4": (FTYP + moov() + MDAT, video("102", (480, 640), 30, 1000 / 30)),
    "moov_last.mp4": (FTYP + MDAT + moov(), video("102", (480, 640), 30, 1000 / 30)),
    "mdat_to_end.mp4": (
        FTYP + moov(v1=True) + b"\x00\x00\x00\x00mdat" + bytes(500),
        video("102", (480, 640), 30, 1000 / 30),
    ),
    "level42.mp4": (
        FTYP + moov(visual_entry(b"avc1", (1920, 1080), avcc(100, 42))),
        video("104", (1080, 1920), 30, 1000 / 30),
    ),
    "main.mp4": (
        FTYP + moov(visual_entry(b"avc3", (1280, 720), avcc(77, 31)), frames=25),
        video("104", (720, 1280), 25, 40.0),
    ),
    "hevc.mp4": (
        FTYP + moov(visual_entry(b"hev1", (1920, 1080), hvcc(1))),
        video("107", (1080, 1920), 30, 1000 / 30),
    ),
    "hevc10.mp4": (
        FTYP + moov(HEVC_MAIN10, frames=60),
        video("108", (2160, 3840), 60, 1000 / 60, bits=10),
    ),
    "coded_size_unset.mov": (
        box(b"ftyp", b"qt  \x00\x00\x02\x00qt  ") + moov(visual_entry(b"avc1", (0, 0), avcc())),
        video("102", (777, 999), 30, 1000 / 30, media_type="video/quicktime"),
    ),
    "old.mov": (
        WIDE + MDAT + moov(),
        video("102", (480, 640), 30, 1000 / 30, media_type="video/quicktime"),
    ),
}


@pytest.mark.parametrize("name", VIDEOS)
def test_videos_give_their_pixel_description(name: str, tmp_path: Path) -> None:
    data, expected = VIDEOS[name]
    assert detect(write(tmp_path, name, data)) == expected


# --- what is refused -----------------------------------------------------------------------------

HTML = b"<html><body>Not found</body></html>\n"
JPEG = jpeg()
MP4 = FTYP + MDAT + moov()
REFUSED = {
    "page.jpg": (HTML, "named .jpg but is not a JPEG image .it does not start like one.$"),
    "page.xml": (HTML, "named .xml but is not a CDA document"),
    "other.xml": (b'<?xml version="1.0"?><ClinicalDocument/>', "named .xml but is not a CDA"),
    "notes.obj": (b"hello world\n", "named .obj but is not an OBJ model"),
    "cube.txt": (OBJ, "not a file type stowd can send: .* ends with .txt; .*pdf, cda, stl"),
    "blob.bin": (bytes(range(200, 256)), "can send: the content does not start like any type"),
    "blob": (b"\x01\x02", "its name has no extension; stowd sends these types"),
    "empty.pdf": (b"", "the file is empty"),
    "cut.pdf": (PDF[:-10], "the PDF is truncated"),
    "cut.jpg": (JPEG[:-2] + b"\x11" * 1000, "truncated or damaged JPEG: .*FF D9"),
    "header_only.jpg": (b"\xff\xd8" + JFIF, "truncated or damaged JPEG: it ends before"),
    "no_sof.jpg": (b"\xff\xd8" + DQT + b"\xff\xd9", "truncated or damaged JPEG: it has no frame"),
    "zero_rows.jpg": (jpeg(size=(0, 640)), "truncated or damaged JPEG: .*zero width or height"),
    "garbage_marker.jpg": (b"\xff\xd8" + DQT + b"\x00\x00" + JPEG[2:], "no marker at byte"),
    "arithmetic.jpg": (jpeg(0xC9), "arithmetic-coded sequential coding .SOF9.; DICOM has no"),
    "hierarchical.jpg": (jpeg(0xC5), "hierarchical"),
    "cmyk.jpg": (jpeg(components=b"\x01\x02\x03\x04", sampling=bytes(4)), "4 colour components"),
    "cut.jp2": (jp2(codestream())[:-30], "JPEG 2000 image is truncated or damaged: its 'jp2c' box"),
    "cut_open.jp2": (jp2(codestream(), open_ended=True)[:-30], "end-of-codestream marker"),
    "no_cod.j2c": (b"\xff\x4f" + j2seg(0xFF51, bytes(40)) + b"\xff\xd9", "no SIZ or COD marker"),
    "audio.mpg": (program_stream(b"\xc0" * 100, 10), "no video sequence header in its first 4 MiB"),
    "cut_header.m2v": (mpeg2()[:10], "MPEG-2 video is truncated or damaged: a header ends"),
    "bad_rate.m2v": (mpeg2(rate=14), "frame rate code 14 is not defined"),
    "high_profile.m2v": (
        mpeg2().replace(b"\x00\x00\x01\xb5\x14", b"\x00\x00\x01\xb5\x11"),
        "uses the High profile",
    ),
    "cut_moov.mp4": (MP4[:-40], "the video is truncated or damaged: its 'moov' box at byte"),
    "no_moov.mp4": (FTYP + MDAT, "the video is truncated or damaged: it has no 'moov' box"),
    "cut_mdat.mp4": (FTYP + MDAT[:500], "the video is truncated or damaged: its 'mdat' box"),
    "audio_only.mp4": (
        FTYP + box(b"moov", trak(b"soun", box(b"mp4a", bytes(28)), 47, 48000, 48000)),
        "no video track",
    ),
    "mpeg4.mp4": (FTYP + moov(visual_entry(b"mp4v", (640, 480), b"")), "'mp4v' .MPEG-4 Part 2"),
    "av1.mp4": (FTYP + moov(visual_entry(b"av01", (640, 480), b"")), "'av01' .AV1., which DICOM"),
    "vp9.mp4": (FTYP + moov(visual_entry(b"vp09", (640, 480), b"")), "'vp09' .VP9."),
    "high10.mp4": (FTYP + moov(visual_entry(b"avc1", (640, 480), avcc(110))), "High 10 profile"),
    "no_avcc.mp4": (FTYP + moov(visual_entry(b"avc1", (640, 480), b"")), "no 'avcC' record"),
    "rext.mp4": (FTYP + moov(visual_entry(b"hvc1", (640, 480), hvcc(4))), "Range Extensions"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_unusable_files_are_refused_with_a_reason(name: str, tmp_path: Path) -> None:
    data, message = REFUSED[name]
    with pytest.raises(FileProblem, match=message):
        detect(write(tmp_path, name, data))


def test_a_missing_file_or_a_folder_has_vanished(tmp_path: Path) -> None:
    with pytest.raises(FileVanished, match="removed"):
        detect(tmp_path / "gone.pdf")
    with pytest.raises(FileVanished, match="folder"):
        detect(tmp_path)


def test_a_file_stowd_may_not_read_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(path: Path) -> BinaryIO:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(probe, "_open", refuse)
    with pytest.raises(FileUnreadable, match="permission denied"):
        detect(write(tmp_path, "report.pdf", PDF))


# --- bounded reading -----------------------------------------------------------------------------


class CountingFile(io.FileIO):
    """A raw file that counts the bytes read from the disk."""

    total = 0

    def readinto(self, buffer: WriteableBuffer) -> int | None:
        count = super().readinto(buffer)
        CountingFile.total += count or 0
        return count


def counting_open(path: Path) -> BinaryIO:
    return io.BufferedReader(CountingFile(path))


def sparse_mp4(path: Path, mdat_payload: int) -> None:
    """ftyp, a 64-bit mdat of ``mdat_payload`` bytes (a hole: no disk used), then moov."""
    with path.open("wb") as fp:
        fp.write(FTYP + struct.pack(">I4sQ", 1, b"mdat", mdat_payload + 16))
        fp.truncate(len(FTYP) + 16 + mdat_payload)
        fp.seek(0, os.SEEK_END)
        fp.write(moov(frames=3000))


def test_a_5_gib_video_is_read_by_its_headers_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "long.mp4"
    sparse_mp4(path, 5 * GIB)
    monkeypatch.setattr(probe, "_open", counting_open)
    CountingFile.total = 0
    found = detect(path)
    assert path.stat().st_size > 5 * GIB
    assert (found.transfer_syntax, found.rows, found.columns, found.frames) == (
        TS + "102",
        480,
        640,
        3000,
    )
    assert CountingFile.total < 256 * 1024


def test_the_scan_of_a_large_jpeg_is_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = JPEG[:-2] + os.urandom(8 * 2**20).replace(b"\xff", b"\x00") + b"\xff\xd9"
    path = write(tmp_path, "large.jpg", data)
    monkeypatch.setattr(probe, "_open", counting_open)
    CountingFile.total = 0
    assert detect(path).rows == 480
    assert CountingFile.total < 256 * 1024


def test_a_large_pdf_is_read_at_its_start_and_end_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "big.pdf"
    with path.open("wb") as fp:
        fp.write(PDF[:20])
        fp.truncate(GIB)
        fp.seek(0, os.SEEK_END)
        fp.write(b"\n%%EOF\n")
    monkeypatch.setattr(probe, "_open", counting_open)
    CountingFile.total = 0
    assert detect(path).kind == "pdf"
    assert CountingFile.total < 256 * 1024


def test_a_long_mpeg2_video_is_read_at_its_start_and_end_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "long.m2v"
    with path.open("wb") as fp:
        fp.write(mpeg2())
        fp.truncate(GIB)  # a hole: no disk used
        fp.seek(0, os.SEEK_END)
        fp.write(mpeg2(gops=[(3600, 7)], pictures=2)[12:])  # without a sequence header
    monkeypatch.setattr(probe, "_open", counting_open)
    CountingFile.total = 0
    found = detect(path)
    assert found.frames == 3600 * 25 + 7 + 2
    assert CountingFile.total < probe.MPEG_SCAN + 256 * 1024


def test_a_truncated_sparse_video_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cut.mp4"
    sparse_mp4(path, 5 * GIB)
    os.truncate(path, path.stat().st_size - 100)
    with pytest.raises(FileProblem, match="truncated or damaged: its 'moov' box"):
        detect(path)


# --- real files made by ffmpeg (optional) --------------------------------------------------------


FFMPEG = Path("/usr/bin/ffmpeg")
H264 = ("-c:v", "libx264", "-pix_fmt", "yuv420p", "-profile:v", "high")
HEVC = ("-c:v", "libx265", "-pix_fmt", "yuv420p", "-x265-params", "log-level=error")
MPEG2 = ("-c:v", "mpeg2video",)  # fmt: skip


def require_ffmpeg() -> None:
    if FFMPEG.exists():
        return
    if os.environ.get("CI") == "true":  # .ci/run installs it: CI must never skip these
        pytest.fail(f"CI=true but {FFMPEG} is not installed", pytrace=False)
    pytest.skip(f"{FFMPEG} is not installed")


def ffmpeg_clip(
    path: Path, codec: tuple[str, ...], size: str = "320x240", seconds: float = 1
) -> Path:
    """A test-pattern video at 25 frames a second, made by ffmpeg (its container from the name)."""
    require_ffmpeg()
    source = ["-f", "lavfi", "-i", f"testsrc=size={size}:rate=25", "-t", str(seconds)]
    command = [str(FFMPEG), "-v", "error", "-y", *source, *codec, str(path)]
    subprocess.run(command, check=True)
    return path


def test_files_made_by_ffmpeg(tmp_path: Path) -> None:
    clip = detect(ffmpeg_clip(tmp_path / "clip.mp4", H264))
    assert (clip.rows, clip.columns, clip.frames) == (240, 320, 25)
    assert clip.transfer_syntax == TS + "102"
    assert clip.frame_time_ms == pytest.approx(40.0)
    program = detect(ffmpeg_clip(tmp_path / "clip.mpg", MPEG2))
    assert (program.rows, program.columns, program.transfer_syntax) == (240, 320, TS + "100")
    assert program.frame_time_ms == pytest.approx(40.0)
    assert program.frames == 25  # from the last GOP's time code
    assert program.duration_s == pytest.approx(1.0)


# --- cut short, too large (issue 4) -----------------------------------------------------------


def test_a_program_stream_counts_frames_across_packet_boundaries(tmp_path: Path) -> None:
    assert detect(ffmpeg_clip(tmp_path / "two.mpg", MPEG2, seconds=2)).frames == 50
    assert detect(ffmpeg_clip(tmp_path / "five.mpg", MPEG2, seconds=5)).frames == 125


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.95])
def test_a_program_stream_cut_short_is_refused(tmp_path: Path, fraction: float) -> None:
    data = ffmpeg_clip(tmp_path / "clip.mpg", MPEG2, seconds=2).read_bytes()
    cut = write(tmp_path, "cut.mpg", data[: int(len(data) * fraction)])
    with pytest.raises(FileProblem, match="last packet runs past the end of the file"):
        detect(cut)


def test_a_faststart_mp4_cut_short_is_refused(tmp_path: Path) -> None:
    clip = ffmpeg_clip(tmp_path / "fast.mp4", (*H264, "-movflags", "+faststart"))
    data = clip.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")  # the index comes first
    assert detect(clip).frames == 25
    cut = write(tmp_path, "cut.mp4", data[: int(len(data) * 0.6)])
    with pytest.raises(FileProblem, match=r"'mdat' box at byte .* runs"):
        detect(cut)


def test_text_models_and_cda_documents_cut_short_are_refused(tmp_path: Path) -> None:
    stl = write(tmp_path, "cut.stl", STL_ASCII[: len(STL_ASCII) // 2])
    with pytest.raises(FileProblem, match="STL model is truncated"):
        detect(stl)
    document = cda(b"<id root='1.2.3'/>")
    cut = write(tmp_path, "cut.xml", document[: document.index(b"<title>")])
    with pytest.raises(FileProblem, match="CDA document is truncated"):
        detect(cut)
    assert detect(write(tmp_path, "whole.xml", document)).kind == "cda"


def test_an_image_wider_than_dicom_allows_is_refused_before_decoding(tmp_path: Path) -> None:
    header = b"IHDR" + struct.pack(">IIBBBBB", 70_000, 2, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + header
    path = write(tmp_path, "wide.png", png + struct.pack(">I", zlib.crc32(header)))
    with pytest.raises(FileProblem, match="70000 x 2 pixels, too large for DICOM"):
        detect(path)
