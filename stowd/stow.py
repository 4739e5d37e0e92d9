"""STOW-RS over HTTP: the multipart body streamed from disk, the request, and the answer.

This is the one place where httpx and tenacity exceptions become ours (``errors.py``) and where
an archive's answer is judged, file by file, following the retry table of
``shared/notes/stow-rs.md``:

* transport trouble, 408/429/502/503/504 -> ``DestinationBusy`` (retry, Retry-After honoured)
* 401/403/404/405/415, TLS failures      -> ``DestinationHeld`` (files stay queued)
* an answer over its size cap (``answers.py``) or undecodable -> ``DestinationHeld``; one
  still arriving at its deadline (twice the read timeout) -> ``DestinationBusy``
* login trouble: a secret that cannot be read, a token endpoint refusing our client
  -> ``DestinationHeld``; the token endpoint unreachable or 5xx -> ``DestinationBusy``;
  a 401 to an OAuth2 token -> one new token and one more attempt, then ``DestinationHeld``
* 200/202/409/400 bodies                 -> one ``Verdict`` per sent SOPInstanceUID; an
  instance the archive says it already holds (Azure's 45070) is stored (``Outcome.ALREADY``),
  or failed where the destination has ``duplicates: fail``; a refusal that may be transient
  is retried, the doubtful ones (``is_counted``) at most ``retry.max_refusals`` times
* a 4xx, 200 or 202 whose body is not a STOW-RS answer (empty, an HTML login page, other
  text)                                   -> ``DestinationHeld``
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import ssl
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, BinaryIO

import httpx
import tenacity

from stowd import answers, dropped
from stowd.access import Tls
from stowd.auth import OAuth2, make_auth
from stowd.config import DEFAULT_DUPLICATES, Destination
from stowd.errors import (
    AnswerTooSlow,
    ClientSetupError,
    ConnectionDropped,
    DestinationBusy,
    DestinationHeld,
    FileUnreadable,
    FileVanished,
    LinkRefused,
    SecretUnavailable,
    StowFailure,
    TokenError,
    TokenRefused,
    UnusableAnswer,
)
from stowd.printable import escape

log = logging.getLogger("stowd.stow")

CHUNK = 256 * 1024
IN_PROCESS_ATTEMPTS = 3
DICOM_TYPE = "application/dicom"
JSON_TYPE = "application/dicom+json"
QIDO_ACCEPT = "application/dicom+json, application/json;q=0.9"
QIDO_READ_TIMEOUT = 30.0  # seconds; a lookup is a small answer, unlike a STOW upload
# DICOM JSON only: Orthanc logs "Unsupported return MIME type" for every request that lists
# other types, and Azure's DICOM service accepts no other (its conformance statement v2).
# An archive that answers XML anyway is still read (parse_answer sniffs the body).
ACCEPT = "application/dicom+json"
REFERENCED, FAILED_SEQ, RETRIEVE_URL = "00081199", "00081198", "00081190"
SOP_UID, FAILURE_REASON, WARNING_REASON = "00081155", "00081197", "00081196"
# An archive's words about one refused instance: ErrorComment (0000,0902), in the item or in
# its FailedAttributesSequence (0074,1048) (Azure's conformance statement v2, "Store response
# payload").  At most TEXT_LIMIT characters of it are kept.
ERROR_COMMENT, FAILED_ATTRIBUTES = "00000902", "00741048"
TEXT_LIMIT = 200
BUSY_STATUSES = {408, 429, 502, 503, 504}
HELD_STATUSES = {401, 403, 404, 405, 407, 415}
QUOTE_LIMIT = 80  # characters of an odd answer body quoted in a reason

# FailureReason codes of one archive, with their source.  Azure's DICOM service (conformance
# statement v2, "Store failure reason codes", learn.microsoft.com/azure/healthcare-apis/dicom/
# dicom-services-conformance-statement-v2; microsoft/dicom-server FailureReasonCodes.cs, where
# InstanceAlreadyExistsException becomes SopInstanceAlreadyExists and PendingInstanceException
# PendingSopInstance, each a FailedSOPSequence item, HTTP 409 when nothing was stored):
# 45070: "A DICOM instance with the same StudyInstanceUID, SeriesInstanceUID, and
#   SopInstanceUID was already stored": the archive holds an instance by these UIDs, so the
#   file is settled as stored (its content is not compared: ``duplicates: fail`` flags it).
# 45071: "being created by another process, or the previous attempt to create failed and the
#   cleanup process isn't complete": may pass later (our own earlier request still running),
#   but may need the instance deleted first: retried at most retry.max_refusals times.
ALREADY_STORED = 0xB00E  # 45070
BEING_CREATED = 0xB00F  # 45071
# 0x0110 "processing failure" (PS3.18 Table I.2-2: "a general failure in processing") cannot
# tell stored from not stored: tiny_pacs 0.4.1 gives it to an instance it already holds when
# its storage has overwrite off (tiny_pacs_dicomweb/stow.py _materialize, store_rejected) and
# to one it failed to store; Orthanc to an instance of another study than the URL's; Google's
# Healthcare API to the same UIDs with other content (shared/notes/stow-rs.md).  So it is never
# taken for "already stored"; it may be transient, and is retried at most retry.max_refusals
# times.  Orthanc (observed, stow-rs.md) and dcm4chee-arc (by default; StoreServiceEJB) answer
# a re-sent instance as stored: there is nothing to tell apart.
COUNTED_REFUSALS = frozenset({0x0110, BEING_CREATED})

FAILURE_MEANINGS = {
    0x0110: "processing failure",
    ALREADY_STORED: "an instance with these UIDs is already stored",
    BEING_CREATED: "the instance is being created by another request, or an earlier attempt "
    "failed and is not cleaned up yet",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0xA700: "out of resources",
    0xA77A: "study deletion in progress at the archive",
    0xA900: "data set does not match SOP class",
    0xC000: "cannot understand",
    0xC122: "transfer syntax not supported",
    0xC409: "study does not match the request URL",
    0xC499: "the archive could not parse the DICOM file",
    0xA922: "missing bulkdata",
}
WARNING_MEANINGS = {
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
}


def failure_meaning(code: int) -> str:
    """Plain words for a FailureReason (0008,1197) code."""
    if code in FAILURE_MEANINGS:
        return FAILURE_MEANINGS[code]
    if 0xA770 <= code <= 0xA77F:
        return "refused by the archive's policy"
    if code & 0xFF00 == 0xA700:
        return "out of resources"
    if code & 0xFF00 == 0xA900:
        return "data set does not match SOP class"
    if code & 0xF000 == 0xC000:
        return "cannot understand"
    return "unknown failure reason"


def is_transient(code: int) -> bool:
    """Whether an instance-level FailureReason may succeed if sent again later."""
    if code in (0xA77A, *COUNTED_REFUSALS):
        return True
    if 0xA770 <= code <= 0xA77F:
        return False
    return code & 0xFF00 == 0xA700


def is_counted(code: int) -> bool:
    """Whether a transient FailureReason is doubtful: the same refusal again may well be
    permanent (a conflict), so the file is refused at most ``retry.max_refusals`` times.
    Out of resources (A7xx) and a study being deleted (A77A) are the archive's state, not
    the file's: retried until ``retry.max_age`` like a busy archive."""
    return code in COUNTED_REFUSALS


