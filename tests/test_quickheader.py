"""The quick header walk (``stowd.media.quickheader``, issue 19: CPU per file) decides nothing
pydicom would decide otherwise: every file, whole, cut or damaged, classifies the same with
the walk as with pydicom alone, and a rule still sees any attribute of the file."""

from __future__ import annotations

import collections
import io
import random
import struct
import textwrap
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pydicom
import pydicom.data
import pydicom.uid
import pytest
from dicomgen import make_instance_bytes
from harness import make_watch_folders
from pydicom.charset import python_encoding
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR
from pydicom.values import converters

from stowd.config.load import load_config
from stowd.config.model import Config
from stowd.errors import FileProblem
from stowd.media import quickheader
from stowd.media.dicomfile import HEAD_BYTES
from stowd.pipeline import classify as classify_mod
from stowd.pipeline import metadata
from stowd.pipeline.classify import classify_dicom

Outcome = tuple[object, ...]
CORPUS = Path(pydicom.data.__file__).parent / "test_files"
HEAD = """\
queue: ./state/queue.db
sources:
  - name: ct1
    watch: ./drop
    sent: ./sent
    failed: ./failed
    destination: pacs
destinations:
  pacs:
    url: http://127.0.0.1:8042/dicom-web
"""


def _outcome(path: Path) -> Outcome:
    """What classify decides, with the header's tags (parsed now, if it was put off)."""
    try:
        found = classify_dicom(str(path))
    except Exception as exc:  # the refusal itself is the outcome compared
        return (type(exc).__name__, str(exc))
    ds = found.header
    assert ds is not None
    meta = sorted(ds.file_meta.keys()) if hasattr(ds, "file_meta") else None
    return (found.kind, found.study_uid, found.sop_uid, found.sop_class, sorted(ds.keys()), meta)


def _both(path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Outcome, Outcome, bool]:
    """The outcome with the walk, without it, and whether the walk gave the keys."""
    walked: list[bool] = []
    real = quickheader.walk

    def watched(head: bytes, size: int, wanted: frozenset[int]) -> quickheader.Walked | None:
        found = real(head, size, wanted)
        walked.append(found is not None)
        return found

    with monkeypatch.context() as patch:
        patch.setattr(quickheader, "walk", watched)
        quick = _outcome(path)
    with monkeypatch.context() as patch:
        patch.setattr(quickheader, "walk", lambda *_args: None)
        slow = _outcome(path)
    return quick, slow, any(walked) and quick[0] == "dicom"


def _implicit(data: bytes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, implicit_vr=True, little_endian=True, enforce_file_format=True)
    return out.getvalue()


def _sequences(data: bytes) -> bytes:
    """``data`` with sequences of undefined length (pydicom parses them at once): items of
    undefined and defined length, a nested sequence, an empty item, pixel data in an item."""
    ds = pydicom.dcmread(io.BytesIO(data))
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "121311", "DCM", "Localizer"
    reference = Dataset()
    reference.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    reference.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.77"
    reference.PurposeOfReferenceCodeSequence = [code]
    reference["PurposeOfReferenceCodeSequence"].is_undefined_length = True
    reference.is_undefined_length_sequence_item = True
    empty = Dataset()
    empty.is_undefined_length_sequence_item = True
    ds.ReferencedImageSequence = [reference, empty]
    ds["ReferencedImageSequence"].is_undefined_length = True
    icon = Dataset()
    icon.Rows, icon.Columns, icon.BitsAllocated = 4, 4, 8
    icon.PixelData = bytes(16)
    ds.IconImageSequence = [icon]
    ds["IconImageSequence"].is_undefined_length = True
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _bases() -> dict[str, bytes]:
    plain = make_instance_bytes(size_bytes=3000)[0]
    extra = {
        "SpecificCharacterSet": "ISO_IR 100",
        "InstitutionName": "Ward 3",
        "ImageType": ["ORIGINAL", "PRIMARY"],
    }
    rich = make_instance_bytes(size_bytes=3000, extra=extra)[0]
    return {
        "explicit": plain,
        "implicit": _implicit(plain),
        "charset": rich,
        "sequences": _sequences(plain),
    }


def _pixel_start(data: bytes) -> int:
    at = data.rfind(b"\xe0\x7f\x10\x00")
    assert at > 0
    return at


