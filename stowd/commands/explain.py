"""``stowd explain FILE...``: which rules match a file and what they change, sending nothing.

Each file is read as the daemon reads it (classify, sidecars, rules of its source); the
report shows the sidecars used, the rules that matched and every attribute before and after.
A rule's ``lookup`` is shown as the query the daemon would make; the archive is not asked, so
the values it would give are not among the changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from stowd.config.model import Config, Source
from stowd.errors import FileProblem, FileUnreadable
from stowd.media.bulkdata import sop_class_for
from stowd.pipeline import metadata
from stowd.pipeline.bulkform import sop_class_name
from stowd.pipeline.classify import classify
from stowd.pipeline.lookup import describe_query
from stowd.printable import escape_lines
from stowd.rules.engine import RuleOutcome, value_text

# A file made into DICOM (a photo, PDF, video) has these present but empty unless a rule or
# sidecar gives them (media/bulkdata: Type 2, as dcm4che's stowrs); explain says so.
PATIENT = ("PatientID", "PatientName")


@dataclass
class Explained:
    """What stowd would do with one file."""

    file: str
    source: str | None = None
    kind: str | None = None
    sidecars: list[str] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)
    changes: list[tuple[str, str | None, str | None]] = field(default_factory=list)
    study_uid: str | None = None
    built: str | None = None  # the SOP Class made from a file that is not DICOM
    study_key: str | None = None  # the key of the study it joins
    lookup: str | None = None  # the query a rule's lookup would make (not asked)
    blank: list[str] = field(default_factory=list)  # PATIENT attributes a made file has empty
    problem: str | None = None  # why the daemon would fail the file
    error: str | None = None  # why the file cannot be explained (a mistake in the command)

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "source": self.source,
            "type": self.kind,
            "sidecars": self.sidecars,
            "rules_matched": self.rules,
            "changes": [{"attribute": k, "before": b, "after": a} for k, b, a in self.changes],
            "study_instance_uid": self.study_uid,
            "made_into": self.built,
            "empty_patient_attributes": self.blank,
            "study_key": self.study_key,
            "lookup": self.lookup,
            "problem": self.problem,
            "error": self.error,
        }


def explain(config: Config, files: list[str], source_name: str | None = None) -> list[Explained]:
    return [_explain(config, f, source_name) for f in files]


def _explain(config: Config, given: str, source_name: str | None) -> Explained:
    path = os.path.abspath(given)
    result = Explained(path)
    if not os.path.lexists(path):
        result.error = "no such file (nothing to explain: check the path)"
        return result
    source = _source_of(config, path, source_name)
    if source is None:
        result.error = _outside(config)
        return result
    result.source = source.name
    rel = _rel(given, path, source)
    try:
        found = classify(path)
        result.kind = found.kind
        planned = metadata.plan_file(config, source, path, rel, found, now=datetime.now())
    except (FileProblem, FileUnreadable) as exc:
        result.problem = str(exc)
        return result
    outcome = planned.outcome
    result.sidecars = [str(p) for p, _ in planned.sidecars]
    result.rules = [rule.label for rule in outcome.matched]
    result.changes = [(k, outcome.before.get(k), value_text(v)) for k, v in outcome.values.items()]
    result.changes += [(k, outcome.before.get(k), None) for k in outcome.remove]
    result.study_uid = planned.study_uid or None
    if outcome.lookup is not None:
        result.lookup = describe_query(config.destination_of(source), outcome.lookup)
    if found.media is not None:
        photographic = source.bulkdata.images == "photographic"
        result.built = sop_class_name(sop_class_for(found.media, photographic=photographic))
        result.study_key = planned.study_key
        result.blank = _blank(outcome)
    return result


def _blank(outcome: RuleOutcome) -> list[str]:
    """The PATIENT attributes a file made into DICOM is sent with empty: those no rule or
    sidecar sets to a value (none said when a lookup may still give them)."""
    if outcome.lookup is not None:
        return []
    given = {k for k, v in outcome.values.items() if value_text(v)} - set(outcome.remove)
    return [k for k in PATIENT if k not in given]


def _rel(given: str, path: str, source: Source) -> str:
    """The path the rules see: below the watch folder; for a file elsewhere (``--source``),
    the relative path as given (``P1/photo.jpg``), else its name."""
    if Path(path).is_relative_to(source.watch):
        return os.path.relpath(path, source.watch)
    relative = Path(given)
    if not relative.is_absolute() and ".." not in relative.parts:
        return relative.as_posix()
    return Path(path).name


def _source_of(config: Config, path: str, name: str | None) -> Source | None:
    if name is not None:
        return config.source(name)
    for source in config.sources:
        if Path(path).is_relative_to(source.watch):
            return source
    return None


def _outside(config: Config) -> str:
    """What is wrong with a file outside every watch folder, and the folders there are."""
    folders = [f"{s.name}: {s.watch}" for s in config.sources]
    return (
        "not inside any source's watch folder ("
        + "; ".join(folders)
        + "); give --source NAME to explain it as a file of that source"
    )


def render(results: list[Explained]) -> str:
    lines: list[str] = []
    for r in results:
        lines.append(f"{r.file}" + (f"  (source {r.source}, type {r.kind})" if r.kind else ""))
        if r.error:
            lines.append(f"  cannot explain: {r.error}")
            continue
        if r.problem:
            lines.append(f"  would go to failed/: {r.problem}")
            continue
        if r.built:
            key = "given by the rules" if r.study_key is None else _key_text(r.study_key)
            lines.append(f"  made into: {r.built} (study key {key}; UIDs are made when queued)")
        lines.append(f"  sidecars: {', '.join(r.sidecars) or 'none'}")
        lines.append(f"  rules matched: {', '.join(r.rules) or 'none'}")
        if r.lookup:
            lines.append(f"  looks up: {r.lookup}")
        if not r.changes and not r.lookup:
            lines.append(_unchanged(r))
        width = max((len(k) for k, _, _ in r.changes), default=0)
        for keyword, before, after in r.changes:
            lines.append(f"  {keyword:<{width}}  {_shown(before)} -> {_shown(after, 'removed')}")
        if r.blank:
            them = "it" if len(r.blank) == 1 else "them"
            lines.append(
                f"  sent with an empty {' and '.join(r.blank)}: no rule or sidecar gives {them}"
            )
    return escape_lines(lines)  # file names and sidecar values cannot add a line


def _unchanged(r: Explained) -> str:
    """No rule changes the file: a DICOM file goes as it is, a photo, PDF or video as the
    object stowd makes from it."""
    if r.built is None:
        return "  no changes: sent exactly as it is"
    return f"  no changes by the rules: sent as the {r.built} object made from the file"


def _shown(value: str | None, missing: str = "absent") -> str:
    return f"({missing})" if value is None else repr(value)


def _key_text(key: str) -> str:
    folder, _, patient = key.partition("\x00")
    return repr(folder) + (f" and PatientID {patient!r}" if patient else "")
