"""Adaptive concurrency (issue 20) in the worker and the real daemon: an archive that answers
429 when a client sends more than it takes at once.

A 429 without ``Retry-After`` is what such archives send: RFC 6585 section 4 makes the header
optional ("MAY include a Retry-After header"), and Google's APIs answer an exhausted quota
with 429 and a JSON error of status RESOURCE_EXHAUSTED and no such header (cloud.google.com/
apis/design/errors, developers.google.com/health/rate-limits: "returns the error 429 Too
Many Requests ... your application should backoff").  Orthanc never answers 429, so the
worker's tests script the archive with httpx's MockTransport and the daemon's with a local
server (``BusyArchive``).
"""

from __future__ import annotations

import io
import json
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
import yaml
from dicomgen import make_instance, make_study
from fakearchive import parts_of
from harness import (
    Clock,
    Layout,
    Stowd,
    drop_source,
    make_layout,
    run_cli,
    serving_metrics,
    wait_for,
)
from localserver import LocalServer

from stowd.config.model import BatchLimits, Config, Destination, Retry
from stowd.dicomweb.stow import StowClient
from stowd.pipeline.queue import SqliteQueue
from stowd.pipeline.watch import Watcher
from stowd.pipeline.wire import wire_of
from stowd.pipeline.worker import Worker

# Google's error model for an exhausted quota (cloud.google.com/apis/design/errors): 429, a
# JSON error, no Retry-After
RESOURCE_EXHAUSTED = {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED"}}
REFERENCED = "00081199"


def stored_answer(uids: list[str]) -> dict[str, Any]:
    """A STOW-RS answer (PS3.18 Annex I) listing ``uids`` as stored."""
    items = [{"00081155": {"vr": "UI", "Value": [u]}} for u in uids]
    return {REFERENCED: {"vr": "SQ", "Value": items}}


def sop_uids(content_type: str, body: bytes) -> list[str]:
    found = []
    for part in parts_of(content_type, body):
        data = part.get_payload(decode=True)
        assert isinstance(data, bytes)
        found.append(str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID))
    return found


