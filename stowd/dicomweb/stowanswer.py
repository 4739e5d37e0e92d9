"""STOW-RS answers: read (DICOM JSON or XML), and judged file by file.

``answer_of`` turns the archive's HTTP answer into an ``Answer`` or raises what it means for
the whole request, following the retry table (``docs/retries.md``):

* 408/429/502/503/504 and other 5xx          -> ``DestinationBusy`` (Retry-After honoured)
* 401/403/404/405/407/415, redirects         -> ``DestinationHeld`` (files stay queued)
* a 4xx, 200 or 202 whose body is not a STOW-RS answer (empty, an HTML login page, other
  text)                                       -> ``DestinationHeld``

``judge`` then gives one ``Verdict`` per sent SOPInstanceUID from the answer's lists and their
FailureReason and WarningReason codes (whose meanings and sources are kept here).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any
from urllib.parse import urlsplit

import httpx

from stowd.config.model import DEFAULT_DUPLICATES, Destination
from stowd.config.yamlwalk import redact_url
from stowd.dicomweb.httperrors import retry_after
from stowd.dicomweb.stowbody import Part
from stowd.errors import DestinationBusy, DestinationHeld
from stowd.printable import escape

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
# Healthcare API to the same UIDs with other content (docs/archives.md).  So it is never
# taken for "already stored"; it may be transient, and is retried at most retry.max_refusals
# times (docs/retries.md).  Orthanc (observed, docs/archives.md) and dcm4chee-arc (by
# default; StoreServiceEJB) answer a re-sent instance as stored: nothing to tell apart.
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
class StowOutcome(Enum):
    SENT = "sent"
    ALREADY = "already stored"  # the archive holds an instance by these UIDs (not compared)
    FAILED = "failed"
    RETRY = "retry"
    ISOLATE = "isolate"


@dataclass(frozen=True)
class Verdict:
    """What to do with one file after a request, and why."""

    outcome: StowOutcome
    reason: str = ""
    code: int | None = None


def judge(
    answer: Answer,
    parts: Sequence[Part],
    *,
    duplicates: str = DEFAULT_DUPLICATES,
    resent: Collection[str] = (),
) -> dict[str, Verdict]:
    """One verdict per SOPInstanceUID sent, following the retry table; ``duplicates``
    (``accept`` or ``fail``): what an instance the archive already holds becomes, except
    for the UIDs in ``resent``: stowd's own re-sends of a file whose earlier answer was
    lost, which the archive may hold from that very request (always accepted)."""
    single = len(parts) == 1
    _name_foreign(answer, {p.sop_uid for p in parts})
    return {
        p.sop_uid: _judge_one(
            answer, p.sop_uid, single, "accept" if p.sop_uid in resent else duplicates
        )
        for p in parts
    }


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
        return Verdict(StowOutcome.SENT, note, warning)
    if sop in answer.failed:
        code, text = answer.failed[sop], answer.failed_text.get(sop)
        if code == ALREADY_STORED:
            return _judge_already(status, duplicates)
        return _judge_failed(status, code, text or _said_of_one(answer))
    return _judge_unlisted(answer, single)


def _said_of_one(answer: Answer) -> str | None:
    """The answer's words outside its items (a Warning header, an error text) when it
    refuses one instance only: they are about that one.  dcm4chee-arc's Warning holds the
    message of the last instance it refused (StowRS.setWarning), so with several refused
    it is no file's own reason (it stays in the file's ``server_message``)."""
    return answer.server_message if len(answer.failed) == 1 else None


def _judge_already(status: int, duplicates: str) -> Verdict:
    """The archive already holds an instance with this file's UIDs (Azure's 45070)."""
    said = f"failure reason {ALREADY_STORED:04X} ({ALREADY_STORED}), HTTP {status}"
    if duplicates == "fail":
        return Verdict(
            StowOutcome.FAILED,
            f"the archive already holds an instance with this file's study, series and "
            f"SOP instance UIDs ({said}) and this destination has duplicates: fail; the "
            "file was not stored again (check whether the archive's copy is the right one)",
            ALREADY_STORED,
        )
    return Verdict(
        StowOutcome.ALREADY,
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
            StowOutcome.ISOLATE,
            f"the archive answered HTTP {status} and refused a file of this request without "
            "naming it: sending the files it did not list one by one",
        )
    if status in (200, 202):
        return Verdict(
            StowOutcome.RETRY,
            f"the archive answered HTTP {status} but did not list this instance as stored",
        )
    if not single:
        return Verdict(StowOutcome.ISOLATE, f"HTTP {status} for a batch: sending files one by one")
    if status >= 500:
        return Verdict(StowOutcome.RETRY, f"the archive answered HTTP {status} (server error)")
    if unnamed is not None:
        reason = f"failure reason {unnamed:04X} ({failure_meaning(unnamed)})"
        return Verdict(StowOutcome.FAILED, f"{_refusal(status)}: {reason}", unnamed)
    return Verdict(StowOutcome.FAILED, _refusal(status))


def _judge_failed(status: int, code: int, said: str | None = None) -> Verdict:
    text = f"the archive refused the instance: failure reason {code:04X} ({failure_meaning(code)})"
    words = f' and said "{escape(_bounded(said))}"' if said else ""
    outcome = StowOutcome.RETRY if is_transient(code) else StowOutcome.FAILED
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


def answer_of(
    response: httpx.Response, content: bytes, destination: Destination | None = None
) -> Answer:
    """The ``Answer`` of the archive's response (its body ``content``), or the
    ``DestinationHeld`` or ``DestinationBusy`` it means for the whole request."""
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


def is_server_root(url: str) -> bool:
    """The url has no path: a server's root (such as Orthanc's REST API), not a DICOMweb
    base, which always has one (/dicom-web, /dcm4chee-arc/aets/DCM4CHEE/rs, ...)."""
    return urlsplit(url).path.strip("/") == ""


def server_root_hint(url: str) -> str:
    """What the url should be, for a url that is a server's root."""
    base = redact_url(url).rstrip("/")
    return (
        f"the url should be the DICOMweb base, for Orthanc {base}/dicom-web (its REST API "
        "answers at the root)"
    )


def _held_text(
    status: int, location: str | None = None, destination: Destination | None = None
) -> str:
    if 300 <= status < 400:
        target = f" to {location}" if location else ""
        return f"the archive redirects the STOW-RS URL{target} (HTTP {status}): check the url"
    if status == 401:
        return _login_refused(destination)
    if status == 405 and destination is not None and is_server_root(destination.url):
        return (
            "the url is the web server's root, which does not accept STOW-RS (HTTP 405), not "
            f"a DICOMweb base: {server_root_hint(destination.url)}"
        )
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
