"""What ``stowd migrate`` tells: the progress while it runs (a bar on a terminal, a line
every few seconds elsewhere), the closing summary and the report of every file of the SRC
folders that is not stored or not where it belongs.

A report entry is a dict: ``path`` (where the file was found), ``reason``, ``http_status``,
``stage`` (the CSV columns), ``failure_reason``, ``server_message``, ``now_at`` (where it is
now) and ``kind``: ``failed`` (in this run), ``failed_before`` (in an earlier run, and still
in SRC.failed, or in SRC with keep), ``unmoved`` (its move keeps failing) or ``unreadable``
(a folder or file the walk could not read).
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stowd.fileops import write_new
from stowd.pipeline.queue import Failed, Hold, Job
from stowd.printable import escape_lines, utf8_safe
from stowd.service.status import redact

DONE_STATES = ("sent", "failed", "gone", "ignored")
REPORT_FIELDS = ("path", "reason", "http_status", "stage")
BAR_WIDTH = 10


@dataclass
class Summary:
    """What a run did (this run's rows, plus the files skipped as stored before), and
    ``failures``: every file of the folders that is not stored, or not where it belongs,
    whichever run it was (the report, and exit code 1 unless it is empty)."""

    tally: dict[str, tuple[int, int]] = field(default_factory=dict)
    skipped: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    crashed: bool = False  # stopped by an unexpected error (logged), not by a signal
    failures: list[dict[str, Any]] = field(default_factory=list)
    verified: int | None = None  # stored files the archive then listed (None: not verifying)
    unlisted: int = 0  # answers "stored" for a file the archive then did not list
    already: int = 0  # of the stored: those the archive said it held already (Azure's 45070)
    # a shared queue: (files, bytes) each node stored in the run, and the node(s) that walked
    nodes: dict[str, tuple[int, int]] = field(default_factory=dict)
    walkers: list[str] = field(default_factory=list)

    def count(self, kind: str) -> int:
        """Failures of one ``kind``: failed, failed_before, unmoved, unreadable."""
        return sum(1 for f in self.failures if f["kind"] == kind)

    def files(self, state: str) -> int:
        return self.tally.get(state, (0, 0))[0]

    def bytes(self, state: str) -> int:
        return self.tally.get(state, (0, 0))[1]


def active(tally: dict[str, tuple[int, int]]) -> int:
    """Files of a tally not done yet."""
    return sum(n for state, (n, _) in tally.items() if state not in DONE_STATES)


def failed_entry(row: Failed, now_at: str, kind: str) -> dict[str, Any]:
    return _entry(row.path, row.error, now_at, kind)


def _entry(path: str, error: str | None, now_at: str, kind: str) -> dict[str, Any]:
    doc = json.loads(error) if error else {}
    return {
        "path": path,
        "reason": doc.get("reason") or "",
        "http_status": doc.get("http_status"),
        "stage": doc.get("stage") or "",
        "failure_reason": doc.get("failure_reason"),
        "server_message": doc.get("server_message"),
        "now_at": now_at,
        "kind": kind,
    }


def unmoved_entry(job: Job, problem: OSError | None) -> dict[str, Any]:
    """A file whose move keeps failing: stored (or failed) but still in SRC."""
    where = job.target or ("SRC.sent" if job.outcome == "sent" else "SRC.failed")
    why = f"cannot be moved to {where}: {problem or 'see the log'}"
    now_at = job.path if os.path.lexists(job.path) else job.target or job.path
    entry = _entry(job.path, job.error, now_at, "unmoved")
    if job.outcome == "sent":
        entry.update(reason=f"stored, but {why}", stage="moving the file")
    else:
        entry.update(reason=f"{entry['reason']}; and it {why}")
    return entry


def unreadable_entry(path: str, exc: OSError) -> dict[str, Any]:
    """A folder (or file) the scan could not read: none of its files were sent."""
    reason = f"cannot be read, nothing in it was sent: {exc.strerror or exc}"
    entry = _entry(path, None, path, "unreadable")
    entry.update(reason=reason, stage="listing the folder")
    return entry


@dataclass(frozen=True)
class Progress:
    """Where a run stands: ``done`` of ``total`` files (skipped ones count as done; the
    total grows until the walk is ``scanned``).  ``seconds``: the run's time without the
    time its destination was held, which the rates leave out."""

    done: int
    total: int
    scanned: bool
    stored_bytes: int
    failed: int
    seconds: float
    rate: float  # files finished per second in this run, while the destination answered
    held: str | None = None  # why the destination is held (then no ETA), as held_note says
    paused: str | None = None  # "paused until Mon 19:00 (schedule)": outside its windows

    @property
    def eta(self) -> str:
        if not self.scanned:
            return "scanning"
        return _clock((self.total - self.done) / self.rate) if self.rate > 0 else "-"

    @property
    def outlook(self) -> str:
        """``ETA h:mm:ss``, or while the destination is held or outside its transfer
        windows why it waits, and no ETA."""
        if self.held is not None:
            return f"{self.held}; no ETA while held"
        if self.paused is not None:
            return f"{self.paused}; no ETA while paused"
        return f"ETA {self.eta}"

    @property
    def files(self) -> str:
        return f"{self.done}/{self.total}{'' if self.scanned else '+'} files"


def progress(
    tally: dict[str, tuple[int, int]],
    skipped: int,
    seconds: float,
    scanned: bool,
    errors: int,
    *,
    held: str | None = None,
) -> Progress:
    """``seconds``: the time the destination answered (held time left out)."""
    done = sum(tally.get(s, (0, 0))[0] for s in DONE_STATES)
    total = done + active(tally) + skipped
    failed = tally.get("failed", (0, 0))[0] + errors
    rate = done / seconds if seconds > 0 else 0.0
    stored = tally.get("sent", (0, 0))[1]
    return Progress(done + skipped, total, scanned, stored, failed, seconds, rate, held)


def held_note(hold: Hold, now: float, opens: float | None = None) -> str:
    """What ``stowd status`` says of a held destination, on one line: since when, the next
    try and why (``held since 05:50:01 (8 min), next try in 20s: <reason>``).  ``opens``:
    when its transfer window opens, outside it (no try before then)."""
    since = time.strftime("%H:%M:%S", time.localtime(hold.since))
    wait = (hold.until if opens is None else max(hold.until, opens)) - now
    due = f"in {wait:.0f}s" if wait > 0 else "due now"
    reason = " ".join(redact(hold.reason).split())
    return (
        f"destination {hold.name} HELD since {since} ({_clock(now - hold.since)}), "
        f"next try {due}: {reason}"
    )


def progress_line(p: Progress) -> str:
    """``files done/total, MB stored, rate, failures, ETA``: a line of its own."""
    mb = p.stored_bytes / 1e6
    return (
        f"stowd migrate: {p.files}, {mb:.1f} MB stored, {p.rate:.1f} files/s, "
        f"{mb / max(p.seconds, 1e-9):.1f} MB/s, {p.failed} failed, {p.outlook}"
    )


def progress_bar(p: Progress) -> str:
    """For a terminal: ``[####......]  40% 400/1000 files, 12.3 MB, 0 failed, ETA 0:02:00,
    5.1 files/s`` (the most wanted first, as a narrow terminal cuts the end off).  Before the
    walk is complete the bar shows the share of the files found so far, and no percentage."""
    filled = BAR_WIDTH * p.done // p.total if p.total else 0
    share = f"{100 * p.done // p.total:3d}%" if p.scanned and p.total else "   -"
    return (
        f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {share} {p.files}, "
        f"{_size(p.stored_bytes)}, {p.failed} failed, {p.outlook}, {p.rate:.1f} files/s"
    )


def _size(n: int) -> str:
    unit, scale = next(((u, s) for u, s in (("TB", 1e12), ("GB", 1e9)) if n >= s), ("MB", 1e6))
    return f"{n / scale:.1f} {unit}"


def _moved_line(summary: Summary, folders: tuple[Path, ...]) -> str:
    """Where this run moved files, or that it moved none (all stored by an earlier run, such
    as one with --keep, whose files stay in SRC)."""
    moved = summary.files("sent") + summary.files("failed") - summary.count("unmoved")
    if moved <= 0:
        return "  moved: nothing (no file was stored or failed by this run)"
    where = ", ".join(f"{f}.sent / {f}.failed" for f in folders)
    return f"  moved: {moved} file(s) to {where}"


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"


def render(summary: Summary, folders: tuple[Path, ...], keep: bool, report: Path | None) -> str:
    """The closing summary, for people."""
    mb = summary.bytes("sent") / 1e6
    word = "interrupted" if summary.interrupted else "finished"
    word = "stopped by an unexpected error (see the log)" if summary.crashed else word
    lines = [
        f"stowd migrate {word} after {summary.seconds:.1f}s",
        f"  stored:   {summary.files('sent')} file(s), {mb:.1f} MB{_already(summary)}",
        f"  skipped:  {summary.skipped} file(s) already stored by an earlier run",
        f"  failed:   {_failed_line(summary)}",
    ]
    if summary.verified is not None:
        lines.insert(2, f"  verified: {_verified_line(summary)}")
    if summary.nodes or summary.walkers:
        lines.insert(2, f"  nodes:    {_nodes_line(summary)}")
    if summary.count("unmoved"):
        lines.append(
            f"  not moved: {summary.count('unmoved')} file(s) could not be moved to "
            "SRC.sent / SRC.failed and are still in SRC (see the log)"
        )
    if summary.count("unreadable"):
        lines.append(
            f"  unreadable: {summary.count('unreadable')} folder(s) or file(s) could not be "
            "read; nothing in them was sent (see the log)"
        )
    if report and summary.failures:
        lines.append(f"  every file not stored or not moved is listed in {report}")
    if summary.files("gone") or summary.files("ignored"):
        lines.append(f"  vanished: {summary.files('gone')}; ignored: {summary.files('ignored')}")
    if summary.interrupted or summary.crashed:
        left = active(summary.tally)
        lines.append(f"  {left} file(s) stay queued; run the same command again to go on")
    elif not keep and folders:
        lines.append(_moved_line(summary, folders))
    return escape_lines(lines)  # folder names may hold anything a file system allows


def _already(summary: Summary) -> str:
    """Of the stored files, those the archive said it held already (``stowd status`` says
    so too): it compared their UIDs, not their content."""
    if not summary.already:
        return ""
    return (
        f" ({summary.already} of them already stored: the archive held an instance with "
        "their UIDs before; see the log)"
    )


def _nodes_line(summary: Summary) -> str:
    """A shared queue: what each node stored of the run, and who walked the folders."""
    parts = [
        f"{node or '?'} stored {files} file(s), {size / 1e6:.1f} MB"
        for node, (files, size) in sorted(summary.nodes.items())
    ]
    if summary.walkers:
        parts.append("walked by " + ", ".join(summary.walkers))
    return "; ".join(parts)


def _verified_line(summary: Summary) -> str:
    """``--verify``: how many stored files the archive listed when asked (QIDO-RS)."""
    line = f"{summary.verified} stored file(s) listed by the archive when asked (QIDO-RS)"
    if summary.unlisted:
        line += f"; {summary.unlisted} time(s) a file it said it stored was not listed (sent again)"
    return line


def _failed_line(summary: Summary) -> str:
    now, before = summary.count("failed"), summary.count("failed_before")
    if not before:
        return f"{now} file(s)"
    return f"{now + before} file(s) ({now} in this run, {before} by earlier runs and not fixed)"


def write_report(path: Path, failures: list[dict[str, Any]]) -> None:
    """Every failed file with its reason: JSON for ``.json``, else CSV."""
    failures = [utf8_safe(f) for f in failures]  # a name that is not UTF-8: escaped
    text = io.StringIO(newline="")
    if path.suffix.lower() == ".json":
        json.dump(failures, text, indent=2, ensure_ascii=False)
        text.write("\n")
    else:
        writer = csv.DictWriter(text, REPORT_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(failures)
    # the mode as the user's umask makes it (a file they asked for); its folder must exist
    write_new(path, text.getvalue().encode("utf-8"), None, suffix=".tmp", create=False)
