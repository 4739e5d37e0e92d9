"""Moving a finished file to ``sent/`` or ``failed/`` (with its reason beside it).

The target keeps the path relative to the watch folder, never overwrites (``name~1.dcm``) and is
safe across filesystems (copy, fsync, rename into place, then remove the source).  The queue
records the target *before* the move and marks the job done only *after* it, so ``repair``
can finish a move that a crash interrupted.  A file that changed after it was read for
upload is never left there as if that content had been handled: it stays in, or goes back
to, the drop folder and is queued again as a new file.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from stowd import fileops
from stowd.config.model import Sidecars, Source
from stowd.errors import FileProblem, FileUnreadable, no_space
from stowd.fileops import (
    NAME_MAX,
    NO_LINK,
    Folders,
    Roots,
    content_name,
    fsync_dir,
    numbered,
    open_folder,
    write_new,
)
from stowd.pipeline import sidecar as sidecar_mod
from stowd.pipeline.queue import Job, Lost, Queue
from stowd.printable import utf8_safe

log = logging.getLogger("stowd.settle")

ERROR_SUFFIX = ".error.json"
MOVING = threading.Lock()  # held around moves into sent/ and failed/ (and purge's rmdir)
MAX_SUFFIX = 10_000
NOTE_MODE = 0o600  # a note or copy about a file whose own mode is unknown (a link)
# what ``Path.exists`` takes for nothing there (pathlib's _IGNORED_ERRNOS), and a name too long
_ABSENT = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP, errno.ENAMETOOLONG})
_copy_all = fileops.copy_all  # the bytes of a copy across filesystems (tests wrap it)
remove_empty_parents = fileops.remove_empty_parents  # the worker tidies drop folders with it


def free_target(
    base: Path,
    rel: str,
    also_taken: Collection[Path] = (),
    companions: Callable[[Path], list[Path]] = lambda _p: [],
) -> Path:
    """``base/rel``, or ``base/<stem>~N<ext>`` when that name (or a companion of it, such as
    the copy of its own sidecar) is taken."""
    target = base / rel
    if not _taken(target, also_taken, companions):
        return target
    for n in range(1, MAX_SUFFIX):
        candidate = numbered(target, n)
        if not _taken(candidate, also_taken, companions):
            return candidate
    raise OSError(errno.EEXIST, f"no free name for {target}")


def _taken(
    path: Path, also_taken: Collection[Path], companions: Callable[[Path], list[Path]]
) -> bool:
    if path in also_taken or _exists(path) or _exists(str(path) + ERROR_SUFFIX):
        return True
    return any(_exists(c) for c in companions(path))


def _exists(path: str | Path) -> bool:
    """``Path(path).exists()`` (a link followed: absent when nothing is there, a folder on
    the way is not one, or links loop), but a name too long to be a file's (``<long
    name>.error.json``) does not exist either; other errors (no permission to look) are
    raised.  Asked of the name as it is: no ``Path`` is made for it."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno in _ABSENT:
            return False
        raise
    except ValueError:  # a name the system cannot take (a NUL in it): as Path.exists
        return False
    return True


@dataclass(frozen=True)
class Decision:
    """What is to become of a job's file: ``sent`` or ``failed`` (with the reason)."""

    job: Job
    source: Source
    outcome: str
    error: dict[str, Any] | None = None
    note: str | None = None  # how the outcome came about (queue.ALREADY_STORED), kept with it


@dataclass(frozen=True)
class Settled:
    """A decision carried out (``target``; None when the file had vanished), or not
    (``problem``: the row stays settling; ``lost``: the row is no longer this node's)."""

    decision: Decision
    target: Path | None
    problem: OSError | None = None
    # the node that took the row over after this node's lease ran out ('' none yet): this
    # node left its file alone (or, finding it so once the file was moved, recorded nothing)
    lost: str | None = None


def settle_all(queue: Queue, decisions: Sequence[Decision]) -> list[Settled]:
    """Move the files of a batch: record every target, move, sync each folder, finish all.

    Two queue transactions and one folder fsync per folder, whatever the batch size.
    """
    with MOVING:  # two workers must never pick the same free name at the same time
        return _settle_all(queue, decisions)


