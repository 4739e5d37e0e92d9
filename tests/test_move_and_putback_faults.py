"""Issue 22: moving files and putting them back, under faults tried on purpose: no room in sent/,
a crash during a put-back or after a move, a full queue disk, symlinks from sent/, a sidecar's
copy; and status never saying a file the archive did not store was stored.  Each test failed
before its fix."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dicomgen import make_instance, write_garbage
from harness import Stowd, make_layout, run_cli, wait_for
from mounts import fill, tmpfs
from orthanc import Orthanc

from stowd.config.model import Sidecars, Source
from stowd.pipeline import settle as settle_mod
from stowd.pipeline.queue import NewFile, Queue, SqliteQueue

MIB = 1024 * 1024


@pytest.fixture
def source(tmp_path: Path) -> Source:
    return Source("ct", tmp_path / "drop", tmp_path / "sent", tmp_path / "failed", "pacs")


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[Queue]:
    q = SqliteQueue(tmp_path / "q.db").open()
    yield q
    q.close()


def test_a_copy_that_found_no_room_in_sent_leaves_no_part_copy_that_keeps_it_full(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    """sent/ on its own 4 MiB tmpfs: a 6 MiB file cannot be copied there.  Its part copy
    (``.name.stowd-tmp``) used to stay and fill sent/, so that a small file stored after it
    could not be moved either, for as long as the big one waited."""
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url)
    with tmpfs(layout.sent, "4m"):
        make_instance(layout.drop / "big.dcm", size_bytes=6 * MIB)
        with Stowd(layout) as daemon:
            wait_for(
                lambda: "cannot move" in daemon.log and "big.dcm" in daemon.log,
                120,
                "the big file's move failed",
                lambda: daemon.log,
            )
            assert [p.name for p in layout.sent.iterdir()] == []  # no part copy left
            make_instance(layout.drop / "small.dcm", size_bytes=100_000)
            wait_for(
                (layout.sent / "small.dcm").exists,
                120,
                "the small file moved to sent/",
                lambda: daemon.log,
            )
            assert (layout.drop / "big.dcm").exists()  # waits for room, never lost
    assert "Traceback" not in daemon.log
    assert not os.path.exists(layout.drop / "small.dcm")


def crashed_while_putting_back_beside(source: Source, queue: Queue, outcome: str) -> Path:
    """A file moved to ``outcome``/, written on after the move, while a new file was dropped
    at its old path: the put-back linked it as ``img~1.dcm`` and stowd was killed before it
    removed the link in ``outcome``/.  Returns that link."""
    path = source.watch / "img.dcm"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"h" * 878)
    st = path.stat()
    queue.enqueue([NewFile("ct", "pacs", str(path), "img.dcm", st.st_size, st.st_mtime_ns)])
    [job] = queue.jobs()
    base = source.sent if outcome == "sent" else source.failed
    target = base / "img.dcm"
    queue.begin_settle([(job, outcome, str(target), {"reason": "r"})])
    target.parent.mkdir(parents=True)
    os.rename(path, target)
    with open(target, "ab") as writer:
        writer.write(b"rest")
    path.write_bytes(b"a new file dropped at the same path")
    os.link(target, path.with_name("img~1.dcm"))  # kill -9 here, before the unlink
    return target


@pytest.mark.parametrize("outcome", ["sent", "failed"])
def test_a_crash_while_a_changed_file_was_put_back_beside_its_place_leaves_it_once(
    source: Source, queue: Queue, outcome: str
) -> None:
    """The link left in sent/ (or failed/) held the new content as if it had been handled,
    and the file went on to be sent from the drop folder as well."""
    target = crashed_while_putting_back_beside(source, queue, outcome)
    assert settle_mod.repair(queue) == (1, set())
    assert not target.exists()
    drop = source.watch
    assert (drop / "img.dcm").read_bytes() == b"a new file dropped at the same path"
    assert (drop / "img~1.dcm").read_bytes() == b"h" * 878 + b"rest"
    assert queue.counts() == {"sent" if outcome == "sent" else "gone": 1}


def test_a_crash_while_a_changed_file_was_put_back_beside_its_place_puts_it_back_once(
    source: Source, queue: Queue
) -> None:
    """As above, and the new file at the old path was sent meanwhile: the repair linked the
    changed file back a second time (``img.dcm`` and ``img~1.dcm``, each then sent)."""
    target = crashed_while_putting_back_beside(source, queue, "sent")
    (source.watch / "img.dcm").unlink()
    assert settle_mod.repair(queue) == (1, set())
    assert not target.exists()
    assert sorted(p.name for p in source.watch.iterdir()) == ["img~1.dcm"]
    assert (source.watch / "img~1.dcm").read_bytes() == b"h" * 878 + b"rest"


def test_a_daemon_started_on_a_full_queue_disk_says_the_disk_is_full(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    """A stowd (re)started while its queue's disk is full cannot open the queue: it said only
    'disk I/O error' (what SQLite says when it cannot create the -shm file), and systemd
    restarts it every RestartSec with that line, as if a disk were failing."""
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url)
    state = layout.root / "state"
    with tmpfs(state):
        make_instance(layout.drop / "a.dcm")
        with Stowd(layout) as first:
            wait_for((layout.sent / "a.dcm").exists, 60, "a.dcm sent", lambda: first.log)
            assert first.terminate() == 0
        fill(state)
        with Stowd(layout) as again:
            wait_for(lambda: not again.alive(), 60, "stowd gave up", lambda: again.log)
    assert f"DISK FULL: the queue folder {state} has 0 bytes free" in again.log, again.log
    assert "Traceback" not in again.log


@pytest.mark.parametrize("outcome", ["sent", "failed"])
def test_a_crash_after_the_move_then_a_new_file_at_the_same_path_finishes_the_move(
    source: Source, queue: Queue, outcome: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Killed after the file was moved, before its reason was written and its row finished;
    before the restart a device dropped a new file under the same name (modalities reuse
    names).  The repair took the new file for the moved one changed: the row ended 'gone',
    the moved file stayed in failed/ without its reason, and the log said it was not moved."""
    path = source.watch / "img.dcm"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"h" * 878)
    st = path.stat()
    queue.enqueue([NewFile("ct", "pacs", str(path), "img.dcm", st.st_size, st.st_mtime_ns)])
    [job] = queue.jobs()
    base = source.sent if outcome == "sent" else source.failed
    target = base / "img.dcm"
    queue.begin_settle([(job, outcome, str(target), {"reason": "r"})])
    target.parent.mkdir(parents=True)
    os.rename(path, target)  # kill -9 here
    path.write_bytes(b"a new file dropped at the same path")
    assert settle_mod.repair(queue) == (1, set())
    assert target.read_bytes() == b"h" * 878
    assert path.read_bytes() == b"a new file dropped at the same path"
    assert queue.counts() == {outcome: 1}
    assert (Path(str(target) + ".error.json").exists()) == (outcome == "failed")
    assert "changed after it was read" not in caplog.text


