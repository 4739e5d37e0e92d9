"""Verifying what an archive said it stored (``verify: true`` of a destination, ``stowd
migrate --verify``): before a file the STOW-RS answer calls stored moves to ``sent/``, the
archive's QIDO-RS must list its instance.

One query per study of a batch (``{url}/studies/{StudyInstanceUID}/instances``, or
``{url}/instances`` for an instance whose study is not known), asking for the batch's
SOPInstanceUIDs by UID list matching (PS3.18 8.3.4.1: "a list of UIDs separated by commas",
``SOPInstanceUID=uid1,uid2``) and for nothing but ``includefield=00080018`` back; at most
``VERIFY_UIDS`` UIDs per query, so that the URL stays short.  An archive that ignores the
filter and lists the whole study is read page by page (``limit``/``offset``, PS3.18 8.3.4.4),
keeping only the UIDs asked for, for at most ``MAX_PAGES`` pages; each answer is read by
``answers.read_body`` (size cap, deadline) through ``client.qido_get``.

What the worker makes of it (``worker.py``): a listed instance is sent; one not listed is
sent again (an archive that answers stored but keeps not listing it: after ``MAX_UNLISTED``
such answers the file fails, with the reason); an archive that cannot be asked
(``VerifyUnavailable``) holds the destination, and the files wait in the queue.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import quote

import httpx

from stowd.config.model import Destination
from stowd.config.yamlwalk import redact_url
from stowd.dicomweb import client
from stowd.errors import ClientSetupError, StowFailure, VerifyUnavailable
from stowd.pipeline.lookup import status_words

SOP_INSTANCE_UID = "00080018"
VERIFY_UIDS = 50  # SOPInstanceUIDs per query: 50 UIDs of up to 64 characters, ~3.3 KB of URL
PAGE = 1000  # instances per page asked for (limit), for an archive that lists more than asked
MAX_PAGES = 20  # pages read per query at most; an archive listing more cannot be verified
MAX_UNLISTED = 3  # answers "stored" for a file the archive then does not list: it fails
UNLISTED = "unlisted"  # the key of the error document that counts them
# JSON values parsed from one answer at most: ~70 bytes each as Python objects (35 MB); a
# page of PAGE instances with 20 attributes each has about 100,000
MAX_VALUES = 500_000


class Tally:
    """How many stored files were verified (listed) and how many were not listed, for
    ``stowd migrate``'s summary; thread-safe (the workers share one)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.listed = 0
        self.unlisted = 0

    def add(self, listed: int, unlisted: int) -> None:
        with self._lock:
            self.listed += listed
            self.unlisted += unlisted


def unlisted(
    http: httpx.Client,
    destination: Destination,
    instances: Iterable[tuple[str, str]],
    progress: Callable[[], None] | None = None,
) -> set[str]:
    """The SOPInstanceUIDs of ``instances`` ((StudyInstanceUID, SOPInstanceUID); an empty
    study: not known) that the archive does not list; ``progress`` is called after each
    answer.  Raises ``VerifyUnavailable``."""
    by_study: dict[str, set[str]] = {}
    for study, sop in instances:
        by_study.setdefault(study, set()).add(sop)
    missing: set[str] = set()
    for study, sops in by_study.items():
        for chunk in _chunks(sorted(sops), VERIFY_UIDS):
            missing |= set(chunk) - _listed(http, destination, study, chunk, progress)
    return missing


def query_url(destination: Destination, study: str) -> str:
    """The study's instances query; the UID is escaped, since a file's UID may hold any
    character ('#', '?' or '/' would otherwise make the URL ask for something else)."""
    base = destination.url.rstrip("/")
    return f"{base}/studies/{quote(study, safe='')}/instances" if study else f"{base}/instances"


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _listed(
    http: httpx.Client,
    destination: Destination,
    study: str,
    sops: Sequence[str],
    progress: Callable[[], None] | None,
) -> set[str]:
    """Which of ``sops`` the archive lists in ``study``."""
    wanted, found = set(sops), set()
    url = query_url(destination, study)
    for page in range(MAX_PAGES):
        params = [
            ("SOPInstanceUID", ",".join(sops)),
            ("includefield", SOP_INSTANCE_UID),
            ("limit", str(PAGE)),
            ("offset", str(page * PAGE)),
        ]
        uids = _page(http, destination, url, params)
        if progress is not None:
            progress()
        found |= wanted.intersection(uids)
        if len(uids) < PAGE or found == wanted:
            return found
    raise VerifyUnavailable(
        f"the query {redact_url(url)} lists more than {MAX_PAGES * PAGE} instances without "
        "all of those asked for: the archive seems not to match SOPInstanceUID lists"
    )


def _page(
    http: httpx.Client, destination: Destination, url: str, params: list[tuple[str, str]]
) -> list[str]:
    """The SOPInstanceUIDs of one answer, in its order."""
    shown = redact_url(url)
    try:
        status, body = client.qido_get(http, destination, url, params)
    except (StowFailure, ClientSetupError) as exc:
        raise VerifyUnavailable(f"the query {shown} failed: {exc}") from exc
    if status == 204:  # no match (PS3.18 8.3.4.4 Query Response: 204 No Content)
        return []
    if status == 404:  # tiny_pacs 0.4.1 answers so: it has no query for a study's instances
        raise VerifyUnavailable(
            f"the query {shown} failed: the archive answered HTTP 404: it may not offer "
            "QIDO-RS queries for a study's instances at this URL, which verify: true needs"
        )
    if status != 200:
        raise VerifyUnavailable(f"the query {shown} failed: {status_words(status, body)}")
    return _uids(body, shown)


def _uids(body: bytes, shown: str) -> list[str]:
    """The SOPInstanceUID of each object of a DICOM JSON answer (PS3.18 F.2)."""
    if body.count(b",") + body.count(b":") > MAX_VALUES:  # each value but the first follows one
        raise VerifyUnavailable(
            f"the answer of the query {shown} holds more than {MAX_VALUES:,} JSON values; "
            "stowd does not parse it (it would take hundreds of MB): check the archive or a "
            "proxy in between"
        )
    try:
        doc = json.loads(body) if body.strip() else []
    except (ValueError, RecursionError):
        raise VerifyUnavailable(f"the answer of the query {shown} is not JSON") from None
    if not isinstance(doc, list) or not all(isinstance(d, dict) for d in doc):
        raise VerifyUnavailable(
            f"the answer of the query {shown} is not a list of DICOM JSON objects"
        )
    return [uid for uid in map(_uid, doc) if uid is not None]


def _uid(item: dict[str, Any]) -> str | None:
    element = item.get(SOP_INSTANCE_UID)
    values = element.get("Value") if isinstance(element, dict) else None
    if isinstance(values, list) and values and isinstance(values[0], str):
        return values[0]
    return None


def unlisted_count(error: str | None) -> int:
    """How many times the archive answered stored for a file and then did not list it, so
    far (kept in its error document while it waits)."""
    try:
        count = json.loads(error or "{}").get(UNLISTED, 0)
    except (ValueError, AttributeError):
        return 0
    return count if isinstance(count, int) else 0
