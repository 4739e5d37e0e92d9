"""Transfer windows (``schedule:``), pure: read from their text, and asked with an injected
clock (aware datetimes in Europe/Berlin, whose clocks go forward on 2026-03-29 at 02:00
and back on 2026-10-25 at 03:00)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from stowd.commands import cli
from stowd.commands.migrate import Paused
from stowd.commands.migreport import progress, progress_line
from stowd.config.load import load_config
from stowd.config.model import Config
from stowd.config.schedule import DAY_NAMES, Schedule, describe, parse, schedule_of
from stowd.errors import ConfigError

BERLIN = ZoneInfo("Europe/Berlin")


def at(text: str, fold: int = 0) -> datetime:
    """A local (Berlin) time: ``2026-12-07 18:59`` (a Monday)."""
    return datetime.fromisoformat(text).replace(tzinfo=BERLIN, fold=fold)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


NIGHTS = schedule_of(["Mon-Fri 19:00-07:00", "Sat-Sun"])


@pytest.mark.parametrize(
    ("when", "is_open"),
    [
        ("2026-12-07 18:59", False),  # Monday evening, before the window
        ("2026-12-07 19:00", True),  # it opens at 19:00
        ("2026-12-08 06:59", True),  # Tuesday morning, before 07:00
        ("2026-12-08 07:00", False),  # it ends at 07:00
        ("2026-12-08 12:00", False),  # Tuesday noon
        ("2026-12-11 23:00", True),  # Friday night
        ("2026-12-12 12:00", True),  # Saturday, the whole day
        ("2026-12-13 23:59", True),  # Sunday night
        ("2026-12-14 00:00", True),  # Monday 00:00: Monday before 07:00, no gap
        ("2026-12-14 07:00", False),  # Monday morning: the weekend is over
    ],
)
def test_inside_and_outside(when: str, is_open: bool) -> None:
    assert NIGHTS.is_open(at(when)) is is_open


def test_across_midnight_every_day() -> None:
    nights = schedule_of(["22:00-06:00"])
    assert nights.is_open(at("2026-12-07 23:30"))
    assert nights.is_open(at("2026-12-08 05:59"))
    assert not nights.is_open(at("2026-12-08 06:00"))
    assert not nights.is_open(at("2026-12-07 21:59"))
    assert nights.next_close(at("2026-12-07 23:30")) == at("2026-12-08 06:00")
    assert nights.next_open(at("2026-12-08 06:00")) == at("2026-12-08 22:00")


def test_days_are_the_days_of_the_moment_as_in_dcm4chee() -> None:
    """dcm4chee-arc's ``hour=19-6 dayOfWeek=5``: Friday's early morning and late evening."""
    friday = schedule_of(["Fri 19:00-07:00"])
    assert friday.is_open(at("2026-12-11 06:00"))  # Friday morning
    assert friday.is_open(at("2026-12-11 23:59"))  # Friday night
    assert not friday.is_open(at("2026-12-12 06:00"))  # Saturday morning is not Friday
    assert friday.next_open(at("2026-12-08 12:00")) == at("2026-12-11 00:00")
    assert friday.next_close(at("2026-12-11 20:00")) == at("2026-12-12 00:00")


def test_overlapping_windows_are_one_open_time() -> None:
    both = schedule_of(["Mon 08:00-12:00", "Mon 11:00-14:00", "Mon 14:00-15:00"])
    assert both.is_open(at("2026-12-07 11:30"))
    assert both.is_open(at("2026-12-07 14:00"))  # the third begins as the second ends
    assert both.next_close(at("2026-12-07 09:00")) == at("2026-12-07 15:00")
    assert both.next_open(at("2026-12-07 15:00")) == at("2026-12-14 08:00")


def test_next_window_of_the_issue_example() -> None:
    tuesday_noon = at("2026-12-08 12:00")
    assert NIGHTS.next_open(tuesday_noon) == at("2026-12-08 19:00")
    # Friday night runs into the weekend, and the weekend into Monday morning
    assert NIGHTS.next_close(at("2026-12-11 20:00")) == at("2026-12-14 07:00")
    assert describe(at("2026-12-08 19:00"), tuesday_noon) == "Tue 19:00"


def test_open_now_and_closed_now() -> None:
    now = at("2026-12-08 20:00")
    assert NIGHTS.next_open(now) == now
    closed = at("2026-12-08 08:00")
    assert NIGHTS.next_close(closed) == closed


def test_no_schedule_is_always_open() -> None:
    always = Schedule()
    assert always.always and always.is_open(at("2026-12-08 12:00"))
    assert always.next_close(at("2026-12-08 12:00")) is None
    whole = schedule_of(["00:00-24:00"])
    assert (
        whole.is_open(at("2026-12-08 00:00")) and whole.next_close(at("2026-12-08 00:00")) is None
    )


def test_dst_forward_the_night_is_an_hour_shorter() -> None:
    """2026-03-29 (a Sunday), 02:00 CET -> 03:00 CEST: Saturday 19:00 to Sunday 07:00 is
    eleven hours, not twelve."""
    nights = schedule_of(["19:00-07:00"])
    opened = nights.next_open(at("2026-03-28 12:00"))
    closed = nights.next_close(at("2026-03-28 20:00"))
    assert opened == at("2026-03-28 19:00") and closed == at("2026-03-29 07:00")
    assert closed is not None and opened is not None
    assert closed.astimezone(UTC) - opened.astimezone(UTC) == timedelta(hours=11)


def test_dst_forward_a_window_starting_in_the_skipped_hour_opens_at_the_jump() -> None:
    """02:30 does not exist on 2026-03-29: the window opens when the clocks jump to 03:00
    (01:00 UTC)."""
    early = schedule_of(["02:30-04:00"])
    opened = early.next_open(at("2026-03-29 01:00"))
    assert opened is not None and opened.astimezone(UTC) == utc("2026-03-29 01:00")
    assert early.is_open(utc("2026-03-29 01:00").astimezone(BERLIN))  # 03:00 CEST
    assert not early.is_open(utc("2026-03-29 00:59").astimezone(BERLIN))  # 01:59 CET


def test_dst_back_the_night_is_an_hour_longer() -> None:
    """2026-10-25 (a Sunday), 03:00 CEST -> 02:00 CET: Saturday 19:00 to Sunday 07:00 is
    thirteen hours."""
    nights = schedule_of(["19:00-07:00"])
    opened = nights.next_open(at("2026-10-24 12:00"))
    closed = nights.next_close(at("2026-10-24 20:00"))
    assert opened is not None and closed is not None
    assert closed.astimezone(UTC) - opened.astimezone(UTC) == timedelta(hours=13)


def test_dst_back_the_repeated_hour_is_inside_both_times() -> None:
    """A window ending at 02:30 on 2026-10-25 closes at the first 02:30 (00:30 UTC) and is
    open again when the clocks go back to 02:00 (01:00 UTC), until the second 02:30."""
    early = schedule_of(["01:00-02:30"])
    first = at("2026-10-25 02:10")  # fold 0: CEST
    closed = early.next_close(first)
    assert closed is not None and closed.astimezone(UTC) == utc("2026-10-25 00:30")
    reopened = early.next_open(closed)
    assert reopened is not None and reopened.astimezone(UTC) == utc("2026-10-25 01:00")
    again = early.next_close(reopened)
    assert again is not None and again.astimezone(UTC) == utc("2026-10-25 01:30")


def test_is_open_reads_the_wall_clock_of_the_given_zone() -> None:
    """The same instant is 19:30 in Berlin (open) and 18:30 UTC (closed)."""
    instant = utc("2026-12-07 18:30")
    assert NIGHTS.is_open(instant.astimezone(BERLIN))
    assert not NIGHTS.is_open(instant)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("10:00-10:00", "empty window"),
        ("00:00-00:00", "empty window"),
        ("Mom-Fri 19:00-07:00", "unknown day 'Mom'"),
        ("Mon-Fri 25:00-07:00", "'25:00'"),
        ("Mon 19:00", "cannot read the times"),
        ("24:00-06:00", "'24:00'"),
        ("", "an empty window"),
        ("Mon-Fri 7-19", "'7'"),
    ],
)
def test_bad_windows_say_what_is_wrong(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=None) as caught:
        parse(text)
    assert words in str(caught.value)


@pytest.mark.parametrize(
    ("text", "days", "start", "end"),
    [
        ("Sat-Sun", {5, 6}, 0, 1440),
        ("Fri-Mon 08:00-09:30", {4, 5, 6, 0}, 480, 570),
        ("Mon,Wed , friday 8:00-12:00", {0, 2, 4}, 480, 720),
        ("18:00-24:00", set(range(7)), 1080, 0),
        ("00:00-24:00", set(range(7)), 0, 1440),
        ("  Mon-Fri   19:00 - 07:00 ", {0, 1, 2, 3, 4}, 1140, 420),
    ],
)
def test_windows_as_written(text: str, days: set[int], start: int, end: int) -> None:
    window = parse(text)
    assert (set(window.days), window.start, window.end) == (days, start, end)


# --------------------------------------------------------------------------- in the config

CONFIG = """\
queue: ./state/queue.db
sources:
  - name: ct1
    watch: ./drop
    sent: ./done/sent
    failed: ./done/failed
    destination: pacs