def refusal_advice(code: int | None) -> str:
    """What to check once a counted refusal (``is_counted``) failed a file."""
    if code == BEING_CREATED:
        return (
            "an earlier attempt to store it may have failed halfway in the archive; delete "
            "the instance there, then put the file back with stowd retry"
        )
    return (
        "the archive may already hold an instance with this SOPInstanceUID, as some refuse "
        "a re-sent instance, or one with other content, so; check what it holds"
    )


# -- the request body -------------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    """One instance to send: a file (or a byte range of it) and its SOPInstanceUID.

    ``size`` and ``mtime_ns`` are what the file had when queued (a changed file is not sent).
    In the metadata + bulkdata form (PS3.18) ``metadata`` is the instance's DICOM JSON and the
    bytes ``offset``..``offset + size`` of ``path`` are its bulk part, found by ``location``.
    """

    path: str
    size: int
    sop_uid: str
    mtime_ns: int | None = None
    offset: int = 0
    file_size: int | None = None  # the whole file's size when only a range is sent
    content_type: str = DICOM_TYPE
    location: str | None = None
    metadata: dict[str, Any] | None = field(default=None, compare=False, repr=False)


class Body:
    """A multipart/related body over open files: a fresh one (and boundary) per attempt.

    Part-10 files travel as ``application/dicom`` parts. Parts with ``metadata`` make the
    metadata + bulkdata form: one ``application/dicom+json`` part holding the array of
    instances, then one bulk part per instance with its ``Content-Location``.
    """

    def __init__(self, parts: Sequence[Part], progress: Callable[[], None] | None = None) -> None:
        self.boundary = uuid.uuid4().hex
        self.parts = list(parts)
        self.progress = progress  # called for every chunk sent (the watchdog's sign of life)
        self._files: list[BinaryIO] = []
        self.sent_at: float | None = None  # time.monotonic() when the last byte was handed on
        metadata = [p.metadata for p in self.parts if p.metadata is not None]
        self.root = DICOM_TYPE if not metadata else JSON_TYPE
        self.json = json.dumps(metadata).encode("utf-8") if metadata else b""

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="{self.root}"; boundary={self.boundary}'

    def _head(self, content_type: str, size: int, location: str | None = None) -> bytes:
        where = f"Content-Location: {location}\r\n" if location else ""
        return (
            f"--{self.boundary}\r\nContent-Type: {content_type}\r\n{where}"
            f"Content-Length: {size}\r\n\r\n"
        ).encode("ascii")

    def _part_head(self, part: Part) -> bytes:
        return self._head(part.content_type, part.size, part.location)

    def _json_head(self) -> bytes:
        return self._head(f"{JSON_TYPE}; charset=utf-8", len(self.json)) if self.json else b""

    @property
    def tail(self) -> bytes:
        return f"--{self.boundary}--\r\n".encode("ascii")

    @property
    def length(self) -> int:
        heads = sum(len(self._part_head(p)) + p.size + 2 for p in self.parts)
        first = len(self._json_head()) + len(self.json) + 2 if self.json else 0
        return first + heads + len(self.tail)

    def open(self) -> None:
        """Open every file now, so a vanished or changed file is known before sending."""
        try:
            for part in self.parts:
                try:
                    fp = dropped.open_file(part.path, open)  # open: the tests' seam
                except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
                    raise FileVanished(f"{part.path} vanished", path=part.path) from exc
                except LinkRefused as exc:  # a link planted since it was read
                    raise FileVanished(f"{part.path} is now a link", path=part.path) from exc
                except OSError as exc:
                    raise FileUnreadable.from_os_error(exc, part.path) from exc
                self._files.append(fp)
                if _changed(os.fstat(fp.fileno()), part):
                    raise FileVanished(f"{part.path} changed", path=part.path)
        except BaseException:
            self.close()  # any failure (PermissionError too) leaves no file open
            raise

    def close(self) -> None:
        for fp in self._files:
            fp.close()
        self._files.clear()

    def __iter__(self) -> Iterator[bytes]:
        if self.json:
            yield self._json_head() + self.json + b"\r\n"
        for part, fp in zip(self.parts, self._files, strict=True):
            yield self._part_head(part)
            for chunk in _read_exactly(fp, part):
                if self.progress is not None:
                    self.progress()
                yield chunk
            yield b"\r\n"
        yield self.tail
        self.sent_at = time.monotonic()


def _changed(st: os.stat_result, part: Part) -> bool:
    """Not the content that was queued (the file was rewritten or replaced)."""
    size = part.size if part.file_size is None else part.file_size
    return st.st_size != size or part.mtime_ns not in (None, st.st_mtime_ns)


def _read_exactly(fp: BinaryIO, part: Part) -> Iterator[bytes]:
    fp.seek(part.offset)
    left = part.size
    while left > 0:
        chunk = fp.read(min(CHUNK, left))
        if not chunk:
            raise FileVanished(
                f"{part.path} became shorter while it was being sent", path=part.path
            )
        left -= len(chunk)
        yield chunk


# -- the answer --------------------------------------------------------------------------------
@dataclass
class Answer:
    """What the archive said about one request."""

    status: int
    referenced: dict[str, int | None] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    failed_text: dict[str, str] = field(default_factory=dict)  # the archive's words, by UID
    server_message: str | None = None
    seconds: float = 0.0
    is_stow: bool = False  # the body is a STOW-RS response (DICOM JSON/XML with its sequences)


def parse_answer(status: int, body: bytes) -> Answer:
    """Read a STOW-RS response body (DICOM JSON or XML); tolerate empty or odd bodies.

    The body is sniffed, not trusted by its Content-Type: Orthanc sends none on errors.
    """
    answer = Answer(status)
    text = body.strip()
    if not text:
        return answer
    try:
        if text.startswith(b"<"):
            _read_xml(ET.fromstring(text), answer)
        else:
            _read_json(json.loads(text), answer)
    except (ValueError, ET.ParseError, TypeError, AttributeError, KeyError, IndexError):
        answer.server_message = _short(text)
    except RecursionError:  # JSON nested beyond Python's limit: not a STOW answer either
        answer.server_message = _short(text)
    if not answer.referenced and not answer.failed and answer.server_message is None:
        answer.server_message = _short(text)  # e.g. Orthanc's JSON error, an HTML page
    return answer


def _read_json(doc: Any, answer: Answer) -> None:
    if isinstance(doc, list):
        doc = doc[0] if doc else {}
    answer.is_stow = any(key in doc for key in (REFERENCED, FAILED_SEQ, RETRIEVE_URL))
    for item in doc.get(REFERENCED, {}).get("Value", []):
        answer.referenced[_json_str(item, SOP_UID)] = _json_int(item, WARNING_REASON)
    for item in doc.get(FAILED_SEQ, {}).get("Value", []):
        sop = _json_str(item, SOP_UID)
        answer.failed[sop] = _json_int(item, FAILURE_REASON) or 0
        text = _json_comment(item)
        if text:
            answer.failed_text[sop] = text


def _json_str(item: dict[str, Any], tag: str) -> str:
    return str(item.get(tag, {}).get("Value", [""])[0])


def _json_comment(item: dict[str, Any]) -> str:
    """The ErrorComment of a failure item, or those of its FailedAttributesSequence; ""
    when there is none or it is not shaped as one (the rest of the answer is still read)."""
    try:
        nested = list(item.get(FAILED_ATTRIBUTES, {}).get("Value", []))
        texts = [_json_str(i, ERROR_COMMENT) for i in [item, *nested] if ERROR_COMMENT in i]
    except (TypeError, AttributeError, IndexError):
        return ""
    return _bounded("; ".join(t for t in texts if t))


def _bounded(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= TEXT_LIMIT else text[: TEXT_LIMIT - 1] + "…"


def _json_int(item: dict[str, Any], tag: str) -> int | None:
    values = item.get(tag, {}).get("Value")
    return int(values[0]) if values else None


def _read_xml(root: ET.Element, answer: Answer) -> None:
    for attr in root.iter():
        tag = attr.get("tag", "").upper()
        if attr.tag.endswith("DicomAttribute") and tag in (REFERENCED, FAILED_SEQ, RETRIEVE_URL):
            answer.is_stow = True
        if attr.tag.endswith("DicomAttribute") and tag in (REFERENCED, FAILED_SEQ):
            for item in attr.findall("{*}Item") + attr.findall("Item"):
                _read_xml_item(item, answer, tag == REFERENCED)


def _read_xml_item(item: ET.Element, answer: Answer, referenced: bool) -> None:
    values: dict[str, str] = {}
    for attr in item:
        value = attr.find("{*}Value")
        if value is None:
            value = attr.find("Value")
        if value is not None and value.text:
            values[attr.get("tag", "").upper()] = value.text.strip()
    sop = values.get(SOP_UID, "")
    if referenced:
        warning = values.get(WARNING_REASON)
        answer.referenced[sop] = int(warning) if warning else None
    else:
        answer.failed[sop] = int(values.get(FAILURE_REASON, "0"))
        if values.get(ERROR_COMMENT):
            answer.failed_text[sop] = _bounded(values[ERROR_COMMENT])


def _short(text: bytes, limit: int = 500) -> str:
    return text[:limit].decode("utf-8", errors="replace").strip()


# -- verdicts ----------------------------------------------------------------------------------
class Outcome(Enum):
    SENT = "sent"
    ALREADY = "already stored"  # the archive holds an instance by these UIDs (not compared)
    FAILED = "failed"
    RETRY = "retry"
    ISOLATE = "isolate"


@dataclass(frozen=True)
class Verdict:
    """What to do with one file after a request, and why."""

    outcome: Outcome
    reason: str = ""
    code: int | None = None


def judge(
    answer: Answer, parts: Sequence[Part], *, duplicates: str = DEFAULT_DUPLICATES
) -> dict[str, Verdict]:
    """One verdict per SOPInstanceUID sent, following the retry table; ``duplicates``
    (``accept`` or ``fail``): what an instance the archive already holds becomes."""
    single = len(parts) == 1
    _name_foreign(answer, {p.sop_uid for p in parts})
    return {p.sop_uid: _judge_one(answer, p.sop_uid, single, duplicates) for p in parts}


def _name_foreign(answer: Answer, sent: set[str]) -> None:
    """A failure item naming an instance that was not sent is a part the archive could not
    read: dcm4chee-arc names such a part with a SOPInstanceUID it makes up (StowRS.mkSOPRef:
    NOT_A_DICOM_FILE_UID and UIDUtils.createUID(), FailureReason 0xC499).  It is recorded as
    a failure item without a SOPInstanceUID (``""``), which ``_judge_unlisted`` reads."""
    for uid, code in list(answer.failed.items()):
        if uid and uid not in sent:
            answer.failed.setdefault("", code)


def _judge_one(answer: Answer, sop: str, single: bool, duplicates: str) -> Verdict:
    status = answer.status
    if sop in answer.referenced:
        warning = answer.referenced[sop]
        note = f"stored with warning {warning:04X} ({_warning(warning)})" if warning else ""
        return Verdict(Outcome.SENT, note, warning)
    if sop in answer.failed:
        code, text = answer.failed[sop], answer.failed_text.get(sop)
        if code == ALREADY_STORED:
            return _judge_already(status, duplicates)
        return _judge_failed(status, code, text or answer.server_message)
    return _judge_unlisted(answer, single)


def _judge_already(status: int, duplicates: str) -> Verdict:
    """The archive already holds an instance with this file's UIDs (Azure's 45070)."""
    said = f"failure reason {ALREADY_STORED:04X} ({ALREADY_STORED}), HTTP {status}"
    if duplicates == "fail":
        return Verdict(
            Outcome.FAILED,
            f"the archive already holds an instance with this file's study, series and "
            f"SOP instance UIDs ({said}) and this destination has duplicates: fail; the "
            "file was not stored again (check whether the archive's copy is the right one)",
            ALREADY_STORED,
        )
    return Verdict(
        Outcome.ALREADY,
        f"already stored: the archive already holds an instance with this file's study, "
        f"series and SOP instance UIDs ({said}); its content was not compared",
        ALREADY_STORED,
    )


def _judge_unlisted(answer: Answer, single: bool) -> Verdict:
    """A file the answer names neither as stored nor as failed."""
    status = answer.status
    # A failure item without a SOPInstanceUID: the archive could not even read which instance
    # the part was (tiny_pacs_dicomweb/stow.py 0.1.0 lists a part it cannot parse, or whose
    # UIDs are malformed, so: FailureReason 0x0110 and no 00081155).
    unnamed = answer.failed.get("")
    if status in (200, 202) and unnamed is not None and not single:
        return Verdict(
            Outcome.ISOLATE,
            f"the archive answered HTTP {status} and refused a file of this request without "
            "naming it: sending the files it did not list one by one",
        )
    if status in (200, 202):
        return Verdict(
            Outcome.RETRY,
            f"the archive answered HTTP {status} but did not list this instance as stored",
        )
    if not single:
        return Verdict(Outcome.ISOLATE, f"HTTP {status} for a batch: sending files one by one")
    if status >= 500:
        return Verdict(Outcome.RETRY, f"the archive answered HTTP {status} (server error)")
    if unnamed is not None:
        reason = f"failure reason {unnamed:04X} ({failure_meaning(unnamed)})"
        return Verdict(Outcome.FAILED, f"{_refusal(status)}: {reason}", unnamed)
    return Verdict(Outcome.FAILED, _refusal(status))


def _judge_failed(status: int, code: int, said: str | None = None) -> Verdict:
    text = f"the archive refused the instance: failure reason {code:04X} ({failure_meaning(code)})"
    words = f' and said "{escape(_bounded(said))}"' if said else ""
    outcome = Outcome.RETRY if is_transient(code) else Outcome.FAILED
    return Verdict(outcome, f"{text}, HTTP {status}{words}", code)


def _refusal(status: int) -> str:
    if status == 400:
        return "the archive could not read this file (HTTP 400): it is malformed or not valid DICOM"
    if status == 413:
        return "the file is larger than the archive accepts in one request (HTTP 413)"
    if status == 409:
        return "the archive refused to store this file (HTTP 409 conflict)"
    return f"the archive refused this file (HTTP {status})"


def _warning(code: int) -> str:
    return WARNING_MEANINGS.get(code, "warning")


# -- the client -------------------------------------------------------------------------------
USER_AGENT = "stowd/0.1"
_TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def http_client(
    destination: Destination, *, transport: httpx.BaseTransport | None = None
) -> httpx.Client:
    """The configured ``httpx.Client`` of a destination: timeouts, TLS, login, headers, proxy.

    ``transport`` replaces the network (tests); the proxy setting is then not mounted, since a
    proxy mount would route every request around it.  Raises ``ClientSetupError``.
    """
    access = destination.access
    t = destination.timeouts
    auth = make_auth(access.auth)
    client = httpx.Client(
        timeout=httpx.Timeout(connect=t.connect, read=t.read, write=t.write, pool=t.pool),
        limits=httpx.Limits(max_connections=destination.workers + 1),  # +1: a token request
        verify=tls_context(destination),
        trust_env=access.trust_env,
        proxy=access.proxy if transport is None else None,
        transport=transport,
        headers={
            "User-Agent": USER_AGENT,
            "Accept": ACCEPT,
            "Accept-Encoding": answers.ACCEPT_ENCODING,
        },
        auth=auth,
        event_hooks={"request": [_extra_headers(destination)]},
    )
    if isinstance(auth, OAuth2):
        auth.bind(client)
    answers.bound_reads(client)
    return client


def _extra_headers(destination: Destination) -> Callable[[httpx.Request], None]:
    """The configured headers, on requests to the archive's host only (not to a token
    endpoint elsewhere, which has no business seeing an archive's API key)."""
    host = httpx.URL(destination.url).host
    headers = dict(destination.access.headers)

    def add(request: httpx.Request) -> None:
        if request.url.host == host:
            request.headers.update(headers)

    return add


