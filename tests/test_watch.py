"""Finding complete files: quiet period, temp names, exclusions, events and scans."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from harness import Clock, wait_for
from watchdog.events import DirModifiedEvent, FileCreatedEvent, FileMovedEvent

from stowd.config.model import Sidecars, Source
from stowd.errors import QueueError, QueueFull
from stowd.pipeline.queue import NewFile
from stowd.pipeline.watch import Watcher, _Handler


class Sink:
    def __init__(self) -> None:
        self.files: list[NewFile] = []
        self.lock = threading.Lock()

    def __call__(self, files: list[NewFile]) -> int:
        with self.lock:
            self.files.extend(files)
        return len(files)

    def paths(self) -> set[str]:
        with self.lock:
            return {f.rel for f in self.files}

    def sizes(self, rel: str) -> list[int]:
        with self.lock:
            return [f.size for f in self.files if f.rel == rel]


def make_source(tmp_path: Path, **kw: object) -> Source:
    watch = tmp_path / "drop"
    watch.mkdir()
    return Source(
        "ct",
        watch,
        watch / "sent",
        watch / "failed",
        "pacs",
        **kw,  # type: ignore[arg-type]
    )


def write(path: Path, data: bytes = b"data", age: float = 60.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    past = time.time() - age
    os.utime(path, (past, past))
    return path


def test_scan_queues_old_files_and_skips_temp_names_and_own_folders(tmp_path: Path) -> None:
    source = make_source(tmp_path)
    for rel in (
        "a.dcm",
        "sub/b.dcm",
        ".hidden",
        "c.part",
        "d.tmp",
        "e.partial",
        ".incoming/f.dcm",
        "sent/g.dcm",
        "failed/h.dcm",
    ):
        write(source.watch / rel)
    sink = Sink()
    Watcher(source, "pacs", sink).scan()
    assert sink.paths() == {"a.dcm", os.path.join("sub", "b.dcm")}
    assert {f.size for f in sink.files} == {4}


def test_a_fresh_file_waits_for_the_quiet_period(tmp_path: Path) -> None:
    source = make_source(tmp_path, quiet_period=5.0)
    clock = Clock(time.time())
    sink = Sink()
    watcher = Watcher(source, "pacs", sink, clock=clock)
    path = write(source.watch / "new.dcm", age=1.0)
    clock.now = path.stat().st_mtime + 1.0
    watcher.scan()
    assert sink.files == []
    clock.now += 3.0  # 4 s quiet: still not complete
    watcher._check_all(watcher._pop_due())
    assert sink.files == []
    clock.now += 2.0
    watcher._check_all(watcher._pop_due())
    assert sink.paths() == {"new.dcm"}


def test_files_whose_quiet_ends_together_are_queued_together(tmp_path: Path) -> None:
    """Two files with one mtime, found by one scan while their quiet period ends: each was
    judged at its own clock reading, so the first could be scheduled (1 ms left) and the
    second queued, and they went out in two requests (a CI failure of
    test_archive_profiles). The files of one scan chunk are judged at one instant."""
    source = make_source(tmp_path, quiet_period=0.5)
    ticks = iter(range(10_000))
    start = time.time()
    batches: list[set[str]] = []

    def sink(files: list[NewFile]) -> int:
        batches.append({f.rel for f in files})
        return len(files)

    # the clock moves 1 ms each time it is read
    watcher = Watcher(source, "pacs", sink, clock=lambda: start + next(ticks) / 1000)
    for name in ("a.dcm", "b.dcm", "c.dcm"):
        path = write(source.watch / name)
        os.utime(path, (start - 0.4995, start - 0.4995))  # quiet ends 0.5 ms after start
    watcher.scan()
    assert batches in ([], [{"a.dcm", "b.dcm", "c.dcm"}])
    for _ in range(3):
        watcher._check_all(watcher._pop_due())
    assert batches == [{"a.dcm", "b.dcm", "c.dcm"}]


def test_a_file_still_growing_is_never_complete(tmp_path: Path) -> None:
    source = make_source(tmp_path, quiet_period=2.0)
    clock = Clock(time.time())
    sink = Sink()
    watcher = Watcher(source, "pacs", sink, clock=clock)
    path = source.watch / "slow.dcm"
    for i in range(5):  # a write every second, for longer than the quiet period
        with open(path, "ab") as fp:
            fp.write(b"x" * 1000)
        stamp = clock.now
        os.utime(path, (stamp, stamp))
        watcher._check_all([str(path)])
        clock.now += 1.0
        watcher._check_all(watcher._pop_due())
        assert sink.files == [], f"sent early after write {i}"
    clock.now += 2.0
    watcher._check_all(watcher._pop_due())
    assert [f.size for f in sink.files] == [5000]


def test_mtime_in_the_future_needs_two_equal_looks(tmp_path: Path) -> None:
    source = make_source(tmp_path, quiet_period=3.0)
    clock = Clock(time.time())
    sink = Sink()
    watcher = Watcher(source, "pacs", sink, clock=clock)
    path = write(source.watch / "skew.dcm", age=-3600)  # an hour in the future
    watcher._check_all([str(path)])
    assert sink.files == []
    clock.now += 3.0
    watcher._check_all(watcher._pop_due())
    assert sink.paths() == {"skew.dcm"}


@pytest.mark.parametrize("polling", [False, True])
def test_run_picks_up_new_files_from_events(tmp_path: Path, polling: bool) -> None:
    source = make_source(tmp_path, quiet_period=0.3, polling=polling, rescan_interval=3600.0)
    sink = Sink()
    watcher = Watcher(source, "pacs", sink)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,))
    thread.start()
    try:
        time.sleep(0.3)
        (source.watch / "study").mkdir()
        (source.watch / "study" / "x.dcm").write_bytes(b"x" * 10)
        deadline = time.monotonic() + 15
        while not sink.files and time.monotonic() < deadline:
            time.sleep(0.1)
        assert watcher.observer_alive()
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    assert sink.paths() == {os.path.join("study", "x.dcm")}


def test_a_dead_observer_is_restarted(tmp_path: Path) -> None:
    source = make_source(tmp_path, quiet_period=0.1)
    watcher = Watcher(source, "pacs", Sink())
    watcher.start_observer()
    assert watcher._observer is not None
    watcher._observer.stop()
    watcher._observer.join(5)
    assert not watcher.observer_alive()
    watcher._ensure_observer()
    try:
        assert watcher.observer_alive()
    finally:
        watcher.stop_observer()


def test_the_rescan_finds_files_no_event_announced(tmp_path: Path) -> None:
    """The safety net for dropped inotify events: no observer at all, only rescans."""
    source = make_source(tmp_path, quiet_period=0.0, rescan_interval=0.3)
    sink = Sink()
    watcher = Watcher(source, "pacs", sink)
    stop = threading.Event()
    thread = threading.Thread(target=watcher._loop, args=(stop,))  # no observer started
    thread.start()
    try:
        time.sleep(0.2)
        write(source.watch / "quiet" / "x.dcm")
        deadline = time.monotonic() + 10
        while not sink.files and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(10)
    assert sink.paths() == {os.path.join("quiet", "x.dcm")}


def test_symlinked_files_are_found_and_symlinked_folders_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = make_source(tmp_path)
    target = write(tmp_path / "elsewhere" / "real.dcm", b"12345")
    (source.watch / "link.dcm").symlink_to(target)
    (source.watch / "folder").symlink_to(tmp_path / "elsewhere")
    (source.watch / "dangling.dcm").symlink_to(tmp_path / "nothing")
    sink = Sink()
    watcher = Watcher(source, "pacs", sink)
    watcher.scan()
    watcher.scan()
    assert sink.paths() == {"link.dcm"}
    assert sink.files[0].size == 5
    assert caplog.text.count("not following the symlinked folder") == 1


def test_the_event_handler_never_raises() -> None:
    seen: list[tuple[str, bool]] = []

    def broken_hint(path: str, folder: bool) -> None:
        seen.append((path, folder))
        raise RuntimeError("a bug in the hint")

    handler = _Handler(broken_hint)
    handler.on_any_event(FileCreatedEvent("/drop/a.dcm"))
    handler.on_any_event(FileMovedEvent("/elsewhere/b.tmp", "/drop/b.dcm"))
    handler.on_any_event(DirModifiedEvent("/drop"))  # folder changes are not hints
    assert seen == [("/drop/a.dcm", False), ("/drop/b.dcm", False)]


def test_sidecars_are_not_queued_and_hold_back_their_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = make_source(tmp_path, quiet_period=5.0, sidecars=Sidecars())
    clock, sink = Clock(time.time()), Sink()
    drop = source.watch
    write(drop / "a/img1.dcm")
    write(drop / "a/img1.json", age=1.0)  # its own sidecar is still being written
    write(drop / "b/img2.dcm")
    write(drop / "b/_metadata.yaml", age=1.0)  # its folder's sidecar too
    write(drop / "c/img3.dcm")
    write(drop / "c/img3.dcm.yaml")
    write(drop / "d/lonely.yaml")  # describes nothing
    watcher = Watcher(source, "pacs", sink, clock=clock)
    watcher.scan()
    assert sink.paths() == {"c/img3.dcm"}
    assert "sidecar" in caplog.text and "lonely.yaml" in caplog.text
    clock.now += 5
    watcher.scan()
    assert sink.paths() == {"a/img1.dcm", "b/img2.dcm", "c/img3.dcm"}
    assert caplog.text.count("lonely.yaml") == 1  # said once, not at every scan


def test_without_sidecars_json_files_are_ordinary_files(tmp_path: Path) -> None:
    source = make_source(tmp_path, quiet_period=0.0)
    sink = Sink()
    write(source.watch / "x.json")
    Watcher(source, "pacs", sink).scan()
    assert sink.paths() == {"x.json"}  # it will go to failed/ as "not a DICOM file"


def test_a_folder_sidecar_is_retired_once_its_folder_was_idle(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Sidecars(folder_linger=600.0)
    source = make_source(tmp_path, quiet_period=0.0, sidecars=settings)
    clock, sink = Clock(time.time()), Sink()
    used = write(source.watch / "used/_metadata.yaml")
    write(source.sent / "used/_metadata.yaml")  # it went with its files
    busy = write(source.watch / "busy/_metadata.yaml")
    write(source.sent / "busy/_metadata.yaml")
    write(source.watch / "busy/.img.dcm.XyZ12")  # rsync still writing the next file
    never = write(source.watch / "never/_metadata.yaml")  # its files have not come yet
    for folder in (used.parent, busy.parent, never.parent):
        os.utime(folder, (clock.now - 60, clock.now - 60))
    watcher = Watcher(source, "pacs", sink, clock=clock)
    watcher.scan()
    assert used.exists() and busy.exists() and never.exists()  # idle for 60 s only
    clock.now += 600
    watcher.scan()
    assert not used.exists()
    assert busy.exists(), "a file still being written under a hidden name needs it"
    assert never.exists() and "never/_metadata.yaml describes no file" in caplog.text


def test_a_session_between_two_scans_restarts_the_idle_time(tmp_path: Path) -> None:
    settings = Sidecars(folder_linger=600.0)
    source = make_source(tmp_path, quiet_period=0.0, sidecars=settings)
    clock = Clock(time.time())
    meta = write(source.watch / "room/_metadata.yaml", b"PatientID: B\n")
    write(source.sent / "room/_metadata.yaml", b"PatientID: B\n")
    watcher = Watcher(source, "pacs", Sink(), clock=clock)
    watcher.scan()  # first seen idle now
    clock.now += 500
    image = write(source.watch / "room/b1.dcm")  # B's first image comes and goes
    image.unlink()  # (sent between two scans)
    clock.now += 200
    watcher.scan()  # 700 s after the first look, but the folder changed meanwhile
    assert meta.exists()
    clock.now += 600
    watcher.scan()
    assert not meta.exists()


def test_a_very_long_file_name_does_not_stop_the_watcher(tmp_path: Path) -> None:
    source = make_source(tmp_path, quiet_period=0.0, sidecars=Sidecars())
    sink = Sink()
    name = "x" * 250 + ".dcm"  # <name>.json would be longer than a file name may be
    write(source.watch / name)
    write(source.watch / "ok.dcm")
    Watcher(source, "pacs", sink).scan()
    assert sink.paths() == {name, "ok.dcm"}


def test_scan_tells_on_error_of_what_it_cannot_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder that cannot be listed, and a file listed but not stat-able (a folder with
    mode r--), reach ``on_error``; a folder or file that vanished does not (patched, so
    that it works as root too)."""
    source = make_source(tmp_path)
    drop = source.watch
    for rel in ("ok.dcm", "locked/a.dcm", "gone/b.dcm", "nox/c.dcm", "nox/d.dcm"):
        write(drop / rel)
    real_scandir, real_stat = os.scandir, os.stat

    def scandir(path: str) -> object:
        if path == str(drop / "locked"):
            raise PermissionError(13, "Permission denied", path)
        if path == str(drop / "gone"):
            raise FileNotFoundError(2, "No such file or directory", path)
        return real_scandir(path)

    def stat(path: str, **kw: bool) -> os.stat_result:
        if os.path.dirname(path) == str(drop / "nox") and path.endswith("c.dcm"):
            raise PermissionError(13, "Permission denied", path)
        return real_stat(path, **kw)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "stat", stat)
    errors: list[tuple[str, str]] = []
    sink = Sink()
    watcher = Watcher(
        source, "pacs", sink, on_error=lambda p, e: errors.append((p, type(e).__name__))
    )
    watcher.scan()
    assert sink.paths() == {"ok.dcm", "nox/d.dcm"}
    assert sorted(errors) == [
        (str(drop / "locked"), "PermissionError"),
        (str(drop / "nox" / "c.dcm"), "PermissionError"),
    ]


