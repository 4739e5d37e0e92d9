"""Durable file operations: the one home for moving, copying and writing files on disk.

It holds the primitives that settle (``sent/``, ``failed/``), ``stowd retry`` (put-back),
purge, the daemon's state file and migrate's report use; the decisions (which name, whether
a file changed while it was read, what a sidecar is) stay with them:

* ``move``: rename, or across filesystems copy under a hidden temporary name, fsync the
  copy, rename it into place, fsync the folder, then unlink the source; never replacing a
  file at the target (``FileExistsError``: a hard link, then unlink, see ``_place``).  A
  caller's ``unchanged`` check decides whether the source may be unlinked.
* ``move_new`` / ``copy_new`` / ``rename_new``: the same, but never replacing a file that is
  at the target (a hard link, then unlink; a checked rename where there are no links).
* ``write_new``: a whole file written under a temporary name and renamed over the target
  (a reader sees the old or the new one), with an explicit mode whatever the umask.
* ``open_folder`` / ``make_folders``: folders entered (and made, each with the mode of the
  folder it is made in) without following a symbolic link below a configured root;
  ``is_link_refusal``: whether such an open failed on a link (also used by ``dropped``).
* ``fsync_dir``: a folder's entries to disk; ``numbered`` and ``is_copy_name``: the names
  of copies (``name~N``, ``stem~<sha12>.ext``); ``walk_folders``: a walk without recursion.

Durability: a file's bytes are fsynced before it is renamed into place, and its folder is
fsynced after (``sync=False`` leaves that to a caller that syncs a folder once for many
moves).  It imports nothing of stowd, so it can move with the modules that use it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

NAME_MAX = 255  # bytes in one file name (ext4, XFS, btrfs, NTFS via SMB)
COPY_CHUNK = 1024 * 1024
# folders a batch of moves keeps open (``Folders``): a few per batch in practice, and far
# below the 1024 open files a service gets by default
FOLDERS_KEPT_OPEN = 32
TMP_SUFFIX = ".stowd-tmp"  # a hidden ``.<name>.stowd-tmp``: the watcher skips ``.*``
_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
# link() refused: the filesystem or its protections allow no (more) hard links there
NO_HARD_LINK = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS})
NO_LINK = NO_HARD_LINK | {errno.EXDEV}  # no link at all: a rename or a copy then

Roots = tuple[Path, ...]  # a source's configured folders: no link is followed below them
Here = tuple[int, str]  # an open folder and a name in it
CopyAll = Callable[[BinaryIO, BinaryIO], int]
# (stat before the copy, stat after it or None, bytes copied) -> may the source go?
Unchanged = Callable[[os.stat_result, "os.stat_result | None", int], bool]


# --------------------------------------------------------------------------- names


def numbered(path: Path, n: int) -> Path:
    """``img~N.dcm`` for ``img.dcm`` (``name~N`` without a suffix): the name a copy gets
    when ``img.dcm`` is taken."""
    name = f"{path.stem}~{n}{path.suffix}" if path.suffix else f"{path.name}~{n}"
    return path.with_name(name)


def content_name(path: Path, text: str) -> Path:
    """``stem~<sha12>.ext``: the name of the copy of ``path`` holding ``text``."""
    tag = hashlib.sha256(text.encode()).hexdigest()[:12]
    return path.with_name(f"{path.stem}~{tag}{path.suffix}")


def is_copy_name(name: str, plain: str) -> bool:
    """Is ``name`` the file ``plain`` or one of its copies: ``stem~N.ext`` (``numbered``)
    or ``stem~<sha12>.ext`` (``content_name``)?  Nothing else: ``stem~notes.ext`` is not."""
    path = Path(plain)
    stem, suffix = (path.stem, path.suffix) if path.suffix else (path.name, "")
    pattern = re.escape(stem) + r"(~[0-9a-f]{12}|~[0-9]+)?" + re.escape(suffix)
    return re.fullmatch(pattern, name) is not None


def tmp_beside(path: Path, suffix: str = TMP_SUFFIX) -> Path:
    """A hidden temporary name beside ``path``: ``.<name><suffix>``, or a hash of the name
    when that would be too long for the filesystem."""
    tmp = path.with_name(f".{path.name}{suffix}")
    if len(os.fsencode(tmp.name)) <= NAME_MAX:
        return tmp
    return path.with_name(f".{hashlib.sha256(os.fsencode(path.name)).hexdigest()[:16]}{suffix}")


# --------------------------------------------------------------------------- folders


def fsync_dir(folder: Path) -> None:
    """Put ``folder``'s entries (names renamed, made or removed in it) on disk."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_folders(folder: Path) -> list[Path]:
    """``folder`` and its missing parents, each made with the mode of the folder it is made
    in (so a folder made in a drop folder is open to that folder's writers, no more), and
    without recursion: ``Path.mkdir(parents=True)`` recursed once per missing folder and
    raised ``RecursionError`` for a file nested a thousand folders deep.  Returns the folders
    it made, outermost first (their entries are the caller's to fsync where that matters)."""
    missing = []
    while not folder.is_dir() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    made = []
    for each in reversed(missing):
        try:
            each.mkdir(mode=each.parent.stat().st_mode & 0o777)
            made.append(each)
        except FileExistsError:
            if not each.is_dir():
                raise
    return made


