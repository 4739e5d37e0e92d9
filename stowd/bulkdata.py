"""DICOM objects around bulkdata files: documents, 3D models, images and videos.

``describe`` decides what a file (detected by ``media.detect``) becomes and returns an
``Instance``: the data set with every attribute but the bulk element, and where that element's
bytes come from (a ``Bulk`` byte range). ``write`` makes the Part-10 file of an instance,
streaming the bulk value in ``CHUNK`` pieces, so memory does not grow with the source;
``build`` is both. For the PS3.18 metadata + bulkdata form the data set goes as DICOM JSON
(``to_json_dict``, with a BulkDataURI on ``Instance.tag``) and ``metadata_bulk`` says what goes
in the bulk part.

======== ================================================ =========================================
kind     SOP class                                        bulk element
======== ================================================ =========================================
pdf      Encapsulated PDF (Modality DOC)                  EncapsulatedDocument (0042,0011), OB,
cda      Encapsulated CDA (Modality SR)                   padded with one 0x00 to an even length;
stl/obj  Encapsulated STL / OBJ (M3D, Frame of Reference) Explicit VR Little Endian
mtl      Encapsulated MTL (M3D)
jpeg     Secondary Capture (OT), or VL Photographic       PixelData (7FE0,0010) encapsulated in the
jp2      (XC) when ``photographic``                       stream's syntax, fragments of at most
                                                          ``FRAGMENT`` bytes; a .jp2 file: only the
                                                          codestream of its jp2c box
png/gif  as jpeg                                          PixelData native (decoded with Pillow to
                                                          8-bit RGB or MONOCHROME2, 16-bit grey PNG
                                                          to 16 bits), Explicit VR Little Endian
mpeg/mp4 Video Photographic (XC)                          PixelData encapsulated: the whole file
                                                          (MPEG-2 stream, or MP4/QuickTime container
                                                          as dcm4che does) in one fragment
======== ================================================ =========================================
"""

from __future__ import annotations

import copy
import os
import struct
import threading
import unicodedata
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, TypeVar

import pydicom
from PIL import Image
from pydicom.charset import convert_encodings
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, ExplicitVRLittleEndian

from stowd import __version__, rewrite
from stowd.errors import FileProblem, FileUnreadable, FileVanished
from stowd.media import Media
from stowd.vr import Item

_T = TypeVar("_T")

CHUNK = 1024 * 1024
FRAGMENT = 2**30  # the largest pixel data fragment written for an image (even)
MAX_VALUE = 0xFFFFFFFE  # the largest even 32-bit value length (0xFFFFFFFF means undefined)
MAX_PIXELS = 25_000_000  # a larger PNG or GIF is refused: decoding holds ~12 bytes a pixel
IMPLEMENTATION_CLASS_UID = "2.25.145372541218963355395536254185938472373"
IMPLEMENTATION_VERSION = "STOWD_0_1"

ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
ENCAPSULATED_CDA = "1.2.840.10008.5.1.4.1.1.104.2"
ENCAPSULATED_STL = "1.2.840.10008.5.1.4.1.1.104.3"
ENCAPSULATED_OBJ = "1.2.840.10008.5.1.4.1.1.104.4"
ENCAPSULATED_MTL = "1.2.840.10008.5.1.4.1.1.104.5"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
VL_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4"
VIDEO_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4.1"

# Equipment written into 3D models (Enhanced General Equipment is Type 1); values override it.
MODEL_EQUIPMENT = {
    "Manufacturer": "stowd",
    "ManufacturerModelName": "stowd bulkdata converter",
    "DeviceSerialNumber": "0",
    "SoftwareVersions": __version__,
}

# The Anatomic Region of a video when the rules name none (VL Image: Type 1C for multi-frame):
# SNOMED CT's "Anatomical Structure", the most general region there is.
UNKNOWN_REGION = ("123037004", "SCT", "Anatomical Structure")

# Pillow refuses images above its own limit; ours (checked from the header first) replaces it.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
_DECODING = threading.Lock()

