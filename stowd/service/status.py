"""``stowd status``: what the queue holds, read from another process without blocking it.

``gather`` reads the queue once (one read snapshot: the counts kept in its ``tallies`` with the
waiting rows and the oldest row of each active group read from their indexes, the done_at
index for the rate, the newest errors from their index, the holds; and while a daemon runs,
the troubles it recorded; none passes over the table, so a queue of a million rows answers
as quickly as a small one), looks at the free space of the folders stowd writes to (a full
disk), and returns plain data, which is also the ``--json`` output; ``render`` is the human
form; ``short_line`` is the daemon's systemd ``STATUS=`` line (three cheap queries).

The rate is what was *sent* in the last ``RATE_WINDOW`` seconds (files, and their bytes in
MB of 10^6 bytes); the ETA is the backlog (pending + waiting + claimed) divided by that rate,
in bytes, or in files when nothing sent had a size; none while a destination is held or
outside its transfer windows (``schedule``: then "paused until Mon 19:00 (schedule)").
Sent, failed and gone counts are the rows still in the queue's history (``history_days``),
not every file ever handled.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from stowd.config.model import Config, Source
from stowd.config.schedule import Schedule, local_zone, paused_note
from stowd.config.yamlwalk import host_port
from stowd.errors import QueueUnreadable
from stowd.fileops import walk_folders
from stowd.pipeline import disk
from stowd.pipeline.queue import Hold, Holding, Queue, Throughput, open_status, read_only_note
from stowd.printable import escape_lines
from stowd.service import inflight

RATE_WINDOW = 300.0
LAST_ERRORS = 10
MB = 1_000_000
NO_TABLE = "no such table"  # SQLite's words for a database whose tables are not made yet
SHORT_LIMIT = 80
REASON_WIDTH = 200  # characters of an error's reason in the human form
COUNT_LIMIT = 10_000  # files counted at most in a drop folder (while nothing can be queued)
STATES = ("pending", "waiting", "claimed", "settling", "sent", "failed", "gone", "ignored")
ACTIVE = ("pending", "waiting", "claimed", "settling")  # the oldest of these is "oldest"
BACKLOG = ("pending", "waiting", "claimed")  # what the ETA is about
# scheme://anything-up-to-the-last-@-before-a-space: like yamlwalk.redact_url, the userinfo
# is not parsed (an unescaped '#', '/' or '@' in a password would leak through a parser).
_USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.\-]*://)\S*@")
# The name ``stowd migrate`` gives each SRC folder's source (commands/migrate.source_name):
# on a migration's queue (``status --queue``) its rows are a run's, not a source gone from
# the config.
MIGRATION_SOURCE = re.compile(r"migrate-[A-Za-z0-9_.-]{1,40}-[0-9a-f]{6}(-move)?")


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


def redact(text: str) -> str:
    """``text`` with the user:password@ of every URL in it replaced by ``***@``."""
    return _USERINFO.sub(r"\1***@", text)


# --------------------------------------------------------------------------- gathering


@dataclass
class _Figures:
    """The queue's figures for one source, one destination, or everything."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    backlog_bytes: int = 0
    oldest: float | None = None  # queued_at of the oldest active row
    sent_files: int = 0
    sent_bytes: int = 0
    settling_stored: int = 0  # settling files the archive stored (the others failed)
    already_stored: int = 0  # sent files the archive said it held already
    with_warning: int = 0  # sent files the archive stored with a warning

    def add(
        self,
        state: str,
        files: int,
        size: int,
        oldest: float,
        stored: int = 0,
        *,
        already: int = 0,
        warned: int = 0,
    ) -> None:
        self.counts[state] = self.counts.get(state, 0) + files
        self.settling_stored += stored if state == "settling" else 0
        self.already_stored += already if state == "sent" else 0
        self.with_warning += warned if state == "sent" else 0
        self.backlog_bytes += size if state in BACKLOG else 0
        if state in ACTIVE and (self.oldest is None or oldest < self.oldest):
            self.oldest = oldest

    def add_sent(self, files: int, size: int) -> None:
        self.sent_files += files
        self.sent_bytes += size

    @property
    def backlog_files(self) -> int:
        return sum(self.counts[s] for s in BACKLOG)

    def eta(self, held: bool) -> tuple[str, float | None]:
        """("empty" | "held" | "unknown" | "estimated", seconds)."""
        if not self.backlog_files:
            return "empty", 0.0
        if held:
            return "held", None
        if self.sent_bytes and self.backlog_bytes:
            return "estimated", round(self.backlog_bytes / self.sent_bytes * RATE_WINDOW, 1)
        if self.sent_files:
            return "estimated", round(self.backlog_files / self.sent_files * RATE_WINDOW, 1)
        return "unknown", None

    def as_dict(self, now: float, *, held: bool, parked: bool = False) -> dict[str, Any]:
        eta, seconds = ("parked", None) if parked and self.backlog_files else self.eta(held)
        return {
            "counts": dict(self.counts),
            "already_stored": self.already_stored,
            "stored_with_warning": self.with_warning,
            "oldest_pending_seconds": _since(now, self.oldest),
            "files_per_minute": round(self.sent_files / (RATE_WINDOW / 60), 1),
            "mb_per_minute": round(self.sent_bytes / MB / (RATE_WINDOW / 60), 1),
            "backlog_files": self.backlog_files,
            "backlog_bytes": self.backlog_bytes,
            "eta": eta,
            "eta_seconds": seconds,
        }


