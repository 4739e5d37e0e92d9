"""Retention of sent/: old files go (by ctime, the time they were moved there), sidecar
copies stay with the files that use them, empty folders go, links are never followed."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
from harness import Layout, make_layout

from stowd.commands import cli
from stowd.config.load import load_config
from stowd.config.model import Source
from stowd.service.purge import PurgeResult, purge_sent

URL = "http://127.0.0.1:9/dicom-web"
DAY = 86400.0
MONTH = 30 * DAY
FUTURE = time.time() + 31 * DAY  # every file made now is older than a month by then


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return make_layout(tmp_path / "run", URL, source={"sidecars": True})


@pytest.fixture
def source(layout: Layout) -> Source:
    return load_config(layout.config).sources[0]


def put(path: Path, data: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data)
    return path


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def ctime(path: Path) -> float:
    return path.lstat().st_ctime


def test_files_older_than_the_retention_go_and_their_empty_folders_with_them(
    source: Source, layout: Layout
) -> None:
    put(layout.sent / "P1/S1/a.dcm", "aaaa")
    put(layout.sent / "P1/b.dcm", "bb")
    put(layout.sent / "c.dcm", "c")

    assert purge_sent(source, MONTH, time.time()) == PurgeResult(0, 0)
    assert tree(layout.sent) == {"P1", "P1/S1", "P1/S1/a.dcm", "P1/b.dcm", "c.dcm"}

    result = purge_sent(source, MONTH, FUTURE)

    assert result == PurgeResult(files=3, bytes=7, errors=(), folders=2)
    assert layout.sent.is_dir() and tree(layout.sent) == set()  # sent/ itself stays


def test_age_is_counted_from_when_the_file_came_to_sent_not_its_mtime(
    source: Source, layout: Layout
) -> None:
    old = put(layout.sent / "dropped-long-ago.dcm")
    long_ago = time.time() - 365 * DAY
    os.utime(old, (long_ago, long_ago))  # the mtime it was dropped with
    assert purge_sent(source, MONTH, time.time()).files == 0
    assert old.exists()


def test_only_files_past_the_cutoff_go(source: Source, layout: Layout) -> None:
    first = put(layout.sent / "P/first.dcm")
    second = later(first, layout.sent / "P/second.dcm")
    cutoff = (ctime(first) + ctime(second)) / 2

    result = purge_sent(source, DAY, cutoff + DAY)

    assert (result.files, result.folders) == (1, 0)
    assert tree(layout.sent) == {"P", "P/second.dcm"}


def later(before: Path, path: Path) -> Path:
    """Write ``path`` so that its ctime is after ``before``'s."""
    for _ in range(300):
        put(path)
        if ctime(path) > ctime(before):
            return path
        time.sleep(0.01)
    raise AssertionError("ctime did not move on")


# --------------------------------------------------------------------------- sidecar copies


def test_a_folder_sidecar_copy_stays_while_a_file_that_stays_uses_it(
    source: Source, layout: Layout
) -> None:
    put(layout.sent / "P/_metadata.yaml", "PatientID: A\n")
    put(layout.sent / "P/_metadata~0123456789ab.yaml", "PatientID: B\n")
    put(layout.sent / "P/old.json", "{}")
    old = put(layout.sent / "P/old.dcm")
    new = later(old, layout.sent / "P/new.dcm")
    cutoff = (ctime(old) + ctime(new)) / 2

    result = purge_sent(source, DAY, cutoff + DAY)

    assert result.files == 2  # old.dcm and its own sidecar
    assert tree(layout.sent) == {
        "P",
        "P/new.dcm",
        "P/_metadata.yaml",
        "P/_metadata~0123456789ab.yaml",
    }
    assert purge_sent(source, DAY, FUTURE).files == 3
    assert tree(layout.sent) == set()


def test_an_own_sidecar_copy_stays_with_its_file(source: Source, layout: Layout) -> None:
    own = put(layout.sent / "P/img.json", "{}")
    data = later(own, layout.sent / "P/img.dcm")
    assert purge_sent(source, DAY, (ctime(own) + ctime(data)) / 2 + DAY).files == 0
    assert tree(layout.sent) == {"P", "P/img.json", "P/img.dcm"}


# --------------------------------------------------------------------------- safety