@contextlib.contextmanager
def open_folder(folder: Path, roots: Roots = (), *, create: bool = True) -> Iterator[int]:
    """An open ``folder`` (made as needed, see ``make_folders``).  The outermost of
    ``roots`` holding ``folder`` is opened as configured; every folder below it is entered
    without following a symbolic link, which fails with an ``OSError`` saying so (a writer
    of the drop folder may have planted it).  Outside every root only ``folder`` itself is
    opened as it is."""
    fd = _open_folder(folder, roots, create)
    try:
        yield fd
    finally:
        os.close(fd)


def _open_folder(folder: Path, roots: Roots, create: bool) -> int:
    """``open_folder``'s descriptor, the caller's to close."""
    start = min(
        (r for r in roots if folder == r or r in folder.parents), key=_depth, default=folder
    )
    if create:
        with contextlib.suppress(FileExistsError):  # not a folder: opening it says so
            make_folders(start)
    fd = os.open(start, _FOLDER)
    try:
        for name in folder.relative_to(start).parts:
            inner = _enter(fd, name, create, start)
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


class Folders:
    """Folders opened once for many moves (a batch), each as ``open_folder`` opens it (made
    as needed, no link followed below the roots), kept open until the block ends: a folder
    is looked up and opened once per batch, not twice per file.  ``sync`` fsyncs one through
    its open descriptor.  At most ``FOLDERS_KEPT_OPEN`` stay open (the least recently used
    is closed first, and synced through its path): a batch spread over many folders must not
    run out of open files (``ulimit -n``)."""

    def __init__(self) -> None:
        # by the folder's name and its roots' number (``_roots_key``): least recently used first
        self._fds: dict[tuple[str, int], int] = {}
        self._roots: dict[Roots, int] = {}
        self._last: tuple[Roots, int] | None = None  # the roots asked for last, and their number

    def __enter__(self) -> Folders:
        return self

    def __exit__(self, *_exc: object) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def fd(self, folder: Path | str, roots: Roots = (), *, create: bool = True) -> int:
        """``folder`` (a normal path: a ``Path``'s text), open (opened now when it is not
        yet; ``create``: made as needed)."""
        key = (os.fspath(folder), self._roots_key(roots))
        fd = self._fds.pop(key, None)
        if fd is None:
            fd = _open_folder(Path(folder), roots, create)
            while len(self._fds) >= FOLDERS_KEPT_OPEN:  # never the ones just used (a move's)
                os.close(self._fds.pop(next(iter(self._fds))))
        self._fds[key] = fd  # the most recently used last
        return fd

    def _roots_key(self, roots: Roots) -> int:
        """A number for ``roots``: a key of a name and a number is hashed and compared
        without a call per ``Path`` (two lookups for each move).  The roots of the last
        move are most often the same folders again, compared one by one by identity first."""
        if self._last is None or roots != self._last[0]:
            self._last = (roots, self._roots.setdefault(roots, len(self._roots)))
        return self._last[1]

    def sync(self, folder: Path) -> None:
        """Put ``folder``'s entries on disk (``fsync_dir``), through its open descriptor
        when it is open here."""
        name = str(folder)
        fd = next((fd for (path, _), fd in self._fds.items() if path == name), None)
        if fd is None:
            fsync_dir(folder)
        else:
            os.fsync(fd)


def _depth(path: Path) -> int:
    return len(path.parts)