@pytest.mark.parametrize("polling", [False, True])
@pytest.mark.parametrize("change", ["touch", "chmod"])
def test_a_file_only_touched_or_made_readable_is_seen_at_once(
    tmp_path: Path, polling: bool, change: str
) -> None:
    """inotify reports both as IN_ATTRIB, which watchdog 7 turns into FileAttribEvent (not a
    FileModifiedEvent): a file made readable by chmod, or touched, must not wait for a rescan."""
    source = make_source(tmp_path, quiet_period=0.1, polling=polling, rescan_interval=3600.0)
    path = write(source.watch / "x.dcm")
    if change == "chmod":
        path.chmod(0)
    watcher = Watcher(source, "pacs", Sink())
    seen: list[str] = []
    watcher.hint = lambda path, folder=False: seen.append(path)  # type: ignore[method-assign]
    watcher.start_observer()
    try:
        time.sleep(2.5 if polling else 0.3)  # the polling observer's first snapshot
        if change == "chmod":
            path.chmod(0o644)
        else:
            os.utime(path)
        deadline = time.monotonic() + 10
        while str(path) not in seen and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        watcher.stop_observer()
    assert str(path) in seen


def test_a_queue_that_cannot_be_written_is_said_and_rescanned_or_raised(tmp_path: Path) -> None:
    source = make_source(tmp_path)
    write(source.watch / "a.dcm")
    full = QueueFull("the queue q.db cannot be written: its disk is full")

    def failing(files: list[NewFile]) -> int:
        raise full

    told: list[QueueError] = []
    watcher = Watcher(source, "pacs", failing, on_queue_error=told.append)
    watcher.scan()  # the daemon's watcher: nothing lost, a rescan follows
    assert told == [full] and watcher._rescan_requested
    with pytest.raises(QueueFull):  # a one-shot scan (stowd migrate) must not miss files
        Watcher(source, "pacs", failing).scan()


