"""Metadata rules change a copy of a file: ``stowd.rewrite.apply`` and ``stowd.rewrite.rewrite``.

Every rewritten file is read back with pydicom; the bytes from the pixel data element to the
end must be those of the original, and the original itself must not change.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
import pytest
from dicomgen import make_instance, write_garbage
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from stowd.errors import FileProblem, FileUnreadable, FileVanished
from stowd.media import rewrite as rewrite_module
from stowd.media.rewrite import apply, rewrite
from stowd.pipeline.classify import classify
from stowd.rules.vr import Value

ABSENT = object()
TEXT_VRS = {"LO", "LT", "PN", "SH", "ST", "UC", "UT"}
DCIODVFY = Path("/usr/bin/dciodvfy")
NOW = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone(timedelta(hours=2)))


# -- helpers -----------------------------------------------------------------------------------


def sample(name: str, tmp_path: Path) -> Path:
    """A copy of one of pydicom's test files (charset files included)."""
    found = get_testdata_file(name)
    src = Path(found) if isinstance(found, str) else Path(get_charset_files(name)[0])
    dst = tmp_path / name
    shutil.copy(src, dst)
    return dst


SOP_UID_TAG = b"\x08\x00\x18\x00UI"  # (0008,0018) in explicit VR little endian: cut inside it


def generated(tmp_path: Path, **extra: Any) -> Path:
    path = tmp_path / "in.dcm"
    make_instance(path, extra=extra or None)
    return path


def rule(
    values: Mapping[str, Value], remove: tuple[str, ...] = (), **kwargs: Any
) -> Callable[[Dataset], None]:
    return lambda ds: apply(ds, values, remove, **kwargs)


def run(src: Path, edit: Callable[[Dataset], None]) -> tuple[FileDataset, Path]:
    """Rewrite ``src`` and read the result back whole."""
    dst = src.with_name("out.dcm")
    size = rewrite(src, dst, edit)
    assert size == dst.stat().st_size
    return pydicom.dcmread(dst), dst


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pixel_tail(path: Path) -> bytes:
    """The bytes from the pixel data element's tag to the end, found by a full pydicom read."""
    ds = pydicom.dcmread(path, force=True)
    tag = next(t for t in ds.keys() if t >= 0x7FE00008)  # noqa: SIM118
    raw: object = ds.get_item(tag)
    assert isinstance(raw, RawDataElement)
    implicit = ds.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    return path.read_bytes()[raw.value_tell - (8 if implicit else 12) :]


def texts(ds: Dataset, prefix: str = "") -> Iterator[tuple[str, str]]:
    """Every text value of ``ds`` (recursively), as (path, value)."""
    for elem in ds:
        path = f"{prefix}{elem.keyword or elem.tag}"
        if elem.keyword == "OriginalAttributesSequence":
            continue
        if elem.VR == "SQ":
            for index, item in enumerate(elem.value):
                yield from texts(item, f"{path}[{index}].")
        elif elem.VR in TEXT_VRS:
            yield path, str(elem.value)


# -- setting, emptying and removing attributes -------------------------------------------------


