"""The watcher's shortcuts (issue 19) never cost a file its quiet period or its last version.

An event for a file waiting for its recheck, or in a folder walked in the same round, is not
checked on its own: the recheck (or the walk, which came after the event) looks at the file
as it is then.  These tests change a waiting file the way writers do (appended, replaced by
a rename, its mtime set back as ``cp -p`` does) right after a walk listed it, and hold the
watcher's clock by hand, so that each step is seen at a known instant: no timing margin.
The files are real, the events are watchdog's; rescans are off (an hour), so only the
events and the rechecks can find what changed.  Each folder's verdict (ignored or not) is
kept too: a reload that changes the ``ignore`` patterns must not keep the old verdicts.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from dicomgen import make_study
from harness import Clock, Stowd, make_layout, wait_for
from orthanc import Orthanc
from test_watch import Sink

from stowd.config.model import DEFAULT_IGNORE, Source
from stowd.pipeline.watch import Watcher

QUIET = 5.0
WAIT = 60.0  # bound of every wait (a busy machine is slow, never stuck)


class Running:
    """A watcher on ``tmp_path/drop`` with a clock held well behind the real one: a file
    caught mid-write by the real clock has an mtime in the future and is only watched."""

    def __init__(self, tmp_path: Path) -> None:
        watch = tmp_path / "drop"
        watch.mkdir()
        self.outside = tmp_path / "outside"
        self.outside.mkdir()
        self.source = Source(
            "ct",
            watch,
            watch / "sent",
            watch / "failed",
            "pacs",
            quiet_period=QUIET,
            rescan_interval=3600.0,
        )
        self.start = time.time() - 1000.0
        self.clock = Clock(self.start)
        self.sink = Sink()
        self.watcher = Watcher(self.source, "pacs", self.sink, clock=self.clock)

    def file(self, rel: str, size: int, mtime: float) -> Path:
        """A file outside the drop folder, with the mtime ``start + mtime``."""
        path = self.outside / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
        os.utime(path, (self.start + mtime, self.start + mtime))
        return path

    def due_after(self, path: Path, after: float) -> bool:
        """Is ``path`` waiting for a recheck later than ``start + after``?"""
        return any(p == str(path) and d > self.start + after for d, p in self.watcher._due)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    run = Running(tmp_path)
    stop = threading.Event()
    thread = threading.Thread(target=run.watcher.run, args=(stop,))
    thread.start()
    try:
        wait_for(run.watcher.observer_alive, WAIT, "the observer")
        yield run
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()


def _moved_in(run: Running) -> Path:
    """study/a.dcm (10 bytes, written 1 s before the clock's now) moved in with its folder;
    returned once the walk of the folder scheduled its recheck (due at start + 4)."""
    run.file("study/a.dcm", 10, -1.0)
    os.rename(run.outside / "study", run.source.watch / "study")
    a = run.source.watch / "study" / "a.dcm"
    wait_for(lambda: str(a) in run.watcher._scheduled, WAIT, "the walk of study/ saw a.dcm")
    return a


def _queued_last(run: Running, a: Path, mtime: float, size: int) -> None:
    """The file last written at ``start + mtime`` is not queued at its first recheck (its
    quiet period restarted when it changed), and is queued with ``size`` bytes after it."""
    run.clock.now = run.start + mtime + QUIET - 0.5
    wait_for(lambda: run.due_after(a, mtime + QUIET - 0.5), WAIT, "the recheck of a.dcm")
    assert run.sink.sizes("study/a.dcm") == []
    run.clock.now = run.start + mtime + QUIET + 0.5
    wait_for(lambda: run.sink.sizes("study/a.dcm") != [], WAIT, "a.dcm queued")
    assert run.sink.sizes("study/a.dcm") == [size]


def test_a_file_appended_after_its_folder_was_walked_waits_for_its_last_write(
    running: Running,
) -> None:
    """The append's events come while the file waits for its recheck (not checked then)."""
    a = _moved_in(running)
    with a.open("ab") as fp:
        fp.write(b"y" * 90)
    os.utime(a, (running.start + 3.0, running.start + 3.0))  # the append, at start + 3
    _queued_last(running, a, 3.0, 100)


def test_a_waiting_file_replaced_by_a_rename_is_sent_as_replaced(running: Running) -> None:
    """mv over a file waiting for its recheck: the new file's quiet period counts."""
    a = _moved_in(running)
    os.rename(running.file("new.dcm", 77, 3.0), a)
    _queued_last(running, a, 3.0, 77)


def test_a_waiting_file_given_an_old_mtime_is_sent_with_its_last_content(
    running: Running,
) -> None:
    """cp -p over a file waiting for its recheck: complete by its mtime, queued at the
    recheck at the latest, with the content it has then (never the first, shorter one)."""
    a = _moved_in(running)
    with a.open("ab") as fp:
        fp.write(b"y" * 45)
    os.utime(a, (running.start - 3600.0, running.start - 3600.0))
    running.clock.now = running.start + 4.5  # the first recheck (due at start + 4)
    wait_for(lambda: running.sink.sizes("study/a.dcm") != [], WAIT, "a.dcm queued")
    assert set(running.sink.sizes("study/a.dcm")) == {55}


def test_a_folder_ignored_before_a_reload_is_sent_once_the_reload_drops_its_pattern(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    """The real daemon: hold-1/ matches 'hold*' and is not sent (a file written into it
    after the start is judged by its folder's kept verdict); SIGHUP with a config without
    that pattern, and hold-1/ is sent: the verdicts belong to one config."""
    ignore = [*DEFAULT_IGNORE, "hold*"]
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url, source={"ignore": ignore})
    held = {os.path.join("hold-1", p.name) for p, _uid in make_study(layout.drop / "hold-1", 2)}
    first = {os.path.join("first", p.name) for p, _uid in make_study(layout.drop / "first", 1)}
    with Stowd(layout) as daemon:
        daemon.wait_started()

        def sent() -> set[str]:
            return layout.files(layout.sent)

        wait_for(lambda: first <= sent(), WAIT, "first/ sent", lambda: daemon.log)
        late = make_study(layout.drop / "hold-1", 1, prefix="LATE", patient_id="P2")
        held.add(os.path.join("hold-1", late[0][0].name))
        assert not sent() & held  # ignored files are never sent, whenever this looks
        doc = yaml.safe_load(layout.config.read_text())
        doc["sources"][0]["ignore"] = list(DEFAULT_IGNORE)
        layout.config.write_text(yaml.safe_dump(doc, sort_keys=False))
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: held <= sent(), WAIT, "hold-1/ sent after the reload", lambda: daemon.log)
        assert daemon.terminate() == 0
