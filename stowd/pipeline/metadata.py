"""The rules stage between classify and stow: what the rules and sidecars change in a file.

``plan_file`` runs when a file is classified, so rules that change StudyInstanceUID or
SOPInstanceUID decide how files are grouped; the changes are stored in the queue with the
job and reused on every attempt (templates such as ``{now}`` are not evaluated again).
``spool_copy`` writes the changed copy that is sent; the original file is never modified.
"""

from __future__ import annotations

import hashlib
import json
import stat
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from stowd import dicomlib
from stowd.config.model import Config, Source
from stowd.errors import (
    FileProblem,
    FileUnreadable,
    SpoolFull,
    UnknownType,
    judging_input,
    no_space,
)
from stowd.media.dicomfile import header_errors
from stowd.pipeline import sidecar
from stowd.pipeline.classify import Classified
from stowd.pipeline.queue import Job
from stowd.rules.engine import Facts, RuleOutcome, evaluate, fingerprint, render_for, value_text
from stowd.rules.vr import Item

if TYPE_CHECKING:  # pydicom and the rewrite are imported where a file is changed (issue 19)
    from pydicom import Dataset
    from pydicom.dataelem import DataElement

SPOOL_SUFFIX = ".dcm"
SPOOL_FOLDER_MODE = 0o700  # the copies sent hold patient data: stowd's alone
UID_LENGTH = 64
_KINDS = {
    "pdf": "PDF documents",
    "cda": "CDA documents",
    "stl": "STL models",
    "obj": "OBJ models",
    "mtl": "MTL material files",
    "jpeg": "JPEG images",
    "jp2": "JPEG 2000 images",
    "png": "PNG images",
    "gif": "GIF images",
    "mpeg": "MPEG-2 videos",
    "mp4": "MP4 videos",
}


@dataclass(frozen=True)
class Planned:
    """A classified file after the rules: its final keys and what is to change."""

    outcome: RuleOutcome
    sidecars: tuple[tuple[Path, str], ...]  # each sidecar used, with its text then
    study_uid: str  # empty for a file that is not DICOM and whose study is made later
    sop_uid: str
    study_key: str | None = None  # which made study a file that is not DICOM joins


def plan_file(
    config: Config,
    source: Source,
    path: str,
    rel: str,
    found: Classified,
    *,
    now: datetime,
    stored: list[tuple[str, str | None, str | None]] | None = None,
) -> Planned:
    """Apply the sidecars and rules of ``source``; raise ``FileProblem`` when they cannot be.

    ``stored``: the sidecars (and their text) found with the file when it was queued; they
    are used instead of what the sidecar files hold now. A file that is not DICOM must be
    of a type its source makes DICOM from (else ``UnknownType``).
    """
    if found.media is not None:
        accept(source, found.kind)
    elif _plain(config, source):  # nothing can change it: its keys as they are
        return Planned(RuleOutcome(), (), found.study_uid, found.sop_uid)
    used: sidecar.Used = []
    if source.sidecars is not None:
        here = Path(path)
        used = sidecar.read_all(here, source.sidecars) if stored is None else _again(stored)
    values = sidecar.values_of(used)
    names = tuple(p.name for p, _ in used)
    origin = origin_of(found.header) if source.receive is not None else {}
    facts = Facts(PurePosixPath(rel), source.name, found.kind, now, values, names, origin)
    with judging_input("its sidecars and the rules cannot be applied"):
        return _planned(config, source, facts, found, used)


def _plain(config: Config, source: Source) -> bool:
    """Is a DICOM file of ``source`` sent as it is: no rules, no sidecars, not received (the
    rules' facts would be built, and every rule matched, for an outcome that is empty)?"""
    return source.sidecars is None and source.receive is None and not config.rules_for(source)


