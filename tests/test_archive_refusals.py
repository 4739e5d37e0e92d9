"""Refusals and duplicates as each archive answers them (issue 15), in cases the profile tests
(test_archive_profiles.py) do not cover: two refusals in one request, a re-send after a lost
answer, migrate's count of what the archive held, requests that always overlap.  Against the
real daemon and the local test archive (``fakearchive.py``)."""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from dicomgen import make_instance
from fakearchive import Azure, Dcm4chee, FakeArchive, Instance, Outcome
from harness import Layout, Stowd, make_layout, run_cli, wait_for, written_together
from pydicom.uid import generate_uid
from test_already_stored import PROCESSING_FAILURE, ScriptedArchive
from test_already_stored import layout_for as already_layout

STUDY = "1.2.826.0.1.3680043.8.498.1501"


class Dcm4cheeTwoRefusals(Dcm4chee):
    """dcm4chee-arc refusing two instances of one request for two different reasons."""

    def refuse(self, instance: Instance) -> Outcome:
        if instance.sop_uid.endswith(".2"):
            # StoreService.java: SUBSEQUENT_OCCURRENCE_OF_REJECTED_OBJECT = 0xA771, with its
            # message format SUBSEQUENT_OCCURRENCE_OF_REJECTED_OBJECT_MSG
            text = (
                f"Subsequent occurrence of rejected Object [StudyIUID={STUDY}, SeriesIUID=1.2, "
                f"SOPIUID={instance.sop_uid}, rejection=113001^DCM]"
            )
            return Outcome(instance, failure=0xA771, text=text)
        return super().refuse(instance)  # 0xA778, "Patient ID REFUSE differs from ..."