def test_a_relative_symlink_that_names_another_file_from_sent_is_not_put_back(
    source: Source, queue: Queue
) -> None:
    """``a.dcm -> x.dcm`` in the drop folder, and an older ``x.dcm`` already in sent/: once
    moved, the link named that other file, so it was taken for a file that changed after it
    was read, put back and queued again with the same content, for ever (sent every cycle)."""
    source.watch.mkdir()
    source.sent.mkdir()
    (source.watch / "x.dcm").write_bytes(b"A" * 100)
    (source.sent / "x.dcm").write_bytes(b"B" * 50)  # sent before
    link = source.watch / "a.dcm"
    os.symlink("x.dcm", link)
    st = link.stat()
    queue.enqueue([NewFile("ct", "pacs", str(link), "a.dcm", st.st_size, st.st_mtime_ns)])
    [job] = queue.jobs()
    [result] = settle_mod.settle_all(queue, [settle_mod.Decision(job, source, "sent")])
    assert result.target == source.sent / "a.dcm"
    assert os.readlink(source.sent / "a.dcm") == "x.dcm"  # the link, moved as it was
    assert sorted(p.name for p in source.watch.iterdir()) == ["x.dcm"]
    assert queue.counts() == {"sent": 1}


def test_a_symlink_whose_file_changed_after_it_was_read_is_still_put_back(
    source: Source, queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    source.watch.mkdir()
    (source.watch / "x.dcm").write_bytes(b"A" * 100)
    link = source.watch / "a.dcm"
    os.symlink("x.dcm", link)
    st = link.stat()
    queue.enqueue([NewFile("ct", "pacs", str(link), "a.dcm", st.st_size, st.st_mtime_ns)])
    [job] = queue.jobs()
    real_move = settle_mod.move

    def move_then_write(src: Path, dst: Path, **options: Any) -> bool:
        done = real_move(src, dst, **options)
        with open(source.watch / "x.dcm", "ab") as writer:  # the writer goes on
            writer.write(b"rest")
        return done

    monkeypatch.setattr(settle_mod, "move", move_then_write)
    settle_mod.settle_all(queue, [settle_mod.Decision(job, source, "sent")])
    assert os.readlink(link) == "x.dcm"  # put back, as the link
    assert not (source.sent / "a.dcm").is_symlink()


def test_status_never_says_a_file_the_archive_did_not_store_was_stored(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    """failed/ full: a file that is not DICOM waits to be moved there.  The destination's
    health read 'ok, but 1 file(s) it stored are not yet moved', of a file never sent."""
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url)
    with tmpfs(layout.failed):
        fill(layout.failed)
        write_garbage(layout.drop / "junk.dcm", 200_000)
        with Stowd(layout) as daemon:
            wait_for(lambda: "cannot move" in daemon.log, 60, "the move failed", lambda: daemon.log)
            result = run_cli("status", "-c", str(layout.config))
    assert result.returncode == 0, result.stderr
    assert "it stored" not in result.stdout
    assert (
        "health:     ok, but 1 file(s) are not yet moved to sent/ or failed/ (see the warnings)"
        in result.stdout
    )


def test_a_file_put_back_takes_the_copy_of_its_own_sidecar_out_of_sent(
    source: Source, queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy of ``img.dcm.json`` made before the move stayed in sent/ without its file
    (which went back to the drop folder with its sidecar), and the file, sent again, became
    ``img~1.dcm`` because that name was taken."""
    source = dataclasses.replace(source, sidecars=Sidecars())
    source.watch.mkdir()
    path = source.watch / "img.dcm"
    path.write_bytes(b"h" * 100)
    own = source.watch / "img.dcm.json"
    own.write_text('{"PatientID": "A"}')
    st = path.stat()
    queue.enqueue([NewFile("ct", "pacs", str(path), "img.dcm", st.st_size, st.st_mtime_ns)])
    [job] = queue.jobs()
    job = dataclasses.replace(job, sidecars=json.dumps([[str(own), own.read_text()]]))
    real_move = settle_mod.move

    def move_then_write(src: Path, dst: Path, **options: Any) -> bool:
        done = real_move(src, dst, **options)
        with open(dst, "ab") as writer:  # the writer goes on after the move
            writer.write(b"rest")
        return done

    monkeypatch.setattr(settle_mod, "move", move_then_write)
    settle_mod.settle_all(queue, [settle_mod.Decision(job, source, "sent")])
    assert sorted(p.name for p in source.watch.iterdir()) == ["img.dcm", "img.dcm.json"]
    assert list(source.sent.iterdir()) == []