def _settle_all(queue: Queue, decisions: Sequence[Decision]) -> list[Settled]:
    kept = [d for d in decisions if d.source.keep]
    lost: Lost = {}
    for was in sorted({d.job.state for d in kept}):  # stowd migrate --keep: nothing moves
        done = [(d.job.id, d.outcome, d.error) for d in kept if d.job.state == was]
        lost |= queue.finish_kept(done, was=was)
    notes = _notes([d for d in kept if d.job.id not in lost])
    if notes:  # informational: a crash between the two loses a note, no file
        queue.add_notes(notes)
    settled = [Settled(d, None, lost=lost.get(d.job.id)) for d in kept]
    return settled + _settle_moved(queue, [d for d in decisions if not d.source.keep])


def _notes(decisions: Sequence[Decision]) -> dict[int, str]:
    return {d.job.id: d.note for d in decisions if d.note is not None}


def _settle_moved(queue: Queue, decisions: Sequence[Decision]) -> list[Settled]:
    plans = _plan(decisions)
    lost = queue.begin_settle(
        [(d.job, d.outcome, str(t) if isinstance(t, Path) else None, d.error) for d, t in plans],
        notes=_notes([d for d, _ in plans]),
    )
    # a row another node took over is its now: that node moves the file, never this one
    results = [Settled(d, None, lost=lost[d.job.id]) for d, _ in plans if d.job.id in lost]
    plans = [(d, t) for d, t in plans if d.job.id not in lost]
    done: list[tuple[int, str]] = []
    with Folders() as folders:  # each folder opened once for the batch
        for decision, planned in plans:
            if isinstance(planned, OSError):
                results.append(Settled(decision, None, planned))
                continue
            target = planned
            try:
                try:
                    state, moved = _carry_out(*_moving(decision, target), folders=folders)
                except FileExistsError:  # taken since it was chosen: another node's move
                    again: Lost = {}
                    moving = replace(decision.job, state="settling")  # recorded above
                    source, error = decision.source, decision.error
                    chosen = _choose(queue, moving, source, error, again, outcome=decision.outcome)
                    if chosen is None:  # taken over meanwhile: that node moves it
                        results.append(Settled(decision, None, lost=again[decision.job.id]))
                        continue
                    target = chosen
                    state, moved = _carry_out(*_moving(decision, target), folders=folders)
            except OSError as exc:
                results.append(Settled(decision, None, exc))
                continue
            done.append((decision.job.id, state))
            results.append(Settled(decision, target if moved else None))
        # one fsync per folder moved into, before any of its moves counts as done
        into = {os.path.dirname(r.target) or os.curdir for r in results if r.target is not None}
        _sync_folders([Path(folder) for folder in into], folders)
    late = queue.finish_many(done)  # taken over while this node moved them: not recorded
    return [
        replace(r, lost=late[r.decision.job.id]) if r.decision.job.id in late else r
        for r in results
    ]


def _plan(decisions: Sequence[Decision]) -> list[tuple[Decision, Path | OSError]]:
    """A free target for each decision, or why none can be chosen now (sent/ or failed/
    cannot be looked into): then the outcome is recorded alone and the repair chooses."""
    chosen: set[Path] = set()
    plans: list[tuple[Decision, Path | OSError]] = []
    for d in decisions:
        base = d.source.sent if d.outcome == "sent" else d.source.failed
        try:
            target = free_target(base, d.job.rel, chosen, _companions(d.job))
        except OSError as exc:
            plans.append((d, exc))
            continue
        chosen.add(target)
        plans.append((d, target))
    return plans


