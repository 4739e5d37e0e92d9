"""A rule's ``lookup``: find the study or worklist item a file belongs to in the archive.

The query (``rules.Wanted``, rendered after the rules) goes to the file's destination with
its login, TLS and headers: ``GET {url}/studies?AccessionNumber=...`` (QIDO-RS), or for a
worklist a QIDO-style ``GET {url}/mwlitems?...`` (dcm4chee-arc; another URL may be set).
Only exact matches count: archives such as Orthanc match case-insensitively, so every
answer is checked against the query again here.

* one match: its Patient and Study attributes (``values``) win over the file's and the rules'
* none: ``LookupNoMatchYet`` until ``wait`` after the file was queued, then ``FileProblem``
* several: ``FileProblem`` listing each candidate (stowd never guesses)
* the archive not reached, or an error status: ``LookupUnavailable`` (the file waits)

Answers are cached in the queue per destination and query for ``cache`` seconds (a folder of
500 photos makes one query), and the chosen entry is recorded with each file (``Found.record``)
so a restart or a retry never asks again for the same query.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

import httpx

from stowd import dicomlib
from stowd.config.model import Config, Destination
from stowd.config.yamlwalk import redact_url
from stowd.dicomweb.client import http_client, qido_get
from stowd.errors import (
    ClientSetupError,
    FileProblem,
    LookupNoMatchYet,
    LookupUnavailable,
    StowFailure,
)
from stowd.pipeline.queue import Job, Queue
from stowd.rules import vr
from stowd.rules.engine import Wanted
from stowd.rules.vr import Item, Value

log = logging.getLogger("stowd.lookup")

PATIENT = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex")
STUDY = (
    "StudyInstanceUID",
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "StudyDescription",
)
# Asked of a worklist (includefield); what the instance gets is made by ``_scheduled``.
WORKLIST = (
    *PATIENT,
    "StudyInstanceUID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "RequestedProcedureID",
    "RequestedProcedureDescription",
    "RequestedProcedureCodeSequence",
    "ScheduledProcedureStepSequence",
)
STEP = (  # the items of ScheduledProcedureStepSequence that are copied
    "ScheduledProcedureStepID",
    "ScheduledProcedureStepDescription",
    "ScheduledProtocolCodeSequence",
)
IN_STEP = (  # worklist query keys asked inside ScheduledProcedureStepSequence
    "ScheduledProcedureStepID",
    "ScheduledProcedureStepStartDate",
    "ScheduledStationAETitle",
    "Modality",
)
SHOWN = ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "StudyDescription")
FAILURE_MEMORY = 15.0  # seconds a failed query is not repeated for other files
MAX_SHOWN = 10  # candidates listed in a reason


@dataclass(frozen=True)
class Found:
    """The archive entry a file joins: the values it gets, and what is recorded for it."""

    values: Item
    record: str  # JSON: the key asked and the entry, stored with the file


class Finder:
    """Asks the archives; one HTTP client per destination, made when first needed."""

    def __init__(
        self, config: Config, queue: Queue, *, clock: Callable[[], float] | None = None
    ) -> None:
        self.config = config
        self.queue = queue
        self.clock = clock or queue.clock  # the queue's: the clock of the times it keeps
        self._clients: dict[str, httpx.Client] = {}
        self._failed: dict[str, tuple[float, str]] = {}  # archive URL -> (when, reason)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()

    def find(self, job: Job, wanted: Wanted) -> Found:
        """The entry ``job``'s file joins; raise ``LookupNoMatchYet``, ``LookupUnavailable`` or
        ``FileProblem`` (several matches, or none after ``wait``)."""
        destination = self.config.destinations[job.destination]
        key = query_key(destination, wanted)
        recorded = _recorded(job, key)
        if recorded is not None:
            return Found(recorded, job.lookup or "")
        matches = self._answer(destination, wanted, key)
        return self._chosen(job, destination, wanted, key, matches)

    def _chosen(
        self, job: Job, destination: Destination, wanted: Wanted, key: str, matches: list[Item]
    ) -> Found:
        if len(matches) > 1:
            raise FileProblem(several(destination, wanted, matches))
        if not matches:
            raise self._none(job, destination, wanted)
        values = copied(wanted, matches[0])
        return Found(values, json.dumps({"key": key, "values": values}, ensure_ascii=False))

    def _none(self, job: Job, destination: Destination, wanted: Wanted) -> Exception:
        now = self.clock()
        since = job.queued_at or now
        until = since + wanted.lookup.wait
        what = f"no {_entry(wanted)} with {wanted.text()} in {destination.name}"
        if now >= until:
            return FileProblem(f"{what} (looked for {_span(now - since)}; {wanted.rule})")
        at = datetime.fromtimestamp(until).strftime("%Y-%m-%d %H:%M:%S")
        return LookupNoMatchYet(f"{what} yet; waiting until {at} ({wanted.rule})", until)

    def _answer(self, destination: Destination, wanted: Wanted, key: str) -> list[Item]:
        """The exact matches, from the cache or the archive."""
        now = self.clock()
        cached = self.queue.cached_lookup(destination.name, key, now - wanted.lookup.cache)
        if cached is not None:
            return list(json.loads(cached))
        # Trouble is remembered per archive URL, from when the answer (or the timeout) came:
        # a hung archive costs one read timeout per FAILURE_MEMORY, not one per file or key
        # while every new file waits behind it (files are read one at a time).
        where = json.dumps([destination.name, lookup_url(destination, wanted)])
        failed = self._failed.get(where)
        if failed is not None and now - failed[0] < FAILURE_MEMORY:
            raise LookupUnavailable(failed[1])
        try:
            matches = self._ask(destination, wanted)
        except LookupUnavailable as exc:
            self._failed[where] = (self.clock(), str(exc))
            raise
        self._failed.pop(where, None)
        self.queue.cache_lookup(destination.name, key, json.dumps(matches, ensure_ascii=False))
        return matches

    def _ask(self, destination: Destination, wanted: Wanted) -> list[Item]:
        url = lookup_url(destination, wanted)
        shown = redact_url(url)
        log.info("looking up %s: GET %s (%s)", _entry(wanted), shown, wanted.text())
        try:
            status, body = qido_get(self._client(destination), destination, url, params(wanted))
        except (StowFailure, ClientSetupError) as exc:
            raise LookupUnavailable(f"the lookup at {shown} failed: {exc}") from exc
        if status == 204:
            return []
        if status != 200:
            raise LookupUnavailable(f"the lookup at {shown} failed: {status_words(status, body)}")
        return exact(wanted, parse(body, shown))

    def _client(self, destination: Destination) -> httpx.Client:
        with self._lock:
            client = self._clients.get(destination.name)
            if client is None:
                client = http_client(destination)
                self._clients[destination.name] = client
            return client


def lookup_url(destination: Destination, wanted: Wanted) -> str:
    if wanted.lookup.within == "studies":
        return destination.url.rstrip("/") + "/studies"
    return wanted.lookup.url or destination.url.rstrip("/") + "/mwlitems"


def params(wanted: Wanted) -> list[tuple[str, str]]:
    """The query's matching keys and every attribute wanted back (includefield, repeated:
    Orthanc reads no comma-separated list)."""
    worklist = wanted.lookup.within == "worklist"
    out = [(_param(k, worklist), v) for k, v in wanted.query]
    fields = WORKLIST if worklist else PATIENT + STUDY
    return out + [("includefield", _tag(k)) for k in fields]


def _param(keyword: str, worklist: bool) -> str:
    return (
        f"ScheduledProcedureStepSequence.{keyword}" if worklist and keyword in IN_STEP else keyword
    )


def query_key(destination: Destination, wanted: Wanted) -> str:
    """What makes two lookups the same question (cache and recorded answers).  It is
    written to the queue, so a ``user:password@`` in the URL is left out (``***@``)."""
    url = redact_url(lookup_url(destination, wanted))
    return json.dumps([wanted.lookup.within, url, [list(q) for q in wanted.query]])


def _recorded(job: Job, key: str) -> Item | None:
    if job.lookup is None:
        return None
    record = json.loads(job.lookup)
    return dict(record["values"]) if record.get("key") == key else None


# --------------------------------------------------------------------------- the answer


def parse(body: bytes, where: str) -> list[Item]:
    """The DICOM JSON model (PS3.18 F.2) of a QIDO answer as items keyword -> value."""
    try:
        doc = json.loads(body) if body.strip() else []
    except ValueError as exc:
        raise LookupUnavailable(f"the answer of {where} is not JSON ({exc})") from None
    except RecursionError:  # legal JSON (RFC 8259 9), beyond Python's nesting limit
        raise LookupUnavailable(
            f"the answer of {where} is not JSON stowd can read (nested too deeply)"
        ) from None
    if not isinstance(doc, list) or not all(isinstance(d, dict) for d in doc):
        raise LookupUnavailable(f"the answer of {where} is not a list of DICOM JSON objects")
    return [_item(d) for d in doc]


def _item(doc: dict[str, Any]) -> Item:
    item: Item = {}
    for tag, element in doc.items():
        keyword = _keyword(tag)
        if keyword is not None and isinstance(element, dict):
            item[keyword] = _value(element)
    return item


def _keyword(tag: str) -> str | None:
    dicomlib.load()  # pydicom whole, one thread at a time
    from pydicom.datadict import keyword_for_tag  # noqa: PLC0415 - not at start (issue 19)

    try:
        return keyword_for_tag(int(tag, 16)) or None
    except ValueError:
        return None


def _value(element: dict[str, Any]) -> Value:
    values = element.get("Value")
    if not isinstance(values, list) or not values:
        return None
    if element.get("vr") == "SQ":
        return [_item(v) for v in values if isinstance(v, dict)]
    scalars = [_scalar(v) for v in values]
    if len(scalars) == 1:
        return scalars[0]
    return list[vr.Scalar | Item](scalars)


def _scalar(value: Any) -> str | int | float:
    if isinstance(value, dict):  # PN: Alphabetic=Ideographic=Phonetic
        groups = [str(value.get(g, "")) for g in ("Alphabetic", "Ideographic", "Phonetic")]
        return "=".join(groups).rstrip("=")
    if isinstance(value, bool) or value is None:
        return str(value or "")
    return value if isinstance(value, int | float) else str(value)


def exact(wanted: Wanted, items: list[Item]) -> list[Item]:
    """The items that match every key exactly (archives may match case-insensitively).

    An item that does not show a key asked is no match: an archive that does not support a
    key ignores it (PS3.18 only asks for a Warning header) and answers every entry, such as
    the same PatientID of another issuer.  When that leaves nothing, ``LookupUnavailable``
    says which key the archive did not answer (the file waits; it is not "no study").
    """
    matches = [item for item in items if all(_agrees(item, k, v) for k, v in wanted.query)]
    if items and not matches:
        unshown = [k for k, _ in wanted.query if all(_shown(i, k) is None for i in items)]
        if unshown:
            raise LookupUnavailable(
                f"the archive's answer does not show {', '.join(unshown)}, so stowd cannot "
                "check that an entry matches the query (does the archive support this key?)"
            )
    return matches


def _shown(item: Item, keyword: str) -> list[str] | None:
    found = [item.get(keyword)]
    steps = item.get("ScheduledProcedureStepSequence")
    if keyword in IN_STEP and isinstance(steps, list):
        found += [s.get(keyword) for s in steps if isinstance(s, dict)]
    given = [_text(v) for v in found if v is not None]
    return given or None


def _agrees(item: Item, keyword: str, value: str) -> bool:
    """Leading and trailing spaces are padding in DICOM strings (PS3.5 6.2), not part of
    the value: an archive answering ``"ACC1 "`` means ``ACC1``."""
    given = _shown(item, keyword)
    return given is not None and value.strip(" ") in (g.strip(" ") for g in given)


def _text(value: Value) -> str:
    if isinstance(value, list):
        return "\\".join(str(v) for v in value if not isinstance(v, dict))
    return "" if value is None else str(value)


def copied(wanted: Wanted, match: Item) -> Item:
    """What the new instance gets from the entry.  A patient or study attribute the archive
    left empty or did not return is empty (``""``): the file's or a rule's value (say the
    IssuerOfPatientID or birth date of the patient a scanner had wrongly) never stays with
    the archive's patient; nothing else is invented."""
    if wanted.lookup.within == "worklist":
        values = _scheduled(match)
    else:
        values = {k: match[k] if _given(match.get(k)) else "" for k in PATIENT + STUDY}
    if not _given(values["StudyInstanceUID"]):
        raise FileProblem(
            f"the {_entry(wanted)} the archive found for {wanted.text()} has no "
            "StudyInstanceUID, so stowd cannot tell which study the file joins "
            f"({wanted.rule})"
        )
    return _checked(values)


