"""Issue 8 end to end: files dropped into ``<AccessionNumber>/`` join the archive's study (a
real Orthanc) or a worklist item (a small local QIDO-style server), with the archive's
patient and study attributes; no match waits then fails, several matches fail naming each."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pydicom
import yaml
from dicomgen import make_instance, make_instance_bytes
from harness import Layout, Stowd, make_layout, run_until, wait_for
from mediagen import make_jpeg, make_pdf
from orthanc import Orthanc
from worklist import Worklist, item, serve

from stowd.pipeline.queue import Job, open_readonly

PATIENT = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
BY_FOLDER = {"AccessionNumber": "{parts[0]}"}


def lookup_rule(**lookup: Any) -> dict[str, Any]:
    spec = {"in": "studies", "query": BY_FOLDER, "wait": "1h", **lookup}
    return {"name": "study of the folder", "match": {"type": ["jpeg", "pdf"]}, "lookup": spec}


def store(orthanc: Orthanc, accession: str, patient: str = "PID-1", **extra: Any) -> str:
    """A study in Orthanc with ``accession``; returns its StudyInstanceUID."""
    attrs = {
        "AccessionNumber": accession,
        "PatientName": f"Archive^{patient}",
        "PatientBirthDate": "19700203",
        "PatientSex": "F",
        "StudyDescription": f"Study {accession}",
        "ReferringPhysicianName": "Ref^Doc",
        **extra,
    }
    data, _ = make_instance_bytes(patient_id=patient, extra=attrs)
    r = httpx.post(orthanc.url + "/instances", content=data, timeout=30)
    r.raise_for_status()
    return str(pydicom.dcmread(pydicom.filebase.DicomBytesIO(data)).StudyInstanceUID)


def instances(orthanc: Orthanc) -> list[pydicom.Dataset]:
    found: list[pydicom.Dataset] = []
    for instance in orthanc.get_json("/instances"):
        data = orthanc.get_bytes(f"/instances/{instance}/file")
        found.append(pydicom.dcmread(pydicom.filebase.DicomBytesIO(data)))
    return found


def reason(layout: Layout, rel: str) -> str:
    return str(json.loads(layout.error_files()[rel].read_text())["reason"])


def queue_jobs(layout: Layout) -> list[Job]:
    """Every row of the daemon's queue, read as ``stowd status`` does (none before it exists)."""
    path = layout.root / "state" / "queue.db"
    if not path.exists():
        return []
    q = open_readonly(path)
    try:
        return q.jobs()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []  # the file exists a moment before the daemon has created its tables
        raise
    finally:
        q.close()


def queue_errors(layout: Layout) -> list[str]:
    return [json.loads(j.error)["reason"] for j in queue_jobs(layout) if j.error]


def test_photos_and_a_pdf_join_the_archived_study_with_its_patient(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    study = store(orthanc, "ACC-100", IssuerOfPatientID="HOSP")
    store(orthanc, "ACC-200", patient="PID-2")  # another patient's study: never chosen
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url, rules=[lookup_rule()])
    files = {"ACC-100/a.jpg", "ACC-100/b.jpg", "ACC-100/report.pdf"}
    make_jpeg(layout.drop / "ACC-100/a.jpg", seed=1)
    make_jpeg(layout.drop / "ACC-100/b.jpg", seed=2)
    make_pdf(layout.drop / "ACC-100/report.pdf")
    run_until(layout, lambda: layout.files(layout.sent) == files, "the three files sent", 90)

    assert orthanc.study_count() == 2  # no new study, no new patient
    by_study: dict[str, list[pydicom.Dataset]] = {}
    for ds in instances(orthanc):
        by_study.setdefault(ds.StudyInstanceUID, []).append(ds)
    [archived] = [d for d in by_study[study] if d.get("SeriesDescription") == "stowd test series"]
    made = [ds for ds in by_study[study] if ds is not archived]
    assert len(made) == 3
    for ds in made:
        for keyword in (*PATIENT, "IssuerOfPatientID", "AccessionNumber", "StudyDate"):
            assert str(ds.get(keyword)) == str(archived.get(keyword)), keyword
        assert ds.StudyDescription == "Study ACC-100"
        assert str(ds.ReferringPhysicianName) == "Ref^Doc"


