"""The rate cap (``max_rate``, issue 20): its parsing and config errors, the token bucket of
``stowd/dicomweb/pacing.py`` on a fake clock (no real time passes), a paced ``Body``, and a
``StowClient`` whose paced upload ends at once when stowd stops (against a real local HTTP
server).  The daemon's measured rates are in test_ratecap.py."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from localserver import LocalServer
from test_config import MINIMAL, load_text

from stowd.config.model import Destination
from stowd.config.yamlwalk import parse_rate
from stowd.dicomweb.pacing import (
    BURST_SECONDS,
    MIN_SLICE,
    WAIT_SLICE,
    Bucket,
    Buckets,
    Pacing,
    rate_text,
)
from stowd.dicomweb.stow import StowClient
from stowd.dicomweb.stowbody import CHUNK, Body, Part
from stowd.errors import ConfigError, DestinationBusy, Stopping

MB = 1_000_000


class FakeTime:
    """A clock that moves only when the bucket waits: each wait moves it by its seconds."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.waits: list[float] = []
        self._lock = threading.Lock()

    def clock(self) -> float:
        with self._lock:
            return self.now

    def wait(self, halt: threading.Event, seconds: float) -> bool:
        with self._lock:
            self.waits.append(seconds)
            self.now += seconds
        return halt.is_set()

    def bucket(self, rate: float | None) -> Bucket:
        return Bucket(rate, clock=self.clock, wait=self.wait)


# -- parsing ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("50Mbit/s", 50e6 / 8),
        ("50 Mbps", 50e6 / 8),
        ("1Gbit/s", 1e9 / 8),
        ("800kbit/s", 100e3),
        ("800 Kbit/s", 100e3),
        ("10MB/s", 10e6),
        ("1.5 GB/s", 1.5e9),
        ("250kB/s", 250e3),
        ("250KB/s", 250e3),
        ("500KiB/s", 500 * 1024),
        ("2MiB/s", 2 * 1024 * 1024),
        ("1GiB/s", 1024**3),
        ("100B/s", 100.0),
    ],
)
def test_a_rate_is_read_in_bytes_per_second(text: str, rate: float) -> None:
    assert parse_rate(text) == pytest.approx(rate)


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("0MB/s", "must be more than 0, got '0MB/s'"),
        ("-5MB/s", "must be more than 0, got '-5MB/s'"),
        (100, "a unit is required"),
        ("100", "a unit is required"),
        ("10 Mb/s", "write Mbit/s for bits or MB/s for bytes"),
        ("10mbit/s", "did you mean Mbit/s?"),
        ("10 MiB", "unknown unit 'MiB'"),
        ("fast", "expected a rate with its unit"),
        (True, "expected a rate with its unit"),
    ],
)
def test_a_rate_without_a_known_unit_or_above_0_is_refused(value: object, said: str) -> None:
    with pytest.raises(ValueError, match=said.replace("?", r"\?")):
        parse_rate(value)


def test_a_bad_max_rate_is_a_config_error_naming_file_key_and_line(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        "    url: http://127.0.0.1:8042/dicom-web\n",
        "    url: http://127.0.0.1:8042/dicom-web\n    max_rate: 0Mbit/s\n",
    )
    assert text != MINIMAL
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, text)
    (problem,) = caught.value.problems
    line = text.splitlines().index("    max_rate: 0Mbit/s") + 1
    assert (problem.key, problem.line) == ("destinations.pacs.max_rate", line)
    assert "must be more than 0" in problem.message
    assert str(tmp_path) in caught.value.path


def test_every_bad_max_rate_is_reported_at_once(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        "    url: http://127.0.0.1:8042/dicom-web\n",
        "    url: http://127.0.0.1:8042/dicom-web\n    max_rate: 100\n"
        "  other:\n    url: http://127.0.0.1:8042/dicom-web\n    max_rate: 5 furlongs/s\n",
    )
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, text)
    said = {p.key: p.message for p in caught.value.problems}
    assert "a unit is required" in said["destinations.pacs.max_rate"]
    assert "unknown unit 'furlongs/s'" in said["destinations.other.max_rate"]


def test_max_rate_is_read_into_the_destination(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        "    url: http://127.0.0.1:8042/dicom-web\n",
        "    url: http://127.0.0.1:8042/dicom-web\n    max_rate: 40Mbit/s\n",
    )
    config = load_text(tmp_path, text)
    assert config.destinations["pacs"].max_rate == 5 * MB
    assert load_text(tmp_path, MINIMAL).destinations["pacs"].max_rate is None


