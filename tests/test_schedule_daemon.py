"""Transfer windows (``schedule:``) in the real daemon and in ``stowd migrate``, against a
real Orthanc.  stowd has no test hook for its clock, so the windows are computed from the
real local time: one on another day (closed for the whole test), and one that opens at the
next whole minute, set by a reload once what is paused has been looked at.  What is asserted
never depends on the machine's speed: the files' rows say when they were sent (``done_at``),
which must be after the window opened."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import yaml
from dicomgen import make_study
from harness import Layout, Stowd, make_layout, run_cli, serving_metrics, wait_for
from orthanc import Orthanc
from prometheus_client.parser import text_string_to_metric_families

from stowd.config.schedule import DAY_NAMES, local_zone

FILES = 4
LEAD = 5  # seconds at least between the reload and the window's opening


def all_sent(layout: Layout) -> bool:
    """Every file in sent/ and its row finished: a file is moved before its row counts it
    done (after the folder's fsync), so sent/ alone may run a moment ahead of the rows."""
    found = rows(layout)
    return len(layout.files(layout.sent)) == FILES and all(r["state"] == "sent" for r in found)


def rows(layout: Layout) -> list[dict[str, Any]]:
    """Every row of the queue (read-only, as ``stowd status`` reads it)."""
    db = layout.root / "state" / "queue.db"
    if not db.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=30)) as c:
        c.row_factory = sqlite3.Row
        if c.execute("SELECT 1 FROM sqlite_master WHERE name = 'files'").fetchone() is None:
            return []
        return [dict(r) for r in c.execute("SELECT state, sop_uid, done_at FROM files")]


def read_and_pending(layout: Layout) -> bool:
    """Every file queued and read (its SOPInstanceUID known), none claimed or sent."""
    found = rows(layout)
    return len(found) == FILES and all(r["state"] == "pending" and r["sop_uid"] for r in found)


def status(layout: Layout) -> dict[str, Any]:
    result = run_cli("status", "-c", str(layout.config), "--json")
    assert result.returncode == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def paused_gauge(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", trust_env=False).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "stowd_destination_paused":
                return sample.value
    raise AssertionError(f"no stowd_destination_paused in\n{text}")


def set_schedule(layout: Layout, schedule: list[str] | None) -> None:
    doc = yaml.safe_load(layout.config.read_text())
    if schedule is None:
        doc["destinations"]["pacs"].pop("schedule", None)
    else:
        doc["destinations"]["pacs"]["schedule"] = schedule
    layout.config.write_text(yaml.safe_dump(doc, sort_keys=False))


def next_minute(lead: float) -> datetime:
    """The first whole local minute at least ``lead`` seconds from now."""
    soon = datetime.now(local_zone()) + timedelta(seconds=lead)
    return soon.replace(second=0, microsecond=0) + timedelta(minutes=1)


def another_day() -> str:
    """A window on a day three days from today: closed for the whole test."""
    return f"{DAY_NAMES[(datetime.now(local_zone()).weekday() + 3) % 7]} 10:00-11:00"


def next_day(name: str) -> datetime:
    """Now on the next day called ``name`` (from the day's name, not from "three days from
    now", which is a day later once midnight passed since the window was written)."""
    now = datetime.now(local_zone())
    return now + timedelta(days=(DAY_NAMES.index(name) - now.weekday()) % 7)


def test_files_are_queued_outside_the_window_and_sent_once_it_opens(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    """Started outside its window (one three days ahead): the files are queued and read,
    status, metrics and the log say paused, nothing is sent however long that lasts.  Then
    a reload adds a window that opens at the next whole minute: the files are sent, and
    their rows say it was after it opened."""
    other = another_day()
    dest = {"url": orthanc.dicomweb_url, "workers": 2, "schedule": [other]}
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url, destinations={"pacs": dest})
    with serving_metrics(layout) as (daemon, port):
        make_study(layout.drop / "study", FILES)
        queued = lambda: read_and_pending(layout)  # noqa: E731
        wait_for(queued, 60, "files queued and read", lambda: daemon.log)
        found = status(layout)["destinations"]["pacs"]
        assert found["paused"] is True, found
        first = next_day(other.split()[0]).replace(hour=10, minute=0, second=0, microsecond=0)
        assert found["paused_note"] == f"paused until {other.split()[0]} 10:00 (schedule)"
        assert found["paused_until"] == first.timestamp()
        assert paused_gauge(port) == 1
        said = "destination pacs: paused until"
        wait_for(lambda: said in daemon.log, 30, "the pause logged", lambda: daemon.log)
        assert orthanc.instance_count() == 0 and not layout.files(layout.sent)

        opens = next_minute(LEAD)
        set_schedule(layout, [other, f"{opens:%H:%M}-{opens + timedelta(minutes=30):%H:%M}"])
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: all_sent(layout),
            LEAD + 60 + 60,
            "the files sent once the window opened",
            lambda: daemon.log,
        )
        assert all(r["state"] == "sent" and r["done_at"] >= opens.timestamp() for r in rows(layout))
        assert orthanc.instance_count() == FILES
        said = "destination pacs: its transfer window is open"
        wait_for(lambda: said in daemon.log, 30, "the window logged open", lambda: daemon.log)
        assert status(layout)["destinations"]["pacs"]["paused"] is False
        wait_for(lambda: paused_gauge(port) == 0, 30, "the gauge at 0", lambda: daemon.log)
        assert daemon.terminate() == 0


