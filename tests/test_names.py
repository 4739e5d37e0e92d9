"""Issue 14: any name the file system allows, at any depth, is handled (real daemon, Orthanc)."""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicomgen import make_instance, make_instance_bytes, write_garbage
from harness import Layout, Stowd, make_layout, run_cli, wait_for
from orthanc import Orthanc

from stowd.pipeline.queue import NewFile, SqliteQueue
from stowd.service import logs

# Names that are not UTF-8: a scanner with a Latin-1 locale, or a writer who means harm.
BAD_FILE = os.fsdecode(b"\xff\xfe.dcm")
BAD_FOLDER = os.fsdecode(b"\xfe\xffdir")
BAD_TEXT = os.fsdecode(b"\xff\xfe.txt")
DEAD_URL = "http://127.0.0.1:9/dicom-web"  # nothing listens: nothing is sent


def _drop_odd_names(folder: Path) -> dict[str, str]:
    """DICOM files under names that are not UTF-8, and a non-DICOM one: {rel: SOPInstanceUID}."""
    stored = {
        BAD_FILE: make_instance(folder / BAD_FILE),
        f"{BAD_FOLDER}/a.dcm": make_instance(folder / BAD_FOLDER / "a.dcm"),
        f"{BAD_FOLDER}/{BAD_FILE}": make_instance(folder / BAD_FOLDER / BAD_FILE),
    }
    write_garbage(folder / BAD_TEXT)
    return stored


def test_names_that_are_not_utf8_are_stored_moved_and_failed_like_any_other(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    """Was: the watcher thread died at the first such name (``UnicodeEncodeError ...
    surrogates not allowed`` when the queue stored the path) and restarted in a loop; no
    file dropped after it in that folder was ever queued."""
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url)
    stored = _drop_odd_names(layout.drop)
    with Stowd(layout) as daemon:
        wait_for(lambda: "scan of" in daemon.log, 60, "the first scan", lambda: daemon.log)
        stored["after/b.dcm"] = make_instance(layout.drop / "after/b.dcm")  # dropped later
        stored["c.dcm"] = make_instance(layout.drop / "c.dcm")
        wait_for(
            lambda: layout.files(layout.sent) == set(stored),
            90,
            "every DICOM file in sent/ under its exact name",
            lambda: daemon.log,
        )
        wait_for(lambda: BAD_TEXT in layout.error_files(), 60, "the text file failed")
        status = run_cli("status", "-c", str(layout.config))
        as_json = run_cli("status", "-c", str(layout.config), "--json")
        assert daemon.terminate() == 0
    assert orthanc.sop_instance_uids() == set(stored.values())
    assert layout.files(layout.failed) == {BAD_TEXT}
    reason = json.loads(layout.error_files()[BAD_TEXT].read_text(encoding="utf-8"))
    assert "not a file type stowd can send" in reason["reason"], reason
    assert reason["file"] == str(layout.drop / "\\xff\\xfe.txt"), reason  # escaped
    assert not (layout.drop / BAD_FILE).exists()
    assert status.returncode == 0, status.stdout + status.stderr
    assert "\\xff\\xfe.txt" in status.stdout, status.stdout
    assert as_json.returncode == 0, as_json.stderr
    errors = json.loads(as_json.stdout)["last_errors"]
    assert [e["file"] for e in errors] == [str(layout.drop / BAD_TEXT)], errors
    assert "died" not in daemon.log
    assert "Traceback" not in daemon.log
    assert "\\xff\\xfe.dcm" in daemon.log  # the log escapes the byte it cannot print


def test_migrate_stores_names_that_are_not_utf8_and_reports_them_escaped(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    """Was: ``stowd migrate`` stopped with 'unexpected error' and an empty report."""
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url)
    old = tmp_path / "old"
    stored = _drop_odd_names(old)
    stored["c.dcm"] = make_instance(old / "c.dcm")
    for report in ("failed.csv", "failed.json"):
        result = run_cli(
            "migrate", "-c", str(layout.config), str(old), "--destination", "pacs",
            "--report", str(tmp_path / report),
        )  # fmt: skip
        assert result.returncode == 1, result.stdout + result.stderr  # the text file failed
        assert "unexpected error" not in result.stdout + result.stderr
    assert orthanc.sop_instance_uids() == set(stored.values())
    assert Layout(tmp_path, layout.config).files(tmp_path / "old.sent") == set(stored)
    assert (tmp_path / "old.failed" / BAD_TEXT).is_file()
    escaped = str(old / "\\xff\\xfe.txt")
    with open(tmp_path / "failed.csv", newline="", encoding="utf-8") as fp:
        rows = list(csv.DictReader(fp))
    assert [r["path"] for r in rows] == [escaped], rows
    listed = json.loads((tmp_path / "failed.json").read_text(encoding="utf-8"))
    assert [r["path"] for r in listed] == [escaped], listed
    assert listed[0]["now_at"] == str(tmp_path / "old.failed" / "\\xff\\xfe.txt"), listed