def _scheduled(item: Item) -> Item:
    """IHE Scheduled Workflow (RAD TF-2x A.1): patient, study and request attributes of a
    worklist item as they go into the images made for it."""
    keep = ("StudyInstanceUID", "AccessionNumber", "ReferringPhysicianName")
    values = {k: item[k] if _given(item.get(k)) else "" for k in (*PATIENT, *keep)}
    codes = item.get("RequestedProcedureCodeSequence")
    if _given(codes):
        values["ProcedureCodeSequence"] = codes
    values["RequestAttributesSequence"] = _requests(item)
    return values


def _requests(item: Item) -> list[vr.Scalar | Item]:
    """One Request Attributes item per scheduled step (one with no step when none is given)."""
    common = (
        "RequestedProcedureID",
        "RequestedProcedureDescription",
        "RequestedProcedureCodeSequence",
        "AccessionNumber",
        "StudyInstanceUID",
    )
    base = {k: item[k] for k in common if _given(item.get(k))}
    steps = item.get("ScheduledProcedureStepSequence")
    found = [s for s in steps if isinstance(s, dict)] if isinstance(steps, list) else []
    out: list[vr.Scalar | Item] = []
    for step in found or [{}]:
        out.append(base | {k: step[k] for k in STEP if _given(step.get(k))})
    return out