_DOCUMENT = Tag(0x0042, 0x0011)
_PIXEL_DATA = Tag(0x7FE0, 0x0010)
_FRAME_TIME = Tag(0x0018, 0x1063)
_ITEM = struct.pack("<HH", 0xFFFE, 0xE000)
_SEQUENCE_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
_TS = "1.2.840.10008.1.2.4."
_FRAGMENTABLE = ("100", "101", "102", "103", "104", "105", "106")  # <syntax>.1 exists
_VIDEO_SYNTAXES = {_TS + s for s in ("100", "101", "102", "103", "104", "105", "106", "107", "108")}
_TITLE_LIMIT = 1024  # DocumentTitle is ST
_FOR_NAMESPACE = uuid.UUID("6f0c2c55-3b53-4f1e-9c59-5d1d2f0c6a21")  # stowd frames of reference
_NAMES = {
    "jpeg": "JPEG image",
    "jp2": "JPEG 2000 image",
    "png": "PNG image",
    "gif": "GIF image",
    "mpeg": "MPEG-2 video",
    "mp4": "video",
}


@dataclass(frozen=True)
class Uids:
    """The UIDs of the instance to build (generated once, stored, reused on every retry).

    ``frame_of_reference`` (STL and OBJ models): when None, one is derived from ``instance``,
    so it is the same on every retry.
    """

    study: str
    series: str
    instance: str
    frame_of_reference: str | None = None

    def frame_of_reference_uid(self) -> str:
        if self.frame_of_reference:
            return self.frame_of_reference
        return f"2.25.{uuid.uuid5(_FOR_NAMESPACE, self.instance).int}"


@dataclass(frozen=True)
class Bulk:
    """Where the bulk value's bytes come from.

    ``media_type`` is the bulk part's Content-Type in the metadata form: application/pdf,
    text/xml, model/stl, model/obj, model/mtl, image/jpeg, image/jp2 (a whole .jp2 file),
    image/j2c (a bare codestream), video/mpeg, video/mp4, video/quicktime, or
    application/octet-stream (native pixels). ``transfer_syntax`` is set for pixel data only.
    ``file_size`` and ``mtime_ns`` are those of ``path`` when it was described: ``write``
    refuses a file that changed since (None: not checked).
    """

    path: Path
    offset: int
    length: int
    media_type: str
    transfer_syntax: str | None
    file_size: int | None = None
    mtime_ns: int | None = None


@dataclass(frozen=True)
class Instance:
    """A DICOM instance to send: every attribute but the bulk element, and the bulk value.

    ``dataset`` holds the file meta too, and the values (rules) are applied. ``tag`` is
    EncapsulatedDocument or PixelData; ``encapsulated`` is True for pixel data in fragments
    (compressed), False for a native value or a document.
    """

    dataset: FileDataset
    tag: BaseTag
    bulk: Bulk
    encapsulated: bool


def describe(
    source: Path,
    media: Media,
    values: Item,
    uids: Uids,
    *,
    now: datetime,
    instance_number: int = 1,
    photographic: bool = False,
    scratch: Path | None = None,
    expect: tuple[int, int] | None = None,
) -> Instance:
    """Describe the DICOM instance for ``source`` (detected as ``media``).

    ``values`` (keyword -> value) are set on top of the defaults. PNG and GIF images are decoded
    into ``scratch`` (required for them), which the caller removes when done with the instance.
    Raises ``FileProblem`` when the file cannot be made into DICOM, ``FileVanished`` when
    ``source`` is gone or no longer has the (size, mtime_ns) ``expect``ed, and
    ``FileUnreadable`` when it cannot be read (or scratch not written) now.
    """
    sop_class = sop_class_for(media, photographic=photographic)
    with _reading(source), open(source, "rb") as fp:
        stat = _same(fp, expect)
        pixels: _Pixels | None
        if media.kind in ("png", "gif"):
            with _DECODING:  # one image in memory at a time, whatever the number of workers
                bulk, pixels = _decode(fp, media, _scratch(scratch, media), sop_class)
            _same(fp, stat)  # the pixels are those of the file that was queued
        else:
            bulk = replace(_bulk(source, media, stat[0]), mtime_ns=stat[1])
            pixels = _pixels(media, sop_class)
        size = stat[0]
    ds = _base(source, sop_class, bulk.transfer_syntax, uids, now=now, number=instance_number)
    if pixels is None:
        _document_attributes(ds, source, media, uids, now=now, size=size)
    else:
        _image_attributes(ds, pixels, sop_class)
    rewrite.apply(ds, values, [])
    tag = _DOCUMENT if pixels is None else _PIXEL_DATA
    if tag in ds:
        raise FileProblem(f"{ds[tag].keyword} is the content of the file: rules cannot set it")
    encapsulated = pixels is not None and bulk.transfer_syntax != ExplicitVRLittleEndian
    return Instance(ds, tag, bulk, encapsulated)


