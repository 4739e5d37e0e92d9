"""Build a DICOM Part-10 file around a bulkdata file (a PDF document, a JPEG image).

``build`` writes the header with pydicom and the bulk element by hand: the source file is
streamed into it in ``CHUNK`` pieces, so memory does not grow with the size of the source.

* documents (PDF): Encapsulated PDF Storage, Explicit VR Little Endian; the document is the
  value of EncapsulatedDocument (0042,0011), OB, padded with one 0x00 byte to an even length;
  the elements after it (MIMETypeOfEncapsulatedDocument, EncapsulatedDocumentLength) follow.
* images (JPEG, a bare JPEG 2000 codestream): Secondary Capture Image Storage in the
  transfer syntax of the stream; Pixel Data (7FE0,0010) is encapsulated: an empty Basic Offset
  Table, then the stream in fragments of at most ``FRAGMENT`` bytes (the last padded with 0x00
  to an even length), then the Sequence Delimitation Item.
"""

from __future__ import annotations

import os
import struct
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, TypeVar

import pydicom
from pydicom.charset import convert_encodings
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, ExplicitVRLittleEndian

from stowd import rewrite
from stowd.errors import FileProblem, FileUnreadable, FileVanished
from stowd.media import Media
from stowd.vr import Item

_T = TypeVar("_T")

CHUNK = 1024 * 1024
FRAGMENT = 2**30  # the largest pixel data fragment written (even)
MAX_VALUE = 0xFFFFFFFE  # the largest even 32-bit value length (0xFFFFFFFF means undefined)
IMPLEMENTATION_CLASS_UID = "2.25.145372541218963355395536254185938472373"
IMPLEMENTATION_VERSION = "STOWD_0_1"

ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_DOCUMENT = Tag(0x0042, 0x0011)
_PIXEL_DATA = Tag(0x7FE0, 0x0010)
_ITEM = struct.pack("<HH", 0xFFFE, 0xE000)
_SEQUENCE_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
_LOSSY_METHOD = {"jpeg": "ISO_10918_1", "jp2": "ISO_15444_1"}
_TITLE_LIMIT = 1024  # DocumentTitle is ST
_NOT_BUILT = {
    "cda": "CDA documents",
    "stl": "STL models",
    "obj": "OBJ models",
    "mtl": "MTL material files",
    "png": "PNG images",
    "gif": "GIF images",
    "mpeg": "MPEG-2 videos",
    "mp4": "MP4 videos",
}


@dataclass(frozen=True)
class Uids:
    """The UIDs of the instance to build (generated once, stored, reused on every retry)."""

    study: str
    series: str
    instance: str


def build(
    source: Path,
    media: Media,
    values: Item,
    uids: Uids,
    target: Path,
    *,
    now: datetime,
    instance_number: int = 1,
) -> int:
    """Write the DICOM file ``target`` for ``source`` (detected as ``media``); return its size.

    ``values`` (keyword -> value) are set on top of the defaults. Raises ``FileProblem`` when
    the file cannot be made into DICOM, ``FileVanished`` when ``source`` is gone and
    ``FileUnreadable`` when it cannot be read now. A partly written ``target`` is removed.
    """
    writer = _writer(media)
    try:
        with open(source, "rb") as fp:
            size = os.fstat(fp.fileno()).st_size
            if writer.tag == _DOCUMENT:
                _document_length(size)
            ds = _dataset(source, media, uids, now=now, instance_number=instance_number, size=size)
            rewrite.apply(ds, values, [])
            head, tail = _split(ds, writer.tag)
            return _write(target, head, tail, fp, size=size, writer=writer)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise FileVanished("the file was removed before it could be sent") from exc
    except IsADirectoryError as exc:
        raise FileVanished("the path is now a folder") from exc
    except OSError as exc:
        raise FileUnreadable.from_os_error(exc, str(source)) from exc


# --- the data set ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Writer:
    tag: BaseTag
    write: Callable[[BinaryIO, BinaryIO, int], None]  # (source, out, size)


def _writer(media: Media) -> _Writer:
    if media.kind == "pdf":
        return _Writer(_DOCUMENT, _write_document)
    if media.kind == "jp2" and media.media_type != "image/j2c":
        raise FileProblem(
            "stowd cannot make DICOM objects from JP2 files yet (DICOM holds the bare JPEG 2000 "
            "codestream, without the JP2 boxes): save the image as a .j2c/.j2k codestream"
        )
    if media.kind in _LOSSY_METHOD:
        return _Writer(_PIXEL_DATA, _write_pixels)
    what = _NOT_BUILT.get(media.kind, f"'{media.kind}' files")
    raise FileProblem(f"stowd cannot make DICOM objects from {what} yet")


