"""Pure batching: which queued files travel together in one STOW request.

The queue hands over the candidate rows of one destination and one study (oldest first);
``take_batch`` keeps those of the first row's type (DICOM files, or one bulkdata type such as
PDF: the metadata + bulkdata form carries one bulk type per request) and cuts them to the
destination's limits.  A request never carries two files with the same SOPInstanceUID (a
re-export, a corrected image, one object in two transfer syntaxes): the answer names the UID
once, so it could not say which of the two was stored.  The later one is left out, stays
queued, and goes in a following request, judged by its own answer.  No I/O here.
"""

from __future__ import annotations

from collections.abc import Sequence

from stowd.config.model import BatchLimits
from stowd.pipeline.queue import Job

DECODED = ("png", "gif")  # sent as decoded pixels, many times their file size: one per request


def take_batch(jobs: Sequence[Job], limits: BatchLimits) -> list[Job]:
    """The first jobs of the first job's kind within the file and byte limits (at least one),
    leaving out each job whose SOPInstanceUID an earlier one in the batch already has."""
    batch: list[Job] = []
    uids: set[str] = set()
    total = 0
    kind = jobs[0].kind if jobs else None
    if kind in DECODED:
        return list(jobs[:1])  # the byte limit counts file sizes, not decoded sizes
    for job in (j for j in jobs if j.kind == kind):
        if job.sop_uid and job.sop_uid in uids:
            continue  # for a following request (no UID known yet: never held back)
        if batch and (len(batch) >= limits.max_files or total + job.size > limits.max_bytes):
            break
        batch.append(job)
        total += job.size
        if job.sop_uid:
            uids.add(job.sop_uid)
    return batch