def test_a_rate_is_shown_in_bytes_and_bits() -> None:
    assert rate_text(50e6 / 8) == "6.25 MB/s (50 Mbit/s)"
    assert rate_text(512 * 1024) == "524.3 kB/s (4.194 Mbit/s)"


# -- the bucket -----------------------------------------------------------------------------------
def test_the_bucket_holds_a_tenth_of_a_second_or_the_least_slice() -> None:
    fake = FakeTime()
    assert fake.bucket(4 * MB).capacity == 4 * MB * BURST_SECONDS
    assert fake.bucket(4 * MB).slice == CHUNK  # no more than a body piece
    assert fake.bucket(1 * MB).slice == MB * BURST_SECONDS
    assert fake.bucket(10_000).capacity == MIN_SLICE
    assert fake.bucket(None).slice is None


def test_bytes_taken_follow_the_rate_after_the_first_burst() -> None:
    fake = FakeTime()
    bucket = fake.bucket(4 * MB)
    start = fake.now
    halt = threading.Event()
    taken = 0
    for _ in range(200):
        bucket.take(CHUNK, halt)
        taken += CHUNK
        assert taken <= 4 * MB * (fake.now - start) + bucket.capacity + 1  # not ahead of the cap
    assert taken == pytest.approx(4 * MB * (fake.now - start) + bucket.capacity, rel=1e-9)


def test_a_wait_is_cut_into_slices_that_each_tell_progress() -> None:
    fake = FakeTime()
    bucket = fake.bucket(10_000)  # 10 kB/s: a full 8 KiB bucket refills in 0.8 s
    halt = threading.Event()
    alive: list[float] = []
    bucket.take(MIN_SLICE, halt)  # the full bucket
    bucket.take(MIN_SLICE, halt, lambda: alive.append(fake.now))
    assert fake.waits and max(fake.waits) <= WAIT_SLICE
    assert len(alive) == len(fake.waits)  # after every wait
    assert sum(fake.waits) == pytest.approx(MIN_SLICE / 10_000)


def test_a_wait_ends_with_stopping_when_halted() -> None:
    fake = FakeTime()
    bucket = fake.bucket(1000)
    halt = threading.Event()
    bucket.take(MIN_SLICE, halt)
    halt.set()
    with pytest.raises(Stopping):
        bucket.take(MIN_SLICE, halt)
    assert fake.waits == [WAIT_SLICE]  # one slice of waiting, not the 8 s the bytes need


def test_a_full_bucket_lets_bytes_go_even_when_halted() -> None:
    """Halting ends waits only: what may go now goes (a stop is no reason to fail earlier)."""
    fake = FakeTime()
    halt = threading.Event()
    halt.set()
    fake.bucket(4 * MB).take(CHUNK, halt)
    assert fake.waits == []


def test_a_new_rate_applies_to_the_next_slice() -> None:
    fake = FakeTime()
    bucket = fake.bucket(1 * MB)
    halt = threading.Event()
    bucket.take(int(bucket.capacity), halt)  # empty now
    bucket.set_rate(4 * MB)
    start = fake.now
    bucket.take(200_000, halt)
    assert fake.now - start == pytest.approx(200_000 / (4 * MB))


def test_no_cap_any_more_lets_every_byte_go_at_once() -> None:
    fake = FakeTime()
    bucket = fake.bucket(1000)
    halt = threading.Event()
    bucket.set_rate(None)
    bucket.take(10 * MB, halt)
    assert fake.waits == []


def test_a_slice_larger_than_a_lowered_cap_goes_when_the_bucket_is_full() -> None:
    """A slice cut at the old rate, taken after the cap was lowered, does not wait forever:
    it goes once the bucket is full, and the excess is paid by the next slices."""
    fake = FakeTime()
    bucket = fake.bucket(4 * MB)
    halt = threading.Event()
    bucket.set_rate(100_000)  # capacity 10 kB
    start = fake.now
    bucket.take(CHUNK, halt)
    bucket.take(MIN_SLICE, halt)
    assert fake.now - start == pytest.approx((CHUNK + MIN_SLICE - 10_000) / 100_000)


