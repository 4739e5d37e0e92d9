"""``transcode: explicit-vr``: Implicit VR Little Endian files reach the archive converted to
Explicit VR Little Endian, losslessly and with the pixel data streamed (stowd/rewrite.py)."""

from __future__ import annotations

import io
import json
import struct
import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest
from bombgen import peak_rss_mb
from dicomgen import make_instance_bytes
from harness import Stowd, make_layout, run_cli, run_until, wait_for
from orthanc import Orthanc
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from stowd.errors import FileProblem
from stowd.media.dicomfile import needs_explicit
from stowd.media.rewrite import rewrite

IMPLICIT = str(ImplicitVRLittleEndian)
EXPLICIT = str(ExplicitVRLittleEndian)
PIXEL_TAG = struct.pack("<HH", 0x7FE0, 0x0010)
PADDING = struct.pack("<HHL", 0xFFFC, 0xFFFC, 6) + b"\0" * 6  # DataSetTrailingPadding
TRANSCODE = {"transcode": "explicit-vr"}


def rich_header(**kwargs: Any) -> FileDataset:
    """A 16-bit image header with what a conversion must get right: text in Latin-1, a
    'US or SS' attribute, a sequence, private elements known to pydicom's private
    dictionary, unknown to it, and without a private creator."""
    data, _ = make_instance_bytes(rows=4, columns=4, **kwargs)
    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.PixelData
    ds.PatientName = "Müller^Jürgen"  # ISO_IR 100
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 1
    ds.add_new(0x00280106, "SS", -5)  # SmallestImagePixelValue: 'US or SS'
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "T-D1100", "SRT", "Head"
    item.add_new(0x00111010, "LO", "inner private")
    modifier = Dataset()
    modifier.CodeValue, modifier.CodingSchemeDesignator = "G-A101", "SRT"
    item.AnatomicRegionModifierSequence = [modifier, Dataset()]  # nested, one item empty
    ds.AnatomicRegionSequence = [item]
    ds.add_new(0x00290010, "LO", "SIEMENS CSA HEADER")
    ds.add_new(0x00291008, "CS", "IMAGE NUM 4")  # in pydicom's private dictionary: CS
    ds.add_new(0x00291010, "OB", bytes(range(200)))
    ds.add_new(0x00430010, "LO", "NOBODY KNOWS ME")
    ds.add_new(0x00431001, "DS", "1.5")  # unknown creator: UN in explicit VR
    ds.add_new(0x00091001, "LO", "no creator")
    return ds


def write_implicit(
    path: Path, ds: FileDataset, pixels: int, *, trailer: bytes = b"", label: str = IMPLICIT
) -> None:
    """``ds`` in Implicit VR Little Endian, then ``pixels`` bytes of pixel data written in
    chunks (a large file is never held whole), then ``trailer``."""
    ds.file_meta.TransferSyntaxUID = UID(label)
    head = io.BytesIO()
    options = {"implicit_vr": True, "little_endian": True, "force_encoding": True}
    pydicom.dcmwrite(head, ds, **options)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        out.write(head.getvalue() + PIXEL_TAG + struct.pack("<L", pixels))
        chunk = bytes(i % 251 for i in range(1 << 20))
        left = pixels
        while left:
            out.write(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))
        out.write(trailer)


def raw_vr(path: Path, tag: int) -> bytes:
    """The two VR bytes written after ``tag`` in the explicit file at ``path``."""
    data = path.read_bytes()
    at = data.index(struct.pack("<HH", tag >> 16, tag & 0xFFFF))
    return data[at + 4 : at + 6]


def same_values(a: Dataset, b: Dataset) -> None:
    """Every element of ``a`` is in ``b`` with the same value, and none more (recursively)."""
    assert list(a.keys()) == list(b.keys())
    for tag in a.keys():  # noqa: SIM118 - tags
        x, y = a[tag], b[tag]
        if x.VR == "SQ":
            assert len(x.value) == len(y.value)
            for p, q in zip(x.value, y.value, strict=True):
                same_values(p, q)
        else:
            assert x.value == y.value, (tag, x.value, y.value)