def _enter(parent: int, name: str, create: bool, start: Path) -> int:
    """Open the folder ``name`` in ``parent`` (made first when missing), never a link."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, os.fstat(parent).st_mode & 0o777, dir_fd=parent)
    try:
        return os.open(name, _FOLDER | os.O_NOFOLLOW, dir_fd=parent)
    except OSError as exc:
        if not is_link_refusal(exc, parent, name):
            raise
    raise OSError(
        errno.ELOOP,
        f"the folder {name} (below {start}) is a symbolic link; stowd never moves or writes "
        "a file through a link in its folders (a writer of the drop folder could have "
        "planted it); make it a real folder again and the move is tried again",
    )


def is_link_refusal(exc: OSError, parent: int, name: str) -> bool:
    """Whether ``exc``, raised by opening ``name`` in the folder ``parent`` with
    ``O_NOFOLLOW``, means that ``name`` is a symbolic link (not a missing or unreadable
    entry)."""
    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
        return False
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
    except OSError:
        return False


# One lock per root folder (a watched folder), held while empty folders under it are removed,
# and by a writer (the C-STORE receiver) from making a folder until its file is in it: else a
# folder just made, still empty, can be removed first.  Per root: a removal that hangs (a drop
# folder on an unanswering network share) holds up no other root's writers.
_folder_locks: dict[str, threading.Lock] = {}
_folder_locks_lock = threading.Lock()


def folders_lock(root: Path) -> threading.Lock:
    """The lock between removing empty folders under ``root`` and making one to fill."""
    with _folder_locks_lock:
        return _folder_locks.setdefault(os.path.abspath(root), threading.Lock())


def remove_empty_parents(path: Path, root: Path) -> None:
    """Remove now-empty folders between ``path``'s folder and ``root`` (never ``root``)."""
    folder = path.parent
    with folders_lock(root):
        while folder != root and root in folder.parents:
            with contextlib.suppress(OSError):
                folder.rmdir()
            if folder.exists():
                return
            folder = folder.parent


def walk_folders(
    top: str,
    enter: Callable[[os.DirEntry[str]], bool],
    on_error: Callable[[str, OSError], None],
    *,
    sort: bool = False,
) -> Iterator[tuple[str, Iterator[os.DirEntry[str]]]]:
    """Each folder below ``top`` (``top`` first) with its entries, listed as they are read
    (by name with ``sort``, which lists a folder whole).  Then each sub-folder for which
    ``enter`` is true, depth first, in the order listed; a symbolic link to a folder is
    never entered.  Walked without recursion (folders nested thousands deep raised
    ``RecursionError``); the folders still to walk are kept as paths, so memory grows with
    the folders, not the files.  A folder that cannot be listed (or whose listing, or
    ``enter``, fails part way) goes to ``on_error``; the walk goes on.  Entries the caller
    leaves unread are still listed, for their sub-folders."""
    todo = [top]
    while todo:
        folder = todo.pop()
        found: list[str] = []
        entries = _listing(folder, enter, on_error, found, sort)
        yield folder, entries
        for _ in entries:
            pass
        todo.extend(reversed(found))


def _listing(
    folder: str,
    enter: Callable[[os.DirEntry[str]], bool],
    on_error: Callable[[str, OSError], None],
    found: list[str],
    sort: bool,
) -> Iterator[os.DirEntry[str]]:
    """The entries of ``folder``; the sub-folders to walk next are added to ``found``."""
    try:
        with os.scandir(folder) as it:
            for entry in sorted(it, key=_name) if sort else it:
                if entry.is_dir(follow_symlinks=False) and enter(entry):
                    found.append(entry.path)
                yield entry
    except OSError as exc:
        on_error(folder, exc)


def _name(entry: os.DirEntry[str]) -> str:
    return entry.name


# --------------------------------------------------------------------------- moving


def move(
    src: Path,
    dst: Path,
    *,
    sync: bool = True,
    roots: Roots = (),
    unchanged: Unchanged | None = None,
    copy: CopyAll | None = None,
    folders: Folders | None = None,
) -> bool:
    """Rename ``src`` to ``dst``; across filesystems copy + fsync + rename + unlink.

    With ``sync=False`` the caller fsyncs ``dst``'s folder (once for many moves).  Across
    filesystems the source is removed only when ``unchanged`` (asked once after the copy
    and once more just before the unlink) says so; else the copy is removed, the source
    stays and False is returned.  No folder below ``roots`` is entered through a symbolic
    link, and a link moved stays a link.  ``copy`` copies the bytes (``copy_all``).
    ``folders``: the folders of a batch of moves, kept open (else each is opened here).
    """
    how = (unchanged, copy or copy_all, sync)
    if folders is not None:  # each folder by its name: no Path made for it per move
        (src_dir, src_name), (dst_dir, dst_name) = os.path.split(src), os.path.split(dst)
        here = folders.fd(src_dir or os.curdir, roots, create=False)  # as Path.parent names it
        there = folders.fd(dst_dir or os.curdir, roots)
        return _move_in((here, src_name), (there, dst_name), *how)
    leaving = open_folder(src.parent, roots, create=False)
    with leaving as here, open_folder(dst.parent, roots) as there:
        return _move_in((here, src.name), (there, dst.name), *how)


