"""vr.py: keyword lookup with near-miss suggestions, and per-VR checks of user-written values."""

from __future__ import annotations

import datetime as dt

import pytest
from pydicom._dicom_dict import DicomDictionary, RepeatersDictionary

from stowd.rules import vr

# --- lookup / suggest -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keyword", "tag", "vr_", "vm"),
    [
        ("PatientName", 0x00100010, "PN", "1"),
        ("ImageType", 0x00080008, "CS", "2-n"),
        ("OtherPatientIDs", 0x00101000, "LO", "1-n"),  # retired, still allowed
        ("SmallestImagePixelValue", 0x00280106, "US", "1"),  # 'US or SS': the first
        ("OverlayRows", 0x60000010, "US", "1"),  # repeating group 60xx: the first group
        ("EncapsulatedDocument", 0x00420011, "OB", "1"),  # binary: refused by check only
    ],
)
def test_lookup_known(keyword: str, tag: int, vr_: str, vm: str) -> None:
    assert vr.lookup(keyword) == vr.Attr(keyword, tag, vr_, vm)


@pytest.mark.parametrize(
    ("keyword", "fragments"),
    [
        ("PatientsName", ["unknown DICOM keyword 'PatientsName'", "did you mean 'PatientName'?"]),
        ("patientid", ["unknown DICOM keyword 'patientid'", "did you mean 'PatientID'?"]),
        ("Xyzzy", ["unknown DICOM keyword 'Xyzzy'", "spelled as in DICOM"]),
        ("TransferSyntaxUID", ["(0002,0010)", "File Meta Information", "stowd writes itself"]),
        ("FileMetaInformationGroupLength", ["(0002,0000)", "File Meta Information"]),
        ("CommandGroupLength", ["(0000,0000)", "network commands"]),
        ("PixelData", ["(7FE0,0010)", "comes after the pixel data"]),
        ("DataSetTrailingPadding", ["(FFFC,FFFC)", "comes after the pixel data"]),
    ],
)
def test_lookup_refuses(keyword: str, fragments: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        vr.lookup(keyword)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("keyword", "expected"),
    [
        ("PatientsName", "PatientName"),
        ("PATIENTID", "PatientID"),
        ("StudyDescripton", "StudyDescription"),
        ("Xyzzy", None),
    ],
)
def test_suggest(keyword: str, expected: str | None) -> None:
    assert vr.suggest(keyword) == expected


# --- check: good values -----------------------------------------------------------------

