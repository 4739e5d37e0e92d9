"""A writer that stalls longer than the quiet period never leaves a file reported stored
that the archive holds only half of (issue 22).

The real daemon, a real Orthanc, real files.  The writer keeps the file open and pauses
until stowd has looked at what is there (its log says it waits for the rest, or the file
left the drop folder: what stowd did before these fixes), then writes the rest.  Nothing
waits on a clock: every wait is on a condition, with a generous bound.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
import pytest
import yaml
from dicomgen import make_instance_bytes, pydicom_all_files
from harness import Layout, Stowd, make_layout, wait_for
from mounts import tmpfs
from orthanc import Orthanc

from stowd.config.load import load_config
from stowd.config.model import DEFAULT_INCOMPLETE_WAIT, Source
from stowd.errors import FileIncomplete
from stowd.pipeline import settle as settle_mod
from stowd.pipeline.classify import classify
from stowd.pipeline.queue import Job, NewFile, Queue, SqliteQueue
from stowd.pipeline.settle import Decision, settle_all

PIXEL_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
SIZE = 512 * 1024
WAIT = 90.0  # bound of every wait on the daemon (a busy machine is slow, never stuck)
NON_IMAGES = ("rtplan.dcm", "test-SR.dcm", "reportsi.dcm", "waveform_ecg.dcm")


def instance() -> tuple[bytes, str, int]:
    """A ~512 KiB Part-10 image, its SOPInstanceUID and where its pixel data element starts."""
    data, uid = make_instance_bytes(size_bytes=SIZE)
    return data, uid, data.rfind(PIXEL_TAG)


# -- the completeness check ------------------------------------------------------------------


def test_an_image_that_ends_before_its_pixel_data_is_incomplete(tmp_path: Path) -> None:
    """Cut anywhere from its Rows on: never taken for a complete file."""
    data, _uid, pixels = instance()
    path = tmp_path / "img.dcm"
    rows = data.find(b"\x28\x00\x10\x00US")  # (0028,0010) Rows, explicit VR little endian
    assert 0 < rows < pixels
    for cut in [*range(rows, pixels + 40), pixels + 4096, len(data) - 1]:
        path.write_bytes(data[:cut])
        with pytest.raises(FileIncomplete, match="truncated"):
            classify(str(path))
    path.write_bytes(data[:pixels])
    with pytest.raises(FileIncomplete, match=r"of \d+ x \d+ pixels but the file ends before"):
        classify(str(path))
    path.write_bytes(data)
    assert classify(str(path)).kind == "dicom"


@pytest.mark.parametrize("name", NON_IMAGES)
def test_an_object_without_pixel_data_that_is_no_image_is_complete(name: str) -> None:
    """Reports, plans and waveforms have no pixel data and are sent as they are."""
    [sample] = [p for p in pydicom_all_files() if p.name == name]
    assert classify(str(sample)).kind == "dicom"


# -- the real daemon with a paused writer --------------------------------------------------------


@pytest.fixture
def other_fs(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path/run/done`` on a tmpfs of its own: sent/ and failed/ on another filesystem."""
    done = tmp_path / "run" / "done"
    with tmpfs(done, "8m"):
        yield done


def stored(orthanc: Orthanc, uid: str) -> pydicom.Dataset | None:
    """The instance the archive holds for ``uid`` (None: none)."""
    found = orthanc.post_json(
        "/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": uid}}
    )
    if not found:
        return None
    data = orthanc.get_bytes(f"/instances/{found[0]}/file")
    return pydicom.dcmread(io.BytesIO(data), force=True)


def stored_whole(orthanc: Orthanc, uid: str, data: bytes) -> bool:
    ds = stored(orthanc, uid)
    if ds is None or "PixelData" not in ds:
        return False
    return bool(ds.PixelData == pydicom.dcmread(io.BytesIO(data)).PixelData)


def said(log: str, path: Path, text: str) -> bool:
    """Does a line of ``log`` about ``path`` say ``text``?"""
    return any(f"{path}: " in line and text in line for line in log.splitlines())


def pause_until_looked_at(daemon: Stowd, path: Path) -> None:
    """The writer's stall: until stowd waits for the rest (or moved the file away)."""
    wait_for(
        lambda: said(daemon.log, path, "for the rest of it") or not path.exists(),
        WAIT,
        f"stowd to look at the first part of {path.name}",
        lambda: daemon.log,
    )


def write_paused(daemon: Stowd, path: Path, data: bytes, cut: int) -> None:
    """Write ``data[:cut]``, keep the file open and stall, then write the rest and close."""
    with open(path, "wb") as fp:
        fp.write(data[:cut])
        fp.flush()
        os.fsync(fp.fileno())
        pause_until_looked_at(daemon, path)
        fp.write(data[cut:])


