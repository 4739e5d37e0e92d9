"""Queueing in bulk (issue 19): a list of files is queued with a few statements per part of
``ENQUEUE_PART`` files, and each file is decided exactly as when it is queued on its own."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from harness import Clock
from postgres import queue_backend  # noqa: F401 - its queue tests run on both backends

from stowd.pipeline.queue import ENQUEUE_PART, Classification, NewFile, Queue, SqliteQueue

RAW = os.fsdecode(b"\xff\xfe-raw.dcm")  # a name that is not UTF-8: stored as its bytes


def new(path: Path | str, size: int = 10, mtime: int = 1) -> NewFile:
    return NewFile("src", "pacs", str(path), Path(path).name, size, mtime)


def history(queue: Queue, drop: Path) -> list[NewFile]:
    """A queue with a row of each kind a new list can meet, and that list: files already
    queued with the same or other content (pending, claimed), finished ones whose file is
    gone or there again, an ignored one, and many new ones (non-UTF-8 names among them)."""
    drop.mkdir(exist_ok=True)
    (drop / "there-again").write_bytes(b"x")
    queue.enqueue(
        [new(drop / n) for n in ("same", "changed", "claimed", "gone", "there-again", "ign")]
    )
    jobs = {Path(j.path).name: j for j in queue.jobs()}
    queue.set_classified(
        [Classification(j, "dicom", "1.2", f"sop{j.id}", "1.2") for j in jobs.values()]
    )
    queue.finish_many(
        [(jobs["gone"].id, "sent"), (jobs["there-again"].id, "failed")], was="pending"
    )
    queue.finish_many([(jobs["ign"].id, "ignored")], was="pending")
    claimed = queue.claim_batch(
        ["pacs"],
        pick=lambda _d, js: [j for j in js if j.id == jobs["claimed"].id],
        candidates=100,
        lease=60,
    )
    assert [j.id for j in claimed] == [jobs["claimed"].id]
    many = [new(drop / f"new{i}.dcm") for i in range(2 * ENQUEUE_PART + 7)]
    return [
        new(drop / "same"),
        new(drop / "changed", size=20),
        new(drop / "claimed", size=30),
        new(drop / "gone"),
        new(drop / "there-again"),
        new(drop / "ign"),
        new(drop / RAW),
        *many,
        new(drop / f"late-{RAW}"),
    ]


def rows(queue: Queue) -> list[tuple[object, ...]]:
    return [(j.id, j.path, j.size, j.mtime_ns, j.kind, j.sidecars) for j in queue.jobs()]


def both_ways(
    tmp_path: Path, clock: Clock, files_of: Callable[[Queue, Path], list[NewFile]]
) -> tuple[Queue, Queue, int, int]:
    """The same history in two queues; then the same list queued in one call, and file by
    file; returns both queues and what each way reported as new."""
    bulk = SqliteQueue(tmp_path / "bulk.db", clock=clock).open()
    one = SqliteQueue(tmp_path / "one.db", clock=clock).open()
    files = files_of(bulk, tmp_path / "drop")
    assert files_of(one, tmp_path / "drop") == files
    added_bulk = bulk.enqueue(files)
    added_one = sum(one.enqueue([f]) for f in files)
    return bulk, one, added_bulk, added_one


def test_a_list_queued_at_once_is_decided_as_file_by_file(tmp_path: Path, clock: Clock) -> None:
    bulk, one, added_bulk, added_one = both_ways(tmp_path, clock, history)
    try:
        new_files = 2 * ENQUEUE_PART + 7 + 3  # the many, two raw names, the one there again
        assert added_bulk == added_one == new_files
        assert rows(bulk) == rows(one)
        assert set(bulk._after) == set(one._after) == {3}  # the claimed row, changed
        assert bulk.tally(clock()) == one.tally(clock())
        paths = {j.path for j in bulk.jobs("pending")}
        assert str(tmp_path / "drop" / RAW) in paths  # the non-UTF-8 name, exactly
        assert bulk.enqueue(history_list(tmp_path)) == 0  # all known now
    finally:
        bulk.close()
        one.close()


def history_list(tmp_path: Path) -> list[NewFile]:
    drop = tmp_path / "drop"
    return [new(drop / "same"), new(drop / RAW), new(drop / f"new{ENQUEUE_PART}.dcm")]


def test_a_list_naming_a_path_twice_ends_with_its_last_content(
    tmp_path: Path, clock: Clock
) -> None:
    def twice(queue: Queue, drop: Path) -> list[NewFile]:
        queue.enqueue([new(drop / "a", size=1)])
        return [new(drop / "a", size=2), new(drop / "b"), new(drop / "a", size=3), new(drop / "b")]

    bulk, one, added_bulk, added_one = both_ways(tmp_path, clock, twice)
    try:
        assert added_bulk == added_one == 1
        assert rows(bulk) == rows(one)
        assert [(Path(j.path).name, j.size) for j in bulk.jobs()] == [("a", 3), ("b", 10)]
    finally:
        bulk.close()
        one.close()


def test_a_file_changed_while_sent_is_queued_when_its_row_is_done(
    queue: Queue, tmp_path: Path
) -> None:
    """``finish_many`` queues the files held back in ``_after`` through the same bulk path."""
    paths = [tmp_path / f"f{i}" for i in range(3)]
    queue.enqueue([new(p) for p in paths])
    jobs = queue.jobs()
    queue.set_classified([Classification(j, "dicom", "1.2", f"s{j.id}", "1.2") for j in jobs])
    claimed = queue.claim_batch(["pacs"], pick=lambda _d, js: js, candidates=10, lease=60)
    assert len(claimed) == 3
    assert queue.enqueue([new(p, size=99) for p in paths]) == 0  # busy: held back
    queue.begin_settle([(j, "sent", f"/sent/{j.rel}", None) for j in claimed])
    queue.finish_many([(j.id, "sent") for j in claimed])
    assert [(j.path, j.size) for j in queue.jobs("pending")] == [(str(p), 99) for p in paths]
    assert queue._after == {}
