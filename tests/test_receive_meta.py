"""The file meta of a received instance, written by hand, is pydicom's to the byte; where it
cannot be written by hand (an odd UID or AE title from the sender) pydicom writes it; and the
data set of pynetdicom's incoming file is found where pydicom finds it."""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dicomgen import make_instance_bytes
from harness import Stowd
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom import _config, dimse_messages
from pynetdicom.dul import DULServiceProvider
from test_receive import Site, daemon, require_dcmtk, site, storescu

from stowd.pipeline import dimse
from stowd.pipeline.receive import (
    PREAMBLE,
    MetaValues,
    _data_set_start,
    _data_set_start_pydicom,
    encode_meta,
    encode_meta_pydicom,
    meta_bytes,
)

__all__ = ["daemon", "require_dcmtk", "site"]  # fixtures, used by the end-to-end test

SC = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage (odd length: 25)
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT, IMPLICIT, JPEG = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.50"
UID_64 = "1." + "2" * 62


def _values(**changes: str) -> MetaValues:
    plain = {
        "sop_class": SC,
        "sop_instance": "1.2.3.4.5",
        "transfer_syntax": EXPLICIT,
        "calling_ae": "CT1",
        "called_ae": "STOWD",
        "url": "dicom://127.0.0.1:11112",
    }
    return MetaValues(**(plain | changes))


WRITTEN_BY_HAND = [
    _values(),
    _values(calling_ae=""),  # no calling AE title: Source and Sending AE titles left out
    _values(calling_ae="A"),
    _values(calling_ae="MR22"),
    _values(calling_ae="ABCDEFGHIJKLMNOP", called_ae="Q"),  # 16 characters, the longest
    _values(calling_ae="A B", called_ae="STOWD GW 1"),  # spaces within
    _values(calling_ae="A!#$%&'()*+,-./~"),
    _values(sop_class=CT, sop_instance="1.2.3.4"),  # even lengths
    _values(sop_instance=UID_64, transfer_syntax=JPEG),
    _values(sop_instance="2.25.1", transfer_syntax=IMPLICIT),
    _values(url="dicom://[::1]:104"),
    _values(url="dicom://[2001:db8::10:2]:65535"),
]


@pytest.mark.parametrize("values", WRITTEN_BY_HAND, ids=repr)
def test_the_meta_written_by_hand_is_pydicoms(values: MetaValues) -> None:
    assert encode_meta(values) == encode_meta_pydicom(values)
    assert meta_bytes(values) == encode_meta_pydicom(values)


LEFT_TO_PYDICOM = [
    _values(sop_instance="1.2.abc"),
    _values(sop_instance="1.2.3\u00e9"),  # non-ASCII
    _values(sop_instance="1." + "2" * 63),  # 65 characters
    _values(sop_instance=""),
    _values(sop_class=" 1.2"),
    _values(sop_instance="1.2.3\x00"),
    _values(transfer_syntax="1.2.840.10008.1.2.1 "),
    _values(calling_ae="\u00c4RZT"),  # non-ASCII AE title
    _values(calling_ae="CT1 "),
    _values(calling_ae=" CT1"),
    _values(calling_ae="ABCDEFGHIJKLMNOPQ"),  # 17 characters
    _values(calling_ae="CT\\1"),  # pydicom: two values
    _values(url="dicom://a\\b:104"),
    _values(called_ae="STOWD\t"),
    _values(url="dicom://host name:104"),
    _values(url=""),
]


@pytest.mark.parametrize("values", LEFT_TO_PYDICOM, ids=repr)
def test_what_is_not_plain_is_left_to_pydicom(values: MetaValues) -> None:
    """The hand-written path declines, and the bytes (or the error) are pydicom's."""
    assert encode_meta(values) is None
    try:
        expected: bytes | type[BaseException] = encode_meta_pydicom(values)
    except Exception as exc:  # what pydicom raises for it, raised the same way
        with pytest.raises(type(exc)):
            meta_bytes(values)
        return
    assert meta_bytes(values) == expected


# ------------------------------------------------------------------------ the data set's start
def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH", group, element) + vr + struct.pack("<H", len(value)) + value


DATA_SET = _element(8, 0x16, b"UI", SC.encode() + b"\x00") + _element(8, 0x18, b"UI", b"1.2.3\x00")
STRAY = _element(2, 0x10, b"UI", IMPLICIT.encode())  # group 0002 in a data set: not allowed


def _pydicom_meta(*, group_length: bool = True) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(SC)
    meta.MediaStorageSOPInstanceUID = UID("1.2.3")
    meta.TransferSyntaxUID = UID(EXPLICIT)
    if group_length:
        out = io.BytesIO()
        write_file_meta_info(out, meta, enforce_standard=True)  # type: ignore[arg-type]
        return out.getvalue()
    out = io.BytesIO()
    write_file_meta_info(out, meta, enforce_standard=False)  # type: ignore[arg-type]
    return out.getvalue()


