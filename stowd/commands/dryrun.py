"""``stowd dry-run``: what the daemon would do with the files in the watch folders now.

It walks every watch folder with the daemon's own rules (ignored names, quiet period), reads
each complete file's header, and reports what would be sent (in how many requests) and what
would go to ``failed/`` and why.  It sends nothing, moves nothing and does not touch the queue.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from stowd.config.model import Config, Source
from stowd.errors import FileProblem, FileUnreadable, UnknownType
from stowd.pipeline import metadata
from stowd.pipeline.classify import classify
from stowd.pipeline.group import take_batch
from stowd.pipeline.queue import Job, NewFile
from stowd.pipeline.watch import Watcher
from stowd.printable import escape_lines

MAX_LOOKUPS = 10  # lookup questions listed per source


@dataclass
class SourcePlan:
    """What one source's folder holds right now."""

    source: str
    watch: str
    destination: str
    ready: int = 0
    ready_bytes: int = 0
    requests: int = 0
    still_written: int = 0
    would_fail: list[tuple[str, str]] = field(default_factory=list)
    ignored: int = 0  # files of an unknown type that the source ignores
    studies: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    # files per lookup question (the archive is not asked in a dry run)
    lookups: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "watch": self.watch,
            "destination": self.destination,
            "ready_files": self.ready,
            "ready_bytes": self.ready_bytes,
            "studies": len(self.studies),
            "requests": self.requests,
            "still_being_written": self.still_written,
            "would_fail": [{"file": f, "reason": r} for f, r in self.would_fail],
            "ignored": self.ignored,
            "lookups": [{"query": q, "files": n} for q, n in sorted(self.lookups.items())],
        }


def plan_sources(config: Config) -> list[SourcePlan]:
    """One plan per source."""
    return [_plan_source(config, source) for source in config.sources]


def _plan_source(config: Config, source: Source) -> SourcePlan:
    dest = config.destination_of(source)
    result = SourcePlan(source.name, str(source.watch), dest.name)

    def look(files: list[NewFile]) -> int:
        for new in files:
            _look_at(config, source, result, new)
        return len(files)

    watcher = Watcher(source, dest.name, look, exclude=(config.queue,))
    if source.watch.is_dir():
        watcher.scan()
    result.still_written = watcher.waiting
    for sizes in result.studies.values():
        result.requests += _requests(sizes, config, source)
    return result


def _look_at(config: Config, source: Source, result: SourcePlan, new: NewFile) -> None:
    try:
        found = classify(new.path)
        keys = metadata.plan_file(config, source, new.path, new.rel, found, now=datetime.now())
    except UnknownType as problem:
        if source.bulkdata.unknown == "ignore":
            result.ignored += 1
        else:
            result.would_fail.append((new.rel, str(problem)))
        return
    except FileProblem as problem:
        result.would_fail.append((new.rel, str(problem)))
        return
    except FileUnreadable as exc:
        result.would_fail.append((new.rel, f"{exc} (for now)"))
        return
    result.ready += 1
    result.ready_bytes += new.size
    wanted = keys.outcome.lookup
    if wanted is not None:  # the archive decides the study: one per question, not asked now
        study = f"{wanted.lookup.within} with {wanted.text()}"
        result.lookups[study] += 1
    else:
        study = keys.study_uid or f"made study {keys.study_key}"  # a PDF, a photo: made later
    result.studies[study].append(new.size)


def _requests(sizes: list[int], config: Config, source: Source) -> int:
    limits = config.destination_of(source).batch
    jobs = [
        Job(n, "", "", "", "", size, 0, "dicom", "", "", 0, None) for n, size in enumerate(sizes)
    ]
    count = 0
    while jobs:
        jobs = jobs[len(take_batch(jobs, limits)) :]
        count += 1
    return count


def render(plans: list[SourcePlan]) -> str:
    """The human form of a dry run."""
    lines = []
    for p in plans:
        lines.append(f"source {p.source}: {p.watch} -> {p.destination}")
        lines.append(
            f"  would send:   {p.ready} file(s), {p.ready_bytes / 1e6:.1f} MB, "
            f"{len(p.studies)} stud{'y' if len(p.studies) == 1 else 'ies'}, "
            f"{p.requests} request(s)"
        )
        if p.lookups:
            lines.append(
                f"  would look up: {len(p.lookups)} question(s) to the archive "
                "(not asked in a dry run; `stowd explain FILE` shows the request)"
            )
            shown = sorted(p.lookups.items())[:MAX_LOOKUPS]
            lines.extend(f"    {q}: {n} file(s)" for q, n in shown)
            if len(p.lookups) > MAX_LOOKUPS:
                lines.append(f"    ... and {len(p.lookups) - MAX_LOOKUPS} more")
        lines.append(f"  still being written (quiet period not over): {p.still_written}")
        if p.ignored:
            lines.append(f"  ignored (unknown type, bulkdata.unknown: ignore): {p.ignored}")
        lines.append(f"  would fail:   {len(p.would_fail)}")
        lines.extend(f"    {rel}: {reason}" for rel, reason in p.would_fail)
    lines.append("dry run: nothing was sent, moved or queued")
    return escape_lines(lines)
