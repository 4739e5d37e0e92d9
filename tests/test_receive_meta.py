"""The file meta of a received instance, written by hand, is pydicom's to the byte; where it
cannot be written by hand (an odd UID or AE title from the sender) pydicom writes it; and the
data set of pynetdicom's incoming file is found where pydicom finds it."""

from __future__ import annotations

import collections
import io
import os
import queue
import random
import socket
import struct
import threading
import time
import warnings
from pathlib import Path
from typing import Any, cast

import pydicom
import pynetdicom.association
import pynetdicom.dul
import pytest
from dicomgen import make_instance_bytes
from harness import Stowd
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom import _config, dimse_messages
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from test_receive import Site, daemon, require_dcmtk, site, storescu

from stowd import fileops
from stowd.errors import FileProblem, FileVanished
from stowd.pipeline import classify as classify_mod
from stowd.pipeline import dimse
from stowd.pipeline.classify import Classified, classify_dicom
from stowd.pipeline.receive import (
    PREAMBLE,
    MetaValues,
    Receiver,
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
CHARSET = _element(8, 5, b"CS", b"ISO_IR 100")
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
    # a sender's data set starting with a group length that claims the next element too: the
    # data set is whole, not without its first element (its character set, here)
    "a data set's group length claiming more than its group": PREAMBLE
    + _element(2, 0, b"UL", b"")[:6]
    + b"\x04\x00"
    + struct.pack("<L", len(CHARSET))
    + CHARSET
    + DATA_SET,
}


@pytest.mark.parametrize("name", INCOMING)
def test_the_data_set_starts_where_pydicom_finds_it(name: str) -> None:
    data = INCOMING[name]
    expected = _data_set_start_pydicom(io.BytesIO(data))
    assert _data_set_start(io.BytesIO(data)) == expected


@pytest.mark.parametrize("seed", range(200))
def test_a_data_set_starting_with_unreadable_group_0002_is_a_file_problem(seed: int) -> None:
    """Garbage after a group 0002 tag (e.g. a group length without its value): not understood
    (``FileProblem``: refused 0xC000), not an exception pynetdicom answers on its own."""
    rng = random.Random(seed)
    tail = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 24)))
    data = PREAMBLE + b"\x02\x00" + rng.choice([b"\x00\x00UL\x04\x00", b""]) + tail
    try:
        start = _data_set_start(io.BytesIO(data))
    except FileProblem:
        return
    assert len(PREAMBLE) <= start <= len(data)


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
    monkeypatch.setattr(DIMSEServiceProvider, "send_msg", DIMSEServiceProvider.send_msg)
    for module in (pynetdicom.dul, pynetdicom.association):
        monkeypatch.setattr(module, "time", time)
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


# ---------------------------------------------------------------- the C-STORE response, by hand
class _Assoc:
    """What ``send_msg`` and pynetdicom's own ask of an association: its handlers."""

    def __init__(self, handlers: list[Any]) -> None:
        self.handlers = handlers

    def get_handlers(self, _event: Any) -> list[Any]:
        return self.handlers

    def _abort_nonblocking(self) -> None:  # pynetdicom's trigger sets these as ``abort``
        raise AssertionError("not aborted here")

    _abort_blocking = _abort_nonblocking


class _Dul:
    def __init__(self) -> None:
        self.sent: list[P_DATA] = []

    def send_pdu(self, primitive: P_DATA) -> None:
        self.sent.append(primitive)


class _Provider:
    """A DIMSE service provider's parts that sending a message uses, recording the P-DATA."""

    def __init__(self, peer_max: int, handlers: list[Any] | None = None) -> None:
        self.maximum_pdu_size = peer_max
        self.assoc = _Assoc(handlers or [])
        self.dul = _Dul()


def _response(status: int = 0x0000, **changes: Any) -> C_STORE:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns of a UID with letters; a sender's may
        return _made(status, **changes)


def _made(status: int, **changes: Any) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = changes.pop("answered", 7)
    rsp.AffectedSOPClassUID = changes.pop("sop_class", SC)
    rsp.AffectedSOPInstanceUID = changes.pop("sop_instance", "1.2.3.4.5")
    rsp.Status = status
    for name, value in changes.items():
        setattr(rsp, name, value)
    return rsp


