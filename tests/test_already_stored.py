"""Issue 15: an instance the archive already holds is stored, not failed (Azure's 45070);
"being created" (45071) is tried again; a refusal that may be permanent (0x0110) is tried at
most ``retry.max_refusals`` times, counted in the queue across restarts.  Against the real
daemon, a small local archive scripted from Azure's documentation, and the real tiny_pacs."""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pytest
from dicomgen import make_instance
from harness import Layout, Stowd, make_layout, run_cli, serving_metrics, wait_for
from localserver import LocalServer
from needs import require
from tinypacs import TinyPacs, tiny_pacs_missing_reason

from stowd.dicomweb.stowanswer import StowOutcome, is_counted, judge, parse_answer
from stowd.dicomweb.stowbody import Part
from stowd.pipeline.queue import ALREADY_STORED as ALREADY_NOTE
from stowd.pipeline.queue import NewFile, SqliteQueue

# The answers, from Azure's DICOM service conformance statement v2 ("Store response status
# codes", "Store response payload", "Store failure reason codes";
# learn.microsoft.com/azure/healthcare-apis/dicom/dicom-services-conformance-statement-v2) and
# microsoft/dicom-server (StoreDatasetProcessor: InstanceAlreadyExistsException -> a
# FailedSOPSequence item with SopInstanceAlreadyExists = 45070, PendingInstanceException ->
# PendingSopInstance = 45071): 200 all stored, 202 some, 409 none; each refused instance a
# FailedSOPSequence item with its UIDs and FailureReason, words in FailedAttributesSequence
# (0074,1048) ErrorComment (0000,0902).
STORED = 0
ALREADY_STORED = 45070  # "A DICOM instance with the same ... UIDs was already stored"
BEING_CREATED = 45071  # "being created by another process, or the previous attempt failed"
# PS3.18 Table I.2-2's processing failure; Google's Healthcare API answers it, with words, to
# the same UIDs with other content (docs/archives.md)
PROCESSING_FAILURE = 0x0110
CONFLICT_TEXT = "existing instance has a different checksum"


class ScriptedArchive(LocalServer):
    """Answers each POST per instance from ``plan`` (SOPInstanceUID -> answers, one per
    request naming it; the last one repeats); counts the requests that named each UID."""

    def __init__(self, plan: dict[str, list[int]], *, overlap: bool = False) -> None:
        owner = self
        self.plan = plan
        self.asked: dict[str, int] = dict.fromkeys(plan, 0)
        self._lock = threading.Lock()
        self.met = False  # the first two requests were in flight together
        self.listed: set[str] = set()  # what its QIDO-RS lists (verify: true)
        # overlap: the first two requests are answered only once both arrived
        self.together = threading.Barrier(2, action=self._met) if overlap else None

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                owner.meet()
                status, doc = owner.answer(body)
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                # QIDO-RS, PS3.18 F.2: a DICOM JSON list of the matching instances
                listed = [{"00080018": {"vr": "UI", "Value": [u]}} for u in owner.listed]
                data = json.dumps(listed).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(Handler)

    def _met(self) -> None:
        self.met, self.together = True, None

    def meet(self) -> None:
        barrier = self.together
        if barrier is not None:
            with contextlib.suppress(threading.BrokenBarrierError):  # the test checks ``met``
                barrier.wait(30)

    def answer(self, body: bytes) -> tuple[int, dict[str, Any]]:
        stored: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        with self._lock:
            for uid, answers in self.plan.items():
                if uid.encode() not in body:
                    continue
                code = answers[min(self.asked[uid], len(answers) - 1)]
                self.asked[uid] += 1
                (stored if code == STORED else failed).append(_item(uid, code))
        status = 200 if not failed else 202 if stored else 409
        doc: dict[str, Any] = {}
        if stored:
            doc["00081199"] = {"vr": "SQ", "Value": stored}
        if failed:
            doc["00081198"] = {"vr": "SQ", "Value": failed}
        return status, doc

    def times(self, uid: str) -> int:
        with self._lock:
            return self.asked[uid]


def _item(uid: str, code: int) -> dict[str, Any]:
    item: dict[str, Any] = {
        "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.7"]},
        "00081155": {"vr": "UI", "Value": [uid]},
    }
    if code != STORED:
        item["00081197"] = {"vr": "US", "Value": [code]}
    if code == PROCESSING_FAILURE:
        comment = {"00000902": {"vr": "LO", "Value": [CONFLICT_TEXT]}}
        item["00741048"] = {"vr": "SQ", "Value": [comment]}
    return item


FAST = {"initial": "200ms", "maximum": "400ms", "hold_probe": "200ms", "max_age": "1h"}


