"""The queue's own files in trouble, with the real daemon (issue 22): a read-only queue
folder, a ``-wal`` deleted after a kill -9."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from dicomgen import make_instance
from harness import Layout, Stowd, make_layout, run_cli, wait_for
from mounts import read_only
from postgres import queue_backend  # noqa: F401 - its queue tests run on both backends

from stowd.errors import QueueError
from stowd.pipeline.queue import SqliteQueue

NOWHERE = "http://127.0.0.1:9/dicom-web"  # nothing is sent in these tests


def queue_folder(layout: Layout) -> Path:
    return layout.root / "state"


def assert_one_line_about_read_only(result: subprocess.CompletedProcess[str], folder: Path) -> None:
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stowd: "), result.stderr
    assert f"the queue folder {folder} is on a read-only filesystem" in lines[0], lines[0]


def test_a_read_only_queue_folder_is_a_stowd_message_not_a_traceback(tmp_path: Path) -> None:
    layout = make_layout(tmp_path / "run", NOWHERE)
    folder = queue_folder(layout)
    folder.mkdir()
    with read_only(folder):  # a new queue: not even the lock file can be made
        result = run_cli("run", "-c", str(layout.config), "--log-level", "WARNING")
        assert_one_line_about_read_only(result, folder)
        assert str(folder / "queue.db.lock") in result.stderr


def test_an_existing_queue_on_a_folder_made_read_only(tmp_path: Path) -> None:
    layout = make_layout(tmp_path / "run", NOWHERE)
    with Stowd(layout) as daemon:
        wait_for(lambda: "watching" in daemon.log, 30, "the daemon to start", lambda: daemon.log)
        assert daemon.terminate() == 0
    folder = queue_folder(layout)
    assert (folder / "queue.db").exists()
    with read_only(folder):
        result = run_cli("run", "-c", str(layout.config), "--log-level", "WARNING")
        assert_one_line_about_read_only(result, folder)
        status = run_cli("status", "-c", str(layout.config))
        assert "Traceback" not in status.stderr, status.stderr
        if status.returncode != 0:  # it may also read it; if not, it says why in one line
            assert status.stderr.startswith("stowd: "), status.stderr
            assert "read-only filesystem" in status.stderr, status.stderr


LOST = "lost its recent history"


def backlog(layout: Layout) -> int:
    result = run_cli("status", "-c", str(layout.config), "--json")
    assert result.returncode == 0, result.stderr
    files: int = json.loads(result.stdout)["backlog_files"]
    return files


def test_a_wal_deleted_after_kill_9_is_said_and_the_files_are_found_again(
    tmp_path: Path,
) -> None:
    layout = make_layout(tmp_path / "run", NOWHERE)  # nothing answers: the files stay queued
    for name in ("a.dcm", "b.dcm"):
        make_instance(layout.drop / name)
    with Stowd(layout) as first:
        wait_for(lambda: "watching" in first.log, 30, "the start", lambda: first.log)
        wait_for(lambda: backlog(layout) == 2, 60, "two files queued", lambda: first.log)
        first.kill()
    wal = queue_folder(layout) / "queue.db-wal"
    assert wal.stat().st_size > 0  # the queued rows live there until a checkpoint
    wal.unlink()
    with Stowd(layout) as second:
        wait_for(lambda: "watching" in second.log, 30, "the start", lambda: second.log)
        wait_for(lambda: backlog(layout) == 2, 60, "the files found again", lambda: second.log)
        assert second.terminate() == 0
    lines = [line for line in second.log.splitlines() if LOST in line]
    assert len(lines) == 1 and " WARNING " in lines[0], lines
    assert str(wal) in lines[0]


def test_no_lost_history_after_a_clean_stop_or_on_a_new_queue(tmp_path: Path) -> None:
    layout = make_layout(tmp_path / "run", NOWHERE)
    make_instance(layout.drop / "a.dcm")
    for run in range(2):  # a new queue, then the same queue after a clean stop
        log = start_queue_stop(layout)
        assert LOST not in log, run
        assert not (queue_folder(layout) / "queue.db-wal").exists()  # checkpointed at close


def start_queue_stop(layout: Layout) -> str:
    """Run the daemon until its one file is queued, stop it cleanly; its log."""
    with Stowd(layout) as daemon:
        wait_for(lambda: "watching" in daemon.log, 30, "the start", lambda: daemon.log)
        wait_for(lambda: backlog(layout) == 1, 60, "the file queued", lambda: daemon.log)
        assert daemon.terminate() == 0
    return daemon.log


def test_the_sqlite_side_of_a_read_only_queue_folder_is_a_queue_error(tmp_path: Path) -> None:
    """Past the lock file (not taken here): SQLite's own refusal says the same."""
    folder = tmp_path / "state"
    SqliteQueue(folder / "queue.db").open(lock=False).close()
    with read_only(folder), pytest.raises(QueueError) as caught:
        SqliteQueue(folder / "queue.db").open(lock=False)
    assert f"the queue folder {folder} is on a read-only filesystem" in str(caught.value)