def test_the_queue_keeps_the_exact_bytes_of_a_path_and_utf8_paths_as_text(tmp_path: Path) -> None:
    """A path that is not UTF-8 is a BLOB of its bytes, found again by a rescan (queued once)
    and read back as the same ``str``; a UTF-8 path stays TEXT, as in queues made before."""
    odd = str(tmp_path / BAD_FOLDER / BAD_FILE)
    plain = str(tmp_path / "plain é.dcm")
    queue = SqliteQueue(tmp_path / "queue.db").open()
    try:
        files = [NewFile("ct1", "pacs", p, os.path.basename(p), 1, 5) for p in (odd, plain)]
        assert queue.enqueue(files) == 2
        assert queue.enqueue(files) == 0  # a rescan finds both again: still one row each
        assert sorted((j.path, j.rel) for j in queue.unclassified(10)) == sorted(
            (p, os.path.basename(p)) for p in (odd, plain)
        )
    finally:
        queue.close()
    with sqlite3.connect(tmp_path / "queue.db") as db:
        stored = db.execute("SELECT path, typeof(path), typeof(rel) FROM files").fetchall()
    assert sorted(stored, key=lambda r: r[1]) == [
        (os.fsencode(odd), "blob", "blob"),
        (plain, "text", "text"),
    ]


# -- folders nested a thousand deep -------------------------------------------------------------
DEPTH = 1000
# 2 bytes a level: the bottom's path (about 2,100 bytes) can be opened; 7 bytes a level: it
# is longer than PATH_MAX (4096) and can only be reached folder by folder (a dir fd each).
SHORT, LONG = "d", "folder"


