"""``stowd retry``: put files from ``failed/`` back where the daemon finds them again.

Each data file in a source's ``failed/`` folder goes back to its relative path under the
source's watch folder and its ``.error.json`` is removed.  The daemon, running now or
started later, finds it there like a new drop and queues it as a new job (a file that
appears again at a path is a new job, see ``queue._just_settled``).  Only files are moved,
so this is safe while the daemon runs.

* The name: the one the file was dropped with (``file`` in its error file) when its name in
  ``failed/`` is that name with settle's ``~N`` (``img~1.dcm`` was ``img.dcm``), so that
  rules matching names see what they saw; otherwise the name it has in ``failed/`` (a file
  renamed there on purpose keeps the new name).
* Never overwrites: a file already at the target (or at the place of one of its own
  sidecars, with other bytes) stays in ``failed/`` with everything that belongs to it.  The
  last step is a hard link (then unlink), which cannot replace a file that appeared
  meanwhile; where the filesystem has no hard links, check then rename.
* Sidecars go back *before* their file, so the watcher reads the file with them: its own
  (``img~1.json`` -> ``img.json``), and the folder's copy (``_metadata.yaml`` or
  ``_metadata~<sha12>.yaml``) as ``_metadata.yaml`` only if the watch folder has none
  there (else it stays, and a note says the file is read with the one in the watch
  folder).  When ``failed/`` holds several copies of the folder's sidecar, the queue tells
  which one a file was read with; a file for which nobody can tell stays.  A sidecar copy
  leaves ``failed/`` only once no file still there uses it.
* Across filesystems: a copy under a hidden temporary name in the target folder (the
  watcher skips ``.*``), fsync, put in place, then the file in ``failed/`` is removed.
* A file without an error file goes back too (the line says so): ``failed/`` holds only
  what stowd put there or a person did on purpose.  One that arrived in the last minute is
  left, since its error file may be about to be written.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from stowd.config.model import DEFAULT_FOLDER_SIDECAR, Config, Sidecars, Source
from stowd.config.yamlwalk import parse_duration
from stowd.errors import StowdError
from stowd.fileops import (
    copy_new,
    fsync_dir,
    is_copy_name,
    move_new,
    remove_empty_parents,
    walk_folders,
)
from stowd.pipeline import sidecar as sidecar_mod
from stowd.pipeline.queue import Job, open_status
from stowd.pipeline.settle import ERROR_SUFFIX, copy_name
from stowd.printable import escape_lines

FRESH = 60.0  # a file this new in failed/ without an error file may be a move in progress
_SUFFIXES = (*sidecar_mod.SUFFIXES, *(s.upper() for s in sidecar_mod.SUFFIXES))


@dataclass(frozen=True)
class Filters:
    """Which failed files to put back (all given ones must match)."""

    source: str | None = None  # a source name
    reason: str | None = None  # a piece of the error file's reason, any case
    since: float | None = None  # failed at or after this time (see ``failed_at``)


@dataclass(frozen=True)
class Line:
    """One file: it went back to ``target`` (or would, in a dry run), or it stays."""

    source: str
    path: Path
    target: Path
    back: bool
    detail: str = ""


@dataclass
class PutbackReport:
    dry_run: bool
    lines: list[Line] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: int = 0  # folders that could not be read

    @property
    def back(self) -> int:
        return sum(line.back for line in self.lines)

    @property
    def left(self) -> int:
        return len(self.lines) - self.back

    @property
    def ok(self) -> bool:
        return self.left == 0 and self.problems == 0


def parse_since(text: str, now: float) -> float:
    """``now`` minus a duration (``2h``, ``3d``), or an ISO 8601 date or date and time
    (local time unless it names a zone)."""
    with contextlib.suppress(ValueError):
        return now - parse_duration(text)
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError(
            f"--since: expected a duration such as 2h or 3d, or a date or time such as "
            f"2026-11-27 or 2026-11-27T19:00, got {text!r}"
        ) from None


def retry(
    config: Config, filters: Filters, *, dry_run: bool = False, now: float | None = None
) -> PutbackReport:
    """Put the failed files that match ``filters`` back into their watch folders."""
    run = _Retry(config, filters, dry_run, time.time() if now is None else now)
    roots: dict[Path, list[Source]] = {}
    for source in config.sources:
        roots.setdefault(source.failed, []).append(source)
    for root, owners in roots.items():
        if filters.source is None or any(s.name == filters.source for s in owners):
            run.root(root, owners)
    return run.report


def render(report: PutbackReport, daemon_pid: int | None) -> str:
    """One line per file, the notes, and a summary."""
    out = []
    for line in report.lines:
        if line.back:
            word = "would go back" if report.dry_run else "back"
            extra = f" ({line.detail})" if line.detail else ""
            out.append(f"{word}: [{line.source}] {line.path} -> {line.target}{extra}")
        else:
            word = "would stay" if report.dry_run else "left"
            out.append(f"{word}: [{line.source}] {line.path}: {line.detail}")
    out += [f"note: {note}" for note in report.notes]
    out.append(_summary(report, daemon_pid))
    return escape_lines(out)


def _summary(report: PutbackReport, daemon_pid: int | None) -> str:
    if not report.lines:
        return "no file in failed/ matches"
    if report.dry_run:
        return f"dry run: {report.back} would go back, {report.left} would stay; nothing moved"
    text = f"{report.back} back in the watch folders, {report.left} left in failed/"
    if report.back and daemon_pid is None:
        text += "; the daemon is not running: they are sent when it starts"
    elif report.back:
        text += f"; the daemon (pid {daemon_pid}) sends them like new drops"
    return text


@dataclass
class _Item:
    """A data file in ``failed/`` on its way back."""

    source: Source
    path: Path
    error: Path | None  # its error file, when it has one
    target: Path
    sidecars: list[tuple[Path, Path]]  # its own sidecar copies -> their place beside target


@dataclass
class _Folder:
    """One folder in ``failed/``: its files, and which of them stay there."""

    root: Path
    path: Path
    names: list[str]
    data: list[str] = field(default_factory=list)
    staying: set[str] = field(default_factory=set)  # data files left in this folder
    restored: set[str] = field(default_factory=set)  # sidecar copies now in a watch folder


class _Retry:
    def __init__(self, config: Config, filters: Filters, dry_run: bool, now: float) -> None:
        self.config, self.filters, self.dry_run, self.now = config, filters, dry_run, now
        self.report = PutbackReport(dry_run)
        self.planned: dict[Path, Path] = {}  # target -> what goes (or would go) there
        self.chosen: dict[Path, Path] = {}  # watch folder's sidecar -> copy put there by us
        self.noted: set[Path] = set()
        self._jobs: dict[str, Job] | None = None

    # -- walking ---------------------------------------------------------------------
    def root(self, root: Path, owners: list[Source]) -> None:
        skip = {p for s in self.config.sources for p in (s.watch, s.sent, s.failed)} - {root}
        for path, names in self._walk(root, skip):
            folder = _Folder(root, path, names)
            folder.data = [n for n in names if _is_data(n, set(names), owners)]
            folder.staying = set(folder.data)
            for name in folder.data:
                self._file(folder, name, owners)
            self._remove_leftovers(folder, owners)

    def _walk(self, top: Path, skip: set[Path]) -> Iterator[tuple[Path, list[str]]]:
        """Each folder (this one first) with its files; symlinked folders are not followed."""
        unlisted: set[str] = set()

        def cannot_list(folder: str, exc: OSError) -> None:
            unlisted.add(folder)
            if not isinstance(exc, FileNotFoundError):
                self.report.notes.append(f"cannot read {folder}: {exc.strerror or exc}")
                self.report.problems += 1

        def enter(entry: os.DirEntry[str]) -> bool:
            return Path(entry.path) not in skip

        for folder, listing in walk_folders(str(top), enter, cannot_list, sort=True):
            entries = list(listing)
            if folder not in unlisted:
                yield Path(folder), [e.name for e in entries if _is_file(e)]

    # -- one file --------------------------------------------------------------------
    def _file(self, folder: _Folder, name: str, owners: list[Source]) -> None:
        path = folder.path / name
        error = path.with_name(name + ERROR_SUFFIX) if name + ERROR_SUFFIX in folder.names else None
        doc, unreadable = _read_error(error)
        source = _owner(doc, owners)
        if source is None:
            shared = ", ".join(s.name for s in owners)
            self._record_stay(
                owners[0], path, path, f"shared by sources {shared}; none is named in it"
            )
            return
        if not self._wanted(source, path, error, doc):
            return
        rel = path.parent.relative_to(folder.root)
        target = source.watch / rel / _original_name(name, doc, source.watch / rel)
        own = [
            (folder.path / n, target.parent / _renamed(n, name, target.name))
            for n in _own_sidecars(name, folder, source.sidecars)
        ]
        item = _Item(source, path, error, target, own)
        why = self._blocked(item, error is None)
        if why:
            self._record_stay(source, path, target, why)
            return
        copy, why = self._folder_copy(item, folder)
        if why:
            self._record_stay(source, path, target, why)
            return
        self._put_back(item, folder, copy, unreadable)

    def _wanted(self, source: Source, path: Path, error: Path | None, doc: Any) -> bool:
        f = self.filters
        if f.source is not None and source.name != f.source:
            return False
        if f.reason is not None:
            reason = doc.get("reason") if isinstance(doc, dict) else None
            if not isinstance(reason, str) or f.reason.casefold() not in reason.casefold():
                return False
        return f.since is None or failed_at(path, error, doc) >= f.since

    def _blocked(self, item: _Item, no_error_file: bool) -> str | None:
        """Why ``item`` cannot go back now, if it cannot."""
        if _inside(item.target, item.source.sent) or _inside(item.target, item.source.failed):
            return f"{item.target} would be inside the source's sent/ or failed/ folder"
        if self._taken(item.target):
            return f"{item.target} is in the watch folder already; not overwritten"
        for copy, place in item.sidecars:
            if self._taken(place, copy):
                return f"its sidecar {place} is in the watch folder already, with other content"
        if no_error_file and _changed_at(item.path) > self.now - FRESH:
            return "it arrived less than a minute ago and has no error file yet; try again soon"
        return None

    def _taken(self, place: Path, mine: Path | None = None) -> bool:
        """Is ``place`` occupied (or about to be, in a dry run)?  For a sidecar (``mine``),
        only by other bytes: the same sidecar there already is fine."""
        there = place if os.path.lexists(place) else self.planned.get(place)
        if there is None:
            return False
        return mine is None or not _same_bytes(there, mine)

    # -- the folder's sidecar ----------------------------------------------------------
    def _folder_copy(self, item: _Item, folder: _Folder) -> tuple[Path | None, str | None]:
        """The copy of the folder's sidecar to put back with ``item`` (or why it stays)."""
        settings = item.source.sidecars
        if settings is None or settings.folder is None:
            return None, None
        copies = [n for n in folder.names if is_copy_name(n, settings.folder)]
        here = item.target.parent / settings.folder
        chosen = self.chosen.get(here)
        if copies and chosen is None and os.path.lexists(here):
            if len(copies) > 1 or not _same_bytes(here, folder.path / copies[0]):
                self._note_own(here, folder, copies)
                return None, None
            chosen = self.chosen[here] = folder.path / copies[0]  # the same one is there
        if not copies:
            return None, None
        needed = copies[0] if len(copies) == 1 else self._read_with(item, folder, settings.folder)
        if needed is None:
            return None, (
                f"{folder.path} holds {len(copies)} copies of {settings.folder} "
                f"({', '.join(copies)}) and the queue does not tell which one this file was "
                f"read with; put the right one at {here} and retry again"
            )
        if chosen is not None and chosen != folder.path / needed:
            return None, (
                f"it was read with {needed}, but {chosen.name} goes back to {here} for other "
                "files; retry again once they are sent"
            )
        return folder.path / needed, None

    def _note_own(self, here: Path, folder: _Folder, copies: list[str]) -> None:
        if here not in self.noted:
            self.noted.add(here)
            self.report.notes.append(
                f"{here} is there already: the files that go back to {here.parent} are read "
                f"with it; {', '.join(copies)} stay in {folder.path}"
            )

    def _read_with(self, item: _Item, folder: _Folder, name: str) -> str | None:
        """Which copy of the folder's sidecar ``item`` was read with, as the queue says."""
        job = self._queue_jobs().get(str(item.path))
        for path, text in job.sidecar_texts() if job else []:
            if Path(path).name == name and text is not None:
                copy = copy_name(folder.path, name, text)
                if sidecar_mod.text_of(copy) == text:
                    return copy.name
        return None

    def _queue_jobs(self) -> dict[str, Job]:
        if self._jobs is None:
            try:
                queue = open_status(self.config)
                try:
                    with queue.reading():
                        jobs = queue.jobs("failed")
                finally:
                    queue.close()
            except (StowdError, OSError):
                jobs = []
            self._jobs = {j.target: j for j in jobs if j.target}
        return self._jobs

    # -- moving ------------------------------------------------------------------------
    def _put_back(self, item: _Item, folder: _Folder, copy: Path | None, unreadable: str) -> None:
        settings = item.source.sidecars
        here = item.target.parent / settings.folder if settings and settings.folder else None
        notes = [f"with {', '.join(c.name for c, _ in item.sidecars)}"] if item.sidecars else []
        if copy is not None and here is not None:
            renamed = f" as {here.name}" if copy.name != here.name else ""
            notes.append(f"folder sidecar {copy.name}{renamed}")
        notes += ["it had no error file"] if item.error is None else []
        notes += [f"its error file could not be read: {unreadable}"] if unreadable else []
        try:
            if not self.dry_run:
                self._move(item, copy, here)
        except OSError as exc:
            self._record_stay(item.source, item.path, item.target, _why(exc, item.target))
            return
        for c, place in [(item.path, item.target), *item.sidecars]:
            self.planned.setdefault(place, c)
        if copy is not None and here is not None:
            self.chosen[here] = copy
            folder.restored.add(copy.name)
        folder.staying.discard(item.path.name)
        folder.restored.update(c.name for c, _ in item.sidecars)
        self.report.lines.append(
            Line(item.source.name, item.path, item.target, True, "; ".join(notes))
        )

    def _move(self, item: _Item, copy: Path | None, here: Path | None) -> None:
        """Sidecars first (copied: other files may use them), then the file, then its error
        file.  What was put in the watch folder is taken back if the file cannot follow."""
        made: list[Path] = []
        try:
            if copy is not None and here is not None and here not in self.chosen:
                copy_new(copy, here)
                made.append(here)
            for c, place in item.sidecars:
                if not os.path.lexists(place):
                    copy_new(c, place)
                    made.append(place)
            move_new(item.path, item.target)
        except OSError:
            for place in made:
                place.unlink(missing_ok=True)
            raise
        with contextlib.suppress(OSError):  # the moves happened; only their durability is in doubt
            fsync_dir(item.target.parent)
        if item.error is not None:
            try:
                item.error.unlink(missing_ok=True)
            except OSError as exc:
                self.report.notes.append(f"cannot remove {item.error}: {exc.strerror or exc}")

    def _record_stay(self, source: Source, path: Path, target: Path, why: str) -> None:
        self.report.lines.append(Line(source.name, path, target, False, why))

    def _remove_leftovers(self, folder: _Folder, owners: list[Source]) -> None:
        """Remove the sidecar copies that went back and that no file left in ``folder``
        uses, then the folders left empty (never ``failed/`` itself)."""
        if self.dry_run:
            return
        for name in sorted(folder.restored):
            if not _still_used(name, folder, owners):
                with contextlib.suppress(OSError):
                    (folder.path / name).unlink()
        remove_empty_parents(folder.path / "-", folder.root)  # from folder.path upwards