CASES: list[tuple[str, Mapping[str, Value], tuple[str, ...], Mapping[str, object]]] = [
    ("overwrite", {"PatientID": "NEW"}, (), {"PatientID": "NEW"}),
    ("add", {"InstitutionName": "General"}, (), {"InstitutionName": "General"}),
    ("remove", {}, ("PatientSex",), {"PatientSex": ABSENT}),
    ("remove absent", {}, ("OtherPatientIDs",), {"OtherPatientIDs": ABSENT}),
    ("empty", {"StudyDescription": None}, (), {"StudyDescription": ""}),
    ("empty added", {"PatientWeight": None}, (), {"PatientWeight": None}),
    ("set and remove", {"PatientID": "X"}, ("PatientID",), {"PatientID": ABSENT}),
    ("IS", {"SeriesNumber": 7}, (), {"SeriesNumber": 7}),
    ("DS", {"PatientWeight": "72.5"}, (), {"PatientWeight": 72.5}),
    ("FD", {"EstimatedRadiographicMagnificationFactor": 1.25}, (), {}),
    (
        "multi CS",
        {"ImageType": ["DERIVED", "SECONDARY"]},
        (),
        {"ImageType": ["DERIVED", "SECONDARY"]},
    ),
    ("multi DS", {"PixelSpacing": ["0.5", "0.25"]}, (), {"PixelSpacing": [0.5, 0.25]}),
    ("PN", {"ReferringPhysicianName": "Doe^John"}, (), {"ReferringPhysicianName": "Doe^John"}),
    ("US or SS", {"SmallestImagePixelValue": 3}, (), {"SmallestImagePixelValue": 3}),
    ("empty SQ", {"ReferencedStudySequence": []}, (), {"ReferencedStudySequence": []}),
]


@pytest.mark.parametrize(
    ("values", "remove", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_values_are_set_emptied_and_removed(
    values: Mapping[str, Value],
    remove: tuple[str, ...],
    expected: Mapping[str, object],
    tmp_path: Path,
) -> None:
    out, _ = run(generated(tmp_path), rule(values, remove))
    for keyword, value in {**values, **expected}.items():
        want = expected.get(keyword, value)
        if want is ABSENT:
            assert keyword not in out
        elif want is None:
            assert keyword in out and out[keyword].is_empty
        else:
            assert out[keyword].value == want, keyword
    assert "OriginalAttributesSequence" not in out


def test_us_or_ss_takes_the_present_vr_else_the_first() -> None:
    signed = Dataset()
    signed.add_new("SmallestImagePixelValue", "SS", -4)
    apply(signed, {"SmallestImagePixelValue": -5}, ())
    fresh = Dataset()
    apply(fresh, {"SmallestImagePixelValue": 5}, ())
    assert (signed["SmallestImagePixelValue"].VR, signed.SmallestImagePixelValue) == ("SS", -5)
    assert (fresh["SmallestImagePixelValue"].VR, fresh.SmallestImagePixelValue) == ("US", 5)


def test_nested_sequences_are_built_item_by_item(tmp_path: Path) -> None:
    code: dict[str, Value] = {
        "CodeValue": "T-1",
        "CodingSchemeDesignator": "99LOCAL",
        "CodeMeaning": "Head",
    }
    request: Mapping[str, Value] = {
        "RequestAttributesSequence": [
            {"ScheduledProcedureStepID": "S1", "ScheduledProtocolCodeSequence": [code]},
            {"ScheduledProcedureStepID": "S2", "RequestedProcedureID": None},
        ]
    }
    out, _ = run(generated(tmp_path), rule(request))
    first, second = out.RequestAttributesSequence
    assert first.ScheduledProcedureStepID == "S1"
    assert first.ScheduledProtocolCodeSequence[0].CodeMeaning == "Head"
    assert second.ScheduledProcedureStepID == "S2"
    assert "RequestedProcedureID" in second and second["RequestedProcedureID"].is_empty


@pytest.mark.parametrize(
    ("keyword", "meta_keyword", "value"),
    [
        ("SOPInstanceUID", "MediaStorageSOPInstanceUID", generate_uid()),
        ("SOPClassUID", "MediaStorageSOPClassUID", "1.2.840.10008.5.1.4.1.1.2"),
    ],
)
def test_sop_uids_are_copied_to_the_file_meta(
    keyword: str, meta_keyword: str, value: str, tmp_path: Path
) -> None:
    out, dst = run(generated(tmp_path), rule({keyword: value}))
    assert out[keyword].value == value
    assert out.file_meta[meta_keyword].value == value
    assert classify(str(dst)).sop_uid == out.SOPInstanceUID


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"NoSuchKeyword": "x"}, "not a DICOM attribute keyword"),
        ({"PatientID": "x" * 65}, "PatientID cannot be written"),
        ({"Rows": 70000}, "Rows cannot be written"),
        ({"ReferencedStudySequence": "text"}, "list of items"),
        ({"ReferencedStudySequence": ["text"]}, "mapping"),
        ({"RequestAttributesSequence": [{"Nope": "x"}]}, "'Nope' is not"),
    ],
)
def test_values_the_dictionary_refuses_are_file_problems(
    values: Mapping[str, Value], message: str
) -> None:
    with pytest.raises(FileProblem, match=message):
        apply(Dataset(), values, ())


