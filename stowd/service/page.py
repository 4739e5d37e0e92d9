"""The status page: its data (``document``: ``stowd status --json``'s, plus the throughput
history and the recent failures) and its HTML (``render``).

``document`` takes the counts from ``status.gather``, the same code as ``stowd status``, so
the page, ``/api/status`` and ``stowd status --json`` say the same; it adds ``history`` (per
destination, each minute of the last ``HISTORY_SPAN`` with files sent or failed) and
``failures`` (the newest failed files, at most ``FAILURES_SHOWN``, filtered by reason).

``render`` writes plain tables that need no script; every text from outside (file and
folder names, archive answers, reasons) goes through ``text``: control characters escaped
as ``stowd status`` escapes them (``printable.escape``), then HTML-escaped.  The script
(``static/stowd.js``) only refreshes the tables and draws the charts; the ids and
``data-*`` attributes here are what it (and the browser tests) rely on.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from stowd.config.model import Config
from stowd.pipeline.queue import HISTORY_SPAN, Throughput
from stowd.printable import escape
from stowd.service import status

FAILURES_SHOWN = 100  # rows of the failures table (the newest)
FAILURES_READ = 1000  # newest failed files the filter and its reasons come from
REASONS_SHOWN = 50  # choices of the reason filter (the most frequent)
REASON_LIMIT = 1000  # characters of ?reason= (a longer one matches nothing anyway)
REFRESH_SECONDS = 5  # how often the script refreshes the page
HOUR = 3600
STORING = "storing the file"  # the stage of an error the archive's answer gave (filing.py)
DAY = 86_400


@dataclass(frozen=True)
class Query:
    """What the page was asked for: ``?reason=`` ("" : every failure)."""

    reason: str = ""


# --------------------------------------------------------------------------- data


def document(config: Config, query: Query, *, now: float | None = None) -> dict[str, Any]:
    """``stowd status --json``'s document, plus ``history`` and ``failures``."""
    data = status.gather(config, now=now)
    now = data["time"]  # the queue's clock unless given
    recent = status.recent(config, now, failed=FAILURES_READ, since=now - HISTORY_SPAN)
    return {
        **data,
        "history": _history(recent.throughput, data["destinations"]),
        "failures": _failures(recent.failed, query.reason),
    }


def _history(rows: Iterable[Throughput], destinations: Iterable[str]) -> dict[str, Any]:
    """Per destination ``[minute, files sent, bytes sent, files failed]`` of each minute
    with any, oldest first (summed over the sources)."""
    found: dict[str, dict[int, list[int]]] = {name: {} for name in destinations}
    for row in rows:
        minute = found.setdefault(row.destination, {}).setdefault(row.minute, [0, 0, 0])
        minute[0] += row.sent
        minute[1] += row.bytes
        minute[2] += row.failed
    return {
        "minute_seconds": 60,
        "span_seconds": HISTORY_SPAN,
        "destinations": {
            name: [[m, *v] for m, v in sorted(minutes.items())] for name, minutes in found.items()
        },
    }


def _failures(failed: list[dict[str, Any]], reason: str) -> dict[str, Any]:
    """The failures table: its rows (newest first) and the reasons it can be filtered by."""
    counts: dict[str, int] = {}
    for err in failed:
        counts[err["reason"]] = counts.get(err["reason"], 0) + 1
    reasons = sorted(counts, key=lambda r: -counts[r])[:REASONS_SHOWN]
    reason = _named(reason, counts)
    chosen = [e for e in failed if not reason or e["reason"] == reason]
    return {
        "reason": reason,
        "reasons": reasons,
        "shown": chosen[:FAILURES_SHOWN],
        "matching": len(chosen),
        "read": len(failed),
    }


def _named(reason: str, known: Iterable[str]) -> str:
    """The reason ``?reason=`` names: itself, or the one it is the shown text of.  The
    filter's options carry the reason as the page shows it (``printable.escape``: a line
    break as ``\\n``, a backslash doubled), which a form sends back unaltered."""
    known = list(known)
    if reason in known:
        return reason
    return next((r for r in known if escape(r) == reason), reason)


# --------------------------------------------------------------------------- HTML


def text(value: object) -> str:
    """``value`` as HTML text: control characters escaped (``printable``), then ``<>&"'``."""
    return html.escape(escape(str(value)), quote=True)


def render(doc: Mapping[str, Any]) -> str:
    """The whole page."""
    parts = [
        _head(),
        _header(doc),
        _warnings(doc["warnings"]),
        _sources(doc),
        _runs(doc),
        _destinations(doc),
        _nodes(doc.get("nodes") or []),
        _history_tables(doc),
        _failures_section(doc["failures"]),
        "</main></body></html>\n",
    ]
    return "\n".join(parts)