# --------------------------------------------------------------------------- helpers


def failed_at(path: Path, error: Path | None, doc: Any) -> float:
    """When a file failed: ``last_try`` or ``first_try`` of its error file, else when the
    error file was written (its mtime), else when the file came to ``failed/`` (ctime)."""
    for key in ("last_try", "first_try"):
        value = doc.get(key) if isinstance(doc, dict) else None
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return datetime.fromisoformat(value).timestamp()
    try:
        return error.stat().st_mtime if error is not None else path.lstat().st_ctime
    except OSError:
        return 0.0


def _changed_at(path: Path) -> float:
    try:
        return path.lstat().st_ctime
    except OSError:
        return 0.0


def _is_file(entry: os.DirEntry[str]) -> bool:
    """A regular file, or a symbolic link that is not to a folder (settle moves links)."""
    if entry.is_symlink():
        return not entry.is_dir()
    return entry.is_file(follow_symlinks=False)


def _read_error(error: Path | None) -> tuple[Any, str]:
    """The error file's content (None if none) and why it could not be read."""
    if error is None:
        return None, ""
    try:
        doc = json.loads(error.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, str(exc)
    except RecursionError:  # JSON nested beyond Python's limit: a damaged (or planted) file
        return None, "it nests arrays or objects too deeply"
    return (doc, "") if isinstance(doc, dict) else (None, "not a JSON object")


def _owner(doc: Any, owners: list[Source]) -> Source | None:
    """The source a file in a (possibly shared) failed folder belongs to."""
    if len(owners) == 1:
        return owners[0]
    doc = doc if isinstance(doc, dict) else {}
    for source in owners:
        if source.name == doc.get("source"):
            return source
    original = doc.get("file")
    for source in owners:
        if isinstance(original, str) and _inside(Path(original), source.watch):
            return source
    return None


def _original_name(name: str, doc: Any, folder: Path) -> str:
    """The name the file was dropped with, when ``name`` is that name with a ``~N``."""
    original = doc.get("file") if isinstance(doc, dict) else None
    if not isinstance(original, str):
        return name
    dropped = Path(original)
    if dropped.parent != folder:
        return name
    stem, suffix = (dropped.stem, dropped.suffix) if dropped.suffix else (dropped.name, "")
    numbered = re.escape(stem) + r"~[0-9]+" + re.escape(suffix)
    return dropped.name if re.fullmatch(numbered, name) else name


def _renamed(sidecar: str, old: str, new: str) -> str:
    """``img~1.dcm.json`` -> ``img.dcm.json`` and ``img~1.json`` -> ``img.json`` when
    ``img~1.dcm`` goes back as ``img.dcm``."""
    if sidecar.startswith(old + "."):
        return new + sidecar[len(old) :]
    return Path(new).stem + sidecar[len(Path(old).stem) :]


def _per_file_names(name: str) -> set[str]:
    stem = Path(name).stem
    return {*(stem + s for s in _SUFFIXES), *(name + s for s in _SUFFIXES)}


def _own_sidecars(name: str, folder: _Folder, settings: Sidecars | None) -> list[str]:
    if settings is None or not settings.per_file:
        return []
    wanted = _per_file_names(name) - set(folder.data)
    return [n for n in folder.names if n in wanted]


def _folder_names(owners: list[Source]) -> set[str]:
    found = {s.sidecars.folder for s in owners if s.sidecars and s.sidecars.folder}
    return found or {DEFAULT_FOLDER_SIDECAR}


def _is_data(name: str, names: set[str], owners: list[Source]) -> bool:
    """A file that was (to be) sent: not hidden (a move in progress), not an error file,
    and either with an error file or not named like a sidecar copy."""
    if name.startswith(".") or name.endswith(ERROR_SUFFIX):
        return False
    if name + ERROR_SUFFIX in names:
        return True
    if any(is_copy_name(name, f) for f in _folder_names(owners)):
        return False
    return Path(name).suffix not in _SUFFIXES


def _still_used(name: str, folder: _Folder, owners: list[Source]) -> bool:
    if any(is_copy_name(name, f) for f in _folder_names(owners)):
        return bool(folder.staying)
    return any(name in _per_file_names(d) for d in folder.staying)


def _inside(inner: Path, outer: Path) -> bool:
    return inner.is_relative_to(outer)


def _same_bytes(a: Path, b: Path) -> bool:
    try:
        return a.read_bytes() == b.read_bytes()
    except OSError:
        return False


def _why(exc: OSError, target: Path) -> str:
    if isinstance(exc, FileExistsError):
        return f"{target} appeared in the watch folder meanwhile; not overwritten"
    return f"cannot move it: {exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")