GOOD: list[tuple[str, object, vr.Value]] = [
    # empty -> None, for any VR including SQ
    ("PatientName", None, None),
    ("PatientName", "", None),
    ("PatientName", "   ", None),
    ("ImageType", [], None),
    ("ReferencedStudySequence", [], None),
    # text VRs: trimmed, a whole number is taken as its digits
    ("PatientID", "  AB 12  ", "AB 12"),
    ("PatientID", 12345, "12345"),
    ("PatientID", "Müller-ß", "Müller-ß"),
    ("StudyID", "S" * 16, "S" * 16),
    ("InstitutionAddress", "  Main St. 1\r\nTown  ", "  Main St. 1\r\nTown"),
    ("PatientComments", "a\\b", "a\\b"),  # LT: one value, a backslash is text
    ("TextValue", "x" * 20000, "x" * 20000),
    ("LongCodeValue", "x" * 500, "x" * 500),
    ("CodingSchemeURL", "http://example.org/a?b=c", "http://example.org/a?b=c"),
    ("StationAETitle", "PACS_1", "PACS_1"),
    # several values: backslashes or a list; one value of a list stays a scalar
    ("SoftwareVersions", "1.0\\2.0", ["1.0", "2.0"]),
    ("SoftwareVersions", ["1.0"], "1.0"),
    ("ImageType", "ORIGINAL\\PRIMARY", ["ORIGINAL", "PRIMARY"]),
    ("ImageType", [" ORIGINAL ", "PRIMARY", "AXIAL"], ["ORIGINAL", "PRIMARY", "AXIAL"]),
    ("RetrieveAETitle", ["A", "B"], ["A", "B"]),
    # CS, AS
    ("PatientSex", "M", "M"),
    ("ConversionType", "WSD", "WSD"),
    ("PatientAge", "045Y", "045Y"),
    # PN
    ("PatientName", "Doe^John^B^Dr^Jr", "Doe^John^B^Dr^Jr"),
    ("PatientName", "Yamada^Tarou=山田^太郎=やまだ^たろう", "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    ("OtherPatientNames", "Doe^J\\Roe^R", ["Doe^J", "Roe^R"]),
    # DA, DT, TM
    ("PatientBirthDate", "19800203", "19800203"),
    ("PatientBirthDate", 19800203, "19800203"),
    ("PatientBirthDate", dt.date(1980, 2, 3), "19800203"),
    ("PatientBirthDate", "20000229", "20000229"),
    ("AcquisitionDateTime", "2024", "2024"),
    ("AcquisitionDateTime", "20240105103000.123456+0100", "20240105103000.123456+0100"),
    ("AcquisitionDateTime", dt.datetime(2024, 1, 5, 10, 30), "20240105103000"),
    ("AcquisitionDateTime", dt.date(2024, 1, 5), "20240105"),
    (
        "AcquisitionDateTime",
        dt.datetime(2024, 1, 5, 10, 30, 0, 5, tzinfo=dt.timezone(-dt.timedelta(hours=5))),
        "20240105103000.000005-0500",
    ),
    ("PatientBirthTime", "0930", "0930"),
    ("PatientBirthTime", "093000.5", "093000.5"),
    ("PatientBirthTime", "235960", "235960"),  # a leap second
    ("PatientBirthTime", dt.time(9, 30, 1), "093001"),
    ("PatientBirthTime", dt.time(9, 30, 1, 250000), "093001.250000"),
    # UI
    ("ReferencedSOPInstanceUID", "1.2.840.10008.0.1", "1.2.840.10008.0.1"),
    # integers
    ("SeriesNumber", 3, 3),
    ("SeriesNumber", " -12 ", -12),
    ("SeriesNumber", 4.0, 4),
    ("SeriesNumber", 2**31 - 1, 2**31 - 1),
    ("Rows", 65535, 65535),
    ("TagAngleSecondAxis", -32768, -32768),
    ("SimpleFrameList", "1\\2\\4294967295", [1, 2, 4294967295]),
    ("ReferencePixelX0", -(2**31), -(2**31)),
    ("FileOffsetInContainer", 2**64 - 1, 2**64 - 1),
    ("SelectorSVValue", [-(2**63), 2**63 - 1], [-(2**63), 2**63 - 1]),
    # DS -> text of at most 16 characters
    ("SliceThickness", 2.5, "2.5"),
    ("SliceThickness", 3, "3"),
    ("SliceThickness", " -1.5e-3 ", "-1.5e-3"),
    ("SliceThickness", 0.1 + 0.2, "0.3"),
    ("SliceThickness", 1 / 3, "0.33333333333333"),
    ("SliceThickness", 1e-300, "1e-300"),
    ("PixelSpacing", [0.5, "0.25"], ["0.5", "0.25"]),
    ("ImagePositionPatient", "1\\2\\3", ["1", "2", "3"]),
    # FL / FD
    ("ExaminedBodyThickness", "12.5", 12.5),
    ("ExaminedBodyThickness", 3, 3.0),
    ("TimeRange", [1, 2.5], [1.0, 2.5]),
    ("EventTimeOffset", 1e300, 1e300),
]


@pytest.mark.parametrize(("keyword", "value", "expected"), GOOD)
def test_check_good(keyword: str, value: object, expected: vr.Value) -> None:
    result = vr.check(keyword, value)
    assert result == expected
    assert type(result) is type(expected)


def test_check_sequence_normalizes_every_item() -> None:
    value = [
        {"ReferencedSOPClassUID": "1.2.3", "ReferencedSOPInstanceUID": " 1.2.3.4 "},
        {},
        {"ReferencedSOPClassUID": None},
    ]
    assert vr.check("ReferencedStudySequence", value) == [
        {"ReferencedSOPClassUID": "1.2.3", "ReferencedSOPInstanceUID": "1.2.3.4"},
        {},
        {"ReferencedSOPClassUID": None},
    ]


def test_check_nested_sequence() -> None:
    value = [{"IssuerOfPatientIDQualifiersSequence": [{"UniversalEntityID": "X"}]}]
    assert vr.check("OtherPatientIDsSequence", value) == value


# --- check: bad values ------------------------------------------------------------------

BAD: list[tuple[str, object, list[str]]] = [
    # any VR
    ("PatientID", True, ["PatientID (LO)", "true/false is not a DICOM value; write text"]),
    ("Rows", False, ["Rows (US)", "got false", "true/false"]),
    ("ImageType", ["ORIGINAL", True], ["ImageType (CS)", "value 2 of 2", "got true"]),
    ("PatientID", {"a": 1}, ["PatientID (LO)", "not a mapping", "{'a': 1}"]),
    ("PatientID", 1.5, ["PatientID (LO)", "must be text, got the number 1.5", "quotes"]),
    ("PatientID", dt.date(2024, 1, 2), ["PatientID (LO)", "must be text", "2024-01-02"]),
    ("EncapsulatedDocument", "x", ["EncapsulatedDocument (OB)", "binary data"]),
    ("FrameIncrementPointer", "00280008", ["FrameIncrementPointer (AT)", "binary data"]),
    ("Xyzzy", "x", ["unknown DICOM keyword 'Xyzzy'"]),
    # value multiplicity
    ("ImageType", "ORIGINAL", ["ImageType (CS) takes 2 or more values, got 1"]),
    ("PatientSex", "M\\F", ["PatientSex (CS) takes one value, got 2", "backslash"]),
    ("PatientName", ["Doe", "Roe"], ["PatientName (PN) takes one value, got 2"]),
    ("PixelSpacing", "1\\2\\3", ["PixelSpacing (DS) takes 2 values, got 3"]),
    ("ImagePositionPatient", [1, 2], ["ImagePositionPatient (DS) takes 3 values, got 2"]),
    ("ImageType", ["A\\B", "C"], ["ImageType (CS)", "value 1 contains a backslash", "'A\\\\B'"]),
    ("ImageType", [["A"], "B"], ["ImageType (CS)", "value 1 must be a single value"]),
    ("ImageType", "ORIGINAL\\\\AXIAL", ["ImageType (CS)", "value 2 of 3 is empty"]),
    # AE, AS, CS
    ("StationAETitle", "A" * 17, ["StationAETitle (AE)", "at most 16 characters, got 17"]),
    ("StationAETitle", "PA\tCS", ["StationAETitle (AE)", "control characters", "'\\t'"]),
    ("PatientAge", "45Y", ["PatientAge (AS)", "nnnD, nnnW, nnnM or nnnY", "'45Y'"]),
    ("PatientAge", "045y", ["PatientAge (AS)", "'045y'"]),
    ("PatientSex", "m", ["PatientSex (CS)", "must be upper case: write 'M'", "got 'm'"]),
    ("ImageType", "original\\primary", ["value 1 of 2", "write 'ORIGINAL'"]),
    ("ConversionType", "W-SD", ["ConversionType (CS)", "A-Z, 0-9, space and underscore", "'W-SD'"]),
    ("ConversionType", "A" * 17, ["ConversionType (CS)", "at most 16 characters"]),
    # DA
    (
        "PatientBirthDate",
        "2024-13-01",
        ["PatientBirthDate (DA) must be a date written YYYYMMDD, got '2024-13-01'"],
    ),
    ("PatientBirthDate", "2024-01-05", ["got '2024-01-05'; write '20240105'"]),
    ("PatientBirthDate", "05.01.2024", ["PatientBirthDate (DA)", "YYYYMMDD", "'05.01.2024'"]),
    ("PatientBirthDate", "19800230", ["PatientBirthDate (DA)", "got '19800230'"]),
    ("PatientBirthDate", "19010229", ["PatientBirthDate (DA)", "'19010229'"]),
    ("PatientBirthDate", 2024, ["PatientBirthDate (DA)", "YYYYMMDD", "got 2024"]),
    ("PatientBirthDate", dt.datetime(2024, 1, 5, 10, 0), ["without a time", "2024-01-05T10:00"]),
    # DT
    ("AcquisitionDateTime", "20241301", ["AcquisitionDateTime (DT)", "'20241301'"]),
    ("AcquisitionDateTime", "2024010524", ["AcquisitionDateTime (DT)", "'2024010524'"]),
    ("AcquisitionDateTime", "2024010203.5", ["AcquisitionDateTime (DT)", "YYYYMMDDHHMMSS"]),
    ("AcquisitionDateTime", "20240105+1500", ["AcquisitionDateTime (DT)", "UTC offset"]),
    ("AcquisitionDateTime", "2024-01-05T10:00", ["AcquisitionDateTime (DT)", "2024-01-05T10:00"]),
    # TM
    ("PatientBirthTime", 93000, ["PatientBirthTime (TM)", "ambiguous", "quotes", "'093000'"]),
    ("PatientBirthTime", "2460", ["PatientBirthTime (TM)", "HHMMSS", "got '2460'"]),
    ("PatientBirthTime", "9:30", ["PatientBirthTime (TM)", "got '9:30'"]),
    ("PatientBirthTime", "10:30:00", ["PatientBirthTime (TM)", "got '10:30:00'; write '103000'"]),
    ("PatientBirthTime", "093000.1234567", ["PatientBirthTime (TM)", "'093000.1234567'"]),
    # text lengths and characters
    ("PatientID", "x" * 65, ["PatientID (LO)", "at most 64 characters, got 65"]),
    ("StudyID", "x" * 17, ["StudyID (SH)", "at most 16 characters, got 17"]),
    ("InstitutionAddress", "x" * 1025, ["InstitutionAddress (ST)", "at most 1024 characters"]),
    ("PatientComments", "x" * 10241, ["PatientComments (LT)", "at most 10240 characters"]),
    ("PatientID", "a\nb", ["PatientID (LO)", "control characters", "'\\n'"]),
    ("LongCodeValue", "a\\b", ["LongCodeValue (UC) takes one value, got 2"]),
    # PN
    ("PatientName", "a^b^c^d^e^f", ["PatientName (PN)", "at most 5", "'a^b^c^d^e^f'"]),
    ("PatientName", "a=b=c=d", ["PatientName (PN)", "at most 3", "'a=b=c=d'"]),
    ("PatientName", "x" * 65, ["PatientName (PN)", "at most 64 characters"]),
    # UI
    ("ReferencedSOPInstanceUID", 1.2, ["(UI)", "got the number 1.2", "quotes in YAML"]),
    ("ReferencedSOPInstanceUID", "1.02.3", ["ReferencedSOPInstanceUID (UI)", "got '1.02.3'"]),
    ("ReferencedSOPInstanceUID", "1..2", ["(UI)", "single dots", "'1..2'"]),
    ("ReferencedSOPInstanceUID", "1.2.a", ["(UI)", "digits", "'1.2.a'"]),
    ("ReferencedSOPInstanceUID", "1." + "2" * 63, ["(UI)", "at most 64 characters, got 65"]),
    # integers
    ("SeriesNumber", 2**31, ["SeriesNumber (IS)", "between -2147483648 and 2147483647"]),
    ("SeriesNumber", "1.5", ["SeriesNumber (IS)", "must be a whole number, got '1.5'"]),
    ("SeriesNumber", 1.5, ["SeriesNumber (IS)", "whole number, got 1.5"]),
    ("Rows", -1, ["Rows (US) must be between 0 and 65535, got -1"]),
    ("Rows", 65536, ["Rows (US)", "65536"]),
    ("TagAngleSecondAxis", 32768, ["TagAngleSecondAxis (SS)", "-32768 and 32767"]),
    ("SimpleFrameList", -1, ["SimpleFrameList (UL)", "between 0 and 4294967295"]),
    ("ReferencePixelX0", 2**31, ["ReferencePixelX0 (SL)", "2147483647"]),
    ("FileOffsetInContainer", -1, ["FileOffsetInContainer (UV)", "between 0 and"]),
    ("SelectorSVValue", 2**63, ["SelectorSVValue (SV)", str(2**63)]),
    # DS, FL, FD
    ("SliceThickness", "abc", ["SliceThickness (DS)", "decimal number", "got 'abc'"]),
    ("SliceThickness", "1,5", ["SliceThickness (DS)", "got '1,5'"]),
    ("SliceThickness", "12345678901234567", ["SliceThickness (DS)", "at most 16 characters"]),
    ("SliceThickness", 10**20, ["SliceThickness (DS)", "at most 16 characters"]),
    ("SliceThickness", float("nan"), ["SliceThickness (DS)", "finite", "nan"]),
    ("ExaminedBodyThickness", "thick", ["ExaminedBodyThickness (FL)", "a number, got 'thick'"]),
    ("ExaminedBodyThickness", 1e39, ["ExaminedBodyThickness (FL)", "1e+39"]),
    ("EventTimeOffset", float("inf"), ["EventTimeOffset (FD)", "finite", "inf"]),
    # SQ
    ("ReferencedStudySequence", {"ReferencedSOPClassUID": "1.2"}, ["(SQ)", "list of items"]),
    ("ReferencedStudySequence", "1.2.3", ["ReferencedStudySequence (SQ)", "'1.2.3'"]),
    ("ReferencedStudySequence", ["x"], ["ReferencedStudySequence[0] must be a mapping", "'x'"]),
]


@pytest.mark.parametrize(("keyword", "value", "fragments"), BAD)
def test_check_bad(keyword: str, value: object, fragments: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        vr.check(keyword, value)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_check_sequence_names_the_path_of_every_problem() -> None:
    value = [
        {"ReferencedSOPClassUID": "1.2.3"},
        {"ReferencedSOPInstanceUID": "1.02", "PatientsName": "x", "TransferSyntaxUID": "1.2"},
    ]
    with pytest.raises(ValueError) as info:
        vr.check("ReferencedStudySequence", value)
    assert str(info.value) == (
        "ReferencedStudySequence[1].ReferencedSOPInstanceUID (UI) must be digits separated by "
        "single dots, with no part starting with 0 (except '0' itself), got '1.02'; "
        "ReferencedStudySequence[1]: unknown DICOM keyword 'PatientsName'; "
        "did you mean 'PatientName'?; "
        "ReferencedStudySequence[1]: TransferSyntaxUID (0002,0010) is part of the File Meta "
        "Information, which stowd writes itself"
    )


def test_check_nested_sequence_path() -> None:
    value = [{"IssuerOfPatientIDQualifiersSequence": [{"IdentifierTypeCode": "dns"}]}]
    with pytest.raises(ValueError) as info:
        vr.check("OtherPatientIDsSequence", value)
    assert str(info.value) == (
        "OtherPatientIDsSequence[0].IssuerOfPatientIDQualifiersSequence[0].IdentifierTypeCode "
        "(CS) must be upper case: write 'DNS', got 'dns'"
    )


def test_the_dictionary_read_alone_is_pydicoms() -> None:
    """The data dictionary read from pydicom's file without importing pydicom (issue 19:
    start-up) is pydicom's own, entry for entry."""
    alone = vr._dictionary_alone()
    assert alone is not None
    assert alone.DicomDictionary == DicomDictionary
    assert alone.RepeatersDictionary == RepeatersDictionary
    assert vr.dictionary() == (DicomDictionary, RepeatersDictionary)
