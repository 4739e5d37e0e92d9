"""A sender sends what is ready before it reads new files (issue 19): the archive does not
wait while a sender reads headers, and a sender with nothing to send reads one batch.

A real Orthanc behind the STOW proxy (``stowproxy``), a real queue and real files.  The
sender shares its classify lock, as in the daemon where a reader thread reads beside it; the
sender's steps are taken by the test, so the order of events is the test's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicomgen import make_study
from harness import wait_for
from orthanc import Orthanc
from stowproxy import StowProxy

from stowd.config.model import BatchLimits, Config, Destination, Source
from stowd.dicomweb.stow import StowClient
from stowd.pipeline import settle
from stowd.pipeline.queue import SqliteQueue
from stowd.pipeline.watch import Watcher
from stowd.pipeline.worker import Worker

WAIT = 60.0  # generous bound of the waits below: never reached unless something is wrong
BATCH = 10


class Sender:
    """One source, a queue and one sender (no reader thread) to Orthanc through the proxy."""

    def __init__(self, tmp_path: Path, orthanc: Orthanc) -> None:
        self.source = Source(
            "ct", tmp_path / "drop", tmp_path / "sent", tmp_path / "failed", "pacs", 0.0
        )
        self.source.watch.mkdir()
        self.proxy = StowProxy(orthanc.dicomweb_url)
        dest = Destination("pacs", self.proxy.base, BatchLimits(max_files=BATCH))
        config = Config(tmp_path / "c.yaml", tmp_path / "q.db", (self.source,), {"pacs": dest})
        self.queue = SqliteQueue(config.queue).open()
        self.stop = threading.Event()
        self.client = StowClient(dest, stop=self.stop)
        lock = threading.Lock()  # shared with a reader thread in the daemon (none here)
        self.worker = Worker(config, self.queue, dest, self.client, self.stop, classify_lock=lock)

    def drop(self, study: str, files: int) -> None:
        make_study(self.source.watch / study, files)
        Watcher(self.source, "pacs", self.queue.enqueue, clock=lambda: time.time() + 60).scan()

    def unread(self) -> int:
        """Queued files whose headers were not read yet."""
        return len(self.queue.unclassified(1000))

    def close(self) -> None:
        self.stop.set()
        self.client.close()
        self.queue.close()
        self.proxy.stop()


@pytest.fixture
def sender(tmp_path: Path, orthanc: Orthanc) -> Iterator[Sender]:
    made = Sender(tmp_path, orthanc)
    try:
        yield made
    finally:
        made.close()


def test_a_sender_sends_the_files_read_before_it_reads_new_ones(sender: Sender) -> None:
    """One batch is read, then ten new files are queued: the sender's next step sends the
    batch while the new files are still unread (it does not read them first)."""
    sender.drop("a", BATCH)
    assert sender.worker.classify_some() == BATCH
    sender.drop("b", BATCH)
    arrived, go = threading.Event(), threading.Event()
    unread_at_upload: list[int] = []

    def first_request(number: int) -> bool:
        if number == 1:
            unread_at_upload.append(sender.unread())
            arrived.set()
            go.wait(WAIT)  # the step is still inside its upload
        return True

    sender.proxy.on_arrival = first_request
    step = threading.Thread(target=sender.worker.step, daemon=True)
    step.start()
    try:
        assert arrived.wait(WAIT), "the ready batch was not sent"
    finally:
        go.set()
        step.join(WAIT)
    assert not step.is_alive()
    assert unread_at_upload == [BATCH]  # the new files are read after the upload, not before
    assert sender.unread() == BATCH
    for _ in range(10):  # then it reads them and sends them too
        if not sender.worker.step():
            break
    assert sender.queue.counts() == {"sent": 2 * BATCH}


def test_a_sender_with_nothing_to_send_reads_one_batch_then_sends_it(sender: Sender) -> None:
    """With nothing ready to send, a sender reads new files: one batch of them, not a
    reader's chunk, and sends it at its next step (the reader thread reads the rest)."""
    sender.drop("a", 3 * BATCH)
    assert sender.worker.step()
    assert sender.unread() == 2 * BATCH and sender.proxy.arrivals == 0  # read one, sent none
    assert sender.worker.step()
    assert sender.proxy.arrivals == 1 and sender.unread() == 2 * BATCH  # sent it, read none


def test_a_sender_reads_new_files_while_its_last_batch_is_moved(sender: Sender) -> None:
    """Having nothing to send while its last batch is settled behind (its moves wait here,
    ``MOVING`` held), the sender reads the next batch and sends it: the read does not wait
    for the moves."""
    sender.drop("a", 2 * BATCH)
    run = threading.Thread(target=sender.worker.run, daemon=True)
    try:
        with settle.MOVING:
            run.start()
            wait_for(lambda: sender.proxy.arrivals == 2, WAIT, "the second batch sent")
            assert "sent" not in sender.queue.counts()  # the first batch is not moved yet
        wait_for(lambda: sender.queue.counts() == {"sent": 2 * BATCH}, WAIT, "all settled")
    finally:
        sender.stop.set()
        run.join(WAIT)
    assert not run.is_alive()