def _no_passphrase() -> bytes:
    raise ValueError("encrypted key")


def tls_context(destination: Destination) -> ssl.SSLContext | bool:
    """What httpx's ``verify`` gets: a context with our CA, client certificate and minimum
    version (with ``verify_tls: false`` it checks neither the certificate nor the host name)."""
    tls = destination.access.tls
    try:
        ctx = ssl.create_default_context()  # the system's CAs ...
        if tls.ca_file is not None:
            ctx.load_verify_locations(cafile=str(tls.ca_file))  # ... plus the hospital's CA
        if not destination.verify_tls:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if tls.client_cert is not None:
            key = None if tls.client_key is None else str(tls.client_key)
            ctx.load_cert_chain(str(tls.client_cert), key, password=_no_passphrase)
    except ValueError as exc:
        if str(exc) != "encrypted key":
            raise ClientSetupError(_setup_text(tls, exc)) from exc
        raise ClientSetupError(
            f"the client key {tls.client_key or tls.client_cert} is encrypted: stowd needs it "
            "without a passphrase (openssl pkey -in KEY -out PLAIN_KEY; keep it readable by "
            "the stowd user only)"
        ) from None
    except (OSError, ssl.SSLError) as exc:
        raise ClientSetupError(_setup_text(tls, exc)) from exc
    ctx.minimum_version = _TLS_VERSIONS[tls.min_version]
    return ctx