def _carry_out(
    job: Job,
    target: Path,
    outcome: str,
    error: dict[str, Any] | None,
    source: Source | None,
    *,
    folders: Folders | None = None,
) -> tuple[str, bool]:
    """Do (or finish) one recorded move and write the reason; returns the final state, and
    whether the file is now at ``target`` (moved now or before a crash): a batch's settle
    knows it without looking at the drop folder again.

    A file whose content is no longer what was read for upload (a writer added to it after
    it looked complete) never stays in ``sent/`` or ``failed/`` as if that content had been
    handled: it is checked before the move, during a copy across filesystems and after the
    move, and left in (or put back into) the drop folder, where the watcher queues it as a
    new file.  Its row ends ``sent`` when the content read was stored, else ``gone``.

    No symbolic link below the source's configured folders is followed (``_folder``):
    a writer of the drop folder may have planted one (``sent/`` inside the watch folder
    replaced by a link elsewhere); such a move fails with an ``OSError`` that says so.

    ``folders``: a batch's folders, kept open; its targets were chosen free just now, so no
    put-back a crash interrupted can be at them (that is looked for in a repair)."""
    roots = _roots(source)
    sidecars = None if source is None else source.sidecars
    back = None if folders is not None else _put_back_before(job, target)
    if back is not None:
        _drop_own_copies(job, target)
        return _changed(job, outcome, back), False
    secured = _bring(job, target, outcome, roots, folders)
    if isinstance(secured, str):
        return secured, False  # changed (it stays), or gone
    if _moved_changed(job, target):
        back = _put_back(job, target, roots)
        _drop_own_copies(job, target)
        return _changed(job, outcome, back), False
    _release_sidecars(job, sidecars, secured)
    if outcome == "failed" and error is not None:
        write_reason(target, error, roots)
    return outcome, True


def _bring(
    job: Job, target: Path, outcome: str, roots: Roots, folders: Folders | None = None
) -> set[Path] | str:
    """Move the file to ``target``, or find it moved there before a crash: the sidecars now
    safe beside it; or the row's final state when it is not there (changed, vanished)."""
    replaced, there = _looked_up(job)
    if replaced:
        if not _holds_read(job, target):
            # The file at the path is not the one this job read: leave it for the watcher,
            # which queues it as a new job. The job's own content is gone (or was stored).
            return _changed(job, outcome, None)
        return set()  # moved before a crash; a new file at the path may use the sidecars
    if there:
        secured = _copy_sidecars(job, target, roots)
        expect = (job.size, job.mtime_ns)
        moving = Path(job.path)
        if not move(moving, target, sync=False, expect=expect, roots=roots, folders=folders):
            return _changed(job, outcome, None)  # it changed while it was copied: it stays
        return secured
    if not target.exists():
        log.warning("file vanished before it could be moved to %s: %s", outcome, job.path)
        return "gone"
    return _copy_sidecars(job, target, roots)  # a move finished before a crash


def _holds_read(job: Job, target: Path) -> bool:
    """Is ``target`` there with what was read for upload (a move that finished before a
    crash)?"""
    return _moved_content(job, target) == (job.size, job.mtime_ns)


def _moved_changed(job: Job, target: Path) -> bool:
    """Did the file change after it was read (a writer still had it open and wrote on)?
    Not when it is not at ``target``: moved on by someone else, nothing of ours to check."""
    return _moved_content(job, target) not in (None, (job.size, job.mtime_ns))


def _moved_content(job: Job, target: Path) -> tuple[int, int] | None:
    """(size, mtime_ns) of the file moved to ``target``; None when it is not there.  For
    a moved symlink, of the file it named from its old place (a relative link names
    another file, or none, from sent/)."""
    try:
        st = os.lstat(target)
        if stat.S_ISLNK(st.st_mode):
            st = os.stat(Path(job.path).parent / os.readlink(target))
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


def _changed(job: Job, outcome: str, put_back: Path | None) -> str:
    """Say that ``job``'s file changed after it was read; the state its row ends in."""
    try:
        now = f"{os.stat(put_back or job.path).st_size} now"
    except OSError:
        now = "another file now"
    if outcome == "sent":
        stored = (
            "the content read then was stored in the archive (an archive may keep that "
            "version when the same SOP Instance UID comes again: check the instance there)"
        )
    else:
        stored = f"the content read then was not sent (it would have gone to {outcome}/)"
    where = "it stays in the drop folder" if put_back is None else f"it was put back as {put_back}"
    log.warning(
        "%s changed after it was read for upload (%d bytes then, %s); %s; %s and is queued "
        "again as a new file",
        job.path,
        job.size,
        now,
        stored,
        where,
    )
    return "sent" if outcome == "sent" else "gone"


