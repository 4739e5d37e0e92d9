"""pynetdicom set up for a receiver that faces untrusted senders: the one home of stowd's
adaptations of pynetdicom (3.0), each a process-wide setting of that library.

* Data sets are written to files as they arrive (``STORE_RECV_CHUNKED_DATASET``), in
  ``received/.incoming``, through ``Incoming``: a write that fails (a full disk) does not crash
  pynetdicom's thread; the file is emptied at once (its space given back), the rest of the
  data set is dropped, and the receiver answers that instance 0xA700 (``failure_of``).
  Files of an association that ends mid-instance are removed when it ends (``forget``).
* pynetdicom writes no file meta into those files (``dimse_messages.create_file_meta`` and
  ``write_file_meta_info`` replaced by ``_no_meta``): only the preamble, then the data set.
  stowd writes its own file meta into the Part-10 file and copies the data set from after the
  preamble; pynetdicom's (made and encoded with pydicom, about 0.6 ms per instance) would be
  skipped unread.  Both names are used in pynetdicom 3.0 only there (the chunked C-STORE
  request), whose file is always an ``Incoming``.
* pynetdicom's own event logging is off (``LOG_HANDLER_LEVEL = "none"``): its handlers
  format every PDU and DIMSE message for INFO and DEBUG lines, which stowd never shows (its
  ``pynetdicom`` logger is at WARNING, ``service/logs.py``); its warnings and errors stay.
* A C-STORE response is encoded by hand (``send_msg`` replaces pynetdicom's
  ``DIMSEServiceProvider.send_msg`` for it): pynetdicom builds and encodes a pydicom data set
  twice for each (about 0.5 ms).  Only for plain values: a response with an error comment or
  an offending element, a UID that is not digits and dots, a command longer than the peer's
  PDU, or a handler bound to ``EVT_DIMSE_SENT``, goes through pynetdicom's own.  The bytes are
  pynetdicom's (tests/test_receive_meta.py compares them).
* The reactors' polls return as soon as there is work (``Waits`` replaces the ``time`` module
  that pynetdicom's ``dul`` and ``association`` modules see): pynetdicom 3.0 runs two threads
  per association that each sleep 1 ms whenever they find nothing to do, so each instance
  waited up to 1 ms for its request to be noticed, up to 1 ms for its decoded message to be
  served, and up to 1 ms for its response to be sent.  The DUL thread's sleep becomes a
  ``select`` on its socket (it returns when data arrive, or at once when a primitive waits
  to be sent); the association thread's 1 ms sleep becomes a wait on its DIMSE message queue
  (it returns when a message is queued).  Neither waits longer than pynetdicom's sleep, so
  every timer and check of theirs runs at least as often as before.  Every other ``sleep``
  of those modules (and any other thread's) is ``time.sleep`` itself.
* Every proposed storage SOP class is accepted (``UNRESTRICTED_STORAGE_SERVICE``).
* A PDU is read only up to a bound (``read_pdu_data`` replaces pynetdicom's
  ``DULServiceProvider._read_pdu_data``, which reads whatever length a peer's header claims,
  up to 4 GiB, into memory, even before the association is accepted): an A-ASSOCIATE-RQ of more
  than ``MAX_REQUEST`` bytes or a P-DATA-TF longer than the receiver's ``max_pdu`` is an invalid
  PDU (pynetdicom then aborts the association).  A peer closing mid-PDU is one line, not an
  ERROR with a traceback.  Once the association is aborted (pynetdicom's Sta13, awaiting the
  close), the connection is closed rather than read on: pynetdicom read whatever the peer
  still sent 6 bytes at a time as PDU headers, each one invalid, warned of and answered with
  another A-ABORT (427,000 warnings for the rest of one 256 MiB PDU, for a minute).
"""

from __future__ import annotations

import logging
import os
import re
import select
import struct
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pynetdicom.association
import pynetdicom.dul
from pynetdicom import _config, dimse_messages, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA

log = logging.getLogger("stowd.receive")

MAX_REQUEST = 1024 * 1024  # an A-ASSOCIATE-RQ is a few KiB; other PDUs but data are tiny
PDU_SLACK = 1024  # a P-DATA-TF's items add their own headers to the negotiated length
_PDU_TYPES = (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07)
_P_DATA = 0x04

_lock = threading.Lock()
_folder: Path | None = None
_failed: dict[str, OSError] = {}  # incoming file -> the write error that emptied it
_owners: dict[str, set[int]] = {}  # incoming file -> the threads that made it