def test_a_file_whose_name_starts_with_two_dots_is_sent(tmp_path: Path) -> None:
    """It was taken for a path outside the watch folder ('..' + '/...') and never queued,
    with nothing said, when the ignore list does not hide dot names."""
    source = make_source(tmp_path, ignore=())
    for rel in ("..x.dcm", "..study/a.dcm", "study/..b.dcm"):
        write(source.watch / rel)
    sink = Sink()
    Watcher(source, "pacs", sink).scan()
    assert sink.paths() == {
        "..x.dcm",
        os.path.join("..study", "a.dcm"),
        os.path.join("study", "..b.dcm"),
    }


def test_a_folder_moved_in_is_walked_once_not_checked_again_file_by_file(tmp_path: Path) -> None:
    """watchdog follows the event of a folder moved in with one made-up event per file it
    holds; stowd walks the folder anyway, and each file was checked and queued twice (issue 19:
    watcher CPU per file).  Each file is queued once; a file dropped later is still seen."""
    source = make_source(tmp_path, quiet_period=0.0, rescan_interval=3600.0)
    sink = Sink()
    watcher = Watcher(source, "pacs", sink)
    study = tmp_path / "outside" / "study"
    names = [os.path.join("study", "series", f"{i}.dcm") for i in range(40)]
    for rel in names:
        write(tmp_path / "outside" / rel)
    write(source.watch / "before.dcm")
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,))
    thread.start()
    try:
        wait_for(lambda: "before.dcm" in sink.paths(), 30, "the first scan")
        wait_for(watcher.observer_alive, 30, "the observer")
        study.rename(source.watch / "study")
        # moved in after the folder: its event comes after every event of the folder's
        os.rename(write(tmp_path / "outside" / "after.dcm"), source.watch / "after.dcm")
        wait_for(lambda: "after.dcm" in sink.paths(), 30, "after.dcm queued")
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    with sink.lock:
        queued = sorted(f.rel for f in sink.files if f.rel.startswith("study"))
    assert queued == sorted(names)


def test_a_file_gone_is_looked_at_only_while_its_quiet_period_is_watched(tmp_path: Path) -> None:
    """stowd's own move of each sent file is an event ('deleted'); it was checked like a new
    file (two stats).  Only a file whose unchanged look is being counted (an mtime in the
    future, a share) is looked at, so that what was seen of it is forgotten."""
    source = make_source(tmp_path, quiet_period=5.0)
    watcher = Watcher(source, "pacs", Sink())
    future = write(source.watch / "future.dcm", age=-3600.0)
    watcher.scan()
    watcher.gone(str(future))
    watcher.gone(str(source.watch / "sent.dcm"))
    hints, folders = watcher._take_hints()
    assert (hints, folders) == ([str(future)], [])
    future.unlink()
    watcher._check_all(hints)
    assert watcher._future == {}