def write(instance: Instance, target: Path) -> int:
    """Write the Part-10 file ``target`` of ``instance``; return its size.

    The bulk value is streamed from ``instance.bulk`` in ``CHUNK`` pieces. Raises
    ``FileVanished`` when the bulk file is gone or changed its size, ``FileUnreadable`` when it
    cannot be read or ``target`` not written now. A partly written ``target`` is removed.
    """
    head, tail = _split(instance.dataset, instance.tag)
    bulk = instance.bulk
    with _reading(bulk.path), open(bulk.path, "rb") as fp:
        st = os.fstat(fp.fileno())
        if (bulk.file_size, bulk.mtime_ns) != (
            st.st_size if bulk.file_size is not None else None,
            st.st_mtime_ns if bulk.mtime_ns is not None else None,
        ):
            raise FileVanished(
                "the file changed after it was looked at (is it still being written?)"
            )
        fp.seek(bulk.offset)
        with _writing(target, "the DICOM file") as out:
            _encode(lambda: pydicom.dcmwrite(out, head, enforce_file_format=True))
            _write_bulk(fp, out, instance)
            _check_end(fp, bulk)
            _out(out, _encode(lambda: _tail_bytes(tail, _encodings(head))))
            return out.tell()


def build(
    source: Path,
    media: Media,
    values: Item,
    uids: Uids,
    target: Path,
    *,
    now: datetime,
    instance_number: int = 1,
    photographic: bool = False,
    expect: tuple[int, int] | None = None,
) -> int:
    """Write the DICOM file ``target`` for ``source``: ``write(describe(...))``; return its size.

    A PNG or GIF is decoded into a scratch file next to ``target``, removed afterwards.
    """
    scratch = target.with_name(f".{target.name}.pixels")
    try:
        instance = describe(
            source,
            media,
            values,
            uids,
            now=now,
            instance_number=instance_number,
            photographic=photographic,
            scratch=scratch,
            expect=expect,
        )
        return write(instance, target)
    finally:
        scratch.unlink(missing_ok=True)


def metadata_bulk(instance: Instance, source: Path, media: Media) -> Bulk:
    """The bulk part of the metadata + bulkdata form: a .jp2 file whole (image/jp2), else
    ``instance.bulk`` (the document, the compressed stream, the native pixels)."""
    if media.kind == "jp2" and media.media_type == "image/jp2":
        size = instance.bulk.file_size
        if size is None:
            with _reading(source):
                size = source.stat().st_size
        return replace(instance.bulk, path=source, offset=0, length=size, media_type="image/jp2")
    return instance.bulk


def bulk_vr(instance: Instance) -> str:
    """The VR of the bulk element (for the BulkDataURI in DICOM JSON): OB, or OW for native
    pixels of more than 8 bits."""
    native = instance.tag == _PIXEL_DATA and not instance.encapsulated
    return "OW" if native and instance.dataset.get("BitsAllocated", 8) > 8 else "OB"


