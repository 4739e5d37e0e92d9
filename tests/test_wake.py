"""Idle readers and senders are woken by new work, not found by their next poll (issue 19).

Each test makes the loops' poll an hour long (``loop.IDLE_WAIT``): what happens within the
tests' bounded waits then happens because a loop was woken, never because it looked again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dicomgen import make_instance
from harness import drop_source, wait_for
from orthanc import Orthanc, free_port
from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper

from stowd.config.model import Config, Destination, Receive, Source
from stowd.dicomweb.stow import StowClient
from stowd.pipeline import loop, watch
from stowd.pipeline.lookup import Finder
from stowd.pipeline.loop import Loop, Stop
from stowd.pipeline.queue import NewFile, Queue, SqliteQueue
from stowd.pipeline.reader import Reader
from stowd.pipeline.receive import Receiver
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


class Pipeline:
    """A queue, a reader and a sender of one source to Orthanc, their poll an hour long."""

    def __init__(self, tmp_path: Path, orthanc: Orthanc, receive: Receive | None = None) -> None:
        self.source = drop_source(tmp_path, receive=receive)
        self.source.watch.mkdir()
        dest = Destination("pacs", orthanc.dicomweb_url)
        config = Config(tmp_path / "c.yaml", tmp_path / "q.db", (self.source,), {"pacs": dest})
        self.queue = SqliteQueue(config.queue).open()
        self.stop = Stop()
        self.client = StowClient(dest, stop=self.stop)
        self.finder = Finder(config, self.queue)
        lock = threading.Lock()  # one reads new files at a time, as in the daemon
        worker = Worker(
            config, self.queue, dest, self.client, self.stop, classify_lock=lock, finder=self.finder
        )
        reader = Reader(
            config,
            self.queue,
            self.stop,
            name="pacs",
            max_step=60.0,
            classify_lock=lock,
            finder=self.finder,
        )
        self.threads = [_start("send", worker.run), _start("read", reader.run)]

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(WAIT)
        self.client.close()
        self.finder.close()
        self.queue.close()
        assert not [t.name for t in self.threads if t.is_alive()]  # at once, not in an hour


@pytest.fixture
def pipeline(tmp_path: Path, orthanc: Orthanc, hourly: None) -> Iterator[Pipeline]:
    made = Pipeline(tmp_path, orthanc)
    try:
        yield made
    finally:
        made.close()


def test_a_file_dropped_into_an_idle_daemon_is_sent_at_once(
    pipeline: Pipeline, orthanc: Orthanc
) -> None:
    """The watcher queues the file and wakes the reader and the sender (whichever reads it,
    the sender is woken to send it): it reaches the archive and sent/ with every loop idle."""
    source = pipeline.source
    wait_for(_idle(2), WAIT, "the reader and the sender waiting for work")
    watcher = Watcher(source, "pacs", pipeline.queue.enqueue)
    pipeline.threads.append(_start("watch", lambda: watcher.run(pipeline.stop)))
    wait_for(watcher.observer_alive, WAIT, "the watcher watching")
    uid = make_instance(source.watch / "new.dcm")
    wait_for((source.sent / "new.dcm").exists, WAIT, "the file in sent/")
    assert orthanc.sop_instance_uids() == {uid}
    wait_for(_idle(2), WAIT, "both waiting for work again")


def test_a_received_instance_queued_wakes_the_idle_reader_and_sender(
    tmp_path: Path, orthanc: Orthanc, hourly: None
) -> None:
    """The C-STORE receiver queues a file it received (``_queue``, once the file is in
    place) and wakes them, as the watcher does."""
    receive = Receive("STOWD", free_port(), "127.0.0.1")
    made = Pipeline(tmp_path, orthanc, receive)
    try:
        receiver = Receiver(made.source, made.queue, tmp_path / "incoming")
        wait_for(_idle(2), WAIT, "the reader and the sender waiting for work")
        uid = make_instance(made.source.watch / "1.2.3" / "received.dcm")
        receiver._queue(made.source.watch / "1.2.3" / "received.dcm")
        wait_for((made.source.sent / "1.2.3" / "received.dcm").exists, WAIT, "the file in sent/")
        assert orthanc.sop_instance_uids() == {uid}
    finally:
        made.close()


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