def test_symbolic_links_are_removed_as_links_and_never_followed(
    source: Source, layout: Layout, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    put(outside / "keep.dcm")
    put(outside / "deeper/keep2.dcm")
    layout.sent.mkdir(parents=True)
    (layout.sent / "folder-link").symlink_to(outside, target_is_directory=True)
    (layout.sent / "file-link.dcm").symlink_to(outside / "keep.dcm")
    (layout.sent / "dangling.dcm").symlink_to(tmp_path / "nowhere")

    result = purge_sent(source, MONTH, FUTURE)

    assert result.files == 3 and result.errors == ()
    assert tree(layout.sent) == set()
    assert tree(outside) == {"keep.dcm", "deeper", "deeper/keep2.dcm"}


def test_sent_itself_may_be_a_link(source: Source, layout: Layout, tmp_path: Path) -> None:
    real = tmp_path / "real-sent"
    put(real / "P/a.dcm")
    layout.sent.parent.mkdir(parents=True)
    layout.sent.symlink_to(real, target_is_directory=True)
    assert purge_sent(source, MONTH, FUTURE).files == 1
    assert real.is_dir() and tree(real) == set()


def test_a_folder_swapped_for_a_link_meanwhile_is_not_entered(
    source: Source, layout: Layout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = put(tmp_path / "outside/keep.dcm").parent
    put(layout.sent / "P/a.dcm")
    real_open = os.open

    def swapping(path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if path == "P" and dir_fd is not None:  # listed as a folder, now made a link
            (layout.sent / "P/a.dcm").unlink()
            (layout.sent / "P").rmdir()
            (layout.sent / "P").symlink_to(outside, target_is_directory=True)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", swapping)
    result = purge_sent(source, MONTH, FUTURE)

    assert tree(outside) == {"keep.dcm"}
    [error] = result.errors  # ENOTDIR or ELOOP: O_NOFOLLOW refused the link
    assert result.files == 0 and error.startswith(f"{layout.sent / 'P'}: ")


def test_an_empty_folder_goes_only_once_it_is_old(source: Source, layout: Layout) -> None:
    (layout.sent / "fresh").mkdir(parents=True)  # the daemon may be about to move into it
    assert purge_sent(source, MONTH, time.time()).folders == 0
    assert (layout.sent / "fresh").is_dir()
    assert purge_sent(source, MONTH, FUTURE).folders == 1
    assert tree(layout.sent) == set()


def test_other_kinds_of_files_are_left(source: Source, layout: Layout) -> None:
    layout.sent.mkdir(parents=True)
    os.mkfifo(layout.sent / "P.fifo")
    assert purge_sent(source, MONTH, FUTURE) == PurgeResult(0, 0)
    assert tree(layout.sent) == {"P.fifo"}


def test_a_dry_run_counts_and_deletes_nothing(source: Source, layout: Layout) -> None:
    put(layout.sent / "P/S/a.dcm", "12345")
    put(layout.sent / "P/b.dcm", "1")
    before = tree(layout.sent)
    assert purge_sent(source, MONTH, FUTURE, dry_run=True) == PurgeResult(2, 6, (), 2)
    assert tree(layout.sent) == before


def test_no_sent_folder_yet_is_nothing_to_do(source: Source) -> None:
    assert purge_sent(source, MONTH, FUTURE) == PurgeResult(0, 0)


def test_files_that_cannot_be_deleted_are_counted_and_logged(
    source: Source,
    layout: Layout,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    put(layout.sent / "P/a.dcm")
    put(layout.sent / "P/b.dcm")
    real_unlink = os.unlink

    def refuse(path: str, *args: Any, **kw: Any) -> None:
        if path == "a.dcm":
            raise PermissionError(13, "Permission denied")
        return real_unlink(path, *args, **kw)

    monkeypatch.setattr(os, "unlink", refuse)
    with caplog.at_level(logging.INFO, logger="stowd.purge"):
        result = purge_sent(source, MONTH, FUTURE)

    assert (result.files, result.folders) == (1, 0)
    assert result.errors == (f"{layout.sent / 'P/a.dcm'}: Permission denied",)
    assert tree(layout.sent) == {"P", "P/a.dcm"}
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == f"cannot purge {layout.sent / 'P/a.dcm'}: Permission denied"
    assert messages[1].startswith("source ct1: purged 1 file(s) (0.0 MB) and 0 empty folder(s)")
    assert messages[1].endswith("older than 30d; 1 could not be deleted")


def test_nothing_to_purge_is_logged_at_debug_only(
    source: Source, caplog: pytest.LogCaptureFixture
) -> None:
    source.sent.mkdir(parents=True)
    with caplog.at_level(logging.DEBUG, logger="stowd.purge"):
        purge_sent(source, MONTH, time.time())
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]


def test_a_retention_of_zero_is_refused(source: Source) -> None:
    with pytest.raises(ValueError, match="more than 0"):
        purge_sent(source, 0, FUTURE)


# --------------------------------------------------------------------------- command line


def test_cli_purge(layout: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    put(layout.sent / "P/a.dcm")
    argv = ["purge", "-c", str(layout.config)]
    assert cli.main([*argv, "--sent-older-than", "0"]) == 2
    assert "--sent-older-than: must be more than 0 seconds" in capsys.readouterr().err
    assert cli.main([*argv, "--sent-older-than", "soon"]) == 2
    assert cli.main([*argv, "--sent-older-than", "1d", "--source", "x"]) == 2
    assert "no source named 'x'; known: ct1" in capsys.readouterr().err

    assert cli.main([*argv, "--sent-older-than", "1s", "--dry-run"]) == 0
    assert "ct1: would delete 0 file(s)" in capsys.readouterr().out
    time.sleep(1.1)
    assert cli.main([*argv, "--sent-older-than", "1s", "--source", "ct1"]) == 0
    out = capsys.readouterr().out
    assert f"ct1: deleted 1 file(s), 0.0 MB, and 1 empty folder(s) from {layout.sent}" in out
    assert tree(layout.sent) == set()
