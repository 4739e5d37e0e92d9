"""A destination's transfer windows (``schedule:``): when it may send, in local time.

A window is written ``[DAYS] [HH:MM-HH:MM]``: ``"Mon-Fri 19:00-07:00"``, ``"Sat-Sun"`` (whole
days), ``"22:00-06:00"`` (every day), ``"Mon,Wed,Fri 08:00-12:00"``.  A moment is inside a
window when its weekday is one of DAYS and its time of day is inside the times; times that
end at or before their start wrap around midnight (``19:00-07:00`` is 19:00-24:00 and
00:00-07:00 of each of its days).  This is how dcm4chee-arc reads the schedules of its
forward rules (``dcmSchedule: hour=19-6 dayOfWeek=1-5``: the hour and the weekday of the
moment, ``org.dcm4chee.arc.conf.ScheduleExpression``), and it makes the usual "nights and
weekends", ``["Mon-Fri 19:00-07:00", "Sat-Sun"]``, one unbroken time from Friday 19:00 to
Monday 07:00.  ``24:00`` may end a window.  A schedule is open while any of its windows is;
no schedule (no windows) is always open.

Times are wall-clock times of the local zone: a window is open while the local clock shows
a time inside it.  So on the night the clocks go forward a ``19:00-07:00`` window is an
hour shorter, and one going back an hour longer; a window starting in the skipped hour
opens when the clocks jump past its start; in the repeated hour a time inside a window is
inside it both times.

Pure: ``parse`` reads one window's text (``ValueError`` with a message for the config
reader), ``Schedule`` answers ``is_open``, ``next_open`` and ``next_close`` for an aware
datetime.  Only ``local_now``, the clock stowd uses, looks at the system's zone.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_FULL_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
DAY = 24 * 60  # minutes
HORIZON = 8  # days looked ahead for the next change (a schedule repeats every week)
_TIME = re.compile(r"(\d{1,2}):(\d{2})")
_TIMES = re.compile(r"(?P<start>[\d:.]+)\s*-\s*(?P<end>[\d:.]+)$")
_HINT = 'write a window as "Mon-Fri 19:00-07:00", "Sat-Sun" or "22:00-06:00"'


@dataclass(frozen=True)
class Window:
    """Open on ``days`` (0 Monday .. 6 Sunday) from ``start`` to ``end`` (minutes of the
    day; ``end <= start``: from ``start`` to midnight and from midnight to ``end``)."""

    days: frozenset[int]
    start: int
    end: int
    text: str

    def is_open(self, weekday: int, minute: int) -> bool:
        if weekday not in self.days:
            return False
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end


@dataclass(frozen=True)
class Schedule:
    """A destination's windows; none: always open."""

    windows: tuple[Window, ...] = ()

    @property
    def always(self) -> bool:
        return not self.windows

    def is_open(self, when: datetime) -> bool:
        """Is ``when`` (its own wall-clock time and weekday) inside a window?"""
        if self.always:
            return True
        minute = when.hour * 60 + when.minute
        return any(w.is_open(when.weekday(), minute) for w in self.windows)

    def next_open(self, now: datetime) -> datetime | None:
        """When the schedule opens next (``now`` when it is open; None: never within
        ``HORIZON`` days)."""
        return now if self.is_open(now) else self._next_change(now)

    def next_close(self, now: datetime) -> datetime | None:
        """When the schedule closes next (``now`` when it is closed; None: never, such as
        a schedule that is always open)."""
        return self._next_change(now) if self.is_open(now) else now

    def _next_change(self, now: datetime) -> datetime | None:
        """The first instant after ``now`` at which ``is_open`` differs from now."""
        zone = now.tzinfo
        if zone is None or self.always:
            return None
        state = self.is_open(now)
        for candidate in sorted(self._candidates(now, zone)):
            if self.is_open(candidate.astimezone(zone)) != state:
                return candidate.astimezone(zone)
        return None

    def _candidates(self, now: datetime, zone: tzinfo) -> set[datetime]:
        """Every instant (UTC) within ``HORIZON`` days after ``now`` at which the state may
        change: a window's start or end and midnight (a window's day begins or ends), both
        readings of a repeated hour, and the moments the zone changes its offset."""
        first = now.astimezone(zone).date() - timedelta(days=1)
        found: set[datetime] = set()
        limit = now + timedelta(days=HORIZON)
        for n in range(HORIZON + 2):
            day = first + timedelta(days=n)
            for minute in {0} | {m for w in self.windows for m in (w.start, w.end)}:
                found |= _instants(day, minute, zone)
            found |= _offset_changes(day, zone)
        return {c for c in found if now < c <= limit}


def _instants(day: date, minute: int, zone: tzinfo) -> set[datetime]:
    """The instants (UTC) at which the local clock shows ``minute`` of ``day``."""
    wall = datetime.combine(day, time()) + timedelta(minutes=minute)
    return {wall.replace(tzinfo=zone, fold=fold).astimezone(UTC) for fold in (0, 1)}


def _offset_changes(day: date, zone: tzinfo) -> set[datetime]:
    """The instant (UTC, to the second) at which ``zone`` changes its offset within the UTC
    day ``day``, if it does."""
    start = datetime.combine(day, time(), UTC)
    end = start + timedelta(days=1)
    if start.astimezone(zone).utcoffset() == end.astimezone(zone).utcoffset():
        return set()
    before = start.astimezone(zone).utcoffset()
    low, high = 0, 86400  # seconds: the offset is ``before`` at low, not at high
    while high - low > 1:
        mid = (low + high) // 2
        at = start + timedelta(seconds=mid)
        low, high = (mid, high) if at.astimezone(zone).utcoffset() == before else (low, mid)
    return {start + timedelta(seconds=high)}