def run_paused_writer(layout: Layout, orthanc: Orthanc, cut: Callable[[int], int]) -> None:
    data, uid, pixels = instance()
    path = layout.drop / "img.dcm"
    with Stowd(layout) as daemon:
        wait_for(lambda: "watching" in daemon.log, WAIT, "the daemon to start", lambda: daemon.log)
        write_paused(daemon, path, data, cut(pixels))
        wait_for(
            lambda: stored_whole(orthanc, uid, data) and layout.files(layout.sent) == {"img.dcm"},
            WAIT,
            "the whole file stored and in sent/",
            lambda: daemon.log,
        )
        assert (layout.sent / "img.dcm").read_bytes() == data
        assert layout.files(layout.failed) == set()
        assert said(daemon.log, path, "for the rest of it")
        assert daemon.terminate() == 0


def header_only(pixels: int) -> int:
    return pixels


def half_the_pixels(pixels: int) -> int:
    return pixels + (SIZE - pixels) // 2


def layout_for(tmp_path: Path, orthanc: Orthanc) -> Layout:
    return make_layout(
        tmp_path / "run", orthanc.dicomweb_url, source={"incomplete_wait": f"{WAIT:.0f}s"}
    )


@pytest.mark.parametrize("cut", [header_only, half_the_pixels])
def test_a_writer_that_stalls_has_its_whole_file_stored(
    tmp_path: Path, orthanc: Orthanc, cut: Callable[[int], int]
) -> None:
    run_paused_writer(layout_for(tmp_path, orthanc), orthanc, cut)


@pytest.mark.parametrize("cut", [header_only, half_the_pixels])
def test_a_writer_that_stalls_has_its_whole_file_stored_with_sent_on_another_filesystem(
    tmp_path: Path, other_fs: Path, orthanc: Orthanc, cut: Callable[[int], int]
) -> None:
    run_paused_writer(layout_for(tmp_path, orthanc), orthanc, cut)


@pytest.mark.parametrize(
    ("elsewhere", "wait"),
    [(False, "2s"), (True, "2s"), (False, "0s")],
    ids=["same-fs", "other-fs", "no-wait"],
)
def test_a_writer_that_never_finishes_leaves_every_byte_in_failed(
    tmp_path: Path, orthanc: Orthanc, elsewhere: bool, wait: str, request: pytest.FixtureRequest
) -> None:
    if elsewhere:
        request.getfixturevalue("other_fs")
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url, source={"incomplete_wait": wait})
    data, _uid, pixels = instance()
    written = data[: half_the_pixels(pixels)]
    path = layout.drop / "img.dcm"
    with Stowd(layout) as daemon:
        with open(path, "wb") as fp:  # the writer dies after half the pixel data
            fp.write(written)
        wait_for(
            lambda: "img.dcm" in layout.files(layout.failed) and "img.dcm" in layout.error_files(),
            WAIT,
            "the cut file and its reason in failed/",
            lambda: daemon.log,
        )
        assert (layout.failed / "img.dcm").read_bytes() == written
        reason = json.loads(layout.error_files()["img.dcm"].read_text())["reason"]
        assert reason.startswith("the file is truncated: its pixel data should have")
        assert ("stayed so for 2s" in reason) == (wait == "2s")
        assert said(daemon.log, path, "for the rest of it") == (wait == "2s")
        assert layout.files(layout.sent) == set() and orthanc.instance_count() == 0
        assert daemon.terminate() == 0


