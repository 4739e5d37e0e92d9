"""Receiving DICOM C-STORE: an instance is acknowledged only once it is safely queued.

A receiving source (``receive:``) listens with pynetdicom.  For each instance:

1. pynetdicom writes the data set, as it arrives, to a temporary file in
   ``received/.incoming`` beside the queue (``STORE_RECV_CHUNKED_DATASET``: memory stays
   bounded however large the instance; nothing there is ever queued, and it is cleared at start);
2. stowd writes the Part-10 file: its own file meta (the negotiated transfer syntax, the
   calling and called AE titles, the peer's address), then the data set bytes as received,
   into a ``.part`` file there, and fsyncs it;
3. the header is read within bounds (``classify``): a malformed data set is refused (0xC000);
   what was read is handed on to the reader of new files (``classify.remember``), which then
   need not read it again;
4. the file is renamed into ``received/<source>/<StudyInstanceUID>/<SOPInstanceUID>.dcm``
   (never over another file: a second copy of one UID gets ``~1``), and the folder fsynced;
5. it is queued (one SQLite transaction, synchronous=FULL);
6. only then is Success (0x0000) answered.  A failure in 2, 4 or 5 (a full disk, the queue)
   or a stop in progress answers 0xA700 (out of resources) and leaves no file behind.

What is proposed is accepted as is: every storage SOP class (pynetdicom's unrestricted storage
service) in the transfer syntax the sender proposes first; nothing is transcoded on receipt.
C-ECHO is answered.  Calling AE titles outside ``allow`` (or from another host than the one
allowed) are rejected: A-ASSOCIATE-RJ, permanent, "calling AE title not recognised".
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from stowd import __version__, fileops
from stowd.config.model import Receive, Source
from stowd.config.receiveconfig import AE_TITLE
from stowd.config.yamlwalk import host_port
from stowd.errors import DataSetMismatch, FileProblem, QueueError, StowdError
from stowd.pipeline import counters, dimse
from stowd.pipeline.classify import classify_dicom, remember
from stowd.pipeline.incoming import PART, parts_folder
from stowd.pipeline.loop import ring
from stowd.pipeline.queue import NewFile, Queue
from stowd.printable import escape

log = logging.getLogger("stowd.receive")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources (PS3.4 Table B.2-1)
CANNOT_UNDERSTAND = 0xC000  # Error: Cannot understand (PS3.4 Table B.2-1)
NOT_MATCHING = 0xA900  # Error: Data Set does not match SOP Class (PS3.4 Table B.2-1)
REJECT_TRANSIENT, PRESENTATION, LOCAL_LIMIT = 0x02, 0x03, 0x02
REQUEST_TIMEOUT = 30.0  # seconds a new connection has to ask for an association (as dcmtk)
REJECT_PERMANENT, SERVICE_USER, CALLING_AE_UNKNOWN = 0x01, 0x01, 0x03
# stowd's implementation class UID: 2.25 + a UUID made once for stowd (PS3.5 B.2)
IMPLEMENTATION_UID = "2.25.238195672415180883218335735186066521011"
IMPLEMENTATION_VERSION = f"STOWD_{__version__}"[:16]
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
PLACE_TRIES = 5
MAX_COPIES = 10_000
CHUNK = 1024 * 1024


@dataclass
class Tally:
    """What one receiving source took in since stowd started (for status and metrics)."""

    open: int = 0  # associations open now
    associations: int = 0
    rejected: int = 0  # associations rejected (calling AE, called AE, too many)
    received: int = 0  # instances queued and answered Success
    refused: int = 0  # instances answered with a failure status
    bytes: int = 0
    last_calling_ae: str = ""
    last_at: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def snapshot(self) -> dict[str, object]:
        with self.lock:
            return {
                "open": self.open,
                "associations": self.associations,
                "rejected": self.rejected,
                "received": self.received,
                "refused": self.refused,
                "bytes": self.bytes,
                "last_calling_ae": self.last_calling_ae,
                "last_at": self.last_at,
            }


@dataclass
class Session:
    """What one association brought, for its log line when it ends."""

    calling_ae: str
    received: int = 0
    refused: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class Origin:
    """Who sent an instance: from the association, recorded in the file meta."""

    calling_ae: str
    called_ae: str
    address: str
    port: int

    @property
    def url(self) -> str:
        return f"dicom://{host_port(self.address, self.port)}"


class Receiver:
    """The C-STORE receiver of one source."""

    def __init__(self, source: Source, queue: Queue, incoming: Path) -> None:
        assert source.receive is not None
        self.source = source
        self.settings: Receive = source.receive
        self.queue = queue
        self.incoming = incoming
        self.tally = Tally()
        self.stopping = threading.Event()
        self.parts = parts_folder(source)  # finished files wait here for their name
        self._ae: AE | None = None
        self._server: Any = None
        self._sessions: dict[int, Session] = {}  # open associations, by id of the association

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Listen; ``StowdError`` when the address cannot be bound."""
        dimse.configure(self.incoming)
        for folder in (self.incoming, self.parts):
            for made in fileops.make_folders(folder):
                fileops.fsync_dir(made.parent)
        ae = self._ae = self._make_ae()
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._requested),
            (evt.EVT_ESTABLISHED, self._established),
            (evt.EVT_REJECTED, self._rejected),
            (evt.EVT_RELEASED, self._ended),
            (evt.EVT_ABORTED, self._ended),
            (evt.EVT_CONN_CLOSE, self._ended),
            (evt.EVT_C_STORE, self._store),
        ]
        where = (self.settings.bind, self.settings.port)
        try:
            self._server = ae.start_server(where, block=False, evt_handlers=handlers)
        except OSError as exc:
            raise StowdError(
                f"source {self.source.name}: cannot listen on {host_port(*where)}: "
                f"{exc.strerror or exc}"
            ) from exc
        log.info(
            "receiving C-STORE on %s as %s (source %s) -> %s",
            host_port(*where),
            self.settings.ae_title,
            self.source.name,
            self.source.destination,
        )

    def _make_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        # pynetdicom counts connections that have not asked for an association yet against its
        # limit: room for those, and max_associations is applied to associations (_requested)
        ae.maximum_associations = 2 * s.max_associations + 8
        ae.maximum_pdu_size = s.max_pdu
        ae.network_timeout = s.idle_timeout
        ae.acse_timeout = min(REQUEST_TIMEOUT, s.idle_timeout)
        ae.dimse_timeout = s.idle_timeout
        ae.require_called_aet = True
        ae.add_supported_context(Verification)
        return ae

    def stop(self) -> None:
        """Answer every new instance 0xA700, stop listening, and end the associations."""
        self.stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._ae is not None:
            for assoc in list(self._ae.active_associations):
                assoc.abort()
            self._ae.shutdown()

    # -- associations ------------------------------------------------------------------
    def _requested(self, event: evt.Event) -> None:
        calling = str(getattr(event.assoc.requestor.primitive, "calling_ae_title", "")).strip()
        host = plain_address(str(event.assoc.requestor.address))
        if self._allowed(calling, host):
            self._within_limit(event, calling, host)
            return
        event.assoc.acse.send_reject(REJECT_PERMANENT, SERVICE_USER, CALLING_AE_UNKNOWN)
        event.assoc.kill()  # as pynetdicom's own rejections: the reject is sent, then closed
        self._count_rejected()
        log.warning(
            "source %s: association from %s at %s rejected: that calling AE title is not "
            "allowed%s (receive.allow)",
            self.source.name,
            escape(calling),
            host,
            " from that host" if any(a.ae_title == calling for a in self.settings.allow) else "",
        )

    def _within_limit(self, event: evt.Event, calling: str, host: str) -> None:
        with self.tally.lock:
            full = len(self._sessions) >= self.settings.max_associations
        if not full:
            return
        event.assoc.acse.send_reject(REJECT_TRANSIENT, PRESENTATION, LOCAL_LIMIT)
        event.assoc.kill()
        self._count_rejected()
        log.warning(
            "source %s: association from %s at %s rejected: %d associations are open already "
            "(receive.max_associations); the sender may try again",
            self.source.name,
            escape(calling),
            host,
            self.settings.max_associations,
        )

    def _allowed(self, calling: str, host: str) -> bool:
        allow = self.settings.allow
        return not allow or any(
            a.ae_title == calling and (a.host is None or a.host == host) for a in allow
        )

    def _rejected(self, event: evt.Event) -> None:
        """Rejected by pynetdicom itself: the called AE title, or too many associations."""
        diagnostic = int(getattr(event.assoc.acceptor.primitive, "diagnostic", 0) or 0)
        why = {
            0x07: f"it called AE title {escape(_called(event))}, not {self.settings.ae_title}",
            0x02: f"{self.settings.max_associations} associations are open already "
            "(receive.max_associations); the sender may try again",
        }.get(diagnostic, "it could not be negotiated")
        self._count_rejected()
        log.warning(
            "source %s: association from %s at %s rejected: %s",
            self.source.name,
            escape(str(event.assoc.requestor.ae_title)),
            event.assoc.requestor.address,
            why,
        )

    def _count_rejected(self) -> None:
        with self.tally.lock:
            self.tally.rejected += 1
        counters.association_rejected(self.source.name)

    def _established(self, event: evt.Event) -> None:
        calling = escape(str(event.assoc.requestor.ae_title).strip())
        with self.tally.lock:
            self.tally.open += 1
            self.tally.associations += 1
            self.tally.last_calling_ae = calling
            self._sessions[id(event.assoc)] = Session(calling)
        counters.association_opened(self.source.name)
        log.info(
            "source %s: association from %s at %s accepted",
            self.source.name,
            calling,
            event.assoc.requestor.address,
        )

    def _ended(self, event: evt.Event) -> None:
        """Released, aborted or closed: remove what it left half-received, and say what it
        brought (once, for one that was established)."""
        dimse.forget({t for t in (event.assoc.ident, event.assoc.dul.ident) if t is not None})
        with self.tally.lock:
            session = self._sessions.pop(id(event.assoc), None)
            if session is not None:
                self.tally.open = max(0, self.tally.open - 1)
        if session is None:
            return
        counters.association_closed(self.source.name)
        self.queue.release_connection()  # each association has its own thread
        how = "released" if event.event is evt.EVT_RELEASED else "aborted"
        how = "closed" if event.event is evt.EVT_CONN_CLOSE else how
        log.info(
            "source %s: association from %s at %s %s: %d instance(s) received (%.1f MB), "
            "%d refused",
            self.source.name,
            escape(session.calling_ae),
            plain_address(str(event.assoc.requestor.address)),
            how,
            session.received,
            session.bytes / 1e6,
            session.refused,
        )

    # -- instances ---------------------------------------------------------------------
    def _store(self, event: evt.Event) -> int:
        if self.stopping.is_set():
            why = "stowd is stopping; the sender may try again"
            return self._refuse(OUT_OF_RESOURCES, why, event)
        origin = _origin_of(event, self.settings)
        received = Path(event.dataset_path)
        try:
            size = self._take(event, received, origin)
        except DataSetMismatch as exc:
            return self._refuse(NOT_MATCHING, f"from {origin.calling_ae}: {exc}", event)
        except FileProblem as exc:
            return self._refuse(CANNOT_UNDERSTAND, f"from {origin.calling_ae}: {exc}", event)
        except (OSError, QueueError, StowdError) as exc:
            why = f"from {origin.calling_ae}: {_reason(exc)}"
            return self._refuse(OUT_OF_RESOURCES, why, event)
        with self.tally.lock:
            self.tally.received += 1
            self.tally.bytes += size
            self.tally.last_calling_ae = origin.calling_ae
            self.tally.last_at = time.time()
            session = self._sessions.get(id(event.assoc))
            if session is not None:
                session.received += 1
                session.bytes += size
        counters.instance_received(self.source.name, size)
        return SUCCESS

    def _refuse(self, status: int, why: str, event: evt.Event) -> int:
        with self.tally.lock:
            self.tally.refused += 1
            session = self._sessions.get(id(event.assoc))
            if session is not None:
                session.refused += 1
        counters.instance_refused(self.source.name)
        log.warning(
            "source %s: an instance was refused (status 0x%04X): %s",
            self.source.name,
            status,
            escape(why),
        )
        return status

    def _take(self, event: evt.Event, received: Path, origin: Origin) -> int:
        try:
            failed = dimse.failure_of(received)
            if failed is not None:
                raise failed  # the data set could not be written whole (its disk is full)
            return self._keep(event, received, origin)
        finally:
            dimse.done_with(received)

    def _keep(self, event: evt.Event, received: Path, origin: Origin) -> int:
        """Steps 2 to 5: the Part-10 file written, checked, in place and queued."""
        part = self.parts / f".{uuid.uuid4().hex}{PART}"
        try:
            _write_part10(part, received, _file_meta(event, origin))
            found = classify_dicom(str(part))
            _check_matches(event, found.sop_uid, found.sop_class)
            final = self._place(part, found.study_uid, found.sop_uid)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        try:
            remember(str(final), found)  # the reader of new files need not read it again
            return self._queue(final)
        except BaseException:
            final.unlink(missing_ok=True)  # answered with a failure: the sender sends it again
            raise

    def _place(self, part: Path, study_uid: str, sop_uid: str) -> Path:
        """Rename ``part`` into its study's folder, then make the new entries durable: the
        file's in the folder, and the folder's in its parent (always: another association may
        have just made it, and not fsynced its parent yet).  Settling a study's last file
        removes its empty folders: not between making the folder and the rename
        (``fileops.folders_lock`` of the watch folder); should another process remove it there, it
        is made again."""
        folder = self.source.watch / _safe_uid(study_uid)
        target = folder / f"{_safe_uid(sop_uid)}.dcm"
        for _ in range(PLACE_TRIES):
            try:
                with fileops.folders_lock(self.source.watch):  # settling removes empty ones
                    fileops.make_folders(folder)
                    placed = _rename_unused(part, target)
            except FileNotFoundError:
                if not part.exists():
                    raise
                continue  # the folder went (another process): make it again
            fileops.fsync_dir(folder)
            fileops.fsync_dir(folder.parent)
            return placed
        raise OSError(f"the folder {folder} kept vanishing while an instance was put there")

    def _queue(self, path: Path) -> int:
        st = path.stat()
        rel = path.relative_to(self.source.watch).as_posix()
        found = NewFile(
            self.source.name, self.source.destination, str(path), rel, st.st_size, st.st_mtime_ns
        )
        if self.queue.enqueue([found]):  # 0: a rescan queued it first (or it was just sent)
            ring()  # the readers and senders waiting for work look now
        return st.st_size