class Incoming:
    """The file pynetdicom writes a data set into (it uses ``write``, ``file.flush``,
    ``name`` and ``close``)."""

    def __init__(self, folder: Path) -> None:
        fd, name = _make(folder)
        self.name = name
        self.file = self  # pynetdicom flushes ``.file``
        self._fd: int | None = fd
        self._error: OSError | None = None
        with _lock:
            _owners[name] = {threading.get_ident()}

    def write(self, data: bytes) -> int:
        if self._error is None and self._fd is not None:
            try:
                _write_all(self._fd, memoryview(data))
            except OSError as exc:
                self._give_back(exc)
        return len(data)

    def flush(self) -> None:
        """Writes go straight to the file (no buffer)."""

    def tell(self) -> int:
        return os.lseek(self._fd, 0, os.SEEK_CUR) if self._fd is not None else 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _give_back(self, exc: OSError) -> None:
        self._error = exc
        with _lock:
            _failed[self.name] = exc
        if self._fd is not None:
            os.ftruncate(self._fd, 0)


def _make(folder: Path) -> tuple[int, str]:
    import tempfile  # noqa: PLC0415 - only the name generator

    fd, name = tempfile.mkstemp(suffix=".dcm", prefix=".in-", dir=folder)
    return fd, name


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


def _incoming(*_args: Any, **_kwargs: Any) -> Incoming:
    assert _folder is not None
    return Incoming(_folder)


def _no_meta(*_args: Any, **_kwargs: Any) -> None:
    """In place of pynetdicom's file meta for its incoming files: nothing (see above)."""


def failure_of(path: Path) -> OSError | None:
    """The write error that emptied ``path`` (then its data set is not whole), else None."""
    with _lock:
        return _failed.pop(str(path), None)


def forget(threads: set[int]) -> int:
    """Remove the incoming files an ended association's ``threads`` made and left (an
    instance cut off mid-transfer: pynetdicom removes only those it handed over)."""
    with _lock:
        mine = [name for name, made in _owners.items() if made & threads]
        for name in mine:
            del _owners[name]
            _failed.pop(name, None)
    removed = 0
    for name in mine:
        try:
            os.unlink(name)
            removed += 1
        except FileNotFoundError:
            continue  # handed over and removed by pynetdicom
    return removed


def done_with(path: Path) -> None:
    """An instance was handled: its incoming file is pynetdicom's to remove."""
    with _lock:
        _owners.pop(str(path), None)
        _failed.pop(str(path), None)


def configure(folder: Path) -> None:
    """Set pynetdicom up for stowd's receivers (process-wide; the same for each call)."""
    global _folder  # noqa: PLW0603 - pynetdicom's settings are process-wide too
    with _lock:
        _folder = folder
    dimse_messages.NamedTemporaryFile = _incoming  # type: ignore[attr-defined,assignment]
    dimse_messages.create_file_meta = _no_meta  # type: ignore[attr-defined,assignment]
    dimse_messages.write_file_meta_info = _no_meta  # type: ignore[attr-defined]
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.LOG_HANDLER_LEVEL = "none"
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    DULServiceProvider._read_pdu_data = read_pdu_data  # type: ignore[method-assign]
    DIMSEServiceProvider.send_msg = send_msg  # type: ignore[method-assign]
    pynetdicom.dul.time = DUL_WAITS  # type: ignore[attr-defined,assignment]
    pynetdicom.association.time = ASSOCIATION_WAITS  # type: ignore[attr-defined,assignment]


ASSOCIATION_POLL = 0.001  # the association reactor's sleep in pynetdicom 3.0 (_run_reactor)


class Waits:
    """``time`` as one pynetdicom module sees it: the same, but a ``sleep`` of that module's
    reactor thread (of ``poll`` seconds, when given) is ``wait(thread, seconds)``."""

    def __init__(
        self, reactor: type, wait: Callable[[Any, float], None], poll: float | None = None
    ) -> None:
        self.reactor, self.wait, self.poll = reactor, wait, poll

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        thread = threading.current_thread()
        if isinstance(thread, self.reactor) and self.poll in (None, seconds):
            self.wait(thread, seconds)
        else:
            time.sleep(seconds)


def _dul_wait(dul: DULServiceProvider, seconds: float) -> None:
    """Until data arrive on the association's socket, at most ``seconds``; none when a
    primitive waits to be sent."""
    sock = getattr(dul.socket, "socket", None)
    if not dul.to_provider_queue.empty():
        return
    if sock is None:
        time.sleep(seconds)
        return
    try:
        select.select([sock], [], [], seconds)
    except (OSError, ValueError):  # closed meanwhile: the reactor finds out itself
        time.sleep(seconds)


def _association_wait(assoc: Association, seconds: float) -> None:
    """Until a DIMSE message is queued for the reactor to serve, at most ``seconds``."""
    waiting = assoc.dimse.msg_queue
    with waiting.not_empty:
        if not waiting.queue:
            waiting.not_empty.wait(seconds)


# the DUL reactor's sleeps (not another thread's, as the association's in ``stop_dul``), and
# the association reactor's 1 ms poll (not its other sleeps: waits for a release or an abort)
DUL_WAITS = Waits(DULServiceProvider, _dul_wait)
ASSOCIATION_WAITS = Waits(Association, _association_wait, ASSOCIATION_POLL)