def _move_in(src: Here, dst: Here, unchanged: Unchanged | None, copy: CopyAll, sync: bool) -> bool:
    """``move`` between two open folders."""
    there = dst[0]
    try:
        _place(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        if not _copy_across(src, dst, unchanged, copy):
            return False
    if sync:
        os.fsync(there)
    return True


def _copy_across(src: Here, dst: Here, unchanged: Unchanged | None, copy: CopyAll) -> bool:
    """Copy, fsync, rename into place, fsync, then unlink ``src`` (each a folder and a
    name); a symbolic link is copied as a link, never followed."""
    (here, name), (there, dst_name) = src, dst
    tmp = tmp_beside(Path(dst_name)).name
    try:
        fin = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=here)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        return _link_across(src, dst, tmp)
    try:
        before, after, copied = copy_to(fin, (there, tmp), copy)
    except BaseException:
        # a part copy (a full disk) must not stay: it would keep that disk full for others
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=there)
        raise
    if unchanged is not None and not unchanged(before, after, copied):
        os.unlink(tmp, dir_fd=there)
        return False
    try:
        _place((there, tmp), (there, dst_name))
    except FileExistsError:
        if not _same_bytes((there, tmp), (there, dst_name)):
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=there)
            raise
        # the copy put in place before a crash left the source: finish, never a second copy
        os.unlink(tmp, dir_fd=there)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=there)
        raise
    os.fsync(there)
    if unchanged is not None and not unchanged(after, stat_or_none(here, name), copied):
        os.unlink(dst_name, dir_fd=there)  # changed at the last moment
        os.fsync(there)
        return False
    os.unlink(name, dir_fd=here)
    return True


def _place(src: Here, dst: Here) -> None:
    """Rename ``src`` to ``dst`` (each a folder and a name), never replacing a file at
    ``dst`` (``FileExistsError``): a hard link, then unlink ``src``.  Moves into a folder
    that several processes fill (the nodes of a fleet settling into one shared ``sent/``)
    each choose a free name first, but another may take it before the move: a rename
    would replace that file, which would be lost.  A link left by a crash between the two
    steps (``dst`` is ``src``'s inode) is finished.  Where the filesystem has no hard links:
    check, then rename (a file appearing in between loses).  ``EXDEV``: raised."""
    (here, name), (there, dst_name) = src, dst
    try:
        os.link(name, dst_name, src_dir_fd=here, dst_dir_fd=there, follow_symlinks=False)
    except OSError as exc:
        if exc.errno == errno.EEXIST and _same_file(src, dst):
            os.unlink(name, dir_fd=here)  # linked before a crash: the unlink was left
            return
        if exc.errno == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst_name) from None
        if exc.errno not in NO_HARD_LINK:
            raise
        if stat_or_none(there, dst_name) is not None:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst_name) from None
        os.rename(name, dst_name, src_dir_fd=here, dst_dir_fd=there)
        return
    os.unlink(name, dir_fd=here)


def _same_bytes(a: Here, b: Here) -> bool:
    """Whether two regular files (each a folder and a name) hold the same bytes."""
    first, second = stat_or_none(*a), stat_or_none(*b)
    if first is None or second is None or first.st_size != second.st_size:
        return False
    if not (stat.S_ISREG(first.st_mode) and stat.S_ISREG(second.st_mode)):
        return False
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    with (
        os.fdopen(os.open(a[1], flags, dir_fd=a[0]), "rb") as fa,
        os.fdopen(os.open(b[1], flags, dir_fd=b[0]), "rb") as fb,
    ):
        while chunk := fa.read(COPY_CHUNK):
            if chunk != fb.read(len(chunk)):
                return False
    return True


def _same_file(a: Here, b: Here) -> bool:
    first, second = stat_or_none(*a), stat_or_none(*b)
    return first is not None and second is not None and os.path.samestat(first, second)