def _dataset(
    source: Path, media: Media, uids: Uids, *, now: datetime, instance_number: int, size: int
) -> FileDataset:
    sop_class = ENCAPSULATED_PDF if media.kind == "pdf" else SECONDARY_CAPTURE
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(uids.instance)
    meta.TransferSyntaxUID = UID(media.transfer_syntax or ExplicitVRLittleEndian)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    ds = FileDataset(str(source), Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uids.instance
    ds.StudyInstanceUID = uids.study
    ds.SeriesInstanceUID = uids.series
    for keyword in (
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
        "ReferringPhysicianName", "StudyID", "AccessionNumber", "Manufacturer",
    ):  # fmt: skip
        setattr(ds, keyword, None)
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S.%f")
    if media.kind == "pdf":
        _document_attributes(ds, source, media, now, size)
    else:
        _image_attributes(ds, media)
    return ds


def _document_attributes(ds: Dataset, source: Path, media: Media, now: datetime, size: int) -> None:
    ds.Modality = "DOC"
    ds.ConversionType = "SD"
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S.%f")
    ds.BurnedInAnnotation = "YES"
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = media.media_type
    ds.EncapsulatedDocumentLength = size
    title = _title(source.name)
    if not title.isascii():
        ds.SpecificCharacterSet = rewrite.UTF8
    ds.DocumentTitle = title


def _title(name: str) -> str:
    """The file name as a DocumentTitle (ST): no control characters, at most 1024 characters."""
    kept = "".join(c for c in name if unicodedata.category(c)[0] != "C" and c != "\\")
    return kept[:_TITLE_LIMIT]


def _image_attributes(ds: Dataset, media: Media) -> None:
    if not (media.rows and media.columns and media.samples_per_pixel and media.bits_stored):
        raise FileProblem(f"the {media.kind} image has no pixel description (rows, columns)")
    ds.Modality = "OT"
    ds.ConversionType = "SI"
    ds.PatientOrientation = None
    ds.Laterality = None
    ds.BurnedInAnnotation = "YES"
    ds.Rows = media.rows
    ds.Columns = media.columns
    ds.SamplesPerPixel = media.samples_per_pixel
    ds.PhotometricInterpretation = media.photometric or (
        "MONOCHROME2" if media.samples_per_pixel == 1 else "RGB"
    )
    if media.samples_per_pixel > 1:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8 if media.bits_stored <= 8 else 16
    ds.BitsStored = media.bits_stored
    ds.HighBit = media.bits_stored - 1
    ds.PixelRepresentation = 0
    if media.lossy:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = _LOSSY_METHOD[media.kind]
    else:
        ds.LossyImageCompression = "00"


def _split(ds: FileDataset, bulk: BaseTag) -> tuple[FileDataset, Dataset]:
    """The elements before the bulk element (``ds`` itself) and those after it."""
    if bulk in ds:
        raise FileProblem(f"{ds[bulk].keyword} is the content of the file: rules cannot set it")
    tail = Dataset()
    for tag in [tag for tag in ds.keys() if tag > bulk]:  # noqa: SIM118 - tags, not elements
        tail[tag] = ds[tag]
        del ds[tag]
    return ds, tail


# --- writing -----------------------------------------------------------------------------------


class _TargetError(Exception):
    """Writing the target failed (an OSError of the output, not of the source)."""


def _write(
    target: Path, head: FileDataset, tail: Dataset, fp: BinaryIO, *, size: int, writer: _Writer
) -> int:
    charset = head.get(Tag(0x0008, 0x0005))
    encodings = convert_encodings(charset.value if charset else "ISO_IR 6")
    try:
        try:
            out = open(target, "wb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise _TargetError from exc
        with out:
            _encode(lambda: pydicom.dcmwrite(out, head, enforce_file_format=True))
            writer.write(fp, out, size)
            if fp.read(1):
                raise FileVanished(
                    "the file grew while it was being read (is it still being written?)"
                )
            _out(out, _encode(lambda: _tail_bytes(tail, encodings)))
            return out.tell()
    except BaseException as exc:
        target.unlink(missing_ok=True)
        if isinstance(exc, _TargetError):
            cause = exc.__cause__
            reason = cause.strerror if isinstance(cause, OSError) else None
            raise FileUnreadable(
                f"writing the DICOM file {target} failed: {reason or cause}; it is tried "
                "again later"
            ) from cause
        raise


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


def _write_document(fp: BinaryIO, out: BinaryIO, size: int) -> None:
    _out(out, struct.pack("<HH2sHI", 0x0042, 0x0011, b"OB", 0, _document_length(size)))
    _copy(fp, out, size)
    if size & 1:
        _out(out, b"\0")


def _document_length(size: int) -> int:
    """The value length of a document of ``size`` bytes (padded to even); it must fit 32 bits."""
    length = size + (size & 1)
    if length > MAX_VALUE:
        raise FileProblem(
            f"the document ({size} bytes) is larger than 4 GiB, too large for one DICOM document"
        )
    return length


def _write_pixels(fp: BinaryIO, out: BinaryIO, size: int) -> None:
    _out(out, struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF))
    _out(out, _ITEM + struct.pack("<I", 0))  # an empty Basic Offset Table
    left = size
    while left > 0:
        part = min(left, FRAGMENT)
        padded = part + (part & 1)
        _out(out, _ITEM + struct.pack("<I", padded))
        _copy(fp, out, part)
        if part & 1:
            _out(out, b"\0")
        left -= part
    _out(out, _SEQUENCE_END)


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
        _out(out, view[:got])
        left -= got


def _out(out: BinaryIO, data: bytes | memoryview) -> None:
    try:
        out.write(data)
    except OSError as exc:
        raise _TargetError from exc
