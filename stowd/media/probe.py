"""What a bulkdata file (document, image, video, 3D model) holds, read from its headers only.

``detect`` looks at the content first (magic bytes) and the file name second, and reads only
the headers it needs, with bounded reads: the JPEG markers up to the first scan, the JPEG 2000
main header; the videos (the MPEG-2 sequence header, the MP4 ``moov`` box) are read by
``stowd.video``, and ``stowd.mediaread`` holds the ``Media`` record and the readers both share.
Nothing is decoded and no DICOM is built here. A file that cannot be used raises
``FileProblem`` with a reason written for a PACS administrator.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, TypeGuard
from xml.etree import ElementTree

from stowd import dropped
from stowd.errors import FileProblem, UnknownType, reading
from stowd.media import video
from stowd.media.reading import (
    DAMAGED,
    HEAD,
    MAX_BOXES,
    MAX_SIDE,
    TS,
    Media,
    TruncatedHeader,
    boxes,
    check_size,
    read_at,
    read_exact,
)
from stowd.media.video import MPEG_SCAN, STSD_LIMIT

# the names that moved to mediaread and video stay importable from here
__all__ = ["HEAD", "MAX_BOXES", "MAX_SIDE", "MPEG_SCAN", "STSD_LIMIT", "Media"]

TYPES: tuple[str, ...] = (
    "pdf", "cda", "stl", "obj", "mtl", "jpeg", "jp2", "png", "gif", "mpeg", "mp4",
)  # fmt: skip

CDA_HEADER = 1024 * 1024  # a CDA document's id (ClinicalDocument/id) is looked for this far
J2K_HEADER = 256 * 1024  # the JPEG 2000 main header (SIZ, COD) must fit in this
TAIL = 4096  # the end of a JPEG is looked for here (trailing zero padding is tolerated)
MAX_SEGMENTS = 4096  # more JPEG marker segments than this before the scan is damage

_JP2_MAGIC = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_J2K_MAGIC = b"\xff\x4f\xff\x51"
_J2K = "the JPEG 2000 image"
_HL7 = "{urn:hl7-org:v3}"

_Parser = Callable[[BinaryIO, int, bytes], Media]

_MEDIA_TYPES = {
    "pdf": "application/pdf",
    "cda": "text/xml",
    "stl": "model/stl",
    "obj": "model/obj",
    "mtl": "model/mtl",
}
_NAMES = {
    "pdf": "a PDF document",
    "cda": "a CDA document (HL7 ClinicalDocument XML)",
    "stl": "an STL model",
    "obj": "an OBJ model",
    "mtl": "an MTL material file",
    "jpeg": "a JPEG image",
    "jp2": "a JPEG 2000 image",
    "png": "a PNG image",
    "gif": "a GIF image",
    "mpeg": "an MPEG-2 video",
    "mp4": "an MP4 or QuickTime video",
}
_EXTENSIONS = {
    "pdf": ("pdf",),
    "cda": ("xml", "cda"),
    "stl": ("stl",),
    "obj": ("obj",),
    "mtl": ("mtl",),
    "jpeg": ("jpg", "jpeg", "jpe", "jfif"),
    "jp2": ("jp2", "j2k", "j2c", "jpc", "jpf", "jpx"),
    "png": ("png",),
    "gif": ("gif",),
    "mpeg": ("mpg", "mpeg", "m2v", "mpv", "m2p", "vob"),
    "mp4": ("mp4", "m4v", "mov", "qt"),
}
_BY_EXTENSION = {f".{ext}": kind for kind, exts in _EXTENSIONS.items() for ext in exts}
_SIGNATURES = (
    (b"\xff\xd8\xff", "jpeg"),
    (_JP2_MAGIC, "jp2"),
    (_J2K_MAGIC, "jp2"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"\x00\x00\x01\xba", "mpeg"),
    (b"\x00\x00\x01\xb3", "mpeg"),
)
_QT_TOP = {b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"}
_OBJ_WORDS = {
    "v", "vt", "vn", "vp", "f", "l", "p", "o", "g", "s", "mtllib", "usemtl",
    "cstype", "deg", "curv", "curv2", "surf", "parm", "end", "bmat", "step",
}  # fmt: skip
_MTL_WORDS = {
    "newmtl", "Ka", "Kd", "Ks", "Ke", "Ns", "Ni", "d", "Tr", "Tf", "illum", "sharpness",
    "map_Ka", "map_Kd", "map_Ks", "map_Ke", "map_Ns", "map_d", "map_bump", "bump", "disp",
    "decal", "refl", "Pr", "Pm", "Ps", "Pc", "Pcr", "aniso", "anisor", "norm",
}  # fmt: skip


def detect(path: Path) -> Media:
    """Read the headers of ``path``; raise ``FileProblem`` when it cannot be used."""
    with reading(path), _open(path) as fp:
        size = os.fstat(fp.fileno()).st_size
        if size == 0:
            raise FileProblem("the file is empty (0 bytes)")
        return _detect_open(fp, size, path.suffix.lower())


def _open(path: Path) -> BinaryIO:
    """Open ``path`` for reading (one seam: the tests count the bytes read through it)."""
    return dropped.open_file(path)


def _detect_open(fp: BinaryIO, size: int, ext: str) -> Media:
    head = fp.read(HEAD)
    kind = _sniff(head, size, ext)
    if kind is None:
        raise _unrecognised(ext)
    try:
        return _PARSERS[kind](fp, size, head)
    except (TruncatedHeader, struct.error, IndexError) as exc:
        reason = DAMAGED.get(kind, "the file is damaged")
        raise FileProblem(f"{reason}: a header ends before all its fields") from exc


# --- recognising a file ----------------------------------------------------------------------


def _sniff(head: bytes, size: int, ext: str) -> str | None:
    if b"%PDF-" in head[:1024]:
        return "pdf"
    for magic, kind in _SIGNATURES:
        if head.startswith(magic):
            return kind
    if _is_mp4(head, size):
        return "mp4"
    if _is_cda(head):
        return "cda"
    if _is_stl(head, size, ext):
        return "stl"
    return _text_model(head) if ext in (".obj", ".mtl") else None


def _is_mp4(head: bytes, size: int) -> bool:
    if len(head) < 8:
        return False
    first, box = struct.unpack_from(">I4s", head)
    if box == b"ftyp":
        return True
    return box in _QT_TOP and (first in (0, 1) or 8 <= first <= size)


def _is_cda(head: bytes) -> bool:
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not text.startswith(b"<") and head[:2] not in (b"\xff\xfe", b"\xfe\xff"):
        return False
    return _xml_root(head) == f"{_HL7}ClinicalDocument"


def _xml_root(head: bytes) -> str | None:
    """The tag of the root element, if it starts within ``head`` (the rest may be cut)."""
    parser: ElementTree.XMLPullParser[ElementTree.Element] = ElementTree.XMLPullParser(["start"])
    try:
        parser.feed(head)
        for item in parser.read_events():
            element = item[-1]
            return element.tag if isinstance(element, ElementTree.Element) else None
    except ElementTree.ParseError:
        return None
    return None


def _is_stl(head: bytes, size: int, ext: str) -> bool:
    if len(head) >= 84:
        count = struct.unpack_from("<I", head, 80)[0]
        if (count or ext == ".stl") and size == 84 + 50 * count:
            return True
    return head.lstrip().startswith(b"solid") and b"facet" in head


def _text_model(head: bytes) -> str | None:
    """``obj`` or ``mtl`` when the first statements (after comments) are of that language."""
    if b"\x00" in head:
        return None
    lines = (line.strip() for line in head.decode("utf-8", "replace").splitlines())
    words = [line.split()[0] for line in lines if line and not line.startswith("#")][:5]
    if words and all(word in _OBJ_WORDS for word in words):
        return "obj"
    if words and all(word in _MTL_WORDS for word in words):
        return "mtl"
    return None


def _unrecognised(ext: str) -> FileProblem:
    """Why a file of no known type cannot be sent; never quoting its content (the file
    may be a link to a private file, or hold patient data)."""
    claimed = _BY_EXTENSION.get(ext)
    if claimed:
        return FileProblem(
            f"the file is named {ext} but is not {_NAMES[claimed]} (it does not start like one)"
        )
    named = f"its name ends with {ext}" if ext else "its name has no extension"
    return UnknownType(
        "not a file type stowd can send: the content does not start like any type stowd "
        f"knows and {named}; stowd sends these types: {', '.join(TYPES)}"
    )


# --- documents, PNG, GIF --------------------------------------------------------------------------


def _document(kind: str) -> _Parser:
    def parse(fp: BinaryIO, size: int, head: bytes) -> Media:
        return Media(kind, _MEDIA_TYPES[kind], None)

    return parse


def _cda(fp: BinaryIO, size: int, head: bytes) -> Media:
    tail = _tail_text(fp, size).replace(b"\x00", b"")  # UTF-16 text as ASCII
    if not tail.rstrip(b" \t\r\n").endswith(b"ClinicalDocument>"):
        raise FileProblem(
            "the CDA document is truncated: it does not end with </ClinicalDocument> (was it "
            "copied completely?)"
        )
    return Media("cda", "text/xml", None, document_id=_cda_id(fp))


def _stl(fp: BinaryIO, size: int, head: bytes) -> Media:
    binary = len(head) >= 84 and size == 84 + 50 * struct.unpack_from("<I", head, 80)[0]
    if not binary and b"endsolid" not in _tail_text(fp, size)[-1024:]:
        raise FileProblem(
            "the STL model is truncated: a text STL ends with 'endsolid' and this one does not "
            "(was it copied completely?)"
        )
    return Media("stl", _MEDIA_TYPES["stl"], None)


def _tail_text(fp: BinaryIO, size: int) -> bytes:
    """The last ``TAIL`` bytes without trailing white space and zero padding."""
    return read_at(fp, max(size - TAIL, 0), TAIL).rstrip(b"\x00 \t\r\n")


def _cda_id(fp: BinaryIO) -> str | None:
    """ClinicalDocument/id as ``root^extension``, if it is in the first ``CDA_HEADER`` bytes."""
    parser: ElementTree.XMLPullParser[ElementTree.Element] = ElementTree.XMLPullParser(
        ["start", "end"]
    )
    depth = 0
    fp.seek(0)
    for _ in range(CDA_HEADER // HEAD):
        chunk = fp.read(HEAD)
        if not chunk:
            return None
        try:
            parser.feed(chunk)
            for item in parser.read_events():
                event, element = item[0], item[-1]
                depth += 1 if event == "start" else -1
                if event == "start" and depth == 2 and _is_element(element, f"{_HL7}id"):
                    return _instance_identifier(element)
        except ElementTree.ParseError:
            return None
    return None


def _is_element(item: object, tag: str) -> TypeGuard[ElementTree.Element]:
    return isinstance(item, ElementTree.Element) and item.tag == tag


def _instance_identifier(element: ElementTree.Element) -> str | None:
    root, extension = element.get("root"), element.get("extension")
    if not root:
        return None
    return f"{root}^{extension}" if extension else root


def _pdf(fp: BinaryIO, size: int, head: bytes) -> Media:
    if b"%%EOF" not in read_at(fp, max(size - 1024, 0), 1024):
        raise FileProblem(
            "the PDF is truncated: it does not end with the %%EOF marker (was it copied "
            "completely?)"
        )
    return Media("pdf", "application/pdf", None)


def _png(fp: BinaryIO, size: int, head: bytes) -> Media:
    if head[12:16] != b"IHDR":
        raise FileProblem(f"{DAMAGED['png']}: it has no IHDR header chunk")
    columns, rows = struct.unpack_from(">II", head, 16)
    check_size("png", rows, columns)
    return Media("png", "image/png", None, rows=rows, columns=columns)


def _gif(fp: BinaryIO, size: int, head: bytes) -> Media:
    columns, rows = struct.unpack_from("<HH", head, 6)
    check_size("gif", rows, columns)
    return Media("gif", "image/gif", None, rows=rows, columns=columns)


# --- JPEG --------------------------------------------------------------------------------------

_SOF_SYNTAX = {0xC0: "50", 0xC1: "51", 0xC2: "55", 0xC3: "57"}
_SOF_REFUSED = {
    0xC5: "hierarchical (differential sequential)",
    0xC6: "hierarchical (differential progressive)",
    0xC7: "hierarchical (differential lossless)",
    0xC9: "arithmetic-coded sequential",
    0xCA: "arithmetic-coded progressive",
    0xCB: "arithmetic-coded lossless",
    0xCD: "arithmetic-coded hierarchical sequential",
    0xCE: "arithmetic-coded hierarchical progressive",
    0xCF: "arithmetic-coded hierarchical lossless",
}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM and RSTn carry no length


@dataclass
class _JpegHeader:
    sof: int = 0
    frame: bytes = b""
    adobe: int | None = None
    scan: bytes = b""


def _jpeg(fp: BinaryIO, size: int, head: bytes) -> Media:
    header = _jpeg_markers(fp)
    _check_jpeg_end(fp, size)
    return _jpeg_media(header)


def _jpeg_markers(fp: BinaryIO) -> _JpegHeader:
    """Walk the marker segments from SOI to the first SOS; read only SOF, APP14 and SOS."""
    header = _JpegHeader()
    fp.seek(2)
    for _ in range(MAX_SEGMENTS):
        marker = _next_marker(fp)
        if marker == 0xDA:
            if not header.frame:
                raise _jpeg_damaged("its image data comes before its frame header (SOF)")
            header.scan = read_exact(fp, _segment_length(fp))
            return header
        _jpeg_segment(fp, marker, header)
    raise _jpeg_damaged(f"no image data within its first {MAX_SEGMENTS} marker segments")


def _next_marker(fp: BinaryIO) -> int:
    where, first = fp.tell(), fp.read(1)
    if first != b"\xff":
        raise _jpeg_damaged(
            f"no marker at byte {where}" if first else "it ends before its image data"
        )
    code = first
    while code == b"\xff":  # fill bytes
        code = fp.read(1)
    if not code:
        raise _jpeg_damaged("it ends before its image data")
    return code[0]


def _segment_length(fp: BinaryIO) -> int:
    length: int = struct.unpack(">H", read_exact(fp, 2))[0]
    if length < 2:
        raise _jpeg_damaged(f"a marker segment has the impossible length {length}")
    return length - 2


def _jpeg_segment(fp: BinaryIO, marker: int, header: _JpegHeader) -> None:
    if marker in _STANDALONE:
        return
    if marker in (0xD8, 0xD9):
        raise _jpeg_damaged("it has no frame header (SOF) before its end")
    if marker in _SOF_REFUSED:
        raise FileProblem(
            f"the JPEG uses {_SOF_REFUSED[marker]} coding (SOF{marker - 0xC0}); DICOM has no "
            "transfer syntax stowd sends for it: save it as a baseline JPEG"
        )
    length = _segment_length(fp)
    if marker in _SOF_SYNTAX:
        header.sof, header.frame = marker, read_exact(fp, length)
    elif marker == 0xEE:
        header.adobe = _adobe_transform(read_exact(fp, length))
    else:  # APPn, COM, DQT, DHT, DRI...: skipped by their length
        fp.seek(length, os.SEEK_CUR)


def _adobe_transform(payload: bytes) -> int | None:
    return payload[11] if payload.startswith(b"Adobe") and len(payload) >= 12 else None


def _check_jpeg_end(fp: BinaryIO, size: int) -> None:
    tail = read_at(fp, max(size - TAIL, 0), TAIL).rstrip(b"\x00")
    if not tail.endswith(b"\xff\xd9"):
        raise FileProblem(
            "the file is a truncated or damaged JPEG: it does not end with the end-of-image "
            "marker FF D9 (was it copied completely? A phone's 'motion photo' with a video "
            "after the image also ends so: save the photo as a plain JPEG)"
        )


def _jpeg_media(header: _JpegHeader) -> Media:
    precision, rows, columns, count = struct.unpack_from(">BHHB", header.frame)
    check_size("jpeg", rows, columns)
    if count not in (1, 3):
        raise FileProblem(
            f"the JPEG has {count} colour components (4 is CMYK); DICOM holds grayscale "
            "(1 component) or colour (3 components) images only"
        )
    return Media(
        "jpeg",
        "image/jpeg",
        _jpeg_syntax(header),
        rows=rows,
        columns=columns,
        samples_per_pixel=count,
        bits_stored=precision,
        photometric=_jpeg_photometric(header, count),
        lossy=header.sof != 0xC3,
    )


def _jpeg_syntax(header: _JpegHeader) -> str:
    if header.sof == 0xC3:
        predictor = header.scan[1 + 2 * header.scan[0]]  # Ss of the SOS is the predictor
        return TS + ("70" if predictor == 1 else "57")
    return TS + _SOF_SYNTAX[header.sof]


def _jpeg_photometric(header: _JpegHeader, count: int) -> str:
    if count == 1:
        return "MONOCHROME2"
    components = [header.frame[6 + 3 * i : 9 + 3 * i] for i in range(3)]
    if header.adobe == 0 or bytes(c[0] for c in components) == b"RGB":
        return "RGB"
    if header.sof == 0xC3 and header.adobe != 1:  # lossless JPEG: no colour transform by default
        return "RGB"
    # Any YCbCr JPEG is YBR_FULL_422, subsampled (4:2:2, 4:2:0) or not (4:4:4). PS3.3 C.7.6.3.1.2
    # says of YBR_FULL_422: "When used to describe JPEG compressed bit streams, the chrominance
    # sub-sampling in the JPEG bit stream may differ from this description ... the use of
    # YBR_FULL_422 to describe both has proven harmless"; PS3.5 Table 8.2.1-1 lists only
    # YBR_FULL_422 and RGB for 3-component lossy JPEG; and the VL IODs (C.8.12.1.1.1) and
    # dciodvfy's Secondary Capture check do not accept YBR_FULL at all.
    return "YBR_FULL_422"


def _jpeg_damaged(reason: str) -> FileProblem:
    return FileProblem(f"{DAMAGED['jpeg']}: {reason}")


# --- JPEG 2000 -----------------------------------------------------------------------------------


def _jp2(fp: BinaryIO, size: int, head: bytes) -> Media:
    bare = head.startswith(_J2K_MAGIC)
    start, end = (0, size) if bare else _jp2_codestream(fp, size)
    if read_at(fp, end - 2, 2) != b"\xff\xd9":
        raise FileProblem(
            f"{_J2K} is truncated: its codestream does not end with the end-of-codestream "
            "marker FF D9 (was it copied completely?)"
        )
    found = _j2k_media(read_at(fp, start, min(end - start, J2K_HEADER)), "image/j2c")
    if bare:
        return found
    # DICOM holds the bare codestream: the range of the jp2c box's payload, without the boxes
    return replace(
        found, media_type="image/jp2", codestream_offset=start, codestream_length=end - start
    )


def _jp2_codestream(fp: BinaryIO, size: int) -> tuple[int, int]:
    for box in boxes(fp, 0, size, _J2K):
        if box.kind == b"jp2c":
            return box.start, box.end
    raise FileProblem(f"{DAMAGED['jp2']}: it has no codestream ('jp2c' box)")


def _j2k_markers(data: bytes) -> dict[int, bytes]:
    """The main header's marker segments, up to the first tile (SOT) or once SIZ/COD are in."""
    if not data.startswith(_J2K_MAGIC):
        raise FileProblem(f"{DAMAGED['jp2']}: its codestream does not start with SOC and SIZ")
    found: dict[int, bytes] = {}
    pos = 2
    while pos + 4 <= len(data) and not {0xFF51, 0xFF52} <= found.keys():
        marker, length = struct.unpack_from(">HH", data, pos)
        if marker in (0xFF90, 0xFF93) or marker >> 8 != 0xFF:
            break
        found.setdefault(marker, data[pos + 4 : pos + 2 + length])
        pos += 2 + length
    return found