def _setup_text(tls: Tls, exc: BaseException) -> str:
    files = ", ".join(
        f"{name} {path}"
        for name, path in (("ca_file", tls.ca_file), ("client_cert", tls.client_cert))
        if path is not None
    )
    if tls.client_key is not None:
        files += f", client_key {tls.client_key}"
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else _plain(exc)
    return (
        f"the TLS files cannot be used ({files}): {reason} "
        "(each must be readable PEM, and the key must belong to the certificate)"
    )


class StowClient:
    """One long-lived httpx client per destination; thread-safe.

    The client is made at the first request (and again after a TLS file problem), so a
    destination with a broken certificate file is held like any other, not a crash at start.
    """

    def __init__(
        self,
        destination: Destination,
        *,
        stop: threading.Event | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.destination = destination
        self.stop = stop or threading.Event()
        self._transport = transport
        self._lock = threading.Lock()
        self._http: httpx.Client | None = None

    @property
    def http(self) -> httpx.Client:
        """The configured client; raises ``ClientSetupError``."""
        with self._lock:
            if self._http is None:
                self._http = http_client(self.destination, transport=self._transport)
            return self._http

    def close(self) -> None:
        with self._lock:
            if self._http is not None:
                self._http.close()

    def store(self, parts: Sequence[Part], progress: Callable[[], None] | None = None) -> Answer:
        """Send ``parts`` in one request; retry short transport blips in-process.

        An OAuth2 token the archive refuses (401) is fetched again once, and the request
        made again with a fresh body.  Raises ``FileVanished`` (before sending),
        ``DestinationBusy`` or ``DestinationHeld``.
        """
        try:
            return self._store(parts, progress, may_refresh=True)
        except _TokenRejected as rejected:
            rejected.auth.invalidate(rejected.authorization)
            log.info(
                "destination %s: the archive refused the access token (HTTP 401); "
                "fetching a new one",
                self.destination.name,
            )
            return self._store(parts, progress, may_refresh=False)

    def _store(
        self, parts: Sequence[Part], progress: Callable[[], None] | None, *, may_refresh: bool
    ) -> Answer:
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_Blip),
            stop=tenacity.stop_after_attempt(IN_PROCESS_ATTEMPTS),
            wait=tenacity.wait_exponential(multiplier=1, max=8),
            sleep=self._sleep,
            reraise=True,
        )
        dropped: list[_Blip] = []  # attempts whose connection the archive dropped

        def attempt() -> Answer:
            try:
                return self._attempt(parts, progress, may_refresh)
            except _Blip as blip:
                if isinstance(blip.failure, ConnectionDropped):
                    dropped.append(blip)
                raise

        try:
            return retrying(attempt)
        except _Blip as blip:
            # A drop among the attempts is what the worker must hear of (it may be a file),
            # even when the archive then refused the connection (it was restarting).
            last = dropped[-1] if dropped else blip
            raise last.failure from last.__cause__

    def _sleep(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise DestinationBusy("stopping: stowd is shutting down")

    def _attempt(
        self, parts: Sequence[Part], progress: Callable[[], None] | None, may_refresh: bool = False
    ) -> Answer:
        body = Body(parts, progress)
        body.open()
        started = time.monotonic()
        try:
            response, content = self._post(body)
        finally:
            body.close()
        auth = self.http.auth
        if response.status_code == 401 and may_refresh and isinstance(auth, OAuth2):
            raise _TokenRejected(auth, response.request.headers.get("Authorization"))
        answer = _answer_of(response, content, self.destination)
        answer.seconds = time.monotonic() - started
        return answer

    def _post(self, body: Body) -> tuple[httpx.Response, bytes]:
        """The archive's answer and its body, read within ``STOW_ANSWER_LIMIT`` and a
        deadline (twice the read timeout) counted from the end of the request body."""
        headers = {"Content-Type": body.content_type, "Content-Length": str(body.length)}
        url = self.destination.stow_url
        seconds = answers.answer_seconds(self.destination.timeouts.read)
        try:
            request = self.http.build_request("POST", url, content=iter(body), headers=headers)
            with answers.within(seconds, lambda: body.sent_at, "the archive"):
                response = _send(self.http, request, body, self._has_cert)
                content = answers.read_body(
                    response,
                    limit=answers.STOW_ANSWER_LIMIT,
                    seconds=seconds,
                    started=body.sent_at or time.monotonic(),
                    who="the archive",
                )
        except _REACHING as exc:
            raise _failure(exc, self._has_cert) from exc
        return response, content

    @property
    def _has_cert(self) -> bool:
        return self.destination.access.tls.client_cert is not None


def _send(http: httpx.Client, request: httpx.Request, body: Body, has_cert: bool) -> httpx.Response:
    """Send ``request``; a ``_Blip`` carrying ``ConnectionDropped`` when the archive closes
    the connection without a word after the whole body was sent (not a TLS alert about our
    certificate, which TLS 1.3 sends then: ``_failure`` holds the destination for it)."""
    try:
        return http.send(request, stream=True)
    except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
        if body.sent_at is None or tls_problem(exc, has_cert=has_cert, connecting=False):
            raise
        dropped = ConnectionDropped(
            f"connection failed: {_plain(exc)} (the archive closed the connection without "
            "answering, after the request was sent)"
        )
        raise _Blip(dropped) from exc


# what may go wrong while a request is sent and its answer read: mapped by ``_failure``
_REACHING = (
    ClientSetupError,
    SecretUnavailable,
    TokenError,
    UnusableAnswer,
    httpx.TransportError,
)


class _Blip(Exception):
    """A transport failure worth a quick in-process retry; carries the failure to raise."""

    def __init__(self, failure: StowFailure) -> None:
        super().__init__(str(failure))
        self.failure = failure


class _TokenRejected(Exception):
    """The archive answered 401 to an OAuth2 token: fetch a new one and try once more."""

    def __init__(self, auth: OAuth2, authorization: str | None) -> None:
        super().__init__("the archive refused the access token")
        self.auth = auth
        self.authorization = authorization


def qido_get(
    client: httpx.Client, destination: Destination, url: str, params: Sequence[tuple[str, str]]
) -> tuple[int, bytes]:
    """A QIDO-RS GET (``lookup.py``): the status and body, or the ``StowFailure`` of not
    reaching ``destination`` (the same words as for STOW).  A query waits for its answer
    at most ``QIDO_READ_TIMEOUT`` (files are read one at a time meanwhile)."""
    headers = {"Accept": QIDO_ACCEPT}
    t = destination.timeouts
    read = min(t.read, QIDO_READ_TIMEOUT)
    timeout = httpx.Timeout(connect=t.connect, read=read, write=read, pool=t.pool)
    seconds = answers.answer_seconds(read)
    started = time.monotonic()
    try:
        request = client.build_request(
            "GET", url, params=list(params), headers=headers, timeout=timeout
        )
        with answers.within(seconds, lambda: started, "the archive"):
            response = client.send(request, stream=True)
            content = answers.read_body(
                response,
                limit=answers.QIDO_ANSWER_LIMIT,
                seconds=seconds,
                started=started,
                who="the archive",
            )
    except _REACHING as exc:
        raise failure_of(exc, destination) from exc
    return response.status_code, content


def failure_of(exc: Exception, destination: Destination) -> StowFailure:
    """What a failure to reach ``destination`` means, for callers other than ``store`` (such
    as ``check-config --connect``): ``DestinationHeld`` or ``DestinationBusy``, with the same
    plain message.  For ``ClientSetupError``, ``SecretUnavailable``, ``TokenError``,
    ``UnusableAnswer`` and ``httpx.TransportError``; anything else is returned as a
    ``StowFailure`` of its text."""
    has_cert = destination.access.tls.client_cert is not None
    found = _failure(exc, has_cert)
    if isinstance(found, _Blip):
        return found.failure
    return found if isinstance(found, StowFailure) else StowFailure(_plain(exc))


def _failure(exc: Exception, has_cert: bool) -> Exception:
    if isinstance(exc, ClientSetupError):
        return DestinationHeld(str(exc))
    if isinstance(exc, UnusableAnswer):
        return _answer_failure(exc)
    if isinstance(exc, SecretUnavailable):
        return DestinationHeld(f"cannot log in: {exc}")
    if isinstance(exc, TokenError):
        return _token_failure(exc, has_cert)
    if isinstance(exc, httpx.TransportError):
        return _transport_failure(exc, has_cert)
    return exc


def _answer_failure(exc: UnusableAnswer) -> StowFailure:
    """An answer still arriving at its deadline: try later (no quick retry, it held a worker
    long enough); one too large or undecodable: hold, the same answer again would not help."""
    if isinstance(exc, AnswerTooSlow):
        return DestinationBusy(str(exc))
    return DestinationHeld(str(exc))


def _transport_failure(exc: httpx.TransportError, has_cert: bool) -> Exception:
    """Our exception (or a ``_Blip`` carrying it) for a failure to reach the archive."""
    tls = tls_problem(exc, has_cert=has_cert, connecting=isinstance(exc, httpx.ConnectError))
    if tls is not None:
        return DestinationHeld(f"TLS failure: {tls}")
    if isinstance(exc, httpx.ConnectError):
        return _Blip(DestinationBusy(f"cannot connect: {_plain(exc)}"))
    if isinstance(exc, httpx.TimeoutException):
        return _Blip(DestinationBusy(f"timed out ({type(exc).__name__})"))
    return _Blip(DestinationBusy(f"connection failed: {_plain(exc)}"))


def _token_failure(exc: TokenError, has_cert: bool) -> Exception:
    """The token endpoint's trouble: refused -> held; unreachable or 5xx -> busy."""
    if isinstance(exc, TokenRefused):
        return DestinationHeld(str(exc), status=exc.status)
    cause = exc.__cause__
    if isinstance(cause, httpx.TransportError):
        connecting = isinstance(cause, httpx.ConnectError)
        tls = tls_problem(
            cause, has_cert=has_cert, connecting=connecting, who="the token endpoint"
        )
        if tls is not None:
            return DestinationHeld(f"TLS failure at the token endpoint: {tls}")
        return _Blip(DestinationBusy(str(exc)))
    # no status: a login outage is never taken for "the archive answered 500 to these files"
    return DestinationBusy(str(exc), retry_after=retry_after(exc.retry_after))


def _answer_of(
    response: httpx.Response, content: bytes, destination: Destination | None = None
) -> Answer:
    status = response.status_code
    warning = response.headers.get("Warning")
    if status in HELD_STATUSES or 300 <= status < 400:  # httpx does not follow redirects
        location = response.headers.get("Location")
        text = _held_text(status, location, destination)
        raise DestinationHeld(text, status=status, server_message=warning)
    if status in BUSY_STATUSES or status >= 500:
        raise DestinationBusy(
            f"the archive is busy or unavailable (HTTP {status})",
            status=status,
            retry_after=retry_after(response.headers.get("Retry-After")),
            server_message=warning or _short(content) or None,
        )
    answer = parse_answer(status, content)
    if status in (200, 202) and not answer.is_stow:
        # A login page or a web server in front of the archive, not the archive: were the
        # files judged "not listed" they would fail after retry.max_age, file by file.
        raise DestinationHeld(
            _not_stow_text(status, response.headers.get("Content-Type", ""), content),
            status=status,
            server_message=warning,
        )
    if warning:
        answer.server_message = warning
    if status == 400 and _wants_client_cert(answer.server_message):
        raise DestinationHeld(
            "the archive's TLS proxy wants a client certificate and refused the request "
            "(HTTP 400): set tls.client_cert and tls.client_key, or check that the archive "
            "trusts ours",
            status=status,
            server_message=answer.server_message,
        )
    if 400 <= status < 500 and status != 413 and not answer.is_stow:
        # Not the archive judging our files: a proxy, a TLS port, a wrong endpoint.
        raise DestinationHeld(
            f"HTTP {status} with an answer that is not a STOW-RS response "
            f"({answer.server_message or 'empty'}): check the url, a proxy or port is in the way",
            status=status,
            server_message=answer.server_message,
        )
    return answer


def _not_stow_text(status: int, content_type: str, content: bytes) -> str:
    """What a success answer that is not a STOW-RS answer looked like, and what to check."""
    body = content.strip()
    kind = content_type.split(";", maxsplit=1)[0].strip().lower()
    if not body:
        what = "an empty body"
    elif kind in ("text/html", "application/xhtml+xml") or _looks_like_html(body):
        what = "an HTML page"
    else:
        what = "JSON" if "json" in kind else "text"
    quoted = f" ({_quote(body)})" if body else ""
    return (
        f"the archive answered HTTP {status} with {what}, not a STOW-RS answer{quoted}: is "
        "the url the DICOMweb base, or is a login page or another web server in front of it?"
    )


def _looks_like_html(body: bytes) -> bool:
    head = body[:200].lower()
    return head.startswith((b"<!doctype html", b"<html")) or b"<html" in head


def _quote(body: bytes, limit: int = QUOTE_LIMIT) -> str:
    """The start of an answer body, on one line, control characters escaped."""
    text = " ".join(body[: limit * 4].decode("utf-8", errors="replace").split())
    return f'"{escape(text[:limit])}{"…" if len(text) > limit else ""}"'


def _wants_client_cert(message: str | None) -> bool:
    """nginx's 400 pages for a missing or refused client certificate."""
    text = (message or "").lower()
    return "no required ssl certificate was sent" in text or "the ssl certificate error" in text


def _held_text(
    status: int, location: str | None = None, destination: Destination | None = None
) -> str:
    if 300 <= status < 400:
        target = f" to {location}" if location else ""
        return f"the archive redirects the STOW-RS URL{target} (HTTP {status}): check the url"
    if status == 401:
        return _login_refused(destination)
    texts = {
        403: "the archive refuses our credentials (HTTP 403 forbidden)",
        404: "the STOW-RS URL was not found (HTTP 404): check the destination url",
        405: "the URL does not accept STOW-RS (HTTP 405): check the destination url",
        407: "the proxy wants credentials (HTTP 407)",
        415: "the archive does not accept this request's media type (HTTP 415)",
    }
    return texts[status]


def _login_refused(destination: Destination | None) -> str:
    auth = None if destination is None else destination.access.auth
    if auth is None:
        return "the archive wants valid credentials (HTTP 401): set auth for this destination"
    hints = {
        "basic": f"check auth.username ({auth.username}) and auth.password",
        "bearer": "check auth.token",
        "oauth2": "even a newly fetched token was refused: check the client's roles, scope "
        "or audience at the token endpoint",
        "google": "even a newly fetched token was refused: check the service account's roles "
        "on this DICOM store and auth.scope",
        "aws": "check auth.region and the credentials",
    }
    return f"the archive refused the login (HTTP 401): {hints[auth.type]}"


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# -- TLS failures in plain words -----------------------------------------------------------------
_UNTRUSTED = (18, 19, 20, 21, 2)  # OpenSSL verify codes: self-signed, unknown issuer ...
_HOST_MISMATCH = (62, 64)  # hostname, IP address
_CLIENT_CERT_REFUSED = (
    "ALERT_BAD_CERTIFICATE",
    "ALERT_UNKNOWN_CA",
    "ALERT_CERTIFICATE_UNKNOWN",
    "ALERT_CERTIFICATE_EXPIRED",
    "ALERT_CERTIFICATE_REVOKED",
    "ALERT_UNSUPPORTED_CERTIFICATE",
    "ALERT_ACCESS_DENIED",
)
_NOT_TLS = ("WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST", "RECORD_LAYER")
_NO_VERSION = ("PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL", "NO_PROTOCOLS_AVAILABLE")


def tls_problem(
    exc: BaseException, *, has_cert: bool, connecting: bool = True, who: str = "the archive"
) -> str | None:
    """Plain words for a TLS failure behind ``exc``; None when it is not one.

    While connecting every SSL error counts; later (TLS 1.3 sends the client-certificate
    verdict after the handshake) only the server's alerts about our certificate do, and
    other errors stay transport trouble.
    """
    found = _ssl_error(exc)
    text = " ".join(_plain(e) for e in _chain(exc))
    upper = text.upper()
    if "CERTIFICATE_REQUIRED" in upper:
        return f"{who} requires a client certificate: set tls.client_cert and tls.client_key"
    if any(alert in upper for alert in _CLIENT_CERT_REFUSED):
        if not has_cert:
            return f"{who} wants a client certificate: set tls.client_cert and tls.client_key"
        return (
            f"{who} refused our client certificate (tls.client_cert): is it signed by a CA "
            f"{who} trusts, and still valid? ({_detail(found, text)})"
        )
    if not connecting:
        return None
    if found is None and "CERTIFICATE_VERIFY_FAILED" not in upper and "SSL" not in upper:
        return None
    return _handshake_problem(found, upper, has_cert, who) + f" ({_detail(found, text)})"


def _handshake_problem(found: ssl.SSLError | None, upper: str, has_cert: bool, who: str) -> str:
    code = found.verify_code if isinstance(found, ssl.SSLCertVerificationError) else None
    cert_hint = (
        "our client certificate refused, or no common cipher?"
        if has_cert
        else "does it want a client certificate? set tls.client_cert and tls.client_key"
    )
    cases = (
        (
            code in _UNTRUSTED or (code is None and _untrusted_text(upper)),
            f"{who}'s certificate is not signed by a trusted CA (set tls.ca_file?)",
        ),
        (
            code in _HOST_MISMATCH or "MISMATCH" in upper,
            f"{who}'s certificate is made out to another host name than the one in the url",
        ),
        (code == 10 or "HAS EXPIRED" in upper, f"{who}'s certificate has expired"),
        (
            code == 9 or "NOT YET VALID" in upper,
            f"{who}'s certificate is not valid yet (check the clocks)",
        ),
        (
            any(marker in upper for marker in _NOT_TLS),
            f"{who} does not speak TLS on this port (is the url https:// by mistake?)",
        ),
        (
            any(marker in upper for marker in _NO_VERSION),
            f"{who} and stowd share no TLS version (see tls.min_version)",
        ),
        ("HANDSHAKE_FAILURE" in upper, f"{who} ended the TLS handshake ({cert_hint})"),
    )
    return next((text for hit, text in cases if hit), "the TLS handshake failed")


def _untrusted_text(upper: str) -> bool:
    return any(
        marker in upper
        for marker in ("SELF-SIGNED", "SELF SIGNED", "LOCAL ISSUER", "UNABLE TO GET ISSUER")
    )


def _detail(found: ssl.SSLError | None, text: str) -> str:
    if isinstance(found, ssl.SSLCertVerificationError) and found.verify_message:
        return f"OpenSSL: {found.verify_message}"
    if found is not None and found.reason:
        return f"OpenSSL: {found.reason}"
    return text[:200]


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def _ssl_error(exc: BaseException) -> ssl.SSLError | None:
    return next((e for e in _chain(exc) if isinstance(e, ssl.SSLError)), None)


def _plain(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