def _put_back(job: Job, target: Path, roots: Roots = ()) -> Path:
    """Return a file that changed after it was read from ``target`` to the drop folder: to
    its own path, else to a free name beside it (never over another file)."""
    original = Path(job.path)
    for _ in range(MAX_SUFFIX):
        place = free_target(original.parent, original.name)
        with open_folder(place.parent, roots) as there, open_folder(target.parent, roots) as here:
            try:  # a moved link stays a link
                os.link(
                    target.name,
                    place.name,
                    src_dir_fd=here,
                    dst_dir_fd=there,
                    follow_symlinks=False,
                )
            except FileExistsError:
                continue  # taken since it was looked at: the next free name
            except OSError as exc:
                if exc.errno not in NO_LINK:
                    raise
                # no hard link here (another filesystem, protected_hardlinks): the name was
                # free a moment ago; a move never replaces a file that took it since
                try:
                    move(target, place, roots=roots)
                except FileExistsError:
                    continue  # the modality wrote it meanwhile: the next free name
                return place
            os.fsync(there)  # in the drop folder before it leaves sent/ or failed/
            os.unlink(target.name, dir_fd=here)
            os.fsync(here)
        return place
    raise OSError(errno.EEXIST, f"no free name for {original}")


def _put_back_before(job: Job, target: Path) -> Path | None:
    """A crash while a changed file was put back may leave it in both places: at ``target``
    and linked in the drop folder (under its own name, or a ``name~N`` beside it).  The drop
    folder keeps it: ``target``'s link is removed; returns where the file is."""
    if not _moved_changed(job, target):
        return None
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return None
    if st.st_nlink < 2:
        return None
    for place in _versions(Path(job.path)):
        if _same_inode(place, st):
            os.unlink(target)
            fsync_dir(target.parent)
            return place
    return None


def _same_inode(path: Path, st: os.stat_result) -> bool:
    try:
        other = os.lstat(path)
    except OSError:
        return False
    return (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)


def _drop_own_copies(job: Job, target: Path) -> None:
    """Remove the copies of a file's own sidecars made beside ``target`` for a file that went
    back to the drop folder: its sidecars stay with it there.  (``target``'s name was free
    with its sidecars' names, so these copies are this file's.)"""
    original = Path(job.path)
    for name in job.sidecar_paths():
        path = Path(name)
        if _own_sidecar(original, path):
            (target.parent / _sidecar_name(original, target, path)).unlink(missing_ok=True)


def _copy_sidecars(job: Job, target: Path, roots: Roots = ()) -> set[Path]:
    """Put beside the file's new place the sidecars it was found with, as they were then;
    returns the sidecars now safe in ``sent/`` or ``failed/``.

    A file's own sidecar is named after the file (``img~1.json``); the folder's sidecar is
    copied once for each content (``_metadata.yaml``, then ``_metadata~<hash>.yaml``).  A
    sidecar whose text could not be read (not UTF-8, too large) is copied byte for byte.
    """
    secured = set[Path]()
    texts = job.sidecar_texts()
    if not texts:
        return secured
    original = Path(job.path)
    mode = _note_mode(original if os.path.lexists(original) else target)
    for name, text in texts:
        path = Path(name)
        if text is None:
            raw = job.sidecar_bytes(name)
            wanted = target.parent / _sidecar_name(original, target, path)
            if raw is not None and _copy_raw(raw, wanted, roots, mode):
                secured.add(path)
        elif _own_sidecar(original, path):
            wanted = target.parent / _sidecar_name(original, target, path)
            if not any(_holds(v, text) for v in _versions(wanted)):
                _write_copy(free_target(wanted.parent, wanted.name), text, roots, mode)
            secured.add(path)
        else:
            copy = copy_name(target.parent, path.name, text)
            if not _holds(copy, text):
                _write_copy(copy, text, roots, mode)
            secured.add(path)
    return secured


