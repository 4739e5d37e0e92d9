"""Prometheus metrics: counters, queue gauges read at scrape time, the HTTP server; real sockets."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from harness import Clock
from prometheus_client.parser import text_string_to_metric_families

from stowd.errors import DestinationBusy, DestinationHeld, FileUnreadable, StowdError
from stowd.pipeline import counters
from stowd.pipeline.queue import Classification, Job, NewFile, Queue, SqliteQueue
from stowd.service import metrics

START = 1_000_000.0


@pytest.fixture
def clock() -> Clock:
    return Clock(START)


def count(name: str, **labels: str) -> float:
    return counters.REGISTRY.get_sample_value(name, labels) or 0.0


def scrape(server: metrics.Server, host: str = "127.0.0.1") -> str:
    where = f"[{host}]" if ":" in host else host
    response = httpx.get(f"http://{where}:{server.port}/metrics", trust_env=False)
    assert response.status_code == 200
    return response.text


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


def claim_one(queue: Queue) -> Job:
    [job] = queue.claim_batch(["pacs"], pick=lambda _d, jobs: jobs[:1], candidates=10, lease=60)
    return job


def fill(queue: Queue, tmp_path: Path, clock: Clock) -> None:
    """pacs (queued at START): 2 pending, 1 waiting, 1 claimed, 1 settling;
    archive (queued 30 s later): 1 pending."""
    pacs = [
        NewFile("src", "pacs", str(tmp_path / f"patient-{n}.dcm"), f"patient-{n}.dcm", 10, 1)
        for n in range(5)
    ]
    assert queue.enqueue(pacs) == 5
    clock.now += 30
    scan = NewFile("scans", "archive", str(tmp_path / "scan.pdf"), "scan.pdf", 5, 1)
    assert queue.enqueue([scan]) == 1
    queue.set_classified(  # each row its own study, so each claim takes one
        [Classification(j, "dicom", f"1.2.{j.id}", f"1.2.{j.id}.1", "1.2") for j in queue.jobs()]
    )
    claim_one(queue)  # stays claimed
    settling = claim_one(queue)
    queue.begin_settle([(settling, "sent", str(tmp_path / "sent" / "x.dcm"), None)])
    waiting = claim_one(queue)
    queue.retry_later([waiting.id], at=clock.now + 600, error={"reason": "busy"})


# -- counters ---------------------------------------------------------------------------------
def test_counters_move_by_the_calls() -> None:
    queued_before = count("stowd_files_queued_total", source="src", destination="pacs")
    sent_before = count("stowd_files_sent_total", source="src", destination="pacs")
    failed_before = count("stowd_files_failed_total", source="src", destination="pacs")
    bytes_before = count("stowd_bytes_sent_total", destination="pacs")

    counters.queued("src", "pacs", 3)
    counters.queued("src", "pacs")
    counters.settled("src", "pacs", "sent", 1000)
    counters.settled("src", "pacs", "sent", 24)
    counters.settled("src", "pacs", "failed", 5000)  # bytes of a failed file do not count

    assert count("stowd_files_queued_total", source="src", destination="pacs") == queued_before + 4
    assert count("stowd_files_sent_total", source="src", destination="pacs") == sent_before + 2
    assert count("stowd_files_failed_total", source="src", destination="pacs") == failed_before + 1
    assert count("stowd_bytes_sent_total", destination="pacs") == bytes_before + 1024


def test_sent_files_with_a_note_are_counted_by_note() -> None:
    labels = {"source": "src", "destination": "pacs"}
    before = {n: count("stowd_files_sent_noted_total", **labels, note=n) for n in counters.NOTES}
    counters.settled("src", "pacs", "sent", 10, "warning")
    counters.settled("src", "pacs", "sent", 10, "already_stored")
    counters.settled("src", "pacs", "sent", 10, "already_stored")
    counters.settled("src", "pacs", "sent", 10)  # stored plainly: no note
    counters.settled("src", "pacs", "failed", 10, "warning")  # only sent files are noted
    after = {n: count("stowd_files_sent_noted_total", **labels, note=n) for n in counters.NOTES}
    assert after["warning"] == before["warning"] + 1
    assert after["already_stored"] == before["already_stored"] + 2


def test_a_batch_of_files_alike_is_counted_at_once() -> None:
    labels = {"source": "src", "destination": "pacs"}
    sent = count("stowd_files_sent_total", **labels)
    noted = count("stowd_files_sent_noted_total", **labels, note="warning")
    failed = count("stowd_files_failed_total", **labels)
    sent_bytes = count("stowd_bytes_sent_total", destination="pacs")
    counters.settled("src", "pacs", "sent", 3000, "warning", n=3)
    counters.settled("src", "pacs", "failed", 7000, n=7)  # bytes of failed files do not count
    assert count("stowd_files_sent_total", **labels) == sent + 3
    assert count("stowd_files_sent_noted_total", **labels, note="warning") == noted + 3
    assert count("stowd_files_failed_total", **labels) == failed + 7
    assert count("stowd_bytes_sent_total", destination="pacs") == sent_bytes + 3000


def test_request_durations_fall_into_buckets() -> None:
    name = "stowd_request_duration_seconds"
    n = count(f"{name}_count", destination="pacs")
    fast = count(f"{name}_bucket", destination="pacs", le="0.25")
    slow = count(f"{name}_bucket", destination="pacs", le="300.0")
    counters.request("pacs", 0.2)
    counters.request("pacs", 200.0)
    assert count(f"{name}_count", destination="pacs") == n + 2
    assert count(f"{name}_bucket", destination="pacs", le="0.25") == fast + 1
    assert count(f"{name}_bucket", destination="pacs", le="300.0") == slow + 2


def test_retries_count_by_reason() -> None:
    before = count("stowd_retries_total", destination="pacs", reason=counters.UNAVAILABLE)
    counters.retried("pacs", counters.UNAVAILABLE)
    counters.retried("pacs", counters.UNAVAILABLE, 2)
    assert count("stowd_retries_total", destination="pacs", reason="unavailable") == before + 3
    with pytest.raises(ValueError, match="reason must be one of"):
        counters.retried("pacs", "HTTP 503 from https://user:secret@pacs/")


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (DestinationBusy("cannot connect: refused"), counters.UNAVAILABLE),
        (DestinationBusy("timed out (ReadTimeout)"), counters.UNAVAILABLE),
        (DestinationBusy("busy", status=503), counters.UNAVAILABLE),
        (DestinationBusy("busy", status=429), counters.UNAVAILABLE),
        (DestinationBusy("busy", status=408), counters.UNAVAILABLE),
        (DestinationBusy("error", status=500), counters.SERVER_ERROR),
        (DestinationHeld("HTTP 401", status=401), counters.REFUSED),
        (DestinationHeld("TLS failure: bad certificate"), counters.REFUSED),
        (FileUnreadable("permission denied", path="/in/a.dcm"), counters.UNREADABLE),
        (OSError(5, "Input/output error"), counters.UNREADABLE),
        (RuntimeError("unexpected"), counters.FILE),
    ],
)
def test_exceptions_map_to_a_small_set_of_reasons(exc: BaseException, reason: str) -> None:
    assert counters.retry_reason(exc) == reason
    assert reason in counters.REASONS


def test_an_unknown_outcome_is_refused() -> None:
    with pytest.raises(ValueError, match="outcome"):
        counters.settled("src", "pacs", "gone", 10)


@pytest.mark.parametrize(
    "bad", ["/data/in/patient.dcm", "C:\\in\\a.dcm", "https://user:pw@pacs/dicom-web", ""]
)
def test_label_values_take_names_never_paths_or_urls(bad: str) -> None:
    with pytest.raises(ValueError, match="names only"):
        counters.queued("src", bad)
    with pytest.raises(ValueError, match="names only"):
        counters.settled(bad, "pacs", "sent", 1)
    with pytest.raises(ValueError, match="names only"):
        counters.request(bad, 1.0)


# -- the server -------------------------------------------------------------------------------
@pytest.fixture
def served(queue: Queue, clock: Clock) -> Iterator[metrics.Server]:
    with metrics.serve("127.0.0.1", 0, queue.path, ["pacs", "archive"], clock=clock) as server:
        yield server


def test_a_scrape_shows_the_counters(served: metrics.Server) -> None:
    counters.queued("src", "pacs", 2)
    counters.settled("src", "pacs", "sent", 100)
    text = scrape(served)
    sent = value(text, "stowd_files_sent_total", source="src", destination="pacs")
    assert sent == count("stowd_files_sent_total", source="src", destination="pacs") >= 1
    assert value(text, "stowd_files_queued_total", source="src", destination="pacs") is not None
    assert value(text, "stowd_up") == 1


def test_a_scrape_shows_the_queue_by_state_the_oldest_age_and_holds(
    served: metrics.Server, queue: Queue, tmp_path: Path, clock: Clock
) -> None:
    fill(queue, tmp_path, clock)
    queue.hold("archive", until=clock.now + 60, reason="the archive wants valid credentials")
    clock.now = START + 90

    text = scrape(served)

    by_state = {
        s: value(text, "stowd_queue_files", destination="pacs", state=s) for s in metrics.STATES
    }
    assert by_state == {"pending": 2, "waiting": 1, "claimed": 1, "settling": 1}
    assert value(text, "stowd_queue_files", destination="archive", state="pending") == 1
    assert value(text, "stowd_queue_files", destination="archive", state="claimed") == 0
    assert value(text, "stowd_oldest_pending_age_seconds", destination="pacs") == 90
    assert value(text, "stowd_oldest_pending_age_seconds", destination="archive") == 60
    assert value(text, "stowd_destination_held", destination="archive") == 1
    assert value(text, "stowd_destination_held", destination="pacs") == 0

    queue.unhold("archive")
    assert value(scrape(served), "stowd_destination_held", destination="archive") == 0


def test_an_empty_queue_shows_zeros(served: metrics.Server) -> None:
    text = scrape(served)
    assert value(text, "stowd_queue_files", destination="pacs", state="pending") == 0
    assert value(text, "stowd_oldest_pending_age_seconds", destination="pacs") == 0
    assert value(text, "stowd_destination_held", destination="pacs") == 0


def test_configured_destinations_start_at_zero(queue: Queue) -> None:
    with metrics.serve("127.0.0.1", 0, queue.path, ["fresh-dest"]) as server:
        text = scrape(server)
    for reason in counters.REASONS:
        assert value(text, "stowd_retries_total", destination="fresh-dest", reason=reason) == 0
    assert value(text, "stowd_bytes_sent_total", destination="fresh-dest") == 0
    assert value(text, "stowd_request_duration_seconds_count", destination="fresh-dest") == 0


def test_configured_routes_start_at_zero(queue: Queue) -> None:
    """Each source's file series exist at 0 before its first file: Prometheus's increase()
    counts nothing of a series' first sample, so an alert on failed files would miss the
    first failure of a process whose failed series began at 1."""
    routes = [("fresh-src", "fresh-dest")]
    with metrics.serve("127.0.0.1", 0, queue.path, ["fresh-dest"], routes=routes) as server:
        text = scrape(server)
    for name in ("queued", "sent", "failed"):
        assert (
            value(text, f"stowd_files_{name}_total", source="fresh-src", destination="fresh-dest")
            == 0
        )


def test_label_values_of_a_scrape_never_hold_paths(
    served: metrics.Server, queue: Queue, tmp_path: Path, clock: Clock
) -> None:
    fill(queue, tmp_path, clock)
    counters.settled("src", "pacs", "failed", 10)
    text = scrape(served)
    assert str(tmp_path) not in text
    assert "patient-" not in text
    labels = [v for _name, pairs in samples(text) for _key, v in pairs]
    assert labels
    for label in labels:
        assert "/" not in label and "\\" not in label, label


def test_an_unreadable_queue_leaves_its_gauges_out_logs_once_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "later.db"
    caplog.set_level(logging.INFO, logger="stowd.metrics")
    with metrics.serve("127.0.0.1", 0, path, ["pacs"]) as server:
        text = scrape(server)
        scrape(server)
        assert value(text, "stowd_up") == 1
        assert "stowd_bytes_sent_total" in text  # the counters are still served
        assert value(text, "stowd_queue_files", destination="pacs", state="pending") is None
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "cannot read the queue" in warnings[0].getMessage()

        SqliteQueue(path).open(lock=False).close()
        text = scrape(server)
    assert value(text, "stowd_queue_files", destination="pacs", state="pending") == 0
    assert any("can be read again" in r.getMessage() for r in caplog.records)


def test_a_file_that_is_not_a_database_does_not_break_the_scrape(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"not a database" * 100)
    with metrics.serve("127.0.0.1", 0, path, ["pacs"]) as server:
        text = scrape(server)
    assert value(text, "stowd_up") == 1
    assert value(text, "stowd_destination_held", destination="pacs") is None


def test_port_zero_picks_a_free_port(queue: Queue) -> None:
    with (
        metrics.serve("127.0.0.1", 0, queue.path, ["pacs"]) as one,
        metrics.serve("127.0.0.1", 0, queue.path, ["pacs"]) as two,
    ):
        assert one.port > 0 and two.port > 0 and one.port != two.port
        assert value(scrape(one), "stowd_up") == value(scrape(two), "stowd_up") == 1


def test_a_port_in_use_gives_a_clear_error(queue: Queue) -> None:
    with metrics.serve("127.0.0.1", 0, queue.path, ["pacs"]) as taken:
        with pytest.raises(StowdError) as info:
            metrics.serve("127.0.0.1", taken.port, queue.path, ["pacs"])
        message = str(info.value)
        assert message.startswith(f"cannot serve metrics on 127.0.0.1:{taken.port}: ")
        assert "in use" in message


def test_a_host_that_does_not_resolve_gives_a_clear_error(queue: Queue) -> None:
    with pytest.raises(StowdError, match=r"cannot serve metrics on no-such-host\.invalid:0: "):
        metrics.serve("no-such-host.invalid", 0, queue.path, ["pacs"])


def ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_an_ipv6_host_works(queue: Queue) -> None:
    with metrics.serve("::1", 0, queue.path, ["pacs"]) as server:
        assert server.host == "::1"
        assert value(scrape(server, "::1"), "stowd_up") == 1


def test_close_stops_serving(queue: Queue) -> None:
    server = metrics.serve("127.0.0.1", 0, queue.path, ["pacs"])
    scrape(server)
    server.close()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{server.port}/metrics", trust_env=False)


def test_a_scrape_for_chosen_names_answers_them(tmp_path: Path) -> None:
    SqliteQueue(tmp_path / "q.db").open().close()
    with metrics.serve("127.0.0.1", 0, tmp_path / "q.db", ["pacs"]) as server:
        url = f"http://127.0.0.1:{server.port}/metrics"
        answer = httpx.get(url, params={"name[]": ["stowd_up", "stowd_queue_files"]}, timeout=10)
    assert answer.status_code == 200
    assert "stowd_up 1.0" in answer.text and "stowd_queue_files{" in answer.text
    assert "stowd_files_sent_total" not in answer.text