def behind(path: Path, seconds: float = 120.0) -> None:
    """Stamp ``path`` with an mtime ``seconds`` in the past, as a share whose clock runs
    slow does with every write."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_on_a_share_whose_clock_is_behind_a_stalled_file_waits_its_quiet_period(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    """A report (no pixel data: the DICOM structure cannot tell it is cut) written on a
    share whose mtimes lie two minutes in the past: its first part, found by the start-up
    scan, must not be taken for a file quiet for two minutes."""
    [sample] = [p for p in pydicom_all_files() if p.name == "rtplan.dcm"]
    data, cut = sample.read_bytes(), 1000
    uid = str(pydicom.dcmread(sample).SOPInstanceUID)
    source = {"polling": True, "quiet_period": "10s", "rescan_interval": "1h"}
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url, source=source)
    path = layout.drop / "plan.dcm"
    with open(path, "wb") as fp:
        fp.write(data[:cut])
        fp.flush()
        behind(path)
        daemon = Stowd(layout).start()
        try:
            wait_for(lambda: "scan of" in daemon.log, WAIT, "the start-up scan", lambda: daemon.log)
            fp.write(data[cut:])
            fp.flush()
            behind(path)
        except BaseException:
            daemon.stop()
            raise
    try:
        wait_for(
            lambda: layout.files(layout.sent) == {"plan.dcm"} and stored(orthanc, uid) is not None,
            WAIT,
            "plan.dcm stored and in sent/",
            lambda: daemon.log,
        )
        assert f"queued {path} ({cut} bytes" not in daemon.log
        assert f"queued {path} ({len(data)} bytes" in daemon.log
        assert (layout.sent / "plan.dcm").read_bytes() == data
        assert daemon.terminate() == 0
    finally:
        daemon.stop()


def test_incomplete_wait_is_a_source_setting(tmp_path: Path) -> None:
    url = "http://127.0.0.1:9/dicom-web"
    default = make_layout(tmp_path / "a", url)
    doc = yaml.safe_load(default.config.read_text())
    del doc["sources"][0]["incomplete_wait"]  # the harness sets 2s
    default.config.write_text(yaml.safe_dump(doc))
    assert load_config(default.config).sources[0].incomplete_wait == DEFAULT_INCOMPLETE_WAIT
    assert DEFAULT_INCOMPLETE_WAIT == 600.0
    at_once = make_layout(tmp_path / "b", url, source={"incomplete_wait": 0})
    assert load_config(at_once.config).sources[0].incomplete_wait == 0.0


# -- settling a file that changed after it was read ----------------------------------------------


@pytest.fixture
def source(tmp_path: Path) -> Source:
    return Source("ct", tmp_path / "drop", tmp_path / "sent", tmp_path / "failed", "pacs")


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[Queue]:
    q = SqliteQueue(tmp_path / "q.db").open()
    yield q
    q.close()


def dropped(source: Source, queue: Queue, data: bytes) -> tuple[Path, Job]:
    path = source.watch / "img.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    st = path.stat()
    queue.enqueue([NewFile("ct", "pacs", str(path), "img.dcm", st.st_size, st.st_mtime_ns)])
    [job] = queue.jobs()
    return path, job


def empty(folder: Path) -> bool:
    return not folder.exists() or not any(folder.rglob("*"))


def requeue(queue: Queue, path: Path) -> int:
    st = path.stat()
    return queue.enqueue([NewFile("ct", "pacs", str(path), path.name, st.st_size, st.st_mtime_ns)])


def writing_on_after_the_move(
    monkeypatch: pytest.MonkeyPatch, writer: BinaryIO, more: bytes
) -> None:
    """The writer still has the file open and writes on just after it was moved."""
    real_move = settle_mod.move

    def move_then_write(src: Path, dst: Path, **options: Any) -> bool:
        done = real_move(src, dst, **options)
        writer.write(more)
        writer.flush()
        return done

    monkeypatch.setattr(settle_mod, "move", move_then_write)


@pytest.mark.parametrize("outcome", ["sent", "failed"])
def test_a_file_that_changed_after_the_move_goes_back_to_the_drop_folder(
    source: Source,
    queue: Queue,
    outcome: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path, job = dropped(source, queue, b"h" * 878)
    with open(path, "ab") as writer:
        writing_on_after_the_move(monkeypatch, writer, b"p" * 1000)
        [result] = settle_all(queue, [Decision(job, source, outcome, {"reason": "r"})])
    assert result.problem is None and result.target is None
    assert path.read_bytes() == b"h" * 878 + b"p" * 1000  # every byte, back where it was
    assert empty(source.sent) and empty(source.failed)
    assert queue.counts() == {"sent" if outcome == "sent" else "gone": 1}
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "changed after it was read for upload (878 bytes then, 1878 now)" in warning
    assert "queued again as a new file" in warning
    assert requeue(queue, path) == 1  # the watcher queues the new content


def test_a_changed_file_whose_place_was_taken_is_put_beside_it(
    source: Source, queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, job = dropped(source, queue, b"h" * 878)
    real_move = settle_mod.move

    def move_then_change(src: Path, dst: Path, **options: Any) -> bool:
        done = real_move(src, dst, **options)
        with open(dst, "ab") as writer:
            writer.write(b"rest")
        src.write_bytes(b"a new file dropped at the same path")
        return done

    monkeypatch.setattr(settle_mod, "move", move_then_change)
    settle_all(queue, [Decision(job, source, "sent")])
    assert path.read_bytes() == b"a new file dropped at the same path"  # never overwritten
    assert (path.parent / "img~1.dcm").read_bytes() == b"h" * 878 + b"rest"
    assert not (source.sent / "img.dcm").exists()


def test_a_crash_while_a_changed_file_was_put_back_leaves_it_once(
    source: Source, queue: Queue
) -> None:
    path, job = dropped(source, queue, b"h" * 878)
    target = source.sent / "img.dcm"
    queue.begin_settle([(job, "sent", str(target), None)])
    target.parent.mkdir(parents=True)
    with open(path, "ab") as writer:
        writer.write(b"rest")
    os.link(path, target)  # crash after the link back, before sent/'s link was removed
    assert settle_mod.repair(queue) == (1, set())
    assert path.read_bytes() == b"h" * 878 + b"rest" and not target.exists()
    assert queue.counts() == {"sent": 1}


def exdev_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rename or link from the drop folder to sent/ fails as it does across filesystems."""
    real_rename, real_link = os.rename, os.link

    def rename(a: Any, b: Any, **folders: Any) -> None:
        if ".stowd-tmp" not in str(a):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_rename(a, b, **folders)

    def link(a: Any, b: Any, **folders: Any) -> None:
        if ".stowd-tmp" not in str(a):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_link(a, b, **folders)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "link", link)


