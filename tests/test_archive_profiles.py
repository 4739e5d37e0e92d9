"""The real daemon against the archives that cannot run here (issue 15): dcm4chee-arc, Azure's
DICOM service, Google's Cloud Healthcare API and AWS HealthImaging, each a profile of the one
local test archive (``fakearchive.py``, every answer cited there).  For each: a batch judged
file by file (with a refused file and, where the archive has one, a warning), a re-send after
a lost answer, two files with one SOPInstanceUID; for dcm4chee the metadata + bulkdata form."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dicomgen import make_instance
from fakearchive import PROFILES, FakeArchive, check_metadata_form, parts_of
from harness import Layout, Stowd, make_layout, run_cli, wait_for, written_together
from mediagen import make_jpeg, make_pdf, make_video

NAMES = tuple(PROFILES)


@pytest.fixture(scope="module", params=NAMES)
def archive(request: pytest.FixtureRequest) -> Iterator[FakeArchive]:
    """One fake per profile for the whole module (UIDs are new in every test)."""
    with FakeArchive(PROFILES[request.param]()) as fake:
        yield fake


@pytest.fixture
def fake(archive: FakeArchive) -> Iterator[FakeArchive]:
    """The module's fake, checked after each test for faults of stowd's requests."""
    before = len(archive.faults)
    archive.lose(0, "")
    yield archive
    assert archive.faults[before:] == []


def layout_for(root: Path, fake: FakeArchive, **overrides: Any) -> Layout:
    dest = {"url": fake.base, "workers": 1, "timeouts": {"read": "30s"}}
    dest.update(overrides.pop("destination", {}))
    return make_layout(root, "", destinations={"pacs": dest}, **overrides)


def run(
    layout: Layout, fake: FakeArchive, done: set[str], failed: set[str], timeout: float = 60
) -> str:
    """Run the daemon until ``done`` are in sent/ and ``failed`` in failed/; its log."""
    faults = len(fake.faults)
    with Stowd(layout) as daemon:
        wait_for(
            lambda: _settled(layout, done, failed) or len(fake.faults) > faults,
            timeout,
            f"{sorted(done)} sent and {sorted(failed)} failed",
            lambda: f"{daemon.log}\nthe fake found: {fake.faults}",
        )
        assert daemon.terminate() == 0
    assert fake.faults[faults:] == []
    assert (layout.files(layout.sent), layout.files(layout.failed)) == (done, failed)
    return daemon.log


def _settled(layout: Layout, done: set[str], failed: set[str]) -> bool:
    """All settled as expected, or one settled otherwise (then no need to wait on)."""
    sent, gone = layout.files(layout.sent), layout.files(layout.failed)
    return (sent, gone) == (done, failed) or bool(sent - done) or bool(gone - failed)


def error_of(layout: Layout, name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(layout.error_files()[name].read_text())
    return doc


def status(layout: Layout) -> dict[str, Any]:
    result = run_cli("status", "-c", str(layout.config), "--json")
    assert result.returncode == 0, result.stderr
    found: dict[str, Any] = json.loads(result.stdout)
    return found


def counts(layout: Layout) -> dict[str, int]:
    found: dict[str, int] = status(layout)["counts"]
    return found


def already_stored(layout: Layout) -> int:
    return int(status(layout)["already_stored"])


# what each profile's refusal is (fakearchive.py cites them)
REFUSAL = {"dcm4chee": "A778", "azure": "A900", "google": "0110", "aws": "C000"}


def test_a_batch_is_judged_file_by_file(tmp_path: Path, fake: FakeArchive) -> None:
    """Two plain files, one the archive stores with its warning (if it has one) and one it
    refuses, in one drop: the stored ones (the warned one too) go to sent/, the refused one
    to failed/ with the archive's failure reason; the warning is logged and counted by
    ``stowd status``, never a failure."""
    name = fake.profile.name
    # Google's refusal (0x0110) may be transient: retried (at most retry.max_refusals times
    # alone on the wire; a short max_age bounds it as well)
    retry = {"initial": "200ms", "maximum": "500ms", "hold_probe": "500ms", "max_age": "3s"}
    layout = layout_for(tmp_path / "run", fake, retry=retry)
    study = "1.2.826.0.1.3680043.8.498.15"
    uids = {
        n: make_instance(layout.drop / n, study_uid=study, patient_id=pid, instance_number=i)
        for i, (n, pid) in enumerate(
            (("a.dcm", "P1"), ("b.dcm", "P1"), ("w.dcm", "WARN"), ("r.dcm", "REFUSE"))
        )
    }
    log = run(layout, fake, {"a.dcm", "b.dcm", "w.dcm"}, {"r.dcm"})

    assert {uids["a.dcm"], uids["b.dcm"], uids["w.dcm"]} <= set(fake.stored)
    assert uids["r.dcm"] not in fake.stored
    assert error_of(layout, "r.dcm")["failure_reason"] == REFUSAL[name]
    warned = 0
    if fake.profile.warning is not None:  # stored with a note: the log and stowd status
        code = f"{fake.profile.warning:04X}"
        assert f"w.dcm: stored with warning {code}" in log
        warned = 1
        text = run_cli("status", "-c", str(layout.config)).stdout
        assert "3 sent (1 with a warning: see the log)" in text
    assert status(layout)["stored_with_warning"] == warned
    if name == "dcm4chee":  # its reason comes in the Warning header of a 202 (or 409)
        assert 'said: 299 dcm4chee-arc "Patient ID REFUSE differs from Patient ID' in log
        assert error_of(layout, "r.dcm")["server_message"].startswith("299 dcm4chee-arc")
    assert counts(layout) == {"sent": 3, "failed": 1}


def test_dcm4chee_a_part_it_cannot_parse_fails_and_the_rest_is_stored(
    tmp_path: Path, dcm4chee: FakeArchive
) -> None:
    """dcm4chee names an unparsable part with a made-up SOPInstanceUID (0xC499): the file is
    in neither sequence of its 202, is sent again alone, gets 409 and fails with that code
    (on main the reason had no code: the item named another UID); the others are stored."""
    fake = dcm4chee
    retry = {"initial": "200ms", "maximum": "500ms", "hold_probe": "500ms", "max_age": "1h"}
    layout = layout_for(tmp_path / "run", fake, retry=retry)
    study = "1.2.826.0.1.3680043.8.498.18"
    make_instance(layout.drop / "a.dcm", study_uid=study, instance_number=1)
    make_instance(layout.drop / "u.dcm", study_uid=study, patient_id="UNPARSABLE")
    log = run(layout, fake, {"a.dcm"}, {"u.dcm"})
    error = error_of(layout, "u.dcm")
    assert (error["http_status"], error["failure_reason"]) == (409, "C499")
    assert "could not parse the DICOM file" in error["reason"]
    assert 'said: 299 dcm4chee-arc "Failed to parse DICOM stream"' in log


def resend_cases() -> list[Any]:
    return [pytest.param(n, h, id=f"{n}-{h}") for n in NAMES for h in ("drop", "500")]


@pytest.mark.parametrize(("name", "how"), resend_cases())
def test_a_resend_after_a_lost_answer_is_stored(tmp_path: Path, name: str, how: str) -> None:
    """The archive stores a batch and the answer is lost (the connection dropped, or a 500):
    stowd sends the files again, and what the archive says of a re-sent instance it holds
    (dcm4chee, Google, AWS: stored; Azure: 45070 "already stored") leaves them in sent/."""
    with FakeArchive(PROFILES[name]()) as fake:
        layout = layout_for(tmp_path / "run", fake)
        study = "1.2.826.0.1.3680043.8.498.16"
        uids = [make_instance(layout.drop / f"{n}.dcm", study_uid=study) for n in "ab"]
        fake.lose(1, how)
        written_together(layout.drop)  # both in the one request whose answer is lost
        log = run(layout, fake, {"a.dcm", "b.dcm"}, set())
        assert [fake.times_sent(u) for u in uids] == [2, 2]
        if name == "azure":  # 45070: recorded as already stored in the log and status
            assert log.count("already stored") >= 2
            assert already_stored(layout) == 2


# the second file of two with one SOPInstanceUID (other content): where it goes, by the
# archive's answer to it (fakearchive.py: dcm4chee ignores it and lists it stored, AWS stores
# it in a non-primary image set, Google answers 409 with 0x0110 "checksum mismatch", Azure
# 45070: stored already, which stowd judges as issue 15 decides)
SECOND = {"dcm4chee": "sent", "aws": "sent", "google": "failed", "azure": "sent"}


@pytest.mark.parametrize("name", NAMES)
def test_two_files_with_one_uid_go_in_two_requests_each_judged_by_its_own_answer(
    tmp_path: Path, name: str
) -> None:
    with FakeArchive(PROFILES[name]()) as fake:
        retry = {"initial": "200ms", "maximum": "500ms", "hold_probe": "500ms", "max_age": "3s"}
        layout = layout_for(tmp_path / "run", fake, retry=retry)
        uid = make_instance(layout.drop / "first.dcm", instance_number=1)
        make_instance(layout.drop / "second.dcm", sop_uid=uid, instance_number=2)
        second = SECOND[name]
        done = {"first.dcm", "second.dcm"} if second == "sent" else {"first.dcm"}
        run(layout, fake, done, {"second.dcm"} - done)
        assert fake.faults == []  # never the two in one request
        assert fake.times_sent(uid) >= 2
        if second == "failed":
            assert error_of(layout, "second.dcm")["failure_reason"] == "0110"
        if name == "azure":  # 45070 for the second: it holds an instance by these UIDs
            assert already_stored(layout) == 1


# -- dcm4chee: the metadata + bulkdata form ---------------------------------------------------
PATIENT_RULE = {"match": {"regex": "^(?P<pid>[^/]+)/"}, "set": {"PatientID": "{regex.pid}"}}
CDA = (
    b'<?xml version="1.0" encoding="utf-8"?>\n<ClinicalDocument xmlns="urn:hl7-org:v3">\n'
    b'<typeId root="2.16.840.1.113883.1.3"/>\n'
    b'<id root="2.16.840.1.113883.19.5" extension="c15"/>\n'
    b"<title>Brief</title>\n</ClinicalDocument>\n"
)


@pytest.fixture(scope="module")
def dcm4chee() -> Iterator[FakeArchive]:
    with FakeArchive(PROFILES["dcm4chee"](), keep_bodies=True) as fake:
        yield fake


def test_dcm4chee_takes_stowds_metadata_and_bulkdata_form_part_by_part(
    tmp_path: Path, dcm4chee: FakeArchive
) -> None:
    """PDF, CDA, JPEG, MPEG-2 and MP4 in the PS3.18 metadata + bulkdata form: the fake checks
    each request part by part (``check_metadata_form``) and refuses a wrong one, so every file
    in sent/ was sent in a right form."""
    fake = dcm4chee
    dest = {"bulkdata": "metadata"}
    layout = layout_for(tmp_path / "run", fake, destination=dest, rules=[PATIENT_RULE])
    drop = layout.drop
    make_pdf(drop / "P1/report.pdf")
    (drop / "P1/letter.xml").write_bytes(CDA)
    make_jpeg(drop / "P1/photo.jpg", seed=15)
    make_video(drop / "P1/clip.mpg", "mpeg2", seconds=0.2, size="64x48")
    make_video(drop / "P1/clip.mp4", "h264", seconds=0.2, size="64x48")
    names = {"P1/report.pdf", "P1/letter.xml", "P1/photo.jpg", "P1/clip.mpg", "P1/clip.mp4"}
    before = len(fake.stored)
    run(layout, fake, names, set(), timeout=90)
    assert fake.faults == []
    assert len(fake.stored) - before == 5
    kinds = {"application/pdf", "text/xml", "image/jpeg", "video/mpeg", "video/mp4"}
    assert {_kinds(body) for body in fake.bodies} >= kinds  # one type per request


def _kinds(request: tuple[str, bytes]) -> str:
    return " ".join(sorted(p.get_content_type() for p in parts_of(*request)[1:]))


BREAKS = {
    "no transfer-syntax": (b"; transfer-syntax=1.2.840.10008.1.2.4.50", b""),
    "wrong transfer-syntax": (b"syntax=1.2.840.10008.1.2.4.50", b"syntax=1.2.840.10008.1.2.1"),
    "Content-Location mismatch": (b"Content-Location: bulk/", b"Content-Location: other/"),
    "not an array": (b'[{"', b'{"x": [{"'),
}


@pytest.mark.parametrize("defect", BREAKS)
def test_the_fake_refuses_a_metadata_request_that_breaks_ps318(
    tmp_path: Path, dcm4chee: FakeArchive, defect: str
) -> None:
    """The checks that make the test above worth something: stowd's own JPEG request, with
    one defect put in, is refused (HTTP 400) and the defect named."""
    jpeg = [b for b in dcm4chee.bodies if _kinds(b) == "image/jpeg"]
    if not jpeg:  # run alone: make stowd send one
        layout = layout_for(
            tmp_path / "run", dcm4chee, destination={"bulkdata": "metadata"}, rules=[PATIENT_RULE]
        )
        make_jpeg(layout.drop / "P1/photo.jpg", seed=16)
        run(layout, dcm4chee, {"P1/photo.jpg"}, set())
        jpeg = [b for b in dcm4chee.bodies if _kinds(b) == "image/jpeg"]
    content_type, body = jpeg[-1]
    old, new = BREAKS[defect]
    assert old in body
    broken = body.replace(old, new, 1)
    assert check_metadata_form(parts_of(content_type, broken)) != []
    assert check_metadata_form(parts_of(content_type, body)) == []


def test_the_metadata_form_to_azure_holds_the_destination_and_fails_nothing(
    tmp_path: Path,
) -> None:
    """``bulkdata: metadata`` is for dcm4chee: Azure takes Part-10 only and answers 415. The
    destination is held (a setting to fix), the PDF stays queued and nothing goes to failed/."""
    with FakeArchive(PROFILES["azure"]()) as fake:
        layout = layout_for(tmp_path / "run", fake, destination={"bulkdata": "metadata"})
        make_pdf(layout.drop / "P1/report.pdf")
        with Stowd(layout) as daemon:
            wait_for(lambda: bool(fake.sizes), 60, "a request", lambda: daemon.log)
            wait_for(
                lambda: status(layout)["destinations"]["pacs"]["state"] == "held",
                60,
                "the destination held",
                lambda: daemon.log,
            )
            assert "HTTP 415" in status(layout)["destinations"]["pacs"]["reason"]
            assert daemon.terminate() == 0
        assert layout.files(layout.failed) == set()
        assert layout.files(layout.drop) == {"P1/report.pdf"}


# -- AWS: 1 GB per request ---------------------------------------------------------------------
def test_aws_requests_stay_within_its_limit_with_batch_max_bytes(tmp_path: Path) -> None:
    """AWS HealthImaging takes at most 1 GB per request; docs/archives.md says to keep
    ``batch.max_bytes`` below it.  Scaled down (a 300 kB limit, max_bytes 200 kB, files of
    60 kB): every request is within the limit and every file is stored."""
    with FakeArchive(PROFILES["aws"](), max_bytes=300_000) as fake:
        dest = {"batch": {"max_bytes": "200KB"}}
        layout = layout_for(tmp_path / "run", fake, destination=dest)
        study = "1.2.826.0.1.3680043.8.498.17"
        names = {f"{n}.dcm" for n in "abcdef"}
        for i, name in enumerate(sorted(names)):
            make_instance(layout.drop / name, study_uid=study, size_bytes=60_000, instance_number=i)
        run(layout, fake, names, set())
        assert len(fake.stored) == 6
        assert max(fake.sizes) <= 300_000 and len(fake.sizes) >= 2
