"""Pure batching: which queued files travel together in one STOW request.

The queue hands over the candidate rows of one destination and one study (oldest first);
``take_batch`` keeps those of the first row's type (DICOM files, or one bulkdata type such as
PDF: the metadata + bulkdata form carries one bulk type per request) and cuts them to the
destination's limits.  No I/O here.
"""

from __future__ import annotations

from collections.abc import Sequence

from stowd.config import BatchLimits
from stowd.queue import Job

DECODED = ("png", "gif")  # sent as decoded pixels, many times their file size: one per request


def take_batch(jobs: Sequence[Job], limits: BatchLimits) -> list[Job]:
    """The first jobs of the first job's kind within the file and byte limits (at least one)."""
    batch: list[Job] = []
    total = 0
    kind = jobs[0].kind if jobs else None
    if kind in DECODED:
        return list(jobs[:1])  # the byte limit counts file sizes, not decoded sizes
    for job in (j for j in jobs if j.kind == kind):
        if batch and (len(batch) >= limits.max_files or total + job.size > limits.max_bytes):
            break
        batch.append(job)
        total += job.size
    return batch
