"""Review of the rate cap (``max_rate``, issue 20): a low cap must not starve a request's
connection (an archive drops a request whose body stops arriving for a while), and a rate
too large for a number is a config error."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import pytest
from conftest import require_orthanc
from harness import Layout, Stowd, make_layout, wait_for
from orthanc import Orthanc
from test_pacing import FakeTime
from test_ratecap import drop, set_destination

from stowd.config.yamlwalk import parse_rate
from stowd.dicomweb.pacing import BURST_SECONDS

# Orthanc's HttpRequestTimeout: it drops a request whose body's next bytes do not come
# within about twice this many seconds (measured: a 4 s gap passed at 3, failed at 2)
ARCHIVE_PATIENCE = 2


def test_a_low_cap_hands_on_bytes_every_tenth_of_a_second() -> None:
    """At 2 kbit/s (250 bytes/s) slices of 8 KiB came 33 s apart (times the workers sharing
    the cap): longer than Orthanc (30 s) waits for a body's next bytes."""
    fake = FakeTime()
    bucket = fake.bucket(250.0)
    at = [fake.now]
    for part in bucket.paced([b"x" * 20_000], threading.Event()):
        assert len(part) <= 250 * BURST_SECONDS
        at.append(fake.now)
    gaps = [b - a for a, b in itertools.pairwise(at)]
    assert max(gaps) <= BURST_SECONDS + 1e-9


def test_a_low_cap_does_not_make_the_archive_drop_the_request(tmp_path: Path) -> None:
    """A real Orthanc that waits 2 to 4 s for a body's next bytes (``ARCHIVE_PATIENCE``; 30 s
    by default) and a cap of 1 kB/s: with slices of 8 KiB the bytes came 8 s apart, Orthanc
    answered every attempt 400 and the file never left the queue; now they come every 0.1 s
    and the file is sent."""
    require_orthanc()
    server = Orthanc(tmp_path / "orthanc", config={"HttpRequestTimeout": ARCHIVE_PATIENCE})
    server.start()
    try:
        layout = make_layout(tmp_path / "run", server.dicomweb_url)
        set_destination(layout, max_rate="1kB/s", workers=1)
        with Stowd(layout) as daemon:
            daemon.wait_started()
            names = drop(layout, [20_000])  # 12 s at the cap (8 KiB go at once)
            wait_for(
                lambda: bool(settled(layout)) or "HTTP 400" in daemon.log,
                120,
                "the file settled, or Orthanc's refusal",
                lambda: daemon.log,
            )
            assert daemon.terminate() == 0
        assert layout.files(layout.sent) == names
        assert "HTTP 400" not in daemon.log
    finally:
        server.kill()


def settled(layout: Layout) -> set[str]:
    return layout.files(layout.sent) | layout.files(layout.failed)


@pytest.mark.parametrize("text", ["1" + "0" * 400 + " B/s", "9" * 320 + "MB/s"])
def test_a_rate_too_large_for_a_number_is_refused(text: str) -> None:
    """Python reads a number of 309 digits or more as infinity: no cap at all, shown as
    'inf GB/s' in the log and +Inf in the metrics."""
    with pytest.raises(ValueError, match="too large"):
        parse_rate(text)


def test_a_rate_with_an_exponent_is_refused_as_such() -> None:
    """'1e3MB/s' was reported as an unknown unit 'e3MB/s', a unit the user never wrote."""
    with pytest.raises(ValueError, match="without an exponent") as caught:
        parse_rate("1e3MB/s")
    assert "'e3MB/s'" not in str(caught.value)
