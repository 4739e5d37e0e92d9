"""What a bulkdata file (document, image, video, 3D model) holds, read from its headers only.

``detect`` looks at the content first (magic bytes) and the file name second, and reads only
the headers it needs, with bounded reads: the JPEG markers up to the first scan, the JPEG 2000
main header, the MPEG-2 sequence header, the MP4 ``moov`` box (found by seeking past ``mdat``).
Nothing is decoded and no DICOM is built here. A file that cannot be used raises
``FileProblem`` with a reason written for a PACS administrator.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, NamedTuple, TypeGuard
from xml.etree import ElementTree

from stowd.errors import FileProblem, FileUnreadable, FileVanished, UnknownType

TYPES: tuple[str, ...] = (
    "pdf", "cda", "stl", "obj", "mtl", "jpeg", "jp2", "png", "gif", "mpeg", "mp4",
)  # fmt: skip

HEAD = 64 * 1024  # what is read first to recognise a file; a CDA root element must be in it
CDA_HEADER = 1024 * 1024  # a CDA document's id (ClinicalDocument/id) is looked for this far
MPEG_SCAN = 4 * 1024 * 1024  # an MPEG-2 sequence header must start within this many bytes,
# and the last group of pictures (GOP) header, which gives the frame count, must be this close
# to the end
J2K_HEADER = 256 * 1024  # the JPEG 2000 main header (SIZ, COD) must fit in this
TAIL = 4096  # the end of a JPEG is looked for here (trailing zero padding is tolerated)
STSD_LIMIT = 256 * 1024  # an MP4 sample description (with avcC/hvcC) is read up to this size
MAX_BOXES = 100_000  # more boxes than this in one container is damage, not a video
MAX_SIDE = 65535  # Rows and Columns are 16-bit (US)
MAX_SEGMENTS = 4096  # more JPEG marker segments than this before the scan is damage

_TS = "1.2.840.10008.1.2.4."
_JP2_MAGIC = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_J2K_MAGIC = b"\xff\x4f\xff\x51"
_VIDEO = "the video"
_J2K = "the JPEG 2000 image"
_HL7 = "{urn:hl7-org:v3}"


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


class _Short(Exception):
    """A header ended before all its fields (turned into a FileProblem for the file's kind)."""


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
_DAMAGED = {
    "jpeg": "the file is a truncated or damaged JPEG",
    "jp2": f"{_J2K} is truncated or damaged",
    "png": "the PNG image is truncated or damaged",
    "gif": "the GIF image is truncated or damaged",
    "mpeg": "the MPEG-2 video is truncated or damaged",
    "mp4": f"{_VIDEO} is truncated or damaged",
}
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
    name = str(path)
    try:
        with _open(path) as fp:
            size = os.fstat(fp.fileno()).st_size
            if size == 0:
                raise FileProblem("the file is empty (0 bytes)")
            return _detect_open(fp, size, path.suffix.lower())
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise FileVanished("the file was removed before it could be sent") from exc
    except IsADirectoryError as exc:
        raise FileVanished("the path is now a folder") from exc
    except OSError as exc:
        raise FileUnreadable.from_os_error(exc, name) from exc


def _open(path: Path) -> BinaryIO:
    """Open ``path`` for reading (one seam: the tests count the bytes read through it)."""
    return open(path, "rb")


def _detect_open(fp: BinaryIO, size: int, ext: str) -> Media:
    head = fp.read(HEAD)
    kind = _sniff(head, size, ext)
    if kind is None:
        raise _unrecognised(head, ext)
    try:
        return _PARSERS[kind](fp, size, head)
    except (_Short, struct.error, IndexError) as exc:
        reason = _DAMAGED.get(kind, "the file is damaged")
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


def _unrecognised(head: bytes, ext: str) -> FileProblem:
    start = " ".join(f"{byte:02X}" for byte in head[:8])
    claimed = _BY_EXTENSION.get(ext)
    if claimed:
        return FileProblem(
            f"the file is named {ext} but is not {_NAMES[claimed]} (it starts with bytes "
            f"{start}...)"
        )
    named = f"its name ends with {ext}" if ext else "its name has no extension"
    return UnknownType(
        f"not a file type stowd can send: the content (it starts with bytes {start}...) is not "
        f"recognised and {named}; stowd sends these types: {', '.join(TYPES)}"
    )


# --- reading -----------------------------------------------------------------------------------


def _read_at(fp: BinaryIO, offset: int, count: int) -> bytes:
    fp.seek(offset)
    return fp.read(count)


def _read_exact(fp: BinaryIO, count: int) -> bytes:
    data = fp.read(count)
    if len(data) < count:
        raise _Short
    return data


def _bits(data: bytes, start: int, length: int) -> int:
    """``length`` bits of ``data`` from bit ``start`` (most significant first)."""
    total = len(data) * 8
    return (int.from_bytes(data, "big") >> (total - start - length)) & ((1 << length) - 1)


def _check_size(kind: str, rows: int, columns: int) -> None:
    if not rows or not columns:
        raise FileProblem(f"{_DAMAGED[kind]}: its header gives a zero width or height")
    if rows > MAX_SIDE or columns > MAX_SIDE:
        raise FileProblem(
            f"the image is {columns} x {rows} pixels, too large for DICOM (Rows and Columns "
            f"are at most {MAX_SIDE}): scale or split it"
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
    return _read_at(fp, max(size - TAIL, 0), TAIL).rstrip(b"\x00 \t\r\n")


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
    if b"%%EOF" not in _read_at(fp, max(size - 1024, 0), 1024):
        raise FileProblem(
            "the PDF is truncated: it does not end with the %%EOF marker (was it copied "
            "completely?)"
        )
    return Media("pdf", "application/pdf", None)


def _png(fp: BinaryIO, size: int, head: bytes) -> Media:
    if head[12:16] != b"IHDR":
        raise FileProblem(f"{_DAMAGED['png']}: it has no IHDR header chunk")
    columns, rows = struct.unpack_from(">II", head, 16)
    _check_size("png", rows, columns)
    return Media("png", "image/png", None, rows=rows, columns=columns)


def _gif(fp: BinaryIO, size: int, head: bytes) -> Media:
    columns, rows = struct.unpack_from("<HH", head, 6)
    _check_size("gif", rows, columns)
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
            header.scan = _read_exact(fp, _segment_length(fp))
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
    length: int = struct.unpack(">H", _read_exact(fp, 2))[0]
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
        header.sof, header.frame = marker, _read_exact(fp, length)
    elif marker == 0xEE:
        header.adobe = _adobe_transform(_read_exact(fp, length))
    else:  # APPn, COM, DQT, DHT, DRI...: skipped by their length
        fp.seek(length, os.SEEK_CUR)


def _adobe_transform(payload: bytes) -> int | None:
    return payload[11] if payload.startswith(b"Adobe") and len(payload) >= 12 else None


def _check_jpeg_end(fp: BinaryIO, size: int) -> None:
    tail = _read_at(fp, max(size - TAIL, 0), TAIL).rstrip(b"\x00")
    if not tail.endswith(b"\xff\xd9"):
        raise FileProblem(
            "the file is a truncated or damaged JPEG: it does not end with the end-of-image "
            "marker FF D9 (was it copied completely? A phone's 'motion photo' with a video "
            "after the image also ends so: save the photo as a plain JPEG)"
        )


def _jpeg_media(header: _JpegHeader) -> Media:
    precision, rows, columns, count = struct.unpack_from(">BHHB", header.frame)
    _check_size("jpeg", rows, columns)
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
        return _TS + ("70" if predictor == 1 else "57")
    return _TS + _SOF_SYNTAX[header.sof]


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
    return FileProblem(f"{_DAMAGED['jpeg']}: {reason}")


# --- boxes (MP4, QuickTime, JP2) ---------------------------------------------------------------


class _Box(NamedTuple):
    kind: bytes
    start: int  # where the payload starts
    end: int


def _boxes(fp: BinaryIO, start: int, end: int, what: str) -> Iterator[_Box]:
    """The boxes between ``start`` and ``end``, read by their headers only (seeks, no reads)."""
    pos = start
    for _ in range(MAX_BOXES):
        if pos + 8 > end:
            return
        box = _box_at(fp, pos, end, what)
        yield box
        pos = box.end
    raise FileProblem(f"{what} is damaged: it has more than {MAX_BOXES} boxes in one place")


def _box_at(fp: BinaryIO, pos: int, end: int, what: str) -> _Box:
    size, kind = struct.unpack(">I4s", _read_at(fp, pos, 8))
    header = 8
    if size == 1:  # 64-bit largesize follows
        size, header = struct.unpack(">Q", _read_exact(fp, 8))[0], 16
    elif size == 0:  # the box runs to the end of its container
        size = end - pos
    if size < header or pos + size > end:
        raise FileProblem(
            f"{what} is truncated or damaged: its '{_fourcc(kind)}' box at byte {pos} runs "
            "past the end of the file or of the box around it (was it copied completely?)"
        )
    return _Box(kind, pos + header, pos + size)


def _fourcc(kind: bytes) -> str:
    return kind.decode("latin-1").strip() or kind.hex()


def _memory_boxes(data: bytes, pos: int) -> dict[bytes, bytes]:
    """The payloads of the boxes in ``data`` from ``pos`` (small child boxes, read already)."""
    found: dict[bytes, bytes] = {}
    while pos + 8 <= len(data):
        size, kind = struct.unpack_from(">I4s", data, pos)
        if size < 8:
            break
        found.setdefault(kind, data[pos + 8 : pos + size])
        pos += size
    return found


# --- JPEG 2000 -----------------------------------------------------------------------------------


def _jp2(fp: BinaryIO, size: int, head: bytes) -> Media:
    bare = head.startswith(_J2K_MAGIC)
    start, end = (0, size) if bare else _jp2_codestream(fp, size)
    if _read_at(fp, end - 2, 2) != b"\xff\xd9":
        raise FileProblem(
            f"{_J2K} is truncated: its codestream does not end with the end-of-codestream "
            "marker FF D9 (was it copied completely?)"
        )
    found = _j2k_media(_read_at(fp, start, min(end - start, J2K_HEADER)), "image/j2c")
    if bare:
        return found
    # DICOM holds the bare codestream: the range of the jp2c box's payload, without the boxes
    return replace(
        found, media_type="image/jp2", codestream_offset=start, codestream_length=end - start
    )


def _jp2_codestream(fp: BinaryIO, size: int) -> tuple[int, int]:
    for box in _boxes(fp, 0, size, _J2K):
        if box.kind == b"jp2c":
            return box.start, box.end
    raise FileProblem(f"{_DAMAGED['jp2']}: it has no codestream ('jp2c' box)")


def _j2k_markers(data: bytes) -> dict[int, bytes]:
    """The main header's marker segments, up to the first tile (SOT) or once SIZ/COD are in."""
    if not data.startswith(_J2K_MAGIC):
        raise FileProblem(f"{_DAMAGED['jp2']}: its codestream does not start with SOC and SIZ")
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
        raise FileProblem(f"{_DAMAGED['jp2']}: its main header has no SIZ or COD marker")
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", siz, 2)
    count = struct.unpack_from(">H", siz, 34)[0]
    rows, columns, reversible = ysiz - yosiz, xsiz - xosiz, cod[9] == 1
    _check_size("jp2", rows, columns)
    return Media(
        "jp2",
        media_type,
        _TS + ("90" if reversible else "91"),
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


# --- MPEG-2 -------------------------------------------------------------------------------------

_FRAME_RATES = {
    1: (24000, 1001),
    2: (24, 1),
    3: (25, 1),
    4: (30000, 1001),
    5: (30, 1),
    6: (50, 1),
    7: (60000, 1001),
    8: (60, 1),
}
_MPEG_PROFILES = {1: "High", 2: "Spatially Scalable", 3: "SNR Scalable", 4: "Main", 5: "Simple"}
_SEQUENCE_HEADER = b"\x00\x00\x01\xb3"
_GOP = b"\x00\x00\x01\xb8"
_PICTURE = b"\x00\x00\x01\x00"
_PACK = b"\x00\x00\x01\xba"
_START = b"\x00\x00\x01"
_EXTENSION = b"\x00\x00\x01\xb5"


def _mpeg(fp: BinaryIO, size: int, head: bytes) -> Media:
    at = _find(fp, _SEQUENCE_HEADER, MPEG_SCAN)
    if at is None:
        raise FileProblem(
            f"{_DAMAGED['mpeg']}: no video sequence header in its first "
            f"{MPEG_SCAN // 2**20} MiB (is it audio only?)"
        )
    data = _read_at(fp, at, 1024)
    if len(data) < 12:  # the start code and the 8 bytes of the sequence header
        raise _Short
    rows, columns, rate = _bits(data[4:8], 12, 12), _bits(data[4:8], 0, 12), data[7] & 0x0F
    extension = _sequence_extension(data[12:])
    if extension is not None:
        columns |= _bits(extension, 15, 2) << 12
        rows |= _bits(extension, 17, 2) << 12
    _check_size("mpeg", rows, columns)
    found = _mpeg_media(rows, columns, _frame_time(rate, extension), _mpeg_high(extension))
    program = head.startswith(_PACK)
    frames = _mpeg_frames(fp, size, found.frame_time_ms or 0, program)
    duration = frames * (found.frame_time_ms or 0) / 1000 if frames else None
    return replace(found, frames=frames, duration_s=duration)


def _find(fp: BinaryIO, pattern: bytes, limit: int) -> int | None:
    """The offset of ``pattern`` within the first ``limit`` bytes, read in chunks."""
    fp.seek(0)
    pos, carry = 0, b""
    while pos < limit:
        chunk = fp.read(HEAD)
        if not chunk:
            return None
        found = (carry + chunk).find(pattern)
        if found >= 0:
            return pos - len(carry) + found
        carry, pos = chunk[1 - len(pattern) :], pos + len(chunk)
    return None


def _sequence_extension(data: bytes) -> bytes | None:
    """The 6 bytes after a sequence extension's start code (extension id 1), if it follows."""
    at = data.find(_EXTENSION)
    while at >= 0 and len(data) >= at + 10:
        if data[at + 4] >> 4 == 1:
            return data[at + 4 : at + 10]
        at = data.find(_EXTENSION, at + 4)
    return None


def _frame_time(rate: int, extension: bytes | None) -> float:
    if rate not in _FRAME_RATES:
        raise FileProblem(f"{_DAMAGED['mpeg']}: its frame rate code {rate} is not defined")
    numerator, denominator = _FRAME_RATES[rate]
    if extension is not None:
        numerator *= _bits(extension, 41, 2) + 1
        denominator *= _bits(extension, 43, 5) + 1
    return 1000 * denominator / numerator


def _mpeg_high(extension: bytes | None) -> bool | None:
    """True for High (or High-1440) level, False for Main or Low; None without extension."""
    if extension is None:
        return None  # MPEG-1 style stream: the frame size decides
    escape, profile, level = _bits(extension, 4, 1), _bits(extension, 5, 3), _bits(extension, 9, 4)
    if escape or profile not in (4, 5) or _bits(extension, 13, 2) != 1:
        name = _MPEG_PROFILES.get(profile, "4:2:2 or multi-view") if not escape else "4:2:2"
        raise FileProblem(
            f"the MPEG-2 video uses the {name} profile (or a chroma format other than 4:2:0); "
            "DICOM holds MPEG-2 only in the Main profile: re-encode it"
        )
    return level in (4, 6)


def _mpeg_frames(fp: BinaryIO, size: int, frame_time: float, program: bool) -> int | None:
    """The frame count: the time code of the last GOP header plus the pictures after it.

    Only the last ``MPEG_SCAN`` bytes are read (in a program stream, the video payload of its
    packets). None when there is no GOP header there, or when the time codes are not kept (a
    last GOP at 00:00:00:00 that is not the first in the file).
    """
    start = max(size - MPEG_SCAN, 0)
    tail = _read_at(fp, start, MPEG_SCAN)
    tail = _video_payload(tail) if program else tail  # raises FileProblem when cut short
    at = tail.rfind(_GOP, 0, len(tail) - 8)
    if at < 0:
        return None
    elapsed = _time_code_frames(tail[at + 4 : at + 8], round(1000 / frame_time))
    if not elapsed and (start or tail.rfind(_GOP, 0, at) >= 0):
        return None
    return elapsed + tail.count(_PICTURE, at)


def _video_payload(data: bytes) -> bytes:
    """The video stream in the last piece of an MPEG program stream: the payload of its video
    packets without the pack and packet headers between them (they may split a start code).
    A packet that runs past the end means the file was cut short."""
    out = bytearray()
    pos = data.find(_PACK)
    while pos >= 0 and pos + 14 <= len(data):
        code = data[pos + 3]
        if data[pos : pos + 3] != _START or code < 0xBA:  # not a packet: find the next one
            pos = data.find(_START, pos + 1)
        elif code == 0xBA:  # pack header: MPEG-2 (14 bytes + stuffing) or MPEG-1 (12)
            pos += 14 + (data[pos + 13] & 7) if data[pos + 4] >> 6 == 1 else 12
        else:  # a packet with a length: video (E0-EF) payload kept, others skipped
            end = _packet_end(data, pos)
            if end > len(data):
                raise FileProblem(
                    f"{_DAMAGED['mpeg']}: its last packet runs past the end of the file "
                    "(was it copied completely?)"
                )
            if 0xE0 <= code <= 0xEF:
                out += data[_payload_start(data, pos) : end]
            pos = end
    return bytes(out)


def _packet_end(data: bytes, pos: int) -> int:
    """The end of the packet at ``pos``; a video packet of length 0 (unbounded) runs to the
    next pack header."""
    length = int(struct.unpack_from(">H", data, pos + 4)[0])
    if length or not 0xE0 <= data[pos + 3] <= 0xEF:
        return pos + 6 + length
    following = data.find(_PACK, pos + 6)
    return len(data) if following < 0 else following


def _payload_start(data: bytes, pos: int) -> int:
    """Where the payload of the PES packet at ``pos`` starts (MPEG-2 or MPEG-1 header)."""
    at = pos + 6
    if at < len(data) and data[at] >> 6 == 2:  # MPEG-2: flags, then the header length
        return at + 3 + (data[at + 2] if at + 2 < len(data) else 0)
    while at < len(data) and data[at] == 0xFF:  # MPEG-1: stuffing, buffer size, time stamps
        at += 1
    if at < len(data) and data[at] >> 6 == 1:
        at += 2
    flags = data[at] >> 4 if at < len(data) else 0
    return at + {2: 5, 3: 10}.get(flags, 1)


def _time_code_frames(code: bytes, rate: int) -> int:
    """The frames before a GOP from its SMPTE time code (drop-frame: 2 or 4 dropped a minute)."""
    hours, minutes = _bits(code, 1, 5), _bits(code, 6, 6)
    seconds, pictures = _bits(code, 13, 6), _bits(code, 19, 6)
    frames = ((hours * 60 + minutes) * 60 + seconds) * rate + pictures
    if _bits(code, 0, 1):  # drop_frame_flag
        total = hours * 60 + minutes
        frames -= (rate // 15) * (total - total // 10)
    return frames


def _mpeg_media(rows: int, columns: int, frame_time: float, high: bool | None) -> Media:
    large = columns > 720 or rows > 576
    return Media(
        "mpeg",
        "video/mpeg",
        _TS + ("101" if high or large else "100"),
        rows=rows,
        columns=columns,
        samples_per_pixel=3,
        bits_stored=8,
        photometric="YBR_PARTIAL_420",
        lossy=True,
        frame_time_ms=frame_time,
    )


# --- MP4 / QuickTime ----------------------------------------------------------------------------

_TRACK_CONTAINERS = {b"mdia", b"minf", b"stbl"}
_TRACK_BOXES = {
    b"tkhd": 128,
    b"mdhd": 64,
    b"hdlr": 32,
    b"stsd": STSD_LIMIT,
    b"stsz": 16,
    b"stz2": 16,
}
_AVC_REFUSED = {
    44: "CAVLC 4:4:4 Intra",
    83: "Scalable Baseline",
    86: "Scalable High",
    110: "High 10",
    118: "Multiview High",
    122: "High 4:2:2",
    128: "Stereo High",
    244: "High 4:4:4 Predictive",
}
_HEVC_PROFILES = {3: "Main Still Picture", 4: "Range Extensions", 5: "High Throughput"}
_CODECS = {
    b"mp4v": "MPEG-4 Part 2",
    b"av01": "AV1",
    b"vp09": "VP9",
    b"vp08": "VP8",
    b"encv": "encrypted video",
    b"mjpa": "Motion JPEG",
    b"jpeg": "Motion JPEG",
    b"apcn": "Apple ProRes",
    b"s263": "H.263",
}


def _mp4(fp: BinaryIO, size: int, head: bytes) -> Media:
    top = list(_boxes(fp, 0, size, _VIDEO))  # every box must fit: a cut mdat is found too
    moov = next((box for box in top if box.kind == b"moov"), None)
    if moov is None:
        raise FileProblem(
            f"{_DAMAGED['mp4']}: it has no 'moov' box (the index of the video); was it "
            "copied completely?"
        )
    quicktime = head[4:8] != b"ftyp" or head[8:12] == b"qt  "
    media_type = "video/quicktime" if quicktime else "video/mp4"
    return _mp4_media(_video_track(fp, moov), media_type)


def _video_track(fp: BinaryIO, moov: _Box) -> dict[bytes, bytes]:
    for trak in _boxes(fp, moov.start, moov.end, _VIDEO):
        if trak.kind == b"trak":
            found = _collect(fp, trak, {})
            if found.get(b"hdlr", b"")[8:12] == b"vide":
                return found
    raise FileProblem("the file holds no video track (only sound or other data)")


def _collect(fp: BinaryIO, box: _Box, found: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """The (bounded) payloads of the boxes of one track that describe its video."""
    for child in _boxes(fp, box.start, box.end, _VIDEO):
        if child.kind in _TRACK_CONTAINERS:
            _collect(fp, child, found)
        elif child.kind in _TRACK_BOXES and child.kind not in found:
            limit = min(child.end - child.start, _TRACK_BOXES[child.kind])
            found[child.kind] = _read_at(fp, child.start, limit)
    return found


def _mp4_media(track: dict[bytes, bytes], media_type: str) -> Media:
    codec, entry = _sample_entry(track)
    syntax, bits = _codec_syntax(codec, _memory_boxes(entry, 78))
    columns, rows = _frame_size(track, entry)
    _check_size("mp4", rows, columns)
    frames, duration = _frames(track), _duration(track)
    return Media(
        "mp4",
        media_type,
        syntax,
        rows=rows,
        columns=columns,
        samples_per_pixel=3,
        bits_stored=bits,
        photometric="YBR_PARTIAL_420",
        lossy=True,
        frames=frames,
        frame_time_ms=duration * 1000 / frames if frames and duration else None,
        duration_s=duration,
    )


def _sample_entry(track: dict[bytes, bytes]) -> tuple[bytes, bytes]:
    """The codec (four characters) and payload of the first sample description."""
    stsd = track.get(b"stsd")
    if stsd is None:
        raise FileProblem(f"{_DAMAGED['mp4']}: its video track has no sample description")
    size, codec = struct.unpack_from(">I4s", stsd, 8)
    return codec, stsd[16 : 8 + size]


def _codec_syntax(codec: bytes, children: dict[bytes, bytes]) -> tuple[str, int]:
    """The transfer syntax and bits stored for the codec, from its avcC / hvcC record."""
    if codec in (b"avc1", b"avc3"):
        return _avc_syntax(_config(children, b"avcC", "H.264")), 8
    if codec in (b"hvc1", b"hev1"):
        return _hevc_syntax(_config(children, b"hvcC", "H.265"))
    raise FileProblem(
        f"the video uses the codec '{_fourcc(codec)}' ({_CODECS.get(codec, 'not known to stowd')})"
        ", which DICOM cannot hold: convert it to H.264 (AVC) or H.265 (HEVC) in MP4"
    )


def _config(children: dict[bytes, bytes], name: bytes, codec: str) -> bytes:
    if name not in children:
        raise FileProblem(f"{_DAMAGED['mp4']}: its {codec} track has no '{name.decode()}' record")
    return children[name]


def _avc_syntax(avcc: bytes) -> str:
    profile, level = avcc[1], avcc[3]
    if profile in _AVC_REFUSED:
        raise FileProblem(
            f"the H.264 video uses the {_AVC_REFUSED[profile]} profile; DICOM holds H.264 only "
            "up to the High profile (8-bit 4:2:0): re-encode it with the High profile"
        )
    # .103 (BD-compatible) adds Blu-ray frame size and rate constraints that avcC does not tell,
    # so it is never chosen: High Profile up to level 4.1 is .102, everything else .104 (2D).
    return _TS + ("102" if profile == 100 and level <= 41 else "104")


def _hevc_syntax(hvcc: bytes) -> tuple[str, int]:
    profile, bits = hvcc[1] & 0x1F, (hvcc[17] & 0x07) + 8
    if profile in (1, 2):
        return _TS + ("107" if profile == 1 else "108"), bits
    name = _HEVC_PROFILES.get(profile, f"number {profile}")
    raise FileProblem(
        f"the H.265 video uses the {name} profile; DICOM holds H.265 only in the Main and "
        "Main 10 profiles: re-encode it"
    )


def _frame_size(track: dict[bytes, bytes], entry: bytes) -> tuple[int, int]:
    """Width and height: the coded size of the sample entry, else the track header's."""
    width, height = struct.unpack_from(">HH", entry, 24)
    if width and height:
        return width, height
    tkhd = track.get(b"tkhd", b"")
    width, height = struct.unpack_from(">II", tkhd, 88 if tkhd[0] == 1 else 76)
    return width >> 16, height >> 16


def _frames(track: dict[bytes, bytes]) -> int | None:
    table = track.get(b"stsz") or track.get(b"stz2")
    count = struct.unpack_from(">I", table, 8)[0] if table and len(table) >= 12 else 0
    return int(count) or None


def _duration(track: dict[bytes, bytes]) -> float | None:
    mdhd = track.get(b"mdhd")
    if not mdhd:
        return None
    layout, at = (">IQ", 20) if mdhd[0] == 1 else (">II", 12)
    scale, duration = struct.unpack_from(layout, mdhd, at)
    if not scale or duration in (0, 0xFFFFFFFF, 2**64 - 1):
        return None
    return float(duration / scale)


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
    "mpeg": _mpeg,
    "mp4": _mp4,
}
