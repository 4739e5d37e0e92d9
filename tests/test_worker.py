"""One destination's worker with a real queue and real files, and scripted archive answers.

httpx's MockTransport stands in for the archive only for what Orthanc cannot be made to
answer: 503 with Retry-After, 202/409 with chosen failure reasons, 401.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from dicomgen import make_instance, make_instance_bytes, make_study
from harness import Clock, drop_source, wait_for
from postgres import PostgresCluster, node_config

from stowd.config.model import BatchLimits, Bulkdata, Config, Destination, Retry, Sidecars
from stowd.dicomweb.stow import StowClient
from stowd.errors import QueueError
from stowd.media.probe import detect as real_detect
from stowd.media.reading import Media
from stowd.pipeline import counters, settle
from stowd.pipeline.queue import Queue, SqliteQueue, open_queue
from stowd.pipeline.watch import Watcher
from stowd.pipeline.worker import Worker, lease
from stowd.rules.engine import Match, Rule, Template

Handler = Callable[[httpx.Request], httpx.Response]


def sop_uids_in(request: httpx.Request) -> list[str]:
    """The SOPInstanceUIDs of the parts of a STOW request (read with pydicom)."""
    body = request.read()
    boundary = request.headers["Content-Type"].split("boundary=")[1].encode()
    uids = []
    for chunk in body.split(b"--" + boundary)[1:-1]:
        payload = chunk.split(b"\r\n\r\n", 1)[1][:-2]
        uids.append(
            str(pydicom.dcmread(io.BytesIO(payload), stop_before_pixels=True).SOPInstanceUID)
        )
    return uids


def stow_json(stored: list[str], failed: dict[str, int] | None = None) -> dict[str, object]:
    doc: dict[str, object] = {
        "00081199": {
            "vr": "SQ",
            "Value": [{"00081155": {"vr": "UI", "Value": [u]}} for u in stored],
        }
    }
    if failed:
        doc["00081198"] = {
            "vr": "SQ",
            "Value": [
                {"00081155": {"vr": "UI", "Value": [u]}, "00081197": {"vr": "US", "Value": [c]}}
                for u, c in failed.items()
            ],
        }
    return doc


class Rig:
    """A source folder, a queue, a worker and a scripted archive."""

    def __init__(
        self,
        tmp_path: Path,
        handler: Handler,
        rules: tuple[Rule, ...] = (),
        sidecars: Sidecars | None = None,
        bulk: Bulkdata | None = None,
        **retry: Any,
    ) -> None:
        self.clock = Clock(2_000_000_000.0)
        self.source = drop_source(
            tmp_path,
            sidecars=sidecars,
            bulkdata=bulk or Bulkdata(),
        )
        self.source.watch.mkdir()
        dest = Destination("pacs", "http://archive.test/dicom-web", BatchLimits(max_files=10))
        self.config = Config(
            tmp_path / "c.yaml",
            tmp_path / "q.db",
            (self.source,),
            {"pacs": dest},
            retry=Retry(**retry),
            rules=rules,
        )
        self.queue: Queue = SqliteQueue(self.config.queue, clock=self.clock).open()
        self.stop = threading.Event()
        self.client = StowClient(dest, stop=self.stop, transport=httpx.MockTransport(handler))
        self.worker = Worker(
            self.config, self.queue, dest, self.client, self.stop, clock=self.clock
        )

    def find(self) -> None:
        Watcher(self.source, "pacs", self.queue.enqueue, clock=lambda: self.clock.now + 60).scan()

    def drain(self, rounds: int = 50) -> None:
        for _ in range(rounds):
            if not self.worker.step():
                return

    def names(self, folder: Path) -> set[str]:
        return {
            str(p.relative_to(folder))
            for p in folder.rglob("*")
            if p.is_file() and "error" not in p.name
        }

    def reason(self, name: str) -> dict[str, object]:
        [path] = self.source.failed.rglob(f"{name}.error.json")
        data: dict[str, object] = json.loads(path.read_text())
        return data

    def close(self) -> None:
        self.client.close()
        self.queue.close()


@pytest.fixture
def rig_factory(tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(
        handler: Handler,
        rules: tuple[Rule, ...] = (),
        sidecars: Sidecars | None = None,
        bulk: Bulkdata | None = None,
        **retry: Any,
    ) -> Rig:
        rig = Rig(tmp_path, handler, rules, sidecars, bulk, **retry)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


def test_a_200_referencing_everything_sends_everything(rig_factory: Callable[..., Rig]) -> None:
    requests: list[list[str]] = []

    def archive(request: httpx.Request) -> httpx.Response:
        uids = sop_uids_in(request)
        requests.append(uids)
        return httpx.Response(200, json=stow_json(uids))

    rig = rig_factory(archive)
    make_study(rig.source.watch / "a", 12)
    make_study(rig.source.watch / "b", 3)
    rig.find()
    rig.drain()
    assert sorted(len(r) for r in requests) == [2, 3, 10]  # per study, at most 10 per batch
    assert len(rig.names(rig.source.sent)) == 15
    assert rig.queue.counts() == {"sent": 15}


def test_202_with_failure_reasons_settles_each_file_by_its_reason(
    rig_factory: Callable[..., Rig],
) -> None:
    codes = {"perm.dcm": 0xA900, "busy.dcm": 0xA700}
    uids: dict[str, str] = {}

    def archive(request: httpx.Request) -> httpx.Response:
        sent = sop_uids_in(request)
        failed = {u: c for name, c in codes.items() if (u := uids[name]) in sent}
        return httpx.Response(202, json=stow_json([u for u in sent if u not in failed], failed))

    rig = rig_factory(archive, initial=30.0, maximum=60.0, max_age=3600.0)
    study = "1.2.826.0.1.3680043.8.498.1"
    for name in ("ok.dcm", "perm.dcm", "busy.dcm"):
        uids[name] = make_instance(rig.source.watch / name, study_uid=study)
    rig.find()
    rig.drain()
    assert rig.names(rig.source.sent) == {"ok.dcm"}
    assert rig.names(rig.source.failed) == {"perm.dcm"}
    reason = rig.reason("perm.dcm")
    assert reason["failure_reason"] == "A900"
    assert reason["http_status"] == 202
    assert "does not match SOP class" in str(reason["reason"])
    assert rig.queue.counts() == {"sent": 1, "failed": 1, "waiting": 1}
    rig.clock.now += 4000  # past max_age: the transient refusal is given up
    rig.drain()
    assert rig.names(rig.source.failed) == {"perm.dcm", "busy.dcm"}
    assert "gave up" in str(rig.reason("busy.dcm")["reason"])
    assert rig.reason("busy.dcm")["attempts"] == 2


def test_503_with_retry_after_holds_the_destination_and_fails_nothing(
    rig_factory: Callable[..., Rig],
) -> None:
    state = {"up": False, "calls": 0}

    def archive(request: httpx.Request) -> httpx.Response:
        state["calls"] += 1
        if not state["up"]:
            return httpx.Response(503, headers={"Retry-After": "120"})
        return httpx.Response(200, json=stow_json(sop_uids_in(request)))

    rig = rig_factory(archive)
    make_study(rig.source.watch / "s", 4)
    rig.find()
    rig.drain()
    assert state["calls"] == 1
    hold = rig.queue.holds()["pacs"]
    assert hold.until - rig.clock.now == pytest.approx(120)
    assert "503" in hold.reason
    assert rig.queue.counts() == {"waiting": 4}  # behind the hold, not failed
    assert not rig.source.failed.exists()
    rig.clock.now += 60
    rig.drain()
    assert state["calls"] == 1  # still held: Retry-After is honoured
    state["up"] = True
    rig.clock.now += 61
    rig.drain()
    assert rig.queue.counts() == {"sent": 4}
    assert rig.queue.holds() == {}


def test_401_holds_files_in_the_queue_with_a_growing_probe(
    rig_factory: Callable[..., Rig],
) -> None:
    rig = rig_factory(lambda _r: httpx.Response(401), hold_probe=60.0, maximum=3600.0)
    make_study(rig.source.watch / "s", 2)
    rig.find()
    waits = []
    for _ in range(3):
        rig.drain()
        hold = rig.queue.holds()["pacs"]
        waits.append(hold.until - rig.clock.now)
        rig.clock.now = hold.until + 1
    assert "401" in hold.reason
    assert waits[0] <= 60 and waits[2] > waits[0]  # 60 s, then longer (jittered)
    assert rig.queue.counts() == {"pending": 2}
    assert not rig.source.failed.exists()


def test_orthanc_style_400_finds_the_bad_file_by_sending_one_by_one(
    rig_factory: Callable[..., Rig],
) -> None:
    bad: dict[str, str] = {}
    sizes: list[int] = []

    def archive(request: httpx.Request) -> httpx.Response:
        uids = sop_uids_in(request)
        sizes.append(len(uids))
        good = [u for u in uids if u != bad["uid"]]
        return httpx.Response(400 if len(good) < len(uids) else 200, json=stow_json(good))

    rig = rig_factory(archive)
    files = make_study(rig.source.watch / "s", 5)
    bad["uid"] = files[2][1]
    rig.find()
    rig.drain()
    assert sizes[0] == 5 and sizes[1:] == [1]  # only the unreferenced one is re-sent alone
    assert rig.names(rig.source.failed) == {f"s/{files[2][0].name}"}
    assert "HTTP 400" in str(rig.reason(files[2][0].name)["reason"])
    assert len(rig.names(rig.source.sent)) == 4


def test_a_200_that_omits_a_file_retries_that_file(rig_factory: Callable[..., Rig]) -> None:
    seen: list[list[str]] = []

    def archive(request: httpx.Request) -> httpx.Response:
        uids = sop_uids_in(request)
        seen.append(uids)
        return httpx.Response(200, json=stow_json(uids[1:] if len(seen) == 1 else uids))

    rig = rig_factory(archive, initial=10.0)
    files = make_study(rig.source.watch / "s", 3)
    rig.find()
    rig.drain()
    assert rig.queue.counts() == {"sent": 2, "waiting": 1}
    rig.clock.now += 11
    rig.drain()
    assert seen[1] == [seen[0][0]]
    assert rig.queue.counts() == {"sent": 3}
    assert f"s/{files[0][0].name}" in rig.names(rig.source.sent)


def test_a_file_deleted_after_queueing_is_forgotten_and_the_rest_sent(
    rig_factory: Callable[..., Rig],
) -> None:
    rig = rig_factory(lambda r: httpx.Response(200, json=stow_json(sop_uids_in(r))))
    files = make_study(rig.source.watch / "s", 3)
    rig.find()
    rig.worker.classify_some()
    files[1][0].unlink()
    rig.drain()
    assert rig.queue.counts() == {"sent": 2, "gone": 1}
    assert not rig.source.failed.exists()


def test_an_unexpected_error_never_leaves_a_batch_claimed(
    rig_factory: Callable[..., Rig],
) -> None:
    def archive(_request: httpx.Request) -> httpx.Response:
        raise RuntimeError("a bug somewhere below the worker")

    rig = rig_factory(archive)
    make_study(rig.source.watch / "s", 2)
    rig.find()
    rig.worker.classify_some()
    with pytest.raises(RuntimeError):
        rig.worker.send_one()
    assert rig.queue.counts() == {"pending": 2}


def test_413_halves_the_batches_until_the_archive_takes_them(
    rig_factory: Callable[..., Rig],
) -> None:
    sizes: list[int] = []

    def archive(request: httpx.Request) -> httpx.Response:
        uids = sop_uids_in(request)
        sizes.append(len(uids))
        if len(uids) > 3:  # the archive takes at most 3 of these files per request
            return httpx.Response(413)
        return httpx.Response(200, json=stow_json(uids))

    rig = rig_factory(archive)
    make_study(rig.source.watch / "s", 10)
    rig.find()
    rig.drain()
    # 10 refused, then at most half (of the files and of the bytes: 4 or 5 files, as the
    # generated files differ by a few bytes) refused again, then halves once more.
    assert sizes[0] == 10 and 4 <= sizes[1] <= 5
    assert max(sizes[2:]) <= 2
    assert rig.queue.counts() == {"sent": 10}
    assert not rig.source.failed.exists()


def test_413_for_a_single_file_fails_it(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(lambda _r: httpx.Response(413))
    make_instance(rig.source.watch / "huge.dcm")
    rig.find()
    rig.drain()
    assert rig.names(rig.source.failed) == {"huge.dcm"}
    assert "larger than the archive accepts" in str(rig.reason("huge.dcm")["reason"])


def test_one_damaged_file_never_stalls_the_files_after_it(
    rig_factory: Callable[..., Rig], tmp_path: Path
) -> None:
    rig = rig_factory(lambda r: httpx.Response(200, json=stow_json(sop_uids_in(r))))
    data, _uid = make_instance_bytes(extra={"SOPClassUID": None})  # read from the meta then
    at = data.find(b"\x02\x00\x02\x00UI")
    (rig.source.watch / "odd.dcm").write_bytes(data[: at + 4] + b"\x55\xc6" + data[at + 6 :])
    rig.find()  # the damaged file is first in the queue
    make_study(rig.source.watch / "good", 3)
    rig.find()
    rig.drain()
    assert len(rig.names(rig.source.sent)) == 3
    assert rig.names(rig.source.failed) == {"odd.dcm"}
    assert "damaged" in str(rig.reason("odd.dcm")["reason"])


def test_a_500_for_one_poison_file_does_not_block_the_others(
    rig_factory: Callable[..., Rig],
) -> None:
    poison: dict[str, str] = {}
    sizes: list[int] = []

    def archive(request: httpx.Request) -> httpx.Response:
        uids = sop_uids_in(request)
        sizes.append(len(uids))
        if poison["uid"] in uids:
            return httpx.Response(500, text="java.lang.NullPointerException")
        return httpx.Response(200, json=stow_json(uids))

    rig = rig_factory(archive, initial=10.0, maximum=60.0, max_age=3600.0)
    study = "1.2.826.0.1.3680043.8.498.2"
    poison["uid"] = make_instance(rig.source.watch / "poison.dcm", study_uid=study)
    make_study(rig.source.watch / "same", 4, study_uid=study)  # same batch as the poison
    make_study(rig.source.watch / "other", 5)
    rig.find()
    for _ in range(20):  # probes after each hold
        rig.clock.now += 61
        rig.drain()
    assert len(rig.names(rig.source.sent)) == 9
    assert rig.queue.counts().get("sent") == 9
    assert rig.names(rig.source.failed) == set()  # still retried: max_age not reached
    rig.clock.now += 4000
    rig.drain()
    assert rig.names(rig.source.failed) == {"poison.dcm"}
    assert "gave up" in str(rig.reason("poison.dcm")["reason"])


def test_a_proxy_answering_400_html_holds_instead_of_failing_files(
    rig_factory: Callable[..., Rig],
) -> None:
    def proxy(request: httpx.Request) -> httpx.Response:
        request.read()
        page = "<html><h1>400 Bad Request</h1>The plain HTTP request was sent to HTTPS port</html>"
        return httpx.Response(400, text=page, headers={"Content-Type": "text/html"})

    rig = rig_factory(proxy)
    make_study(rig.source.watch / "a", 4)
    rig.find()
    rig.drain()
    assert not rig.source.failed.exists()
    hold = rig.queue.holds()["pacs"]
    assert "not a STOW-RS response" in hold.reason and "HTTPS port" in hold.reason
    assert rig.queue.counts() == {"waiting": 4}


def test_a_file_replaced_during_its_upload_is_sent_again_not_moved(
    rig_factory: Callable[..., Rig],
) -> None:
    sent: list[str] = []
    new: dict[str, str] = {}

    def archive(request: httpx.Request) -> httpx.Response:
        uids = sop_uids_in(request)
        sent.extend(uids)
        if not new:  # the scanner replaces img.dcm while the old one is on the wire
            tmp = rig.source.watch / ".img.tmp"
            new["uid"] = make_instance(tmp)
            os.replace(tmp, rig.source.watch / "img.dcm")
        return httpx.Response(200, json=stow_json(uids))

    rig = rig_factory(archive)
    old = make_instance(rig.source.watch / "img.dcm")
    rig.find()
    rig.drain()
    rig.find()  # the rescan sees the new file at the same path
    rig.drain()
    assert sent == [old, new["uid"]]
    assert rig.names(rig.source.sent) == {"img.dcm"}
    assert rig.queue.counts() == {"sent": 2}


# --------------------------------------------------------------------------- metadata rules
NEW_ID = (Rule("rules[0]", 3, set=(("PatientID", Template.parse("NEW-{dicom.PatientID}")),)),)


def storing_all(seen: list[str]) -> Handler:
    """An archive that stores every part, noting the PatientID of each in ``seen``."""

    def archive(request: httpx.Request) -> httpx.Response:
        seen.extend(patient_ids_in(request))
        return httpx.Response(200, json=stow_json(sop_uids_in(request)))

    return archive


def patient_ids_in(request: httpx.Request) -> list[str]:
    body = request.read()
    boundary = request.headers["Content-Type"].split("boundary=")[1].encode()
    return [
        str(pydicom.dcmread(io.BytesIO(c.split(b"\r\n\r\n", 1)[1][:-2])).PatientID)
        for c in body.split(b"--" + boundary)[1:-1]
    ]


def test_changed_copies_are_sent_and_originals_move_unchanged(
    rig_factory: Callable[..., Rig],
) -> None:
    seen: list[str] = []
    archive = storing_all(seen)
    rig = rig_factory(archive, rules=NEW_ID)
    files = make_study(rig.source.watch / "s", 3, patient_id="P7")
    before = {p.name: p.read_bytes() for p, _ in files}
    rig.find()
    rig.drain()
    assert seen == ["NEW-P7"] * 3
    assert {p.name: p.read_bytes() for p in (rig.source.sent / "s").iterdir()} == before
    assert list(rig.config.spool.iterdir()) == []


def test_a_file_damaged_after_it_was_read_fails_alone(rig_factory: Callable[..., Rig]) -> None:
    def archive(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=stow_json(sop_uids_in(request)))

    rig = rig_factory(archive, rules=NEW_ID)
    files = make_study(rig.source.watch / "s", 3)
    rig.find()
    rig.worker.classify_some()
    bad = files[1][0]
    st = bad.stat()  # same size and mtime, but the header is now noise (bit rot)
    bad.write_bytes((b"garbage" * st.st_size)[: st.st_size])
    os.utime(bad, ns=(st.st_atime_ns, st.st_mtime_ns))
    rig.drain()
    assert rig.names(rig.source.sent) == {"s/IM00001.dcm", "s/IM00003.dcm"}
    assert rig.names(rig.source.failed) == {"s/IM00002.dcm"}
    reason = rig.reason("IM00002.dcm")
    assert reason["stage"] == "applying the metadata rules"
    assert "File Meta Information" in str(reason["reason"])


def test_an_unwritable_spool_makes_files_wait_not_fail(rig_factory: Callable[..., Rig]) -> None:
    def archive(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=stow_json(sop_uids_in(request)))

    rig = rig_factory(archive, rules=NEW_ID)
    rig.config.spool.write_text("not a folder")  # the spool path is taken by a file
    make_study(rig.source.watch / "s", 2)
    rig.find()
    rig.drain()
    assert rig.names(rig.source.failed) == set() and rig.names(rig.source.sent) == set()
    [(_, _, _, _, _, _, error)] = rig.queue.recent_errors(1)
    assert "cannot create the spool folder" in error
    assert rig.queue.counts() == {"waiting": 2}
    rig.config.spool.unlink()
    rig.clock.now += 3600
    rig.drain()
    assert rig.names(rig.source.sent) == {"s/IM00001.dcm", "s/IM00002.dcm"}


def test_files_read_again_keep_the_sidecar_text_they_were_first_read_with(
    rig_factory: Callable[..., Rig],
) -> None:
    seen: list[str] = []
    archive = storing_all(seen)
    rig = rig_factory(archive, sidecars=Sidecars())
    make_instance(rig.source.watch / "room1/a.dcm", patient_id="UNKNOWN")
    meta = rig.source.watch / "room1/_metadata.yaml"
    meta.write_text("PatientID: PAT-A\n")
    rig.find()
    rig.worker.classify_some()
    meta.write_text("PatientID: PAT-B\n")  # the room's next patient, before a was sent
    assert rig.queue.replan("ct", "rules changed") == 1  # as after a restart with new rules
    rig.drain()
    assert seen == ["PAT-A"]
    assert (rig.source.sent / "room1/_metadata.yaml").read_text() == "PatientID: PAT-A\n"
    assert meta.read_text() == "PatientID: PAT-B\n"  # left for the next patient's files


def test_a_file_queued_without_sidecars_never_takes_a_later_one(
    rig_factory: Callable[..., Rig],
) -> None:
    seen: list[str] = []
    archive = storing_all(seen)
    rig = rig_factory(archive, sidecars=Sidecars())
    make_instance(rig.source.watch / "room1/a.dcm", patient_id="PAT-A")
    rig.find()  # queued: no sidecar then
    meta = rig.source.watch / "room1/_metadata.yaml"
    meta.write_text("PatientID: PAT-B\n")  # written for the next patient's files
    rig.worker.classify_some()
    assert rig.queue.replan("ct", "rules changed") == 1
    rig.drain()
    assert seen == ["PAT-A"]
    assert not (rig.source.sent / "room1/_metadata.yaml").exists()
    assert meta.exists()


def test_a_sidecar_that_is_not_utf8_fails_its_file_and_is_kept(
    rig_factory: Callable[..., Rig],
) -> None:
    rig = rig_factory(storing_all([]), sidecars=Sidecars())
    make_instance(rig.source.watch / "s/a.dcm")
    raw = '{"PatientName": "M\xfcller"}'.encode("latin-1")
    (rig.source.watch / "s/a.json").write_bytes(raw)
    rig.find()
    rig.drain()
    assert rig.names(rig.source.failed) == {"s/a.dcm", "s/a.json"}
    assert (rig.source.failed / "s/a.json").read_bytes() == raw  # the user's file, as it was
    assert "not UTF-8" in str(rig.reason("a.dcm")["reason"])


def test_a_sidecar_unreadable_when_found_fails_the_file_and_is_never_read_again(
    rig_factory: Callable[..., Rig],
) -> None:
    seen: list[str] = []
    archive = storing_all(seen)
    rig = rig_factory(archive, sidecars=Sidecars())
    make_instance(rig.source.watch / "room1/a.dcm", patient_id="UNKNOWN")
    meta = rig.source.watch / "room1/_metadata.yaml"
    latin1 = "PatientName: M\xfcller^Anna\n".encode("latin-1")  # patient A, not UTF-8
    meta.write_bytes(latin1)
    rig.find()
    meta.write_text("PatientID: PAT-B\n")  # the next patient's, before a was read
    rig.drain()
    assert seen == []
    assert rig.names(rig.source.failed) == {"room1/a.dcm", "room1/_metadata.yaml"}
    assert (rig.source.failed / "room1/_metadata.yaml").read_bytes() == latin1  # as found
    assert "not UTF-8" in str(rig.reason("a.dcm")["reason"])


def test_a_sidecar_corrected_after_its_file_was_queued_is_not_deleted(
    rig_factory: Callable[..., Rig],
) -> None:
    rig = rig_factory(storing_all([]), sidecars=Sidecars())
    make_instance(rig.source.watch / "s/a.dcm")
    own = rig.source.watch / "s/a.json"
    latin1 = '{"PatientName": "M\xfcller"}'.encode("latin-1")
    own.write_bytes(latin1)
    rig.find()
    own.write_text('{"PatientName": "Müller"}', encoding="utf-8")  # the user fixes it
    rig.drain()
    assert rig.names(rig.source.failed) == {"s/a.dcm", "s/a.json"}
    assert (rig.source.failed / "s/a.json").read_bytes() == latin1  # what a.dcm failed with
    assert own.read_text(encoding="utf-8") == '{"PatientName": "Müller"}'  # the fix is kept


# --------------------------------------------------------------------------- bulkdata

PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


def storing_instances(seen: list[pydicom.Dataset]) -> Handler:
    """An archive that stores every Part-10 part, keeping each instance in ``seen``."""

    def archive(request: httpx.Request) -> httpx.Response:
        body = request.read()
        boundary = request.headers["Content-Type"].split("boundary=")[1].encode()
        found = [
            pydicom.dcmread(io.BytesIO(c.split(b"\r\n\r\n", 1)[1][:-2]))
            for c in body.split(b"--" + boundary)[1:-1]
        ]
        seen.extend(found)
        return httpx.Response(200, json=stow_json([str(ds.SOPInstanceUID) for ds in found]))

    return archive


def test_unknown_types_are_left_alone_when_ignored(
    rig_factory: Callable[..., Rig],
) -> None:
    seen: list[pydicom.Dataset] = []
    rig = rig_factory(storing_instances(seen), bulk=Bulkdata(unknown="ignore"))
    (rig.source.watch / "notes.txt").write_text("not a type stowd knows\n")
    (rig.source.watch / "a.pdf").write_bytes(PDF)
    rig.find()
    rig.drain()
    assert rig.names(rig.source.sent) == {"a.pdf"} and len(seen) == 1
    assert rig.names(rig.source.watch) == {"notes.txt"}
    assert rig.queue.counts() == {"sent": 1, "ignored": 1}
    rig.find()  # a rescan does not queue the ignored file again
    rig.drain()
    assert rig.queue.counts() == {"sent": 1, "ignored": 1}


def test_unknown_and_excluded_types_go_to_failed_with_the_reason(
    rig_factory: Callable[..., Rig],
) -> None:
    strict = rig_factory(storing_instances([]), bulk=Bulkdata(types=("jpeg",)))
    (strict.source.watch / "notes.txt").write_text("not a type stowd knows\n")
    (strict.source.watch / "b.pdf").write_bytes(PDF)
    strict.find()
    strict.drain()
    assert strict.names(strict.source.failed) == {"notes.txt", "b.pdf"}
    assert "not a file type stowd can send" in str(strict.reason("notes.txt")["reason"])
    assert "makes DICOM only from these types: jpeg" in str(strict.reason("b.pdf")["reason"])


def test_made_instances_follow_the_rules_and_keep_their_uids_across_retries(
    rig_factory: Callable[..., Rig],
) -> None:
    seen: list[pydicom.Dataset] = []
    answers = iter([503, 200, 200, 200])
    store = storing_instances(seen)

    def archive(request: httpx.Request) -> httpx.Response:
        status = next(answers)
        return store(request) if status == 200 else httpx.Response(status)

    rules = (
        Rule(
            "rules[0]",
            None,
            match=Match(regex=re.compile("^(?P<pid>[^/]+)/")),
            set=(("PatientID", Template.parse("{regex.pid}")),),
        ),
        Rule(
            "rules[1]",
            None,
            match=Match(regex=re.compile("^given/")),
            set=(("StudyInstanceUID", Template.parse("1.2.3.4.5")),),
        ),
    )
    rig = rig_factory(archive, rules=rules, initial=1.0, maximum=1.0)
    for rel in ("P1/a.pdf", "P1/b.pdf", "P2/c.pdf", "given/d.pdf"):
        (rig.source.watch / rel).parent.mkdir(parents=True, exist_ok=True)
        (rig.source.watch / rel).write_bytes(PDF)
    rig.find()
    rig.drain()  # the first request gets 503: the files wait
    queued = {j.path: j.sop_uid for j in rig.queue.jobs()}
    rig.clock.now += 3600
    rig.drain()
    assert rig.names(rig.source.sent) == {"P1/a.pdf", "P1/b.pdf", "P2/c.pdf", "given/d.pdf"}
    by_patient = {str(ds.PatientID): ds for ds in seen}
    assert {j.path: j.sop_uid for j in rig.queue.jobs()} == queued  # the same UIDs
    assert {str(ds.SOPInstanceUID) for ds in seen} == set(queued.values())
    p1 = [ds for ds in seen if ds.PatientID == "P1"]
    assert len(p1) == 2 and p1[0].StudyInstanceUID == p1[1].StudyInstanceUID
    assert p1[0].StudyInstanceUID != by_patient["P2"].StudyInstanceUID
    assert sorted(int(ds.InstanceNumber) for ds in p1) == [1, 2]
    given = [ds for ds in seen if ds.StudyInstanceUID == "1.2.3.4.5"]
    assert len(given) == 1 and str(given[0].SOPInstanceUID).startswith("2.25.")
    assert list(rig.config.spool.iterdir()) == []


def test_a_study_key_without_its_value_fails_the_file_with_the_reason(
    rig_factory: Callable[..., Rig],
) -> None:
    key = Bulkdata(study_key=Template.parse("{sidecar.AccessionNumber}"))
    rig = rig_factory(storing_instances([]), bulk=key, sidecars=Sidecars())
    (rig.source.watch / "a.pdf").write_bytes(PDF)
    rig.find()
    rig.drain()
    assert rig.names(rig.source.failed) == {"a.pdf"}
    reason = str(rig.reason("a.pdf")["reason"])
    assert reason.startswith("bulkdata.study_key: {sidecar.AccessionNumber} has no value")


def test_a_file_rewritten_while_its_instance_is_built_is_sent_once_as_new(
    rig_factory: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[pydicom.Dataset] = []
    rig = rig_factory(storing_instances(seen))
    path = rig.source.watch / "a.pdf"
    path.write_bytes(PDF)
    rig.find()
    rig.worker.classify_some()
    [first] = rig.queue.jobs()

    def rewriting_detect(at: Path) -> Media:
        found = real_detect(at)
        path.write_bytes(PDF.replace(b"Catalog", b"CATALOG"))  # same size, new content
        os.utime(path, ns=(first.mtime_ns + 10**9, first.mtime_ns + 10**9))
        return found

    monkeypatch.setattr("stowd.pipeline.worker.detect", rewriting_detect)
    rig.drain()
    assert seen == [] and rig.queue.counts() == {"gone": 1}  # the old content is not sent
    monkeypatch.setattr("stowd.pipeline.worker.detect", real_detect)
    rig.find()
    rig.drain()
    [stored] = seen
    assert b"CATALOG" in bytes(stored.EncapsulatedDocument)
    assert stored.SOPInstanceUID != first.sop_uid  # new content, new instance
    assert rig.names(rig.source.sent) == {"a.pdf"}


def test_read_again_with_another_patient_a_file_gets_a_new_study(
    rig_factory: Callable[..., Rig],
) -> None:
    seen: list[pydicom.Dataset] = []

    def patient(pid: str) -> tuple[Rule, ...]:
        return (Rule("rules[0]", None, set=(("PatientID", Template.parse(pid)),)),)

    rig = rig_factory(storing_instances(seen), rules=patient("WRONG"))
    (rig.source.watch / "a.pdf").write_bytes(PDF)
    (rig.source.watch / "b.pdf").write_bytes(PDF + b"%")
    rig.find()
    rig.worker.classify_some()
    wrong = {j.path: j.made_uids() for j in rig.queue.jobs()}
    same = Rig.__new__(Rig)  # the same queue and folders, read with corrected rules
    same.__dict__.update(rig.__dict__)
    fixed = replace(rig.config, rules=patient("RIGHT"))
    same.worker = Worker(fixed, rig.queue, rig.worker.destination, rig.client, rig.stop)
    assert rig.queue.replan("ct", "digest of the corrected rules") == 2
    same.drain()
    assert {str(ds.PatientID) for ds in seen} == {"RIGHT"}
    right = {str(ds.StudyInstanceUID) for ds in seen}
    assert len(right) == 1 and right.isdisjoint({m.study for m in wrong.values() if m})


def test_a_500_for_one_file_counts_one_retry_as_server_error(
    rig_factory: Callable[..., Rig],
) -> None:
    rig = rig_factory(lambda _request: httpx.Response(500, text="boom"))
    make_instance(rig.source.watch / "a.dcm")
    rig.find()

    def count(reason: str) -> float:
        labels = {"destination": "pacs", "reason": reason}
        return counters.REGISTRY.get_sample_value("stowd_retries_total", labels) or 0.0

    before = {reason: count(reason) for reason in counters.REASONS}
    rig.drain()
    after = {reason: count(reason) for reason in counters.REASONS}
    assert {r: after[r] - before[r] for r in counters.REASONS if after[r] != before[r]} == {
        counters.SERVER_ERROR: 1.0
    }


def test_a_batch_is_moved_while_the_next_one_uploads(rig_factory: Callable[..., Rig]) -> None:
    """The settle of a batch overlaps the upload of the next (issue 19): while the first
    batch's moves wait (``MOVING`` held here), the second batch still goes to the archive;
    its files count as sent only once moved."""
    requests: list[list[str]] = []
    second = threading.Event()

    def archive(request: httpx.Request) -> httpx.Response:
        uids = sop_uids_in(request)
        requests.append(uids)
        if len(requests) == 2:
            second.set()
        return httpx.Response(200, json=stow_json(uids))

    rig = rig_factory(archive)
    make_study(rig.source.watch / "a", 20)  # two batches of 10
    rig.find()
    sender = threading.Thread(target=rig.worker.run, daemon=True)
    try:
        with settle.MOVING:
            sender.start()
            assert second.wait(60), "the second batch waited for the first batch's moves"
            assert rig.names(rig.source.sent) == set()
            assert "sent" not in rig.queue.counts()  # not done before its move
        wait_for(lambda: rig.queue.counts() == {"sent": 20}, 60, "all 20 settled")
        assert len(rig.names(rig.source.sent)) == 20
    finally:
        rig.stop.set()
        sender.join(60)
    assert not sender.is_alive()


# A sender settles a batch behind (``filing.Behind``) while that settle waits, as behind a
# slow move (``MOVING`` held), when the process ends.
ENDING_WHILE_SETTLING = """
import sys, threading
from pathlib import Path
from stowd.config.model import BatchLimits, Config, Destination, Source
from stowd.pipeline.filing import Behind, Filing
from stowd.pipeline.queue import NewFile, SqliteQueue
from stowd.pipeline.settle import MOVING, Decision