def test_an_unknown_accession_waits_then_fails_with_the_reason(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url, rules=[lookup_rule(wait="4s")])
    make_jpeg(layout.drop / "NOPE-1/photo.jpg")
    with Stowd(layout) as daemon:
        waiting = "no study with AccessionNumber NOPE-1 in pacs yet; waiting until"
        wait_for(
            lambda: any(waiting in r for r in queue_errors(layout)),
            30,
            "the file waiting with the reason",
            lambda: daemon.log,
        )
        assert layout.files(layout.failed) == set()
        wait_for(
            lambda: layout.files(layout.failed) == {"NOPE-1/photo.jpg"},
            30,
            "the file in failed/",
            lambda: daemon.log,
        )
        assert daemon.terminate() == 0
    text = reason(layout, "NOPE-1/photo.jpg")
    assert text.startswith("no study with AccessionNumber NOPE-1 in pacs (looked for "), text
    assert orthanc.instance_count() == 0


def test_a_study_that_appears_later_is_found(tmp_path: Path, orthanc: Orthanc) -> None:
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url, rules=[lookup_rule(cache="0s")])
    make_jpeg(layout.drop / "LATE-1/photo.jpg")
    with Stowd(layout) as daemon:
        wait_for(
            lambda: any("LATE-1" in r for r in queue_errors(layout)),
            30,
            "the file waiting",
            lambda: daemon.log,
        )
        study = store(orthanc, "LATE-1")
        wait_for(
            lambda: layout.files(layout.sent) == {"LATE-1/photo.jpg"},
            30,
            "sent once the study is there",
            lambda: daemon.log,
        )
        assert daemon.terminate() == 0
    assert orthanc.study_instance_uids() == {study}


def test_two_studies_with_one_accession_fail_the_file_naming_both(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    first = store(orthanc, "TWIN-1", patient="PID-A")
    second = store(orthanc, "TWIN-1", patient="PID-B")
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url, rules=[lookup_rule()])
    make_pdf(layout.drop / "TWIN-1/scan.pdf")
    run_until(layout, lambda: layout.files(layout.failed) == {"TWIN-1/scan.pdf"}, "failed/", 90)
    text = reason(layout, "TWIN-1/scan.pdf")
    assert "2 studies with AccessionNumber TWIN-1 in pacs" in text, text
    assert first in text and second in text and "PID-A" in text and "PID-B" in text
    assert "never guesses" in text
    assert orthanc.instance_count() == 2