def _chain(top: Path, name: str, depth: int = DEPTH) -> str:
    """``depth`` folders ``name`` nested in ``top`` with a DICOM file at the bottom, made
    through folder descriptors (the whole path may be too long to open); its UID."""
    data, uid = make_instance_bytes()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        out = os.open("deep.dcm", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        with os.fdopen(out, "wb") as fp:
            fp.write(data)
    finally:
        os.close(fd)
    return uid


def remove_deep(top: Path) -> None:
    """Remove ``top`` and all below it, one folder open at a time (``shutil.rmtree``, which
    pytest uses to clean up, recurses and fails at this depth)."""
    if not top.is_dir():
        return
    names: list[str] = []  # the way down from top: memory grows with depth only
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        while True:
            with os.scandir(fd) as it:
                entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
            for name, _ in (e for e in entries if not e[1]):
                os.unlink(name, dir_fd=fd)
            sub = next((name for name, is_dir in entries if is_dir), None)
            if sub is None and not names:
                break
            step = sub if sub is not None else ".."
            inner = os.open(step, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
            if sub is not None:
                names.append(sub)
            else:
                os.rmdir(names.pop(), dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(top)


@pytest.fixture
def deep() -> Iterator[Path]:
    """A folder of its own for a test's deep trees, outside pytest's temporary folders, and
    removed by ``remove_deep`` after the test: pytest cleans its old temporary folders with
    ``shutil.rmtree``, which recurses, so a deep tree left there by a run that was killed
    would make every later pytest session on the machine fail at its end."""
    top = Path(tempfile.mkdtemp(prefix="stowd-deep-"))
    try:
        yield top
    finally:
        remove_deep(top)


def _deep_rel(name: str = SHORT) -> str:
    return "/".join([name] * DEPTH + ["deep.dcm"])


def _files(top: Path) -> set[str]:
    """Files below ``top`` as relative paths, walked without recursion (``Path.rglob``
    recurses) and only where a path can be opened."""
    found: set[str] = set()
    todo = [str(top)] if top.is_dir() else []
    while todo:
        with os.scandir(todo.pop()) as entries:
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    todo.append(e.path)
                elif not e.name.endswith(".error.json"):
                    found.add(os.path.relpath(e.path, top))
    return found


def test_folders_nested_a_thousand_deep_do_not_stop_the_watcher(
    deep: Path, orthanc: Orthanc
) -> None:
    """Was: ``RecursionError`` in watchdog's walk when the observer started, and in stowd's
    own walk: the watcher thread died and was restarted in a loop, and nothing was sent."""
    layout = make_layout(deep / "run", orthanc.dicomweb_url)
    stored = {"top1.dcm": make_instance(layout.drop / "top1.dcm")}
    stored[_deep_rel()] = _chain(layout.drop, SHORT)
    unreachable = _chain(layout.drop, LONG)
    with Stowd(layout) as daemon:
        wait_for(lambda: "scan of" in daemon.log, 120, "the first scan", lambda: daemon.log)
        stored["top2.dcm"] = make_instance(layout.drop / "top2.dcm")  # dropped later
        wait_for(
            lambda: _files(layout.sent) == set(stored),
            120,
            "the top files and the deep one in sent/",
            lambda: "\n".join(x[:300] for x in daemon.log.splitlines()),  # paths: 2,000+ bytes
        )
        status = run_cli("status", "-c", str(layout.config))
        assert daemon.terminate() == 0
    assert orthanc.sop_instance_uids() == set(stored.values())
    assert unreachable not in orthanc.sop_instance_uids()
    assert status.returncode == 0, status.stderr
    assert "thread watch-ct1 died" not in daemon.log
    assert "RecursionError" in daemon.log  # said once: the deep folders are found by rescans
    too_long = "longer than the system can open (4096); no file below it is sent"
    assert daemon.log.count(too_long) == 1, daemon.log[-3000:]


def test_a_folder_a_thousand_deep_moved_in_while_watched_is_sent(
    deep: Path, orthanc: Orthanc
) -> None:
    """Watchdog's walk of a folder moved in raises ``RecursionError`` in its own thread, which
    ends that watch: the observer is started again, watching the top folder only."""
    layout = make_layout(deep / "run", orthanc.dicomweb_url, source={"rescan_interval": "1h"})
    with Stowd(layout) as daemon:
        wait_for(lambda: "scan of" in daemon.log, 60, "the first scan", lambda: daemon.log)
        outside = deep / "outside"
        outside.mkdir()
        stored = {f"moved/{_deep_rel()}": _chain(outside, SHORT)}
        os.rename(outside, layout.drop / "moved")
        wait_for(lambda: "the file observer died" in daemon.log, 60, "the observer restarted")
        stored["top.dcm"] = make_instance(layout.drop / "top.dcm")  # seen by an event
        wait_for(
            lambda: _files(layout.sent) == set(stored),
            120,
            "the moved-in deep file and the top one in sent/",
            lambda: "\n".join(x[:300] for x in daemon.log.splitlines()),
        )
        assert daemon.terminate() == 0
    assert orthanc.sop_instance_uids() == set(stored.values())
    assert "thread watch-ct1 died" not in daemon.log
    assert daemon.log.count("nested too deep to watch them all") == 1


def test_a_traceback_with_a_thousand_chained_exceptions_can_be_logged() -> None:
    """``Path.mkdir(parents=True)`` a thousand folders deep chains an exception per folder;
    the log formatter walked the chain by recursion and failed itself (RecursionError)."""
    newest: BaseException | None = None
    for n in range(DEPTH):
        exc = FileNotFoundError(f"step {n}")
        exc.__context__ = newest
        newest = exc
    assert newest is not None
    text = logs.format_exception((type(newest), newest, None))
    assert text.count("FileNotFoundError: step") == logs.CHAIN_LIMIT
    assert text.startswith(f"[{logs.CHAIN_LIMIT} exceptions shown, earlier ones left out]")
    assert text.endswith(f"FileNotFoundError: step {DEPTH - 1}")


def test_migrate_walks_a_thousand_deep_and_reports_what_it_cannot_open(
    deep: Path, orthanc: Orthanc
) -> None:
    layout = make_layout(deep / "run", orthanc.dicomweb_url)
    old = deep / "old"
    stored = {"top.dcm": make_instance(old / "top.dcm"), _deep_rel(): _chain(old, SHORT)}
    _chain(old, LONG)
    report = deep / "failed.csv"
    result = run_cli("migrate", "-c", str(layout.config), str(old), "--destination", "pacs",
                     "--report", str(report))  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr  # one folder is unreadable
    assert "unexpected error" not in result.stdout + result.stderr
    assert orthanc.sop_instance_uids() == set(stored.values())
    assert _files(deep / "old.sent") == set(stored)
    with open(report, newline="", encoding="utf-8") as fp:
        rows = list(csv.DictReader(fp))
    assert len(rows) == 1, rows
    assert rows[0]["path"].startswith(str(old / LONG / LONG)), rows
    assert "cannot be read" in rows[0]["reason"], rows


def test_purge_and_retry_walk_a_thousand_deep(deep: Path) -> None:
    """A file stored from a thousand folders deep is moved to as deep a place in sent/ (or
    failed/): ``stowd purge`` (also run by the daemon for ``sent_retention``) and ``stowd
    retry`` walked them by recursion and died with ``RecursionError``."""
    layout = make_layout(deep / "run", DEAD_URL)
    layout.sent.mkdir(parents=True)
    layout.failed.mkdir(parents=True)
    _chain(layout.sent, SHORT)
    _chain(layout.failed, SHORT)

    def purged() -> bool:
        result = run_cli("purge", "--sent-older-than", "1s", "-c", str(layout.config))
        assert result.returncode == 0, result.stdout + result.stderr
        return "deleted 1 file(s), 0.0 MB, and 1000 empty folder(s)" in result.stdout

    wait_for(purged, 60, "the deep file and its folders purged (after 1s in sent/)")
    assert list(layout.sent.iterdir()) == []
    listed = run_cli("retry", "--dry-run", "-c", str(layout.config))
    assert "Traceback" not in listed.stderr, listed.stderr
    assert f"{_deep_rel()}: it arrived less than a minute ago" in listed.stdout, listed.stdout