def test_apply_works_on_a_data_set_without_file_meta() -> None:
    ds = Dataset()
    apply(ds, {"SOPInstanceUID": "1.2.3", "PatientName": "Müller"}, (), record_original=True)
    assert (ds.SOPInstanceUID, ds.SpecificCharacterSet) == ("1.2.3", "ISO_IR 192")
    assert len(ds.OriginalAttributesSequence) == 1


# -- character sets ---------------------------------------------------------------------------


def test_latin1_file_is_converted_to_utf8_when_a_value_needs_it(tmp_path: Path) -> None:
    nested = Dataset()
    nested.SpecificCharacterSet = "ISO_IR 100"  # an item may repeat it; it must not stay
    nested.ScheduledProcedureStepDescription = "Schädel nativ"
    src = generated(
        tmp_path, PatientName="Müller^Jörg", RequestAttributesSequence=Sequence([nested])
    )
    assert pydicom.dcmread(src).SpecificCharacterSet == "ISO_IR 100"
    before = dict(texts(pydicom.dcmread(src)))
    out, dst = run(src, rule({"InstitutionName": "Klinikum Süd"}))
    assert out.SpecificCharacterSet == "ISO_IR 192"
    assert "SpecificCharacterSet" not in out.RequestAttributesSequence[0]
    assert dict(texts(out)) == {**before, "InstitutionName": "Klinikum Süd"}
    data = dst.read_bytes()
    for text in ("Müller^Jörg", "Schädel nativ", "Klinikum Süd"):
        assert text.encode("utf-8") in data
        assert text.encode("latin-1") not in data


@pytest.mark.parametrize(
    ("name", "original"),
    [
        ("chrH31.dcm", "山田^太郎"),  # ISO 2022 IR 87 (Japanese, escape sequences)
        ("chrSQEncoding1.dcm", "山田^太郎"),  # the text is in a sequence item with its own set
        ("chrX2.dcm", "王^小东"),  # GB18030
    ],
)
def test_multibyte_files_are_converted_to_utf8(name: str, original: str, tmp_path: Path) -> None:
    src = sample(name, tmp_path)
    before = dict(texts(pydicom.dcmread(src)))
    out, dst = run(src, rule({"InstitutionName": "Klinik Süd"}, record_original=True))
    assert out.SpecificCharacterSet == "ISO_IR 192"
    assert dict(texts(out)) == {**before, "InstitutionName": "Klinik Süd"}
    data = dst.read_bytes()
    assert original.encode("utf-8") in data
    assert b"\x1b$B" not in data  # no ISO 2022 escape sequence (JIS X 0208) is left
    assert "Klinik Süd".encode() in data


def test_an_ascii_value_keeps_the_character_set(tmp_path: Path) -> None:
    src = sample("chrH31.dcm", tmp_path)
    out, dst = run(src, rule({"InstitutionName": "Klinik Sued"}))
    assert out.SpecificCharacterSet == ["", "ISO 2022 IR 87"]
    assert out.PatientName == pydicom.dcmread(src).PatientName
    assert b"\x1b$B" in dst.read_bytes()


def test_a_utf8_file_is_not_touched_beyond_the_value(tmp_path: Path) -> None:
    src = sample("chrX1.dcm", tmp_path)
    out, _ = run(src, rule({"InstitutionName": "Klinik Süd"}))
    assert out.SpecificCharacterSet == "ISO_IR 192"
    assert (out.InstitutionName, out.PatientName) == ("Klinik Süd", "Wang^XiaoDong=王^小東")