def _rename_unused(part: Path, target: Path) -> Path:
    """``part`` renamed to ``target``, or ``target~1``, ``~2``... where that is taken."""
    for n in range(MAX_COPIES):
        name = target if n == 0 else fileops.numbered(target, n)
        try:
            fileops.rename_new(part, name)
        except FileExistsError:
            continue
        return name
    raise FileProblem(f"{MAX_COPIES} copies of {target.stem} were received; no name is left")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} ({exc.filename})" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__


def _safe_uid(uid: str) -> str:
    """A UID as a file name; anything else (it came from the sender) as a hash-like name."""
    return uid if len(uid) <= 64 and _UID.fullmatch(uid) else f"unnamed-{uuid.uuid4().hex}"


def _origin_of(event: evt.Event, settings: Receive) -> Origin:
    requestor = event.assoc.requestor
    return Origin(
        _ae_or_empty(str(requestor.ae_title)),
        settings.ae_title,
        plain_address(str(requestor.address)),
        int(requestor.port),
    )


def plain_address(address: str) -> str:
    """An IPv4 peer of a receiver bound to ``::`` shows as ``::ffff:10.1.2.3``: 10.1.2.3."""
    try:
        found = ipaddress.ip_address(address)
    except ValueError:
        return address
    mapped = getattr(found, "ipv4_mapped", None)
    return str(mapped) if mapped is not None else str(found)