def test_a_dicom_file_with_a_wrong_patient_id_gets_the_archives(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    study = store(orthanc, "ACC-D1", patient="RIGHT-1")
    rule = {
        "match": {"type": "dicom"},
        "lookup": {"in": "studies", "query": {"AccessionNumber": "{dicom.AccessionNumber}"}},
    }
    layout = make_layout(
        tmp_path / "run", orthanc.dicomweb_url, rules=[rule], original_attributes=True
    )
    sop = make_instance(
        layout.drop / "scanner/x.dcm",
        patient_id="WRONG-1",
        extra={"AccessionNumber": "ACC-D1", "Modality": "DX"},
    )
    run_until(layout, lambda: layout.files(layout.sent) == {"scanner/x.dcm"}, "sent", 90)
    [ds] = [d for d in instances(orthanc) if d.SOPInstanceUID == sop]
    assert ds.PatientID == "RIGHT-1" and str(ds.PatientName) == "Archive^RIGHT-1"
    assert ds.StudyInstanceUID == study and ds.PatientBirthDate == "19700203"
    [record] = ds.OriginalAttributesSequence
    [old] = record.ModifiedAttributesSequence
    assert old.PatientID == "WRONG-1" and str(old.PatientName) == "Test^WRONG-1"


# --------------------------------------------------------------------------- worklist

WL_STUDY = "1.2.826.0.1.3680043.8.498.424242"


def scheduled(accession: str = "WL-1") -> dict[str, Any]:
    code = item(CodeValue="XR-HAND", CodingSchemeDesignator="99LOCAL", CodeMeaning="Hand")
    protocol = item(CodeValue="P-1", CodingSchemeDesignator="99LOCAL", CodeMeaning="Photo")
    step = item(
        ScheduledProcedureStepID="SPS-7",
        ScheduledProcedureStepDescription="Wound photo",
        ScheduledProcedureStepStartDate="20240105",
        Modality="XC",
        ScheduledProtocolCodeSequence=[protocol],
    )
    return item(
        PatientName="Worklist^Wanda",
        PatientID="WL-PID",
        PatientBirthDate="19800101",
        PatientSex="F",
        StudyInstanceUID=WL_STUDY,
        AccessionNumber=accession,
        ReferringPhysicianName="Ref^Wl",
        RequestedProcedureID="RP-3",
        RequestedProcedureDescription="Hand photos",
        RequestedProcedureCodeSequence=[code],
        ScheduledProcedureStepSequence=[step],
    )


def worklist_layout(root: Path, orthanc: Orthanc, url: str, **lookup: Any) -> Layout:
    rule = lookup_rule(**{"in": "worklist", "url": f"{url}/mwlitems", **lookup})
    return make_layout(root, orthanc.dicomweb_url, rules=[rule])


def test_twenty_photos_of_a_worklist_item_make_one_query_and_carry_its_request(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    worklist = Worklist([scheduled("WL-1"), scheduled("WL-OTHER")])
    with serve(worklist) as url:
        layout = worklist_layout(tmp_path / "run", orthanc, url)
        for n in range(20):
            make_jpeg(layout.drop / f"WL-1/p{n:02}.jpg", (64, 48), seed=n)
        run_until(layout, lambda: len(layout.files(layout.sent)) == 20, "20 files sent", 120)
    assert len(worklist.requests) == 1, worklist.requests
    assert "AccessionNumber=WL-1" in worklist.requests[0]
    found = instances(orthanc)
    assert len(found) == 20
    for ds in found:
        assert ds.StudyInstanceUID == WL_STUDY and ds.AccessionNumber == "WL-1"
        assert ds.PatientID == "WL-PID" and str(ds.PatientName) == "Worklist^Wanda"
        assert ds.ProcedureCodeSequence[0].CodeValue == "XR-HAND"
        [request] = ds.RequestAttributesSequence
        assert request.RequestedProcedureID == "RP-3"
        assert request.ScheduledProcedureStepID == "SPS-7"
        assert request.ScheduledProcedureStepDescription == "Wound photo"
        assert request.ScheduledProtocolCodeSequence[0].CodeValue == "P-1"
        assert request.RequestedProcedureCodeSequence[0].CodeMeaning == "Hand"
        assert request.AccessionNumber == "WL-1" and request.StudyInstanceUID == WL_STUDY


def test_after_kill_9_the_recorded_item_is_used_without_asking_again(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    worklist = Worklist([scheduled("WL-2")])
    with serve(worklist) as url:
        layout = worklist_layout(tmp_path / "run", orthanc, url, cache="0s")
        orthanc.stop()  # nothing is sent: the files stay classified in the queue
        for n in range(3):
            make_jpeg(layout.drop / f"WL-2/p{n}.jpg", (64, 48), seed=n)
        with Stowd(layout) as daemon:
            wait_for(lambda: classified(layout) == 3, 30, "3 files classified", lambda: daemon.log)
            daemon.kill()
        asked = len(worklist.requests)
        assert asked >= 1
        worklist.items = []  # the item is gone from the worklist now: the record is used
        # other rules (the files are read again at the start), the same query
        changed = worklist_layout(tmp_path / "run", orthanc, url, cache="0s")
        doc = yaml.safe_load(changed.config.read_text())
        doc["rules"][0]["set"] = {"SeriesDescription": "wound photos"}
        changed.config.write_text(yaml.safe_dump(doc))
        orthanc.start()
        run_until(layout, lambda: len(layout.files(layout.sent)) == 3, "3 files sent", 90)
    assert len(worklist.requests) == asked
    found = instances(orthanc)
    assert {ds.StudyInstanceUID for ds in found} == {WL_STUDY}
    assert {ds.SeriesDescription for ds in found} == {"wound photos"}  # read again


def classified(layout: Layout) -> int:
    return sum(1 for j in queue_jobs(layout) if j.kind is not None and j.lookup is not None)


def test_a_worklist_that_fails_keeps_the_files_waiting_with_the_reason(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    worklist = Worklist([scheduled("WL-3")])
    worklist.status = 500
    with serve(worklist) as url:
        layout = worklist_layout(tmp_path / "run", orthanc, url, wait="2s")
        make_jpeg(layout.drop / "WL-3/p.jpg")
        with Stowd(layout) as daemon:
            wait_for(
                lambda: any("HTTP 500" in r for r in queue_errors(layout)),
                30,
                "waiting on the worklist",
                lambda: daemon.log,
            )
            [text] = [r for r in queue_errors(layout) if "HTTP 500" in r]
            assert text.startswith(f"the lookup at {url}/mwlitems failed"), text
            assert layout.files(layout.failed) == set()  # archive trouble is not "no match"
            worklist.status = 200
            wait_for(
                lambda: layout.files(layout.sent) == {"WL-3/p.jpg"},
                30,
                "sent once the worklist answers",
                lambda: daemon.log,
            )
            assert daemon.terminate() == 0
    assert "Traceback" not in daemon.log