def test_a_copy_across_filesystems_never_unlinks_a_source_that_changed(
    source: Source, queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, job = dropped(source, queue, b"h" * 878)
    exdev_first(monkeypatch)
    real_copy = settle_mod._copy_all

    def copy_while_written(fin: BinaryIO, fout: BinaryIO) -> int:
        copied = real_copy(fin, fout)
        with open(path, "ab") as writer:  # the writer goes on while the copy is made
            writer.write(b"p" * 1000)
        return copied

    monkeypatch.setattr(settle_mod, "_copy_all", copy_while_written)
    [result] = settle_all(queue, [Decision(job, source, "sent")])
    assert result.target is None and result.problem is None
    assert path.read_bytes() == b"h" * 878 + b"p" * 1000  # never unlinked: nothing lost
    assert empty(source.sent)  # no copy, no temporary file
    assert queue.counts() == {"sent": 1}
    assert requeue(queue, path) == 1


def test_a_copy_across_filesystems_of_other_content_than_read_keeps_the_source(
    source: Source, queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file changed after it was read but before the copy began."""
    path, job = dropped(source, queue, b"h" * 878)
    exdev_first(monkeypatch)
    monkeypatch.setattr(settle_mod, "_replaced", lambda _job: False)  # changed just after it
    with open(path, "ab") as writer:
        writer.write(b"p")
    settle_all(queue, [Decision(job, source, "failed", {"reason": "r"})])
    assert path.read_bytes() == b"h" * 878 + b"p"
    assert empty(source.failed)
    assert queue.counts() == {"gone": 1}


def test_a_file_found_incomplete_waits_only_while_unchanged(queue: Queue, tmp_path: Path) -> None:
    path = tmp_path / "img.dcm"
    path.write_bytes(b"x")
    st = path.stat()
    queue.enqueue([NewFile("ct", "pacs", str(path), "img.dcm", st.st_size, st.st_mtime_ns)])
    [job] = queue.jobs()
    assert queue.wait_for_rest(job, at=2e9, error={"reason": "r"})
    [waiting] = queue.jobs()
    assert waiting.first_try is not None and waiting.error is not None
    path.write_bytes(b"xy")  # the rest arrived: the watcher updates the row
    assert requeue(queue, path) == 0
    [updated] = queue.jobs()
    assert updated.first_try is None and updated.attempts == 0
    assert not queue.wait_for_rest(job, at=2e9, error={"reason": "r"})
    assert queue.unclassified(10) == [updated]  # read again at once


def test_a_changed_file_the_watcher_finds_before_its_row_is_done_is_queued_then(
    source: Source, queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watcher sees the file put back at once, while its old row is still settling."""
    path, job = dropped(source, queue, b"h" * 878)
    real_put_back = settle_mod._put_back
    found: list[int] = []

    def put_back_and_seen(job: Job, target: Path, *roots: Any) -> Path:
        place = real_put_back(job, target, *roots)
        found.append(requeue(queue, place))  # the watcher's look, racing the bookkeeping
        return place

    monkeypatch.setattr(settle_mod, "_put_back", put_back_and_seen)
    with open(path, "ab") as writer:
        writing_on_after_the_move(monkeypatch, writer, b"p" * 1000)
        settle_all(queue, [Decision(job, source, "sent")])
    assert found == [0]  # too early: its old row was not done yet
    assert queue.counts() == {"sent": 1, "pending": 1}  # queued when it was done
    [new] = queue.jobs("pending")
    assert (new.path, new.size) == (str(path), 1878)


def test_new_content_found_while_a_row_is_busy_waits_for_that_row(
    queue: Queue, tmp_path: Path
) -> None:
    path = tmp_path / "img.dcm"
    path.write_bytes(b"old")
    assert requeue(queue, path) == 1
    [job] = queue.jobs()
    queue.begin_settle([(job, "sent", str(tmp_path / "sent" / "img.dcm"), None)])
    path.write_bytes(b"new and longer")
    assert requeue(queue, path) == 0  # the path's row is being settled
    assert queue.counts() == {"settling": 1}
    queue.finish_many([(job.id, "gone")])
    assert queue.counts() == {"gone": 1, "pending": 1}
    assert [j.size for j in queue.jobs("pending")] == [len(b"new and longer")]
