"""The retry policy: the waits of a file and of a held destination (no archive needed)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from stowd.config.model import Retry
from stowd.errors import DestinationBusy, DestinationHeld, StowFailure
from stowd.pipeline.backoff import RetryPolicy, queue_write_delay


def capped(base: float, multiplier: float, maximum: float, failures: int) -> float:
    """The wait before jitter, as the worker computed it before the policy had a module."""
    try:
        return min(base * multiplier**failures, maximum)
    except OverflowError:
        return maximum


def always(draw: float) -> Callable[[], float]:
    """A random source that always draws ``draw``."""
    return lambda: draw


def fixed(draw: float) -> RetryPolicy:
    return RetryPolicy(Retry(initial=10.0, maximum=3600.0, multiplier=2.0), rng=always(draw))


@pytest.mark.parametrize(
    ("initial", "multiplier", "maximum"),
    [(10.0, 2.0, 3600.0), (0.2, 1.5, 0.4), (0.5, 1.0, 2.0), (7.3, 9.7, 86400.0), (1.0, 3.0, 1e6)],
)
def test_a_files_wait_grows_to_the_maximum_with_jitter_in_its_upper_half(
    initial: float, multiplier: float, maximum: float
) -> None:
    retry = Retry(initial=initial, maximum=maximum, multiplier=multiplier)
    for draw, failures in itertools.product((0.0, 0.25, 0.999), range(0, 1200, 7)):
        policy = RetryPolicy(retry, rng=always(draw))
        expected = capped(initial, multiplier, maximum, failures) * (0.5 + draw / 2)
        assert policy.next_delay(failures) == expected


def test_a_held_destination_waits_its_retry_after_or_the_probe_interval() -> None:
    policy = RetryPolicy(Retry(initial=10.0, maximum=3600.0, hold_probe=60.0), rng=lambda: 1.0)
    assert policy.hold_delay(DestinationBusy("busy", retry_after=120.0), 5) == 120.0
    assert policy.hold_delay(DestinationBusy("busy", retry_after=1e9), 0) == 3600.0
    assert policy.hold_delay(DestinationHeld("401"), 0) == 60.0
    assert policy.hold_delay(DestinationHeld("401"), 2) == 240.0
    assert policy.hold_delay(StowFailure("down", status=500), 2) == 40.0
    assert fixed(0.0).next_delay(0) == 5.0 and fixed(1.0).next_delay(0) == 10.0


def test_a_file_older_than_max_age_is_not_tried_again() -> None:
    policy = RetryPolicy(Retry(max_age=100.0))
    assert not policy.too_old(100.0) and policy.too_old(100.5)


def test_a_queue_that_cannot_be_written_is_tried_again_sooner_than_later() -> None:
    assert [queue_write_delay(n) for n in range(1, 8)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