root = Path(sys.argv[1])
source = Source("ct", root / "drop", root / "sent", root / "failed", "pacs")
dest = Destination("pacs", "http://archive.test/dicom-web", BatchLimits())
config = Config(root / "c.yaml", root / "q.db", (source,), {"pacs": dest})
queue = SqliteQueue(config.queue).open()
path = root / "drop" / "x.dcm"
path.parent.mkdir(parents=True)
path.write_bytes(b"x")
st = path.stat()
queue.enqueue([NewFile("ct", "pacs", str(path), "x.dcm", st.st_size, st.st_mtime_ns)])
[job] = queue.jobs()
MOVING.acquire()
started = threading.Event()

def sender() -> None:
    behind = Behind(Filing(config, queue, name="pacs"), lambda ids: None)
    behind.start([Decision(job, source, "sent")], [job.id])
    started.set()
    threading.Event().wait()

threading.Thread(target=sender, daemon=True).start()
assert started.wait(30)
queue.close()
print("exiting", flush=True)
"""


def test_a_settle_behind_never_keeps_the_process_from_ending(tmp_path: Path) -> None:
    """The thread that moves a batch while the next one uploads ends with the process, like
    the sender it works for: a settle still running when stowd exits (``shutdown_timeout``
    passed, the queue closed and its lock given up) is cut short as by a crash, and the next
    start recovers or repairs its rows.  A thread the interpreter waits for at exit (a
    ``ThreadPoolExecutor``'s) kept stowd running past ``shutdown_timeout``, writing to a queue
    another stowd may already have opened, and let ``stowd migrate`` change the queue after
    its report."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", ENDING_WHILE_SETTLING, str(tmp_path)],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not end: it waits for the settle behind at exit")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "exiting\n"


