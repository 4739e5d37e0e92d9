"""Hostile DICOM files for issue 14: a deflated data set that inflates to gigabytes (made in a
few MB of memory), and a file of deeply nested sequences; and the peak RSS of a process."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from dicomgen import make_instance_bytes
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian

MIB = 1024 * 1024
PIXEL_DATA = (0x7FE0, 0x0010)
ENCAPSULATED_DOCUMENT = (0x0042, 0x0011)  # an OB element before the pixel data


def deflate_bomb(path: Path, *, inflated: int = 3 << 30, tag: tuple[int, int] = PIXEL_DATA) -> str:
    """Write a deflated Part-10 file whose data set is a valid header followed by element
    ``tag`` (OB) of zeros, inflating to about ``inflated`` bytes; return its SOPInstanceUID.

    The zeros are deflated once, 1 MiB of them ending in a full flush (a block that refers to
    nothing before it), and that block is written again and again: ~1 KB per MiB."""
    data, uid = make_instance_bytes()
    ds = dcmread(io.BytesIO(data))
    del ds.PixelData
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    header = _buffer()
    write_dataset(header, ds)  # explicit VR little endian, as inside a deflated data set
    mebibytes = max(1, (inflated - len(header.getvalue())) // MIB)
    header.write(struct.pack("<HH2sHI", *tag, b"OB", 0, mebibytes * MIB))
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    start = deflater.compress(header.getvalue()) + deflater.flush(zlib.Z_FULL_FLUSH)
    zeros = deflater.compress(bytes(MIB)) + deflater.flush(zlib.Z_FULL_FLUSH)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        meta = _buffer()
        write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
        out.write(b"\0" * 128 + b"DICM" + meta.getvalue())
        out.write(start)
        for _ in range(mebibytes):
            out.write(zeros)
        out.write(deflater.flush())
    return uid


def _buffer() -> DicomBytesIO:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    return buffer


def nested_sequences(path: Path, depth: int = 150, study_uid: str | None = None) -> str:
    """Write a small legal Part-10 file (4 KB) with ``depth`` sequences nested in one another
    (each item holding the next sequence); return its SOPInstanceUID.  Orthanc 1.10.1 dies
    of a segmentation fault whenever it is sent such a file (150 deep)."""
    data, uid = make_instance_bytes(study_uid=study_uid)
    ds = dcmread(io.BytesIO(data))
    inner = Dataset()
    inner.CodeValue = "1"
    for _ in range(depth):
        outer = Dataset()
        outer.ContentSequence = [inner]
        inner = outer
    ds.ContentSequence = inner.ContentSequence
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return uid


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM in /proc/PID/status), in MB (10^6 bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")
