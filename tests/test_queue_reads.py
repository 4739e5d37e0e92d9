"""The reads of ``stowd status`` and ``stowd retry`` (``Queue.reading``) turn sqlite3's errors
into stowd's ``QueueUnreadable`` in the queue, their one seam, so no caller catches sqlite3."""

from __future__ import annotations

from pathlib import Path

import pytest
from postgres import queue_backend  # noqa: F401 - its queue tests run on both backends

from stowd.errors import QueueError, QueueUnreadable
from stowd.pipeline.queue import open_readonly


def test_a_read_of_a_file_that_is_not_a_queue_is_queue_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    path.write_bytes(b"this is not an SQLite database" * 100)
    queue = open_readonly(path)
    try:
        with pytest.raises(QueueUnreadable) as caught, queue.reading():
            queue.jobs("failed")
    finally:
        queue.close()
    assert str(caught.value).startswith(f"cannot read the queue {path}: file is not a database")
    assert isinstance(caught.value, QueueError)  # what the daemon's callers catch