def test_rows_settled_behind_stay_held_when_a_failed_release_is_retried(
    rig_factory: Callable[..., Rig],
) -> None:
    """A release that failed (the queue could not be written) is retried at the start of the
    next step; the batch still settled behind meanwhile stays held, so the daemon's reclaim
    never returns its claimed rows to pending (they would be sent again while moved).  The
    failed release is set up directly: producing it through the queue takes its 30 s busy
    timeout."""
    rig = rig_factory(lambda request: httpx.Response(200, json=stow_json(sop_uids_in(request))))
    make_study(rig.source.watch / "a", 20)  # two batches of 10
    rig.find()
    while rig.worker.classify_some():  # both batches read: a step sends before it reads
        pass
    first = {job.id for job in rig.queue.jobs()}
    stepping = threading.Thread(target=rig.worker.step, daemon=True)
    with settle.MOVING:  # the first batch's settle waits here, behind
        assert rig.worker.step()  # the first batch uploaded, settled behind
        behind = rig.worker.held
        assert len(behind) == 10
        rig.worker._unreleased.add(min(first - behind))  # its release failed: retried first
        rig.queue.hold("pacs", until=rig.clock.now + 3600, reason="test: nothing more is sent")
        stepping.start()  # releases that row, then waits for the settle behind
        wait_for(lambda: waits_for_its_settle(stepping), 60, "the step waits for the settle")
        rig.clock.now += lease(rig.worker.destination) + 1  # the first batch's lease ran out
        worker = rig.worker
        assert rig.queue.reclaim(worker.held if worker.running else frozenset()) == 0
    stepping.join(60)
    assert not stepping.is_alive()
    assert rig.queue.counts() == {"sent": 10, "pending": 10}