def _check_matches(event: evt.Event, sop_uid: str, sop_class: str) -> None:
    """The data set must be the instance, of the class, that its request names."""
    request = cast(C_STORE, event.request)
    named = str(request.AffectedSOPInstanceUID or "")
    named_class = str(request.AffectedSOPClassUID or "")
    if sop_uid != named:
        raise DataSetMismatch(
            f"the data set is SOP instance {escape(sop_uid)}, but its C-STORE request named "
            f"{escape(named)}"
        )
    if sop_class != named_class:
        raise DataSetMismatch(
            f"the data set is of SOP class {escape(sop_class)}, but its C-STORE request named "
            f"{escape(named_class)}"
        )


def _called(event: evt.Event) -> str:
    return str(getattr(event.assoc.requestor.primitive, "called_ae_title", "")).strip()


def _ae_or_empty(title: str) -> str:
    title = title.strip()
    return title if AE_TITLE.fullmatch(title) else ""


def _file_meta(event: evt.Event, origin: Origin) -> bytes:
    """The file meta of a received instance (PS3.10 7.1): what the association said, encoded
    (Explicit VR Little Endian, group length first)."""
    request = cast(C_STORE, event.request)
    values = MetaValues(
        str(request.AffectedSOPClassUID),
        str(request.AffectedSOPInstanceUID),
        str(event.context.transfer_syntax),
        origin.calling_ae,
        origin.called_ae,
        origin.url,
    )
    return meta_bytes(values)