def _error(layout: Layout, name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(layout.error_files()[name].read_text())
    return doc


def test_dcm4chee_two_refusals_in_one_request_each_keep_their_own_words(tmp_path: Path) -> None:
    """StowRS.setWarning keeps the message of the LAST failure of the request in its one
    Warning header (the items carry no text): it is the archive's words about that file only,
    so the other refused file's reason must not quote it as its own."""
    with FakeArchive(Dcm4cheeTwoRefusals()) as fake:
        dest = {"url": fake.base, "workers": 1, "timeouts": {"read": "30s"}}
        layout = make_layout(tmp_path / "run", "", destinations={"pacs": dest})
        conflict = f"{STUDY}.1"
        rejected = f"{STUDY}.2"
        make_instance(layout.drop / "c.dcm", study_uid=STUDY, sop_uid=conflict, patient_id="REFUSE")
        make_instance(
            layout.drop / "r.dcm",
            study_uid=STUDY,
            sop_uid=rejected,
            patient_id="REFUSE",
            instance_number=2,
        )
        written_together(layout.drop)  # both in one request only if queued together
        with Stowd(layout) as daemon:
            wait_for(
                lambda: layout.files(layout.failed) == {"c.dcm", "r.dcm"},
                60,
                "both files in failed/",
                lambda: daemon.log,
            )
            assert daemon.terminate() == 0
        assert [sorted(r) for r in fake.requests] == [[conflict, rejected]]  # one request
    c, r = _error(layout, "c.dcm"), _error(layout, "r.dcm")
    assert (c["failure_reason"], r["failure_reason"]) == ("A778", "A771")
    assert "Subsequent occurrence of rejected Object" not in c["reason"], c["reason"]
    assert "Patient ID REFUSE differs" not in r["reason"], r["reason"]


@pytest.mark.parametrize("files", [1, 3], ids=["alone", "batch"])
def test_duplicates_fail_does_not_flag_stowds_own_resend_after_a_lost_answer(
    tmp_path: Path, files: int
) -> None:
    """Azure stores the file and its answer is lost (HTTP 500, fakearchive ``lose``); stowd
    sends it again and Azure answers 45070.  The file the archive holds is this one: stowd
    sent it, so it belongs in sent/ even where re-sent UIDs from elsewhere are flagged."""
    with FakeArchive(Azure()) as fake:
        dest = {
            "url": fake.base,
            "workers": 1,
            "timeouts": {"read": "30s"},
            "duplicates": "fail",
        }
        retry = {"initial": "200ms", "maximum": "400ms", "hold_probe": "200ms"}
        layout = make_layout(tmp_path / "run", "", retry=retry, destinations={"pacs": dest})
        study = generate_uid()
        names = [f"{n}.dcm" for n in "abc"[:files]]
        uids = [make_instance(layout.drop / name, study_uid=study) for name in names]
        written_together(layout.drop)  # all in the one request whose answer is lost
        fake.lose(1, "500")
        with Stowd(layout) as daemon:
            wait_for(
                lambda: layout.files(layout.sent) | layout.files(layout.failed) == set(names),
                60,
                "the file settled",
                lambda: daemon.log,
            )
            assert daemon.terminate() == 0
        for uid in uids:  # a batch answered 500 is sent again file by file
            assert fake.times_sent(uid) == 2
            assert uid in fake.stored
    assert layout.files(layout.sent) == set(names)


def test_migrate_report_says_how_many_the_archive_held_already(tmp_path: Path) -> None:
    """A migration to Azure of files the archive holds already (an earlier tool copied them):
    Azure answers 45070 for each, and stowd settles them as stored, as ``stowd status`` says
    (``N sent (M of them already stored)``).  The closing summary must not claim it stored
    them in this run without saying that the archive held them already."""
    with FakeArchive(Azure()) as fake:
        dest = {"url": fake.base, "workers": 1, "timeouts": {"read": "30s"}}
        layout = make_layout(tmp_path / "run", "", destinations={"pacs": dest})
        old = tmp_path / "old"
        old.mkdir()
        held = [make_instance(old / f"{n}.dcm", instance_number=i) for i, n in enumerate("ab")]
        make_instance(old / "new.dcm", instance_number=3)
        for uid in held:
            fake.stored[uid] = "held before the migration"
        result = run_cli(
            "migrate", "-c", str(layout.config), str(old), "--destination", "pacs", timeout=120
        )
        assert result.returncode == 0, result.stdout + result.stderr
    assert "stored:   3 file(s)" in result.stdout, result.stdout
    assert "2 of them already stored" in result.stdout, result.stdout


class AlwaysTogether(ScriptedArchive):
    """A busy archive: every request is answered only once another one is in flight too
    (a steady stream of files from other workers), so no request is ever alone."""

    def __init__(self, plan: dict[str, list[int]]) -> None:
        super().__init__(plan)
        self.pairs = threading.Barrier(2)  # resets itself after each pair

    def meet(self) -> None:
        with contextlib.suppress(threading.BrokenBarrierError):
            self.pairs.wait(30)


def test_a_permanent_refusal_fails_even_when_requests_always_overlap(tmp_path: Path) -> None:
    """Two files Google refuses for good (same UIDs, other content: 0x0110), each its own
    study, workers: 2, and an archive that answers a request only while another is in
    flight: each should still fail, after ten times retry.max_refusals such refusals.
    Was: never counted, so retried until retry.max_age (7 days)."""
    with AlwaysTogether({}) as archive:
        layout = already_layout(tmp_path, archive.url, workers=2)
        uids = [make_instance(layout.drop / f"{n}.dcm") for n in "ab"]  # two studies
        for uid in uids:
            archive.plan[uid], archive.asked[uid] = [PROCESSING_FAILURE], 0
        with Stowd(layout) as daemon:
            wait_for(
                lambda: layout.files(layout.failed) == {"a.dcm", "b.dcm"},
                120,  # 30 crowded refusals each (10 x max_refusals), 200-400 ms apart
                "both files in failed/ after their refusals",
                lambda: daemon.log,
            )
            assert daemon.terminate() == 0
    for name in ("a.dcm", "b.dcm"):
        error = json.loads((layout.failed / f"{name}.error.json").read_text())
        assert "times while other requests were in flight" in error["reason"], error
        assert error["refusals_crowded"] == 30