# -- the worker, with scripted answers --------------------------------------------------------
class Rig:
    """A source folder, a queue, one worker of a destination with ``workers`` and ``adaptive``,
    and an archive that answers ``answers`` in turn (None among them: stored), then 200."""

    def __init__(self, tmp_path: Path, answers: list[httpx.Response | None], **dest: Any) -> None:
        self.clock = Clock(2_000_000_000.0)
        self.source = drop_source(tmp_path)
        self.source.watch.mkdir(parents=True)
        self.answers: list[httpx.Response | None] | None = answers  # None: all time out
        self.requests = 0
        self.dest = Destination(
            "pacs", "http://archive.test/dicom-web", BatchLimits(max_files=10), **dest
        )
        self.config = Config(
            tmp_path / "c.yaml",
            tmp_path / "q.db",
            (self.source,),
            {"pacs": self.dest},
            retry=Retry(),
        )
        self.queue = SqliteQueue(self.config.queue, clock=self.clock).open()
        self.stop = threading.Event()
        transport = httpx.MockTransport(self._archive)
        self.client = StowClient(self.dest, stop=self.stop, transport=transport)
        self.worker = Worker(
            self.config, self.queue, self.dest, self.client, self.stop, clock=self.clock
        )
        make_study(self.source.watch / "s", 4)
        Watcher(self.source, "pacs", self.queue.enqueue, clock=lambda: self.clock.now + 60).scan()
        while self.worker.classify_some():
            pass

    def _archive(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        if self.answers is None:
            raise httpx.ReadTimeout("the archive did not answer in time", request=request)
        answer = self.answers.pop(0) if self.answers else None
        if answer is not None:
            return answer
        uids = sop_uids(request.headers["Content-Type"], request.read())
        return httpx.Response(200, json=stored_answer(uids))

    @property
    def limit(self) -> int:
        found = wire_of(self.client).concurrency
        assert found is not None
        return found.limit

    def attempts(self) -> list[int]:
        return [j.attempts for j in self.queue.jobs()]

    def close(self) -> None:
        self.client.close()
        self.queue.close()


@pytest.fixture
def rig(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(answers: list[httpx.Response | None], **dest: Any) -> Rig:
        made.append(Rig(tmp_path / str(len(made)), answers, **dest))
        return made[-1]

    yield make
    for one in made:
        one.close()


def busy(status: int = 429, **headers: str) -> httpx.Response:
    return httpx.Response(status, json=RESOURCE_EXHAUSTED, headers=headers)


@pytest.mark.parametrize("status", [429, 503])
def test_a_busy_answer_without_retry_after_lowers_the_limit_and_holds_nothing(
    rig: Callable[..., Rig], status: int, caplog: pytest.LogCaptureFixture
) -> None:
    one = rig([busy(status)], workers=4)
    with caplog.at_level(logging.INFO, logger="stowd.worker"):
        assert one.worker.step()  # the batch went out, and came back
    assert one.queue.holds() == {}  # the destination is not paused
    assert one.queue.counts() == {"pending": 4}  # queued again at once, no try counted
    assert one.attempts() == [0, 0, 0, 0]
    assert one.limit == 2
    said = [r.getMessage() for r in caplog.records if "concurrent requests" in r.getMessage()]
    assert said == [f"destination pacs: the archive is busy ({status}); concurrent requests 4 -> 2"]
    one.worker.step()
    one.worker.step()  # the batch settled behind is finished
    assert one.queue.counts() == {"sent": 4}
    assert one.requests == 2  # the batch was not split into single-file requests
    assert not one.source.failed.exists()


def test_adaptive_false_holds_the_destination_as_before(rig: Callable[..., Rig]) -> None:
    one = rig([busy()], workers=4, adaptive=False)
    assert wire_of(one.client).concurrency is None
    one.worker.step()
    hold = one.queue.holds()["pacs"]
    assert "429" in hold.reason
    assert one.queue.counts() == {"waiting": 4}  # behind the hold
    assert not one.worker.step()  # held: nothing is sent until it ends
    assert one.requests == 1


def test_at_limit_one_a_busy_answer_holds_the_destination_as_before(
    rig: Callable[..., Rig],
) -> None:
    one = rig([busy()], workers=1)
    one.worker.step()
    assert "429" in one.queue.holds()["pacs"].reason
    assert one.queue.counts() == {"waiting": 4}
    assert one.limit == 1


def test_retry_after_is_followed_and_lowers_the_limit(rig: Callable[..., Rig]) -> None:
    one = rig([busy(503, **{"Retry-After": "120"})], workers=4)
    one.worker.step()
    hold = one.queue.holds()["pacs"]
    assert hold.until - one.clock.now == pytest.approx(120)
    assert one.queue.counts() == {"waiting": 4}
    assert one.limit == 2


def test_a_timeout_lowers_the_limit_and_pauses_the_destination_as_before(
    rig: Callable[..., Rig],
) -> None:
    one = rig([], workers=4)
    one.answers = None  # every request times out (after the 3 quick attempts: 1 s + 2 s)
    one.worker.step()
    hold = one.queue.holds()["pacs"]
    assert "timed out (ReadTimeout)" in hold.reason
    assert one.queue.counts() == {"waiting": 4}
    assert one.limit == 2


def test_a_worker_above_the_limit_claims_nothing(rig: Callable[..., Rig]) -> None:
    one = rig([busy()], workers=4)
    one.worker.step()  # 4 -> 2
    wire = wire_of(one.client)
    taken = [wire.seat(), wire.seat()]  # two other workers have their requests in flight
    assert None not in taken
    assert not one.worker.step()  # nothing claimed, nothing read (all were read), idle
    assert one.queue.counts() == {"pending": 4} and one.requests == 1
    wire.unseat()
    assert one.worker.step()
    assert one.requests == 2


def test_rounds_of_successes_raise_the_limit_again(
    rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    one = rig([busy(), busy()], workers=4)
    one.worker.step()
    one.worker.step()
    assert one.limit == 1 and one.queue.holds() == {}  # sent at 2: eased, not held
    make_study(one.source.watch / "t", 10)
    Watcher(one.source, "pacs", one.queue.enqueue, clock=lambda: one.clock.now + 60).scan()
    with caplog.at_level(logging.DEBUG, logger="stowd.worker"):  # an increase is routine
        while one.worker.step():
            pass
    assert one.queue.counts() == {"sent": 14}
    raised = [r.getMessage() for r in caplog.records if "raised" in r.getMessage()]
    assert raised == [
        "destination pacs: concurrent requests raised to 2 after 1 successful requests"
    ]


ROUNDS = 12


def test_an_archive_at_its_limit_is_probed_quietly(
    rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    """An archive that takes one request at once: AIMD probes it for ever (1 -> 2, a 429,
    2 -> 1).  The log says the first decrease at WARNING, and the routine probing once per
    10 minutes at INFO, not two lines a round (an unattended daemon's log stays quiet)."""
    one = rig([busy(), *[None, busy()] * ROUNDS], workers=2)  # the 429s come at limit 2
    for n in range(ROUNDS):
        make_study(one.source.watch / f"p{n}", 1)
    Watcher(one.source, "pacs", one.queue.enqueue, clock=lambda: one.clock.now + 60).scan()
    while one.worker.classify_some():
        pass
    with caplog.at_level(logging.DEBUG, logger="stowd.worker"):
        for _ in range(2 * ROUNDS + 1):  # a minute between the archive's answers
            assert one.worker.step()
            one.clock.now += 60
    assert one.answers == [] and one.queue.holds() == {}  # no 429 paused the destination
    assert one.limit == 1
    said = [(r.levelno, r.getMessage()) for r in caplog.records if "concurrent" in r.getMessage()]
    assert [m for level, m in said if level == logging.WARNING] == [
        "destination pacs: the archive is busy (429); concurrent requests 2 -> 1"
    ]
    assert [m for level, m in said if level == logging.INFO] == [
        # routine changes a minute apart, from 60 s: summed up at 660 s (those from 60 s,
        # the first an increase) and 1320 s (those from 720 s, the first a decrease)
        "destination pacs: the archive was busy at times: concurrent requests lowered 5 and "
        "raised 6 time(s) in the last 10 minutes, between 1 and 2; now 2",
        "destination pacs: the archive was busy at times: concurrent requests lowered 6 and "
        "raised 5 time(s) in the last 10 minutes, between 1 and 2; now 1",
    ]
    assert len([level for level, _ in said if level == logging.DEBUG]) == 2 * ROUNDS  # the rest


# -- the daemon and an archive that takes K requests at once --------------------------------
K = 2  # the requests the archive takes at once
WORKERS = 4
HOLD = 0.5  # seconds a request the archive took waits for the client to send one too many
FILES = 40


class BusyArchive(LocalServer):
    """A STOW-RS endpoint that answers 429 (no Retry-After, Google's RESOURCE_EXHAUSTED body)
    to a request that arrives while ``K`` others are in flight, and stores the others.

    It keeps each request it took waiting until the client sends one too many (a 429) or
    ``HOLD`` seconds pass, as a slow archive would: so the client's requests overlap, and a
    limit above K meets a 429 (a real archive answering in a millisecond would never see the
    requests of a client overlap).  Until its first 429 it waits up to a minute, so that the
    first decrease is tested for sure, not by luck of timing.  It counts each request out
    before it answers, so a client that counts its own requests in flight never sees a 429
    at K or below."""

    def __init__(self) -> None:
        owner = self
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most = 0  # the most requests in flight at once, refused ones included
        self.refused = 0
        self.stored: set[str] = set()
        self.first_refusal = threading.Event()
        self.refusal = threading.Condition(self.lock)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                over = owner.arrive()
                body = self.rfile.read(int(self.headers["Content-Length"]))
                try:
                    status, doc = owner.answer(over, self.headers["Content-Type"], body)
                finally:
                    owner.leave()
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(Handler)

    def arrive(self) -> bool:
        """Count a request in; True when it is over ``K``."""
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            over = self.in_flight > K
            if over:
                self.refused += 1
        if over:
            self.first_refusal.set()
            with self.lock:
                self.refusal.notify_all()
        return over

    def leave(self) -> None:
        with self.lock:
            self.in_flight -= 1

    def answer(self, over: bool, content_type: str, body: bytes) -> tuple[int, dict[str, Any]]:
        if over:
            return 429, RESOURCE_EXHAUSTED
        self.first_refusal.wait(60)  # bounded: a daemon that never sends K+1 fails the test
        uids = sop_uids(content_type, body)
        with self.lock:
            seen = self.refused
            self.refusal.wait_for(lambda: self.refused > seen, HOLD)  # the pace, not a sync
            self.stored.update(uids)
        return 200, stored_answer(uids)


def status(layout: Layout) -> dict[str, Any]:
    result = run_cli("status", "-c", str(layout.config), "--json")
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def shows(layout: Layout) -> int | None:
    """The limit of pacs that ``stowd status --json`` shows."""
    found = status(layout)["destinations"]["pacs"].get("concurrency")
    return None if found is None else int(found["limit"])


def limits_logged(log: str) -> list[tuple[int, int]]:
    """The changes of the limit the daemon logged, (old, new) in order."""
    found: list[tuple[int, int]] = []
    for line in log.splitlines():
        if "; concurrent requests " in line:
            before, after = line.rsplit("concurrent requests ", 1)[1].split(" -> ")
            found.append((int(before), int(after)))
        elif "concurrent requests raised to " in line:
            raised = int(line.split("raised to ")[1].split()[0])
            found.append((raised - 1, raised))
    return found


def busy_layout(tmp_path: Path, url: str, *, stage: Path | None = None, **dest: Any) -> Layout:
    destination = {
        "url": url,
        "workers": WORKERS,
        "batch": {"max_files": 1},  # one request per file: many requests
        "timeouts": {"read": "30s"},
        **dest,
    }
    layout = make_layout(tmp_path / "run", "", destinations={"pacs": destination})
    for n in range(FILES):
        make_instance((stage or layout.drop) / f"{n:03}.dcm")
    return layout


def gauge(port: int) -> str:
    """The concurrency gauge of pacs in the daemon's metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10, trust_env=False).text
    name = 'stowd_destination_concurrency{destination="pacs"} '
    [line] = [line for line in text.splitlines() if line.startswith(name)]
    return line.removeprefix(name)


def test_the_daemon_settles_at_what_the_archive_takes_and_fails_no_file(tmp_path: Path) -> None:
    stage = tmp_path / "stage"  # dropped once the metrics are served (serving_metrics)
    with BusyArchive() as archive:
        layout = busy_layout(tmp_path, archive.url + "/dicom-web", stage=stage)
        with serving_metrics(layout) as (daemon, port):
            for path in stage.iterdir():
                path.rename(layout.drop / path.name)
            wait_for(
                lambda: len(layout.files(layout.sent)) == FILES,
                240,
                "every file in sent/",
                lambda: daemon.log,
            )
            wait_for(  # no request is left: the last change logged is the limit now
                lambda: shows(layout) == limits_logged(daemon.log)[-1][1],
                30,
                "status to show the limit",
                lambda: daemon.log,
            )
            shown = status(layout)["destinations"]["pacs"]
            text = run_cli("status", "-c", str(layout.config)).stdout
            scraped = gauge(port)
            assert daemon.proc is not None
            daemon.proc.send_signal(signal.SIGHUP)  # a reload keeps what was learnt
            wait_for(lambda: "reloaded" in daemon.log, 30, "the reload", lambda: daemon.log)
            reloaded = gauge(port)
            assert daemon.terminate() == 0
    assert layout.files(layout.failed) == set()
    assert archive.refused >= 1 and len(archive.stored) == FILES
    changes = limits_logged(daemon.log)
    # AIMD: the first 429 halves 4 to 2; a limit of K or less never meets a 429, so it
    # never goes below K; it rises one at a time, at most to workers
    assert changes[0] == (WORKERS, K), changes
    assert all(new >= K for _, new in changes), changes
    assert all(new == old + 1 or new == (old + 1) // 2 for old, new in changes), changes
    assert all(new <= WORKERS for _, new in changes), changes
    final = changes[-1][1]
    assert shown["concurrency"] == {"limit": final, "workers": WORKERS}, shown
    assert f"  requests:   at most {final} at once of {WORKERS} workers" in text
    assert scraped == reloaded == f"{final:.1f}"
    assert "unavailable" not in daemon.log  # no 429 paused the destination
    assert shown["state"] == "ok"
    assert archive.most <= WORKERS


def test_adaptive_false_pauses_the_destination_for_a_429_as_before(tmp_path: Path) -> None:
    with BusyArchive() as archive:
        layout = busy_layout(tmp_path, archive.url + "/dicom-web", adaptive=False)
        with Stowd(layout) as daemon:
            wait_for(
                lambda: len(layout.files(layout.sent)) == FILES,
                240,
                "every file in sent/",
                lambda: daemon.log,
            )
            shown = status(layout)["destinations"]["pacs"]
            assert daemon.terminate() == 0
    assert layout.files(layout.failed) == set()
    assert "destination pacs unavailable: the archive is busy or unavailable (HTTP 429)" in (
        daemon.log
    )
    assert limits_logged(daemon.log) == []
    assert "concurrency" not in shown


def test_a_reload_to_adaptive_false_takes_its_figure_out_of_the_metrics(tmp_path: Path) -> None:
    """The gauge is the limit of an adaptive destination (docs/service.md); after a reload
    that turns adaptive off (here with 2 workers) it must not go on saying 4."""
    layout = make_layout(tmp_path / "run", "http://127.0.0.1:9/dicom-web")  # never sent to
    with serving_metrics(layout) as (daemon, port):
        assert gauge(port) == "2.0"  # make_layout's 2 workers
        doc = yaml.safe_load(layout.config.read_text())
        doc["destinations"]["pacs"] |= {"workers": 1, "adaptive": False}
        layout.config.write_text(yaml.safe_dump(doc, sort_keys=False))
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reloaded" in daemon.log, 30, "the reload", lambda: daemon.log)
        wait_for(lambda: _serves(port), 30, "the metrics served again", lambda: daemon.log)
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10, trust_env=False).text
        assert daemon.terminate() == 0
    assert "stowd_destination_concurrency{" not in text, text


def _serves(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10, trust_env=False)
    except httpx.TransportError:
        return False
    return True