_SEND_MSG = DIMSEServiceProvider.send_msg  # pynetdicom's own
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
PDV_HEAD = 6  # a PDV item's length (4), context ID and message control header
_COMMAND_LAST = b"\x03"  # message control header: command, last fragment


def send_msg(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
    """pynetdicom 3.0's ``DIMSEServiceProvider.send_msg``, a plain C-STORE response encoded
    by hand: in one P-DATA, its command set in one fragment, as pynetdicom's would be."""
    command = store_response(primitive)
    peer_max = self.maximum_pdu_size
    fits = command is not None and (not peer_max or len(command) <= peer_max - PDV_HEAD)
    if command is None or not fits or self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
        _SEND_MSG(self, primitive, context_id)
        return
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, _COMMAND_LAST + command))
    self.dul.send_pdu(pdata)


def store_response(primitive: Any) -> bytes | None:
    """The command set of a C-STORE response (Implicit VR Little Endian, PS3.7 9.3.1.2), or
    None for what only pynetdicom encodes (see the module's docstring)."""
    if not _plain_response(primitive):
        return None
    sop_class, sop_instance = primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID
    body = b"" if sop_class is None else _element(0x0002, _uid(sop_class))
    for element, value in (
        (0x0100, 0x8001),  # CommandField: C-STORE-RSP
        (0x0120, primitive.MessageIDBeingRespondedTo),
        (0x0800, 0x0101),  # CommandDataSetType: no data set
        (0x0900, primitive.Status),
    ):
        body += _element(element, struct.pack("<H", value))
    body += b"" if sop_instance is None else _element(0x1000, _uid(sop_instance))
    return _element(0x0000, struct.pack("<L", len(body))) + body


def _plain_response(primitive: Any) -> bool:
    if type(primitive) is not C_STORE or getattr(primitive, "_dataset_path", None) is not None:
        return False
    if primitive.ErrorComment is not None or primitive.OffendingElement is not None:
        return False
    shorts = (primitive.Status, primitive.MessageIDBeingRespondedTo)
    if not all(isinstance(n, int) and 0 <= n <= 0xFFFF for n in shorts):
        return False
    uids = (primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID)
    return all(u is None or _plain_uid(str(u)) for u in uids)


def _plain_uid(uid: str) -> bool:
    return len(uid) <= 64 and _UID.fullmatch(uid) is not None


def _uid(uid: Any) -> bytes:
    raw = str(uid).encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _element(element: int, value: bytes) -> bytes:
    """A command element of group 0000, Implicit VR Little Endian."""
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


_REFUSED: weakref.WeakSet[DULServiceProvider] = weakref.WeakSet()  # sent an invalid PDU


def read_pdu_data(self: DULServiceProvider) -> None:
    """pynetdicom 3.0's ``_read_pdu_data`` with a bound on what a PDU may claim; after an
    abort (Sta13) the connection is closed, not read (see the module's docstring)."""
    sock = self.socket
    assert sock is not None
    if self in _REFUSED:  # its Evt19 may still wait in the event queue behind others
        if self.state_machine.current_state == "Sta13":
            sock.close()  # Evt17: the transport connection closed
        return
    try:
        head = sock.recv(6)
        pdu_type, _, length = struct.unpack(">BBL", head)
    except (OSError, TimeoutError, struct.error):
        self.event_queue.put("Evt17")  # transport closed
        return
    if pdu_type not in _PDU_TYPES or length > _limit(self, pdu_type):
        log.warning(
            "a peer sent a PDU of type 0x%02X claiming %d bytes; the association is aborted",
            pdu_type,
            length,
        )
        self.event_queue.put("Evt19")  # invalid PDU
        _REFUSED.add(self)
        return
    try:
        body = sock.recv(length)
    except (OSError, TimeoutError) as exc:
        log.info("a peer's connection ended in the middle of a PDU (%s)", exc)
        self.event_queue.put("Evt17")
        return
    if len(body) != length:
        log.info("a peer closed the connection in the middle of a PDU")
        self.event_queue.put("Evt17")
        return
    try:
        pdu, event = self._decode_pdu(bytearray(head) + body)
    except Exception:
        log.warning("a peer sent a PDU that cannot be decoded; the association is aborted")
        self.event_queue.put("Evt19")
        return
    self.event_queue.put(event)
    self._recv_pdu.put(pdu)


def _limit(dul: DULServiceProvider, pdu_type: int) -> int:
    if pdu_type != _P_DATA:
        return MAX_REQUEST
    negotiated = int(getattr(dul.assoc.acceptor, "maximum_length", 0) or 0)
    return (negotiated or MAX_REQUEST) + PDU_SLACK
