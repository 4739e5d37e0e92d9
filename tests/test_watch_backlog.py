"""A long backlog in the watch folder (issue 19: a million files waiting when stowd starts):
the scan hands files to the queue in chunks while it walks, and never lists the whole
folder tree first, so its memory does not grow with the number of files."""

from __future__ import annotations

import os
import time
from pathlib import Path

from stowd.config.model import Source
from stowd.pipeline import watch
from stowd.pipeline.queue import NewFile
from stowd.pipeline.watch import Watcher


def old_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"data")
    past = time.time() - 60
    os.utime(path, (past, past))


def test_the_scan_queues_while_it_walks(tmp_path: Path) -> None:
    """The first chunk reaches the queue before the scan has listed the other folder: a file
    dropped there then is found by this same scan (a scan that listed every path first would
    have missed it)."""
    drop = tmp_path / "drop"
    for folder in ("a", "b"):
        for n in range(watch.ENQUEUE_CHUNK + 100):
            old_file(drop / folder / f"{n:04d}.dcm")
    source = Source("ct", drop, tmp_path / "sent", tmp_path / "failed", "pacs")
    chunks: list[list[str]] = []

    def sink(files: list[NewFile]) -> int:
        if not chunks:  # the first chunk: all of one folder; drop a file into the other
            first = Path(files[0].path).parent.name
            assert {Path(f.path).parent.name for f in files} == {first}
            old_file(drop / ("b" if first == "a" else "a") / "late.dcm")
        chunks.append([f.rel for f in files])
        return len(files)

    Watcher(source, "pacs", sink).scan()
    queued = [rel for chunk in chunks for rel in chunk]
    assert len(chunks) >= 3 and max(len(c) for c in chunks) <= watch.ENQUEUE_CHUNK
    assert len(queued) == 2 * (watch.ENQUEUE_CHUNK + 100) + 1
    assert any(rel.endswith("late.dcm") for rel in queued)
