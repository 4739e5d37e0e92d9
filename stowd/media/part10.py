"""The Part-10 file of a DICOM instance, written with its bulk value streamed.

``write`` writes the elements before the bulk element with pydicom, then the bulk value copied
from its source in ``CHUNK`` pieces (pixel data encapsulated in fragments of at most
``FRAGMENT`` bytes; a video in one fragment of up to ``MAX_VALUE`` bytes unless its transfer
syntax is a Fragmentable one), then the elements after it; memory does not grow with the
source, and a source that changed since it was described is refused. ``reading`` and
``writing`` turn the OSErrors of a source and of a target into stowd's errors (``bulkdata`` and
``decode`` use them too).
"""

from __future__ import annotations

import copy
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, TypeVar

import pydicom
from pydicom.charset import convert_encodings
from pydicom.dataset import Dataset, FileDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.tag import BaseTag, Tag

from stowd import dropped
from stowd.errors import FileProblem, FileUnreadable, FileVanished, reading
from stowd.media import rewrite
from stowd.media.instance import DOCUMENT, Bulk, Instance, bulk_vr

_T = TypeVar("_T")

CHUNK = 1024 * 1024
FRAGMENT = 2**30  # the largest pixel data fragment written for an image (even)
MAX_VALUE = 0xFFFFFFFE  # the largest even 32-bit value length (0xFFFFFFFF means undefined)

_ITEM = struct.pack("<HH", 0xFFFE, 0xE000)
_SEQUENCE_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
_TS = "1.2.840.10008.1.2.4."
_VIDEO_SYNTAXES = {_TS + s for s in ("100", "101", "102", "103", "104", "105", "106", "107", "108")}


def write(instance: Instance, target: Path) -> int:
    """Write the Part-10 file ``target`` of ``instance``; return its size.

    The bulk value is streamed from ``instance.bulk`` in ``CHUNK`` pieces. Raises
    ``FileVanished`` when the bulk file is gone or changed its size, ``FileUnreadable`` when it
    cannot be read or ``target`` not written now. A partly written ``target`` is removed.
    """
    head, tail = _split(instance.dataset, instance.tag)
    bulk = instance.bulk
    with reading(bulk.path), dropped.open_file(bulk.path) as fp:
        st = os.fstat(fp.fileno())
        if (bulk.file_size, bulk.mtime_ns) != (
            st.st_size if bulk.file_size is not None else None,
            st.st_mtime_ns if bulk.mtime_ns is not None else None,
        ):
            raise FileVanished(
                "the file changed after it was looked at (is it still being written?)"
            )
        fp.seek(bulk.offset)
        with writing(target, "the DICOM file") as out:
            _encode(lambda: pydicom.dcmwrite(out, head, enforce_file_format=True))
            _write_bulk(fp, out, instance)
            _check_end(fp, bulk)
            put(out, _encode(lambda: _tail_bytes(tail, _encodings(head))))
            return out.tell()


def _split(ds: FileDataset, bulk: BaseTag) -> tuple[FileDataset, Dataset]:
    """The elements before the bulk element and those after it (``ds`` is left as it is)."""
    if bulk in ds:
        raise FileProblem(f"{ds[bulk].keyword} is the content of the file: rules cannot set it")
    meta = copy.deepcopy(ds.file_meta)
    head = FileDataset(str(ds.filename), Dataset(), file_meta=meta, preamble=ds.preamble)
    tail = Dataset()
    for elem in ds:
        (head if elem.tag < bulk else tail).add(elem)
    return head, tail


# --- writing -----------------------------------------------------------------------------------


class _TargetError(Exception):
    """Writing a file failed (an OSError of the output, not of the source)."""