INCOMING = {
    "no meta (as stowd has pynetdicom write)": PREAMBLE + DATA_SET,
    "pynetdicom's meta": PREAMBLE + _pydicom_meta() + DATA_SET,
    "a meta without group length": PREAMBLE + _pydicom_meta(group_length=False) + DATA_SET,
    "no meta, the data set starting in group 0002": PREAMBLE + STRAY + DATA_SET,
    "a meta, the data set starting in group 0002": PREAMBLE + _pydicom_meta() + STRAY + DATA_SET,
    "a group length past the end": PREAMBLE
    + _element(2, 0, b"UL", b"")[:6]
    + b"\x04\x00\xff\xff\x00\x00"
    + DATA_SET,
    "only a meta": PREAMBLE + _pydicom_meta(),
}


@pytest.mark.parametrize("name", INCOMING)
def test_the_data_set_starts_where_pydicom_finds_it(name: str) -> None:
    data = INCOMING[name]
    expected = _data_set_start_pydicom(io.BytesIO(data))
    assert _data_set_start(io.BytesIO(data)) == expected


def test_without_a_meta_the_data_set_starts_after_the_preamble() -> None:
    assert _data_set_start(io.BytesIO(PREAMBLE + DATA_SET)) == len(PREAMBLE)


# ------------------------------------------------------------------------------- end to end
@pytest.mark.usefixtures("require_dcmtk")
def test_a_received_file_is_preamble_pydicoms_meta_and_the_data_set(
    site: Site, daemon: Stowd, tmp_path: Path
) -> None:
    """The Part-10 file stowd writes for an instance from storescu, byte for byte."""
    data, sop_uid = make_instance_bytes(size_bytes=20_000)
    sent = tmp_path / "one.dcm"
    sent.write_bytes(data)
    done = storescu(site.ports["ct"], [sent], calling="MOD 7")
    assert done.returncode == 0, done.stdout + done.stderr
    received = pydicom.dcmread(sent)
    written = _wait_for_file(site, sop_uid)
    meta = encode_meta_pydicom(
        _values(
            sop_class=str(received.SOPClassUID),
            sop_instance=sop_uid,
            transfer_syntax=str(received.file_meta.TransferSyntaxUID),
            calling_ae="MOD 7",
            url=_url_in(written),
        )
    )
    start = _data_set_start_pydicom(io.BytesIO(data))
    assert written == PREAMBLE + meta + data[start:]


def _wait_for_file(site: Site, sop_uid: str) -> bytes:
    from harness import wait_for  # noqa: PLC0415

    def found() -> bytes | None:
        for path in site.root.rglob(f"{sop_uid}*.dcm"):
            try:
                return path.read_bytes()
            except FileNotFoundError:
                continue  # moved to sent/ meanwhile: found there next time
        return None

    wait_for(lambda: found() is not None, 120, f"{sop_uid} to be written")
    written = found()
    assert written is not None
    return written


def _url_in(written: bytes) -> str:
    """The peer's address is the sender's ephemeral port: taken from the file."""
    fp = io.BytesIO(written)
    pydicom.filereader.read_preamble(fp, False)
    return str(pydicom.filereader._read_file_meta_info(fp).SendingPresentationAddress)


# ------------------------------------------------------------------- pynetdicom's incoming file
def test_pynetdicom_writes_no_meta_into_its_incoming_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What ``dimse.configure`` sets is process-wide: restored after this test."""
    for name in ("NamedTemporaryFile", "create_file_meta", "write_file_meta_info"):
        monkeypatch.setattr(dimse_messages, name, getattr(dimse_messages, name))
    for name in ("STORE_RECV_CHUNKED_DATASET", "UNRESTRICTED_STORAGE_SERVICE", "LOG_HANDLER_LEVEL"):
        monkeypatch.setattr(_config, name, getattr(_config, name))
    monkeypatch.setattr(DULServiceProvider, "_read_pdu_data", DULServiceProvider._read_pdu_data)
    monkeypatch.setattr(dimse, "_folder", dimse._folder)
    dimse.configure(tmp_path)
    pyn: Any = dimse_messages  # the names it imported, which configure replaced
    # as pynetdicom 3.0's DIMSEMessage.decode_msg writes a chunked C-STORE request's file
    made = pyn.NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")
    made.write(b"\x00" * 128)
    made.write(b"DICM")
    meta = pyn.create_file_meta(
        sop_class_uid=UID(SC), sop_instance_uid=UID("1.2.3"), transfer_syntax=UID(EXPLICIT)
    )
    pyn.write_file_meta_info(made, meta)
    made.write(DATA_SET)
    made.close()
    assert Path(made.name).read_bytes() == PREAMBLE + DATA_SET
    assert _config.LOG_HANDLER_LEVEL == "none"  # stowd shows none of its INFO/DEBUG lines
    dimse.done_with(Path(made.name))
