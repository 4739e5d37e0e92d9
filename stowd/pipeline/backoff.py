"""How long stowd waits before it tries again: the retry policy, in tenacity's style.

A file that could not be sent waits ``retry.initial``, grown by ``retry.multiplier`` per failed
try up to ``retry.maximum``, with jitter (between half of that and all of it) so that files and
workers that failed together do not come back together.  A destination that refused stowd's
credentials is probed again after ``retry.hold_probe``, grown the same way; an archive's
``Retry-After`` is followed, up to ``retry.maximum``.  A file older than ``retry.max_age`` is
not tried again.  These waits are kept in the queue, so they survive restarts.

The capped exponential is tenacity's ``wait_exponential`` (the same formula, and the same
answer, ``maximum``, when a long outage overflows it); tenacity has no jitter that scales the
wait into its upper half (``wait_random_exponential`` draws from the whole of it,
``wait_exponential_jitter`` adds to it), so ``UpperHalfJitter`` is that, as a tenacity wait.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import tenacity
from tenacity.wait import wait_base

from stowd.config.model import Retry
from stowd.errors import DestinationBusy, DestinationHeld, StowFailure

QUEUE_RETRY_FIRST = 1.0  # a queue that cannot be written is tried again after this,
QUEUE_RETRY_MAX = 30.0  # doubled per failure up to this


class UpperHalfJitter(wait_base):
    """``wait``, scaled by a random factor between 1/2 and 1 (drawn from ``rng``)."""

    def __init__(self, wait: wait_base, rng: Callable[[], float] = random.random) -> None:
        self.wait = wait
        self.rng = rng

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        return self.wait(retry_state) * (0.5 + self.rng() / 2)


@dataclass(frozen=True)
class RetryPolicy:
    """The waits of ``retry`` (config), as tenacity waits; see the module's docstring."""

    retry: Retry
    rng: Callable[[], float] = field(default=random.random, compare=False)

    def next_delay(self, failures: int) -> float:
        """How long a file waits after ``failures`` failed tries (0: the first one)."""
        return self._wait(self.retry.initial, failures)

    def hold_delay(self, failure: StowFailure, failures: int) -> float:
        """How long a destination is held after ``failure``, its ``failures``-th in a row
        (0: the first): its ``Retry-After``; a refusal of the credentials is probed again
        from ``retry.hold_probe`` on, anything else from ``retry.initial`` on."""
        if isinstance(failure, DestinationBusy) and failure.retry_after is not None:
            return min(failure.retry_after, self.retry.maximum)
        if isinstance(failure, DestinationHeld):
            return self._wait(self.retry.hold_probe, failures)
        return self.next_delay(failures)

    def too_old(self, age: float) -> bool:
        """A file first tried ``age`` seconds ago is not tried again."""
        return age > self.retry.max_age

    def _wait(self, base: float, failures: int) -> float:
        """``base`` grown by the multiplier per failure, capped, with jitter."""
        grown = tenacity.wait_exponential(
            multiplier=base, max=self.retry.maximum, exp_base=self.retry.multiplier
        )
        state = tenacity.RetryCallState(_RETRYING, None, (), {})
        state.attempt_number = failures + 1  # tenacity counts attempts from 1
        return UpperHalfJitter(grown, self.rng)(state)


def queue_write_delay(failures: int) -> float:
    """How long a worker waits after its ``failures``-th failed write to the queue in a row
    (from 1): doubled per failure, capped, without jitter."""
    return float(min(QUEUE_RETRY_FIRST * 2 ** (failures - 1), QUEUE_RETRY_MAX))


_RETRYING = tenacity.Retrying()  # only to build the state tenacity's waits read