def test_nothing_is_sent_outside_the_window_until_a_reload_opens_it(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    dest = {"url": orthanc.dicomweb_url, "workers": 2, "schedule": [another_day()]}
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url, destinations={"pacs": dest})
    with Stowd(layout) as daemon:
        daemon.wait_started()
        make_study(layout.drop / "study", FILES)
        wait_for(lambda: read_and_pending(layout), 60, "files queued and read", lambda: daemon.log)
        text = run_cli("status", "-c", str(layout.config))
        assert "schedule:   paused until " in text.stdout, text.stdout
        assert "no ETA while the destination is paused (schedule)" in text.stdout, text.stdout
        assert orthanc.instance_count() == 0 and not layout.files(layout.sent)

        set_schedule(layout, None)
        reloaded = time.time()
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: all_sent(layout),
            60,
            "sent after the reload",
            lambda: daemon.log,
        )
        assert all(r["done_at"] >= reloaded for r in rows(layout))
        assert daemon.terminate() == 0


def migrate(layout: Layout, log: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "stowd", "migrate", "-c", str(layout.config), *args],
            stdout=out,
            stderr=out,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def test_migrate_waits_for_the_window_and_now_ignores_it(tmp_path: Path, orthanc: Orthanc) -> None:
    dest = {"url": orthanc.dicomweb_url, "workers": 1, "schedule": [another_day()]}
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url, destinations={"pacs": dest})
    folder = tmp_path / "old"
    make_study(folder, FILES)
    log = tmp_path / "migrate.log"
    args = (str(folder), "--destination", "pacs", "--keep", "--progress-every", "0.2")
    proc = migrate(layout, log, *args)
    try:
        wait_for(lambda: read_and_pending(layout), 60, "files queued and read", log.read_text)
        wait_for(
            lambda: "(schedule); no ETA while paused" in log.read_text(),
            30,
            "a progress line saying it is paused",
            log.read_text,
        )
        assert proc.poll() is None, "the migration ended while its files wait for the window"
        assert orthanc.instance_count() == 0
        assert "nothing is sent; the files are found, read and queued now" in log.read_text()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(60)
    assert orthanc.instance_count() == 0

    result = run_cli("migrate", "-c", str(layout.config), *args[:4], "--now", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "stored:   4 file(s)" in result.stdout, result.stdout
    assert "paused" not in result.stderr
    assert orthanc.instance_count() == FILES