def _j2k_media(data: bytes, media_type: str) -> Media:
    markers = _j2k_markers(data)
    siz, cod = markers.get(0xFF51), markers.get(0xFF52)
    if siz is None or cod is None:
        raise FileProblem(f"{DAMAGED['jp2']}: its main header has no SIZ or COD marker")
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", siz, 2)
    count = struct.unpack_from(">H", siz, 34)[0]
    rows, columns, reversible = ysiz - yosiz, xsiz - xosiz, cod[9] == 1
    check_size("jp2", rows, columns)
    return Media(
        "jp2",
        media_type,
        TS + ("90" if reversible else "91"),
        rows=rows,
        columns=columns,
        samples_per_pixel=count,
        bits_stored=(siz[36] & 0x7F) + 1,
        photometric=_j2k_photometric(count, cod[4], reversible),
        lossy=not reversible,
    )


def _j2k_photometric(count: int, mct: int, reversible: bool) -> str:
    if count == 1:
        return "MONOCHROME2"
    if count != 3:
        raise FileProblem(
            f"{_J2K} has {count} components; DICOM holds grayscale (1) or colour (3) only"
        )
    if not mct:
        return "RGB"
    return "YBR_RCT" if reversible else "YBR_ICT"


_PARSERS: dict[str, _Parser] = {
    "pdf": _pdf,
    "cda": _cda,
    "stl": _stl,
    "obj": _document("obj"),
    "mtl": _document("mtl"),
    "jpeg": _jpeg,
    "jp2": _jp2,
    "png": _png,
    "gif": _gif,
    "mpeg": video.mpeg,
    "mp4": video.mp4,
}
