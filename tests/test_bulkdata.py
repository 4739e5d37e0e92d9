"""Building DICOM files around PDF documents and JPEG images, checked with pydicom and dciodvfy."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import pydicom
import pytest
from pydicom.encaps import generate_fragments, generate_frames
from test_media import GIB, PDF, codestream, jp2, jpeg

from stowd import bulkdata
from stowd.bulkdata import Uids, build
from stowd.errors import FileProblem, FileUnreadable, FileVanished
from stowd.media import Media, detect
from stowd.vr import Item

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
    tmp_path: Path, name: str, data: bytes, values: Item | None = None, **kwargs: int
) -> tuple[Path, Media, pydicom.FileDataset]:
    source = tmp_path / name
    source.write_bytes(data)
    target = tmp_path / f"{name}.dcm"
    found = detect(source)
    size = build(source, found, values or {}, UIDS, target, now=NOW, **kwargs)
    assert size == target.stat().st_size
    return target, found, pydicom.dcmread(target)


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
    monkeypatch.setattr(bulkdata, "FRAGMENT", 4096)
    monkeypatch.setattr(bulkdata, "CHUNK", 1000)
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


def test_a_jp2_file_with_boxes_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "scan.jp2"
    source.write_bytes(jp2(codestream()))
    with pytest.raises(FileProblem, match="bare JPEG 2000 codestream"):
        build(source, detect(source), {}, UIDS, tmp_path / "scan.dcm", now=NOW)
    assert not (tmp_path / "scan.dcm").exists()


# --- errors --------------------------------------------------------------------------------------


def test_a_missing_source_has_vanished(tmp_path: Path) -> None:
    target = tmp_path / "gone.dcm"
    media = Media("pdf", "application/pdf", None)
    with pytest.raises(FileVanished):
        build(tmp_path / "gone.pdf", media, {}, UIDS, target, now=NOW)
    assert not target.exists()


def test_a_type_not_built_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "clip.mpg"
    source.write_bytes(b"\0\0\1\xb3")
    media = Media("mpeg", "video/mpeg", "1.2.840.10008.1.2.4.100", rows=2, columns=2)
    with pytest.raises(FileProblem, match="MPEG-2 videos"):
        build(source, media, {}, UIDS, tmp_path / "clip.dcm", now=NOW)
    assert not (tmp_path / "clip.dcm").exists()


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
    monkeypatch.setattr(bulkdata, "_copy", failing_copy)
    with pytest.raises(FileUnreadable, match="Input/output error"):
        build(source, detect(source), {}, UIDS, target, now=NOW)
    assert not target.exists()


@pytest.mark.parametrize(
    ("change", "message"), [(100, "became shorter"), (-2, "grew")], ids=["shrinks", "grows"]
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

    monkeypatch.setattr("stowd.bulkdata.os.fstat", lying_fstat)
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
    from stowd.bulkdata import Uids, build
    from stowd.media import detect

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