def test_a_rate_is_more_than_0() -> None:
    with pytest.raises(ValueError):
        Bucket(0.0)


def test_workers_sharing_a_bucket_stay_under_the_cap_together() -> None:
    fake = FakeTime()
    bucket = fake.bucket(1 * MB)
    halt = threading.Event()
    start = fake.now
    taken: list[int] = []

    def send() -> None:
        for _ in range(40):
            bucket.take(50_000, halt)
            taken.append(50_000)

    threads = [threading.Thread(target=send) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(taken) == 160
    assert sum(taken) <= 1 * MB * (fake.now - start) + bucket.capacity + len(taken)


def test_paced_pieces_come_in_slices_of_the_same_bytes() -> None:
    fake = FakeTime()
    bucket = fake.bucket(100_000)  # slices of 10 kB
    pieces = [bytes(range(256)) * 1024, b"x" * 5]
    out = list(bucket.paced(pieces, threading.Event()))
    assert b"".join(out) == b"".join(pieces)
    assert max(len(p) for p in out) == 10_000
    assert fake.now - 1000.0 == pytest.approx((sum(map(len, pieces)) - 10_000) / 100_000)


def test_the_buckets_of_a_daemon_keep_one_per_destination_across_configs() -> None:
    buckets = Buckets()
    first = {
        "pacs": Destination("pacs", "http://a", max_rate=1e6),
        "b": Destination("b", "http://b"),
    }
    assert buckets.configure(first) == {"pacs": None}  # the one whose rate changed
    bucket = buckets.of("pacs")
    assert buckets.configure({"pacs": Destination("pacs", "http://a", max_rate=2e6)}) == {
        "pacs": 1e6
    }
    assert buckets.of("pacs") is bucket and bucket.rate == 2e6
    assert buckets.configure({"pacs": Destination("pacs", "http://a")}) == {"pacs": 2e6}
    assert bucket.rate is None
    assert buckets.of("b").rate is None


# -- a paced body -------------------------------------------------------------------------------
@pytest.fixture
def part(tmp_path: Path) -> Part:
    path = tmp_path / "big.dcm"
    path.write_bytes(bytes(range(256)) * 4096)  # 1 MiB: content does not matter here
    return Part(str(path), path.stat().st_size, "1.2.3")


def test_a_paced_body_is_the_same_bytes_and_tells_progress_while_it_waits(part: Part) -> None:
    fake = FakeTime()
    plain = Body([part])
    plain.boundary = "b"
    plain.open()
    alive: list[float] = []
    paced = Body([part], lambda: alive.append(fake.now), Pacing(fake.bucket(MB), threading.Event()))
    paced.boundary = "b"
    paced.open()
    try:
        assert b"".join(paced) == b"".join(plain)
    finally:
        plain.close()
        paced.close()
    assert max(fake.waits) <= WAIT_SLICE and paced.sent_at is not None
    waited = sum(fake.waits)
    assert waited == pytest.approx((paced.length - MB * BURST_SECONDS) / MB)
    assert len(alive) >= len(fake.waits)  # every wait told, and every chunk read


class _Reader(BaseHTTPRequestHandler):
    """Reads whatever body comes, then answers 200 with an empty Store Instances Response
    (never reached here: the client stops before the body ends)."""

    def do_POST(self) -> None:
        left = int(self.headers["Content-Length"])
        while left:
            data = self.rfile.read(min(65536, left))
            if not data:
                return
            left -= len(data)
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *_args: Any) -> None:
        pass


def test_a_paced_upload_ends_at_once_when_stowd_stops(part: Part) -> None:
    """Through httpx to a real server: the wait for the cap raises ``Stopping`` inside the
    body, and the client says the destination is busy because stowd stops (the worker then
    puts the files back in the queue)."""
    halt = threading.Event()
    halt.set()  # stowd is stopping: the first slice (a full bucket) goes, then no wait
    bucket = Bucket(1000.0)  # 1 kB/s: the rest of the 1 MiB body would take 17 minutes
    with LocalServer(_Reader) as server:
        client = StowClient(
            Destination("pacs", f"{server.url}/dicom-web"), pacing=Pacing(bucket, halt)
        )
        try:
            with pytest.raises(DestinationBusy, match="stowd is shutting down") as caught:
                client.store([part])
            assert isinstance(caught.value.__cause__, Stopping)
        finally:
            client.close()
