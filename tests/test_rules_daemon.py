"""Metadata rules and sidecars end to end: the real daemon against a real Orthanc."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from dicomgen import make_instance, make_study
from harness import Layout, Stowd, make_layout, run_cli, wait_for
from orthanc import Orthanc

MERGED_STUDY = "1.2.826.0.1.3680043.8.498.77001"
RULES = [
    {
        "name": "patients by folder",
        "match": {"regex": "^patients/(?P<pid>[^/]+)/(?P<acc>[^/]+)/"},
        "set": {
            "PatientID": "{regex.pid}",
            "AccessionNumber": "{regex.acc}",
            "InstitutionName": "Radiology {source}",
        },
    },
    {
        "name": "birth date from folder",
        "match": {"regex": "^dates/(?P<d>[^/]+)/"},
        "set": {"PatientBirthDate": "{regex.d}"},
    },
    {"name": "one study", "match": {"path": "merge/*"}, "set": {"StudyInstanceUID": MERGED_STUDY}},
]


def stored(orthanc: Orthanc, sop_uid: str) -> dict[str, Any]:
    """The tags Orthanc stored for one instance."""
    found = orthanc.post_json(
        "/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}}
    )
    assert len(found) == 1, found
    tags: dict[str, Any] = orthanc.get_json(f"/instances/{found[0]}/simplified-tags")
    return tags


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def rules_layout(root: Path, url: str) -> Layout:
    return make_layout(
        root,
        url,
        source={"sidecars": True},
        rules=RULES,
        original_attributes=True,
    )


def drop_everything(layout: Layout) -> dict[str, str]:
    """Files for every rule, a sidecar case and an untouched file; returns name -> SOP UID."""
    drop = layout.drop
    uids = {
        "patients": make_instance(drop / "patients/P123/ACC9/a.dcm", patient_id="WRONG"),
        "date": make_instance(drop / "dates/2024-13-45/b.dcm"),
        "good_date": make_instance(drop / "dates/19800214/c.dcm"),
        "merge1": make_instance(drop / "merge/m1.dcm"),
        "merge2": make_instance(drop / "merge/m2.dcm"),
        "plain": make_instance(drop / "plain/p.dcm", patient_id="KEEP"),
        "side1": make_instance(drop / "scanner/s1.dcm", patient_id="OLD"),
        "side2": make_instance(drop / "scanner/s2.dcm", patient_id="OLD"),
    }
    (drop / "scanner/_metadata.yaml").write_text(
        "PatientName: Müller^Jörg\nPatientBirthDate: '19700101'\n", encoding="utf-8"
    )
    (drop / "scanner/s1.json").write_text(json.dumps({"PatientID": "SC-1"}), encoding="utf-8")
    uids["bad_sidecar"] = make_instance(drop / "bad/y.dcm")
    (drop / "bad/y.json").write_text(json.dumps({"PatientBirthDate": "1980-02-30"}))
    return uids


def test_rules_and_sidecars_reach_orthanc_and_originals_stay_intact(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    layout = rules_layout(tmp_path / "run", orthanc.dicomweb_url)
    uids = drop_everything(layout)
    before = digests(layout.drop)
    with Stowd(layout) as daemon:
        wait_for(
            lambda: layout.files(layout.drop) == {"scanner/_metadata.yaml"},
            90,
            "every file and per-file sidecar to leave drop/",
            lambda: daemon.log,
        )
        assert daemon.terminate() == 0

    # Data files in sent/ are byte-identical to what was dropped; sidecars went with them.
    sent, failed = digests(layout.sent), digests(layout.failed)
    failing = {"dates/2024-13-45/b.dcm", "bad/y.dcm", "bad/y.json"}
    for rel, digest in before.items():
        assert (failed if rel in failing else sent)[rel] == digest, rel
    assert layout.files(layout.failed) == failing
    assert {"scanner/_metadata.yaml", "scanner/s1.json"} <= layout.files(layout.sent)

    tags = stored(orthanc, uids["patients"])
    assert (tags["PatientID"], tags["AccessionNumber"]) == ("P123", "ACC9")
    assert tags["InstitutionName"] == "Radiology ct1"
    [original] = tags["OriginalAttributesSequence"]
    assert original["ModifiedAttributesSequence"][0]["PatientID"] == "WRONG"
    assert original["ModifyingSystem"] == "stowd"

    assert stored(orthanc, uids["good_date"])["PatientBirthDate"] == "19800214"
    assert stored(orthanc, uids["plain"])["PatientID"] == "KEEP"
    assert "OriginalAttributesSequence" not in stored(orthanc, uids["plain"])

    merged = {stored(orthanc, uids[k])["StudyInstanceUID"] for k in ("merge1", "merge2")}
    assert merged == {MERGED_STUDY}

    side1, side2 = stored(orthanc, uids["side1"]), stored(orthanc, uids["side2"])
    assert (side1["PatientID"], side2["PatientID"]) == ("SC-1", "OLD")
    assert side1["PatientName"] == side2["PatientName"] == "Müller^Jörg"
    assert side1["SpecificCharacterSet"] == "ISO_IR 192"
    assert side2["PatientBirthDate"] == "19700101"

    errors = layout.error_files()
    reason = json.loads(errors["dates/2024-13-45/b.dcm"].read_text())
    assert reason["stage"] == "applying the metadata rules"
    assert "birth date from folder" in reason["reason"]
    assert "PatientBirthDate (DA)" in reason["reason"]
    assert "2024-13-45" in reason["reason"]
    reason = json.loads(errors["bad/y.dcm"].read_text())
    assert reason["reason"].startswith("sidecar y.json: PatientBirthDate (DA)")
    assert orthanc.instance_count() == len(uids) - 2
    assert not any(layout.root.joinpath("state", "queue.db.spool").glob("*")), "spool left behind"


def test_explain_shows_rules_and_changes_without_sending(tmp_path: Path) -> None:
    layout = rules_layout(tmp_path / "run", "http://127.0.0.1:9/dicom-web")
    drop_everything(layout)
    files = [str(layout.drop / p) for p in ("patients/P123/ACC9/a.dcm", "scanner/s1.dcm")]
    result = run_cli("explain", "-c", str(layout.config), *files)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "rule rules[0] 'patients by folder'" in out
    assert "PatientID        'WRONG' -> 'P123'" in out
    assert "InstitutionName  (absent) -> 'Radiology ct1'" in out
    assert "_metadata.yaml" in out and "s1.json" in out
    assert "PatientName" in out and "'Müller^Jörg'" in out

    bad = run_cli("explain", "-c", str(layout.config), "--json", str(layout.drop / "dates"))
    assert bad.returncode == 1
    [entry] = json.loads(bad.stdout)
    assert entry["problem"]
    assert layout.files(layout.sent) == set()  # nothing was sent or moved

    dates = str(layout.drop / "dates/2024-13-45/b.dcm")
    failing = run_cli("explain", "-c", str(layout.config), "--json", dates)
    assert failing.returncode == 1
    [entry] = json.loads(failing.stdout)
    assert "PatientBirthDate (DA)" in entry["problem"]


def test_explain_says_plainly_what_is_wrong_with_the_command(tmp_path: Path) -> None:
    """A file that does not exist, or lies outside every watch folder, is a mistake in the
    command, not a file the daemon would fail (issue 18)."""
    layout = make_layout(tmp_path / "run", "http://127.0.0.1:9/dicom-web")
    missing = layout.drop / "no-such.dcm"
    outside = tmp_path / "elsewhere.dcm"
    make_instance(outside)

    done = run_cli("explain", "-c", str(layout.config), str(missing), str(outside))

    assert done.returncode == 2, done.stderr
    lines = done.stdout.splitlines()
    assert lines[lines.index(str(missing)) + 1] == (
        "  cannot explain: no such file (nothing to explain: check the path)"
    )
    assert lines[lines.index(str(outside)) + 1] == (
        f"  cannot explain: not inside any source's watch folder (ct1: {layout.drop}); "
        "give --source NAME to explain it as a file of that source"
    )
    assert "failed/" not in done.stdout
    as_json = run_cli("explain", "-c", str(layout.config), "--json", str(missing))
    [entry] = json.loads(as_json.stdout)
    assert (entry["problem"], entry["error"]) == (
        None,
        "no such file (nothing to explain: check the path)",
    )


def test_check_config_lists_every_rule_problem_with_lines(tmp_path: Path) -> None:
    bad_rules = [
        {"set": {"PatientsName": "X"}},
        {"match": {"regex": "^(?P<pid>[^/]+)/"}, "set": {"StudyDate": "2024-01-05"}},
    ]
    layout = make_layout(tmp_path / "run", "http://127.0.0.1:9/dicom-web", rules=bad_rules)
    result = run_cli("check-config", "-c", str(layout.config))
    assert result.returncode == 2
    assert "rules[0].set.PatientsName" in result.stderr
    assert "did you mean 'PatientName'" in result.stderr
    assert "rules[1].set.StudyDate" in result.stderr and "20240105" in result.stderr
    assert result.stderr.count("line ") >= 2


def test_many_files_of_a_rewritten_study_are_grouped_by_the_new_uid(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    layout = make_layout(
        tmp_path / "run",
        orthanc.dicomweb_url,
        rules=[{"match": {"path": "**"}, "set": {"StudyInstanceUID": MERGED_STUDY}}],
    )
    for n in range(3):
        make_study(layout.drop / f"s{n}", 10)  # three studies become one
    with Stowd(layout) as daemon:
        wait_for(
            lambda: len(layout.files(layout.sent)) == 30, 90, "30 files sent", lambda: daemon.log
        )
        assert daemon.terminate() == 0
    assert orthanc.study_instance_uids() == {MERGED_STUDY}
    assert orthanc.instance_count() == 30


def test_kill_9_while_sending_rewritten_files_loses_and_duplicates_nothing(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    layout = make_layout(
        tmp_path / "run",
        orthanc.dicomweb_url,
        rules=[{"set": {"PatientID": "NEW-{dicom.PatientID}"}}],
        original_attributes=True,
        destinations={
            "pacs": {"url": orthanc.dicomweb_url, "workers": 1, "batch": {"max_files": 5}}
        },
    )
    uids: set[str] = set()
    for n in range(4):
        uids |= {u for _, u in make_study(layout.drop / f"s{n}", 15, size_bytes=200_000)}
    with Stowd(layout) as daemon:
        wait_for(
            lambda: len(layout.files(layout.sent)) >= 5, 60, "a first batch", lambda: daemon.log
        )
        daemon.kill()
        assert len(layout.files(layout.sent)) < 60, "too fast to interrupt anything"
    with Stowd(layout) as daemon:
        wait_for(
            lambda: len(layout.files(layout.sent)) == 60, 90, "all 60 sent", lambda: daemon.log
        )
        assert daemon.terminate() == 0
    assert layout.files(layout.drop) == set() and layout.files(layout.failed) == set()
    assert orthanc.sop_instance_uids() == uids
    assert {stored(orthanc, u)["PatientID"] for u in list(uids)[:5]} == {"NEW-P1"}
    assert not any(layout.root.joinpath("state", "queue.db.spool").glob("*")), "spool left behind"