def layout_for(tmp_path: Path, url: str, **destination: object) -> Layout:
    dest = {"url": url, "workers": 1, "timeouts": {"read": "30s"}, **destination}
    return make_layout(tmp_path / "run", url, retry=FAST, destinations={"pacs": dest})


def status(layout: Layout) -> dict[str, Any]:
    result = run_cli("status", "-c", str(layout.config), "--json")
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def error_of(layout: Layout, name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(layout.error_files()[name].read_text())
    return doc


def test_an_instance_the_archive_already_holds_goes_to_sent_recorded_as_already_stored(
    tmp_path: Path,
) -> None:
    with ScriptedArchive({}) as archive:
        dest = {"url": archive.url, "workers": 1, "timeouts": {"read": "30s"}}
        layout = make_layout(tmp_path / "run", archive.url, retry=FAST, destinations={"pacs": dest})
        stage = tmp_path / "stage"  # dropped once the metrics are served (serving_metrics)
        uid = make_instance(stage / "again.dcm")
        new = make_instance(stage / "new.dcm")
        archive.plan.update({uid: [ALREADY_STORED], new: [STORED]})
        archive.asked.update({uid: 0, new: 0})
        with serving_metrics(layout) as (daemon, port):
            for name in ("again.dcm", "new.dcm"):
                (stage / name).rename(layout.drop / name)
            wait_for(
                lambda: layout.files(layout.sent) == {"again.dcm", "new.dcm"},
                60,
                "both files in sent/",
                lambda: daemon.log,
            )
            scraped = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            assert daemon.terminate() == 0
    assert layout.files(layout.failed) == set()
    assert archive.times(uid) == 1  # settled by the first answer, not sent again
    assert "again.dcm: already stored, moved to" in daemon.log
    assert "failure reason B00E (45070)" in daemon.log
    data = status(layout)
    assert data["counts"]["sent"] == 2
    assert data["already_stored"] == 1
    assert data["by_destination"]["pacs"]["already_stored"] == 1
    human = run_cli("status", "-c", str(layout.config)).stdout
    assert "2 sent (1 of them already stored)" in human
    noted = 'stowd_files_sent_noted_total{destination="pacs",note="already_stored",source="ct1"}'
    assert f"{noted} 1.0" in scraped
    assert 'stowd_files_sent_total{destination="pacs",source="ct1"} 2.0' in scraped


@pytest.mark.parametrize("listed", [True, False], ids=["listed", "not-listed"])
def test_with_verify_an_instance_already_stored_moves_to_sent_only_once_listed(
    tmp_path: Path, listed: bool
) -> None:
    """verify: true checks the archive's word "already stored" like its word "stored"."""
    with ScriptedArchive({}) as archive:
        layout = layout_for(tmp_path, archive.url, verify=True)
        uid = make_instance(layout.drop / "again.dcm")
        archive.plan[uid], archive.asked[uid] = [ALREADY_STORED], 0
        archive.listed = {uid} if listed else set()
        folder = layout.sent if listed else layout.failed
        with Stowd(layout) as daemon:
            wait_for(
                lambda: "again.dcm" in layout.files(folder),
                60,
                f"the file in {folder.name}/",
                lambda: daemon.log,
            )
            assert daemon.terminate() == 0
    if listed:
        assert "again.dcm: already stored, moved to" in daemon.log
        assert status(layout)["already_stored"] == 1
    else:
        assert layout.files(layout.sent) == set()
        assert "does not list it" in error_of(layout, "again.dcm")["reason"]
        assert archive.times(uid) == 3  # MAX_UNLISTED answers, then failed


def test_duplicates_fail_sends_an_instance_the_archive_already_holds_to_failed(
    tmp_path: Path,
) -> None:
    with ScriptedArchive({}) as archive:
        layout = layout_for(tmp_path, archive.url, duplicates="fail")
        uid = make_instance(layout.drop / "again.dcm")
        archive.plan[uid], archive.asked[uid] = [ALREADY_STORED], 0
        with Stowd(layout) as daemon:
            wait_for(
                lambda: "again.dcm" in layout.files(layout.failed),
                60,
                "the file in failed/",
                lambda: daemon.log,
            )
            assert daemon.terminate() == 0
    error = error_of(layout, "again.dcm")
    assert "already holds an instance with this file's" in error["reason"]
    assert "duplicates: fail" in error["reason"]
    assert error["failure_reason"] == "B00E"
    assert archive.times(uid) == 1
    assert status(layout)["already_stored"] == 0


def test_an_instance_being_created_is_sent_again_and_then_stored(tmp_path: Path) -> None:
    with ScriptedArchive({}) as archive:
        layout = layout_for(tmp_path, archive.url)
        uid = make_instance(layout.drop / "busy.dcm")
        archive.plan[uid], archive.asked[uid] = [BEING_CREATED, STORED], 0
        with Stowd(layout) as daemon:
            wait_for(
                lambda: layout.files(layout.sent) == {"busy.dcm"},
                60,
                "the file in sent/ after a second request",
                lambda: daemon.log,
            )
            assert daemon.terminate() == 0
    assert archive.times(uid) == 2
    assert "failure reason B00F" in daemon.log
    assert "refusal 1 of at most 3" in daemon.log


def test_a_processing_failure_three_times_fails_with_the_archive_s_words(
    tmp_path: Path,
) -> None:
    with ScriptedArchive({}) as archive:
        layout = layout_for(tmp_path, archive.url)
        uid = make_instance(layout.drop / "conflict.dcm")
        archive.plan[uid], archive.asked[uid] = [PROCESSING_FAILURE], 0
        with Stowd(layout) as daemon:
            wait_for(
                lambda: "conflict.dcm" in layout.files(layout.failed),
                60,
                "the file in failed/ after three refusals",
                lambda: daemon.log,
            )
            assert daemon.terminate() == 0
    assert archive.times(uid) == 3
    error = error_of(layout, "conflict.dcm")
    assert error["reason"].startswith("the archive refused this file 3 times")
    assert "failure reason 0110 (processing failure)" in error["reason"]
    assert CONFLICT_TEXT in error["reason"]
    assert error["refusals"] == 3


def test_the_refusals_are_counted_across_a_restart(tmp_path: Path) -> None:
    with ScriptedArchive({}) as archive:
        layout = layout_for(tmp_path, archive.url, workers=1)
        uid = make_instance(layout.drop / "conflict.dcm")
        archive.plan[uid], archive.asked[uid] = [PROCESSING_FAILURE], 0
        with Stowd(layout) as daemon:
            wait_for(lambda: archive.times(uid) >= 2, 60, "two refusals", lambda: daemon.log)
            daemon.kill()  # kill -9 right after (or while) the second refusal is recorded
        before = archive.times(uid)
        with Stowd(layout) as daemon:
            wait_for(
                lambda: "conflict.dcm" in layout.files(layout.failed),
                60,
                "the file in failed/ after the restart",
                lambda: daemon.log,
            )
            assert daemon.terminate() == 0
    # an answer the killed daemon had not recorded yet is asked again: never more than one
    assert archive.times(uid) in (3, 4), (before, archive.times(uid))
    assert error_of(layout, "conflict.dcm")["refusals"] == 3


def test_a_refusal_while_other_requests_were_in_flight_is_not_counted(tmp_path: Path) -> None:
    """A busy archive refuses for contention too (tiny_pacs answers 0110 while another
    request holds its SQLite index): only a refusal of a request alone on the wire counts."""
    with ScriptedArchive({}, overlap=True) as archive:
        layout = layout_for(tmp_path, archive.url, workers=2)
        uid = make_instance(layout.drop / "conflict.dcm")  # each its own study: two requests
        other = make_instance(layout.drop / "other.dcm")
        archive.plan.update({uid: [PROCESSING_FAILURE], other: [STORED]})
        archive.asked.update({uid: 0, other: 0})
        with Stowd(layout) as daemon:
            wait_for(
                lambda: "conflict.dcm" in layout.files(layout.failed),
                60,
                "the file in failed/",
                lambda: daemon.log,
            )
            assert daemon.terminate() == 0
    assert archive.met, "the two first requests did not overlap"
    assert layout.files(layout.sent) == {"other.dcm"}
    assert "(not counted: other requests were in flight)" in daemon.log
    assert archive.times(uid) == 4  # 1 not counted + 3 counted
    assert error_of(layout, "conflict.dcm")["refusals"] == 3


class StrictTinyPacs(TinyPacs):
    """tiny_pacs with its storage's ``overwrite`` off: an instance it holds already is
    refused with 0x0110 (tiny_pacs_dicomweb/stow.py ``_materialize``: ``store_rejected``)."""

    def config(self) -> dict[str, Any]:
        doc = super().config()
        doc["components"]["FileStorage"]["overwrite"] = False
        return doc


@pytest.fixture
def strict_tiny_pacs(tmp_path: Path) -> Any:
    require(tiny_pacs_missing_reason())
    server = StrictTinyPacs(tmp_path / "tiny_pacs")
    try:
        server.start()
        yield server
    finally:
        # Its storage is thrown away (as conftest's archive fixture): its clean exit (Ctrl-C)
        # took the full 10 s of stop_timeout here.
        server.kill()


def test_tiny_pacs_without_overwrite_refusing_a_re_sent_instance_fails_it_after_three_times(
    tmp_path: Path, strict_tiny_pacs: StrictTinyPacs
) -> None:
    """0x0110 cannot tell "already stored" from "could not store": the re-sent copy is
    refused max_refusals times, then failed with a reason that names the likely cause."""
    layout = layout_for(tmp_path, strict_tiny_pacs.dicomweb_url)
    make_instance(layout.drop / "first.dcm")
    with Stowd(layout) as daemon:
        wait_for(
            lambda: layout.files(layout.sent) == {"first.dcm"},
            60,
            "the first copy in sent/",
            lambda: daemon.log,
        )
        shutil.copy2(layout.sent / "first.dcm", layout.drop / "again.dcm")
        wait_for(
            lambda: "again.dcm" in layout.files(layout.failed),
            120,
            "the re-sent copy in failed/ after three refusals",
            lambda: daemon.log,
        )
        assert daemon.terminate() == 0
    error = error_of(layout, "again.dcm")
    assert error["reason"].startswith("the archive refused this file 3 times")
    assert "may already hold an instance with this SOPInstanceUID" in error["reason"]
    assert error["refusals"] == 3
    assert daemon.log.count("again.dcm: the archive refused the instance") == 2


# -- the judgement and the queue, without a daemon -------------------------------------------
def _failed(items: list[dict[str, Any]]) -> bytes:
    return json.dumps({"00081198": {"vr": "SQ", "Value": items}}).encode()


def test_judge_reads_each_documented_code() -> None:
    parts = [Part("a", 1, "1.1"), Part("b", 1, "1.2"), Part("c", 1, "1.3")]
    items = [_item("1.1", ALREADY_STORED), _item("1.2", BEING_CREATED), _item("1.3", 0x0110)]
    answer = parse_answer(409, _failed(items))
    verdicts = judge(answer, parts)
    assert verdicts["1.1"].outcome is StowOutcome.ALREADY
    assert verdicts["1.2"].outcome is StowOutcome.RETRY
    assert verdicts["1.3"].outcome is StowOutcome.RETRY
    assert CONFLICT_TEXT in verdicts["1.3"].reason  # the archive's words, per instance
    assert [is_counted(v.code or 0) for v in verdicts.values()] == [False, True, True]
    failing = judge(answer, parts, duplicates="fail")["1.1"]
    assert (failing.outcome, failing.code) == (StowOutcome.FAILED, ALREADY_STORED)
    assert not is_counted(0xA700)  # out of resources: the archive's state, not the file's


def test_the_archive_s_words_are_bounded_and_escaped() -> None:
    item = _item("1.1", 0x0110)
    item["00741048"]["Value"][0]["00000902"]["Value"] = ["\x1b[31mred\x1b[0m " + "x" * 5000]
    verdict = judge(parse_answer(409, _failed([item])), [Part("a", 1, "1.1")])["1.1"]
    assert "\x1b" not in verdict.reason
    assert len(verdict.reason) < 500


def test_a_version_5_queue_gets_the_note_column_and_counts_already_stored(
    tmp_path: Path,
) -> None:
    path = tmp_path / "v5.db"
    q = SqliteQueue(path).open()
    q.enqueue(
        [NewFile("src", "pacs", "/d/a", "a", 10, 1), NewFile("src", "pacs", "/d/b", "b", 10, 1)]
    )
    q.close()
    db = sqlite3.connect(path)  # a queue written before notes existed
    for trigger in ("tally_update", "tally_delete"):  # schema 7's, which read note
        db.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    db.execute("ALTER TABLE files DROP COLUMN note")
    db.execute("PRAGMA user_version = 5")
    db.commit()
    db.close()
    q = SqliteQueue(path).open()
    try:
        a, b = q.jobs()
        q.begin_settle([(a, "sent", "/s/a", None)], notes={a.id: ALREADY_NOTE})
        q.begin_settle([(b, "sent", "/s/b", None)])
        q.finish_many([(a.id, "sent"), (b.id, "sent")])
        [row] = q.tally(0.0)
        assert row[2:4] == ("sent", 2)
        assert row[7] == 1  # one of them already stored
    finally:
        q.close()


def test_an_odd_error_comment_does_not_hide_the_other_failures() -> None:
    odd = _item("1.1", 0x0110)
    odd["00741048"] = {"vr": "SQ", "Value": [{"00000902": {"vr": "LO", "Value": []}}, 7]}
    answer = parse_answer(409, _failed([odd, _item("1.2", ALREADY_STORED)]))
    assert answer.failed == {"1.1": 0x0110, "1.2": ALREADY_STORED}
    assert answer.failed_text == {}