def test_rewrite_converts_header_pixels_and_trailer(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.dcm", tmp_path / "out.dcm"
    write_implicit(src, rich_header(), 4 * 4 * 2, trailer=PADDING)
    assert needs_explicit(src)
    rewrite(src, dst, lambda ds: None, explicit=True)
    before, after = pydicom.dcmread(src), pydicom.dcmread(dst)
    assert after.file_meta.TransferSyntaxUID == EXPLICIT
    assert not after.original_encoding[0]
    same_values(before, after)
    assert after[0x00290010].VR == "LO" and raw_vr(dst, 0x00291008) == b"UN"  # see below
    assert after[0x00431001].VR == "UN" and after[0x00291008].value == "IMAGE NUM 4"
    assert after[0x00091001].VR == "UN" and after[0x00280106].VR == "SS"
    assert after["PixelData"].VR == "OW" and after[0xFFFCFFFC].VR == "OB"
    assert dst.read_bytes().endswith(struct.pack("<HH2sHL", 0xFFFC, 0xFFFC, b"OB", 0, 6) + bytes(6))


def test_a_file_labelled_explicit_but_written_implicit_is_converted(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.dcm", tmp_path / "out.dcm"
    write_implicit(src, rich_header(), 4 * 4 * 2, label=EXPLICIT)
    assert needs_explicit(src)
    rewrite(src, dst, lambda ds: None, explicit=True)
    after = pydicom.dcmread(dst)
    assert after.file_meta.TransferSyntaxUID == EXPLICIT and not after.original_encoding[0]
    with pytest.warns(UserWarning, match="Expected explicit VR, but found implicit VR"):
        before = pydicom.dcmread(src)
    same_values(before, after)


def test_a_file_labelled_implicit_but_written_explicit_gets_the_right_label(
    tmp_path: Path,
) -> None:
    """Only the label is wrong: the data set is copied as it is, under the explicit label."""
    src, dst = tmp_path / "in.dcm", tmp_path / "out.dcm"
    ds = rich_header()
    ds.PixelData = bytes(32)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = UID(IMPLICIT)
    options = {"implicit_vr": False, "little_endian": True, "force_encoding": True}
    pydicom.dcmwrite(src, ds, **options)
    assert needs_explicit(src)
    rewrite(src, dst, lambda ds: None, explicit=True)
    with pytest.warns(UserWarning, match="Expected implicit VR, but found explicit VR"):
        before = pydicom.dcmread(src)
    after = pydicom.dcmread(dst)
    assert after.file_meta.TransferSyntaxUID == EXPLICIT
    same_values(before, after)
    assert dst.read_bytes().endswith(
        struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 32) + bytes(32)
    )


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",  # Explicit VR Little Endian
        "MR_small_bigendian.dcm",  # Explicit VR Big Endian (retired): sent as it is
        "image_dfl.dcm",  # Deflated Explicit VR Little Endian
        "JPEG2000.dcm",  # compressed
    ],
)
def test_files_in_other_syntaxes_are_not_converted(name: str) -> None:
    found = get_testdata_file(name)
    assert isinstance(found, str)
    assert not needs_explicit(Path(found))


def test_text_invalid_in_its_character_set_is_not_converted(tmp_path: Path) -> None:
    """pydicom decodes every text value to convert it, with replacement characters where
    the bytes are not valid in the character set: that would change the value."""
    src, dst = tmp_path / "in.dcm", tmp_path / "out.dcm"
    ds = rich_header()
    ds.SpecificCharacterSet, ds.PatientName = "ISO_IR 192", "Mxller^J"
    write_implicit(src, ds, 32)
    src.write_bytes(src.read_bytes().replace(b"Mxller^J", b"M\xfcller^J"))  # Latin-1
    with pytest.raises(FileProblem, match=r"PatientName \(0010,0010\) holds .* not valid in"):
        rewrite(src, dst, lambda ds: None, explicit=True)
    assert not dst.exists()
    rewrite(src, dst, lambda ds: None)  # not converted: sent as it is, as before
    assert dst.read_bytes() == src.read_bytes()


def test_private_values_keep_their_bytes_whatever_pydicoms_private_dictionary_says(
    tmp_path: Path,
) -> None:
    """pydicom's private dictionary says (0019,xx09) of 'Agfa ADC NX' is a sequence: pydicom
    converted this text to one and wrote other bytes.  A private element gets UN instead,
    its bytes as they were (PS3.5 6.2.2)."""
    src, dst = tmp_path / "in.dcm", tmp_path / "out.dcm"
    ds = rich_header()
    ds.add_new(0x00190010, "LO", "Agfa ADC NX")
    ds.add_new(0x00191009, "LO", "not a sequence at all")
    write_implicit(src, ds, 32)
    rewrite(src, dst, lambda ds: None, explicit=True)
    text = b"not a sequence at all "
    assert struct.pack("<HH2sHL", 0x0019, 0x1009, b"UN", 0, len(text)) + text in dst.read_bytes()


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xfe\xff\x00\xe0\xff\x00\x00\x00",  # an item longer than its sequence
        b"\x01\x02\x03\x04\x05\x06\x07\x08",  # no item at all
        b"\xfe\xff\x00\xe0\x04\x00\x00\x00",  # an item of 4 bytes: half an element
    ],
)
def test_a_damaged_sequence_cannot_be_converted(tmp_path: Path, garbage: bytes) -> None:
    """pydicom reads each of these as one empty item, without a word: converted so, the
    value would change."""
    src, dst = tmp_path / "in.dcm", tmp_path / "out.dcm"
    ds = rich_header()
    del ds.AnatomicRegionSequence
    ds.add_new(0x00082218, "LO", "XXXXXXXX")  # its bytes replaced below
    write_implicit(src, ds, 32)
    data = src.read_bytes()
    at = data.index(struct.pack("<HHL", 0x0008, 0x2218, 8)) + 8
    src.write_bytes(data[:at] + garbage + data[at + 8 :])
    reason = r"sequence AnatomicRegionSequence \(0008,2218\) is damaged"
    with pytest.raises(FileProblem, match=reason):
        rewrite(src, dst, lambda ds: None, explicit=True)
    assert not dst.exists()


