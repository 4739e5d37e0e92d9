"""Adaptive concurrency (issue 20): the AIMD limit of a destination, with no clock at all (a
round is counted in requests), and the seats its workers take on the wire before they claim."""

from __future__ import annotations

import httpx
import pytest

from stowd.config.model import Destination
from stowd.dicomweb.httperrors import QuickRetry, failure
from stowd.errors import (
    AnswerTooSlow,
    ConnectionDropped,
    DestinationBusy,
    DestinationHeld,
    TimedOut,
)
from stowd.pipeline.concurrency import Change, Concurrency, Limits, eased, overload
from stowd.pipeline.wire import Wire

BUSY_429 = DestinationBusy("busy", status=429)


def test_an_overloaded_archive_halves_the_limit_rounded_up_down_to_one() -> None:
    limit = Concurrency(5)
    seen = []
    for _ in range(4):
        limit.overloaded(limit.ticket())
        seen.append(limit.limit)
    assert seen == [3, 2, 1, 1]


def test_the_requests_of_one_overloaded_moment_lower_it_once() -> None:
    limit = Concurrency(4)
    tickets = [limit.ticket() for _ in range(4)]  # four requests in flight together
    assert limit.overloaded(tickets[0]) == Change(4, 2)
    assert [limit.overloaded(t) for t in tickets[1:]] == [None, None, None]
    assert limit.limit == 2
    assert limit.overloaded(limit.ticket()) == Change(2, 1)  # a request begun at 2: again


def test_a_round_of_successes_at_the_limit_raises_it_by_one_up_to_workers() -> None:
    limit = Concurrency(4)
    limit.overloaded(limit.ticket())
    limit.overloaded(limit.ticket())
    assert limit.limit == 1
    raised = []
    for _ in range(20):
        change = limit.succeeded(limit.ticket())
        if change is not None:
            raised.append(change)
    # one success at 1, two at 2, three at 3; never above workers
    assert raised == [Change(1, 2, 1), Change(2, 3, 2), Change(3, 4, 3)]
    assert limit.limit == 4


def test_successes_of_requests_begun_before_a_change_do_not_count() -> None:
    limit = Concurrency(4)
    old = [limit.ticket() for _ in range(3)]
    limit.overloaded(limit.ticket())  # 4 -> 2
    assert all(limit.succeeded(t) is None for t in old)  # begun at 4: not this round's
    assert limit.succeeded(limit.ticket()) is None
    assert limit.succeeded(limit.ticket()) == Change(2, 3, 2)


def test_a_busy_answer_starts_the_round_of_successes_again() -> None:
    limit = Concurrency(4)
    limit.overloaded(limit.ticket())  # 2
    first = limit.ticket()
    stale = Concurrency(4).ticket()  # a ticket of no round of this limit
    assert limit.succeeded(first) is None  # one of two
    limit.overloaded(stale)  # not counted as a decrease (begun before it), but no success
    assert limit.limit == 2
    assert limit.succeeded(limit.ticket()) is None  # one of two again
    assert limit.succeeded(limit.ticket()) == Change(2, 3, 2)


def test_not_adaptive_never_moves() -> None:
    limit = Concurrency(4, adaptive=False)
    assert limit.overloaded(limit.ticket()) is None
    assert limit.succeeded(limit.ticket()) is None
    assert limit.limit == 4


def test_a_reload_keeps_what_was_learnt_within_the_new_workers() -> None:
    limits = Limits()
    pacs = Destination("pacs", "http://pacs/dicom-web", workers=8)
    first = limits.of(pacs)
    first.overloaded(first.ticket())
    assert first.limit == 4
    again = limits.of(pacs)  # the same config again (SIGHUP)
    assert again is first and again.limit == 4
    assert limits.of(Destination("pacs", "http://pacs/dicom-web", workers=2)).limit == 2
    assert limits.snapshot() == {"pacs": {"limit": 2, "workers": 2}}
    off = Destination("pacs", "http://pacs/dicom-web", workers=2, adaptive=False)
    assert limits.of(off).limit == 2 and limits.snapshot() == {}


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (BUSY_429, "the archive is busy (429)"),
        (DestinationBusy("busy", status=503), "the archive is busy (503)"),
        (
            DestinationBusy("busy", status=502, retry_after=30.0),
            "the archive asked to wait (HTTP 502, Retry-After)",
        ),
        (TimedOut("timed out (ReadTimeout)"), "a request timed out"),
        (DestinationBusy("busy", status=502), None),
        (DestinationBusy("busy", status=500), None),
        (ConnectionDropped("dropped"), None),
        (DestinationHeld("refused", status=401), None),
        (DestinationBusy("cannot connect: refused"), None),
    ],
)
def test_what_counts_as_an_overloaded_archive(error: DestinationBusy, said: str | None) -> None:
    assert overload(error) == said


def test_only_a_429_or_503_without_retry_after_is_eased() -> None:
    assert eased(BUSY_429)
    assert eased(DestinationBusy("busy", status=503))
    assert not eased(DestinationBusy("busy", status=429, retry_after=5.0))
    assert not eased(TimedOut("timed out"))
    assert not eased(DestinationBusy("busy", status=502))


@pytest.mark.parametrize(
    "exc",
    [httpx.ReadTimeout("slow"), httpx.WriteTimeout("slow"), httpx.ConnectTimeout("slow")],
)
def test_a_timeout_becomes_timed_out(exc: httpx.TimeoutException) -> None:
    found = failure(exc, has_cert=False)
    assert isinstance(found, QuickRetry) and isinstance(found.failure, TimedOut)


def test_an_answer_past_its_deadline_is_timed_out() -> None:
    found = failure(AnswerTooSlow("the archive's answer was still arriving"), has_cert=False)
    assert isinstance(found, TimedOut)


def test_workers_above_the_limit_get_no_seat() -> None:
    limit = Concurrency(4)
    wire = Wire(limit)
    seats = [wire.seat() for _ in range(5)]
    assert [s is not None for s in seats] == [True] * 4 + [False]
    first = seats[0]
    assert first is not None
    limit.overloaded(first)  # 4 -> 2: the four seats stay until their requests end
    wire.unseat()
    wire.unseat()
    assert wire.seat() is None  # two still taken, the limit is 2
    wire.unseat()
    assert wire.seat() is not None


def test_a_wire_without_a_limit_seats_every_worker() -> None:
    wire = Wire()
    assert all(wire.seat() is not None for _ in range(100))