def _link_across(src: Here, dst: Here, tmp: str) -> bool:
    """Move a symbolic link to another filesystem: the same link there, then unlink it."""
    (here, name), (there, dst_name) = src, dst
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=there)
    os.symlink(os.readlink(name, dir_fd=here), tmp, dir_fd=there)
    try:
        _place((there, tmp), (there, dst_name))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=there)
        raise
    os.fsync(there)
    os.unlink(name, dir_fd=here)
    return True


def copy_to(
    fin: int, tmp: Here, copy: CopyAll | None = None
) -> tuple[os.stat_result, os.stat_result, int]:
    """Copy the open file ``fin`` (closed here) to ``tmp`` (a folder and a name) with its
    mode and times, and fsync it; ``fin``'s stat before and after, and the bytes copied."""
    there, name = tmp
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    with os.fdopen(fin, "rb") as fp:
        before = os.fstat(fp.fileno())
        mode = stat.S_IMODE(before.st_mode)
        with os.fdopen(os.open(name, flags, mode, dir_fd=there), "wb") as fout:
            copied = (copy or copy_all)(fp, fout)
            fout.flush()
            os.fchmod(fout.fileno(), mode)
            os.utime(fout.fileno(), ns=(before.st_atime_ns, before.st_mtime_ns))
            os.fsync(fout.fileno())
        after = os.fstat(fp.fileno())
    return before, after, copied


def copy_all(fin: BinaryIO, fout: BinaryIO) -> int:
    """Copy ``fin`` to ``fout`` in chunks; the number of bytes copied."""
    copied = 0
    while chunk := fin.read(COPY_CHUNK):
        fout.write(chunk)
        copied += len(chunk)
    return copied


def stat_or_none(folder: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=folder, follow_symlinks=False)
    except OSError:
        return None


# --------------------------------------------------------------------------- never replacing


def move_new(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, never replacing a file there (``FileExistsError``); across
    filesystems copy, fsync, put in place, then remove ``src``.  The caller fsyncs
    ``dst``'s folder."""
    make_folders(dst.parent)
    try:
        rename_new(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        copy_new(src, dst)
        os.unlink(src)


def copy_new(src: Path, dst: Path) -> None:
    """Put a copy of ``src`` (a file, or a symbolic link as a link) at ``dst``, synced to
    disk (bytes, then mode, times and extended attributes), under a hidden temporary name
    first; never replaces a file at ``dst``."""
    make_folders(dst.parent)
    tmp = tmp_beside(dst)
    tmp.unlink(missing_ok=True)
    try:
        if src.is_symlink():
            os.symlink(os.readlink(src), tmp)
        else:
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                copy_all(fin, fout)
                fout.flush()
                shutil.copystat(src, tmp)
                os.fsync(fout.fileno())
        rename_new(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def rename_new(src: Path, dst: Path) -> None:
    """``rename`` that never replaces ``dst``: a hard link, then unlink ``src``.  Where the
    filesystem has no hard links: check, then rename (a file appearing in between loses)."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in NO_HARD_LINK:
            raise  # EEXIST: taken; EXDEV: the caller copies
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.rename(src, dst)
        return
    os.unlink(src)


# --------------------------------------------------------------------------- writing


def write_new(
    path: Path,
    data: bytes,
    mode: int | None,
    roots: Roots = (),
    *,
    suffix: str = TMP_SUFFIX,
    create: bool = True,
    sync: bool = True,
) -> None:
    """Write ``path`` whole: a temporary name beside it, then renamed over it (a reader
    sees the old file or the new one, whole), never through a symbolic link (below
    ``roots``, see ``open_folder``; its folder is made unless ``create`` is false).  With
    ``mode`` whatever the umask; ``None`` only for a file the user names (a report): then
    as ``open`` makes it, 0666 less the umask.  The data is fsynced before the rename
    (``sync``), so a power loss leaves the old file or the whole new one, never an empty
    one; whoever counts the file as kept syncs its folder.  Only a file rewritten every few
    seconds and worth nothing after a crash (the daemon's state file) passes ``sync=False``."""
    tmp = tmp_beside(path, suffix)
    with open_folder(path.parent, roots, create=create) as here:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp.name, flags, 0o666 if mode is None else mode, dir_fd=here)
        try:
            if mode is not None:
                os.fchmod(fd, mode)  # a leftover temporary file may have had another mode
            _write_all(fd, data)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp.name, path.name, src_dir_fd=here, dst_dir_fd=here)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