def render_error(message: str) -> str:
    """The page when the queue cannot be read (no queue yet, no right to read it)."""
    return "\n".join(
        [
            _head(),
            "<h1>stowd</h1>",
            f'<p class="trouble">{text(message)}</p>',
            "</main></body></html>\n",
        ]
    )


def _head() -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>stowd status</title>"
        '<link rel="icon" href="static/icon.svg" type="image/svg+xml">'
        '<link rel="stylesheet" href="static/stowd.css">'
        '<script src="static/stowd.js" defer></script></head>'
        f'<body data-refresh="{REFRESH_SECONDS}"><main>'
    )


def _header(doc: Mapping[str, Any]) -> str:
    pid = doc["daemon_pid"]
    # the queue's holder: ``stowd run`` or a ``stowd migrate`` (which serves this page too)
    holder = f"stowd running (pid {pid})" if pid else "no stowd running on it"
    return (
        "<header><h1>stowd</h1><p>"
        f"queue {text(doc['queue'])}; {holder}; updated "
        f'<span id="updated">{text(status.clock(doc["time"]))}</span></p>'
        f'<p id="totals">{text(_totals(doc))}</p></header>'
    )


def _totals(doc: Mapping[str, Any]) -> str:
    counts = doc["counts"]
    parts = [f"{counts.get(s, 0)} {s}" for s in status.STATES if counts.get(s)]
    return "files: " + (", ".join(parts) or "none yet")


def _warnings(warnings: list[str]) -> str:
    if not warnings:
        return '<ul id="warnings"></ul>'
    items = "".join(f"<li>{text(w)}</li>" for w in warnings)
    return f'<ul id="warnings" class="trouble">{items}</ul>'


# -- sources


SOURCE_FIELDS = (
    ("waiting", "waiting"),
    ("in_flight", "in flight"),
    ("sent_today", "sent today"),
    ("failed_today", "failed today"),
    ("rate", "rate"),
    ("oldest_waiting", "oldest waiting"),
)


def _sources(doc: Mapping[str, Any]) -> str:
    head = "".join(f"<th>{label}</th>" for _, label in SOURCE_FIELDS)
    rows = "".join(_source_row(name, s) for name, s in doc["by_source"].items())
    return (
        '<section><h2>Sources</h2><table id="sources"><thead><tr><th>source</th>'
        f"<th>destination</th>{head}</tr></thead><tbody>{rows}</tbody></table></section>"
    )


def _source_row(name: str, figures: Mapping[str, Any]) -> str:
    values = source_fields(figures)
    cells = "".join(_cell(field, values[field]) for field, _ in SOURCE_FIELDS)
    dest = figures.get("destination") or "(not in the config)"
    return (
        f'<tr data-source="{text(name)}"><th scope="row">{text(name)}</th>'
        f"<td>{text(dest)}</td>{cells}</tr>"
    )


def source_fields(figures: Mapping[str, Any]) -> dict[str, str]:
    """The text of each cell of a source's row, from its ``by_source`` entry."""
    counts = figures["counts"]
    return {
        "waiting": str(counts.get("pending", 0) + counts.get("waiting", 0)),
        "in_flight": str(counts.get("claimed", 0) + counts.get("settling", 0)),
        "sent_today": str(figures.get("sent_today", 0)),
        "failed_today": str(figures.get("failed_today", 0)),
        "rate": _rate(figures),
        "oldest_waiting": _age(figures["oldest_pending_seconds"]),
    }


def _cell(field: str, value: str) -> str:
    return f'<td data-field="{field}">{text(value)}</td>'


# -- runs (receiving and migrating sources)


def _runs(doc: Mapping[str, Any]) -> str:
    rows = "".join(
        _run_row(name, s)
        for name, s in doc["by_source"].items()
        if s.get("migration") or "receive" in s
    )
    return (
        '<section><h2>Receiving and migrating</h2><table id="runs"><thead><tr><th>run</th>'
        f"<th>progress</th><th>ETA</th></tr></thead><tbody>{rows}</tbody></table></section>"
    )


def _run_row(name: str, figures: Mapping[str, Any]) -> str:
    return (
        f'<tr data-run="{text(name)}"><th scope="row">{text(name)}</th>'
        f"{_cell('progress', _progress(figures))}{_cell('eta', _eta(figures))}</tr>"
    )


def _progress(figures: Mapping[str, Any]) -> str:
    counts = figures["counts"]
    done = sum(counts.get(s, 0) for s in ("sent", "failed", "gone", "ignored"))
    total = sum(counts.values())
    share = f" ({100 * done / total:.0f}%)" if total else ""
    head = f"{done} of {total} files done{share}"
    found = figures.get("receiving")
    if "receive" in figures and found:
        return f"{head}; received {int(found.get('received', 0))} since start"
    return head


