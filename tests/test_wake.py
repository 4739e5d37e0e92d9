"""Idle readers and senders are woken by new work, not found by their next poll (issue 19).

Each test makes the loops' poll an hour long (``loop.IDLE_WAIT``): what happens within the
tests' bounded waits then happens because a loop was woken, never because it looked again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from dicomgen import make_instance
from harness import wait_for
from orthanc import Orthanc
from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper

from stowd.config.model import Config, Destination, Source
from stowd.dicomweb.stow import StowClient
from stowd.pipeline import loop, watch
from stowd.pipeline.lookup import Finder
from stowd.pipeline.loop import Loop, Stop
from stowd.pipeline.queue import NewFile, Queue
from stowd.pipeline.reader import Reader
from stowd.pipeline.watch import Watcher
from stowd.pipeline.worker import Worker

HOUR = 3600.0
WAIT = 60.0  # generous bounds of the waits below: never reached unless something is wrong


@pytest.fixture
def hourly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loops that find nothing to do look again only after an hour, unless woken."""
    monkeypatch.setattr(loop, "IDLE_WAIT", HOUR)


def _start(name: str, target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


def _idle(loops: int) -> Callable[[], bool]:
    return lambda: loop.BELL.waiting == loops


def test_a_file_dropped_into_an_idle_daemon_is_sent_at_once(
    tmp_path: Path, orthanc: Orthanc, hourly: None
) -> None:
    """The watcher queues the file and wakes the reader and the sender (whichever reads it,
    the sender is woken to send it): it reaches the archive and sent/ with every loop idle."""
    source = Source(
        "ct", tmp_path / "drop", tmp_path / "sent", tmp_path / "failed", "pacs", quiet_period=0.0
    )
    source.watch.mkdir()
    dest = Destination("pacs", orthanc.dicomweb_url)
    config = Config(tmp_path / "c.yaml", tmp_path / "q.db", (source,), {"pacs": dest})
    queue = Queue(config.queue).open()
    stop = Stop()
    client = StowClient(dest, stop=stop)
    finder = Finder(config, queue)
    lock = threading.Lock()  # one reads new files at a time, as in the daemon
    worker = Worker(config, queue, dest, client, stop, classify_lock=lock, finder=finder)
    reader = Reader(
        config, queue, stop, name="pacs", max_step=60.0, classify_lock=lock, finder=finder
    )
    watcher = Watcher(source, "pacs", queue.enqueue)
    threads = [_start("send", worker.run), _start("read", reader.run)]
    try:
        wait_for(_idle(2), WAIT, "the reader and the sender waiting for work")
        threads.append(_start("watch", lambda: watcher.run(stop)))
        wait_for(watcher.observer_alive, WAIT, "the watcher watching")
        uid = make_instance(source.watch / "new.dcm")
        wait_for((source.sent / "new.dcm").exists, WAIT, "the file in sent/")
        assert orthanc.sop_instance_uids() == {uid}
        wait_for(_idle(2), WAIT, "both waiting for work again")
    finally:
        stop.set()
        for thread in threads:
            thread.join(WAIT)
        client.close()
        finder.close()
        queue.close()
    assert not [t.name for t in threads if t.is_alive()]  # stopped at once, not in an hour


def test_a_loop_that_did_work_wakes_the_others(queue: Queue, hourly: None) -> None:
    """Files read by one loop are work for the others (to send): its busy step wakes them."""
    stop = Stop()
    looks: list[str] = []
    done = iter([True])  # the second loop's first step does work; then nothing is left

    def waits() -> bool:
        looks.append("looked")
        return False

    first = _start("first", lambda: Loop("first", queue, stop).run(waits, lambda: None))
    try:
        wait_for(_idle(1), WAIT, "the first loop waiting for work")
        assert looks == ["looked"]
        second = Loop("second", queue, stop)
        worker = _start("second", lambda: second.run(lambda: next(done, False), lambda: None))
        wait_for(lambda: len(looks) == 2, WAIT, "the first loop woken by the second's work")
        wait_for(_idle(2), WAIT, "both waiting for work again")
    finally:
        stop.set()
        first.join(WAIT)
        worker.join(WAIT)
    assert not first.is_alive() and not worker.is_alive()


def test_stop_ends_a_loop_waiting_for_work_at_once(queue: Queue, hourly: None) -> None:
    stop = Stop()
    thread = _start("idle", lambda: Loop("idle", queue, stop).run(lambda: False, lambda: None))
    wait_for(_idle(1), WAIT, "the loop waiting for work")
    stop.set()
    thread.join(WAIT)
    assert not thread.is_alive()


def test_a_rename_holds_no_later_event_back_for_long(tmp_path: Path) -> None:
    """watchdog holds an inotify "moved from" back to pair it with its "moved to", and the
    events behind it wait as long: half a second, after every file stowd moved to sent/.
    The watcher shortens that hold before it watches; a rename is still seen."""
    source = Source(
        "ct", tmp_path / "drop", tmp_path / "sent", tmp_path / "failed", "pacs", quiet_period=0.0
    )
    found: list[str] = []

    def sink(files: list[NewFile]) -> int:
        found.extend(f.rel for f in files)
        return 0

    watcher = Watcher(source, "pacs", sink)
    stop = Stop()
    thread = _start("watch", lambda: watcher.run(stop))
    try:
        wait_for(watcher.observer_alive, WAIT, "the watcher watching")
        assert InotifyMoveEventGrouper.delay <= watch.MOVE_PAIRING <= 0.05
        (source.watch / "a.part").write_bytes(b"x")  # a temporary name: ignored
        (source.watch / "a.part").rename(source.watch / "a.dcm")
        wait_for(lambda: "a.dcm" in found, WAIT, "the renamed file found")
    finally:
        stop.set()
        thread.join(WAIT)
    assert not thread.is_alive()