# --- what a file becomes -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Document:
    sop_class: str
    modality: str
    conversion: str | None  # SC Equipment's ConversionType (the models have no such module)
    mime: str  # MIMETypeOfEncapsulatedDocument


_DOCUMENTS = {
    "pdf": _Document(ENCAPSULATED_PDF, "DOC", "SD", "application/pdf"),
    "cda": _Document(ENCAPSULATED_CDA, "SR", "WSD", "text/XML"),  # PS3.3 A.45.2: "text/XML"
    "stl": _Document(ENCAPSULATED_STL, "M3D", None, "model/stl"),
    "obj": _Document(ENCAPSULATED_OBJ, "M3D", None, "model/obj"),
    "mtl": _Document(ENCAPSULATED_MTL, "M3D", None, "model/mtl"),
}


@dataclass(frozen=True)
class _Pixels:
    """The Image Pixel description of an image or video."""

    rows: int
    columns: int
    samples: int
    bits: int
    photometric: str
    lossy: str | None  # LossyImageCompressionMethod, None when lossless
    frames: int | None = None  # video only
    frame_time_ms: float | None = None


def _same(fp: BinaryIO, expect: tuple[int, int] | None) -> tuple[int, int]:
    """The (size, mtime_ns) of the open file; ``FileVanished`` when not ``expect``ed."""
    st = os.fstat(fp.fileno())
    found = (st.st_size, st.st_mtime_ns)
    if expect is not None and found != expect:
        raise FileVanished("the file changed after it was queued (it is queued again)")
    return found


def sop_class_for(media: Media, *, photographic: bool) -> str:
    """The SOP Class made from ``media``: as ``sop_class_of``, except that a JPEG 2000 image
    in RGB (no colour transform) stays Secondary Capture, since VL Photographic allows only
    YBR_ICT or YBR_RCT for JPEG 2000."""
    rgb_j2k = media.kind == "jp2" and media.photometric == "RGB"
    return sop_class_of(media.kind, photographic=photographic and not rgb_j2k)


def sop_class_of(kind: str, *, photographic: bool) -> str:
    """The SOP Class of the instance made from a file of ``kind``."""
    if kind in _DOCUMENTS:
        return _DOCUMENTS[kind].sop_class
    if kind in ("mpeg", "mp4"):
        return VIDEO_PHOTOGRAPHIC
    if kind in ("jpeg", "jp2", "png", "gif"):
        return VL_PHOTOGRAPHIC if photographic else SECONDARY_CAPTURE
    raise FileProblem(f"stowd cannot make DICOM objects from '{kind}' files")


def _bulk(source: Path, media: Media, size: int) -> Bulk:
    if media.kind in _DOCUMENTS:
        _document_length(size)
        return Bulk(source, 0, size, media.media_type, None, size)
    if media.kind == "jp2" and media.codestream_offset is not None:
        length = media.codestream_length or 0
        return Bulk(
            source, media.codestream_offset, length, "image/j2c", media.transfer_syntax, size
        )
    syntax = media.transfer_syntax
    if media.kind in ("mpeg", "mp4") and size + (size & 1) > MAX_VALUE:
        syntax = _fragmentable(size, syntax)
    return Bulk(source, 0, size, media.media_type, syntax, size)


def _fragmentable(size: int, syntax: str | None) -> str:
    """A video over 4 GiB needs the Fragmentable variant of its transfer syntax (PS3.5
    Supplement 225: the stream split into several fragments); HEVC has none."""
    if syntax is None or syntax.removeprefix(_TS) not in _FRAGMENTABLE:
        raise FileProblem(
            f"the video ({size} bytes) is larger than 4 GiB, and DICOM has no transfer syntax "
            "that splits an HEVC stream over several fragments: cut it into shorter parts"
        )
    return f"{syntax}.1"