def waits_for_its_settle(thread: threading.Thread) -> bool:
    """Is ``thread`` inside ``Behind.wait`` (waiting for the batch settled behind)?"""
    frame = sys._current_frames().get(thread.ident or 0)
    while frame is not None:
        if frame.f_code.co_name == "wait" and "filing" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def test_a_failed_settle_behind_is_raised_before_the_next_batch_is_sent(
    rig_factory: Callable[..., Rig],
    tmp_path: Path,
    postgres_cluster: PostgresCluster,
    pg_database: str,
) -> None:
    """A batch's settle behind fails (the connections to the shared queue were cut while
    its moves waited); the sender says so before it claims anything new.  Raised only by
    the next batch's ``Behind.start``, after that batch was uploaded, the error dropped that
    batch's outcome too: its files were released and sent again (a node cut off its
    database uploaded each sender's first batch twice once it reached it again)."""
    requests: list[list[str]] = []

    def archive(request: httpx.Request) -> httpx.Response:
        uids = sop_uids_in(request)
        requests.append(uids)
        return httpx.Response(200, json=stow_json(uids))

    rig = rig_factory(archive)
    node = node_config(postgres_cluster, pg_database, tmp_path, "node-a")
    config = replace(rig.config, queue=node.queue, database=node.database, node=node.node)
    rig.queue.close()
    rig.queue = open_queue(config, clock=rig.clock).open()
    rig.worker = Worker(config, rig.queue, config.destinations["pacs"], rig.client, rig.stop,
                        clock=rig.clock)  # fmt: skip
    make_study(rig.source.watch / "a", 30)  # three batches of 10
    rig.find()
    while rig.worker.classify_some():  # all read: a step sends before it reads
        pass
    behind = rig.worker._behind
    assert rig.worker.step()  # the first batch: its settle thread connects to the queue
    assert behind.wait()
    with settle.MOVING:  # the second batch's settle waits here, behind
        assert rig.worker.step()  # the second batch uploaded, settled behind
        assert postgres_cluster.terminate(pg_database) > 0  # the connections cut
    wait_for(lambda: behind.failed, 60, "the settle behind failed")
    for _ in range(50):  # the queue works again: a new connection per thread
        try:
            if not rig.worker.step():
                break
        except QueueError:
            continue
    assert rig.queue.counts() == {"sent": 30}
    posted = Counter(uid for batch in requests for uid in batch)
    assert len(posted) == 30
    again = {uid for uid, n in posted.items() if n > 1}
    assert again == set(requests[1]), f"sent again (only the batch not recorded may be): {again}"