# --------------------------------------------------------------------------- parsing


def parse(text: str) -> Window:
    """One window from its text; ``ValueError`` saying what is wrong."""
    text = " ".join(text.split())
    if not text:
        raise ValueError(f"an empty window; {_HINT}")
    times = _TIMES.search(text)
    day_text = text[: times.start()].strip() if times else text
    if ":" in day_text:
        raise ValueError(f"cannot read the times of {text!r} (expected HH:MM-HH:MM); {_HINT}")
    days = _days(day_text, text) if day_text else frozenset(range(7))
    start, end = _times(times, text) if times else (0, DAY)
    return Window(days, start, 0 if end == DAY and start > 0 else end, text)


def _days(spec: str, text: str) -> frozenset[int]:
    found: set[int] = set()
    for item in re.split(r"\s*,\s*", spec.strip()):
        first, dash, last = item.partition("-")
        a = _day(first, text)
        b = _day(last, text) if dash else a
        found |= {(a + n) % 7 for n in range((b - a) % 7 + 1)}
    return frozenset(found)


def _day(name: str, text: str) -> int:
    key = name.strip().lower()
    for number, (short, full) in enumerate(zip(DAY_NAMES, _FULL_NAMES, strict=True)):
        if key in (short.lower(), full):
            return number
    raise ValueError(
        f"unknown day {name.strip()!r} in {text!r}; days are {', '.join(DAY_NAMES)} "
        f"(ranges such as Mon-Fri, lists such as Mon,Wed); {_HINT}"
    )


def _times(match: re.Match[str], text: str) -> tuple[int, int]:
    start = _minute(match["start"], text, end=False)
    end = _minute(match["end"], text, end=True)
    if start == end:
        raise ValueError(
            f"{text!r} is an empty window (it starts and ends at {match['start']}); "
            "for whole days leave the times out (such as Sat-Sun) or write 00:00-24:00"
        )
    return start, end


def _minute(value: str, text: str, *, end: bool) -> int:
    match = _TIME.fullmatch(value)
    hours, minutes = (int(match[1]), int(match[2])) if match else (-1, -1)
    if (hours, minutes) == (24, 0) and end:
        return DAY
    if not (0 <= hours < 24 and 0 <= minutes < 60):
        latest = "24:00" if end else "23:59"
        raise ValueError(
            f"{value!r} in {text!r} is not a time of day (HH:MM from 00:00 to {latest}); {_HINT}"
        )
    return hours * 60 + minutes


def schedule_of(texts: Iterable[str]) -> Schedule:
    """The schedule of windows written as ``texts`` (``ValueError`` at the first bad one)."""
    return Schedule(tuple(parse(t) for t in texts))


# --------------------------------------------------------------------------- the clock


LOCALTIME = "/etc/localtime"


def local_zone() -> tzinfo:
    """The system's zone with its daylight-saving rules: ``TZ`` when it names one, else
    ``/etc/localtime``; failing both, the current fixed offset.  Read again only when
    ``TZ`` or the file changed (the senders ask several times a second)."""
    try:
        found = os.stat(LOCALTIME)
        stamp: tuple[int, int] | None = (found.st_ino, found.st_mtime_ns)
    except OSError:
        stamp = None
    return _zone(os.environ.get("TZ", "").removeprefix(":"), stamp)


@functools.lru_cache(maxsize=8)
def _zone(key: str, _stamp: tuple[int, int] | None) -> tzinfo:
    try:
        if key:
            return ZoneInfo(key)
    except (ZoneInfoNotFoundError, ValueError):
        pass
    try:
        with open(LOCALTIME, "rb") as tzfile:
            return ZoneInfo.from_file(tzfile, key="localtime")
    except (OSError, ValueError):
        return datetime.now().astimezone().tzinfo or UTC


def local_now() -> datetime:
    """Now, as an aware datetime in the local zone (what schedules are read in)."""
    return datetime.now(local_zone())


def describe(when: datetime, now: datetime) -> str:
    """``Mon 19:00`` (within a week of ``now``), else ``2026-12-24 19:00``."""
    if when - now < timedelta(days=6):
        return f"{DAY_NAMES[when.weekday()]} {when:%H:%M}"
    return f"{when:%Y-%m-%d %H:%M}"


def paused_note(schedule: Schedule, now: datetime) -> str | None:
    """``paused until Mon 19:00 (schedule)`` while ``schedule`` is closed at ``now``; None
    while it is open."""
    if schedule.is_open(now):
        return None
    opens = schedule.next_open(now)
    until = "the next window" if opens is None else describe(opens, now)
    return f"paused until {until} (schedule)"


def window_note(schedule: Schedule, now: datetime) -> str:
    """What ``stowd check-config`` says of a destination's windows at ``now``: ``always``,
    ``open now, until Tue 07:00`` or ``closed now, next window Mon 19:00-Tue 07:00``."""
    if schedule.always:
        return "always (no schedule)"
    closes = schedule.next_close(now)
    if schedule.is_open(now):
        return "open now" + ("" if closes is None else f", until {describe(closes, now)}")
    opens = schedule.next_open(now)
    if opens is None:
        return "closed now, no window within a week"
    ends = schedule.next_close(opens)
    span = describe(opens, now) + ("" if ends is None else f" to {describe(ends, now)}")
    return f"closed now, next window {span}"
