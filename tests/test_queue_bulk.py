"""Queueing in bulk (issue 19): a list of files is queued with a few statements per part of
``ENQUEUE_PART`` files, and each file is decided exactly as when it is queued on its own."""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

from harness import Clock
from postgres import queue_backend  # noqa: F401 - its queue tests run on both backends

from stowd.pipeline.queue import (
    ALREADY_STORED,
    ENQUEUE_PART,
    Classification,
    NewFile,
    Queue,
    SqliteQueue,
)

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


def test_settling_and_classifying_many_rows_at_once_changes_each_as_its_own(
    sqlite_queue: SqliteQueue, tmp_path: Path, clock: Clock
) -> None:
    """``set_classified`` and ``begin_settle`` change many rows with one statement a part
    (their values joined as a table): each row ends with its own values, over several
    parts, with names that are not UTF-8, except rows whose content changed since they were
    read (not classified) and rows lost meanwhile (not settled); the counts agree."""
    queue, count = sqlite_queue, 400  # several parts of either statement
    queue.enqueue([new(tmp_path / f"f{i}-{RAW}", mtime=i) for i in range(count)])
    jobs = queue.jobs()
    # read before the file changed (its size, or only its mtime): not classified
    stale = {j.id: dataclasses.replace(j, size=99) for j in jobs[::7]}
    stale.update({j.id: dataclasses.replace(j, mtime_ns=-1) for j in jobs[3::7]})
    queue.set_classified(
        [
            Classification(
                stale.get(j.id, j),
                "dicom",
                f"1.2.{j.id % 2}",
                f"sop{j.id}-{RAW}",
                "1.2",
                sidecars=((f"{j.path}.txt", f"text {j.id} {RAW}"),),
            )
            for j in jobs
        ]
    )
    after = {j.id: j for j in queue.jobs()}
    for i, j in after.items():
        read = i not in stale
        assert (j.kind, j.sop_uid) == (("dicom", f"sop{i}-{RAW}") if read else (None, None))
        assert j.study_uid == (f"1.2.{i % 2}" if read else None)
        assert (j.sidecars is not None and f"text {i} " in j.sidecars) == read
    claimed = queue.claim_batch(["pacs"], pick=lambda _d, js: js, candidates=count, lease=60)
    claimed += queue.claim_batch(["pacs"], pick=lambda _d, js: js, candidates=count, lease=60)
    assert len(claimed) == count - len(stale)
    queue.release([j.id for j in claimed[::5]])  # lost: not this node's claims any more
    plans = [
        (
            j,
            "sent" if j.id % 3 else "failed",
            f"/sent/{j.id}-{RAW}",
            {"e": j.id} if j.id % 2 else None,
        )
        for j in claimed
    ]
    notes = {j.id: ALREADY_STORED for j in claimed[::4]}
    lost = queue.begin_settle(plans, notes=notes)
    assert set(lost) == {j.id for j in claimed[::5]}
    rows = {j.id: j for j in queue.jobs()}
    for j, outcome, target, error in plans:
        row = rows[j.id]
        if j.id in lost:
            assert (row.state, row.outcome, row.target) == ("pending", None, None)
            continue
        assert (row.state, row.outcome, row.target) == ("settling", outcome, target)
        assert row.error == (None if error is None else json.dumps(error))
    assert queue.counts()["settling"] == len(claimed) - len(lost)
    with sqlite3.connect(queue.path) as db:
        noted = {r[0] for r in db.execute("SELECT id FROM files WHERE note IS NOT NULL")}
        node = {r[0] for r in db.execute("SELECT node FROM files WHERE state = 'settling'")}
    assert noted == set(notes) - set(lost)
    assert node == {queue.node}
    settling = [t for t in queue.tally(clock()) if t.state == "settling"]
    assert sum(t.files for t in settling) == len(claimed) - len(lost)
    assert sum(t.already for t in settling) == len(noted)
    assert sum(t.stored for t in settling) == sum(
        o == "sent" for j, o, _, _ in plans if j.id not in lost
    )


def test_a_settle_naming_a_row_twice_records_it_as_row_by_row(sqlite_queue: SqliteQueue) -> None:
    """SQLite: the first of the two records the move; the second finds the row settling,
    not claimed, and leaves it as the first left it (and the counts agree)."""
    queue = sqlite_queue
    queue.enqueue([new("/drop/a")])
    (job,) = queue.jobs()
    queue.set_classified([Classification(job, "dicom", "1.2", "sop", "1.2")])
    (claimed,) = queue.claim_batch(["pacs"], pick=lambda _d, js: js, candidates=10, lease=60)
    lost = queue.begin_settle(
        [(claimed, "sent", "/sent/a", None), (claimed, "failed", "/failed/a", {"e": 1})]
    )
    assert lost == {}
    (row,) = queue.jobs()
    assert (row.state, row.outcome, row.target, row.error) == ("settling", "sent", "/sent/a", None)
    assert queue.counts()["settling"] == 1
