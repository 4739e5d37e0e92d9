"""Opening a dropped file without letting the drop folder's writers point stowd elsewhere.

The writers of a drop folder have fewer rights than stowd.  A symbolic link they plant (the
file itself, or a folder on its path) would make stowd read, and upload, a file they cannot
read themselves.  So, unless the source says ``follow_links: true``, a dropped file is
opened from its watch folder one name at a time with ``O_NOFOLLOW``: a link anywhere below
the watch folder is refused with ``LinkRefused`` (the file fails with that reason), and a
link planted after the file was checked is refused too, since every read opens it so.

The worker registers the sources with ``configure``; a path under no registered watch
folder (a spool copy, a test's own file) is opened as it always was.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO, Protocol, cast

from stowd.errors import FileProblem, LinkRefused
from stowd.fileops import is_link_refusal

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO never blocks
_LOCK = threading.Lock()
_GUARDED: dict[str, bool] = {}  # watch folder -> follow_links
# the guarded folders (follow_links false), each with its separator, the longest first: read
# without the lock (replaced whole by ``configure``), once per file opened
_GUARDED_ROOTS: tuple[tuple[str, str], ...] = ()
ADVICE = (
    "stowd does not follow symbolic links in a drop folder (a writer could point one at a "
    "file it cannot read itself); put the file itself there, or set follow_links: true on "
    "the source (see follow_links in docs/configuration.md for the risk)"
)


class Guarded(Protocol):
    """What ``configure`` reads of a source (``config.model.Source``)."""

    @property
    def watch(self) -> Path: ...

    @property
    def follow_links(self) -> bool: ...


def configure(sources: Iterable[Guarded]) -> None:
    """Guard the watch folders of ``sources`` (each with its ``follow_links``)."""
    global _GUARDED_ROOTS  # noqa: PLW0603 - one snapshot read by every opening thread
    with _LOCK:
        for source in sources:
            _GUARDED[str(source.watch)] = source.follow_links
        roots = sorted((r for r, follow in _GUARDED.items() if not follow), key=len, reverse=True)
        _GUARDED_ROOTS = tuple((r, r.rstrip(os.sep) + os.sep) for r in roots)


def open_file(
    path: str | Path, opener: Callable[..., Any] | None = None, *, unbuffered: bool = False
) -> BinaryIO:
    """Open a dropped file for reading in binary; ``LinkRefused`` for a refused link.
    ``opener`` opens a path under no guarded watch folder (a caller's seam for tests).
    ``unbuffered``: a raw file (``io.FileIO``), each read one system call that may give fewer
    bytes than asked, for a file read in a few large reads (no buffer set up, no terminal
    check, no seek to learn the position)."""
    text = os.fspath(path)
    root = _root_of(text)
    buffering = 0 if unbuffered else -1
    if root is None:
        if opener is not None:  # a test's, which may take a path and mode only
            return cast(BinaryIO, opener(text, "rb", *((0,) if unbuffered else ())))
        # open looked up now (a seam); named by the path (pydicom reopens it by that name)
        return open(text, "rb", buffering, opener=_open_unguarded)
    fd = _open_beneath(root, _relative(text, root), text)
    try:
        os.set_blocking(fd, True)
        raw = io.FileIO(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    # buffered as ``open`` buffers a file, without its look for a terminal (an ioctl)
    return cast(BinaryIO, raw if unbuffered else io.BufferedReader(raw))


def _open_unguarded(path: str, flags: int) -> int:
    """``open``'s opener for a path under no guarded watch folder: a FIFO put where a file
    was is opened without waiting for a writer (as beneath a guarded one: ``_FILE``), then
    read as any file (it is refused as empty).  A plain ``open`` waited for a writer forever,
    and every file queued behind it with it."""
    fd = os.open(path, flags | os.O_NONBLOCK)
    try:
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _root_of(path: str) -> str | None:
    """The guarded watch folder holding ``path`` (the innermost), or None."""
    for root, inside in _GUARDED_ROOTS:
        if path.startswith(inside):
            return root
    return None


def _relative(path: str, root: str) -> str:
    """``os.path.relpath(path, root)`` for a ``path`` under ``root``: a normal path (the
    watcher's) is cut where root ends, without relpath's two abspaths (a path holding ``.``,
    ``..`` or ``//`` still goes through relpath)."""
    if os.path.normpath(path) == path:
        return path[len(root.rstrip(os.sep)) + 1 :]
    return os.path.relpath(path, root)


def _open_beneath(root: str, rel: str, path: str) -> int:
    """Open ``root/rel`` with no symbolic link in ``rel`` (``root`` itself is configured)."""
    names = rel.split(os.sep)
    if "" in names or os.curdir in names or os.pardir in names:
        # The watcher only hands on normal paths; anything else would walk out of root.
        raise FileProblem("the path leaves its watch folder; stowd reads only inside it", path=path)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, name in enumerate(names[:-1]):
            inner = _open_name(name, _DIR, fd, path, os.sep.join(names[: i + 1]))
            os.close(fd)
            fd = inner
        return _open_name(names[-1], _FILE, fd, path, rel)
    finally:
        os.close(fd)


def _open_name(name: str, flags: int, parent: int, path: str, shown: str) -> int:
    try:
        return os.open(name, flags, dir_fd=parent)
    except OSError as exc:
        if not is_link_refusal(exc, parent, name):
            raise
    if flags == _FILE:
        raise LinkRefused(f"the file is a symbolic link; {ADVICE}", path=path)
    raise LinkRefused(f"the folder {shown} on its path is a symbolic link; {ADVICE}", path=path)
