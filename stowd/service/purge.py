"""Retention of ``sent/``: delete what has been there longer than a given time.

How long a file has been in ``sent/`` is read from its ``st_ctime``: moving a file into
``sent/`` (a rename, or the copy made across filesystems) sets its ctime, and reading or
sending it never does, while its mtime stays the one it was dropped with.  Caveat: anything
that changes the file's inode also sets ctime: ``chmod``, ``chown``, a new hard link (such
as a backup made with ``rsync --link-dest`` or ``cp -al``), a restore from a backup.  Those
files are kept longer than asked, never shorter.  On a filesystem that does not set ctime on
rename (some network shares), a file's age counts from its last change before the move.

The walk uses ``os.scandir`` and one ``lstat`` per entry, opens every folder relative to
its parent with ``O_NOFOLLOW`` and deletes relative to it: symbolic links are never
followed (a link in ``sent/`` is removed as a link, its target is never touched), and
nothing outside ``sent/`` is deleted, even if a folder is swapped for a link meanwhile.
File contents are never read.

Sidecar copies (``_metadata.yaml``, ``img.json``) are old files like any other, but one
that a file kept in its folder still uses stays with it.  Folders left empty are removed
(never ``sent/`` itself), and so are folders that were empty before when they have not
changed for ``older_than``; a folder being filled by a move at that moment is then too new.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from stowd.config.model import DEFAULT_FOLDER_SIDECAR, Sidecars, Source
from stowd.fileops import is_copy_name
from stowd.pipeline import sidecar as sidecar_mod
from stowd.pipeline.settle import MOVING

log = logging.getLogger("stowd.purge")

LOGGED_ERRORS = 10  # each of the first errors of a purge is logged, the rest counted
_SUFFIXES = (*sidecar_mod.SUFFIXES, *(s.upper() for s in sidecar_mod.SUFFIXES))
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True)
class PurgeResult:
    """What a purge deleted (or would delete, in a dry run)."""

    files: int
    bytes: int
    errors: tuple[str, ...] = ()
    folders: int = 0  # empty folders removed


@dataclass
class _Tally:
    cutoff: float
    dry_run: bool
    settings: Sidecars
    files: int = 0
    bytes: int = 0
    folders: int = 0
    errors: list[str] = field(default_factory=list)

    def error(self, path: str, exc: OSError) -> None:
        message = f"{path}: {exc.strerror or exc}"
        if len(self.errors) < LOGGED_ERRORS:
            log.warning("cannot purge %s", message)
        self.errors.append(message)


def purge_sent(source: Source, older_than: float, now: float, dry_run: bool = False) -> PurgeResult:
    """Delete the files that have been in ``source.sent`` for more than ``older_than``
    seconds at time ``now`` (see the module's doc for how that is told), then the folders
    left empty.  With ``dry_run`` nothing is deleted; the counts say what would be."""
    if older_than <= 0:
        raise ValueError(f"older_than must be more than 0 seconds, got {older_than:g}")
    tally = _Tally(now - older_than, dry_run, source.sidecars or Sidecars())
    try:
        fd = os.open(source.sent, _DIR_FLAGS & ~os.O_NOFOLLOW)  # sent/ itself may be a link
    except FileNotFoundError:
        return PurgeResult(0, 0)
    except OSError as exc:
        tally.error(str(source.sent), exc)
    else:
        try:
            _purge_folder(fd, str(source.sent), tally)  # sent/ itself is never removed
        finally:
            os.close(fd)
    result = PurgeResult(tally.files, tally.bytes, tuple(tally.errors), tally.folders)
    _log(source, older_than, result, dry_run)
    return result


def _log(source: Source, older_than: float, result: PurgeResult, dry_run: bool) -> None:
    level = logging.INFO if result.files or result.folders or result.errors else logging.DEBUG
    log.log(
        level,
        "source %s: %s %d file(s) (%.1f MB) and %d empty folder(s) in %s older than %gd%s",
        source.name,
        "would purge" if dry_run else "purged",
        result.files,
        result.bytes / 1e6,
        result.folders,
        source.sent,
        older_than / 86400,
        f"; {len(result.errors)} could not be deleted" if result.errors else "",
    )


@dataclass
class _Folder:
    """A folder being purged: open as ``fd``, listed, walked entry by entry."""

    fd: int
    shown: str
    entries: list[os.DirEntry[str]]
    name: str = ""  # in its parent ("" for sent/ itself)
    mtime: float = 0.0
    at: int = 0
    files: dict[str, os.stat_result] = field(default_factory=dict)
    left: int = 0
    changed: bool = False

    def add(self, gone: bool, below: bool) -> None:
        """A sub-folder was purged: is it gone, was anything removed below it."""
        self.left += not gone
        self.changed = self.changed or below or gone


def _purge_folder(fd: int, shown: str, tally: _Tally) -> tuple[bool, bool]:
    """Purge the folder open as ``fd``: (is it empty now, was anything removed below it).
    Walked with a stack of open folders, not by recursion: folders nested a thousand deep
    raised ``RecursionError``."""
    top = _listed(fd, shown, "", 0.0, tally)
    if top is None:
        return False, False
    stack = [top]
    try:
        while True:
            folder = stack[-1]
            name = _next_folder(folder, tally)
            if name is not None:
                inner = _enter(folder, name, tally)
                if isinstance(inner, _Folder):
                    stack.append(inner)
                else:
                    folder.add(*inner)
                continue
            staying = _purge_files(folder.fd, folder.shown, folder.files, tally)
            empty = folder.left + staying == 0
            changed = folder.changed or staying < len(folder.files)
            stack.pop()
            if not stack:
                return empty, changed
            os.close(folder.fd)
            stack[-1].add(*_leave(stack[-1].fd, folder, empty, changed, tally))
    finally:
        for folder in stack[1:]:
            os.close(folder.fd)


def _listed(fd: int, shown: str, name: str, mtime: float, tally: _Tally) -> _Folder | None:
    try:
        with os.scandir(fd) as it:
            entries = list(it)
    except OSError as exc:
        tally.error(shown, exc)
        return None
    return _Folder(fd, shown, entries, name, mtime)


def _next_folder(folder: _Folder, tally: _Tally) -> str | None:
    """Note the files of ``folder`` up to its next sub-folder; that one's name (None: done)."""
    while folder.at < len(folder.entries):
        entry = folder.entries[folder.at]
        folder.at += 1
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        except OSError as exc:
            tally.error(os.path.join(folder.shown, entry.name), exc)
            folder.left += 1
            continue
        if stat.S_ISDIR(info.st_mode):
            return entry.name
        if stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode):
            folder.files[entry.name] = info
        else:
            folder.left += 1  # a socket or a pipe: not ours
    return None