def _given(value: Value) -> bool:
    return value is not None and value not in ("", [])


def _checked(values: Item) -> Item:
    """The archive's values checked as the rules' are (a malformed one fails the file)."""
    try:
        return {k: vr.check(k, v) for k, v in values.items()}
    except ValueError as exc:
        raise FileProblem(f"the archive's answer holds a value stowd cannot copy: {exc}") from None


def _tag(keyword: str) -> str:
    dicomlib.load()  # pydicom whole, one thread at a time
    from pydicom.datadict import dictionary_VR, tag_for_keyword  # noqa: PLC0415 - as _keyword

    tag = tag_for_keyword(keyword)
    assert tag is not None and dictionary_VR(tag)
    return f"{tag:08X}"


# --------------------------------------------------------------------------- words


def _entry(wanted: Wanted) -> str:
    return "study" if wanted.lookup.within == "studies" else "worklist item"


def describe_query(destination: Destination, wanted: Wanted) -> str:
    """The query a file would make, for ``stowd explain`` (nothing is asked)."""
    worklist = wanted.lookup.within == "worklist"
    query = urlencode([(_param(k, worklist), v) for k, v in wanted.query])
    url = redact_url(lookup_url(destination, wanted))
    return (
        f"GET {url}?{query} ({wanted.rule}): one {_entry(wanted)} -> its patient and study "
        f"attributes replace the file's; none -> waits up to {_span(wanted.lookup.wait)}, "
        "then failed/; several -> failed/"
    )