def _eta(figures: Mapping[str, Any]) -> str:
    eta = figures["eta"]
    if eta == "estimated":
        return f"about {status.duration(figures['eta_seconds'])}"
    words = {
        "empty": "nothing to send",
        "held": "none while the destination is held",
        "paused": "none while the destination is paused (schedule)",
        "unknown": "unknown: nothing sent in the last minutes",
        "parked": "none: its source is not in the config",
    }
    return words.get(eta, str(eta))


# -- destinations


def _destinations(doc: Mapping[str, Any]) -> str:
    rows = "".join(
        _destination_row(name, health, doc) for name, health in doc["destinations"].items()
    )
    return (
        '<section><h2>Destinations</h2><table id="destinations"><thead><tr>'
        "<th>destination</th><th>state</th><th>requests in flight</th><th>last answer</th>"
        f"<th>rate</th><th>backlog</th></tr></thead><tbody>{rows}</tbody></table>"
        f"{_charts(doc['destinations'])}</section>"
    )


def _destination_row(name: str, health: Mapping[str, Any], doc: Mapping[str, Any]) -> str:
    figures = doc["by_destination"].get(name, {})
    return (
        f'<tr data-destination="{text(name)}"><th scope="row">{text(name)}</th>'
        f"{_cell('state', destination_state(health, figures))}"
        f"{_cell('in_flight', str(health.get('requests_in_flight', 0)))}"
        f"{_cell('last_answer', last_answer(name, health, doc))}"
        f"{_cell('rate', _rate(figures) if figures else '')}"
        f"{_cell('backlog', _backlog(figures))}</tr>"
    )


def destination_state(health: Mapping[str, Any], figures: Mapping[str, Any]) -> str:
    """``held since ... until ...: why``, ``paused until ... (schedule)``, ``sending`` or
    ``idle``."""
    if health["state"] == "held":
        return (
            f"held since {status.clock(health['held_since'])}, next try at "
            f"{status.clock(health['held_until'])}: {health['reason']}"
        )
    if health.get("paused"):
        return str(health.get("paused_note") or "paused (schedule)")
    counts = figures.get("counts", {})
    busy = sum(counts.get(s, 0) for s in ("pending", "waiting", "claimed", "settling"))
    return "sending" if busy or health.get("requests_in_flight") else "idle"


def last_answer(name: str, health: Mapping[str, Any], doc: Mapping[str, Any]) -> str:
    """The newest of: the archive's last refusal or error (from ``last_errors``: one with an
    HTTP status or while storing), the last minute it stored files in (from the history); a
    held destination's reason first."""
    if health["state"] == "held":
        return str(health["reason"])
    minutes = doc["history"]["destinations"].get(name, [])
    stored = next((m[0] for m in reversed(minutes) if m[1]), None)
    error = next((e for e in doc["last_errors"] if _answered(e, name)), None)
    if error is not None and (stored is None or error["time"] >= stored + 60):
        return f"{status.clock(error['time'])}: {error['reason']}"
    if stored is not None:
        return f"stored files, the last at {status.clock(stored)[-8:-3]}"
    return "none yet"


def _answered(error: Mapping[str, Any], name: str) -> bool:
    """An error of ``name`` that the archive gave (not a file that could not be read)."""
    by_archive = error.get("http_status") is not None or error.get("stage") == STORING
    return error["destination"] == name and by_archive


def _charts(destinations: Iterable[str]) -> str:
    """An empty chart per destination and span: the script draws them from the history."""
    figures = []
    for name in destinations:
        for span, title in (("1h", "the last hour"), ("24h", "the last 24 hours")):
            figures.append(
                f'<figure class="chart"><figcaption>{text(name)}: {title}</figcaption>'
                f'<svg class="chart" data-destination="{text(name)}" data-span="{span}" '
                'viewBox="0 0 600 160" role="img"></svg></figure>'
            )
    return f'<div class="charts">{"".join(figures)}</div>'


def _history_tables(doc: Mapping[str, Any]) -> str:
    """Without the script: each destination's last 24 hours, hour by hour."""
    now = doc["time"]
    tables = [
        _history_table(name, minutes, now)
        for name, minutes in doc["history"]["destinations"].items()
    ]
    return f'<section class="history"><h2>Sent in the last 24 hours</h2>{"".join(tables)}</section>'


