"""The reader of new files, on its own: a real queue and real files, no archive and no client."""

from __future__ import annotations

import threading
from pathlib import Path

from dicomgen import make_instance, make_study
from harness import Clock, drop_source

from stowd.config.model import BatchLimits, Config, Destination, Source
from stowd.pipeline.queue import Queue, SqliteQueue
from stowd.pipeline.reader import Reader
from stowd.pipeline.watch import Watcher


def reading_setup(tmp_path: Path) -> tuple[Clock, Source, Config, Queue]:
    """A drop folder "ct" to "pacs" (batches of 10) and its open queue, on a fixed clock."""
    clock = Clock(2_000_000_000.0)
    source = drop_source(tmp_path)
    source.watch.mkdir()
    dest = Destination("pacs", "http://archive.test/dicom-web", BatchLimits(max_files=10))
    config = Config(tmp_path / "c.yaml", tmp_path / "q.db", (source,), {"pacs": dest})
    return clock, source, config, SqliteQueue(config.queue, clock=clock).open()


def test_the_reader_reads_new_files_and_fails_bad_ones_without_a_destination_client(
    tmp_path: Path,
) -> None:
    clock, source, config, queue = reading_setup(tmp_path)
    try:
        good = make_instance(source.watch / "good.dcm")
        (source.watch / "bad.dcm").write_bytes(b"DICM? no: a file of no known type")
        Watcher(source, "pacs", queue.enqueue, clock=lambda: clock.now + 60).scan()
        reader = Reader(config, queue, threading.Event(), name="pacs", max_step=60.0, clock=clock)
        assert reader.step() and not reader.step()  # both read; then nothing is left
        [job] = [j for j in queue.jobs() if j.path.endswith("good.dcm")]
        assert job.kind == "dicom"
        assert job.sop_uid == good  # make_instance returns its SOPInstanceUID
        assert queue.counts() == {"pending": 1, "failed": 1}
        assert (source.failed / "bad.dcm").exists()
    finally:
        queue.close()


def test_the_first_files_read_are_one_batch_and_each_next_chunk_twice_as_many(
    tmp_path: Path,
) -> None:
    """The first upload waits for one batch to be read, not for a chunk of ``CLASSIFY_CHUNK``
    (issue 19): the reader reads one batch, then twice as many each time up to the chunk;
    once it caught up, the next new files start with one batch again."""
    clock, source, config, queue = reading_setup(tmp_path)
    watcher = Watcher(source, "pacs", queue.enqueue, clock=lambda: clock.now + 60)
    reader = Reader(config, queue, threading.Event(), name="pacs", max_step=60.0, clock=clock)
    try:
        make_study(source.watch / "a", 75)
        watcher.scan()
        assert [reader.classify_some() for _ in range(5)] == [10, 20, 40, 5, 0]
        make_study(source.watch / "b", 15)
        watcher.scan()
        assert [reader.classify_some() for _ in range(3)] == [10, 5, 0]
        assert queue.counts() == {"pending": 90}
    finally:
        queue.close()
