"""The primitives of ``stowd.fileops``: durable moves (across filesystems too), never
overwriting, the names of copies, whole-file writes with explicit modes, the folder walk."""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mounts import tmpfs

from stowd import fileops


@pytest.fixture
def other_fs(tmp_path: Path) -> Iterator[Path]:
    """A folder on another filesystem than ``tmp_path`` (a small tmpfs)."""
    with tmpfs(tmp_path / "mnt", "4m") as folder:
        assert os.stat(folder).st_dev != os.stat(tmp_path).st_dev
        yield folder


@pytest.fixture
def umask_000() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def dropped(path: Path, data: bytes, mode: int = 0o640) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    os.utime(path, ns=(1_700_000_000_123_456_789, 1_600_000_000_987_654_321))
    return path


def record_syncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record, in order, each fsync (of a file or a folder) and each rename or hard link
    (how a name is put in place without replacing a file there)."""
    events: list[str] = []
    real_fsync, real_rename, real_link = os.fsync, os.rename, os.link

    def fsync(fd: int) -> None:
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def rename(src: Any, dst: Any, **kw: Any) -> None:
        real_rename(src, dst, **kw)
        events.append("rename")

    def link(src: Any, dst: Any, **kw: Any) -> None:
        real_link(src, dst, **kw)
        events.append("link")

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "link", link)
    return events


# --------------------------------------------------------------------------- move


def test_a_move_across_filesystems_copies_syncs_renames_syncs_then_unlinks(
    tmp_path: Path, other_fs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = dropped(tmp_path / "drop/a.dcm", b"D" * 300_000)
    before = src.stat()
    events = record_syncs(monkeypatch)

    assert fileops.move(src, other_fs / "sent/P/a.dcm")

    moved = other_fs / "sent/P/a.dcm"
    assert moved.read_bytes() == b"D" * 300_000 and not src.exists()
    assert stat.S_IMODE(moved.stat().st_mode) == 0o640
    assert moved.stat().st_mtime_ns == before.st_mtime_ns
    assert sorted(os.listdir(moved.parent)) == ["a.dcm"]  # no temporary name left
    # the copy's bytes on disk before it gets its name, the name on disk before the unlink
    # (the folder once more after: ``sync=True``)
    assert events == ["fsync file", "link", "fsync folder", "fsync folder"]


def test_a_move_across_filesystems_keeps_the_source_when_the_check_says_it_changed(
    tmp_path: Path, other_fs: Path
) -> None:
    src = dropped(tmp_path / "drop/a.dcm", b"D" * 1000)
    asked: list[int] = []

    def unchanged(_before: os.stat_result, _after: os.stat_result | None, copied: int) -> bool:
        asked.append(copied)
        return False

    assert not fileops.move(src, other_fs / "a.dcm", unchanged=unchanged)
    assert src.read_bytes() == b"D" * 1000 and asked == [1000]
    assert os.listdir(other_fs) == []  # neither the copy nor its temporary name


def test_a_link_moved_across_filesystems_stays_a_link(tmp_path: Path, other_fs: Path) -> None:
    (tmp_path / "drop").mkdir()
    link = tmp_path / "drop/a.dcm"
    link.symlink_to("../elsewhere/a.dcm")
    assert fileops.move(link, other_fs / "a.dcm")
    assert os.readlink(other_fs / "a.dcm") == "../elsewhere/a.dcm"
    assert not os.path.lexists(link)


def test_a_move_never_enters_a_linked_folder_below_a_root(tmp_path: Path) -> None:
    src = dropped(tmp_path / "drop/a.dcm", b"D")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "sent").mkdir()
    (tmp_path / "sent/P").symlink_to(tmp_path / "elsewhere")
    roots = (tmp_path / "drop", tmp_path / "sent")
    with pytest.raises(OSError, match="is a symbolic link") as raised:
        fileops.move(src, tmp_path / "sent/P/a.dcm", roots=roots)
    assert raised.value.errno == errno.ELOOP
    assert src.exists() and os.listdir(tmp_path / "elsewhere") == []


# --------------------------------------------------------------------------- never replacing


@pytest.mark.parametrize("across", [False, True], ids=["same filesystem", "across"])
def test_move_new_puts_the_file_in_place_durably(
    tmp_path: Path, other_fs: Path, across: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = dropped(tmp_path / "failed/P/a.dcm", b"F" * 200_000)
    mtime = src.stat().st_mtime_ns
    dst = (other_fs if across else tmp_path / "drop") / "P/a.dcm"
    events = record_syncs(monkeypatch)

    fileops.move_new(src, dst)

    assert dst.read_bytes() == b"F" * 200_000 and not src.exists()
    assert dst.stat().st_mtime_ns == mtime and stat.S_IMODE(dst.stat().st_mode) == 0o640
    assert sorted(os.listdir(dst.parent)) == ["a.dcm"]
    if across:  # the copy's bytes (and mode and times) on disk before it gets its name
        assert events == ["fsync file", "link"]


@pytest.mark.parametrize("across", [False, True], ids=["same filesystem", "across"])
def test_move_new_never_replaces_a_file_at_the_target(
    tmp_path: Path, other_fs: Path, across: bool
) -> None:
    src = dropped(tmp_path / "failed/a.dcm", b"old")
    dst = dropped((other_fs if across else tmp_path / "drop") / "a.dcm", b"new drop")
    with pytest.raises(FileExistsError):
        fileops.move_new(src, dst)
    assert dst.read_bytes() == b"new drop" and src.read_bytes() == b"old"
    assert sorted(os.listdir(dst.parent)) == ["a.dcm"]


def test_without_hard_links_the_checked_rename_never_replaces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = dropped(tmp_path / "failed/a.dcm", b"old")
    dst = dropped(tmp_path / "drop/a.dcm", b"new drop")

    def no_links(*_args: object, **_kw: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    with pytest.raises(FileExistsError):
        fileops.rename_new(src, dst)
    assert dst.read_bytes() == b"new drop" and src.read_bytes() == b"old"
    fileops.rename_new(src, tmp_path / "drop/b.dcm")
    assert (tmp_path / "drop/b.dcm").read_bytes() == b"old" and not src.exists()


def test_copy_new_never_replaces_and_leaves_no_temporary_name(tmp_path: Path) -> None:
    src = dropped(tmp_path / "failed/_metadata.yaml", b"a: 1\n")
    dst = dropped(tmp_path / "drop/_metadata.yaml", b"b: 2\n")
    with pytest.raises(FileExistsError):
        fileops.copy_new(src, dst)
    assert dst.read_bytes() == b"b: 2\n" and src.read_bytes() == b"a: 1\n"
    assert sorted(os.listdir(dst.parent)) == ["_metadata.yaml"]


# --------------------------------------------------------------------------- names of copies


def old_retry_rule(name: str, folder: str) -> bool:
    """``retry._is_folder_copy`` as it was before fileops."""
    plain = Path(folder)
    stem, suffix = (plain.stem, plain.suffix) if plain.suffix else (plain.name, "")
    pattern = re.escape(stem) + r"(~[0-9a-f]{12}|~[0-9]+)?" + re.escape(suffix)
    return re.fullmatch(pattern, name) is not None


def old_purge_rule(name: str, folder_name: str) -> bool:
    """``purge._is_folder_copy`` as it was before fileops."""
    folder = Path(folder_name)
    return name == folder.name or (
        name.startswith(folder.stem + "~") and name.endswith(folder.suffix)
    )


PLAINS = ["_metadata.yaml", "_metadata.json", "meta", "study.info.yml"]
TAGS = ["", "~1", "~42", "~9999", "~0123456789ab", "~0123456789AB", "~0123456789abc", "~abc"]
TAGS += ["~", "~1~2", "~notes", "~1.bak", "-1", " ~1", "~\u0661"]  # the last: an Arabic-Indic one


def names_like(plain: str) -> list[str]:
    path = Path(plain)
    stem, suffix = (path.stem, path.suffix) if path.suffix else (path.name, "")
    names = [stem + tag + suffix for tag in TAGS] + [plain + tag for tag in TAGS]
    return [*names, "x" + plain, plain.upper(), stem + "~1.txt", stem]


@pytest.mark.parametrize("plain", PLAINS)
def test_a_copy_name_is_what_both_old_rules_accepted(plain: str) -> None:
    for name in names_like(plain):
        both = old_retry_rule(name, plain) and old_purge_rule(name, plain)
        assert fileops.is_copy_name(name, plain) == both, name


@pytest.mark.parametrize("plain", PLAINS)
def test_the_copies_stowd_makes_are_recognised(plain: str, tmp_path: Path) -> None:
    path = tmp_path / plain
    made = [fileops.numbered(path, n).name for n in (1, 2, 10, 9999)]
    made.append(fileops.content_name(path, "PatientID: X\n").name)
    assert all(fileops.is_copy_name(name, plain) for name in [plain, *made]), made
    assert not fileops.is_copy_name(fileops.numbered(path, 1).name, "other.yaml")


def test_a_temporary_name_is_hidden_and_fits_the_filesystem(tmp_path: Path) -> None:
    assert fileops.tmp_beside(tmp_path / "a.dcm").name == ".a.dcm.stowd-tmp"
    long = tmp_path / ("x" * 250)
    tmp = fileops.tmp_beside(long)
    assert tmp.name.startswith(".") and len(os.fsencode(tmp.name)) <= fileops.NAME_MAX


# --------------------------------------------------------------------------- writing, folders


def test_write_new_has_its_mode_whatever_the_umask_and_a_leftover(
    tmp_path: Path, umask_000: None
) -> None:
    path = tmp_path / "a.dcm.error.json"
    leftover = fileops.tmp_beside(path)
    leftover.write_bytes(b"half")
    leftover.chmod(0o666)
    fileops.write_new(path, b"{}\n", 0o600)
    assert path.read_bytes() == b"{}\n" and stat.S_IMODE(path.stat().st_mode) == 0o600
    fileops.write_new(path, b'{"again": 1}\n', 0o640)  # a reader sees one whole file or the other
    assert path.read_bytes() == b'{"again": 1}\n' and stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["a.dcm.error.json"]


def test_write_new_never_writes_through_a_planted_link(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    target = tmp_path / "elsewhere"
    target.write_bytes(b"keep")
    fileops.tmp_beside(path).symlink_to(target)
    with pytest.raises(OSError) as raised:
        fileops.write_new(path, b"{}", 0o600)
    assert raised.value.errno == errno.ELOOP and target.read_bytes() == b"keep"


def test_folders_are_made_with_the_mode_of_the_folder_they_are_made_in(
    tmp_path: Path, umask_000: None
) -> None:
    (tmp_path / "root").mkdir(mode=0o750)
    fileops.make_folders(tmp_path / "root/a/b/c")
    with fileops.open_folder(tmp_path / "root/d/e", (tmp_path / "root",)):
        pass
    for made in ("a", "a/b", "a/b/c", "d", "d/e"):
        assert stat.S_IMODE((tmp_path / "root" / made).stat().st_mode) == 0o750, made


def test_make_folders_does_not_recurse(tmp_path: Path) -> None:
    deep = tmp_path.joinpath(*["d"] * 1500)
    fileops.make_folders(deep)
    assert deep.is_dir()


# --------------------------------------------------------------------------- walking


def walked(top: Path, enter: Callable[[os.DirEntry[str]], bool] = lambda _e: True) -> list[str]:
    errors: list[str] = []
    found = [
        os.path.relpath(entry.path, top)
        for _folder, entries in fileops.walk_folders(
            str(top), enter, lambda f, e: errors.append(f), sort=True
        )
        for entry in entries
        if not entry.is_dir(follow_symlinks=False)
    ]
    assert errors == []
    return found


def test_the_walk_goes_depth_first_by_name_and_never_into_a_linked_folder(
    tmp_path: Path,
) -> None:
    for rel in ("b/x", "a/y", "a/c/z", "top", "skip/w"):
        dropped(tmp_path / "t" / rel, b"")
    (tmp_path / "t/link").symlink_to(tmp_path / "t/a")
    found = walked(tmp_path / "t", lambda e: e.name != "skip")
    assert found == ["link", "top", "a/y", "a/c/z", "b/x"]


def test_the_walk_goes_a_thousand_folders_deep_and_reports_what_it_cannot_list(
    tmp_path: Path,
) -> None:
    deep = tmp_path.joinpath(*["d"] * 1500)
    fileops.make_folders(deep)
    (deep / "f").write_bytes(b"")
    assert walked(tmp_path) == [os.path.join(*["d"] * 1500, "f")]
    errors: list[tuple[str, int | None]] = []
    gone = str(tmp_path / "gone")
    list(fileops.walk_folders(gone, lambda _e: True, lambda f, e: errors.append((f, e.errno))))
    assert errors == [(gone, errno.ENOENT)]


def test_write_new_syncs_the_data_before_the_name_points_at_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reason note or a sidecar's copy is renamed into place and then its folder is
    synced; without the data's own fsync first, a power loss could leave the name pointing
    at an empty file (review of issue 19: the drop folder's sidecar is unlinked once its
    copy is in place).  Each fsync is recorded with what the descriptor was, and the rename
    must come after the temporary file's."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync " + os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str, dst: str, **kw: int) -> None:
        events.append(f"replace {src}")
        real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "x.dcm.error.json"
    fileops.write_new(path, b'{"reason": "r"}\n', 0o600)
    tmp = fileops.tmp_beside(path, fileops.TMP_SUFFIX).name
    assert events == [f"fsync {tmp}", f"replace {tmp}"]
    assert path.read_bytes() == b'{"reason": "r"}\n'


@pytest.mark.parametrize("across", [False, True], ids=["same filesystem", "across"])
def test_move_never_replaces_a_file_that_took_the_target(
    tmp_path: Path, other_fs: Path, across: bool
) -> None:
    """Two processes (nodes) each chose the free name ``sent/a.dcm``; the second move must
    fail rather than replace the first one's file."""
    src = dropped(tmp_path / "drop/a.dcm", b"ours")
    dst = dropped((other_fs if across else tmp_path / "sent") / "a.dcm", b"theirs")
    with pytest.raises(FileExistsError):
        fileops.move(src, dst)
    assert dst.read_bytes() == b"theirs" and src.read_bytes() == b"ours"
    assert sorted(os.listdir(dst.parent)) == ["a.dcm"]  # no temporary name left


def test_a_move_interrupted_between_link_and_unlink_is_finished(tmp_path: Path) -> None:
    src = dropped(tmp_path / "drop/a.dcm", b"ours")
    dst = tmp_path / "sent/a.dcm"
    dst.parent.mkdir()
    os.link(src, dst)  # the crash came before the unlink
    assert fileops.move(src, dst)
    assert dst.read_bytes() == b"ours" and not src.exists()