def _cases(data: bytes, seed: int) -> list[bytes]:
    """The file whole, cut at many points, and with single bytes of its header changed."""
    rng = random.Random(seed)
    pixels = _pixel_start(data)
    cuts = sorted({*range(0, pixels + 16, 5), *range(pixels - 3, pixels + 20), len(data) - 1})
    cases = [data] + [data[:n] for n in cuts]
    for _ in range(400):
        at = rng.randrange(0, pixels + 12)
        value = rng.choice([0x00, 0xFF, 0x20, 0x5C, ord("U"), ord("I"), rng.randrange(256)])
        cases.append(data[:at] + bytes([value]) + data[at + 1 :])
    for _ in range(60):  # a byte more or less shifts every element after it
        at = rng.randrange(132, pixels)
        cases.append(data[:at] + data[at + 1 :])
        cases.append(data[:at] + b"\x00" + data[at:])
    return cases


def _data_set_start(data: bytes) -> int:
    group_length: int = struct.unpack_from("<I", data, 140)[0]  # (0002,0000)'s value
    return 144 + group_length


def _targeted(data: bytes) -> list[bytes]:
    """Changes a random byte seldom makes: a key UID with another VR, an item delimiter or a
    command element among the elements, a first element whose bytes look explicit."""
    start = _data_set_start(data)
    cases = []
    for tag in (b"\x08\x00\x16\x00", b"\x08\x00\x18\x00", b"\x20\x00\x0d\x00"):
        at = data.find(tag, start)
        assert at > 0
        for vr in (b"LO", b"SH", b"CS", b"PN", b"ST", b"DS", b"AE", b"LT", b"US", b"AS"):
            if data[at + 4 : at + 6] == b"UI":  # explicit
                cases.append(data[: at + 4] + vr + data[at + 6 :])
        for extra in (b"\xfe\xff\x0d\xe0\0\0\0\0", b"\xfe\xff\xdd\xe0\0\0\0\0"):
            cases.append(data[:at] + extra + data[at:])
    cases += _sequence_cases(data, start)
    command = struct.pack("<HH2sHI", 0, 0, b"UL", 4, 0)
    cases.append(data[:start] + command + data[start:])
    cases.append(data[:start] + struct.pack("<HHI", 0, 0, 4) + b"\0" * 4 + data[start:])
    cases.append(data[: start + 4] + b"AE" + data[start + 6 :])
    return cases


def _sequence_cases(data: bytes, start: int) -> list[bytes]:
    """An item given a length that ends it early or late (an element across its end, its
    delimiter within it), a sequence of undefined length with another long VR, a sequence
    delimiter with a length."""
    cases = []
    item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    at = data.find(item, start)
    while at > 0:
        for length in (0, 4, 8, 10, 18, 26, 40, 64):
            cases.append(data[: at + 4] + struct.pack("<I", length) + data[at + 8 :])
        at = data.find(item, at + 1)
    undefined = b"SQ\0\0\xff\xff\xff\xff"
    at = data.find(undefined, start)
    while at > 0:
        for vr in (b"OB", b"UN", b"UT", b"OW"):
            cases.append(data[:at] + vr + data[at + 2 :])
        at = data.find(undefined, at + 1)
    end = data.find(b"\xfe\xff\xdd\xe0\0\0\0\0", start)
    if end > 0:
        cases.append(data[: end + 4] + struct.pack("<I", 4) + data[end + 8 :])
    return cases