# -- Original Attributes Sequence -------------------------------------------------------------


def test_original_values_are_recorded(tmp_path: Path) -> None:
    src = generated(tmp_path, PatientID="OLD", StudyDescription="same")
    values: Mapping[str, Value] = {
        "PatientID": "NEW",  # changed
        "InstitutionName": "Added",  # absent before
        "StudyDescription": "same",  # not changed: not recorded
        "AccessionNumber": None,  # empty before and after: not recorded
    }
    out, _ = run(src, rule(values, ("PatientSex",), record_original=True, now=NOW))
    (entry,) = out.OriginalAttributesSequence
    (previous,) = entry.ModifiedAttributesSequence
    assert [e.keyword for e in previous] == ["InstitutionName", "PatientID", "PatientSex"]
    assert previous.PatientID == "OLD" and previous.PatientSex == "O"
    assert previous["InstitutionName"].is_empty
    assert entry.AttributeModificationDateTime == "20240506070809.123456+0200"
    assert entry.ModifyingSystem == "stowd"
    assert "SourceOfPreviousValues" in entry and entry["SourceOfPreviousValues"].is_empty
    assert entry.ReasonForTheAttributeModification == "COERCE"
    assert (out.PatientID, out.InstitutionName, out.StudyDescription) == ("NEW", "Added", "same")


def test_a_replaced_sequence_is_recorded_whole(tmp_path: Path) -> None:
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.3"
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    src = generated(tmp_path, ReferencedStudySequence=Sequence([item]))
    out, _ = run(src, rule({"ReferencedStudySequence": []}, record_original=True))
    previous = out.OriginalAttributesSequence[0].ModifiedAttributesSequence[0]
    assert previous.ReferencedStudySequence[0].ReferencedSOPInstanceUID == "1.2.3.4"
    assert len(out.ReferencedStudySequence) == 0


def test_nothing_changed_adds_no_item_and_keeps_the_bytes(tmp_path: Path) -> None:
    src = generated(tmp_path, PatientID="SAME")
    values: Mapping[str, Value] = {"PatientID": "SAME", "AccessionNumber": None}
    out, dst = run(src, rule(values, ("OtherPatientIDs",), record_original=True))
    assert "OriginalAttributesSequence" not in out
    assert dst.read_bytes() == src.read_bytes()


def test_existing_items_are_kept_and_one_is_appended(tmp_path: Path) -> None:
    src = generated(tmp_path, PatientID="FIRST")
    run(src, rule({"PatientID": "SECOND"}, record_original=True, now=NOW))
    middle = src.with_name("out.dcm").rename(src.with_name("middle.dcm"))
    edit = rule({"PatientID": "THIRD"}, record_original=True, reason="CORRECT")
    out, _ = run(middle, edit)
    first, second = out.OriginalAttributesSequence
    assert first.ModifiedAttributesSequence[0].PatientID == "FIRST"
    assert first.ReasonForTheAttributeModification == "COERCE"
    assert second.ModifiedAttributesSequence[0].PatientID == "SECOND"
    assert second.ReasonForTheAttributeModification == "CORRECT"
    assert out.PatientID == "THIRD"


def test_the_default_time_is_now_with_its_utc_offset() -> None:
    ds = Dataset()
    before = datetime.now(UTC)
    apply(ds, {"PatientID": "X"}, (), record_original=True)
    stamp = ds.OriginalAttributesSequence[0].AttributeModificationDateTime
    parsed = datetime.strptime(stamp, "%Y%m%d%H%M%S.%f%z")
    assert before - timedelta(seconds=1) <= parsed <= datetime.now(UTC)