def gather(config: Config, *, now: float | None = None) -> dict[str, Any]:
    """Everything ``status`` shows, as plain data (also the ``--json`` output)."""
    queue = open_status(config)
    try:
        with queue.reading():  # now on the clock of the queue's times (a shared one's: the db's)
            return _gather(config, queue, queue.clock() if now is None else now)
    except QueueUnreadable as exc:  # e.g. no right to create the -wal/-shm files beside it
        raise QueueUnreadable(f"{exc} ({_unreadable(config, exc)})") from exc
    finally:
        queue.close()


def _unreadable(config: Config, exc: QueueUnreadable) -> str:
    """Why the queue may not be readable: it is new and its tables are not made yet (a daemon
    or a migration starting), its disk is full (a reader must create the -shm file when no
    daemon runs), its folder is read-only, or another user's files."""
    if NO_TABLE in str(exc):
        return (
            "the queue is new and its tables are not made yet: stowd (or stowd migrate) is "
            "starting; try again in a moment"
        )
    for full in disk.full_places(config):
        if config.queue.parent in full.paths:
            return full.message()
    return read_only_note(config.queue.parent) or (
        "run status as the user stowd runs as, e.g. sudo -u stowd stowd status -c CONFIG"
    )


def _gather(config: Config, queue: Queue, now: float) -> dict[str, Any]:
    holds = {name: h for name, h in queue.holds().items() if name in config.destinations}
    full = disk.full_places(config)
    troubles = [  # recorded by the running daemon (a thread that keeps dying)
        {"name": name, "since": since, "text": text}
        for name, since, text in (queue.troubles() if daemon_pid(config.queue) else [])
    ]
    routes: dict[str, str] = {}
    sources, dests, total = _tally(config, queue, now, routes)
    by_source = {
        name: _source_dict(config, name, figures, holds, now, route=routes.get(name))
        for name, figures in sources.items()
    }
    by_dest = {
        name: {
            **figures.as_dict(now, held=name in holds),
            "configured": name in config.destinations,
            "settling_stored": figures.settling_stored,
        }
        for name, figures in dests.items()
    }
    destinations = _destinations(config, holds, now)
    _no_eta_while_paused(by_dest, by_source, destinations)
    everything = total.as_dict(now, held=False)
    eta, seconds = _overall_eta(by_dest)
    if eta == "empty" and total.backlog_files:
        eta, seconds = "parked", None  # all of it belongs to sources no longer configured
    pid = daemon_pid(config.queue)
    _add_in_flight(config, destinations, inflight.read(config.queue, pid), now)
    _add_concurrency(destinations, inflight.read_concurrency(config.queue, pid))
    receiving = inflight.read_receivers(config.queue, pid)
    _add_today(by_source, queue, now)
    for name, figures in by_source.items():
        if "receive" in figures:
            figures["receiving"] = receiving.get(name) if pid else None
    return {
        "queue": config.queue_shown(),
        "time": now,
        "daemon_pid": pid,
        "nodes": nodes(config, queue, now, pid),
        "counts": {s: n for s, n in total.counts.items() if n},
        "already_stored": total.already_stored,
        "stored_with_warning": total.with_warning,
        "oldest_pending_seconds": everything["oldest_pending_seconds"],
        "files_per_minute": everything["files_per_minute"],
        "mb_per_minute": everything["mb_per_minute"],
        "rate_window_seconds": RATE_WINDOW,
        "backlog_files": everything["backlog_files"],
        "backlog_bytes": everything["backlog_bytes"],
        "eta": eta,
        "eta_seconds": seconds,
        "history_days": config.history_days,
        "destinations": destinations,
        "by_destination": by_dest,
        "by_source": by_source,
        "last_errors": _errors(queue, now),
        "disks_full": [f.as_dict() for f in full],
        "daemon_troubles": troubles,
        "warnings": [
            *_warnings(config, by_source, pid is not None),
            *_not_answering(destinations),
            *_trouble(config, by_source, full),
            *(f"{t['text']}; systemd's watchdog is no longer fed" for t in troubles),
        ],
    }


VANISHED_LEASES = 3  # a node without a heartbeat for this many of its leases has vanished