def _copy_raw(data: bytes, wanted: Path, roots: Roots, mode: int) -> bool:
    """Keep a sidecar that is not text, with the bytes it had when its file was found."""
    if any(_bytes_of(v) == data for v in _versions(wanted)):
        return True
    write_new(free_target(wanted.parent, wanted.name), data, mode, roots)
    return True


def _bytes_of(path: Path) -> bytes | None:
    try:
        with sidecar_mod.open_plain(path) as fp:  # never through a link
            return fp.read()
    except (OSError, FileProblem):
        return None


def _companions(job: Job) -> Callable[[Path], list[Path]]:
    """Where the copies of ``job``'s own sidecars would go for a given target: a target
    whose sidecar name is taken is taken too, so a file and its sidecar keep one name."""
    paths = job.sidecar_paths()
    if not paths:
        return _no_companions
    original = Path(job.path)
    own = [Path(p) for p in paths if _own_sidecar(original, Path(p))]

    def names(target: Path) -> list[Path]:
        return [target.parent / _sidecar_name(original, target, path) for path in own]

    return names


def _no_companions(_target: Path) -> list[Path]:
    return []


def _own_sidecar(original: Path, sidecar: Path) -> bool:
    return sidecar.parent == original.parent and sidecar.name.startswith(original.stem + ".")


def _sidecar_name(original: Path, target: Path, sidecar: Path) -> str:
    """``img.jpg.json`` -> ``img~1.jpg.json`` when the file became ``img~1.jpg``; the
    folder's sidecar keeps its name."""
    if sidecar.name.startswith(original.name + "."):
        return target.name + sidecar.name[len(original.name) :]
    if _own_sidecar(original, sidecar):
        return target.stem + sidecar.name[len(original.stem) :]
    return sidecar.name


def copy_name(folder: Path, name: str, text: str) -> Path:
    """Where the copy of a folder's sidecar with ``text`` goes: its own name, or when that
    holds another text, ``stem~<hash>.ext`` (one copy per content, never piling up)."""
    plain = folder / name
    if not plain.exists() or _holds(plain, text):
        return plain
    return content_name(plain, text)


def has_copy(sidecar: Path, folder: Path) -> bool:
    """Did the folder's ``sidecar``, with the text it has now, go to ``folder``?"""
    text = sidecar_mod.text_of(sidecar)
    return text is not None and _holds(copy_name(folder, sidecar.name, text), text)


def _versions(path: Path) -> Iterator[Path]:
    """``path`` and the ``name~N`` copies beside it, as far as they exist."""
    yield path
    for n in range(1, MAX_SUFFIX):
        candidate = numbered(path, n)
        if not candidate.exists():
            return
        yield candidate


def _holds(path: Path, text: str) -> bool:
    return sidecar_mod.text_of(path) == text


def _write_copy(path: Path, text: str, roots: Roots, mode: int) -> None:
    write_new(path, text.encode("utf-8"), mode, roots)


def _note_mode(path: Path) -> int:
    """The mode of a note or copy describing ``path``: never wider than the file itself
    (read-write at most; 0600 for a link, whose own mode says nothing)."""
    try:
        st = os.lstat(path)
    except OSError:
        return NOTE_MODE
    return NOTE_MODE if stat.S_ISLNK(st.st_mode) else stat.S_IMODE(st.st_mode) & 0o666


def _release_sidecars(job: Job, settings: Sidecars | None, secured: set[Path]) -> None:
    """Remove a file's own sidecars from the drop folder once no file there uses them, and
    only if they still hold what the file was read with.

    The folder's sidecar stays: more files may still be dropped into the folder.  The
    watcher removes it once the folder was idle for ``folder_linger``.
    """
    if settings is None:
        return
    for name, known in job.sidecar_texts():
        path = Path(name)
        if path.name == settings.folder or path not in secured or not path.exists():
            continue
        try:
            if _rewritten(job, name, path, known):
                continue  # rewritten since: it is for a file still to come, or corrected
            if not sidecar_mod.still_needed(path, settings, leaving=[Path(job.path)]):
                path.unlink(missing_ok=True)
        except (OSError, FileUnreadable) as exc:
            log.warning("sidecar %s stays in the drop folder: %s", path, exc)