def _entries(wanted: Wanted) -> str:
    return "studies" if wanted.lookup.within == "studies" else "worklist items"


def several(destination: Destination, wanted: Wanted, matches: Sequence[Item]) -> str:
    lines = [_candidate(m) for m in matches[:MAX_SHOWN]]
    more = f"; and {len(matches) - MAX_SHOWN} more" if len(matches) > MAX_SHOWN else ""
    return (
        f"{len(matches)} {_entries(wanted)} with {wanted.text()} in {destination.name}, and "
        f"stowd never guesses which one a file belongs to: {'; '.join(lines)}{more} "
        f"({wanted.rule}); correct the archive or the query, then drop the file again"
    )


def _candidate(item: Item) -> str:
    return ", ".join(f"{k} {_text(item.get(k)) or '(none)'}" for k in SHOWN)


def status_words(status: int, body: bytes) -> str:
    words = {
        401: "the archive refused the login (HTTP 401)",
        403: "the archive refused access (HTTP 403)",
        404: "no such service at this URL (HTTP 404): is it the archive's DICOMweb root, "
        "or for a worklist its /mwlitems URL?",
    }
    text = words.get(status, f"the archive answered HTTP {status}")
    detail = body[:200].decode(errors="replace").strip()
    return f"{text}: {detail}" if detail and status not in words else text


def _span(seconds: float) -> str:
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.0f} h"
    if seconds >= 120:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"