def _planned(
    config: Config, source: Source, facts: Facts, found: Classified, used: sidecar.Used
) -> Planned:
    outcome = evaluate(config.rules_for(source), facts, original_of(found))
    study = _final(outcome, "StudyInstanceUID", found.study_uid)
    sop = _final(outcome, "SOPInstanceUID", found.sop_uid)
    key = None if found.media is None or study else study_key(source, facts, outcome)
    return Planned(outcome, tuple(used), study, sop, key)


def joined(p: Planned, values: Item, found: Classified) -> Planned:
    """``p`` with the values of the archive's study or worklist item (``lookup.py``) on top:
    they win over the rules and the file; a value the file already has is left alone."""
    with judging_input("the archive's values cannot be applied"):
        return _joined(p, values, found)


def _joined(p: Planned, values: Item, found: Classified) -> Planned:
    original = original_of(found)
    outcome = p.outcome
    outcome.remove = [k for k in outcome.remove if k not in values]
    for keyword, value in values.items():
        before = original(keyword)
        if value is None and before is None and keyword not in outcome.values:
            continue  # nothing to clear: an attribute the file does not have is not added
        sequence = isinstance(value, list) and any(isinstance(v, dict) for v in value)
        if before is None or sequence or value_text(value) != before:
            outcome.values[keyword] = value
            outcome.before[keyword] = before
        else:
            outcome.values.pop(keyword, None)
            outcome.before.pop(keyword, None)
    study = _final(outcome, "StudyInstanceUID", found.study_uid)
    return replace(p, outcome=outcome, study_uid=study, study_key=None if study else p.study_key)


def accept(source: Source, kind: str) -> None:
    """Raise ``UnknownType`` when ``source`` does not make DICOM from files of ``kind``."""
    allowed = source.bulkdata.types
    if kind not in allowed:
        made = ", ".join(allowed) if allowed else "none (DICOM files only)"
        raise UnknownType(
            f"the file holds {_KINDS.get(kind, kind)}, but source {source.name!r} makes DICOM "
            f"only from these types: {made} (setting bulkdata.types)"
        )


def study_key(source: Source, facts: Facts, outcome: RuleOutcome) -> str:
    """The key of the study a file that is not DICOM joins: ``bulkdata.study_key`` rendered
    for the file, and its PatientID (two patients never share a made study)."""
    template = source.bulkdata.study_key
    key = render_for(template, facts, outcome.values, "bulkdata.study_key")
    patient = outcome.values.get("PatientID")
    return key if patient is None else f"{key}\x00{value_text(patient)}"


def new_uid(root: str | None) -> str:
    """A new UID: ``2.25.`` and a random UUID as a number, or ``root.`` and random digits."""
    digits = str(uuid.uuid4().int)
    if root is None:
        return f"2.25.{digits}"
    room = UID_LENGTH - len(root) - 1
    digits = (digits + str(uuid.uuid4().int))[:room]
    return f"{root}.{digits}"