@contextmanager
def writing(target: Path, what: str) -> Iterator[BinaryIO]:
    """Open ``target`` for writing; on any error remove it, and report its own OSErrors."""
    try:
        try:
            out = rewrite.private(target)
        except OSError as exc:
            raise _TargetError from exc
        with out:
            yield out
    except BaseException as exc:
        target.unlink(missing_ok=True)
        if isinstance(exc, _TargetError):
            cause = exc.__cause__
            reason = cause.strerror if isinstance(cause, OSError) else None
            raise FileUnreadable(
                f"writing {what} {target} failed: {reason or cause}; it is tried again later"
            ) from cause
        raise


def _encodings(head: Dataset) -> str | list[str]:
    charset = head.get(Tag(0x0008, 0x0005))
    return convert_encodings(charset.value if charset else "ISO_IR 6")


def _encode(make: Callable[[], _T]) -> _T:
    """Run a pydicom encoding step; a value it cannot encode becomes a ``FileProblem``."""
    try:
        return make()
    except OSError as exc:
        if exc.errno is not None:
            raise _TargetError from exc
        raise rewrite.unwritable(exc) from exc
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise rewrite.unwritable(exc) from exc


def _tail_bytes(tail: Dataset, encodings: str | list[str]) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, tail, parent_encoding=encodings)
    return buffer.getvalue()


def _write_bulk(fp: BinaryIO, out: BinaryIO, instance: Instance) -> None:
    bulk = instance.bulk
    if instance.encapsulated:
        video = bulk.transfer_syntax in _VIDEO_SYNTAXES  # one fragment; <syntax>.1 may split
        _write_fragments(fp, out, bulk.length, MAX_VALUE if video else FRAGMENT)
        return
    length = bulk.length + (bulk.length & 1)
    if instance.tag == DOCUMENT:
        length = document_length(bulk.length)
    group, element = instance.tag >> 16, instance.tag & 0xFFFF
    vr = bulk_vr(instance).encode()
    put(out, struct.pack("<HH2sHI", group, element, vr, 0, length))
    _copy(fp, out, bulk.length)
    if bulk.length & 1:
        put(out, b"\0")


def document_length(size: int) -> int:
    """The value length of a document of ``size`` bytes (padded to even); it must fit 32 bits."""
    length = size + (size & 1)
    if length > MAX_VALUE:
        raise FileProblem(
            f"the document ({size} bytes) is larger than 4 GiB, too large for one DICOM document"
        )
    return length


def _write_fragments(fp: BinaryIO, out: BinaryIO, size: int, fragment: int) -> None:
    put(out, struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF))
    put(out, _ITEM + struct.pack("<I", 0))  # an empty Basic Offset Table
    left = size
    while left > 0:
        part = min(left, fragment)
        padded = part + (part & 1)
        put(out, _ITEM + struct.pack("<I", padded))
        _copy(fp, out, part)
        if part & 1:
            put(out, b"\0")
        left -= part
    put(out, _SEQUENCE_END)


def _copy(fp: BinaryIO, out: BinaryIO, count: int) -> None:
    """Copy ``count`` bytes of ``fp`` to ``out`` in ``CHUNK`` pieces; refuse a changed source."""
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    left = count
    while left > 0:
        got = fp.readinto(view[: min(left, CHUNK)])  # type: ignore[attr-defined]
        if not got:
            raise FileVanished(
                "the file became shorter while it was being read (was it being replaced?)"
            )
        put(out, view[:got])
        left -= got


def _check_end(fp: BinaryIO, bulk: Bulk) -> None:
    """Refuse a file that is longer now than when it was described, or was written to."""
    end = bulk.file_size if bulk.file_size is not None else bulk.offset + bulk.length
    fp.seek(end)
    if fp.read(1) or (
        bulk.mtime_ns is not None and os.fstat(fp.fileno()).st_mtime_ns != bulk.mtime_ns
    ):
        raise FileVanished("the file changed while it was being read (is it still being written?)")


def put(out: BinaryIO, data: bytes | memoryview) -> None:
    """Write ``data`` to ``out`` (opened by ``writing``), which reports its OSError."""
    try:
        out.write(data)
    except OSError as exc:
        raise _TargetError from exc
