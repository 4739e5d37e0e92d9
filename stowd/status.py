"""``stowd status``: what the queue holds, read from another process without blocking it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from stowd.config import Config
from stowd.queue import Queue, open_readonly

RATE_WINDOW = 300.0
LAST_ERRORS = 10


def daemon_pid(queue_path: Path) -> int | None:
    """The pid of the stowd that holds this queue, if it is running.

    The pid is read from the lock file; a process by that number must exist (even one of
    another user) and, where /proc tells, be a stowd.
    """
    try:
        pid = int(Path(str(queue_path) + ".lock").read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except PermissionError:
        pass  # it exists, it is just not ours
    except OSError:
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return pid
    return pid if b"stowd" in cmdline else None


def gather(config: Config, *, now: float | None = None) -> dict[str, Any]:
    """Everything ``status`` shows, as plain data (also the ``--json`` output)."""
    now = time.time() if now is None else now
    queue = open_readonly(config.queue)
    try:
        return _gather(config, queue, now)
    finally:
        queue.close()


def _gather(config: Config, queue: Queue, now: float) -> dict[str, Any]:
    oldest = queue.oldest_active()
    recent = queue.done_since(now - RATE_WINDOW)
    return {
        "queue": str(config.queue),
        "daemon_pid": daemon_pid(config.queue),
        "counts": queue.counts(),
        "oldest_pending_seconds": round(now - oldest, 1) if oldest else None,
        "files_per_minute": round(sum(recent.values()) / (RATE_WINDOW / 60), 1),
        "destinations": _destinations(config, queue, now),
        "last_errors": _errors(queue),
    }


def _destinations(config: Config, queue: Queue, now: float) -> dict[str, Any]:
    holds = queue.holds()
    out: dict[str, Any] = {}
    for name, dest in config.destinations.items():
        hold = holds.get(name)
        out[name] = (
            {"url": dest.display_url, "state": "ok"}
            if hold is None
            else {
                "url": dest.display_url,
                "state": "held",
                "held_since": hold.since,
                "held_for_seconds": round(now - hold.since, 1),
                "next_try_in_seconds": round(max(0.0, hold.until - now), 1),
                "reason": hold.reason,
            }
        )
    return out


def _errors(queue: Queue) -> list[dict[str, Any]]:
    out = []
    for path, state, error, when in queue.last_errors(LAST_ERRORS):
        reason = json.loads(error).get("reason", "") if error else ""
        out.append({"file": path, "state": state, "reason": reason, "time": when})
    return out


def render(data: dict[str, Any]) -> str:
    """The human form of ``gather``'s data."""
    pid = data["daemon_pid"]
    lines = [
        f"queue:        {data['queue']}",
        f"daemon:       {'running (pid ' + str(pid) + ')' if pid else 'not running'}",
        f"files:        {_counts(data['counts'])}",
        f"oldest:       {_age(data['oldest_pending_seconds'])}",
        f"rate:         {data['files_per_minute']} files/min over the last 5 minutes",
    ]
    for name, dest in data["destinations"].items():
        lines.append(f"destination:  {name} {dest['url']}: {_dest_state(dest)}")
    if data["last_errors"]:
        lines.append("last errors:")
        for err in data["last_errors"]:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(err["time"]))
            lines.append(f"  {stamp} [{err['state']}] {err['file']}: {err['reason']}")
    return "\n".join(lines)


def _counts(counts: dict[str, int]) -> str:
    order = ["pending", "waiting", "claimed", "settling", "sent", "failed", "gone", "ignored"]
    parts = [f"{counts[s]} {s}" for s in order if counts.get(s)]
    return ", ".join(parts) or "none yet"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "nothing pending"
    if seconds < 120:
        return f"pending for {seconds:.0f}s"
    if seconds < 7200:
        return f"pending for {seconds / 60:.0f} min"
    return f"pending for {seconds / 3600:.1f} h"


def _dest_state(dest: dict[str, Any]) -> str:
    if dest["state"] == "ok":
        return "ok"
    return (
        f"HELD for {_age(dest['held_for_seconds']).removeprefix('pending for ')}, "
        f"next try in {dest['next_try_in_seconds']:.0f}s: {dest['reason']}"
    )