def nodes(config: Config, queue: Queue, now: float, pid: int | None) -> list[dict[str, Any]]:
    """Each node of the queue: whether it is alive (its heartbeat's age), what it holds
    (claims, moves, when their leases expire) and its rate (files it settled over the last
    ``RATE_WINDOW``).  A SQLite queue: one node, this host, alive while its daemon runs.
    A node silent for more than ``VANISHED_LEASES`` leases is ``vanished``; one silent
    longer than its lease but not yet that long, ``silent`` (its claims may be taken over
    already).  Heartbeats and leases are times on the queue's clock (a shared queue's:
    the database's), so their ages are measured on it, not on this host's (``now``): a
    host whose clock is off shows no live node vanished, no dead one alive."""
    holdings = {h.node: h for h in queue.holdings()}
    kept = queue.leases_now(now)
    rates = queue.settled_by(now - RATE_WINDOW)
    found: dict[str, dict[str, Any]] = {}
    if config.database is None:
        found[config.node] = {
            "node": config.node,
            "host": "this host",
            "pid": pid,
            "state": "alive" if pid else "stopped",
            "heartbeat_age": None,
        }
        holdings = {config.node: _all_held(holdings.values(), config.node)}
        rates = {config.node: _all_rates(rates.values())}
    for n in queue.nodes():
        age = max(0.0, kept - n.heartbeat)
        state = "alive" if age <= n.lease else "silent"
        found[n.node] = {
            "node": n.node,
            "host": n.host,
            "pid": n.pid,
            "version": n.version,
            "started": n.started,
            "lease_seconds": n.lease,
            "heartbeat_age": age,
            "state": "vanished" if age > VANISHED_LEASES * n.lease else state,
        }
    for name in holdings.keys() - found.keys():  # claims of a node that never beat
        found[name] = {"node": name, "host": None, "pid": None, "state": "unknown"}
    out = []
    for name in sorted(found):
        held = holdings.get(name)
        files, size = rates.get(name, (0, 0))
        out.append(
            {
                **found[name],
                "claimed": held.claimed if held else 0,
                "settling": held.settling if held else 0,
                "claims_expire_in": None
                if held is None or held.expires is None
                else held.expires - kept,
                "files_per_minute": files / (RATE_WINDOW / 60),
                "mb_per_minute": size / MB / (RATE_WINDOW / 60),
            }
        )
    return out


def _all_held(found: Iterable[Holding], node: str) -> Holding:
    """A SQLite queue's one node holds every claim (whatever name its rows carry)."""
    found = list(found)
    expires = [h.expires for h in found if h.expires is not None]
    return Holding(
        node,
        sum(h.claimed for h in found),
        sum(h.settling for h in found),
        min(expires) if expires else None,
    )


def _all_rates(found: Iterable[tuple[int, int]]) -> tuple[int, int]:
    found = list(found)
    return sum(f for f, _ in found), sum(b for _, b in found)


def _tally(
    config: Config, queue: Queue, now: float, routes: dict[str, str]
) -> tuple[dict[str, _Figures], dict[str, _Figures], _Figures]:
    """Figures per source, per destination and in all; configured ones even when empty.
    ``routes`` is filled with the destination of each source's rows (unless parked)."""
    sources = {s.name: _Figures() for s in config.sources}
    dests = {name: _Figures() for name in config.destinations}
    total = _Figures()

    def parts(source: str, dest: str) -> list[_Figures]:
        if dest:
            routes[source] = dest
        found = [sources.setdefault(source, _Figures()), total]
        return [*found, dests.setdefault(dest, _Figures())] if dest else found  # "": parked

    for source, dest, state, files, size, oldest, stored, already, warned in queue.tally(now):
        for figures in parts(source, dest):
            figures.add(state, files, size, oldest, stored, already=already, warned=warned)
    for source, dest, files, size in queue.sent_since(now - RATE_WINDOW):
        for figures in parts(source, dest):
            figures.add_sent(files, size)
    return sources, dests, total


def _source_dict(
    config: Config,
    name: str,
    figures: _Figures,
    holds: Mapping[str, Hold],
    now: float,
    *,
    route: str | None,
) -> dict[str, Any]:
    source = next((s for s in config.sources if s.name == name), None)
    if source is None and route is not None and MIGRATION_SOURCE.fullmatch(name):
        return {  # a stowd migrate run's folder: sent by the migration, not parked
            "configured": False,
            "migration": True,
            "destination": route,
            **figures.as_dict(now, held=route in holds),
        }
    if source is None:  # its rows wait in the queue until it is configured again
        return {
            "configured": False,
            "destination": None,
            **figures.as_dict(now, held=False, parked=True),
        }
    found = {
        "configured": True,
        "destination": source.destination,
        "watch": str(source.watch),
        **figures.as_dict(now, held=source.destination in holds),
    }
    if source.receive is not None:
        r = source.receive
        found["receive"] = {"ae_title": r.ae_title, "bind": r.bind, "port": r.port}
    return found