def digest(config: Config, source: Source) -> str:
    """A fingerprint of what ``plan_file`` depends on besides the file: the rules and sidecars
    (the same in every process; line numbers and comments do not count)."""
    settings = source.sidecars
    sidecars = None if settings is None else [settings.per_file, settings.folder]
    text = json.dumps([fingerprint(config.rules_for(source)), sidecars], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _again(stored: list[tuple[str, str | None, str | None]]) -> sidecar.Used:
    """The stored sidecars; one that could not be read as text fails the file with that
    reason (it is never read again: by now it may describe another patient)."""
    used = []
    for name, text, problem in stored:
        if text is None and problem is not None:
            raise FileProblem(problem)
        used.append((Path(name), sidecar.read_text(Path(name)) if text is None else text))
    return used


def _final(outcome: RuleOutcome, keyword: str, before: str) -> str:
    value = outcome.values.get(keyword)
    return before if value is None else value_text(value)


def origin_of(ds: Dataset | None) -> dict[str, str]:
    """Who sent a received file, from the file meta stowd wrote (``receive.py``): the calling
    and called AE titles and the sender's IP address."""
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        return {}
    address = str(meta.get("SendingPresentationAddress", "") or "")
    host = address.removeprefix("dicom://").rpartition(":")[0].strip("[]")
    found = {
        "calling_ae": str(meta.get("SendingApplicationEntityTitle", "") or "").strip(),
        "called_ae": str(meta.get("ReceivingApplicationEntityTitle", "") or "").strip(),
        "source_address": host,
    }
    return {name: value for name, value in found.items() if value}


def original_of(found: Classified) -> Callable[[str], str | None]:
    """The file's own value of a keyword, as text; None when absent.  A value pydicom cannot
    convert (its bytes do not fit its VR) is a ``FileProblem`` naming the keyword.  The
    header is asked for only when a value is (it may not be parsed yet: ``classify``)."""

    def text(keyword: str) -> str | None:
        ds = found.header
        elem = _element(ds, keyword) if ds is not None and keyword in ds else None
        return None if elem is None else element_text(elem)

    return text


def _element(ds: Dataset, keyword: str) -> DataElement:
    """``ds[keyword]``, converted from its bytes now (pydicom converts on first use)."""
    try:
        with header_errors():
            return ds[keyword]
    except FileProblem as problem:  # pydicom's text quotes the bytes: not in a reason
        raise FileProblem(
            f"the DICOM header is damaged: the value of its {keyword} cannot be read (its "
            "bytes do not fit its value representation), so the rules cannot use it"
        ) from problem


def element_text(elem: DataElement) -> str:
    from pydicom.multival import MultiValue  # noqa: PLC0415 - imported already: elem is pydicom's

    value = elem.value
    if value is None:
        return ""
    if elem.VR == "SQ":  # an empty sequence is empty (for default: and absent:)
        return f"(a sequence of {len(value)} item(s))" if len(value) else ""
    if isinstance(value, bytes):
        return f"(binary data, {len(value)} bytes)"
    if isinstance(value, MultiValue | list):
        return "\\".join(str(v) for v in value)
    return str(value)


def spool_path(config: Config, job: Job) -> Path:
    return config.spool / f"{job.id}{SPOOL_SUFFIX}"


def spool_copy(
    config: Config,
    job: Job,
    changes: dict[str, Any] | None,
    now: datetime,
    *,
    explicit: bool = False,
) -> Path:
    """Write the copy of ``job``'s file with ``changes`` (None: none) to the spool folder,
    converted to Explicit VR Little Endian with ``explicit`` (``rewrite``)."""
    dicomlib.load()  # pydicom whole, one thread at a time
    from stowd.media.rewrite import apply, rewrite  # noqa: PLC0415 - pydicom: not at start

    target = spool_path(config, job)
    make_spool(target, job)

    def edit(ds: Dataset) -> None:
        if changes is None:
            return
        record = config.original_attributes
        apply(ds, changes["set"], changes["remove"], record_original=record, now=now)

    rewrite(Path(job.path), target, edit, explicit=explicit)
    return target


def make_spool(target: Path, job: Job) -> None:
    """Create the spool folder of ``target`` (the copy of ``job``'s file that is sent)."""
    try:
        target.parent.mkdir(mode=SPOOL_FOLDER_MODE, parents=True, exist_ok=True)
        if stat.S_IMODE(target.parent.stat().st_mode) != SPOOL_FOLDER_MODE:
            target.parent.chmod(SPOOL_FOLDER_MODE)  # stowd's alone, whatever the umask
    except OSError as exc:
        if no_space(exc):
            raise SpoolFull(f"no space left for the spool folder {target.parent}: {exc}") from exc
        raise FileUnreadable(
            f"cannot create the spool folder {target.parent} for the copy that is sent: "
            f"{exc.strerror or exc}; it is tried again later",
            path=job.path,
        ) from exc


def clear_spool(config: Config) -> int:
    """Remove copies left by a stopped daemon (they are written again when needed)."""
    removed = 0
    for leftover in config.spool.glob("*") if config.spool.is_dir() else ():
        if not leftover.is_file():
            continue
        leftover.unlink(missing_ok=True)
        removed += 1
    return removed