@pytest.mark.parametrize("base", ["explicit", "implicit", "charset", "sequences"])
def test_whole_cut_and_damaged_headers_classify_as_pydicom_alone_does(
    base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "case.dcm"
    quick_ones = 0
    whole = _bases()[base]
    for n, data in enumerate(_cases(whole, seed=19) + _targeted(whole)):
        path.write_bytes(data)
        quick, slow, walked = _both(path, monkeypatch)
        assert quick == slow, f"case {n} ({len(data)} bytes)"
        quick_ones += walked
    assert quick_ones > 50  # the walk gave the keys of many (else this compares nothing)


def test_pydicom_test_files_classify_as_pydicom_alone_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pydicom's own test files: every transfer syntax, sequences, odd and damaged files."""
    files = sorted(p for p in CORPUS.iterdir() if p.is_file() and p.stat().st_size < 8 << 20)
    assert len(files) > 50
    quick_ones = 0
    for source in files:
        path = tmp_path / source.name
        path.write_bytes(source.read_bytes())
        quick, slow, walked = _both(path, monkeypatch)
        assert quick == slow, source.name
        quick_ones += walked
    assert quick_ones > 5


def _counted(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Each file pydicom parses from now on."""
    parsed: list[object] = []
    real: Callable[..., pydicom.FileDataset] = pydicom.dcmread

    def counted(*args: object, **kwargs: object) -> pydicom.FileDataset:
        parsed.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counted)
    return parsed


def _config(tmp_path: Path, rules: str = "") -> Config:
    config_path = tmp_path / "stowd.yaml"
    config_path.write_text(HEAD + textwrap.dedent(rules), encoding="utf-8")
    make_watch_folders(config_path)
    return load_config(config_path)


def test_a_new_file_is_classified_without_pydicom(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The keys of a usual file come from the walk: pydicom parses its header only when
    something asks for it (issue 19: pydicom's parse was ~90 % of reading a new file)."""
    path = tmp_path / "one.dcm"
    data, uid = make_instance_bytes(size_bytes=64 * 1024)
    path.write_bytes(data)
    parsed = _counted(monkeypatch)
    found = classify_dicom(str(path))
    assert (found.sop_uid, parsed) == (uid, [])
    config = _config(tmp_path)  # no rules (a rule that sets a value reads the one before)
    planned = metadata.plan_file(
        config, config.source("ct1"), str(path), path.name, found, now=datetime(2026, 12, 7)
    )
    assert (planned.outcome.values, parsed) == ({}, [])
    assert found.header is not None
    assert str(found.header.SOPInstanceUID) == uid
    assert len(parsed) == 1
    assert found.header is found.header  # parsed once, then kept
    assert len(parsed) == 1


def test_a_header_longer_than_the_copy_in_memory_is_read_by_pydicom() -> None:
    """The walk answers only for a header that ends within the bytes held."""
    data = make_instance_bytes(size_bytes=3000)[0]
    pixels = _pixel_start(data)
    size = HEAD_BYTES * 2
    assert quickheader.walk(data, len(data), frozenset()) is not None
    assert quickheader.walk(data[:pixels], size, frozenset()) is None
    assert quickheader.walk(data[: pixels + 11], size, frozenset()) is None  # header cut
    assert quickheader.walk(data[: pixels + 12], size, frozenset()) is not None


def test_the_walk_knows_the_vrs_and_character_sets_pydicom_knows() -> None:
    """The walk's own tables (written out so that a usual header imports none of pydicom,
    issue 19) are pydicom's: its VRs, those with a 4-byte length, and the Specific Character
    Set terms it converts."""
    two_letters = {vr.value.encode() for vr in VR if len(vr.value) == 2}
    assert two_letters == quickheader.VRS
    assert {str(vr).encode() for vr in EXPLICIT_VR_LENGTH_32} == quickheader.LONG_VRS
    assert set(python_encoding) == quickheader.CHARSET_TERMS
    # the VRs pydicom converts: dicomfile.needs_explicit asks whether the first VR is one
    assert {vr.encode() for vr in converters if len(vr) == 2} == quickheader.VRS


def test_a_transfer_syntax_registered_with_pydicom_is_left_to_pydicom() -> None:
    """A private transfer syntax pydicom was told of is pydicom's to read, as before the
    walk stopped importing pydicom to ask."""
    private = "1.2.3.4.5.6.7.8.9.10"  # as long as Explicit VR Little Endian's, padded
    data = make_instance_bytes(size_bytes=3000)[0]
    label = str(pydicom.uid.ExplicitVRLittleEndian).encode() + b"\0"
    assert data.count(label) == 1 and len(label) == len(private)
    data = data.replace(label, private.encode())
    assert quickheader.walk(data, len(data), frozenset()) is not None
    pydicom.uid.register_transfer_syntax(private, implicit_vr=False, little_endian=True)
    try:
        assert quickheader.walk(data, len(data), frozenset()) is None
    finally:
        pydicom.uid.PrivateTransferSyntaxes.remove(private)


def test_a_rule_sees_an_attribute_the_walk_did_not_read(tmp_path: Path) -> None:
    """The walk reads only the UIDs; a rule matching on, and copying, any other attribute
    still sees the file's value (the header is then parsed by pydicom, as before)."""
    config = _config(
        tmp_path,
        """\
        rules:
          - match:
              attributes: {InstitutionName: "Ward 3"}
            set: {StationName: "{dicom.InstitutionName|upper}"}
        """,
    )
    source = config.source("ct1")
    plans = {}
    for name, institution in (("ward3", "Ward 3"), ("other", "Ward 4")):
        path = tmp_path / f"{name}.dcm"
        data = make_instance_bytes(size_bytes=3000, extra={"InstitutionName": institution})[0]
        path.write_bytes(data)
        found = classify_mod.classify(str(path))
        assert found.held.in_memory()
        now = datetime(2026, 12, 7)
        plans[name] = metadata.plan_file(config, source, str(path), path.name, found, now=now)
    assert plans["ward3"].outcome.values == {"StationName": "WARD 3"}
    assert plans["other"].outcome.values == {}


def test_a_received_file_is_handed_on_without_being_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The receiver's read (classify_dicom, then remember) hands the walked keys on to the
    reader of new files; the header is parsed from memory if a rule or its origin asks."""
    monkeypatch.setattr(classify_mod, "_recent", collections.OrderedDict())
    path = tmp_path / "received.dcm"
    path.write_bytes(make_instance_bytes(size_bytes=4000)[0])
    parsed = _counted(monkeypatch)
    found = classify_dicom(str(path))
    classify_mod.remember(str(path), found)
    assert classify_mod.classify(str(path)) is found
    assert parsed == []
    assert found.header is not None
    assert found.header.filename is None  # parsed from memory, as pydicom marks it
    assert len(parsed) == 1


def _replaced(tag: bytes, element: bytes) -> bytes:
    """A usual explicit file whose element of ``tag`` (its 4 bytes) is ``element`` instead."""
    data = make_instance_bytes(size_bytes=3000)[0]
    at = data.index(tag + b"CS", _data_set_start(data))
    end = at + 8 + struct.unpack_from("<H", data, at + 6)[0]
    return data[:at] + element + data[end:]


def test_a_character_set_of_undefined_length_is_refused_as_pydicom_refuses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Specific Character Set written as an explicit sequence of undefined length: pydicom
    parses it as a sequence, then cannot read it as the terms it needs at once (the walk
    skipped it as any sequence and gave the keys of a file pydicom refuses)."""
    empty_sequence = b"\xfe\xff\xdd\xe0\0\0\0\0"
    path = tmp_path / "case.dcm"
    charset = b"\x08\x00\x05\x00"
    path.write_bytes(_replaced(charset, charset + b"SQ\0\0\xff\xff\xff\xff" + empty_sequence))
    with monkeypatch.context() as patch:
        patch.setattr(quickheader, "walk", lambda *_args: None)
        with pytest.raises(FileProblem) as slow:
            classify_dicom(str(path))
    with pytest.raises(FileProblem) as quick:
        classify_dicom(str(path))
    assert str(quick.value) == str(slow.value)


def _written(ds: Dataset, implicit: bool) -> bytes:
    """``ds`` as a Part-10 file (File Meta made by pydicom), implicit or explicit VR."""
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian if implicit else pydicom.uid.ExplicitVRLittleEndian
    )
    out = io.BytesIO()
    ds.save_as(out, implicit_vr=implicit, little_endian=True, enforce_file_format=True)
    return out.getvalue()


def _keys_only() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR: no pixel data
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    return ds


def _with_private(vr: str, length: int) -> Dataset:
    """The keys after a private element of ``vr`` (a long VR: 4-byte length) whose value
    has ``length`` bytes, then pixel data."""
    ds = _keys_only()
    ds.add_new(0x00090010, "LO", "STOWD TEST")
    ds.add_new(0x00091001, vr, b"\x01" * length if vr != "UT" else "x" * length)
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.SamplesPerPixel = 2, 2, 8, 1
    ds.PixelData = bytes(4)
    return ds


@pytest.mark.parametrize("implicit", [False, True])
def test_elements_the_walk_reads_in_its_loop_or_aside_classify_as_pydicom_alone_does(
    implicit: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walk reads a usual element in its loop and any other aside (issue 19, second
    round): a long private element before the keys (its value within the bytes held, ending
    at their end, or past it), and a file that ends right after its last key, whole and cut
    at every byte of its last elements."""
    path = tmp_path / "case.dcm"
    cases = []
    for vr in ("OB", "UN", "UT"):
        for length in (0, 2, 1000, HEAD_BYTES - 600, HEAD_BYTES, 3 * HEAD_BYTES):
            cases.append(_written(_with_private(vr, length), implicit))
    keys_only = _written(_keys_only(), implicit)
    cases += [keys_only[:n] for n in range(len(keys_only) - 80, len(keys_only) + 1)]
    cases.append(keys_only + b"\0" * 3)  # a few bytes after the last element: not one
    quick_ones = 0
    for n, data in enumerate(cases):
        path.write_bytes(data)
        quick, slow, walked = _both(path, monkeypatch)
        assert quick == slow, f"case {n} ({len(data)} bytes)"
        quick_ones += walked
    assert quick_ones >= 13  # the long private elements held whole, the keys-only file
