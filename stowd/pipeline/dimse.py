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
* Every proposed storage SOP class is accepted (``UNRESTRICTED_STORAGE_SERVICE``).
* A PDU is read only up to a bound (``read_pdu_data`` replaces pynetdicom's
  ``DULServiceProvider._read_pdu_data``, which reads whatever length a peer's header claims,
  up to 4 GiB, into memory, even before the association is accepted): an A-ASSOCIATE-RQ of more
  than ``MAX_REQUEST`` bytes or a P-DATA-TF longer than the receiver's ``max_pdu`` is an invalid
  PDU (pynetdicom then aborts the association).  A peer closing mid-PDU is one line, not an
  ERROR with a traceback.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from pathlib import Path
from typing import Any

from pynetdicom import _config, dimse_messages
from pynetdicom.dul import DULServiceProvider

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


def read_pdu_data(self: DULServiceProvider) -> None:
    """pynetdicom 3.0's ``_read_pdu_data`` with a bound on what a PDU may claim."""
    sock = self.socket
    assert sock is not None
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
