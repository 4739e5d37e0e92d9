"""``stowd migrate`` as a subprocess against a real Orthanc: resume after kill -9 without
re-sending what was confirmed, ``--keep`` leaves the source byte-identical, the failure report
lists exactly the bad files, progress lines without a terminal."""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import json
import os
import pty
import re
import select
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from archives import Archive, write_refused
from dicomgen import make_instance, make_study, write_empty, write_garbage, write_truncated
from harness import Layout, Stowd, make_layout, run_cli, wait_for
from orthanc import Orthanc
from stowproxy import StowProxy

from stowd.commands import cli
from stowd.commands import migrate as migrate_mod
from stowd.pipeline.loop import SAME_STOP, Stops
from stowd.pipeline.queue import Hold, Lost, Queue
from stowd.pipeline.reader import Reader
from stowd.pipeline.watch import Watcher
from stowd.pipeline.worker import Worker
from stowd.service import logs
from stowd.service.status import MIGRATION_SOURCE


def layout_for(tmp_path: Path, archive: Archive, max_files: int = 2) -> Layout:
    dest = {"url": archive.dicomweb_url, "workers": 1, "batch": {"max_files": max_files}}
    return make_layout(tmp_path / "run", archive.dicomweb_url, destinations={"pacs": dest})


def hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def queue_rows(layout: Layout) -> list[tuple[str, str, str | None]]:
    """(path, state, outcome) of every row, read like ``stowd status`` does."""
    db = layout.root / "state" / "queue.db"
    if not db.exists():
        return []
    uri = f"{db.as_uri()}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as conn:
        # The file exists a moment before the migration has created its tables in it.
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'files'").fetchone() is None:
            return []
        return list(conn.execute("SELECT path, state, outcome FROM files ORDER BY id"))


def sent_paths(layout: Layout) -> list[str]:
    return [path for path, state, _ in queue_rows(layout) if state == "sent"]


def migrate(layout: Layout, *args: str) -> list[str]:
    return [sys.executable, "-m", "stowd", "migrate", "-c", str(layout.config), *args]