def _rewritten(job: Job, name: str, path: Path, known: str | None) -> bool:
    if known is not None:
        return sidecar_mod.text_of(path) != known
    return _bytes_of(path) != job.sidecar_bytes(name)


def _looked_up(job: Job) -> tuple[bool, bool]:
    """Is the file at the job's path now another file (other size or mtime; a link is
    followed), and is there anything at the path at all (a link counts)?  One ``lstat``
    for a file that is not a link."""
    try:
        st = os.lstat(job.path)
    except OSError:
        return False, False
    if stat.S_ISLNK(st.st_mode):
        return _replaced(job), True
    return (st.st_size, st.st_mtime_ns) != (job.size, job.mtime_ns), True


def _replaced(job: Job) -> bool:
    """Is the file at the job's path now another file (other size or mtime)?"""
    try:
        st = os.stat(job.path)
    except OSError:
        return False
    return (st.st_size, st.st_mtime_ns) != (job.size, job.mtime_ns)


def repair(
    queue: Queue,
    only: Collection[int] | None = None,
    sources: Mapping[str, Source] | None = None,
    problems: dict[int, OSError] | None = None,
) -> tuple[int, set[int]]:
    """Finish moves left in ``settling`` (by a crash, or a move that failed).

    Returns how many were finished and the ids that still cannot be moved (and puts why
    into ``problems``, when given).  ``sources`` (by name) tells which sidecars may be
    removed from the drop folders afterwards.
    """
    with MOVING:
        return _repair(queue, only, sources or {}, {} if problems is None else problems)


def _repair(
    queue: Queue,
    only: Collection[int] | None,
    sources: Mapping[str, Source],
    problems: dict[int, OSError],
) -> tuple[int, set[int]]:
    done: list[tuple[int, str]] = []
    folders: set[Path] = set()
    stuck: set[int] = set()
    lost: Lost = {}
    for job in queue.settling():
        if only is not None and job.id not in only:
            continue
        assert job.outcome
        error = json.loads(job.error) if job.error else None
        source = sources.get(job.source)
        try:
            target = Path(job.target) if job.target else _choose(queue, job, source, error, lost)
            if target is None:
                continue  # another node took the row over: it moves the file
            try:
                state, _ = _carry_out(job, target, job.outcome, error, source)
            except FileExistsError:  # its target was taken since it was chosen
                target = _choose(queue, job, source, error, lost)
                if target is None:
                    continue
                state, _ = _carry_out(job, target, job.outcome, error, source)
            done.append((job.id, state))
        except OSError as exc:
            where = job.target or f"{job.outcome}/"
            level = logging.DEBUG if no_space(exc) else logging.ERROR  # the daemon says it once
            log.log(level, "still cannot move %s to %s: %s", job.path, where, exc)
            stuck.add(job.id)
            problems[job.id] = exc
            continue
        folders.add(target.parent)
    _sync_folders(folders)
    late = queue.finish_many(done)
    leave_lost(queue.node, lost | late)
    return len(done) - len(late), stuck


def _moving(
    decision: Decision, target: Path
) -> tuple[Job, Path, str, dict[str, Any] | None, Source]:
    return decision.job, target, decision.outcome, decision.error, decision.source


