"""Moving a finished file to ``sent/`` or ``failed/`` (with its reason beside it).

The target keeps the path relative to the watch folder, never overwrites (``name~1.dcm``) and is
safe across filesystems (copy, fsync, rename into place, then remove the source).  The queue
records the target *before* the move and marks the job done only *after* it, so ``repair``
can finish a move that a crash interrupted.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from collections.abc import Collection
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from stowd.config import Source
from stowd.queue import Job, Queue

log = logging.getLogger("stowd.settle")

ERROR_SUFFIX = ".error.json"
MAX_SUFFIX = 10_000


def free_target(base: Path, rel: str) -> Path:
    """``base/rel``, or ``base/<stem>~N<ext>`` when that name is taken."""
    target = base / rel
    if not _taken(target):
        return target
    for n in range(1, MAX_SUFFIX):
        name = f"{target.stem}~{n}{target.suffix}" if target.suffix else f"{target.name}~{n}"
        candidate = target.with_name(name)
        if not _taken(candidate):
            return candidate
    raise OSError(errno.EEXIST, f"no free name for {target}")


def _taken(path: Path) -> bool:
    return path.exists() or Path(str(path) + ERROR_SUFFIX).exists()


def settle(
    queue: Queue, source: Source, job: Job, *, outcome: str, error: dict[str, Any] | None
) -> Path:
    """Move ``job``'s file into ``sent/`` or ``failed/`` and finish its row."""
    base = source.sent if outcome == "sent" else source.failed
    target = free_target(base, job.rel)
    queue.begin_settle(job.id, outcome=outcome, target=str(target), error=error)
    return complete(queue, job.id, job.path, target, outcome=outcome, error=error)


def complete(
    queue: Queue,
    job_id: int,
    path: str,
    target: Path,
    *,
    outcome: str,
    error: dict[str, Any] | None,
) -> Path:
    """Do (or finish) the recorded move, write the reason, then mark the row done."""
    if os.path.lexists(path):
        move(Path(path), target)
    elif not target.exists():
        log.warning("file vanished before it could be moved to %s: %s", outcome, path)
        queue.finish(job_id, state="gone")
        return target
    if outcome == "failed" and error is not None:
        write_reason(target, error)
    queue.finish(job_id, state=outcome)
    return target


def repair(queue: Queue, only: Collection[int] | None = None) -> tuple[int, set[int]]:
    """Finish moves left in ``settling`` (by a crash, or a move that failed).

    Returns how many were finished and the ids that still cannot be moved.
    """
    finished, stuck = 0, set()
    for job in queue.settling():
        if only is not None and job.id not in only:
            continue
        error = json.loads(job.error) if job.error else None
        assert job.target and job.outcome
        try:
            complete(queue, job.id, job.path, Path(job.target), outcome=job.outcome, error=error)
        except OSError as exc:
            log.error("still cannot move %s to %s: %s", job.path, job.target, exc)
            stuck.add(job.id)
            continue
        finished += 1
    return finished, stuck


def move(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; across filesystems copy + fsync + rename + unlink."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _copy_across(src, dst)
    _fsync_dir(dst.parent)


def _copy_across(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.stowd-tmp")
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1024 * 1024)
        fout.flush()
        os.fsync(fout.fileno())
    shutil.copystat(src, tmp)
    os.rename(tmp, dst)
    _fsync_dir(dst.parent)
    os.unlink(src)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_reason(target: Path, error: dict[str, Any]) -> Path:
    """Write ``<file>.error.json`` beside a failed file, atomically."""
    path = Path(str(target) + ERROR_SUFFIX)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(error, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def remove_empty_parents(path: Path, root: Path) -> None:
    """Remove now-empty folders between ``path``'s folder and ``root`` (never ``root``)."""
    folder = path.parent
    while folder != root and root in folder.parents:
        with contextlib.suppress(OSError):
            folder.rmdir()
        if folder.exists():
            return
        folder = folder.parent


def iso(ts: float | None) -> str | None:
    """A timestamp as ISO 8601 in UTC, for error files."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else None