# -- pixel data, transfer syntaxes, the original file ----------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",  # native, explicit VR little endian
        "JPEG2000.dcm",  # encapsulated fragments
        "SC_rgb_jpeg_dcmtk.dcm",  # encapsulated baseline JPEG
        "MR_small_bigendian.dcm",  # explicit VR big endian
        "MR_small_implicit.dcm",  # implicit VR little endian
        "generated",
    ],
)
def test_pixel_data_is_copied_byte_for_byte(name: str, tmp_path: Path) -> None:
    src = generated(tmp_path) if name == "generated" else sample(name, tmp_path)
    digest = sha256(src)
    edit = rule({"PatientName": "Müller^Jörg", "PatientID": "NEW"}, record_original=True)
    out, dst = run(src, edit)
    assert pixel_tail(dst) == pixel_tail(src)
    assert out.PixelData == pydicom.dcmread(src).PixelData
    assert out.file_meta.TransferSyntaxUID == pydicom.dcmread(src).file_meta.TransferSyntaxUID
    assert (out.PatientName, out.PatientID) == ("Müller^Jörg", "NEW")
    assert sha256(src) == digest  # the original is never modified
    assert classify(str(dst)).sop_uid == out.SOPInstanceUID


def test_float_pixel_data_is_copied_byte_for_byte(tmp_path: Path) -> None:
    ds = pydicom.dcmread(generated(tmp_path))
    del ds.PixelData
    ds.BitsAllocated = 32
    ds.FloatPixelData = bytes(range(256)) * 4  # (7FE0,0008), 16 x 16 x 4 bytes
    src = tmp_path / "float.dcm"
    ds.save_as(src)
    out, dst = run(src, rule({"PatientID": "NEW"}))
    assert pixel_tail(dst)[:4] == b"\xe0\x7f\x08\x00"
    assert pixel_tail(dst) == pixel_tail(src)
    assert out.FloatPixelData == ds.FloatPixelData and out.PatientID == "NEW"


def test_a_file_without_pixel_data_is_written_whole(tmp_path: Path) -> None:
    src = sample("rtplan.dcm", tmp_path)
    before = pydicom.dcmread(src)
    out, _ = run(src, rule({"PatientID": "NEW"}))
    assert "PixelData" not in before
    assert out.PatientID == "NEW"
    assert len(out.BeamSequence) == len(before.BeamSequence)
    assert out.FractionGroupSequence == before.FractionGroupSequence


def test_a_deflated_file_is_read_changed_and_deflated_whole(tmp_path: Path) -> None:
    src = sample("image_dfl.dcm", tmp_path)
    out, _ = run(src, rule({"PatientID": "NEW"}))
    before = pydicom.dcmread(src)
    assert out.file_meta.TransferSyntaxUID == pydicom.uid.DeflatedExplicitVRLittleEndian
    assert out.PatientID == "NEW"
    assert out.PixelData == before.PixelData


def test_a_large_deflated_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = sample("image_dfl.dcm", tmp_path)
    monkeypatch.setattr(rewrite_module, "DEFLATED_LIMIT", 1024)
    with pytest.raises(FileProblem, match="Deflated transfer syntax"):
        rewrite(src, tmp_path / "out.dcm", rule({"PatientID": "NEW"}))
    assert not (tmp_path / "out.dcm").exists()


@pytest.mark.filterwarnings("ignore:Expected explicit VR, but found implicit VR")
def test_a_file_labelled_explicit_but_written_implicit_stays_consistent(tmp_path: Path) -> None:
    good = generated(tmp_path)
    ds = pydicom.dcmread(good)
    src = tmp_path / "mislabelled.dcm"
    pydicom.dcmwrite(src, ds, implicit_vr=True, little_endian=True, force_encoding=True)
    out, dst = run(src, rule({"PatientID": "NEW"}))
    assert out.PatientID == "NEW" and out.PixelData == ds.PixelData
    assert classify(str(dst)).sop_uid == ds.SOPInstanceUID


