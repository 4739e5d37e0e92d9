"""A destination's rate cap (``max_rate``): a token bucket that the bytes of its STOW bodies
take from as they stream.

One ``Bucket`` per destination name, shared by all its workers (``Buckets`` keeps them across
reloads, so a new cap applies at once to the uploads in flight).  The bucket holds at most
``BURST_SECONDS`` of the rate (at least ``MIN_SLICE``), so the rate over any second is close
to the cap; a body is handed on in slices of ``BURST_SECONDS`` of the rate (``Bucket.slice``),
so a low cap sends smoothly rather than a 256 KiB piece now and then, and an archive never
waits long for the next bytes of a request.

A wait for tokens lasts at most ``WAIT_SLICE`` at a time: between two, the upload's progress
callback is called (the daemon's watchdog sees the sender alive) and the ``halt`` event is
looked at, so a wait ends within ``WAIT_SLICE`` when stowd stops (``Stopping``; ``stow.py``
makes it ``DestinationBusy``).  The clock and the wait are injectable (tests run without
real time).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from stowd.config.model import Destination
from stowd.errors import Stopping

BURST_SECONDS = 0.1  # the bucket holds this much of the rate (the largest burst)
MIN_SLICE = 8 * 1024  # bytes: the least burst (the bucket's least capacity)
MAX_SLICE = 256 * 1024  # bytes: a body piece is at most this (stowbody.CHUNK)
WAIT_SLICE = 0.25  # seconds: the longest single wait (progress told, stop looked at)
_ROUNDING = 1.0  # bytes: a shortfall this small is float rounding (a wait for it may not
# move the clock at all)

Wait = Callable[[threading.Event, float], bool]  # (halt, seconds) -> halted


def _wait(halt: threading.Event, seconds: float) -> bool:
    return halt.wait(seconds)


class Bucket:
    """The tokens (bytes) a destination may send now; ``rate`` None: no cap.  Thread-safe."""

    def __init__(
        self,
        rate: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wait: Wait = _wait,
    ) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._wait = wait
        self._rate: float | None = None
        self._tokens = 0.0
        self._at = clock()
        self.set_rate(rate)

    @property
    def rate(self) -> float | None:
        """Bytes per second, or None (no cap)."""
        return self._rate

    @property
    def capacity(self) -> float:
        """The most tokens the bucket holds: the largest burst (0 without a cap)."""
        rate = self._rate
        return 0.0 if rate is None else max(rate * BURST_SECONDS, MIN_SLICE)

    @property
    def slice(self) -> int | None:
        """The largest slice of a body handed on at once (None: no cap, as it comes): what
        the rate allows in ``BURST_SECONDS`` (at least a byte), so that at a low cap too a
        connection waits at most that long for its next bytes (times the workers waiting
        with it).  An archive drops a request whose body stops arriving for a while
        (Orthanc after 30 s, nginx after 60 s): slices of 8 KiB at 2 kbit/s came 33 s apart."""
        rate = self._rate
        if rate is None:
            return None
        return int(min(max(rate * BURST_SECONDS, 1), MAX_SLICE))

    def set_rate(self, rate: float | None) -> None:
        """A new cap (None: none), for the uploads in flight too; a bucket that had no cap
        starts full."""
        if rate is not None and not rate > 0:
            raise ValueError(f"a rate must be more than 0 bytes/s, got {rate}")
        with self._lock:
            self._refill()
            was, self._rate = self._rate, rate
            self._tokens = self.capacity if was is None else min(self._tokens, self.capacity)

    def take(self, n: int, halt: threading.Event, alive: Callable[[], None] | None = None) -> None:
        """Wait until ``n`` bytes may go, and take them; ``alive`` is called after every wait.
        Raises ``Stopping`` when ``halt`` is set while it waits."""
        while True:
            seconds = self._try(n)
            if seconds <= 0:
                return
            if self._wait(halt, min(seconds, WAIT_SLICE)):
                raise Stopping("stopping: stowd is shutting down")
            if alive is not None:
                alive()

    def _try(self, n: int) -> float:
        """Take ``n`` tokens (0), or the seconds until there are enough."""
        with self._lock:
            rate = self._rate
            if rate is None:
                return 0.0
            self._refill()
            # at most a full bucket is waited for: a slice cut before the cap was lowered
            # goes when the bucket is full, and its excess is a debt paid by later slices
            need = min(float(n), self.capacity)
            if self._tokens >= need - _ROUNDING:
                self._tokens -= n
                return 0.0
            return (need - self._tokens) / rate

    def _refill(self) -> None:
        now = self._clock()
        if self._rate is not None:
            gained = (now - self._at) * self._rate
            self._tokens = min(self.capacity, self._tokens + gained)
        self._at = now

    def paced(
        self,
        pieces: Iterable[bytes],
        halt: threading.Event,
        alive: Callable[[], None] | None = None,
    ) -> Iterator[bytes]:
        """``pieces`` in slices of at most ``slice`` bytes, each once its tokens are taken."""
        for piece in pieces:
            at = 0
            while at < len(piece):
                size = self.slice or len(piece) - at
                part = piece if size >= len(piece) and at == 0 else piece[at : at + size]
                self.take(len(part), halt, alive)
                at += len(part)
                yield part


@dataclass(frozen=True)
class Pacing:
    """What a ``StowClient`` paces its bodies with: the destination's bucket, and the event
    that ends a wait because stowd stops (not a reload: uploads in flight go on then)."""

    bucket: Bucket
    halt: threading.Event


class Buckets:
    """The bucket of each destination name, kept for the life of the process (a reload
    changes the rate of the existing one; see ``configure``).  Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._found: dict[str, Bucket] = {}

    def of(self, name: str) -> Bucket:
        with self._lock:
            bucket = self._found.get(name)
            if bucket is None:
                bucket = self._found[name] = Bucket()
            return bucket

    def configure(self, destinations: Mapping[str, Destination]) -> dict[str, float | None]:
        """Give each destination's bucket its ``max_rate``; the changed ones, name -> the
        rate before (a destination no longer configured keeps its bucket as it is, for an
        upload of the old config still in flight)."""
        changed: dict[str, float | None] = {}
        for name, dest in destinations.items():
            bucket = self.of(name)
            if bucket.rate != dest.max_rate:
                changed[name] = bucket.rate
                bucket.set_rate(dest.max_rate)
        return changed


def rate_text(rate: float) -> str:
    """A rate in bytes/s for a log line: ``6.25 MB/s (50 Mbit/s)``."""
    return f"{_scaled(rate, 'B/s')} ({_scaled(rate * 8, 'bit/s')})"


def _scaled(value: float, unit: str) -> str:
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.4g} {prefix}{unit}"
    return f"{value:.4g} {unit}"