def _pixels(media: Media, sop_class: str) -> _Pixels | None:
    if media.kind in _DOCUMENTS:
        return None
    name = _NAMES.get(media.kind, media.kind)
    if not (media.rows and media.columns and media.samples_per_pixel and media.bits_stored):
        raise FileProblem(f"the {name} has no pixel description (rows, columns)")
    pixels = _Pixels(
        media.rows,
        media.columns,
        media.samples_per_pixel,
        media.bits_stored,
        media.photometric or ("MONOCHROME2" if media.samples_per_pixel == 1 else "RGB"),
        _lossy_method(media),
    )
    _check_bits(pixels, sop_class)
    if media.kind in ("mpeg", "mp4"):
        return replace(pixels, frames=_frames(media), frame_time_ms=_frame_time(media))
    return pixels


def _lossy_method(media: Media) -> str | None:
    if not media.lossy:
        return None
    if media.kind == "mp4":
        return (
            "ISO_23008_2" if media.transfer_syntax in (_TS + "107", _TS + "108") else "ISO_14496_10"
        )
    return {"jpeg": "ISO_10918_1", "jp2": "ISO_15444_1", "mpeg": "ISO_13818_2"}[media.kind]


def _frames(media: Media) -> int:
    if media.frames:
        return media.frames
    if media.kind == "mpeg":
        raise FileProblem(
            "the MPEG-2 video has no group-of-pictures time codes near its end, so stowd cannot "
            "tell how many frames it has (DICOM needs the number): re-encode it, e.g. with ffmpeg"
        )
    raise FileProblem(
        "the video's index lists no frames (is it a fragmented MP4, as some recorders write?), "
        "so stowd cannot tell how many frames it has: remux it, e.g. with ffmpeg -c copy"
    )


def _frame_time(media: Media) -> float:
    if media.frame_time_ms:
        return media.frame_time_ms
    raise FileProblem(
        "the video's index gives no duration, so stowd cannot tell its frame rate: remux it, "
        "e.g. with ffmpeg -c copy"
    )


def _check_bits(pixels: _Pixels, sop_class: str) -> None:
    """The VL Image module (photographs and videos) has 8 bits per sample only."""
    if sop_class == SECONDARY_CAPTURE or pixels.bits <= 8:
        return
    if sop_class == VIDEO_PHOTOGRAPHIC:
        raise FileProblem(
            f"the video has {pixels.bits} bits per sample, but DICOM videos hold 8 only: "
            "re-encode it with 8 bits (e.g. H.264 High profile)"
        )
    raise FileProblem(
        f"the image has {pixels.bits} bits per sample, but DICOM photographs (VL Photographic) "
        "hold 8 only; it can be sent as a Secondary Capture, without the photographic setting"
    )


# --- PNG and GIF: decoded to native pixels -----------------------------------------------------


def _scratch(scratch: Path | None, media: Media) -> Path:
    if scratch is None:
        raise ValueError(f"describe needs a scratch path to decode a {media.kind} image")
    return scratch


def _decode(fp: BinaryIO, media: Media, scratch: Path, sop_class: str) -> tuple[Bulk, _Pixels]:
    """Decode a PNG or GIF (the first frame of an animated GIF only) into ``scratch``."""
    name = _NAMES[media.kind]
    if (media.rows or 0) * (media.columns or 0) > MAX_PIXELS:
        raise FileProblem(
            f"the {name} has {media.columns} x {media.rows} pixels, more than stowd decodes "
            f"({MAX_PIXELS // 1_000_000} megapixels)"
        )
    try:
        with Image.open(fp, formats=[media.kind.upper()]) as img:
            img.load()  # frame 0: an animated GIF gives its first frame only
            mode = _plain_mode(img)
            pixels = _Pixels(
                img.height,
                img.width,
                3 if mode == "RGB" else 1,
                16 if mode == "I;16" else 8,
                "RGB" if mode == "RGB" else "MONOCHROME2",
                None,
            )
            _check_bits(pixels, sop_class)
            length = _save(img, mode, scratch)
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error, struct.error) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # a read error of the source: tried again later
        raise FileProblem(f"the {name} is truncated or damaged: {exc}") from exc
    native = "application/octet-stream"
    return Bulk(scratch, 0, length, native, ExplicitVRLittleEndian, length), pixels