def test_a_file_without_preamble_gets_one(tmp_path: Path) -> None:
    src = generated(tmp_path)
    src.write_bytes(src.read_bytes()[132:])
    out, dst = run(src, rule({"PatientID": "NEW"}))
    assert dst.read_bytes()[128:132] == b"DICM"
    assert out.PatientID == "NEW" and pixel_tail(dst) == pixel_tail(src)


def test_dciodvfy_finds_no_new_error(tmp_path: Path) -> None:
    if not DCIODVFY.exists():
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but dciodvfy (dicom3tools) is not installed", pytrace=False)
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    src = sample("CT_small.dcm", tmp_path)
    values: Mapping[str, Value] = {"PatientName": "Müller^Jörg", "InstitutionName": "Süd"}
    _, dst = run(src, rule(values, record_original=True))
    assert dciodvfy_errors(dst) <= dciodvfy_errors(src)


def dciodvfy_errors(path: Path) -> set[str]:
    result = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, check=False)
    lines = (result.stdout + result.stderr).splitlines()
    assert any("CTImage" in line for line in lines)  # it did recognise and check the file
    return {line for line in lines if line.startswith("Error")}


# -- errors ------------------------------------------------------------------------------------


def test_a_missing_file_has_vanished(tmp_path: Path) -> None:
    with pytest.raises(FileVanished):
        rewrite(tmp_path / "gone.dcm", tmp_path / "out.dcm", rule({}))
    assert not (tmp_path / "out.dcm").exists()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: b"", "no File Meta Information"),
        (lambda data: data[: data.index(SOP_UID_TAG) + 13], "truncated: its header ends inside"),
        (lambda data: data[:132] + b"\x02\x00\x10\x00UI\xff\x7f" + data[140:], "cannot be read"),
    ],
    ids=["empty", "cut in the header", "bad meta length"],
)
def test_a_damaged_header_is_a_file_problem(
    damage: Callable[[bytes], bytes], message: str, tmp_path: Path
) -> None:
    src = generated(tmp_path)
    src.write_bytes(damage(src.read_bytes()))
    with pytest.raises(FileProblem, match=message):
        rewrite(src, tmp_path / "out.dcm", rule({"PatientID": "NEW"}))
    assert not (tmp_path / "out.dcm").exists()


def test_garbage_is_a_file_problem(tmp_path: Path) -> None:
    src = write_garbage(tmp_path / "garbage.dcm")
    with pytest.raises(FileProblem):
        rewrite(src, tmp_path / "out.dcm", rule({}))


def test_a_value_pydicom_cannot_write_names_the_attribute(tmp_path: Path) -> None:
    def edit(ds: Dataset) -> None:
        ds.Rows = 70000  # behind apply's back: pydicom only warns when it is set

    with pytest.raises(FileProblem, match=r"Rows \(0028,0010\)"):
        rewrite(generated(tmp_path), tmp_path / "out.dcm", edit)
    assert not (tmp_path / "out.dcm").exists()


def test_an_attribute_after_the_pixel_data_is_refused(tmp_path: Path) -> None:
    edit = rule({"DataSetTrailingPadding": None})
    with pytest.raises(FileProblem, match="DataSetTrailingPadding comes after the pixel data"):
        rewrite(generated(tmp_path), tmp_path / "out.dcm", edit)


def test_a_failed_copy_removes_the_partial_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_copy(fsrc: BinaryIO, fdst: BinaryIO, length: int = 0) -> None:
        fdst.write(fsrc.read(10))
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(shutil, "copyfileobj", failing_copy)
    dst = tmp_path / "out.dcm"
    with pytest.raises(FileUnreadable, match="Input/output error"):
        rewrite(generated(tmp_path), dst, rule({"PatientID": "NEW"}))
    assert not dst.exists()


def test_a_missing_spool_folder_is_not_a_vanished_source(tmp_path: Path) -> None:
    with pytest.raises(FileUnreadable, match="spool folder"):
        rewrite(generated(tmp_path), tmp_path / "no" / "out.dcm", rule({"PatientID": "N"}))
