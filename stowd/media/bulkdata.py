"""DICOM objects around bulkdata files: documents, 3D models, images and videos.

``describe_instance`` decides what a file (detected by ``probe.detect``) becomes and returns an
``Instance``: the data set with every attribute but the bulk element, and where that element's
bytes come from (a ``Bulk`` byte range). ``write`` (``stowd.part10``) makes the Part-10 file of
an instance, streaming the bulk value in ``CHUNK`` pieces, so memory does not grow with the
source; ``build`` is both. PNG and GIF images are decoded by ``stowd.decode``; ``Uids``, ``Bulk``
and ``Instance`` are defined in ``stowd.instance``. All of these stay importable from here. For
the PS3.18 metadata + bulkdata form the data set goes as DICOM JSON (``to_json_dict``, with a
BulkDataURI on ``Instance.tag``) and ``metadata_bulk`` says what goes in the bulk part.

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

import os
import unicodedata
from dataclasses import dataclass, replace
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian

from stowd import __version__, dropped
from stowd.errors import FileProblem, FileVanished, reading
from stowd.media import part10, rewrite
from stowd.media.decode import MAX_PIXELS, decode
from stowd.media.instance import DOCUMENT, PIXEL_DATA, Bulk, Instance, Pixels, Uids, bulk_vr
from stowd.media.part10 import CHUNK, FRAGMENT, MAX_VALUE, document_length, write
from stowd.media.reading import Media
from stowd.rules.vr import Item

# the names that moved to instance, part10 and decode stay importable from here
__all__ = [
    "CHUNK",
    "FRAGMENT",
    "MAX_PIXELS",
    "MAX_VALUE",
    "Bulk",
    "Instance",
    "Uids",
    "bulk_vr",
    "write",
]

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

_FRAME_TIME = Tag(0x0018, 0x1063)
_TS = "1.2.840.10008.1.2.4."
_FRAGMENTABLE = ("100", "101", "102", "103", "104", "105", "106")  # <syntax>.1 exists
_TITLE_LIMIT = 1024  # DocumentTitle is ST
_NAMES = {
    "jpeg": "JPEG image",
    "jp2": "JPEG 2000 image",
    "mpeg": "MPEG-2 video",
    "mp4": "video",
}


def describe_instance(
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
    with reading(source), dropped.open_file(source) as fp:
        stat = _same(fp, expect)
        pixels: Pixels | None
        if media.kind in ("png", "gif"):
            check = partial(_check_bits, sop_class=sop_class)
            bulk, pixels = decode(fp, media, _scratch(scratch, media), check)
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
    tag = DOCUMENT if pixels is None else PIXEL_DATA
    if tag in ds:
        raise FileProblem(f"{ds[tag].keyword} is the content of the file: rules cannot set it")
    encapsulated = pixels is not None and bulk.transfer_syntax != ExplicitVRLittleEndian
    return Instance(ds, tag, bulk, encapsulated)


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
    """Write the DICOM file ``target`` for ``source``: ``write(describe_instance(...))``;
    return its size.

    A PNG or GIF is decoded into a scratch file next to ``target``, removed afterwards.
    """
    scratch = target.with_name(f".{target.name}.pixels")
    try:
        instance = describe_instance(
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
            with reading(source):
                size = source.stat().st_size
        return replace(instance.bulk, path=source, offset=0, length=size, media_type="image/jp2")
    return instance.bulk


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
        document_length(size)
        return Bulk(source, 0, size, media.media_type, None, size)
    if media.kind == "jp2" and media.codestream_offset is not None:
        length = media.codestream_length or 0
        return Bulk(
            source, media.codestream_offset, length, "image/j2c", media.transfer_syntax, size
        )
    syntax = media.transfer_syntax
    # part10.MAX_VALUE, not a copy of it: write() uses the same value (the tests lower it)
    if media.kind in ("mpeg", "mp4") and size + (size & 1) > part10.MAX_VALUE:
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


def _pixels(media: Media, sop_class: str) -> Pixels | None:
    if media.kind in _DOCUMENTS:
        return None
    name = _NAMES.get(media.kind, media.kind)
    if not (media.rows and media.columns and media.samples_per_pixel and media.bits_stored):
        raise FileProblem(f"the {name} has no pixel description (rows, columns)")
    pixels = Pixels(
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


def _check_bits(pixels: Pixels, sop_class: str) -> None:
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
        raise ValueError(f"describe_instance needs a scratch path to decode a {media.kind} image")
    return scratch


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


def _image_attributes(ds: Dataset, pixels: Pixels, sop_class: str) -> None:
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


def _video_attributes(ds: Dataset, pixels: Pixels) -> None:
    frame_time = pixels.frame_time_ms or 0.0
    # Type 1C for multi-frame VL images; values (rules) may name the real region
    ds.AnatomicRegionSequence = [_code(*UNKNOWN_REGION)]
    ds.NumberOfFrames = pixels.frames
    ds.FrameIncrementPointer = _FRAME_TIME
    ds.FrameTime = f"{frame_time:.6f}".rstrip("0").rstrip(".")[:16]
    ds.CineRate = max(1, round(1000 / frame_time))


def _pixel_attributes(ds: Dataset, pixels: Pixels) -> None:
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
