"""Transfer windows (``schedule:``) meeting the rest of stowd, found in review: a held
destination outside its windows is tried when the window opens (not when its hold ends),
and ``stowd status`` and ``stowd migrate`` say so.  Injected clocks (Europe/Berlin)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml
from harness import Stowd, drop_source, make_layout, wait_for
from test_schedule import CONFIG as BASE_CONFIG

from stowd.commands.migreport import held_note
from stowd.config.load import load_config
from stowd.config.model import Config, Destination
from stowd.config.schedule import DAY_NAMES, local_zone, schedule_of
from stowd.errors import ConfigError
from stowd.pipeline.queue import Queue, SqliteQueue
from stowd.service import status

BERLIN = ZoneInfo("Europe/Berlin")
NIGHTS = schedule_of(["Mon-Fri 19:00-07:00", "Sat-Sun"])
TUESDAY_NOON = datetime(2026, 12, 8, 12, 0, tzinfo=BERLIN).timestamp()  # closed
TUESDAY_EVENING = datetime(2026, 12, 8, 19, 0, tzinfo=BERLIN).timestamp()  # opens


@pytest.fixture
def held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Config, Queue]]:
    """A destination with nights-and-weekends windows, held (not answering)."""
    monkeypatch.setenv("TZ", "Europe/Berlin")
    dest = Destination("pacs", "http://127.0.0.1:9/dicom-web", schedule=NIGHTS)
    config = Config(
        tmp_path / "c.yaml", tmp_path / "q.db", (drop_source(tmp_path),), {"pacs": dest}
    )
    queue = SqliteQueue(config.queue).open()
    try:
        yield config, queue
    finally:
        queue.close()


def test_status_of_a_held_destination_outside_its_window_tries_when_it_opens(
    held: tuple[Config, Queue],
) -> None:
    """The hold would end at 12:01, but at noon on a Tuesday the window is closed until
    19:00, and nothing (not even the probe) is sent before: the next try is at 19:00."""
    config, queue = held
    queue.hold("pacs", until=TUESDAY_NOON + 60, reason="cannot connect: refused")
    pacs = status.gather(config, now=TUESDAY_NOON)["destinations"]["pacs"]
    assert pacs["state"] == "held" and pacs["paused"] is True
    assert pacs["held_until"] == TUESDAY_EVENING
    assert pacs["next_try_in_seconds"] == 7 * 3600.0

    # a hold that ends after the window opened still says when the hold ends
    queue.hold("pacs", until=TUESDAY_EVENING + 600, reason="cannot connect: refused")
    later = status.gather(config, now=TUESDAY_NOON)["destinations"]["pacs"]
    assert later["held_until"] == TUESDAY_EVENING + 600


def test_migrate_held_note_outside_the_window_names_the_opening_not_due_now(
    held: tuple[Config, Queue],
) -> None:
    """``stowd migrate``'s progress line of a held destination: its hold ran out at 11:00,
    but outside the window the next try is at 19:00, not "due now"."""
    _, queue = held
    hold = queue.hold("pacs", until=TUESDAY_NOON - 3600, reason="cannot connect: refused")
    assert "next try due now" in held_note(hold, TUESDAY_NOON)  # no window: as before
    note = held_note(hold, TUESDAY_NOON, TUESDAY_EVENING)
    assert "next try in 25200s" in note, note


CONFIG = BASE_CONFIG + "    schedule: [Sat-Sun, 19:00]\n"


def test_a_window_yaml_reads_as_a_number_is_shown_as_written(tmp_path: Path) -> None:
    """``19:00`` unquoted is the number 1140 to YAML 1.1 (sexagesimal): the message shows
    what the user wrote, and how to write it, not a number they never wrote."""
    (tmp_path / "drop").mkdir()
    path = tmp_path / "stowd.yaml"
    path.write_text(CONFIG, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    [problem] = caught.value.problems
    assert (problem.key, problem.line) == ("destinations.pacs.schedule[1]", 11)
    assert "got 19:00 (YAML reads it as 1140; put the window in quotes)" in problem.message


def test_a_reload_that_removes_the_schedule_says_so_not_an_empty_window(tmp_path: Path) -> None:
    """Paused (a window three days ahead), then a reload without ``schedule``: the log said
    "its transfer window is open (); sending", a window that does not exist."""
    weekday = datetime.now(local_zone()).weekday()
    other = f"{DAY_NAMES[(weekday + 3) % 7]} 10:00-11:00"
    dest = {"url": "http://127.0.0.1:9/dicom-web", "schedule": [other]}
    layout = make_layout(
        tmp_path / "run", "http://127.0.0.1:9/dicom-web", destinations={"pacs": dest}
    )
    with Stowd(layout) as daemon:
        daemon.wait_started()
        said = "destination pacs: paused until"
        wait_for(lambda: said in daemon.log, 30, "the pause logged", lambda: daemon.log)
        doc = yaml.safe_load(layout.config.read_text())
        del doc["destinations"]["pacs"]["schedule"]
        layout.config.write_text(yaml.safe_dump(doc, sort_keys=False))
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        said = "destination pacs: no schedule any more; sending at any time"
        wait_for(
            lambda: said in daemon.log, 60, "the schedule's removal logged", lambda: daemon.log
        )
        assert "transfer window is open ()" not in daemon.log
        assert daemon.terminate() == 0
