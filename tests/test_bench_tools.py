"""The pure logic of the benchmark tools (issue 19): the link emulator's pacing
(bench/linkproxy.py ``Link``), the fast discarding endpoint's reading of a STOW-RS body
and its answer (bench/stowparse.py, bench/discard.py), and the link cases and targets of
bench/throughput.py.  No sockets, no clock: the times are
given, so nothing here depends on the machine's speed."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest
from dicomgen import make_instance_bytes

from stowd.dicomweb.stowanswer import parse_answer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from discard import boundary_of, store_answer
from linkproxy import Link, parse_delay, parse_rate, parse_size
from stowparse import PartReader
from throughput import Row, link_cases, link_targets, parse_args

from stowd.config.model import DEFAULT_BATCH_FILES, DEFAULT_WORKERS

RATE = 25e6  # 200 Mbit/s in bytes per second
DELAY = 0.010
CHUNK = 64 * 1024


def test_units() -> None:
    assert parse_rate("200Mbit") == RATE
    assert parse_rate("25MB") == RATE
    assert parse_rate("1Gbit/s") == 125e6
    assert parse_delay("10ms") == DELAY
    assert parse_delay("0.5") == 0.5
    assert parse_size("64KiB") == CHUNK
    assert parse_size("500KB") == 500_000
    with pytest.raises(ValueError):
        parse_rate("fast")


def test_an_idle_link_adds_only_the_delay() -> None:
    link = Link(RATE, DELAY, burst=CHUNK)
    assert link.send(CHUNK, now=100.0) == pytest.approx(100.0 + DELAY)
    assert link.send(200, now=200.0) == pytest.approx(200.0 + DELAY)


def test_without_burst_a_chunk_arrives_once_serialized_plus_the_delay() -> None:
    link = Link(RATE, DELAY)
    assert link.send(CHUNK, now=1.0) == pytest.approx(1.0 + CHUNK / RATE + DELAY)


def test_the_delay_is_latency_not_a_limit_on_the_rate() -> None:
    """100 chunks handed over at once arrive spread over their time at the link's rate,
    plus one delay: not one delay per chunk."""
    link = Link(RATE, DELAY)
    arrivals = [link.send(CHUNK, now=0.0) for _ in range(100)]
    assert arrivals[-1] == pytest.approx(100 * CHUNK / RATE + DELAY)
    gaps = {round(b - a, 9) for a, b in itertools.pairwise(arrivals)}
    assert gaps == {round(CHUNK / RATE, 9)}


def test_the_rate_is_shared_by_every_connection_on_the_link() -> None:
    """Two senders handing chunks over alternately get the link's rate between them."""
    link = Link(RATE, DELAY)
    arrivals = [link.send(CHUNK, now=0.0) for _ in range(2) for _ in range(50)]
    assert max(arrivals) == pytest.approx(100 * CHUNK / RATE + DELAY)
    assert link.bytes == 100 * CHUNK


def test_a_sender_faster_than_the_link_waits_once_the_queue_is_full() -> None:
    link = Link(RATE, DELAY, burst=0, queue=500_000)
    now = 0.0
    assert link.wait_before_send(now) == 0.0
    for _ in range(7):  # 458,752 bytes waiting: under the queue's 500 KB
        link.send(CHUNK, now)
    assert link.wait_before_send(now) == 0.0
    link.send(CHUNK, now)  # 524,288 bytes waiting
    assert link.wait_before_send(now) == pytest.approx((8 * CHUNK - 500_000) / RATE)
    later = now + link.wait_before_send(now)
    assert link.wait_before_send(later) == pytest.approx(0.0, abs=1e-12)


def test_after_a_pause_the_bucket_lets_a_burst_through_at_once() -> None:
    link = Link(RATE, DELAY, burst=4 * CHUNK)
    for _ in range(40):
        link.send(CHUNK, now=0.0)  # busy until 40 chunks' time
    idle = 10.0
    arrivals = [link.send(CHUNK, now=idle) for _ in range(5)]
    assert arrivals[:4] == [pytest.approx(idle + DELAY)] * 4
    assert arrivals[4] == pytest.approx(idle + CHUNK / RATE + DELAY)


# -- the discarding endpoint's reading ---------------------------------------------------------
BOUNDARY = "b0undary"


def part(data: bytes, kind: str = "application/dicom", length: bool = True) -> bytes:
    head = f"--{BOUNDARY}\r\nContent-Type: {kind}\r\n"
    head += f"Content-Length: {len(data)}\r\n" if length else ""
    return head.encode() + b"\r\n" + data + b"\r\n"


def instances(count: int) -> list[tuple[bytes, str]]:
    return [
        make_instance_bytes(sop_uid=f"1.2.826.0.1.3680043.8.498.19.{n}", size_bytes=70_000)
        for n in range(count)
    ]


def read(body: bytes, piece: int) -> PartReader:
    reader = PartReader(BOUNDARY.encode())
    for at in range(0, len(body), piece):
        reader.feed(body[at : at + piece])
    return reader