def _choose(
    queue: Queue,
    job: Job,
    source: Source | None,
    error: dict[str, Any] | None,
    lost: Lost,
    *,
    outcome: str | None = None,
) -> Path | None:
    """The target of a row whose outcome was recorded before a free name could be chosen,
    or whose target another process took before the move (a rename never replaces a file:
    ``fileops.move``), recorded before the move like any other.  ``outcome``: the row's
    (``job.outcome``) unless given (a job as claimed).  None when the row is no longer this
    node's (added to ``lost``): its file is not moved."""
    if source is None:
        raise OSError(errno.ENOENT, f"where the files of source {job.source} go is unknown")
    outcome = outcome or job.outcome or "failed"
    base = source.sent if outcome == "sent" else source.failed
    target = free_target(base, job.rel, companions=_companions(job))
    taken = queue.begin_settle([(job, outcome, str(target), error)])
    lost |= taken
    return None if taken else target


def leave_lost(node: str, lost: Mapping[int, str]) -> None:
    """Say once (a line for each node) which files this node lost to another node after
    its lease ran out: it changed nothing of their rows, moved none of their files and
    counts none as sent or failed (their upload may have happened here too: delivery is
    at least once, and an archive stores an instance sent twice once)."""
    by: dict[str, int] = {}
    for holder in lost.values():
        by[holder] = by.get(holder, 0) + 1
    me = node or "this host"
    for holder, count in sorted(by.items()):
        if holder:
            log.warning(
                "node %s took over %d file(s) of this node (%s) after its lease ran out; "
                "this node leaves them to it",
                holder,
                count,
                me,
            )
        else:
            log.warning(
                "%d file(s) of this node (%s) went back to the queue after its lease ran "
                "out; this node leaves them to the node that claims them next",
                count,
                me,
            )


def move(
    src: Path,
    dst: Path,
    *,
    sync: bool = True,
    expect: tuple[int, int] | None = None,
    roots: Roots = (),
    folders: Folders | None = None,
) -> bool:
    """Rename ``src`` to ``dst``; across filesystems copy + fsync + rename + unlink
    (``fileops.move``).

    With ``sync=False`` the caller fsyncs ``dst``'s folder (once for many moves).  Across
    filesystems the source is removed only when it did not change while it was copied and
    still has ``expect`` (size, mtime_ns) when given; else the copy is removed, the source
    stays and False is returned.  No folder below ``roots`` (the source's configured
    folders) is entered through a symbolic link, and a link moved stays a link.
    """

    def unchanged(before: os.stat_result, after: os.stat_result | None, copied: int) -> bool:
        return _same(before, after, copied, expect)

    return fileops.move(
        src, dst, sync=sync, roots=roots, unchanged=unchanged, copy=_copy_all, folders=folders
    )


def _roots(source: Source | None) -> Roots:
    return () if source is None else (source.watch, source.sent, source.failed)


def _sync_folders(folders: Collection[Path], opened: Folders | None = None) -> None:
    for folder in folders:
        try:
            if opened is None:
                fsync_dir(folder)
            else:
                opened.sync(folder)
        except OSError as exc:  # the renames happened; only their durability is in doubt
            log.warning("cannot sync folder %s: %s", folder, exc)


def _same(
    before: os.stat_result,
    after: os.stat_result | None,
    copied: int,
    expect: tuple[int, int] | None,
) -> bool:
    """The file copied is whole and unchanged (and the content expected, when given): a
    writer that still adds to it would lose what it writes after the source's unlink."""
    if after is None or _identity(before) != _identity(after) or copied != after.st_size:
        return False
    return expect is None or (after.st_size, after.st_mtime_ns) == expect


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def write_reason(target: Path, error: dict[str, Any], roots: Roots = ()) -> Path:
    """Write ``<file>.error.json`` beside a failed file, atomically, never wider than the
    file (not when the file's name leaves no room for it: then the reason is only in the
    queue and the log)."""
    path = Path(str(target) + ERROR_SUFFIX)
    if len(os.fsencode(path.name)) > NAME_MAX:
        log.warning("%s: name too long for its reason file; it failed: %s", target, error)
        return path
    text = json.dumps(utf8_safe(error), indent=2, ensure_ascii=False) + "\n"  # a name not UTF-8
    write_new(path, text.encode("utf-8"), _note_mode(target), roots)
    return path


def iso(ts: float | None) -> str | None:
    """A timestamp as ISO 8601 in UTC, for error files."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else None