def _add_today(by_source: Mapping[str, dict[str, Any]], queue: Queue, now: float) -> None:
    """``sent_today`` and ``failed_today`` of each source: the files that became sent or
    failed since local midnight (counted as they settle, schema 8: a queue upgraded today
    counts the day's done rows it still held)."""
    midnight = datetime.fromtimestamp(now, local_zone()).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    today: dict[str, list[int]] = {}
    for row in queue.throughput(midnight.timestamp()):
        counts = today.setdefault(row.source, [0, 0])
        counts[0] += row.sent
        counts[1] += row.failed
    for name, figures in by_source.items():
        figures["sent_today"], figures["failed_today"] = today.get(name, [0, 0])


def _overall_eta(by_dest: Mapping[str, Mapping[str, Any]]) -> tuple[str, float | None]:
    """Destinations send side by side: the backlog is gone when the slowest is done."""
    etas = [(d["eta"], d["eta_seconds"]) for d in by_dest.values() if d["configured"]]
    for word in ("held", "paused", "unknown"):
        if any(e == word for e, _ in etas):
            return word, None
    seconds = [s for e, s in etas if e == "estimated"]
    return ("estimated", max(seconds)) if seconds else ("empty", 0.0)


def _destinations(config: Config, holds: Mapping[str, Hold], now: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, dest in config.destinations.items():
        hold = holds.get(name)
        out[name] = {"url": dest.display_url, "verify_tls": dest.verify_tls, "state": "ok"}
        out[name] |= _schedule(dest.schedule, now)
        if hold is not None:
            until = _next_try(hold, out[name].get("paused_until"))
            out[name] |= {
                "state": "held",
                "held_since": hold.since,
                "held_for_seconds": _since(now, hold.since),
                "held_until": until,
                "next_try_in_seconds": round(max(0.0, until - now), 1),
                "reason": redact(hold.reason or ""),
                "failures": hold.failures,
            }
    return out


# -- schedule (transfer windows) --
def _no_eta_while_paused(
    by_dest: Mapping[str, dict[str, Any]],
    by_source: Mapping[str, dict[str, Any]],
    destinations: Mapping[str, Any],
) -> None:
    """A destination outside its windows, and its sources, have no ETA (unless held: that
    says more)."""
    paused = {name for name, d in destinations.items() if d.get("paused")}
    found = [*by_dest.items(), *((f["destination"], f) for f in by_source.values())]
    for name, figures in found:
        if name in paused and figures["eta"] in ("estimated", "unknown"):
            figures["eta"], figures["eta_seconds"] = "paused", None


def _next_try(hold: Hold, paused_until: float | None) -> float:
    """When a held destination is tried next: when its hold ends, or when its window opens
    if that is later (outside its windows nothing is tried, not even the probe)."""
    return hold.until if paused_until is None else max(hold.until, paused_until)


def _schedule(schedule: Schedule, now: float) -> dict[str, Any]:
    """A destination's windows (no keys without a schedule): ``schedule`` (their texts),
    ``paused`` (outside them now), ``paused_until`` (when the next opens, epoch seconds),
    ``open_until`` (when the open one closes) and ``paused_note`` (``paused until Mon 19:00
    (schedule)``)."""
    if schedule.always:
        return {}  # no keys: the document of a destination without windows is as before
    local = datetime.fromtimestamp(now, local_zone())
    opens, closes = schedule.next_open(local), schedule.next_close(local)
    paused = not schedule.is_open(local)
    return {
        "schedule": [w.text for w in schedule.windows],
        "paused": paused,
        "paused_until": opens.timestamp() if paused and opens is not None else None,
        "open_until": closes.timestamp() if not paused and closes is not None else None,
        "paused_note": paused_note(schedule, local),
    }


def _add_in_flight(
    config: Config, out: dict[str, Any], requests: Mapping[str, Any], now: float
) -> None:
    """A destination whose oldest request has had no progress (no byte sent, no answer) for
    longer than its threshold gets ``not_answering_seconds`` and ``request_since``; one with
    requests in flight gets ``requests_in_flight``, as the running daemon last said."""
    for name, found in requests.items():
        dest = config.destinations.get(name)
        if dest is None or name not in out or not isinstance(found, dict):
            continue
        count = found.get("requests")
        if isinstance(count, int) and count > 0:
            out[name]["requests_in_flight"] = count
        try:
            since, progress = float(found["request_since"]), float(found["last_progress"])
        except (KeyError, TypeError, ValueError):
            continue
        quiet = max(0.0, now - progress)
        if quiet > inflight.not_answering_after(dest.timeouts.read):
            out[name] |= {"not_answering_seconds": round(quiet, 1), "request_since": since}


# -- adaptive concurrency (issue 20) ---------------------------------------------------------
def _add_concurrency(out: dict[str, Any], limits: Mapping[str, Any]) -> None:
    """A destination with ``adaptive: true`` gets ``concurrency``: the requests it allows at
    once now (``limit``) and its ``workers``, as the running daemon says."""
    for name, found in limits.items():
        if name not in out or not isinstance(found, dict):
            continue
        try:
            limit, workers = int(found["limit"]), int(found["workers"])
        except (KeyError, TypeError, ValueError):
            continue
        out[name]["concurrency"] = {"limit": limit, "workers": workers}


def _concurrency(health: Mapping[str, Any] | None) -> list[str]:
    found = None if health is None else health.get("concurrency")
    if not found:
        return []
    limit, workers = found["limit"], found["workers"]
    lowered = " (lowered: the archive was busy)" if limit < workers else ""
    return [f"  requests:   at most {limit} at once of {workers} workers{lowered}"]


def _not_answering(destinations: Mapping[str, Any]) -> list[str]:
    return [
        f"destination {name}: not answering for {d['not_answering_seconds']:.0f} s "
        f"(a request in flight since {_clock(d['request_since'])})"
        for name, d in destinations.items()
        if "not_answering_seconds" in d
    ]


def recent(config: Config, now: float, *, failed: int, since: float) -> Recent:
    """The newest ``failed`` failed files (each as an entry of ``last_errors``) and the
    throughput per minute since ``since``: what the status page shows beside ``gather``'s
    data."""
    queue = open_status(config)
    try:
        with queue.reading():
            rows = queue.recent_failed(failed)
            return Recent(_error_dicts(rows, now), queue.throughput(since))
    finally:
        queue.close()


@dataclass(frozen=True)
class Recent:
    """What ``recent`` read."""

    failed: list[dict[str, Any]]
    throughput: list[Throughput]


def _errors(queue: Queue, now: float) -> list[dict[str, Any]]:
    return _error_dicts(queue.recent_errors(LAST_ERRORS), now)


def _error_dicts(
    rows: Iterable[tuple[float, str, str, str, str, float, str]], now: float
) -> list[dict[str, Any]]:
    out = []
    for when, source, dest, path, state, next_try, error in rows:
        doc = _error_doc(error)
        waiting = state == "pending" and next_try > now
        out.append(
            {
                "time": when,
                "source": source,
                "destination": dest,
                "file": path,
                "state": "waiting" if waiting else state,
                "next_try_in_seconds": round(next_try - now, 1) if waiting else None,
                "reason": redact(str(doc.get("reason") or "")),
                "stage": doc.get("stage"),
                "http_status": doc.get("http_status"),
                "attempts": doc.get("attempts"),
            }
        )
    return out


def _error_doc(error: str) -> dict[str, Any]:
    """The JSON document the worker stored; a row from an older stowd may hold plain text."""
    try:
        doc = json.loads(error)
    except ValueError:
        return {"reason": error}
    return doc if isinstance(doc, dict) else {"reason": str(doc)}


def _warnings(
    config: Config, by_source: Mapping[str, Mapping[str, Any]], running: bool
) -> list[str]:
    out = [
        f"TLS verification is OFF for destination {name}"
        for name, dest in config.destinations.items()
        if not dest.verify_tls
    ]
    for name, data in by_source.items():
        if not data["configured"] and not data.get("migration") and data["backlog_files"]:
            out.append(
                f"source {name} is not in the config: its {data['backlog_files']} queued "
                "file(s) wait until it is back"
            )
    return out + (_missing_watch_folders(config) if running else [])


def _missing_watch_folders(config: Config) -> list[str]:
    """Watch folders deleted while the daemon runs (it creates them when it starts): files
    dropped there now are seen by no one, until the folder is created again."""
    out = []
    for source in config.sources:
        try:
            there = source.watch.is_dir()
        except OSError:
            continue  # cannot tell (no right to look): the daemon's log says what it sees
        if not there:
            out.append(
                f"the watch folder {source.watch} of source {source.name} is missing: files "
                "dropped there are not seen until it is created again"
            )
    return out


def _trouble(
    config: Config, by_source: Mapping[str, Mapping[str, Any]], full: list[disk.Full]
) -> list[str]:
    """Full disks, files that cannot be queued because of one, and files the archive
    stored that are not moved yet."""
    out = [f.message() for f in full]
    places = {path: f for f in full for path in f.paths}
    if config.queue.parent in places:
        for source in config.sources:
            waiting = _files_in(source.watch, (source.sent, source.failed))
            if waiting:
                out.append(
                    f"source {source.name}: {waiting} file(s) in {source.watch} cannot be "
                    "queued while the queue's disk is full (they are queued once space is freed)"
                )
    for source in config.sources:
        settling = by_source.get(source.name, {}).get("counts", {}).get("settling", 0)
        if settling:
            out.append(f"source {source.name}: {settling} {_why_unmoved(source, places)}")
    return out


def _why_unmoved(source: Source, places: Mapping[Path, disk.Full]) -> str:
    for folder, name in ((source.sent, "sent/"), (source.failed, "failed/")):
        if folder in places:
            return (
                f"file(s) are not yet moved to sent/ or failed/: {name} of source "
                f"{source.name} is full; they are moved once space is freed"
            )
    return (
        "file(s) are not yet moved to sent/ or failed/ (being moved now, or the move failed "
        "and stowd tries again every minute: see its log)"
    )


def _files_in(folder: Path, skip: tuple[Path, ...]) -> str:
    """How many files are below ``folder`` (not in ``skip``), as text; counting stops at
    ``COUNT_LIMIT`` (a huge folder is not walked to the end for a status)."""

    def enter(entry: os.DirEntry[str]) -> bool:
        return not entry.name.startswith(".") and Path(entry.path) not in skip

    count = 0
    for _folder, entries in walk_folders(str(folder), enter, _not_counted):
        count += sum(1 for e in entries if not e.name.startswith(".") and not _is_dir(e))
        if count >= COUNT_LIMIT:
            return f"{COUNT_LIMIT}+"
    return str(count) if count else ""


def _not_counted(_folder: str, _exc: OSError) -> None:
    """A folder that cannot be read is not counted, as ``os.walk`` did."""


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _since(now: float, then: float | None) -> float | None:
    return None if then is None else round(max(0.0, now - then), 1)


# --------------------------------------------------------------------------- the short line


def short_line(
    queue_or_data: Queue | Mapping[str, Any],
    destinations: Iterable[str] = (),
    *,
    alerts: Iterable[str] = (),
    paused: Iterable[str] = (),
) -> str:
    """One line of at most 80 characters for systemd's ``STATUS=``, such as
    ``12 pending, 3 waiting, 1520 sent, 2 failed; pacs ok``.  ``alerts`` (a full disk, a
    thread that keeps dying) come first, so that they are never cut off; ``paused`` names
    the destinations outside their transfer windows (``pacs paused``).

    From a ``Queue`` (two queries: the counts from one index, the holds) or from ``gather``'s
    data.  ``destinations`` names the configured destinations, so that healthy ones are
    named too; without it only held ones are, or "destinations ok".
    """
    if isinstance(queue_or_data, Queue):
        counts = queue_or_data.state_totals(queue_or_data.clock())
        held = set(queue_or_data.holds())
    else:
        counts = queue_or_data["counts"]
        dests = queue_or_data["destinations"]
        held = {name for name, d in dests.items() if d["state"] == "held"}
        paused = [*paused, *(name for name, d in dests.items() if d.get("paused"))]
        destinations = [*destinations, *dests]
    names = list(dict.fromkeys([*destinations, *sorted(held)]))
    head = _short_counts(counts)
    health = _short_health(names, held, set(paused), SHORT_LIMIT - len(head) - 2)
    line = f"{head}; {health}"
    line = "; ".join([*(a for a in alerts if a), line])
    return line if len(line) <= SHORT_LIMIT else line[: SHORT_LIMIT - 1] + "…"


def _short_counts(counts: Mapping[str, int]) -> str:
    sending = counts.get("claimed", 0) + counts.get("settling", 0)
    parts = [f"{counts.get('pending', 0)} pending", f"{counts.get('waiting', 0)} waiting"]
    parts += [f"{sending} sending"] if sending else []
    parts += [f"{counts.get('sent', 0)} sent", f"{counts.get('failed', 0)} failed"]
    return ", ".join(parts)


def _short_health(names: list[str], held: set[str], paused: set[str], room: int) -> str:
    """Each destination's health, or a summary when they do not fit in ``room``."""
    each = ", ".join(f"{n} {_short_state(n, held, paused)}" for n in names)
    if not names:
        return "destinations ok"
    if len(each) <= room:
        return each
    if not held and not paused:
        return f"all {len(names)} destinations ok"
    if not held:
        return f"{len(paused)} of {len(names)} paused (schedule)"
    return f"{len(held)} of {len(names)} HELD: {', '.join(sorted(held))}"


def _short_state(name: str, held: set[str], paused: set[str]) -> str:
    return "HELD" if name in held else "paused" if name in paused else "ok"


# --------------------------------------------------------------------------- rendering


def render(data: Mapping[str, Any]) -> str:
    """The human form of ``gather``'s data."""
    pid = data["daemon_pid"]
    lines = [
        f"queue:        {data['queue']}",
        f"daemon:       {'running (pid ' + str(pid) + ')' if pid else 'not running'}",
        f"files:        {_counts(data['counts'], *_notes(data))}",
        f"oldest:       {_age(data['oldest_pending_seconds'])}",
        f"rate:         {_rate(data)} over the last {data['rate_window_seconds'] / 60:.0f} minutes",
        f"backlog:      {_backlog(data, 'a destination')}",
    ]
    lines += _node_lines(data.get("nodes") or [], shared=len(data.get("nodes") or []) > 1)
    lines += [f"WARNING:      {w}" for w in data["warnings"]]
    if data.get("disks_full") and data["oldest_pending_seconds"] is None:
        lines[3] = "oldest:       nothing queued (but see the warnings: a disk is full)"
    for name, dest in data["by_destination"].items():
        lines += ["", *_destination(name, dest, data["destinations"].get(name))]
    for name, source in data["by_source"].items():
        lines += ["", *_source(name, source)]
    lines += _last_errors(data["last_errors"])
    lines += [
        "",
        f"sent, failed and gone count the files still in the queue's history "
        f"(history_days: {data['history_days']:g})",
    ]
    return escape_lines(lines)  # file names and archive texts cannot add a line


def _node_lines(found: list[Mapping[str, Any]], *, shared: bool) -> list[str]:
    """One line per node (a SQLite queue's: one short line, this host)."""
    lines = []
    for n in found:
        if n.get("lease_seconds") is None and not shared:  # SQLite: this host alone
            lines.append(f"node:         {n['node']} (this host)")
            continue
        age = n.get("heartbeat_age")
        said = "" if age is None else f", heartbeat {_age(age)} ago"
        where = f" on {n['host']} (pid {n['pid']})" if n.get("host") else ""
        held = f"holds {n['claimed']} claimed, {n['settling']} being moved"
        if n["claimed"] or n["settling"]:
            expires = n.get("claims_expire_in")
            if expires is not None:
                held += (
                    f" (leases expired {_age(-expires)} ago)"
                    if expires < 0
                    else f" (leases expire in {_age(expires)})"
                )
        rate = f"{n['files_per_minute']:.1f} files/min"
        lines.append(f"node:         {n['node']}: {n['state']}{where}{said}; {held}; {rate}")
    return lines


def _destination(name: str, figures: Mapping[str, Any], health: Any) -> list[str]:
    if health is None:
        head = f"destination {name} (no longer in the config)"
    else:
        head = f"destination {name} ({health['url']})"
    lines = [head, *_health(health)]
    settling = figures["counts"].get("settling", 0)
    if settling and lines[-1] == "  health:     ok":
        lines[-1] += _unmoved(settling, figures.get("settling_stored", 0))
    windows = [] if health is None else _windows(health)
    return [*lines, *_concurrency(health), *windows, *_figures(figures)]


def _unmoved(settling: int, stored: int) -> str:
    """The end of an ok health line when files are not yet moved: how many the archive
    stored (the others failed and wait for failed/)."""
    if stored == settling:
        return f", but {settling} file(s) it stored are not yet moved (see the warnings)"
    of_them = f" ({stored} of them stored)" if stored else ""
    where = f"sent/ or failed/{of_them}"
    return f", but {settling} file(s) are not yet moved to {where} (see the warnings)"


def _health(health: Mapping[str, Any] | None) -> list[str]:
    if health is None:
        return []
    return _held(health) + _stalled(health)


def _windows(health: Mapping[str, Any]) -> list[str]:
    """The schedule line: ``paused until Mon 19:00 (schedule: Mon-Fri 19:00-07:00)``, or
    ``open until Tue 07:00 (...)``; nothing without a schedule."""
    windows = health.get("schedule")
    if not windows:
        return []
    texts = ", ".join(windows)
    if health.get("paused"):
        note = health.get("paused_note") or "paused (schedule)"
        return [f"  schedule:   {note}: new files are queued, sent once it opens; {texts}"]
    until = health.get("open_until")
    open_until = "open" if until is None else f"open until {_clock(until)}"
    return [f"  schedule:   {open_until}; {texts}"]


def _stalled(health: Mapping[str, Any]) -> list[str]:
    if "not_answering_seconds" not in health:
        return []
    return [
        f"  answer:     none for {_duration(health['not_answering_seconds'])} "
        f"(a request in flight since {_clock(health['request_since'])})"
    ]


def _held(health: Mapping[str, Any]) -> list[str]:
    if health["state"] == "ok":
        return ["  health:     ok"]
    tries = health["failures"]
    return [
        f"  health:     HELD since {_clock(health['held_since'])} "
        f"({_duration(health['held_for_seconds'])}), {tries} failed attempt{'s' * (tries != 1)}",
        f"              next try at {_clock(health['held_until'])} ({_due(health)})",
        f"              why: {_shorten(health['reason'], REASON_WIDTH)}",
    ]


def _due(health: Mapping[str, Any]) -> str:
    wait = health["next_try_in_seconds"]
    return f"in {_duration(wait)}" if wait > 0 else "due now"


def _source(name: str, figures: Mapping[str, Any]) -> list[str]:
    if figures.get("migration"):
        head = f"source {name} (a stowd migrate run -> {figures['destination']})"
    elif not figures["configured"]:
        head = f"source {name} (not in the config: its files wait until it is back)"
    elif "receive" in figures:
        r = figures["receive"]
        where = host_port(r["bind"], r["port"])
        head = f"source {name} (C-STORE to {r['ae_title']} at {where} -> "
        head += f"{figures['destination']})"
        return [head, _receiving(figures.get("receiving")), *_figures(figures)]
    else:
        head = f"source {name} ({figures['watch']} -> {figures['destination']})"
    return [head, *_figures(figures)]


def _receiving(found: Mapping[str, Any] | None) -> str:
    """What a receiver took in since the daemon started, as the daemon last shared it."""
    if found is None:
        return "  receiving:  not now (the daemon is not running)"
    if not found.get("listening", False):
        return "  receiving:  NOT LISTENING: its port could not be bound (see the log)"
    rejected = int(found.get("rejected", 0))
    text = (
        f"  receiving:  {found.get('open', 0)} association(s) open; since start "
        f"{int(found.get('received', 0)):,} instance(s) ({_mb(int(found.get('bytes', 0)))}), "
        f"{int(found.get('refused', 0)):,} refused"
    )
    text += f", {rejected:,} association(s) rejected" if rejected else ""
    last = str(found.get("last_calling_ae") or "")
    if last and found.get("last_at"):
        text += (
            f"; last from {last} at {time.strftime('%H:%M:%S', time.localtime(found['last_at']))}"
        )
    return text


def _figures(figures: Mapping[str, Any]) -> list[str]:
    return [
        f"  files:      {_counts(figures['counts'], *_notes(figures))}",
        f"  oldest:     {_age(figures['oldest_pending_seconds'])}",
        f"  rate:       {_rate(figures)}",
        f"  backlog:    {_backlog(figures)}",
    ]


def _last_errors(errors: list[Mapping[str, Any]]) -> list[str]:
    if not errors:
        return []
    lines = ["", "last errors (newest first):"]
    for err in errors:
        state = err["state"]
        if err["next_try_in_seconds"] is not None:
            state += f", next try in {_duration(err['next_try_in_seconds'])}"
        reason = _shorten(err["reason"], REASON_WIDTH)
        lines.append(f"  {_clock(err['time'])} {err['source']} [{state}] {err['file']}: {reason}")
    return lines


def _shorten(text: str, width: int) -> str:
    """One line of at most ``width`` characters (``--json`` has the whole text)."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _notes(figures: Mapping[str, Any]) -> tuple[int, int]:
    return figures.get("already_stored", 0), figures.get("stored_with_warning", 0)


def _counts(counts: Mapping[str, int], already: int = 0, warned: int = 0) -> str:
    """The counts by state; ``already``: how many of the sent the archive held already;
    ``warned``: how many it stored with a warning."""
    parts = [f"{counts[s]} {s}" for s in STATES if counts.get(s)]
    notes = [f"{already} of them already stored"] if already else []
    notes += [f"{warned} with a warning: see the log"] if warned else []
    if notes and counts.get("sent"):
        at = parts.index(f"{counts['sent']} sent")
        parts[at] += f" ({', '.join(notes)})"
    return ", ".join(parts) or "none yet"


def _rate(figures: Mapping[str, Any]) -> str:
    return f"{figures['files_per_minute']} files/min, {figures['mb_per_minute']} MB/min sent"


def _backlog(figures: Mapping[str, Any], whose: str = "the destination") -> str:
    files = figures["backlog_files"]
    if not files:
        return "nothing to send"
    size = f"{files} file{'s' * (files != 1)}, {_mb(figures['backlog_bytes'])}"
    eta = figures["eta"]
    if eta == "estimated":
        return f"{size}; about {_duration(figures['eta_seconds'])} to send at the recent rate"
    why = {
        "held": f"no ETA while {whose} is held",
        "paused": f"no ETA while {whose} is paused (schedule)",
        "unknown": f"ETA unknown: nothing was sent in the last {RATE_WINDOW / 60:.0f} minutes",
        "parked": "no ETA: its source is not in the config",
    }
    return f"{size}; {why.get(eta, 'ETA ' + eta)}"


def _mb(size: int) -> str:
    return f"{size / MB:.1f} MB" if size < 10**10 else f"{size / 10**9:.1f} GB"


def _age(seconds: float | None) -> str:
    return "nothing pending" if seconds is None else f"pending for {_duration(seconds)}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _clock(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


# the same words on the status page (``page.py``)
duration = _duration
clock = _clock
