"""What a video file holds, read from its headers only: MPEG-2 and MP4/QuickTime.

``mpeg`` reads an MPEG-2 elementary or program stream: the sequence header (and extension) in
the first ``MPEG_SCAN`` bytes, and the frame count from the last group of pictures (GOP) header
in the last ``MPEG_SCAN`` bytes (a program stream is demuxed there first). ``mp4`` walks the
boxes of an MP4 or QuickTime file to its ``moov`` box (seeking past ``mdat``) and reads the
video track's sample description, sizes and duration. Both are parsers of ``probe.detect``,
which calls them with the open file, its size and its first ``HEAD`` bytes.
"""

from __future__ import annotations

import struct
from dataclasses import replace
from typing import BinaryIO

from stowd.errors import FileProblem
from stowd.media.reading import (
    DAMAGED,
    HEAD,
    TS,
    IsoBox,
    Media,
    TruncatedHeader,
    boxes,
    check_size,
    fourcc,
    read_at,
)

MPEG_SCAN = 4 * 1024 * 1024  # an MPEG-2 sequence header must start within this many bytes,
# and the last group of pictures (GOP) header, which gives the frame count, must be this close
# to the end
STSD_LIMIT = 256 * 1024  # an MP4 sample description (with avcC/hvcC) is read up to this size

_VIDEO = "the video"


def _bits(data: bytes, start: int, length: int) -> int:
    """``length`` bits of ``data`` from bit ``start`` (most significant first)."""
    total = len(data) * 8
    return (int.from_bytes(data, "big") >> (total - start - length)) & ((1 << length) - 1)


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


def mpeg(fp: BinaryIO, size: int, head: bytes) -> Media:
    at = _find(fp, _SEQUENCE_HEADER, MPEG_SCAN)
    if at is None:
        raise FileProblem(
            f"{DAMAGED['mpeg']}: no video sequence header in its first "
            f"{MPEG_SCAN // 2**20} MiB (is it audio only?)"
        )
    data = read_at(fp, at, 1024)
    if len(data) < 12:  # the start code and the 8 bytes of the sequence header
        raise TruncatedHeader
    rows, columns, rate = _bits(data[4:8], 12, 12), _bits(data[4:8], 0, 12), data[7] & 0x0F
    extension = _sequence_extension(data[12:])
    if extension is not None:
        columns |= _bits(extension, 15, 2) << 12
        rows |= _bits(extension, 17, 2) << 12
    check_size("mpeg", rows, columns)
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
        raise FileProblem(f"{DAMAGED['mpeg']}: its frame rate code {rate} is not defined")
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
    tail = read_at(fp, start, MPEG_SCAN)
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
                    f"{DAMAGED['mpeg']}: its last packet runs past the end of the file "
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
        TS + ("101" if high or large else "100"),
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


def mp4(fp: BinaryIO, size: int, head: bytes) -> Media:
    top = list(boxes(fp, 0, size, _VIDEO))  # every box must fit: a cut mdat is found too
    moov = next((box for box in top if box.kind == b"moov"), None)
    if moov is None:
        raise FileProblem(
            f"{DAMAGED['mp4']}: it has no 'moov' box (the index of the video); was it "
            "copied completely?"
        )
    quicktime = head[4:8] != b"ftyp" or head[8:12] == b"qt  "
    media_type = "video/quicktime" if quicktime else "video/mp4"
    return _mp4_media(_video_track(fp, moov), media_type)


def _video_track(fp: BinaryIO, moov: IsoBox) -> dict[bytes, bytes]:
    for trak in boxes(fp, moov.start, moov.end, _VIDEO):
        if trak.kind == b"trak":
            found = _collect(fp, trak, {})
            if found.get(b"hdlr", b"")[8:12] == b"vide":
                return found
    raise FileProblem("the file holds no video track (only sound or other data)")


def _collect(fp: BinaryIO, box: IsoBox, found: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """The (bounded) payloads of the boxes of one track that describe its video."""
    for child in boxes(fp, box.start, box.end, _VIDEO):
        if child.kind in _TRACK_CONTAINERS:
            _collect(fp, child, found)
        elif child.kind in _TRACK_BOXES and child.kind not in found:
            limit = min(child.end - child.start, _TRACK_BOXES[child.kind])
            found[child.kind] = read_at(fp, child.start, limit)
    return found


def _mp4_media(track: dict[bytes, bytes], media_type: str) -> Media:
    codec, entry = _sample_entry(track)
    syntax, bits = _codec_syntax(codec, _memory_boxes(entry, 78))
    columns, rows = _frame_size(track, entry)
    check_size("mp4", rows, columns)
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
        raise FileProblem(f"{DAMAGED['mp4']}: its video track has no sample description")
    size, codec = struct.unpack_from(">I4s", stsd, 8)
    return codec, stsd[16 : 8 + size]


def _codec_syntax(codec: bytes, children: dict[bytes, bytes]) -> tuple[str, int]:
    """The transfer syntax and bits stored for the codec, from its avcC / hvcC record."""
    if codec in (b"avc1", b"avc3"):
        return _avc_syntax(_config(children, b"avcC", "H.264")), 8
    if codec in (b"hvc1", b"hev1"):
        return _hevc_syntax(_config(children, b"hvcC", "H.265"))
    raise FileProblem(
        f"the video uses the codec '{fourcc(codec)}' ({_CODECS.get(codec, 'not known to stowd')})"
        ", which DICOM cannot hold: convert it to H.264 (AVC) or H.265 (HEVC) in MP4"
    )


def _config(children: dict[bytes, bytes], name: bytes, codec: str) -> bytes:
    if name not in children:
        raise FileProblem(f"{DAMAGED['mp4']}: its {codec} track has no '{name.decode()}' record")
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
    return TS + ("102" if profile == 100 and level <= 41 else "104")


def _hevc_syntax(hvcc: bytes) -> tuple[str, int]:
    profile, bits = hvcc[1] & 0x1F, (hvcc[17] & 0x07) + 8
    if profile in (1, 2):
        return TS + ("107" if profile == 1 else "108"), bits
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