@pytest.mark.parametrize("piece", [1, 7, 1000, 65_536, 1 << 20])
@pytest.mark.parametrize("length", [True, False])
def test_each_instance_is_found_however_the_body_arrives(piece: int, length: bool) -> None:
    files = instances(3)
    body = b"".join(part(data, length=length) for data, _ in files)
    body += part(b"not a DICOM file", length=length) + f"--{BOUNDARY}--\r\n".encode()
    reader = read(body, piece)
    assert reader.done
    assert [uid for _, uid in reader.instances] == [uid for _, uid in files]
    assert {cls for cls, _ in reader.instances} == {"1.2.840.10008.5.1.4.1.1.7"}
    assert reader.unreadable == 1


def test_the_instances_of_a_json_metadata_part_are_found() -> None:
    """The metadata + bulkdata form (PS3.18 8.6): a DICOM JSON array, then bulk parts."""
    metadata = [
        {"00080016": {"vr": "UI", "Value": ["1.2.3"]}, "00080018": {"vr": "UI", "Value": [u]}}
        for u in ("1.2.3.4", "1.2.3.5")
    ]
    body = part(json.dumps(metadata).encode(), "application/dicom+json")
    body += part(b"\x00" * 100_000, "application/octet-stream") + f"--{BOUNDARY}--".encode()
    reader = read(body, 4096)
    assert reader.done
    assert reader.instances == [("1.2.3", "1.2.3.4"), ("1.2.3", "1.2.3.5")]
    assert reader.unreadable == 0


def test_a_part_longer_than_its_content_length_is_refused() -> None:
    data, _ = instances(1)[0]
    body = part(data).replace(f"Content-Length: {len(data)}".encode(), b"Content-Length: 100")
    with pytest.raises(ValueError):
        read(body + f"--{BOUNDARY}--".encode(), 1 << 20)


def test_the_answer_is_read_by_stowd_as_every_instance_stored() -> None:
    """What stowd needs to count a file as stored: its SOPInstanceUID in the
    ReferencedSOPSequence of a STOW-RS answer (stowd/dicomweb/stowanswer.py)."""
    files = instances(2)
    reader = read(b"".join(part(d) for d, _ in files) + f"--{BOUNDARY}--".encode(), 1 << 20)
    status, body = store_answer(reader)
    answer = parse_answer(status, body)
    assert status == 200
    assert answer.is_stow
    assert set(answer.referenced) == {uid for _, uid in files}
    assert answer.failed == {}


def test_an_unreadable_part_is_a_failure_without_a_uid() -> None:
    files = instances(1)
    body = part(files[0][0]) + part(b"junk") + f"--{BOUNDARY}--".encode()
    status, answer_body = store_answer(read(body, 1 << 20))
    answer = parse_answer(status, answer_body)
    assert status == 202
    assert set(answer.referenced) == {files[0][1]}
    assert answer.failed == {"": 0xC000}


def test_the_boundary_is_read_quoted_or_not() -> None:
    assert boundary_of('multipart/related; type="application/dicom"; boundary=abc') == b"abc"
    assert boundary_of('multipart/related; boundary="a b"; type="application/dicom"') == b"a b"
    assert boundary_of("application/dicom") is None


def _link_row(sender: str, size: int, where: str, *, workers: int, batch: int, mb_s: float) -> Row:
    files = 100
    row = Row(sender, workers, files, files * size, files * size / (mb_s * 1e6), 1.0, 1.0, None)
    row.where, row.batch, row.size = where, batch, f"{size // 1024}KiB"
    return row


def test_a_full_run_sends_small_files_through_the_link_at_the_defaults() -> None:
    big, small = link_cases(parse_args([]))
    assert (big.size, big.workers, big.batches) == ("512KiB", [1, 2, 4], [10, 50])
    assert (small.size, small.workers, small.batches) == (
        "64KiB",
        [DEFAULT_WORKERS],
        [DEFAULT_BATCH_FILES],
    )
    assert small.files * 64 == big.files * 512  # as many bytes: as long on the link
    assert [c.size for c in link_cases(parse_args(["--link-small-files", "0"]))] == ["512KiB"]


def test_the_link_targets_are_per_file_size_with_the_best_only_where_several_were_measured() -> (
    None
):
    workers, batch = DEFAULT_WORKERS, DEFAULT_BATCH_FILES
    rows = [
        _link_row("curl", 512 * 1024, "orthanc", workers=4, batch=50, mb_s=24.0),
        _link_row("stowd run", 512 * 1024, "orthanc", workers=1, batch=10, mb_s=20.0),
        _link_row("stowd run", 512 * 1024, "orthanc", workers=workers, batch=batch, mb_s=23.0),
        _link_row("stowd run", 64 * 1024, "orthanc", workers=workers, batch=batch, mb_s=20.0),
    ]
    found = {t.name: (t.got, t.met) for t in link_targets(rows, RATE)}
    assert found == {
        f"stowd run through the link to orthanc, 512KiB files, best (workers {workers}, "
        f"batch {batch})": ("0.92 x (23.0 MB/s)", True),
        f"stowd run through the link to orthanc, 512KiB files, defaults (workers {workers}, "
        f"batch {batch})": ("0.92 x (23.0 MB/s)", True),
        f"stowd run through the link to orthanc, 64KiB files, defaults (workers {workers}, "
        f"batch {batch})": ("0.80 x (20.0 MB/s)", False),
    }