destinations:
  pacs:
    url: http://127.0.0.1:8042/dicom-web
"""


def load(tmp_path: Path, extra: str) -> Config:
    (tmp_path / "drop").mkdir(exist_ok=True)
    path = tmp_path / "stowd.yaml"
    path.write_text(CONFIG + extra, encoding="utf-8")
    return load_config(path)


def test_a_destination_schedule_as_the_issue_writes_it(tmp_path: Path) -> None:
    config = load(tmp_path, '    schedule: ["Mon-Fri 19:00-07:00", "Sat-Sun"]\n')
    assert config.destinations["pacs"].schedule == NIGHTS
    plain = load(tmp_path, "    schedule: [Mon-Fri 19:00-07:00, Sat-Sun]\n")  # unquoted
    assert plain.destinations["pacs"].schedule == NIGHTS
    one = load(tmp_path, "    schedule: 22:00-06:00\n")  # one window, not a list
    assert one.destinations["pacs"].schedule == schedule_of(["22:00-06:00"])


def test_no_schedule_is_always_open_in_the_config(tmp_path: Path) -> None:
    assert load(tmp_path, "").destinations["pacs"].schedule.always


def test_bad_schedules_are_all_reported_with_key_and_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(
            tmp_path,
            "    schedule:\n"
            "      - Mon-Fri 19:00-07:00\n"
            "      - Mom-Fri 19:00-07:00\n"
            "      - 10:00-10:00\n"
            "      - Sat 19:00\n"
            "  other:\n"
            "    url: http://127.0.0.1:8042/dicom-web\n"
            "    schedule: []\n"
            "  third:\n"
            "    url: http://127.0.0.1:8042/dicom-web\n"
            "    schedule: {days: Mon}\n",
        )
    found = {(p.key, p.line): p.message for p in caught.value.problems}
    assert set(found) == {
        ("destinations.pacs.schedule[1]", 13),
        ("destinations.pacs.schedule[2]", 14),
        ("destinations.pacs.schedule[3]", 15),
        ("destinations.other.schedule", 18),
        ("destinations.third.schedule", 21),
    }
    assert "unknown day 'Mom'" in found["destinations.pacs.schedule[1]", 13]
    assert "empty window" in found["destinations.pacs.schedule[2]", 14]
    assert "cannot read the times of 'Sat 19:00'" in found["destinations.pacs.schedule[3]", 15]
    assert "never sends" in found["destinations.other.schedule", 18]
    assert "expected a window" in found["destinations.third.schedule", 21]


# --------------------------------------------------------------------------- migrate, check-config


def test_migrate_leaves_the_paused_time_out_of_its_rate_and_eta() -> None:
    """Seen every tick: 100 s paused (20 of them while also held, which ``Pauses`` counts
    already) are 80 s of pause."""
    paused = Paused()
    note = "paused until Mon 19:00 (schedule)"
    paused.update(None, held=False, now=0.0)
    paused.update(note, held=False, now=10.0)  # paused from here
    paused.update(note, held=False, now=90.0)
    paused.update(note, held=True, now=110.0)  # held too: counted there
    paused.update(None, held=False, now=110.0)  # open again
    paused.update(None, held=False, now=200.0)
    assert paused.seconds == 80.0 and paused.note is None

    # 200 s of run, 80 paused: 60 files in 120 s is 0.5 files/s, 40 left: 80 s
    tally = {"sent": (60, 60_000_000), "pending": (40, 40_000_000)}
    now = progress(tally, 0, 200.0 - paused.seconds, True, 0)
    assert now.rate == 0.5 and now.outlook == "ETA 0:01:20"
    waiting = replace(now, paused=note)
    assert waiting.outlook == f"{note}; no ETA while paused"
    assert f"{note}; no ETA while paused" in progress_line(waiting)


def test_check_config_prints_each_destinations_next_window(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TZ", "Europe/Berlin")
    today = datetime.now(BERLIN).weekday()
    other = DAY_NAMES[(today + 3) % 7]
    # that day's first window is its early morning, 00:00-07:00
    load(
        tmp_path,
        f"    schedule: [{other} 19:00-07:00]\n"
        "  always:\n"
        "    url: http://127.0.0.1:8042/dicom-web\n"
        "  whole:\n"
        "    url: http://127.0.0.1:8042/dicom-web\n"
        "    schedule: 00:00-24:00\n",
    )
    assert cli.main(["check-config", "-c", str(tmp_path / "stowd.yaml")]) == 0
    out = capsys.readouterr().out
    assert "  transfer windows (schedule, local time):\n" in out
    assert (
        f"    pacs: {other} 19:00-07:00: closed now, next window {other} 00:00 to {other} 07:00\n"
    ) in out
    assert "    always: at any time (no schedule)\n" in out
    assert "    whole: 00:00-24:00: open now\n" in out


def test_check_config_without_any_schedule_says_nothing_of_windows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    load(tmp_path, "")
    assert cli.main(["check-config", "-c", str(tmp_path / "stowd.yaml")]) == 0
    assert "window" not in capsys.readouterr().out


def test_defaults_give_every_destination_its_schedule_rate_and_adaptive(tmp_path: Path) -> None:
    """``defaults:`` holds schedule, max_rate and adaptive for every destination that does
    not set its own (issue 20: "per destination, and as defaults")."""
    (tmp_path / "drop").mkdir()
    path = tmp_path / "stowd.yaml"
    path.write_text(
        'defaults:\n  schedule: ["Mon-Fri 19:00-07:00", "Sat-Sun"]\n'
        "  max_rate: 50Mbit/s\n  adaptive: false\n"
        + CONFIG
        + "  own:\n    url: http://127.0.0.1:8042/dicom-web\n"
        "    schedule: 22:00-06:00\n    max_rate: 1MB/s\n    adaptive: true\n",
        encoding="utf-8",
    )
    config = load_config(path)
    pacs, own = config.destinations["pacs"], config.destinations["own"]
    assert (pacs.schedule, pacs.max_rate, pacs.adaptive) == (NIGHTS, 50e6 / 8, False)
    assert (own.schedule, own.max_rate, own.adaptive) == (
        schedule_of(["22:00-06:00"]),
        1e6,
        True,
    )


def test_a_bad_default_schedule_names_the_defaults_key_and_line(tmp_path: Path) -> None:
    (tmp_path / "drop").mkdir()
    path = tmp_path / "stowd.yaml"
    path.write_text("defaults:\n  schedule: Mom 10:00-12:00\n  max_rate: 50\n" + CONFIG)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    found = {(p.key, p.line): p.message for p in caught.value.problems}
    assert set(found) == {("defaults.schedule", 2), ("defaults.max_rate", 3)}
    assert "unknown day 'Mom'" in found["defaults.schedule", 2]
