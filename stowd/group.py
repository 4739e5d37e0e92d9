"""Pure batching: which queued files travel together in one STOW request.

The queue hands over the candidate rows of one destination and one study (oldest first);
``take_batch`` cuts them to the destination's limits.  No I/O here.
"""

from __future__ import annotations

from collections.abc import Sequence

from stowd.config import BatchLimits
from stowd.queue import Job


def take_batch(jobs: Sequence[Job], limits: BatchLimits) -> list[Job]:
    """The longest prefix of ``jobs`` within the file and byte limits (at least one file)."""
    batch: list[Job] = []
    total = 0
    for job in jobs:
        if batch and (len(batch) >= limits.max_files or total + job.size > limits.max_bytes):
            break
        batch.append(job)
        total += job.size
    return batch