def _plain_mode(img: Image.Image) -> str:
    """What the pixels become: 8-bit ``RGB`` or grey ``L``, or 16-bit grey ``I;16``."""
    if img.mode.startswith("I"):
        return "I;16"
    grey = img.mode in ("1", "L", "LA", "La") or (img.mode in ("P", "PA") and _grey_palette(img))
    return "L" if grey else "RGB"


def _plain(band: Image.Image, mode: str) -> Image.Image:
    """A band of the image in ``mode``, transparency laid on white."""
    if mode == "I;16":
        return band if band.mode == "I;16" else band.convert("I;16")
    if band.has_transparency_data:
        background = Image.new("RGBA", band.size, (255, 255, 255, 255))
        band = Image.alpha_composite(background, band.convert("RGBA"))
    return band.convert(mode)


def _grey_palette(img: Image.Image) -> bool:
    palette = img.getpalette() or []
    return all(
        palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette) - 2, 3)
    )


def _save(img: Image.Image, mode: str, scratch: Path) -> int:
    """Write the pixels to ``scratch`` band by band (each converted on its own, so only one
    band is ever held twice); return the number of bytes."""
    row = img.width * (2 if mode == "I;16" else 3 if mode == "RGB" else 1)
    band = max(1, CHUNK // row)
    with _writing(scratch, "the scratch file for the decoded pixels") as out:
        for top in range(0, img.height, band):
            part = img.crop((0, top, img.width, min(top + band, img.height)))
            _out(out, _plain(part, mode).tobytes())
        return out.tell()


# --- the data set ------------------------------------------------------------------------------


def _base(
    source: Path, sop_class: str, syntax: str | None, uids: Uids, *, now: datetime, number: int
) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(uids.instance)
    meta.TransferSyntaxUID = UID(syntax or ExplicitVRLittleEndian)
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
    ds.InstanceNumber = number
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S.%f")
    return ds


def _document_attributes(
    ds: Dataset, source: Path, media: Media, uids: Uids, *, now: datetime, size: int
) -> None:
    kind = _DOCUMENTS[media.kind]
    ds.Modality = kind.modality
    if kind.conversion:
        ds.ConversionType = kind.conversion
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S.%f")
    ds.BurnedInAnnotation = "YES"
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = kind.mime
    ds.EncapsulatedDocumentLength = size
    title = _title(source.name)
    if not title.isascii():
        ds.SpecificCharacterSet = rewrite.UTF8
    ds.DocumentTitle = title
    if media.kind == "cda":
        ds.HL7InstanceIdentifier = _cda_id(media)
    elif kind.modality == "M3D":
        _model_attributes(ds, media, uids)


def _title(name: str) -> str:
    """The file name as a DocumentTitle (ST): no control characters, at most 1024 characters."""
    kept = "".join(c for c in name if unicodedata.category(c)[0] != "C" and c != "\\")
    return kept[:_TITLE_LIMIT]


def _cda_id(media: Media) -> str:
    if not media.document_id:
        raise FileProblem(
            "the CDA document has no document id (an <id root=...> right under "
            "<ClinicalDocument>, in its first MiB), or its XML is damaged before it; DICOM "
            "needs that id"
        )
    return media.document_id[:_TITLE_LIMIT]


def _model_attributes(ds: Dataset, media: Media, uids: Uids) -> None:
    if media.kind != "mtl":
        ds.FrameOfReferenceUID = uids.frame_of_reference_uid()
        ds.PositionReferenceIndicator = None
    for keyword, value in MODEL_EQUIPMENT.items():
        setattr(ds, keyword, value)
    ds.MeasurementUnitsCodeSequence = [_code("mm", "UCUM", "millimeter")]


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _image_attributes(ds: Dataset, pixels: _Pixels, sop_class: str) -> None:
    if sop_class == SECONDARY_CAPTURE:
        ds.Modality = "OT"
        ds.ConversionType = "SI"
    else:
        ds.Modality = "XC"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.AcquisitionContextSequence = []
    ds.PatientOrientation = None
    ds.Laterality = None  # dciodvfy wants this Type 2C element (a warning when empty)
    ds.BurnedInAnnotation = "YES"
    if pixels.frames is not None:
        _video_attributes(ds, pixels)
    _pixel_attributes(ds, pixels)


def _video_attributes(ds: Dataset, pixels: _Pixels) -> None:
    frame_time = pixels.frame_time_ms or 0.0
    # Type 1C for multi-frame VL images; values (rules) may name the real region
    ds.AnatomicRegionSequence = [_code(*UNKNOWN_REGION)]
    ds.NumberOfFrames = pixels.frames
    ds.FrameIncrementPointer = _FRAME_TIME
    ds.FrameTime = f"{frame_time:.6f}".rstrip("0").rstrip(".")[:16]
    ds.CineRate = max(1, round(1000 / frame_time))


def _pixel_attributes(ds: Dataset, pixels: _Pixels) -> None:
    ds.Rows = pixels.rows
    ds.Columns = pixels.columns
    ds.SamplesPerPixel = pixels.samples
    ds.PhotometricInterpretation = pixels.photometric
    if pixels.samples > 1:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8 if pixels.bits <= 8 else 16
    ds.BitsStored = pixels.bits
    ds.HighBit = pixels.bits - 1
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "01" if pixels.lossy else "00"
    if pixels.lossy:
        ds.LossyImageCompressionMethod = pixels.lossy


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
def _reading(source: Path) -> Iterator[None]:
    """Turn the OSErrors of reading ``source`` into stowd's errors."""
    try:
        yield
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise FileVanished("the file was removed before it could be sent") from exc
    except IsADirectoryError as exc:
        raise FileVanished("the path is now a folder") from exc
    except OSError as exc:
        raise FileUnreadable.from_os_error(exc, str(source)) from exc


@contextmanager
def _writing(target: Path, what: str) -> Iterator[BinaryIO]:
    """Open ``target`` for writing; on any error remove it, and report its own OSErrors."""
    try:
        try:
            out = open(target, "wb")  # noqa: SIM115 - closed below
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
    if instance.tag == _DOCUMENT:
        length = _document_length(bulk.length)
    group, element = instance.tag >> 16, instance.tag & 0xFFFF
    vr = bulk_vr(instance).encode()
    _out(out, struct.pack("<HH2sHI", group, element, vr, 0, length))
    _copy(fp, out, bulk.length)
    if bulk.length & 1:
        _out(out, b"\0")


def _document_length(size: int) -> int:
    """The value length of a document of ``size`` bytes (padded to even); it must fit 32 bits."""
    length = size + (size & 1)
    if length > MAX_VALUE:
        raise FileProblem(
            f"the document ({size} bytes) is larger than 4 GiB, too large for one DICOM document"
        )
    return length


def _write_fragments(fp: BinaryIO, out: BinaryIO, size: int, fragment: int) -> None:
    _out(out, struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF))
    _out(out, _ITEM + struct.pack("<I", 0))  # an empty Basic Offset Table
    left = size
    while left > 0:
        part = min(left, fragment)
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


def _check_end(fp: BinaryIO, bulk: Bulk) -> None:
    """Refuse a file that is longer now than when it was described, or was written to."""
    end = bulk.file_size if bulk.file_size is not None else bulk.offset + bulk.length
    fp.seek(end)
    if fp.read(1) or (
        bulk.mtime_ns is not None and os.fstat(fp.fileno()).st_mtime_ns != bulk.mtime_ns
    ):
        raise FileVanished("the file changed while it was being read (is it still being written?)")


def _out(out: BinaryIO, data: bytes | memoryview) -> None:
    try:
        out.write(data)
    except OSError as exc:
        raise _TargetError from exc