@dataclass(frozen=True)
class MetaValues:
    """The values of a received instance's file meta that vary."""

    sop_class: str
    sop_instance: str
    transfer_syntax: str
    calling_ae: str  # "" when the sender gave none (or an invalid one): not written
    called_ae: str
    url: str


def meta_bytes(values: MetaValues) -> bytes:
    """The encoded file meta: by hand where it can be, else by pydicom (the same bytes)."""
    fast = encode_meta(values)
    return fast if fast is not None else encode_meta_pydicom(values)


def encode_meta_pydicom(values: MetaValues) -> bytes:
    """The file meta, encoded by pydicom: for what ``encode_meta`` declines."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(values.sop_class)
    meta.MediaStorageSOPInstanceUID = UID(values.sop_instance)
    meta.TransferSyntaxUID = UID(values.transfer_syntax)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    if values.calling_ae:
        meta.SourceApplicationEntityTitle = values.calling_ae
        meta.SendingApplicationEntityTitle = values.calling_ae
    meta.ReceivingApplicationEntityTitle = values.called_ae
    meta.SendingPresentationAddress = values.url
    out = DicomBytesIO()
    write_file_meta_info(out, meta, enforce_standard=True)
    return out.getvalue()


def encode_meta(values: MetaValues) -> bytes | None:
    """The same bytes as ``encode_meta_pydicom``, written by hand (pydicom's takes about as
    long as the rest of the handler); None for a value outside the plain cases it knows: a
    UID that is not digits and dots of at most 64 characters, an AE title or address that is
    not plain printable ASCII of a length its VR allows."""
    uids = (values.sop_class, values.sop_instance, values.transfer_syntax)
    aes = (values.calling_ae, values.called_ae) if values.calling_ae else (values.called_ae,)
    if not all(_UID.fullmatch(u) and len(u) <= 64 for u in uids):
        return None
    if not all(_PLAIN_AE.fullmatch(a) for a in aes) or not _PLAIN_URL.fullmatch(values.url):
        return None
    body = _FIXED_HEAD + _short(b"\x02\x00", b"UI", values.sop_class, b"\x00")
    body += _short(b"\x03\x00", b"UI", values.sop_instance, b"\x00")
    body += _short(b"\x10\x00", b"UI", values.transfer_syntax, b"\x00") + _FIXED_IMPLEMENTATION
    if values.calling_ae:
        body += _short(b"\x16\x00", b"AE", values.calling_ae, b" ")
        body += _short(b"\x17\x00", b"AE", values.calling_ae, b" ")
    body += _short(b"\x18\x00", b"AE", values.called_ae, b" ")
    url = _padded(values.url, b" ")
    body += b"\x02\x00\x27\x00UR\x00\x00" + struct.pack("<L", len(url)) + url
    return b"\x02\x00\x00\x00UL\x04\x00" + struct.pack("<L", len(body)) + body


def _padded(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def _short(element: bytes, vr: bytes, value: str, pad: bytes) -> bytes:
    """An element of group 0002 with a 2-byte length (Explicit VR Little Endian)."""
    raw = _padded(value, pad)
    return b"\x02\x00" + element + vr + struct.pack("<H", len(raw)) + raw


# printable ASCII but the backslash (pydicom splits a value there): no space first or last
_PLAIN_AE = re.compile(r"[!-\[\]-~]([ -\[\]-~]{0,14}[!-\[\]-~])?")  # 1 to 16 characters
_PLAIN_URL = re.compile(r"[!-\[\]-~]{1,1024}")  # dicom://host:port, no spaces
_FIXED_HEAD = b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01"  # version 00 01
_FIXED_IMPLEMENTATION = _short(b"\x12\x00", b"UI", IMPLEMENTATION_UID, b"\x00") + _short(
    b"\x13\x00", b"SH", IMPLEMENTATION_VERSION, b" "
)


def _write_part10(part: Path, received: Path, meta: bytes) -> None:
    """Preamble, our file meta, then the data set bytes pynetdicom wrote after its own."""
    with received.open("rb") as src:
        start = _data_set_start(src)
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(PREAMBLE + meta)
            out.flush()
            _copy_rest(src, out, start)
            out.flush()
            os.fsync(out.fileno())


def _data_set_start(src: BinaryIO) -> int:
    """Where the data set begins in pynetdicom's file: right after its preamble where no file
    meta follows (``dimse`` has pynetdicom write none), else as pydicom reads a file meta:
    after every element of group 0002.  Not from a group length: a sender's data set may
    start with one, and one claiming more than its group would drop the elements after it."""
    at = len(PREAMBLE)
    head = src.read(at + len(_GROUP_2))
    if head[:at] == PREAMBLE and head[at:] not in (_GROUP_2, b""):
        return at
    src.seek(0)
    return _data_set_start_pydicom(src)


def _data_set_start_pydicom(src: BinaryIO) -> int:
    """As pydicom reads a file meta; ``FileProblem`` where the sender's group 0002 elements
    at the data set's start cannot be read (refused as a data set not understood)."""
    try:
        pydicom.filereader.read_preamble(src, False)
        pydicom.filereader._read_file_meta_info(src)
    except OSError:
        raise  # reading the incoming file failed: not the sender's data set
    except Exception as exc:  # pydicom raises many kinds (struct, length, VR, EOF) of bad bytes
        raise FileProblem(
            f"the data set starts with group 0002 elements that cannot be read ({exc})"
        ) from exc
    return src.tell()


PREAMBLE = b"\x00" * 128 + b"DICM"
_GROUP_2 = b"\x02\x00"


def _copy_rest(src: BinaryIO, out: BinaryIO, start: int) -> None:
    """The rest of ``src`` from ``start``, copied by the kernel (sendfile), not through us."""
    size = os.fstat(src.fileno()).st_size
    offset = start
    while offset < size:
        sent = os.sendfile(out.fileno(), src.fileno(), offset, min(CHUNK * 8, size - offset))
        if sent == 0:
            raise OSError(f"the received data set ended early at byte {offset}")
        offset += sent