def test_an_encapsulated_pixel_data_in_an_implicit_file_cannot_be_converted(
    tmp_path: Path,
) -> None:
    src, dst = tmp_path / "in.dcm", tmp_path / "out.dcm"
    write_implicit(src, rich_header(), 0)
    data = src.read_bytes()
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    src.write_bytes(data[:-4] + struct.pack("<L", 0xFFFFFFFF) + item)
    with pytest.raises(FileProblem, match=r"PixelData \(7FE0,0010\) has an undefined length"):
        rewrite(src, dst, lambda ds: None, explicit=True)
    assert not dst.exists()


def implicit_element(group: int, elem: int, value: bytes, *, undefined: bool = False) -> bytes:
    length = 0xFFFFFFFF if undefined else len(value)
    return struct.pack("<HHL", group, elem, length) + value


def test_a_private_group_after_the_pixel_data_is_kept_as_un(tmp_path: Path) -> None:
    """As GE ultrasound writes in 7FE1 (here with a creator pydicom does not know): a private
    creator, a value, and a sequence of undefined length, whose Implicit VR items an
    explicit UN keeps (PS3.5 6.2.2)."""
    inner = implicit_element(0x0010, 0x0020, b"INNER ")  # PatientID in an item
    item = implicit_element(0xFFFE, 0xE000, inner, undefined=True)
    item += struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    sequence = item + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    trailer = (
        implicit_element(0x7FE1, 0x0010, b"STOWD TEST CREATOR")
        + implicit_element(0x7FE1, 0x1001, b"PRIVATE1")
        + implicit_element(0x7FE1, 0x1002, sequence, undefined=True)
        + PADDING
    )
    src, dst = tmp_path / "in.dcm", tmp_path / "out.dcm"
    write_implicit(src, rich_header(), 32, trailer=trailer)
    rewrite(src, dst, lambda ds: None, explicit=True)
    after = pydicom.dcmread(dst)
    assert after.file_meta.TransferSyntaxUID == EXPLICIT and not after.original_encoding[0]
    assert after[0x7FE10010].VR == "LO" and after[0x7FE11001].VR == "UN"
    assert after[0x7FE11001].value == b"PRIVATE1"
    assert after[0x7FE11002].value[0].PatientID == "INNER"  # read as the sequence it is
    assert dst.read_bytes().endswith(sequence + PADDING[:4] + b"OB\0\0" + PADDING[4:])
    same_values(pydicom.dcmread(src), after)