def _sent(send: Any, rsp: C_STORE, peer_max: int, handlers: list[Any] | None = None) -> list[Any]:
    provider = _Provider(peer_max, handlers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom, encoding a UID with letters
        send(provider, rsp, 3)
    return [p.presentation_data_value_list for p in provider.dul.sent]


RESPONSES = {
    "success": _response(),
    "out of resources": _response(0xA700),
    "cannot understand": _response(0xC000, answered=65535),
    "does not match": _response(0xA900, answered=1),
    "even UIDs": _response(sop_class=CT, sop_instance="1.2.3.4"),
    "a 64-character UID": _response(sop_instance=UID_64),
    "a UID with letters": _response(sop_instance="1.2.abc"),  # pynetdicom's own
    "an error comment": _response(0xA700, ErrorComment="disk full"),  # pynetdicom's own
    "an offending element": _response(0xC000, OffendingElement=[0x00080018]),  # its own
}


@pytest.mark.parametrize("peer_max", [0, 16_384, 65_536, 64])
@pytest.mark.parametrize("name", RESPONSES)
def test_a_store_response_is_sent_as_pynetdicom_sends_it(name: str, peer_max: int) -> None:
    rsp = RESPONSES[name]
    assert _sent(dimse.send_msg, rsp, peer_max) == _sent(dimse._SEND_MSG, rsp, peer_max)


def test_what_is_not_plain_is_encoded_by_pynetdicom() -> None:
    for name in ("a UID with letters", "an error comment", "an offending element"):
        assert dimse.store_response(RESPONSES[name]) is None, name
    assert dimse.store_response(RESPONSES["success"]) is not None


def test_a_bound_dimse_sent_handler_still_sees_the_response() -> None:
    seen: list[Any] = []
    handlers = [(lambda event: seen.append(event.message), None)]
    _sent(dimse.send_msg, _response(), 65_536, handlers)
    assert len(seen) == 1


# ------------------------------------------------------------------ the reactors' polling waits
LONG = 600.0  # a wait that must end early: far longer than any test may take


def _ends(wait: Any, *args: Any) -> threading.Thread:
    thread = threading.Thread(target=wait, args=args, daemon=True)
    thread.start()
    return thread


def _joined(thread: threading.Thread) -> bool:
    thread.join(60)
    return not thread.is_alive()


class _Socket:
    def __init__(self, sock: socket.socket | None) -> None:
        self.socket = sock


class _Reactor:
    """A DUL reactor's parts that its wait looks at."""

    def __init__(self, sock: socket.socket | None) -> None:
        self.socket = _Socket(sock)
        self.to_provider_queue: queue.Queue[object] = queue.Queue()


def test_the_dul_wait_ends_when_data_arrive() -> None:
    ours, peer = socket.socketpair()
    with ours, peer:
        waiting = _ends(dimse._dul_wait, _Reactor(ours), LONG)
        peer.send(b"\x04")  # a P-DATA-TF begins
        assert _joined(waiting)


def test_the_dul_does_not_wait_with_a_primitive_to_send() -> None:
    ours, peer = socket.socketpair()
    with ours, peer:
        reactor = _Reactor(ours)
        reactor.to_provider_queue.put(P_DATA())
        assert _joined(_ends(dimse._dul_wait, reactor, LONG))


def test_the_dul_without_a_socket_sleeps_as_pynetdicom() -> None:
    assert _joined(_ends(dimse._dul_wait, _Reactor(None), 0.0))


class _Dimse:
    def __init__(self) -> None:
        self.msg_queue: queue.Queue[object] = queue.Queue()


class _Association:
    def __init__(self) -> None:
        self.dimse = _Dimse()


def test_the_association_wait_ends_when_a_message_is_queued() -> None:
    assoc = _Association()
    waiting = _ends(dimse._association_wait, assoc, LONG)
    assoc.dimse.msg_queue.put((1, "C-STORE-RQ"))
    assert _joined(waiting)
    assert assoc.dimse.msg_queue.get_nowait() == (1, "C-STORE-RQ")  # left for the reactor


def test_the_association_does_not_wait_with_a_message_queued() -> None:
    assoc = _Association()
    assoc.dimse.msg_queue.put((1, "C-STORE-RQ"))
    assert _joined(_ends(dimse._association_wait, assoc, LONG))


class _ReactorThread(threading.Thread):
    """Stands for pynetdicom's reactor thread classes (DULServiceProvider, Association)."""


def test_only_the_reactor_threads_polls_wait_for_work() -> None:
    waited: list[float] = []
    waits = dimse.Waits(_ReactorThread, lambda _thread, seconds: waited.append(seconds), 0.001)

    def run() -> None:
        waits.sleep(0.001)
        waits.sleep(0.0)

    reactor = _ReactorThread(target=run)
    reactor.start()
    assert _joined(reactor)
    assert waited == [0.001]  # its poll; its other sleep was time.sleep
    assert _joined(_ends(waits.sleep, 0.001))  # another thread: time.sleep
    assert waited == [0.001]
    assert waits.monotonic is time.monotonic  # the rest is the time module


# ------------------------------------------------------- the receipt's header read, handed on
def _read(path: Path) -> Classified:
    found = classify_dicom(str(path))
    assert found.header is not None
    return found


def _instance(tmp_path: Path, name: str = "one.dcm") -> Path:
    path = tmp_path / name
    path.write_bytes(make_instance_bytes(size_bytes=4_000)[0])
    return path


@pytest.fixture
def recent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with nothing remembered, and leaves nothing behind."""
    monkeypatch.setattr(classify_mod, "_recent", collections.OrderedDict())


@pytest.mark.usefixtures("recent")
def test_a_remembered_header_is_handed_on_once(tmp_path: Path) -> None:
    path = _instance(tmp_path)
    found = _read(path)
    stand_in = Classified("dicom", "9.9", "9.9.9", SC, header=found.header)  # not the file's
    classify_mod.remember(str(path), stand_in)
    assert classify_mod.classify(str(path)) is stand_in  # handed on: the file was not read
    assert classify_mod.classify(str(path)) == found  # once: then read again


def _changed_in_place(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def _replaced(path: Path) -> None:
    other = path.with_name("other.dcm")
    other.write_bytes(path.read_bytes())
    os.replace(other, path)


def _grown(path: Path) -> None:
    with path.open("ab") as out:
        out.write(b"\x00\x00")


@pytest.mark.usefixtures("recent")
@pytest.mark.parametrize("change", [_changed_in_place, _replaced, _grown, Path.unlink])
def test_a_file_changed_since_is_read_again(tmp_path: Path, change: Any) -> None:
    path = _instance(tmp_path)
    found = _read(path)
    classify_mod.remember(str(path), Classified("dicom", "9.9", "9.9.9", SC, header=found.header))
    change(path)
    if not path.exists():
        with pytest.raises(FileVanished):
            classify_mod.classify(str(path))
        return
    assert classify_mod.classify(str(path)).sop_uid == found.sop_uid


@pytest.mark.usefixtures("recent")
def test_a_header_parsed_from_the_file_is_not_remembered(tmp_path: Path) -> None:
    """Values beyond the 64 KiB parsed in memory may be read from the file later."""
    path = _instance(tmp_path)
    found = _read(path)
    assert found.header is not None
    found.header.filename = str(path)  # as pydicom marks a header read from a file
    classify_mod.remember(str(path), found)
    assert not classify_mod._recent


@pytest.mark.usefixtures("recent")
def test_at_most_recent_files_are_remembered(tmp_path: Path) -> None:
    path = _instance(tmp_path)
    found = _read(path)
    for n in range(classify_mod.RECENT + 1):
        name = f"{path}.{n}" if n else str(path)
        if n:
            os.link(path, name)  # another name for the same file: remembered on its own
        classify_mod.remember(name, found)
    assert len(classify_mod._recent) == classify_mod.RECENT
    assert str(path) not in classify_mod._recent  # the oldest went first


# ------------------------------------------- a study folder emptied while an instance arrives
class _Watch:
    def __init__(self, watch: Path) -> None:
        self.watch = watch


class _Placing:
    """The parts of a ``Receiver`` that ``_place`` uses."""

    def __init__(self, watch: Path) -> None:
        self.source = _Watch(watch)


def test_settling_does_not_remove_a_study_folder_before_its_instance_is_in_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Settling a batch tries to remove the study folder after each of its files (filing.py):
    with a receiver faster than before, a test saw five tries in a row lose the folder that
    way ("kept vanishing", 0xA700).  Here such a removal comes at the worst moment: just
    after the receiver made the folder, before the rename."""
    watch = tmp_path / "received" / "ct"
    watch.mkdir(parents=True)
    part = watch / ".x.part"
    part.write_bytes(b"instance")
    made = fileops.make_folders
    tidying: list[threading.Thread] = []

    def made_then_tidied(folder: Path) -> list[Path]:
        found = made(folder)
        tidy = threading.Thread(
            target=fileops.remove_empty_parents, args=(folder / "settled.dcm", watch)
        )
        tidy.start()
        tidy.join(1.0)  # done here unless it must wait for the receiver to put its file in
        tidying.append(tidy)
        return found

    monkeypatch.setattr(fileops, "make_folders", made_then_tidied)
    placed = Receiver._place(cast(Receiver, _Placing(watch)), part, "1.2.3", "1.2.3.4")
    assert placed == watch / "1.2.3" / "1.2.3.4.dcm"
    assert placed.read_bytes() == b"instance"
    assert all(_joined(t) for t in tidying)
    assert placed.exists()  # the tidying, once it ran, left the folder with its file


def test_a_removal_hanging_in_another_folder_does_not_hold_up_the_receiver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drop folder on a network share that stops answering: tidying its empty folders hangs
    in ``rmdir`` (simulated here: it waits until the test lets it go).  The receiver, placing
    an instance in its own watch folder meanwhile, is not held up by it."""
    drop, watch = tmp_path / "share", tmp_path / "received" / "ct"
    (drop / "a").mkdir(parents=True)
    watch.mkdir(parents=True)
    hanging, answer = threading.Event(), threading.Event()
    rmdir = Path.rmdir

    def unanswered(folder: Path) -> None:
        if drop in folder.parents:
            hanging.set()
            answer.wait(60)  # the share answers when the test ends
        rmdir(folder)

    monkeypatch.setattr(Path, "rmdir", unanswered)
    tidy = _ends(fileops.remove_empty_parents, drop / "a" / "settled.dcm", drop)
    try:
        assert hanging.wait(60)
        part = watch / ".x.part"
        part.write_bytes(b"instance")
        placing = _ends(Receiver._place, cast(Receiver, _Placing(watch)), part, "1.2", "1.2.3")
        assert _joined(placing)  # without waiting for the share
    finally:
        answer.set()
        assert _joined(tidy)
    assert (watch / "1.2" / "1.2.3.dcm").read_bytes() == b"instance"