def start(layout: Layout, log: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            migrate(layout, *args),
            stdout=out,
            stderr=out,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


@contextlib.contextmanager
def migrating(layout: Layout, log: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """``stowd migrate`` as a child process, killed on the way out if it still runs."""
    proc = start(layout, log, *args)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(60)


def ctrl_c(proc: subprocess.Popen[bytes], log: Path) -> None:
    """Interrupt a migration as Ctrl-C does: it must end with 130."""
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130, log.read_text()


def migrate_here(monkeypatch: pytest.MonkeyPatch, layout: Layout, *args: str) -> int:
    """``stowd migrate`` in this process (to break things from inside): no signal handlers,
    and the logging left to pytest."""
    monkeypatch.setattr(migrate_mod.Migration, "install_signals", lambda _self: None)
    monkeypatch.setattr(logs, "setup", lambda *_args: "text")
    return cli.main(["migrate", "-c", str(layout.config), *args])


def test_resume_after_kill_never_resends_and_keep_leaves_the_source_alone(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    proxy = StowProxy(orthanc.dicomweb_url)  # counts what reaches Orthanc
    try:
        resume_after_kill(tmp_path, orthanc, proxy)
    finally:
        proxy.stop()


def resume_after_kill(tmp_path: Path, orthanc: Orthanc, proxy: StowProxy) -> None:
    dest = {"url": proxy.base, "workers": 1, "batch": {"max_files": 1}}
    layout = make_layout(tmp_path / "run", proxy.base, destinations={"pacs": dest})
    archive = tmp_path / "archive"
    uid_of: dict[str, str] = {}
    for study in range(4):
        uid_of |= {str(p): u for p, u in make_study(archive / f"study{study}" / "series", 100)}
    uids = set(uid_of.values())
    before = hashes(archive)
    args = (str(archive), "--destination", "pacs", "--keep")

    log = tmp_path / "first.log"
    first = start(layout, log, *args)  # Ctrl-C: in-flight uploads finish, exit 130
    try:
        wait_for(lambda: len(sent_paths(layout)) >= 20, 60, "20 files stored", log.read_text)
        first.send_signal(signal.SIGINT)
        assert first.wait(30) == 130, log.read_text()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(60)  # reaped here, not by a later test's garbage collection
    assert "run the same command again" in log.read_text()
    interrupted = len(sent_paths(layout))

    log = tmp_path / "second.log"
    second = start(layout, log, *args)  # kill -9: no clean-up at all
    try:
        wait_for(
            lambda: len(sent_paths(layout)) >= interrupted + 20,
            60,
            "20 more files stored",
            log.read_text,
        )
        assert second.poll() is None, "the migration ended before it could be killed"
    finally:
        second.kill()
        second.wait(60)
    confirmed = sent_paths(layout)
    assert len(confirmed) < 400
    posted_before = proxy.times_posted(uids)

    third = run_cli("migrate", "-c", str(layout.config), *args, timeout=120)
    assert third.returncode == 0, third.stdout + third.stderr
    assert f"skipped:  {len(confirmed)} file(s)" in third.stdout
    rows = queue_rows(layout)
    stored = [path for path, state, _ in rows if state == "sent"]
    assert len(stored) == len(set(stored)) == 400  # no confirmed file was stored twice
    assert {outcome for _, state, outcome in rows if state == "sent"} == {"kept"}
    assert orthanc.sop_instance_uids() == uids
    only_in_flight_resent(proxy.times_posted(uids), posted_before, [uid_of[p] for p in confirmed])
    assert hashes(archive) == before  # byte-identical, nothing added, nothing moved
    assert not (tmp_path / "archive.sent").exists()
    assert not (tmp_path / "archive.failed").exists()

    fourth = run_cli("migrate", "-c", str(layout.config), *args)
    assert fourth.returncode == 0, fourth.stderr
    assert "skipped:  400 file(s)" in fourth.stdout
    assert "stored:   0 file(s)" in fourth.stdout


def only_in_flight_resent(
    posted: dict[str, int], posted_before: dict[str, int], confirmed: list[str]
) -> None:
    """Every instance reached Orthanc; what the stopped runs had confirmed was never POSTed
    again, and only the request in flight at each of the two stops could be."""
    assert min(posted.values()) >= 1
    assert all(posted[uid] == posted_before[uid] == 1 for uid in confirmed)
    resent = [uid for uid, times in posted.items() if times > 1]
    assert len(resent) <= 2, resent


def test_the_report_lists_exactly_the_bad_files(tmp_path: Path, archive: Archive) -> None:
    layout = layout_for(tmp_path, archive, max_files=10)
    old = tmp_path / "old"
    good = {u for _, u in make_study(old / "a", 5)}
    bad = {
        write_garbage(old / "a" / "garbage.dcm"),
        write_empty(old / "b" / "empty.dcm"),
        old / "b" / "truncated.dcm",
        old / "a" / "refused.dcm",
    }
    refused_status = write_refused(archive, old / "a" / "refused.dcm")
    write_truncated(old / "b" / "truncated.dcm")
    report = tmp_path / "failed.csv"
    result = run_cli("migrate", "-c", str(layout.config), str(old), "--destination", "pacs",
                     "--report", str(report))  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    with open(report, newline="", encoding="utf-8") as fp:
        rows = list(csv.DictReader(fp))
    assert {r["path"] for r in rows} == {str(p) for p in bad}
    assert all(r["reason"] and r["stage"] for r in rows)
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["refused.dcm"]["http_status"] == refused_status
    assert by_name["refused.dcm"]["stage"] == "storing the file"
    assert by_name["garbage.dcm"]["http_status"] == ""
    assert list(rows[0]) == ["path", "reason", "http_status", "stage"]
    assert archive.sop_instance_uids() == good
    assert Layout(tmp_path, layout.config).files(tmp_path / "old.sent") == {
        f"a/IM0000{n}.dcm" for n in range(1, 6)
    }
    failed = tmp_path / "old.failed"
    assert {str(p.relative_to(failed)) for p in failed.rglob("*.error.json")} == {
        "a/garbage.dcm.error.json",
        "a/refused.dcm.error.json",
        "b/empty.dcm.error.json",
        "b/truncated.dcm.error.json",
    }

    # Run again: nothing is left in the source, but the failed files still lie in old.failed
    # unstored, so the exit code and the report say so (not just this run's failures).
    as_json = tmp_path / "failed.json"
    again = run_cli("migrate", "-c", str(layout.config), str(old), "--destination", "pacs",
                    "--report", str(as_json))  # fmt: skip
    assert again.returncode == 1, again.stdout + again.stderr
    listed = json.loads(as_json.read_text())
    assert {r["path"] for r in listed} == {str(p) for p in bad}
    assert all(r["reason"] and r["now_at"].startswith(str(failed)) for r in listed)
    assert "failed:   4 file(s) (0 in this run" in again.stdout

    # The administrator fixes one (puts a good file back into the source) and gives up on
    # the others (deletes them from old.failed): then the migration is complete.
    for path in failed.rglob("*"):
        if path.is_file():
            path.unlink()
    fixed = make_instance(old / "b" / "empty.dcm")
    third = run_cli("migrate", "-c", str(layout.config), str(old), "--destination", "pacs",
                    "--report", str(as_json))  # fmt: skip
    assert third.returncode == 0, third.stdout + third.stderr
    assert json.loads(as_json.read_text()) == []
    assert fixed in archive.sop_instance_uids()


def test_progress_lines_without_a_terminal(tmp_path: Path, orthanc: Orthanc) -> None:
    layout = layout_for(tmp_path, orthanc, max_files=1)
    archive = tmp_path / "nas"
    make_study(archive, 500, size_bytes=32 * 1024)
    result = run_cli("migrate", "-c", str(layout.config), str(archive), "--destination", "pacs",
                     "--keep", "--progress-every", "1", timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("stowd migrate: ")]
    assert len(lines) >= 2, result.stderr  # at least one while it ran, and the last one
    assert "\r" not in result.stderr
    assert lines[-1].startswith("stowd migrate: 500/500 files, ")
    assert all(" files, " in line and " failed, ETA " in line for line in lines)
    assert "stored:   500 file(s)" in result.stdout


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    layout = make_layout(tmp_path / "run", "http://127.0.0.1:9/dicom-web")
    folder = tmp_path / "x"
    folder.mkdir()
    cases = [
        (str(folder), "--destination", "nope"),
        (str(tmp_path / "missing"), "--destination", "pacs"),
        (str(folder), "--destination", "pacs", "--report", "r.txt"),
        (str(folder), "--destination", "pacs", "--progress-every", "0"),
    ]
    for args in cases:
        result = run_cli("migrate", "-c", str(layout.config), *args)
        assert result.returncode == 2, (args, result.stderr)
        assert "stowd migrate:" in result.stderr


def test_a_sub_folder_migrated_first_is_not_sent_again_with_its_parent(
    tmp_path: Path, archive: Archive
) -> None:
    layout = layout_for(tmp_path, archive, max_files=5)
    ct = tmp_path / "ct"
    make_study(ct / "2019", 6)
    make_study(ct / "2020", 4)
    first = run_cli("migrate", "-c", str(layout.config), str(ct / "2019"),
                    "--destination", "pacs")  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert len(list((ct / "2019.sent").rglob("*.dcm"))) == 6  # beside it, inside ct/
    second = run_cli("migrate", "-c", str(layout.config), str(ct), "--destination", "pacs")
    assert second.returncode == 0, second.stderr
    assert len(sent_paths(layout)) == 10  # the 6 in ct/2019.sent were not sent again
    assert archive.instance_count() == 10
    nested = run_cli("migrate", "-c", str(layout.config), str(ct), str(ct / "2020"),
                     "--destination", "pacs")  # fmt: skip
    assert nested.returncode == 2 and "is inside" in nested.stderr


def test_a_place_the_files_cannot_move_to_is_refused_before_anything_is_sent(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    layout = layout_for(tmp_path, orthanc)
    archive = tmp_path / "arc"
    make_study(archive, 3)
    (tmp_path / "arc.sent").write_text("a file where the folder would go")
    result = run_cli("migrate", "-c", str(layout.config), str(archive), "--destination", "pacs")
    assert result.returncode == 2 and "use --keep" in result.stderr
    assert orthanc.instance_count() == 0


def test_a_scan_that_crashes_exits_1_not_as_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    layout = make_layout(tmp_path / "run", "http://127.0.0.1:9/dicom-web")
    folder = tmp_path / "nas"
    folder.mkdir()

    def crash(_self: object, _stop: object) -> None:
        raise RuntimeError("a bug in the walk")

    monkeypatch.setattr(Watcher, "scan", crash)
    code = migrate_here(monkeypatch, layout, str(folder), "--destination", "pacs")
    assert code == 1
    assert "a bug in the walk" in caplog.text


def interrupt_while_queued(layout: Layout, log: Path, *args: str) -> None:
    """Start a migration to an archive that is down, and Ctrl-C it with its files queued."""
    with migrating(layout, log, *args) as proc:
        wait_for(lambda: len(queue_rows(layout)) == 3, 30, "3 files queued", log.read_text)
        ctrl_c(proc, log)


@pytest.mark.parametrize("first", [("--keep",), ()], ids=["keep-then-move", "move-then-keep"])
def test_an_unfinished_run_is_not_resumed_in_the_other_mode(
    tmp_path: Path, first: tuple[str, ...]
) -> None:
    layout = make_layout(tmp_path / "run", "http://127.0.0.1:9/dicom-web")
    archive = tmp_path / "nas"
    make_study(archive / "s", 3)
    before = hashes(archive)
    interrupt_while_queued(layout, tmp_path / "first.log", str(archive), "--destination",
                           "pacs", *first)  # fmt: skip
    other = () if first else ("--keep",)
    again = run_cli("migrate", "-c", str(layout.config), str(archive), "--destination", "pacs",
                    *other, timeout=60)  # fmt: skip
    assert again.returncode == 2, again.stdout + again.stderr
    told = "run it again with --keep" if first else "run it again without --keep"
    assert told in again.stderr and str(archive) in again.stderr
    assert hashes(archive) == before  # nothing moved, nothing sent
    assert not (tmp_path / "nas.sent").exists()
    assert {state for _, state, _ in queue_rows(layout)} == {"pending"}


def test_files_that_cannot_be_moved_end_the_run_with_exit_1_instead_of_hanging(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    """A move that keeps failing (here a file where the folder arc.sent/a must go; the same
    as a full disk or a permission taken away mid-run, also as root) ends the run: those
    files are in the report, the others are stored and moved."""
    layout = layout_for(tmp_path, orthanc, max_files=5)
    archive = tmp_path / "arc"
    stuck = {str(p) for p, _ in make_study(archive / "a", 2)}
    make_study(archive / "b", 3)
    (tmp_path / "arc.sent").mkdir()
    (tmp_path / "arc.sent" / "a").write_text("not a folder")
    report = tmp_path / "report.json"
    result = run_cli("migrate", "-c", str(layout.config), str(archive), "--destination", "pacs",
                     "--report", str(report), timeout=40)  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    rows = json.loads(report.read_text())
    assert {r["path"] for r in rows} == stuck
    assert all(r["stage"] == "moving the file" for r in rows)
    assert all("stored, but cannot be moved" in r["reason"] for r in rows)
    assert "not moved: 2 file(s)" in result.stdout
    assert orthanc.instance_count() == 5
    assert len(list((tmp_path / "arc.sent" / "b").rglob("*.dcm"))) == 3


def test_an_unreadable_folder_is_a_failure(
    tmp_path: Path,
    orthanc: Orthanc,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A sub-folder the scan cannot list (permission denied; made so by a patched
    ``os.scandir``, since root reads anything) is in the report, the summary and the exit
    code: none of its files were sent."""
    layout = layout_for(tmp_path, orthanc, max_files=5)
    archive = tmp_path / "nas"
    make_study(archive / "open", 3)
    make_study(archive / "locked", 2)
    real_scandir = os.scandir

    def scandir(path: str) -> Any:
        if Path(path) == archive / "locked":
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    report = tmp_path / "report.csv"
    code = migrate_here(monkeypatch, layout, str(archive), "--destination", "pacs", "--keep",
                        "--report", str(report))  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1, out
    with open(report, newline="", encoding="utf-8") as fp:
        rows = list(csv.DictReader(fp))
    assert [(r["path"], r["stage"]) for r in rows] == [
        (str(archive / "locked"), "listing the folder")
    ]
    assert "Permission denied" in rows[0]["reason"]
    assert "unreadable: 1 folder(s)" in out
    assert "stored:   3 file(s)" in out
    assert orthanc.instance_count() == 3


def test_progress_on_a_terminal_is_a_bar_redrawn_in_place(tmp_path: Path, orthanc: Orthanc) -> None:
    layout = layout_for(tmp_path, orthanc, max_files=1)
    archive = tmp_path / "nas"
    make_study(archive, 300)
    write_garbage(archive / "zz" / "garbage.dcm")  # an error logged while the bar is drawn
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = subprocess.Popen(
        migrate(layout, str(archive), "--destination", "pacs", "--keep"),
        stdout=subprocess.PIPE,
        stderr=child,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    os.close(child)
    seen = bytearray()
    deadline = time.monotonic() + 120
    try:  # read until the child closes the terminal (EIO): unread, it would fill up and block
        while time.monotonic() < deadline:
            if select.select([main], [], [], 1.0)[0]:
                data = os.read(main, 65536)
                if not data:
                    break
                seen += data
    except OSError:
        pass
    finally:
        os.close(main)
        if proc.poll() is None and time.monotonic() >= deadline:
            proc.kill()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, seen.decode(errors="replace")
    assert b"stored:   300 file(s)" in out
    text = seen.decode()
    frames = [f for f in re.split(r"[\r\n]+", text) if f.startswith("[")]
    assert len(frames) >= 2, seen.decode()  # redrawn while it ran, and the last one
    assert all(len(f) < 80 for f in frames)  # never wraps on an 80-column terminal
    assert re.fullmatch(r"\[#{10}\] 100% 301/301 files, [\d.]+ MB, 1 failed, ETA 0:00:00, "
                        r"[\d.]+ files/s *", frames[-1])  # fmt: skip
    assert all(re.match(r"\[[#.]{10}\] ", f) and " failed, ETA " in f for f in frames)
    logged = re.findall(r"(\r\x1b\[K)?\d{4}-\d\d-\d\d [\d:,]+ ERROR stowd", text)
    assert logged and all(logged)  # each log line clears the bar first, never follows it


def test_the_first_files_are_stored_while_the_walk_still_runs(
    tmp_path: Path, orthanc: Orthanc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walk is lazy: files go to the queue in chunks while it runs, and the uploads start
    at once.  Here the listing of the only folder does not end before a file is stored; a
    walk that listed the whole tree first would wait for it in vain (30 s)."""
    layout = layout_for(tmp_path, orthanc, max_files=50)
    archive = tmp_path / "big"
    make_study(archive / "all", 600)  # more than one chunk of 500
    stored = threading.Event()
    real_finish_kept, real_scandir = Queue.finish_kept, os.scandir
    waited: list[bool] = []

    def finish_kept(self: Queue, done: Any, **options: Any) -> Lost:
        lost = real_finish_kept(self, done, **options)
        stored.set()
        return lost

    class SlowEnd:
        """``os.scandir`` of the folder, whose listing ends only once a file is stored."""

        def __init__(self, path: str) -> None:
            self.inner = real_scandir(path)

        def __enter__(self) -> SlowEnd:
            return self

        def __exit__(self, *exc: object) -> None:
            self.inner.close()

        def __iter__(self) -> Iterator[os.DirEntry[str]]:
            yield from self.inner
            waited.append(stored.wait(30))

    def scandir(path: str) -> Any:
        return SlowEnd(path) if Path(path) == archive / "all" else real_scandir(path)

    monkeypatch.setattr(Queue, "finish_kept", finish_kept)
    monkeypatch.setattr(os, "scandir", scandir)
    code = migrate_here(monkeypatch, layout, str(archive), "--destination", "pacs", "--keep")
    assert code == 0
    assert waited == [True]  # a file was stored before the walk had listed the folder
    assert orthanc.instance_count() == 600


def test_the_senders_start_once_the_walk_has_queued_files(
    tmp_path: Path, orthanc: Orthanc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader and the senders start once the walk queued its first chunk, so that their
    first look finds files to read and send instead of waiting out an idle poll (a quarter of
    a second before the first upload, every run)."""
    layout = layout_for(tmp_path, orthanc, max_files=50)
    archive = tmp_path / "nas"
    make_study(archive / "one", 60)
    events: list[str] = []
    real_enqueue, real_send, real_read = Queue.enqueue, Worker.run, Reader.run

    def enqueue(self: Queue, files: Any) -> int:
        added = real_enqueue(self, files)
        events.append(f"queued {added}")
        return added

    def looks(name: str, real: Any) -> Any:
        def run(self: Any) -> None:
            events.append(name)
            real(self)

        return run

    monkeypatch.setattr(migrate_mod, "FIRST_CHUNK_WAIT", 60.0)  # no busy machine's margin
    monkeypatch.setattr(Queue, "enqueue", enqueue)
    monkeypatch.setattr(Worker, "run", looks("send", real_send))
    monkeypatch.setattr(Reader, "run", looks("read", real_read))
    code = migrate_here(monkeypatch, layout, str(archive), "--destination", "pacs", "--keep")
    assert code == 0
    assert events[0] == "queued 60", events
    assert sorted(events[1:3]) == ["read", "send"], events
    assert orthanc.instance_count() == 60


def test_a_walk_that_finds_nothing_still_ends_the_run(
    tmp_path: Path, orthanc: Orthanc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No first chunk ever comes: the end of the walk lets the senders start and the run end
    (not a wait for the chunk)."""
    layout = layout_for(tmp_path, orthanc)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    monkeypatch.setattr(migrate_mod, "FIRST_CHUNK_WAIT", 120.0)
    started = time.monotonic()
    code = migrate_here(monkeypatch, layout, str(empty), "--destination", "pacs", "--keep")
    assert code == 0
    assert time.monotonic() - started < 120.0  # the walk's end, not the wait, started them


def test_a_move_run_after_a_keep_run_says_it_moved_nothing(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    """Every file was stored by the --keep run: the run without it skips them all and must
    not say it moved them to SRC.sent (issue 18)."""
    layout = layout_for(tmp_path, orthanc)
    old = tmp_path / "mr"
    make_study(old / "s1", 3)
    args = ("migrate", "-c", str(layout.config), str(old), "--destination", "pacs")

    kept = run_cli(*args, "--keep", timeout=120)
    assert kept.returncode == 0, kept.stderr
    moving = run_cli(*args, timeout=120)

    assert moving.returncode == 0, moving.stderr
    assert "skipped:  3 file(s) already stored by an earlier run" in moving.stdout
    assert "  moved: nothing (no file was stored or failed by this run)" in moving.stdout
    assert "mr.sent" not in moving.stdout
    assert not (tmp_path / "mr.sent").exists()


def test_migrate_runs_beside_the_daemon_with_a_queue_of_its_own(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    """The daemon holds the config's queue: migrate says to use --queue, and with it runs."""
    layout = layout_for(tmp_path, orthanc)
    old = tmp_path / "old"
    make_study(old / "s1", 2)
    args = ("migrate", "-c", str(layout.config), str(old), "--destination", "pacs", "--keep")
    with Stowd(layout) as daemon:
        wait_for(lambda: "watching" in daemon.log, 30, "the daemon to start", lambda: daemon.log)
        refused = run_cli(*args, timeout=120)
        own = tmp_path / "migration" / "queue.db"
        done = run_cli(*args, "--queue", str(own), timeout=120)
        assert daemon.terminate() == 0

    assert refused.returncode == cli.EXIT_QUEUE_BUSY  # 75: try later, not "see the report"
    assert "is using the queue" in refused.stderr
    assert "give the migration a queue of its own with --queue PATH" in refused.stderr
    assert done.returncode == 0, done.stderr
    assert "stored:   2 file(s)" in done.stdout
    assert own.exists()
    assert orthanc.instance_count() == 2


def test_a_migration_only_config_needs_no_watch_folder(tmp_path: Path, orthanc: Orthanc) -> None:
    """migrate walks its SRC folders only: the config's source's watch folder may be missing
    (a machine that only migrates has no drop folder), as for ``stowd status``."""
    layout = layout_for(tmp_path, orthanc)
    layout.drop.rmdir()
    old = tmp_path / "old"
    make_study(old, 2)
    result = run_cli("migrate", "-c", str(layout.config), str(old), "--destination", "pacs",
                     "--keep", timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "stored:   2 file(s)" in result.stdout
    assert not layout.drop.exists()  # not made either
    assert orthanc.instance_count() == 2


def test_a_queue_held_by_another_stowd_is_exit_75_for_run_and_migrate(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    """A cron wrapper (or systemd) can tell "the queue is in use, try later" (75, EX_TEMPFAIL)
    from "some files were not stored" (1)."""
    layout = layout_for(tmp_path, orthanc)
    old = tmp_path / "old"
    make_study(old, 1)
    with Stowd(layout) as daemon:
        wait_for(lambda: "watching" in daemon.log, 30, "the daemon to start", lambda: daemon.log)
        second = run_cli("run", "-c", str(layout.config), timeout=60)
        migration = run_cli("migrate", "-c", str(layout.config), str(old), "--destination",
                            "pacs", "--keep", timeout=60)  # fmt: skip
        assert daemon.terminate() == 0
    assert (second.returncode, migration.returncode) == (75, 75), (second.stderr, migration.stderr)
    assert "is using the queue" in second.stderr
    assert "start stowd again once that one has finished" in second.stderr
    assert orthanc.instance_count() == 0  # the refused migration sent nothing


def held_lines(log: Path, failed: int) -> list[str]:
    """The progress lines that say the destination is held, once ``failed`` files failed."""
    lines = log.read_text().splitlines()
    return [x for x in lines if " HELD since " in x and f" {failed} failed, " in x]


def test_while_the_archive_is_down_the_progress_says_held_and_the_rate_stops_counting(
    tmp_path: Path,
) -> None:
    """A closed port: the lines say the destination is held and why, give no ETA, and the
    pause does not count in the rate (it stays as it was instead of shrinking, and the ETA
    does not grow)."""
    layout = make_layout(tmp_path / "run", "http://127.0.0.1:9/dicom-web")  # nothing listens
    old = tmp_path / "old"
    make_study(old / "good", 2)
    for n in range(40):  # fail at once, without the archive: a rate before the hold
        write_garbage(old / "bad" / f"{n}.dcm")
    log = tmp_path / "migrate.log"
    args = (str(old), "--destination", "pacs", "--keep", "--progress-every", "0.5")
    with migrating(layout, log, *args) as proc:
        wait_for(lambda: len(held_lines(log, 40)) >= 3, 60, "3 held lines", log.read_text)
        ctrl_c(proc, log)
    lines = held_lines(log, 40)
    assert all("ETA" not in line.replace("no ETA while held", "") for line in lines), lines
    assert all("no ETA while held" in line for line in lines)
    assert all("destination pacs HELD since " in line and "next try" in line for line in lines)
    assert all("cannot connect" in line for line in lines), lines  # why, as status says
    rates = {line.split(" files/s")[0].rsplit(" ", 1)[1] for line in lines}
    assert len(rates) == 1, lines  # the held time is not in the rate


def test_status_follows_a_migration_on_its_own_queue(tmp_path: Path) -> None:
    """``status --queue PATH`` reads the queue ``migrate --queue PATH`` uses: its files show
    under the run's source (not as a source gone from the config), with the held archive."""
    layout = make_layout(tmp_path / "run", "http://127.0.0.1:9/dicom-web")  # nothing listens
    old = tmp_path / "old"
    make_study(old, 3)
    own = tmp_path / "migration" / "queue.db"
    log = tmp_path / "migrate.log"
    args = (str(old), "--destination", "pacs", "--keep", "--queue", str(own))
    status = ("status", "-c", str(layout.config), "--queue", str(own))
    with migrating(layout, log, *args) as proc:
        held = lambda: "HELD since" in run_cli(*status).stdout  # noqa: E731
        wait_for(held, 60, "status to show the held destination", log.read_text)
        shown = run_cli(*status)
        as_json = run_cli(*status, "--json")
        ctrl_c(proc, log)
    assert shown.returncode == 0, shown.stderr
    assert f"queue:        {own}" in shown.stdout
    name = migrate_mod.source_name(old, keep=True)
    assert f"source {name} (a stowd migrate run -> pacs)" in shown.stdout, shown.stdout
    assert "not in the config" not in shown.stdout
    assert "backlog:    3 files, 0.0 MB; no ETA while the destination is held" in shown.stdout
    source = json.loads(as_json.stdout)["by_source"][name]
    assert (source["migration"], source["destination"], source["eta"]) == (True, "pacs", "held")


def test_every_migration_source_name_is_recognised_by_status() -> None:
    for folder in (Path("/mnt/old-pacs/2014"), Path("/"), Path("/x/" + "ü" * 60)):
        for keep in (True, False):
            assert MIGRATION_SOURCE.fullmatch(migrate_mod.source_name(folder, keep))


def test_a_hold_left_by_an_earlier_run_counts_as_a_pause_only_once_a_try_fails() -> None:
    """The first try of a new night may well succeed: until a try of this run fails, the
    hold the last night left is not taken out of the rate; a hold of this run is, from its
    start until it ends."""
    pauses = migrate_mod.Pauses(started=1000.0)
    old = Hold("pacs", since=500.0, until=1001.0, reason="cannot connect", failures=4)
    pauses.carry(old)
    pauses.update(old, 1010.0)
    assert pauses.answering(1010.0) == 10.0  # the first try is still under way
    pauses.update(replace(old, failures=5), 1020.0)  # it failed: down since the run began
    assert pauses.answering(1030.0) == 0.0
    pauses.update(None, 1040.0)  # back
    assert pauses.answering(1050.0) == 10.0
    pauses.update(Hold("pacs", 1060.0, 1070.0, "cannot connect", 1), 1065.0)
    pauses.update(None, 1080.0)
    assert pauses.answering(1100.0) == 40.0  # 1060-1080 held


@pytest.mark.timeout(120)
def test_a_stop_signal_repeated_at_once_is_one_stop_as_under_timeout(tmp_path: Path) -> None:
    """GNU ``timeout`` signals the command and then its own process group, so ``timeout 10h
    stowd migrate`` gets its SIGTERM twice within moments (seen in CI on the overnight page):
    one stop, which lets the upload in flight run out its ``shutdown_timeout`` and prints the
    summary, not "second signal, exiting now"."""
    with socket.socket() as silent:  # takes the request, never answers: an upload in flight
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/dicom-web"
        layout = make_layout(tmp_path / "run", url, shutdown_timeout="2s")
        archive = tmp_path / "archive"
        make_study(archive / "study" / "series", 5)
        log = tmp_path / "migrate.log"
        with migrating(layout, log, str(archive), "--destination", "pacs", "--keep") as proc:
            silent.settimeout(60)
            conn, _ = silent.accept()  # the upload has begun: it waits for an answer
            assert conn.recv(1), log.read_text()
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)  # the handler has run; the upload is still in flight (2 s)
            assert proc.poll() is None, log.read_text()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 130, log.read_text()
            conn.close()
    text = log.read_text()
    assert "second signal" not in text
    assert "run the same command again to go on" in text


def test_a_stop_repeated_later_is_a_second_request() -> None:
    """The window is short: a second stop request (a person's second Ctrl-C) still exits at
    once, in the daemon and in migrate alike."""
    stops = Stops()
    assert not stops.at_once()  # the first: stop gently
    assert not stops.at_once()  # ``timeout``'s signal to its group, at once: the same stop
    stops.first -= SAME_STOP  # as if the first came that long ago
    assert stops.at_once()
    assert stops.count == 2