def test_a_sequence_after_the_pixel_data_cannot_be_converted(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.dcm", tmp_path / "out.dcm"
    signatures = struct.pack("<HHL", 0xFFFA, 0xFFFA, 0)  # DigitalSignaturesSequence, empty
    write_implicit(src, rich_header(), 32, trailer=signatures)
    reason = r"DigitalSignaturesSequence .* after the pixel data and is a sequence"
    with pytest.raises(FileProblem, match=reason):
        rewrite(src, dst, lambda ds: None, explicit=True)
    assert not dst.exists()


@pytest.mark.parametrize(
    ("cut", "reason"),
    [
        (
            10,
            r"the file is truncated: PixelData \(7FE0,0010\) should have 32 bytes but only 22 are",
        ),
        (-3, "converted .*: the file is damaged after its pixel data: it ends at byte .* inside"),
    ],
)
def test_a_damaged_tail_fails_with_the_reason(tmp_path: Path, cut: int, reason: str) -> None:
    src, dst = tmp_path / "in.dcm", tmp_path / "out.dcm"
    write_implicit(src, rich_header(), 32, trailer=b"\0" * 5 if cut < 0 else b"")
    data = src.read_bytes()
    src.write_bytes(data[:-cut] if cut > 0 else data[:cut])
    with pytest.raises(FileProblem, match=reason):
        rewrite(src, dst, lambda ds: None, explicit=True)
    assert not dst.exists()


# -- the daemon and a real Orthanc -------------------------------------------------------------


def image(path: Path, side: int, **kwargs: Any) -> FileDataset:
    """An Implicit VR file of ``side`` x ``side`` 16-bit pixels at ``path``; its header."""
    ds = rich_header(**kwargs)
    ds.Rows = ds.Columns = side
    write_implicit(path, ds, side * side * 2, trailer=PADDING)
    return ds


def inline(doc: Any) -> Any:
    """A DICOM JSON document with each binary value (a BulkDataURI from Orthanc, inline from
    pydicom) reduced to its VR: those are compared in the stored file itself.  Texts without
    trailing spaces, which are padding (Orthanc keeps the one of a private value it reads
    with its own dictionary from UN: 'IMAGE NUM 4 ')."""
    if isinstance(doc, str):
        return doc.rstrip(" ")
    if isinstance(doc, list):  # Orthanc's JSON leaves out empty items (the file has them)
        return [inline(part) for part in doc if part != {}]
    if not isinstance(doc, dict):
        return doc
    if "BulkDataURI" in doc or "InlineBinary" in doc:
        return {"vr": doc.get("vr"), "binary": True}
    return {key: inline(value) for key, value in doc.items()}


def destination(url: str, **options: object) -> dict[str, object]:
    return {"pacs": {"url": url, "workers": 2, "timeouts": {"read": "60s"}, **options}}


def stored_file_id(orthanc: Orthanc, uid: str) -> str:
    """Orthanc's id of the instance with SOPInstanceUID ``uid``."""
    query = {"Level": "Instance", "Query": {"SOPInstanceUID": uid}}
    (found,) = orthanc.post_json("/tools/find", query)
    return str(found)


def stored_file(orthanc: Orthanc, uid: str) -> tuple[str, bytes]:
    """Orthanc's id of the instance with SOPInstanceUID ``uid``, and its file as stored."""
    found = stored_file_id(orthanc, uid)
    return found, orthanc.get_bytes(f"/instances/{found}/file", timeout=120)


def test_implicit_files_reach_orthanc_as_explicit_vr_with_the_same_values(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    """An 8 MiB implicit image is stored as Explicit VR Little Endian: the same attributes,
    the same pixel data (Orthanc's own reading of both); an explicit file is sent as it is;
    one that cannot be converted goes to failed/ with the reason."""
    url = orthanc.dicomweb_url
    layout = make_layout(tmp_path / "run", url, destinations=destination(url, **TRANSCODE))
    source = layout.drop / "implicit.dcm"
    uid = str(image(source, 2048).SOPInstanceUID)
    original = pydicom.dcmread(source)
    as_is, as_is_uid = make_instance_bytes()
    (layout.drop / "explicit.dcm").write_bytes(as_is)
    long = rich_header()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # longer than LT allows: what some devices write
        long.ImageComments = "x" * 70_000  # LT: a 16-bit length in Explicit VR
        write_implicit(layout.drop / "long.dcm", long, 4 * 4 * 2)
    run_until(
        layout,
        lambda: (
            layout.files(layout.sent) == {"implicit.dcm", "explicit.dcm"}
            and layout.files(layout.failed) == {"long.dcm"}
        ),
        "implicit.dcm and explicit.dcm sent, long.dcm failed",
        180,
    )
    found, data = stored_file(orthanc, uid)
    stored = pydicom.dcmread(io.BytesIO(data))
    assert stored.file_meta.TransferSyntaxUID == EXPLICIT and not stored.original_encoding[0]
    assert orthanc.get_bytes(f"/instances/{found}/metadata/TransferSyntax").decode() == EXPLICIT
    same_values(original, stored)
    meta = {t: e.value for t, e in original.file_meta.items() if t not in (0x20000, 0x20010)}
    assert meta == {t: e.value for t, e in stored.file_meta.items() if t in meta}
    frame = orthanc.get_bytes(f"/instances/{found}/frames/0/raw", timeout=120)
    assert frame == original.PixelData and len(frame) == 2048 * 2048 * 2
    series = f"/dicom-web/studies/{original.StudyInstanceUID}/series/{original.SeriesInstanceUID}"
    (wado,) = orthanc.get_json(f"{series}/instances/{uid}/metadata")  # Orthanc's reading
    assert inline(wado) == inline(original.to_json_dict(bulk_data_threshold=1 << 30))
    tags = orthanc.get_json(f"/instances/{found}/simplified-tags")
    assert tags["PatientName"] == "Müller^Jürgen" and tags["SmallestImagePixelValue"] == "-5"
    assert tags["AnatomicRegionSequence"][0]["CodeMeaning"] == "Head"
    assert stored_file(orthanc, as_is_uid)[1] == as_is  # not converted: sent as it is
    error = json.loads(layout.error_files()["long.dcm"].read_text())
    assert "cannot be converted to Explicit VR Little Endian" in error["reason"], error
    assert "ImageComments" in error["reason"] and "65535 bytes" in error["reason"], error
    assert error["stage"] == "converting it to Explicit VR Little Endian", error
    spool = layout.root / "state" / "queue.db.spool"
    assert spool.is_dir() and not list(spool.iterdir())  # the converted copies were removed
    assert orthanc.instance_count() == 2


def test_without_transcode_an_implicit_file_is_sent_as_it_is(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url)
    source = layout.drop / "implicit.dcm"
    uid = str(image(source, 64).SOPInstanceUID)
    original = source.read_bytes()
    run_until(layout, lambda: layout.files(layout.sent) == {"implicit.dcm"}, "sent", 120)
    found, data = stored_file(orthanc, uid)
    assert data == original
    assert orthanc.get_bytes(f"/instances/{found}/metadata/TransferSyntax").decode() == IMPLICIT


def test_rules_and_transcode_make_one_copy_with_both(tmp_path: Path, orthanc: Orthanc) -> None:
    """The copy the rules write is the converted one (one rewrite): the new PatientID,
    Explicit VR, the other values as they were."""
    url = orthanc.dicomweb_url
    layout = make_layout(
        tmp_path / "run",
        url,
        destinations=destination(url, **TRANSCODE),
        rules=[{"set": {"PatientID": "CHANGED", "PatientName": "Ändert^Wurde"}}],
    )
    source = layout.drop / "implicit.dcm"
    uid = str(image(source, 256).SOPInstanceUID)
    original = pydicom.dcmread(source)
    run_until(layout, lambda: layout.files(layout.sent) == {"implicit.dcm"}, "sent", 120)
    _, data = stored_file(orthanc, uid)
    stored = pydicom.dcmread(io.BytesIO(data))
    assert stored.file_meta.TransferSyntaxUID == EXPLICIT and not stored.original_encoding[0]
    assert stored.PatientID == "CHANGED" and stored.PatientName == "Ändert^Wurde"
    original.PatientID, original.PatientName = "CHANGED", "Ändert^Wurde"
    original.SpecificCharacterSet = "ISO_IR 192"  # the rules' text needs UTF-8 (rewrite.apply)
    same_values(original, stored)


def test_migrate_converts_for_a_transcoding_destination(tmp_path: Path, orthanc: Orthanc) -> None:
    """``stowd migrate`` sends through the same worker: converted too, the source kept."""
    url = orthanc.dicomweb_url
    layout = make_layout(tmp_path / "run", url, destinations=destination(url, **TRANSCODE))
    old = tmp_path / "old" / "a.dcm"
    uid = str(image(old, 64).SOPInstanceUID)
    before = old.read_bytes()
    args = ("-c", str(layout.config), str(old.parent), "--destination", "pacs", "--keep")
    result = run_cli("migrate", *args, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    _, data = stored_file(orthanc, uid)
    assert pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID == EXPLICIT
    assert old.read_bytes() == before


LARGE_SIDE = 12_000  # 288 MB of pixel data
MAX_PEAK_MB = 120.0


def test_a_large_implicit_file_is_converted_in_bounded_memory(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    url = orthanc.dicomweb_url
    layout = make_layout(tmp_path / "run", url, destinations=destination(url, **TRANSCODE))
    source = layout.drop / "large.dcm"
    uid = str(image(source, LARGE_SIDE).SOPInstanceUID)
    size_mb = source.stat().st_size / 1e6
    with Stowd(layout) as daemon:
        wait_for(
            lambda: layout.files(layout.sent) == {"large.dcm"}, 600, "sent", lambda: daemon.log
        )
        assert daemon.proc is not None
        peak = peak_rss_mb(daemon.proc.pid)
        assert daemon.terminate() == 0
    print(f"\ndaemon VmHWM converting a {size_mb:.0f} MB implicit file: {peak:.1f} MB")
    assert peak < MAX_PEAK_MB < size_mb / 2
    found = stored_file_id(orthanc, uid)
    syntax = orthanc.get_bytes(f"/instances/{found}/metadata/TransferSyntax").decode()
    assert syntax == EXPLICIT
