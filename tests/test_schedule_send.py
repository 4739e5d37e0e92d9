"""A destination's transfer windows (``schedule:``) in the sender, with an injected local
clock: a real queue, real files and a real Orthanc.  Outside the windows the sender claims
nothing (it still reads new files); inside, it sends; a window that opened while stowd was
stopped is open when it starts."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from dicomgen import make_study
from harness import drop_source, wait_for
from orthanc import Orthanc

from stowd.config.model import Config, Destination
from stowd.config.schedule import schedule_of
from stowd.dicomweb.stow import StowClient
from stowd.pipeline.queue import Queue, SqliteQueue
from stowd.pipeline.watch import Watcher
from stowd.pipeline.worker import Worker
from stowd.service import status
from stowd.service.metrics import PausedCollector

BERLIN = ZoneInfo("Europe/Berlin")
NIGHTS = schedule_of(["Mon-Fri 19:00-07:00", "Sat-Sun"])
TUESDAY_NOON = datetime(2026, 12, 8, 12, 0, tzinfo=BERLIN)  # closed
TUESDAY_EVENING = datetime(2026, 12, 8, 19, 0, tzinfo=BERLIN)  # open
FILES = 4


@dataclass
class LocalClock:
    """The local time the test sets (an aware datetime)."""

    now: datetime

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Rig:
    config: Config
    queue: Queue
    dest: Destination
    stop: threading.Event
    clock: LocalClock
    clients: list[StowClient] = field(default_factory=list)

    def worker(self) -> Worker:
        """A sender, as one that a (re)started stowd makes (a client of its own)."""
        client = StowClient(self.dest, stop=self.stop)
        self.clients.append(client)
        return Worker(self.config, self.queue, self.dest, client, self.stop, now=self.clock)

    def find(self) -> None:
        source = self.config.sources[0]
        Watcher(source, "pacs", self.queue.enqueue, clock=lambda: time.time() + 60).scan()

    def steps(self, worker: Worker, rounds: int = 20) -> None:
        for _ in range(rounds):
            if not worker.step():
                return

    def states(self) -> dict[str, int]:
        return self.queue.counts()


@pytest.fixture
def rig(tmp_path: Path, orthanc: Orthanc) -> Iterator[Rig]:
    source = drop_source(tmp_path)
    make_study(source.watch, FILES)
    dest = Destination("pacs", orthanc.dicomweb_url, schedule=NIGHTS)
    config = Config(tmp_path / "c.yaml", tmp_path / "q.db", (source,), {"pacs": dest})
    queue = SqliteQueue(config.queue).open()
    made = Rig(config, queue, dest, threading.Event(), LocalClock(TUESDAY_NOON))
    try:
        yield made
    finally:
        for client in made.clients:
            client.close()
        queue.close()


def test_outside_the_window_files_are_read_and_queued_but_not_sent(
    rig: Rig, orthanc: Orthanc
) -> None:
    worker = rig.worker()
    rig.find()
    rig.steps(worker)

    assert not worker.in_window()
    assert rig.states() == {"pending": FILES}  # read (classified), none claimed
    assert all(j.sop_uid for j in rig.queue.jobs("pending")), "new files are still read"
    assert orthanc.instance_count() == 0
    assert not any(rig.config.sources[0].sent.rglob("*.dcm"))

    rig.clock.now = TUESDAY_EVENING  # the window opens
    rig.steps(worker)

    assert rig.states() == {"sent": FILES}
    assert orthanc.instance_count() == FILES


def test_a_window_that_opened_while_stowd_was_stopped_sends_at_start(
    rig: Rig, orthanc: Orthanc
) -> None:
    """stowd ran outside the window (files queued, nothing sent) and stopped; it starts
    again after the window opened: its new sender sends at once."""
    before = rig.worker()
    rig.find()
    rig.steps(before)
    assert rig.states() == {"pending": FILES} and orthanc.instance_count() == 0

    rig.clock.now = datetime(2026, 12, 8, 23, 30, tzinfo=BERLIN)  # stopped until then
    rig.steps(rig.worker())

    assert rig.states() == {"sent": FILES}
    assert orthanc.instance_count() == FILES


def test_started_outside_the_window_it_sends_nothing_until_it_opens(
    rig: Rig, orthanc: Orthanc
) -> None:
    """stowd starts (after its window closed, Wednesday 07:00): it queues, sends nothing,
    and sends once the next window opens (Wednesday 19:00)."""
    rig.clock.now = datetime(2026, 12, 9, 7, 0, tzinfo=BERLIN)
    worker = rig.worker()
    rig.find()
    rig.steps(worker)
    assert rig.states() == {"pending": FILES} and orthanc.instance_count() == 0

    rig.clock.now = datetime(2026, 12, 9, 18, 59, tzinfo=BERLIN)
    rig.steps(worker)
    assert orthanc.instance_count() == 0

    rig.clock.now = datetime(2026, 12, 9, 19, 0, tzinfo=BERLIN)
    rig.steps(worker)
    assert rig.states() == {"sent": FILES} and orthanc.instance_count() == FILES


def test_no_schedule_sends_at_any_time(rig: Rig, orthanc: Orthanc) -> None:
    always = replace(rig.dest, schedule=schedule_of([]))
    rig.dest = always
    rig.config = replace(rig.config, destinations={"pacs": always})
    rig.find()
    rig.steps(rig.worker())
    assert rig.states() == {"sent": FILES} and orthanc.instance_count() == FILES


def beat_after(worker: Worker, seen: float) -> None:
    wait_for(lambda: worker.beat > seen, 30, "the paused sender's next beat")


def test_a_paused_sender_keeps_beating_for_the_watchdog(rig: Rig) -> None:
    """The daemon's watchdog calls a sender stuck when its ``beat`` is old while it runs:
    a paused one loops (idle polls), so its beat stays fresh and it is never stuck."""
    worker = rig.worker()
    rig.find()
    thread = threading.Thread(target=worker.run, name="send-paused", daemon=True)
    thread.start()
    try:
        for _ in range(3):
            beat_after(worker, worker.beat)
        assert worker.running and rig.states() == {"pending": FILES}
    finally:
        rig.stop.set()
        thread.join(30)
    assert not thread.is_alive()


def test_status_shows_the_pause_and_no_eta(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Europe/Berlin")
    rig.find()
    noon = TUESDAY_NOON.timestamp()
    data = status.gather(rig.config, now=noon)
    pacs = data["destinations"]["pacs"]
    assert pacs["paused"] is True
    assert pacs["paused_note"] == "paused until Tue 19:00 (schedule)"
    assert pacs["paused_until"] == TUESDAY_EVENING.timestamp()
    assert pacs["schedule"] == ["Mon-Fri 19:00-07:00", "Sat-Sun"]
    assert data["by_destination"]["pacs"]["eta"] == "paused"
    assert data["eta"] == "paused"
    text = status.render(data)
    assert "  schedule:   paused until Tue 19:00 (schedule): new files are queued" in text
    assert "no ETA while the destination is paused (schedule)" in text

    evening = status.gather(rig.config, now=TUESDAY_EVENING.timestamp())["destinations"]["pacs"]
    assert evening["paused"] is False and evening["paused_note"] is None
    wednesday_morning = datetime(2026, 12, 9, 7, 0, tzinfo=BERLIN)
    assert evening["open_until"] == wednesday_morning.timestamp()


def test_the_paused_gauge_follows_the_clock() -> None:
    clock = LocalClock(TUESDAY_NOON)
    collector = PausedCollector({"pacs": NIGHTS, "other": schedule_of([])}, now=clock)

    def gauge() -> dict[str, float]:
        [family] = collector.collect()
        return {s.labels["destination"]: s.value for s in family.samples}

    assert gauge() == {"pacs": 1, "other": 0}
    clock.now = TUESDAY_EVENING
    assert gauge() == {"pacs": 0, "other": 0}