def _history_table(name: str, minutes: list[list[int]], now: float) -> str:
    hours: dict[int, list[int]] = {}
    for minute, files, size, failed in minutes:
        if minute >= now - DAY:
            hour = hours.setdefault(int(minute // HOUR * HOUR), [0, 0, 0])
            hour[0], hour[1], hour[2] = hour[0] + files, hour[1] + size, hour[2] + failed
    rows = "".join(
        f"<tr><td>{text(status.clock(h)[:-3])}</td><td>{v[0]}</td>"
        f"<td>{v[1] / status.MB:.1f}</td><td>{v[2]}</td></tr>"
        for h, v in sorted(hours.items(), reverse=True)
    )
    return (
        f'<table class="history" data-destination="{text(name)}"><caption>{text(name)}'
        "</caption><thead><tr><th>hour from</th><th>files sent</th><th>MB sent</th>"
        f"<th>failed</th></tr></thead><tbody>{rows}</tbody></table>"
    )


# -- nodes (a shared queue's)


NODE_STATES = ("alive", "silent", "vanished", "unknown", "stopped")


def _nodes(found: list[Mapping[str, Any]]) -> str:
    """A shared (PostgreSQL) queue's nodes, one row each (as ``stowd status``); a SQLite
    queue's one node, this host, adds nothing (an empty section: the script swaps it too)."""
    if not shared(found):
        return '<section id="nodes"></section>'
    rows = "".join(_node_row(n) for n in found)
    return (
        '<section id="nodes"><h2>Nodes</h2><table><thead><tr><th>node</th><th>host</th>'
        "<th>state</th><th>heartbeat</th><th>claimed</th><th>being moved</th>"
        f"<th>leases</th><th>rate</th></tr></thead><tbody>{rows}</tbody></table></section>"
    )


def shared(found: list[Mapping[str, Any]]) -> bool:
    """Whether ``found`` (``gather``'s ``nodes``) are a shared queue's (not SQLite's one)."""
    return len(found) > 1 or any(n.get("lease_seconds") is not None for n in found)


def _node_row(n: Mapping[str, Any]) -> str:
    fields = node_fields(n)
    state = n.get("state")
    kind = f' class="{state}"' if state in NODE_STATES else ""
    cells = "".join(_cell(field, value) for field, value in fields.items())
    name = text(n["node"])
    return f'<tr data-node="{name}"{kind}><th scope="row">{name}</th>{cells}</tr>'


def node_fields(n: Mapping[str, Any]) -> dict[str, str]:
    """The text of each cell of a node's row, from its ``nodes`` entry."""
    host = n.get("host")
    age = n.get("heartbeat_age")
    return {
        "host": "" if not host else f"{host} (pid {n.get('pid')})",
        "state": str(n.get("state", "")),
        "heartbeat": "none" if age is None else f"{status.duration(age)} ago",
        "claimed": str(n.get("claimed", 0)),
        "settling": str(n.get("settling", 0)),
        "leases": _leases(n),
        "rate": f"{n.get('files_per_minute', 0):.1f} files/min",
    }


def _leases(n: Mapping[str, Any]) -> str:
    expires = n.get("claims_expire_in")
    if not (n.get("claimed") or n.get("settling")) or expires is None:
        return "none held"
    if expires < 0:
        return f"expired {status.duration(-expires)} ago"
    return f"expire in {status.duration(expires)}"


# -- failures


def _failures_section(failures: Mapping[str, Any]) -> str:
    rows = "".join(_failure_row(e) for e in failures["shown"])
    return (
        f"<section><h2>Recent failures</h2>{_filter(failures)}"
        f'<p id="failures-note">{text(_failures_note(failures))}</p>'
        '<table id="failures"><thead><tr><th>file</th><th>reason</th><th>when</th>'
        f"<th>source</th></tr></thead><tbody>{rows}</tbody></table></section>"
    )


def _failures_note(failures: Mapping[str, Any]) -> str:
    shown, matching = len(failures["shown"]), failures["matching"]
    of = f" (the newest {shown} shown)" if matching > shown else ""
    return f"{matching} of the newest {failures['read']} failed files{of}"


def _filter(failures: Mapping[str, Any]) -> str:
    chosen = failures["reason"]
    options = ['<option value="">every reason</option>']
    for reason in dict.fromkeys([*failures["reasons"], *([chosen] if chosen else [])]):
        selected = " selected" if reason == chosen else ""
        options.append(f'<option value="{text(reason)}"{selected}>{text(reason)}</option>')
    return (
        '<form id="failure-filter" method="get"><label>reason '
        f'<select name="reason">{"".join(options)}</select></label> '
        '<button type="submit">filter</button></form>'
    )


def _failure_row(err: Mapping[str, Any]) -> str:
    return (
        f'<tr class="failure">{_cell("file", err["file"])}{_cell("reason", err["reason"])}'
        f"{_cell('when', status.clock(err['time']))}<td>{text(err['source'])}</td></tr>"
    )


# -- words and numbers


def _rate(figures: Mapping[str, Any]) -> str:
    return f"{figures['files_per_minute']} files/min, {figures['mb_per_minute']} MB/min"


def _backlog(figures: Mapping[str, Any]) -> str:
    if not figures or not figures["backlog_files"]:
        return "nothing to send"
    return f"{figures['backlog_files']} files; ETA {_eta(figures)}"


def _age(seconds: float | None) -> str:
    return "none" if seconds is None else status.duration(seconds)