def _enter(parent: _Folder, name: str, tally: _Tally) -> _Folder | tuple[bool, bool]:
    """A sub-folder opened and listed; or, when it cannot be, (is it gone, anything removed)."""
    shown = os.path.join(parent.shown, name)
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent.fd)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return True, False
        tally.error(shown, exc)  # ELOOP: replaced by a link since it was listed
        return False, False
    try:
        folder = _listed(fd, shown, name, os.fstat(fd).st_mtime, tally)
    except BaseException:
        os.close(fd)
        raise
    if folder is None:
        os.close(fd)
        return False, False
    return folder


def _leave(
    parent: int, folder: _Folder, empty: bool, changed: bool, tally: _Tally
) -> tuple[bool, bool]:
    """Remove a purged sub-folder once empty: (is it gone, was anything removed below it).
    A folder that was empty already goes only if it has not changed for ``older_than``
    (the daemon may have just made it for a file it moves)."""
    if not empty or not (changed or folder.mtime < tally.cutoff):
        return False, changed
    return _remove_folder(parent, folder.name, folder.shown, tally), changed


def _remove_folder(parent: int, name: str, shown: str, tally: _Tally) -> bool:
    if tally.dry_run:
        tally.folders += 1
        return True
    try:
        with MOVING:  # never between the daemon's mkdir of a folder and its move into it
            os.rmdir(name, dir_fd=parent)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return True
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):  # else: a file arrived
            tally.error(shown, exc)
        return False
    tally.folders += 1
    return True


def _purge_files(fd: int, shown: str, files: dict[str, os.stat_result], tally: _Tally) -> int:
    """Delete the old files of one folder, data files first, then the sidecar copies no
    remaining file uses; returns how many files stay."""
    data = sorted(n for n in files if not _sidecar_like(n, tally.settings))
    kept = [n for n in data if not _purge_file(fd, shown, n, files[n], tally)]
    sidecars = sorted(n for n in files if _sidecar_like(n, tally.settings))
    kept += [
        n
        for n in sidecars
        if _used(n, kept, tally.settings) or not _purge_file(fd, shown, n, files[n], tally)
    ]
    return len(kept)


def _purge_file(fd: int, shown: str, name: str, info: os.stat_result, tally: _Tally) -> bool:
    """Delete one file if it is old enough; True when it is gone (or would be)."""
    if info.st_ctime >= tally.cutoff:
        return False
    if not tally.dry_run:
        try:
            os.unlink(name, dir_fd=fd)
        except FileNotFoundError:
            return True
        except OSError as exc:
            tally.error(os.path.join(shown, name), exc)
            return False
    tally.files += 1
    tally.bytes += info.st_size
    return True


def _sidecar_like(name: str, settings: Sidecars) -> bool:
    return _is_folder_copy(name, settings) or Path(name).suffix in _SUFFIXES


def _is_folder_copy(name: str, settings: Sidecars) -> bool:
    """``_metadata.yaml`` and its copies ``_metadata~<hash>.yaml``, ``_metadata~N.yaml``."""
    return is_copy_name(name, settings.folder or DEFAULT_FOLDER_SIDECAR)


def _used(name: str, kept: list[str], settings: Sidecars) -> bool:
    """Is the sidecar copy ``name`` used by a file that stays in its folder?"""
    if _is_folder_copy(name, settings):
        return any(not _sidecar_like(k, settings) for k in kept)
    return any(name in _per_file_names(k) for k in kept)


def _per_file_names(name: str) -> set[str]:
    stem = Path(name).stem
    return {*(stem + s for s in _SUFFIXES), *(name + s for s in _SUFFIXES)}
