"""Building DICOM objects around documents, 3D models, images and videos.

Every object is read back with pydicom (attributes, and the embedded bytes equal to the
source's byte for byte) and checked with dciodvfy, which must print no ``Error`` line.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
import pytest
from PIL import Image
from pydicom.encaps import generate_fragments, generate_frames
from pydicom.uid import UID
from test_media import (
    DOC_ID,
    GIB,
    H264,
    HEVC,
    MP4,
    MPEG2,
    MTL,
    OBJ,
    PDF,
    STL_ASCII,
    STL_BINARY,
    TS,
    cda,
    codestream,
    ffmpeg_clip,
    jp2,
    jpeg,
    mpeg2,
)

from stowd.errors import FileProblem, FileUnreadable, FileVanished
from stowd.media import bulkdata, part10
from stowd.media.bulkdata import build
from stowd.media.instance import Uids
from stowd.media.probe import detect
from stowd.media.reading import Media
from stowd.rules.vr import Item

UIDS = Uids("2.25.1001", "2.25.1002", "2.25.1003")
NOW = datetime(2026, 11, 27, 14, 30, 5, 123456, tzinfo=UTC)
DCIODVFY = Path("/usr/bin/dciodvfy")
FFMPEG = Path("/usr/bin/ffmpeg")
EVEN_PDF = PDF + b"\n" if len(PDF) % 2 else PDF
ODD_PDF = EVEN_PDF + b"\n"


def require(tool: Path) -> None:
    if tool.exists():
        return
    if os.environ.get("CI") == "true":  # CI installs the tools: it must never skip
        pytest.fail(f"CI=true but {tool} is not installed", pytrace=False)
    pytest.skip(f"{tool} is not installed")


def dciodvfy_errors(path: Path) -> list[str]:
    require(DCIODVFY)
    done = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, check=False)
    lines = (done.stdout + done.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def make(
    tmp_path: Path,
    name: str,
    data: bytes,
    values: Item | None = None,
    *,
    instance_number: int = 1,
    photographic: bool = False,
) -> tuple[Path, Media, pydicom.FileDataset]:
    source = tmp_path / name
    source.write_bytes(data)
    target = tmp_path / f"{name}.dcm"
    found = detect(source)
    size = build(
        source,
        found,
        values or {},
        UIDS,
        target,
        now=NOW,
        instance_number=instance_number,
        photographic=photographic,
    )
    assert size == target.stat().st_size
    return target, found, pydicom.dcmread(target)


def assert_valid(target: Path) -> None:
    errors = dciodvfy_errors(target)
    assert not errors, "\n".join(errors)


def embedded(ds: pydicom.Dataset, length: int) -> bytes:
    """The bytes of the bulk value: the document, or the fragments joined; checks the padding."""
    if "EncapsulatedDocument" in ds:
        value = bytes(ds.EncapsulatedDocument)
    else:
        offsets, *fragments = generate_fragments(ds.PixelData)
        assert offsets == b""  # an empty Basic Offset Table
        value = b"".join(fragments)
    assert len(value) == length + length % 2
    assert value[length:] in (b"", b"\0")
    return value[:length]


def ffmpeg_jpeg(tmp_path: Path) -> bytes:
    require(FFMPEG)
    out = tmp_path / "made.jpg"
    source = ["-f", "lavfi", "-i", "testsrc=size=64x48", "-frames:v", "1"]
    command = [str(FFMPEG), "-v", "error", *source, "-pix_fmt", "yuvj420p", str(out)]
    subprocess.run(command, check=True)
    return out.read_bytes()


# --- PDF -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [EVEN_PDF, ODD_PDF], ids=["even", "odd"])
def test_a_pdf_becomes_an_encapsulated_pdf(tmp_path: Path, data: bytes) -> None:
    target, _, ds = make(tmp_path, "report.pdf", data, instance_number=7)
    meta = ds.file_meta
    assert meta.MediaStorageSOPClassUID == bulkdata.ENCAPSULATED_PDF
    assert meta.MediaStorageSOPInstanceUID == UIDS.instance
    assert meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert meta.ImplementationClassUID == bulkdata.IMPLEMENTATION_CLASS_UID
    assert ds.SOPClassUID == bulkdata.ENCAPSULATED_PDF
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) == (
        UIDS.study,
        UIDS.series,
        UIDS.instance,
    )
    assert (ds.Modality, ds.ConversionType, ds.BurnedInAnnotation) == ("DOC", "SD", "YES")
    assert ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert ds.DocumentTitle == "report.pdf"
    assert ds.EncapsulatedDocumentLength == len(data)
    assert (ds.ContentDate, ds.ContentTime) == ("20261127", "143005.123456")
    assert ds.AcquisitionDateTime == "20261127143005.123456"
    assert (ds.InstanceNumber, ds.SeriesNumber) == (7, 1)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                    "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
                    "Manufacturer"):  # fmt: skip
        assert keyword in ds and ds[keyword].is_empty, keyword
    assert "SpecificCharacterSet" not in ds  # all values are ASCII
    document = ds.EncapsulatedDocument
    assert len(document) == len(data) + len(data) % 2
    assert document[: len(data)] == data
    assert document[len(data) :] in (b"", b"\0")
    tags = list(ds.keys())
    assert tags == sorted(tags) and tags[-1] == 0x00420015  # the length after the document
    errors = dciodvfy_errors(target)
    assert not errors, "\n".join(errors)


def test_values_are_applied_and_non_ascii_text_switches_to_utf8(tmp_path: Path) -> None:
    values: Item = {
        "PatientID": "P-42",
        "PatientName": "Müller^Jürgen",
        "AccessionNumber": "A7",
        "DocumentTitle": "Befund Röntgen",
        "SeriesNumber": 3,
    }
    target, _, ds = make(tmp_path, "befund.pdf", ODD_PDF, values)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert (ds.PatientID, str(ds.PatientName), ds.AccessionNumber) == (
        "P-42",
        "Müller^Jürgen",
        "A7",
    )
    assert (ds.DocumentTitle, ds.SeriesNumber) == ("Befund Röntgen", 3)
    assert "Müller".encode() in target.read_bytes()
    errors = dciodvfy_errors(target)
    assert not errors, "\n".join(errors)


def test_a_non_ascii_file_name_is_a_utf8_document_title(tmp_path: Path) -> None:
    _, _, ds = make(tmp_path, "Überweisung\x07.pdf", EVEN_PDF)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert ds.DocumentTitle == "Überweisung.pdf"  # control characters dropped


def test_a_rule_cannot_set_the_document_itself(tmp_path: Path) -> None:
    source = tmp_path / "a.pdf"
    source.write_bytes(EVEN_PDF)
    target = tmp_path / "a.dcm"
    with pytest.raises(FileProblem, match="EncapsulatedDocument"):
        build(source, detect(source), {"EncapsulatedDocument": "x"}, UIDS, target, now=NOW)
    assert not target.exists()


# --- JPEG ----------------------------------------------------------------------------------------


def pixel_fragments(ds: pydicom.FileDataset) -> list[bytes]:
    """The fragments after the Basic Offset Table item, which must be empty."""
    offsets, *fragments = generate_fragments(ds.PixelData)
    assert offsets == b""
    return fragments


def test_a_real_jpeg_becomes_a_secondary_capture(tmp_path: Path) -> None:
    data = ffmpeg_jpeg(tmp_path)
    target, found, ds = make(tmp_path, "photo.jpg", data, {"PatientID": "P1"})
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    assert ds.file_meta.MediaStorageSOPClassUID == bulkdata.SECONDARY_CAPTURE
    assert (ds.SOPClassUID, ds.ConversionType, ds.PatientID) == (
        bulkdata.SECONDARY_CAPTURE,
        "SI",
        "P1",
    )
    assert (ds.Rows, ds.Columns, ds.SamplesPerPixel) == (48, 64, 3)
    assert (ds.PhotometricInterpretation, ds.PlanarConfiguration) == ("YBR_FULL_422", 0)
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (8, 8, 7, 0)
    assert (ds.LossyImageCompression, ds.LossyImageCompressionMethod) == ("01", "ISO_10918_1")
    assert list(ds.keys())[-1] == 0x7FE00010  # the pixel data is last
    frames = list(generate_frames(ds.PixelData, number_of_frames=1))
    padded = data + b"\0" * (len(data) % 2)
    assert frames == [padded]
    raw = target.read_bytes()
    assert raw.endswith(b"\xfe\xff\xdd\xe0\0\0\0\0")  # Sequence Delimitation Item
    assert found.photometric == "YBR_FULL_422"
    errors = dciodvfy_errors(target)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("pad", [0, 1], ids=["even", "odd"])
def test_a_grey_jpeg_and_odd_length_padding(tmp_path: Path, pad: int) -> None:
    data = jpeg(components=b"\x01", sampling=b"\x11")
    data += b"\0" * ((len(data) + pad) % 2)  # zeros after EOI are tolerated by decoders
    assert len(data) % 2 == pad
    target, _, ds = make(tmp_path, "grey.jpg", data)
    assert (ds.Rows, ds.Columns, ds.SamplesPerPixel) == (480, 640, 1)
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    assert "PlanarConfiguration" not in ds
    (fragment,) = pixel_fragments(ds)
    assert fragment == data + b"\0" * pad
    errors = dciodvfy_errors(target)
    assert not errors, "\n".join(errors)


def test_a_large_stream_is_split_into_even_fragments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(part10, "FRAGMENT", 4096)
    monkeypatch.setattr(part10, "CHUNK", 1000)
    data = jpeg(components=b"\x01", sampling=b"\x11")
    data += b"\0" * (1 - len(data) % 2)  # odd: the last fragment is padded
    _, _, ds = make(tmp_path, "large.jpg", data)
    fragments = pixel_fragments(ds)
    assert len(fragments) == -(-len(data) // 4096) > 1
    assert all(len(f) == 4096 for f in fragments[:-1])
    assert len(fragments[-1]) % 2 == 0
    assert b"".join(fragments) == data + b"\0"
    assert list(generate_frames(ds.PixelData, number_of_frames=1)) == [data + b"\0"]


def test_a_12_bit_jpeg_has_16_bits_allocated(tmp_path: Path) -> None:
    data = jpeg(0xC1, (64, 80), components=b"\x01", sampling=b"\x11", precision=12)
    target, _, ds = make(tmp_path, "extended.jpg", data)
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 12, 11)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.51"
    errors = dciodvfy_errors(target)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize(
    ("rev", "syntax", "photometric"),
    [(1, "90", "YBR_RCT"), (0, "91", "YBR_ICT")],
    ids=["lossless", "lossy"],
)
def test_a_jpeg_2000_codestream(tmp_path: Path, rev: int, syntax: str, photometric: str) -> None:
    data = codestream(rev=rev)
    target, _, ds = make(tmp_path, "scan.j2c", data)
    assert ds.file_meta.TransferSyntaxUID == f"1.2.840.10008.1.2.4.{syntax}"
    assert (ds.Rows, ds.Columns, ds.PhotometricInterpretation) == (300, 400, photometric)
    assert ds.LossyImageCompression == ("01" if rev == 0 else "00")
    if rev == 0:
        assert ds.LossyImageCompressionMethod == "ISO_15444_1"
    assert pixel_fragments(ds) == [data + b"\0" * (len(data) % 2)]
    errors = dciodvfy_errors(target)
    assert not errors, "\n".join(errors)


# --- CDA -----------------------------------------------------------------------------------------


def test_a_cda_document_becomes_an_encapsulated_cda(tmp_path: Path) -> None:
    data = cda(DOC_ID)
    target, _, ds = make(tmp_path, "letter.xml", data)
    assert ds.SOPClassUID == bulkdata.ENCAPSULATED_CDA == ds.file_meta.MediaStorageSOPClassUID
    assert (ds.Modality, ds.ConversionType) == ("SR", "WSD")
    assert ds.MIMETypeOfEncapsulatedDocument == "text/XML"  # PS3.3 A.45.2 spells it so
    assert ds.HL7InstanceIdentifier == "2.16.840.1.113883.19.5^c266"
    assert ds.EncapsulatedDocumentLength == len(data)
    assert embedded(ds, len(data)) == data
    assert_valid(target)


def test_a_cda_document_without_its_id_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileProblem, match="CDA document has no document id"):
        make(tmp_path, "letter.xml", cda(b'<code code="11490-0"/>'))
    assert not (tmp_path / "letter.xml.dcm").exists()


# --- 3D models -----------------------------------------------------------------------------------

MODELS = {
    "cube.stl": (STL_ASCII, bulkdata.ENCAPSULATED_STL, "model/stl"),
    "binary.stl": (STL_BINARY, bulkdata.ENCAPSULATED_STL, "model/stl"),
    "cube.obj": (OBJ, bulkdata.ENCAPSULATED_OBJ, "model/obj"),
    "cube.mtl": (MTL, bulkdata.ENCAPSULATED_MTL, "model/mtl"),
}


def assert_valid_model(target: Path, ds: pydicom.Dataset) -> None:
    """dciodvfy (Debian 12's) has no OBJ and MTL IODs. Their module tables are STL's (MTL's
    without Frame of Reference), so a copy is checked as STL: with STL's SOP class and MIME
    type (the one STL-only check), and for MTL with a Frame of Reference."""
    if ds.SOPClassUID == bulkdata.ENCAPSULATED_STL:
        assert_valid(target)
        return
    copy = pydicom.dcmread(target)
    copy.SOPClassUID = copy.file_meta.MediaStorageSOPClassUID = UID(bulkdata.ENCAPSULATED_STL)
    copy.MIMETypeOfEncapsulatedDocument = "model/stl"
    if "FrameOfReferenceUID" not in copy:
        copy.FrameOfReferenceUID, copy.PositionReferenceIndicator = "2.25.7", None
    copy.save_as(target.with_suffix(".as_stl.dcm"))
    assert_valid(target.with_suffix(".as_stl.dcm"))


@pytest.mark.parametrize("name", MODELS)
def test_a_3d_model_becomes_an_encapsulated_model(tmp_path: Path, name: str) -> None:
    data, sop_class, mime = MODELS[name]
    target, _, ds = make(tmp_path, name, data)
    assert ds.SOPClassUID == sop_class == ds.file_meta.MediaStorageSOPClassUID
    assert (ds.Modality, ds.MIMETypeOfEncapsulatedDocument) == ("M3D", mime)
    assert "ConversionType" not in ds  # the models have no SC Equipment module
    if name.endswith(".mtl"):
        assert "FrameOfReferenceUID" not in ds
    else:
        assert ds.FrameOfReferenceUID == UIDS.frame_of_reference_uid()
        assert ds.PositionReferenceIndicator is None or ds.PositionReferenceIndicator == ""
    equipment = {keyword: ds[keyword].value for keyword in bulkdata.MODEL_EQUIPMENT}
    assert equipment == bulkdata.MODEL_EQUIPMENT
    (unit,) = ds.MeasurementUnitsCodeSequence
    assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("mm", "UCUM")
    assert embedded(ds, len(data)) == data
    assert_valid_model(target, ds)


def test_values_set_the_equipment_of_a_model(tmp_path: Path) -> None:
    values: Item = {"Manufacturer": "ACME 3D", "DeviceSerialNumber": "SN-9"}
    target, _, ds = make(tmp_path, "cube.obj", OBJ, values)
    assert (ds.Manufacturer, ds.DeviceSerialNumber) == ("ACME 3D", "SN-9")
    assert ds.SoftwareVersions == bulkdata.MODEL_EQUIPMENT["SoftwareVersions"]
    assert_valid_model(target, ds)


def test_the_frame_of_reference_is_stable_or_given() -> None:
    derived = Uids("2.25.1", "2.25.2", "2.25.3").frame_of_reference_uid()
    assert derived == Uids("2.25.9", "2.25.8", "2.25.3").frame_of_reference_uid()
    assert derived != Uids("2.25.1", "2.25.2", "2.25.4").frame_of_reference_uid()
    assert derived.startswith("2.25.") and len(derived) <= 64
    assert Uids("1", "2", "3", frame_of_reference="2.25.77").frame_of_reference_uid() == "2.25.77"


# --- JPEG as a photograph, JPEG 2000 files -------------------------------------------------------


def pillow_jpeg(subsampling: int, mode: str = "RGB") -> bytes:
    image = Image.new(mode, (40, 30), (200, 120, 40) if mode == "RGB" else 90)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, subsampling=subsampling)
    return buffer.getvalue()


@pytest.mark.parametrize("photographic", [False, True], ids=["secondary", "photographic"])
@pytest.mark.parametrize("subsampling", [0, 2], ids=["444", "420"])
def test_a_ycbcr_jpeg_is_ybr_full_422_subsampled_or_not(
    tmp_path: Path, subsampling: int, photographic: bool
) -> None:
    data = pillow_jpeg(subsampling)
    target, _, ds = make(tmp_path, "photo.jpg", data, photographic=photographic)
    assert ds.PhotometricInterpretation == "YBR_FULL_422"
    assert embedded(ds, len(data)) == data
    assert_valid(target)


def test_a_jpeg_as_a_photograph(tmp_path: Path) -> None:
    data = pillow_jpeg(2, "L")
    target, _, ds = make(tmp_path, "photo.jpg", data, {"PatientID": "P1"}, photographic=True)
    assert ds.SOPClassUID == bulkdata.VL_PHOTOGRAPHIC == ds.file_meta.MediaStorageSOPClassUID
    assert (ds.Modality, list(ds.ImageType)) == ("XC", ["ORIGINAL", "PRIMARY"])
    assert ds.AcquisitionContextSequence == []
    assert (ds.SamplesPerPixel, ds.PhotometricInterpretation) == (1, "MONOCHROME2")
    assert (ds.LossyImageCompression, ds.LossyImageCompressionMethod) == ("01", "ISO_10918_1")
    assert embedded(ds, len(data)) == data
    assert_valid(target)


def test_a_12_bit_jpeg_cannot_be_a_photograph(tmp_path: Path) -> None:
    data = jpeg(0xC1, (64, 80), components=b"\x01", sampling=b"\x11", precision=12)
    with pytest.raises(FileProblem, match="12 bits per sample, but DICOM photographs"):
        make(tmp_path, "extended.jpg", data, photographic=True)


def test_a_jp2_file_holds_its_codestream_only(tmp_path: Path) -> None:
    stream = codestream(rev=0)
    data = jp2(stream)
    source = tmp_path / "scan.jp2"
    source.write_bytes(data)
    media = detect(source)
    instance = bulkdata.describe_instance(source, media, {}, UIDS, now=NOW)
    assert (instance.bulk.offset, instance.bulk.length) == (data.index(stream), len(stream))
    assert instance.bulk.media_type == "image/j2c"
    whole = bulkdata.metadata_bulk(instance, source, media)
    assert (whole.path, whole.offset, whole.length) == (source, 0, len(data))
    assert (whole.media_type, whole.transfer_syntax) == ("image/jp2", TS + "91")
    target = tmp_path / "scan.dcm"
    bulkdata.write(instance, target)
    ds = pydicom.dcmread(target)
    assert ds.file_meta.TransferSyntaxUID == TS + "91"
    assert embedded(ds, len(stream)) == stream
    assert_valid(target)


def test_a_bare_codestream_goes_as_it_is(tmp_path: Path) -> None:
    source = tmp_path / "scan.j2c"
    source.write_bytes(codestream())
    media = detect(source)
    instance = bulkdata.describe_instance(source, media, {}, UIDS, now=NOW, photographic=True)
    assert bulkdata.metadata_bulk(instance, source, media) == instance.bulk
    assert (instance.bulk.media_type, instance.bulk.length) == ("image/j2c", len(codestream()))
    assert instance.dataset.SOPClassUID == bulkdata.VL_PHOTOGRAPHIC


# --- PNG and GIF: native pixels ------------------------------------------------------------------


def picture(mode: str, size: tuple[int, int] = (33, 21)) -> Image.Image:
    """A small picture with different pixels (a gradient) in ``mode``."""
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    image.paste((255, 0, 0), (0, 0, 5, 5))
    if mode == "I;16":
        return Image.linear_gradient("L").resize(size).convert("I").point(lambda v: v * 257)
    if mode == "P":
        return image.quantize(16)
    return image.convert(mode)


def encoded(image: Image.Image, kind: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


def grey16(size: tuple[int, int]) -> Image.Image:
    image = Image.new("I;16", size)
    image.putdata([(i * 997) % 65536 for i in range(size[0] * size[1])])
    return image


NATIVE = {  # name: (file, expected photometric, bits, expected decoded picture)
    "rgb.png": (encoded(picture("RGB"), "PNG"), "RGB", 8, picture("RGB")),
    "grey.png": (encoded(picture("L"), "PNG"), "MONOCHROME2", 8, picture("L")),
    "odd_grey.png": (
        encoded(picture("L", (3, 3)), "PNG"),
        "MONOCHROME2",
        8,
        picture("L", (3, 3)),
    ),
    "bilevel.png": (encoded(picture("1"), "PNG"), "MONOCHROME2", 8, picture("1").convert("L")),
    "palette.png": (encoded(picture("P"), "PNG"), "RGB", 8, picture("P").convert("RGB")),
    "grey16.png": (encoded(grey16((7, 5)), "PNG"), "MONOCHROME2", 16, grey16((7, 5))),
    "palette.gif": (encoded(picture("RGB"), "GIF"), "RGB", 8, None),
    "grey.gif": (encoded(picture("L"), "GIF"), "MONOCHROME2", 8, picture("L")),
}


def pixel_bytes(ds: pydicom.Dataset) -> bytes:
    length = ds.Rows * ds.Columns * ds.SamplesPerPixel * ds.BitsAllocated // 8
    value = bytes(ds.PixelData)
    assert len(value) == length + length % 2 and value[length:] in (b"", b"\0")
    return value[:length]


@pytest.mark.parametrize("name", NATIVE)
def test_png_and_gif_become_native_pixels(tmp_path: Path, name: str) -> None:
    data, photometric, bits, expected = NATIVE[name]
    target, _, ds = make(tmp_path, name, data)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert (ds.SOPClassUID, ds.Modality, ds.ConversionType) == (
        bulkdata.SECONDARY_CAPTURE,
        "OT",
        "SI",
    )
    assert (ds.PhotometricInterpretation, ds.BitsStored, ds.BitsAllocated) == (
        photometric,
        bits,
        bits,
    )
    assert ds.LossyImageCompression == "00" and "LossyImageCompressionMethod" not in ds
    assert ("OW" if bits == 16 else "OB") == ds["PixelData"].VR
    decoded = expected or Image.open(io.BytesIO(data)).convert("RGB")
    assert (ds.Columns, ds.Rows) == decoded.size
    assert pixel_bytes(ds) == decoded.tobytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name, f"{name}.dcm"]  # no scratch
    assert_valid(target)


def test_transparency_is_laid_on_white(tmp_path: Path) -> None:
    image = Image.new("RGBA", (4, 2), (255, 0, 0, 255))
    image.putpixel((1, 0), (0, 0, 255, 0))  # transparent
    image.putpixel((2, 0), (0, 0, 0, 128))  # half
    _, _, ds = make(tmp_path, "logo.png", encoded(image, "PNG"))
    assert ds.PhotometricInterpretation == "RGB"
    pixels = pixel_bytes(ds)
    assert pixels[0:3] == b"\xff\x00\x00"
    assert pixels[3:6] == b"\xff\xff\xff"
    assert pixels[6:9] in (b"\x7f\x7f\x7f", b"\x7e\x7e\x7e")


def test_palette_transparency_is_laid_on_white_in_every_band(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(part10, "CHUNK", 8)  # bands of a few rows: the crops keep the palette
    image = Image.new("P", (4, 6), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((0, 5), 0)  # the last band holds the transparent index
    data = encoded(image, "GIF", transparency=0)
    _, _, ds = make(tmp_path, "logo.gif", data)
    pixels = pixel_bytes(ds)
    assert len(pixels) == 4 * 6 * 3
    assert pixels[:3] == b"\xff\x00\x00" and pixels[60:63] == b"\xff\xff\xff"


def test_only_the_first_frame_of_an_animated_gif(tmp_path: Path) -> None:
    frames = [Image.new("L", (8, 6), grey) for grey in (10, 200, 90)]
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    target, _, ds = make(tmp_path, "anim.gif", data, photographic=True)
    assert ds.SOPClassUID == bulkdata.VL_PHOTOGRAPHIC and "NumberOfFrames" not in ds
    assert pixel_bytes(ds) == bytes([10]) * 48
    assert_valid(target)


def test_a_16_bit_png_cannot_be_a_photograph(tmp_path: Path) -> None:
    with pytest.raises(FileProblem, match="16 bits per sample, but DICOM photographs"):
        make(tmp_path, "grey16.png", encoded(grey16((7, 5)), "PNG"), photographic=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grey16.png"]


def test_a_huge_png_is_refused_before_decoding(tmp_path: Path) -> None:
    header = encoded(Image.new("L", (1, 1)), "PNG")
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", 20_000, 20_000, 8, 0, 0, 0, 0)
    data = header[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + header[33:]
    with pytest.raises(FileProblem, match="20000 x 20000 pixels, more than stowd decodes"):
        make(tmp_path, "huge.png", data)


def test_a_damaged_png_is_refused(tmp_path: Path) -> None:
    data = encoded(picture("RGB", (300, 200)), "PNG")
    with pytest.raises(FileProblem, match="the PNG image is truncated or damaged"):
        make(tmp_path, "cut.png", data[: len(data) // 2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.png"]


def test_describe_needs_a_scratch_file_for_a_png(tmp_path: Path) -> None:
    source = tmp_path / "a.png"
    source.write_bytes(encoded(picture("RGB"), "PNG"))
    with pytest.raises(ValueError, match="scratch"):
        bulkdata.describe_instance(source, detect(source), {}, UIDS, now=NOW)


# --- video ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small clips made once by ffmpeg: 64x48, 10 frames at 25 a second."""
    folder = tmp_path_factory.mktemp("clips")
    made = {"clip.mpg": MPEG2, "clip.mp4": H264, "clip.mov": H264, "hevc.mp4": HEVC}
    return {name: ffmpeg_clip(folder / name, codec, "64x48", 0.4) for name, codec in made.items()}


VIDEO = {  # name: (transfer syntax, lossy method, media type)
    "clip.mpg": ("100", "ISO_13818_2", "video/mpeg"),
    "clip.mp4": ("102", "ISO_14496_10", "video/mp4"),
    "clip.mov": ("102", "ISO_14496_10", "video/quicktime"),
    "hevc.mp4": ("107", "ISO_23008_2", "video/mp4"),
}


@pytest.mark.parametrize("name", VIDEO)
def test_a_video_becomes_a_video_photographic_image(
    tmp_path: Path, clips: dict[str, Path], name: str
) -> None:
    syntax, method, media_type = VIDEO[name]
    data = clips[name].read_bytes()
    target, found, ds = make(tmp_path, name, data)
    assert found.media_type == media_type
    assert ds.file_meta.TransferSyntaxUID == TS + syntax
    assert ds.SOPClassUID == bulkdata.VIDEO_PHOTOGRAPHIC == ds.file_meta.MediaStorageSOPClassUID
    assert (ds.Modality, ds.NumberOfFrames, ds.FrameTime, ds.CineRate) == ("XC", 10, 40, 25)
    assert ds.FrameIncrementPointer == 0x00181063
    assert (ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.PlanarConfiguration) == (
        "YBR_PARTIAL_420",
        3,
        0,
    )
    assert (ds.Rows, ds.Columns, ds.BitsAllocated) == (48, 64, 8)
    assert (ds.LossyImageCompression, ds.LossyImageCompressionMethod) == ("01", method)
    (region,) = ds.AnatomicRegionSequence
    assert (region.CodeValue, region.CodingSchemeDesignator) == bulkdata.UNKNOWN_REGION[:2]
    _, *fragments = generate_fragments(ds.PixelData)
    assert len(fragments) == 1  # the MPEG transfer syntaxes hold the stream in one fragment
    assert embedded(ds, len(data)) == data
    if syntax == "107":
        target = as_h264(target)
    assert_valid(target)


def as_h264(target: Path) -> Path:
    """Debian 12's dciodvfy does not know the HEVC transfer syntaxes (it reads their pixel data
    as native and fails), so a copy is checked labelled H.264 (the same attributes apply)."""
    copy = pydicom.dcmread(target)
    copy.file_meta.TransferSyntaxUID = UID(TS + "104")
    copy.save_as(target.with_suffix(".as_h264.dcm"))
    return target.with_suffix(".as_h264.dcm")


def test_a_large_video_is_one_fragment(
    tmp_path: Path, clips: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(part10, "FRAGMENT", 1000)
    data = clips["clip.mp4"].read_bytes()
    _, _, ds = make(tmp_path, "clip.mp4", data)
    assert len(list(generate_fragments(ds.PixelData))) == 2  # offset table and one fragment
    assert embedded(ds, len(data)) == data


@pytest.mark.parametrize(("name", "syntax"), [("clip.mpg", "100.1"), ("clip.mp4", "102.1")])
def test_a_video_over_4_gib_uses_the_fragmentable_syntax_and_several_fragments(
    tmp_path: Path, clips: dict[str, Path], monkeypatch: pytest.MonkeyPatch, name: str, syntax: str
) -> None:
    monkeypatch.setattr(part10, "MAX_VALUE", 2000)  # stands in for 4 GiB
    monkeypatch.setattr(part10, "FRAGMENT", 1000)
    data = clips[name].read_bytes()
    _, _, ds = make(tmp_path, name, data)
    assert ds.file_meta.TransferSyntaxUID == TS + syntax
    assert UID(TS + syntax).name.startswith("Fragmentable")
    _, *fragments = generate_fragments(ds.PixelData)
    assert len(fragments) == -(-len(data) // 1000)
    assert embedded(ds, len(data)) == data


def test_an_hevc_video_over_4_gib_is_refused(
    tmp_path: Path, clips: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(part10, "MAX_VALUE", 2000)
    with pytest.raises(FileProblem, match="no transfer syntax that splits an HEVC stream"):
        make(tmp_path, "hevc.mp4", clips["hevc.mp4"].read_bytes())


def test_values_name_the_anatomic_region_of_a_video(tmp_path: Path, clips: dict[str, Path]) -> None:
    region: Item = {
        "CodeValue": "76752008",
        "CodingSchemeDesignator": "SCT",
        "CodeMeaning": "Breast",
    }
    target, _, ds = make(
        tmp_path, "clip.mpg", clips["clip.mpg"].read_bytes(), {"AnatomicRegionSequence": [region]}
    )
    assert ds.AnatomicRegionSequence[0].CodeMeaning == "Breast"
    assert_valid(target)


MPEG_MEDIA = Media(
    "mpeg", "video/mpeg", TS + "100", 48, 64, 3, 8, "YBR_PARTIAL_420", True, None, 40.0
)
MP4_MEDIA = replace(MPEG_MEDIA, kind="mp4", media_type="video/mp4", transfer_syntax=TS + "102")
VIDEO_REFUSED = {
    "no time codes": (MPEG_MEDIA, "no group-of-pictures time codes"),
    "fragmented mp4": (MP4_MEDIA, "index lists no frames"),
    "no duration": (replace(MP4_MEDIA, frames=10, frame_time_ms=None), "no duration"),
    "10 bits": (
        replace(MP4_MEDIA, frames=10, bits_stored=10, transfer_syntax=TS + "108"),
        "10 bits per sample, but DICOM videos hold 8 only",
    ),
}


@pytest.mark.parametrize("case", VIDEO_REFUSED)
def test_a_video_stowd_cannot_describe_is_refused(tmp_path: Path, case: str) -> None:
    media, message = VIDEO_REFUSED[case]
    source = tmp_path / "clip.bin"
    source.write_bytes(b"\0" * 100)
    with pytest.raises(FileProblem, match=message):
        build(source, media, {}, UIDS, tmp_path / "clip.dcm", now=NOW)
    assert not (tmp_path / "clip.dcm").exists()


def test_an_hevc_video_of_4_gib_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    source = tmp_path / "long.mp4"
    with source.open("wb") as fp:
        fp.truncate(4 * GIB)  # sparse: no disk space used
    media = replace(MP4_MEDIA, frames=10, transfer_syntax=TS + "107")
    with pytest.raises(FileProblem, match="larger than 4 GiB"):
        build(source, media, {}, UIDS, tmp_path / "long.dcm", now=NOW)
    assert not (tmp_path / "long.dcm").exists()


# --- describe, write, the metadata form ----------------------------------------------------------


def test_a_file_rewritten_after_it_was_queued_is_not_built(tmp_path: Path) -> None:
    source = tmp_path / "report.pdf"
    source.write_bytes(ODD_PDF)
    queued = (source.stat().st_size, source.stat().st_mtime_ns)
    media = detect(source)
    instance = bulkdata.describe_instance(source, media, {}, UIDS, now=NOW, expect=queued)
    source.write_bytes(ODD_PDF.replace(b"Catalog", b"CATALOG"))  # the same size, new content
    os.utime(source, ns=(queued[1] + 10**9, queued[1] + 10**9))
    with pytest.raises(FileVanished, match="changed"):
        bulkdata.write(instance, tmp_path / "a.dcm")  # described before, written after
    with pytest.raises(FileVanished, match="changed after it was queued"):
        build(source, media, {}, UIDS, tmp_path / "b.dcm", now=NOW, expect=queued)
    assert not (tmp_path / "a.dcm").exists() and not (tmp_path / "b.dcm").exists()


def test_a_jpeg_2000_image_in_rgb_stays_secondary_capture_when_photographic(
    tmp_path: Path,
) -> None:
    rgb = Media("jp2", "image/j2c", TS + "90", 48, 64, 3, 8, "RGB", False)
    ycc = replace(rgb, photometric="YBR_RCT")
    assert bulkdata.sop_class_for(rgb, photographic=True) == bulkdata.SECONDARY_CAPTURE
    assert bulkdata.sop_class_for(ycc, photographic=True) == bulkdata.VL_PHOTOGRAPHIC
    assert bulkdata.sop_class_for(rgb, photographic=False) == bulkdata.SECONDARY_CAPTURE


def test_a_large_png_is_refused_before_it_is_decoded(tmp_path: Path) -> None:
    header = b"IHDR" + struct.pack(">IIBBBBB", 6000, 5000, 8, 4, 0, 0, 0)  # 30 MP, grey+alpha
    png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + header
    png += struct.pack(">I", zlib.crc32(header))
    with pytest.raises(FileProblem, match="more than stowd decodes"):
        make(tmp_path, "big.png", png)


def test_describe_then_write_is_build(tmp_path: Path) -> None:
    source = tmp_path / "report.pdf"
    source.write_bytes(ODD_PDF)
    media = detect(source)
    values: Item = {"PatientName": "Müller^Jürgen"}
    instance = bulkdata.describe_instance(source, media, values, UIDS, now=NOW, instance_number=3)
    assert instance.tag == 0x00420011 and not instance.encapsulated
    assert instance.tag not in instance.dataset
    mtime = source.stat().st_mtime_ns
    assert instance.bulk == bulkdata.Bulk(
        source, 0, len(ODD_PDF), "application/pdf", None, len(ODD_PDF), mtime
    )
    assert bulkdata.metadata_bulk(instance, source, media) == instance.bulk
    assert bulkdata.bulk_vr(instance) == "OB"
    written = bulkdata.write(instance, tmp_path / "a.dcm")
    again = bulkdata.write(instance, tmp_path / "b.dcm")  # the instance is not changed by it
    build(source, media, values, UIDS, tmp_path / "c.dcm", now=NOW, instance_number=3)
    files = [(tmp_path / name).read_bytes() for name in ("a.dcm", "b.dcm", "c.dcm")]
    assert written == again == len(files[0]) and files[0] == files[1] == files[2]


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("report.pdf", EVEN_PDF),
        ("letter.xml", cda(DOC_ID)),
        ("cube.stl", STL_ASCII),
        ("photo.jpg", jpeg()),
        ("scan.jp2", jp2(codestream())),
        ("grey16.png", encoded(grey16((7, 5)), "PNG")),
    ],
)
def test_the_data_set_is_dicom_json(tmp_path: Path, name: str, data: bytes) -> None:
    source = tmp_path / name
    source.write_bytes(data)
    instance = bulkdata.describe_instance(
        source, detect(source), {"PatientName": "Ärzte^Anna"}, UIDS, now=NOW, scratch=tmp_path / "s"
    )
    text = json.dumps(instance.dataset.to_json_dict())
    assert "InlineBinary" not in text and "BulkDataURI" not in text
    assert f"{int(instance.tag):08X}" not in json.loads(text)
    assert json.loads(text)["00080016"]["Value"] == [instance.dataset.SOPClassUID]


def test_native_pixels_are_sent_from_the_scratch_file(tmp_path: Path) -> None:
    source = tmp_path / "grey16.png"
    source.write_bytes(encoded(grey16((7, 5)), "PNG"))
    media = detect(source)
    scratch = tmp_path / "pixels"
    instance = bulkdata.describe_instance(source, media, {}, UIDS, now=NOW, scratch=scratch)
    assert not instance.encapsulated and bulkdata.bulk_vr(instance) == "OW"
    assert instance.bulk == bulkdata.Bulk(
        scratch, 0, 70, "application/octet-stream", "1.2.840.10008.1.2.1", 70
    )
    assert bulkdata.metadata_bulk(instance, source, media) == instance.bulk
    assert scratch.read_bytes() == grey16((7, 5)).tobytes()
    assert scratch.read_bytes()[2:4] == (997).to_bytes(2, "little")  # the second pixel


def test_a_source_changed_between_describe_and_write_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "photo.jpg"
    source.write_bytes(jpeg())
    instance = bulkdata.describe_instance(source, detect(source), {}, UIDS, now=NOW)
    with source.open("ab") as fp:
        fp.write(b"\0\0")
    with pytest.raises(FileVanished, match="changed after it was looked at"):
        bulkdata.write(instance, tmp_path / "photo.dcm")
    assert not (tmp_path / "photo.dcm").exists()


# --- bad input -----------------------------------------------------------------------------------

BAD = {
    "empty.pdf": (b"", "the file is empty"),
    "page.jpg": (b"<html>Not found</html>", "named .jpg but is not a JPEG image"),
    "cut.mp4": (MP4[:-40], "the video is truncated or damaged"),
    "cut.mpg": (mpeg2()[:10], "MPEG-2 video is truncated or damaged"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_refused_with_a_reason(tmp_path: Path, name: str) -> None:
    data, message = BAD[name]
    with pytest.raises(FileProblem, match=message):
        make(tmp_path, name, data)
    assert not (tmp_path / f"{name}.dcm").exists()


# --- errors --------------------------------------------------------------------------------------


def test_a_missing_source_has_vanished(tmp_path: Path) -> None:
    target = tmp_path / "gone.dcm"
    media = Media("pdf", "application/pdf", None)
    with pytest.raises(FileVanished):
        build(tmp_path / "gone.pdf", media, {}, UIDS, target, now=NOW)
    assert not target.exists()


def test_a_kind_stowd_does_not_know_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "archive.zip"
    source.write_bytes(b"PK\3\4")
    with pytest.raises(FileProblem, match="cannot make DICOM objects from 'zip' files"):
        build(source, Media("zip", "application/zip", None), {}, UIDS, tmp_path / "a.dcm", now=NOW)
    assert not (tmp_path / "a.dcm").exists()


def test_a_read_error_midway_removes_the_partial_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_copy(fp: BinaryIO, out: BinaryIO, count: int) -> None:
        out.write(fp.read(10))
        out.flush()
        assert target.stat().st_size > 10  # something was written already
        raise OSError(errno.EIO, "Input/output error")

    source = tmp_path / "a.pdf"
    source.write_bytes(EVEN_PDF)
    target = tmp_path / "a.dcm"
    monkeypatch.setattr(part10, "_copy", failing_copy)
    with pytest.raises(FileUnreadable, match="Input/output error"):
        build(source, detect(source), {}, UIDS, target, now=NOW)
    assert not target.exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [(100, "became shorter"), (-2, "changed while it was being read")],
    ids=["shrinks", "grows"],
)
def test_a_source_that_changes_while_read_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: int, message: str
) -> None:
    source = tmp_path / "a.pdf"
    source.write_bytes(EVEN_PDF)
    media = detect(source)
    target = tmp_path / "a.dcm"
    real_fstat = os.fstat

    def lying_fstat(fd: int) -> os.stat_result:
        real = real_fstat(fd)
        fields = list(real)
        fields[6] = real.st_size + change  # st_size: the size when the file was opened
        return os.stat_result(fields)

    monkeypatch.setattr("stowd.media.part10.os.fstat", lying_fstat)
    with pytest.raises(FileVanished, match=message):
        build(source, media, {}, UIDS, target, now=NOW)
    assert not target.exists()


def test_a_write_error_is_retried_later(tmp_path: Path) -> None:
    source = tmp_path / "a.pdf"
    source.write_bytes(EVEN_PDF)
    target = tmp_path / "no such folder" / "a.dcm"
    with pytest.raises(FileUnreadable, match="writing the DICOM file"):
        build(source, detect(source), {}, UIDS, target, now=NOW)


def sparse_pdf(path: Path, size: int) -> None:
    with path.open("wb") as fp:
        fp.write(b"%PDF-1.4\n")
        fp.truncate(size - 7)
        fp.seek(0, os.SEEK_END)
        fp.write(b"\n%%EOF\n")


def test_a_document_over_4_gib_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "huge.pdf"
    sparse_pdf(source, 4 * GIB)
    target = tmp_path / "huge.dcm"
    with pytest.raises(FileProblem, match="larger than 4 GiB"):
        build(source, detect(source), {}, UIDS, target, now=NOW)
    assert not target.exists()


# --- memory --------------------------------------------------------------------------------------

MEASURE = textwrap.dedent(
    """
    import resource, sys
    from datetime import datetime, timezone
    from pathlib import Path
    from stowd.media.bulkdata import Uids, build
    from stowd.media.probe import detect

    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    media = detect(source)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    size = build(source, media, {"PatientID": "P1"}, Uids("2.25.1", "2.25.2", "2.25.3"),
                 target, now=datetime.now(timezone.utc))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(size, after - before)
    """
)


def test_a_3_gib_document_is_streamed_in_bounded_memory(tmp_path: Path) -> None:
    source, target = tmp_path / "big.pdf", tmp_path / "big.dcm"
    sparse_pdf(source, 3 * GIB + 1)  # odd: padded
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(source), str(target)],
        capture_output=True,
        text=True,
        check=True,
    )
    size, growth_kib = map(int, done.stdout.split())
    assert size == target.stat().st_size > 3 * GIB + 1
    assert growth_kib < 100 * 1024, f"peak RSS grew by {growth_kib} KiB"
    with target.open("rb") as fp:
        ds = pydicom.dcmread(fp, stop_before_pixels=True, defer_size=1024)
        assert ds.EncapsulatedDocumentLength == 3 * GIB + 1
        fp.seek(-200, os.SEEK_END)
        assert b"\n%%EOF\n\0" in fp.read()
    print(f"peak RSS growth building a 3 GiB document: {growth_kib} KiB", file=sys.stderr)
    target.unlink()
    shutil.rmtree(tmp_path, ignore_errors=True)
