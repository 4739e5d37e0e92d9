"""The ``lookup`` rule action without an archive: config checks, the rendered query, the
DICOM JSON answer, exact matching, what is copied, and the Finder against a local worklist
(cache, waiting, several matches, trouble)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from harness import Clock
from mediagen import make_jpeg
from test_rules import load, problems, run
from worklist import Worklist, item, serve

from stowd.commands import dryrun
from stowd.commands.explain import explain, render
from stowd.config.model import Config
from stowd.errors import FileProblem, LookupNoMatchYet, LookupUnavailable, RuleFailure
from stowd.pipeline.lookup import Finder, copied, exact, params, parse
from stowd.pipeline.metadata import digest
from stowd.pipeline.queue import Job, NewFile, Queue
from stowd.rules.engine import Wanted

LOOKUP = """
rules:
  - match: {regex: '^(?P<acc>[^/]+)/'}
    lookup:
      in: studies
      query: {AccessionNumber: '{regex.acc}'}
      wait: 2h
      cache: 30s
"""


def test_a_lookup_is_read_with_its_defaults_and_rendered_after_the_rules(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        LOOKUP
        + """\
  - set: {PatientID: late}
""",
    )
    [first, _] = config.rules
    assert first.lookup is not None
    assert (first.lookup.within, first.lookup.wait, first.lookup.cache) == ("studies", 7200, 30)
    outcome = run(config, "A-1/x.jpg", kind="jpeg")
    assert outcome.lookup is not None
    assert outcome.lookup.query == (("AccessionNumber", "A-1"),)
    assert outcome.lookup.text() == "AccessionNumber A-1"


def test_the_query_sees_the_values_the_rules_set(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
rules:
  - lookup: {in: studies, query: {PatientID: '{dicom.PatientID}'}}
  - set: {PatientID: 'P-{parts[0]}'}
""",
    )
    outcome = run(config, "7/x.dcm", {"PatientID": "old"})
    assert outcome.lookup is not None and outcome.lookup.query == (("PatientID", "P-7"),)


def test_the_last_matching_lookup_wins(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
rules:
  - lookup: {in: studies, query: {AccessionNumber: '{parts[0]}'}}
  - match: {type: pdf}
    lookup: {in: worklist, query: {AccessionNumber: '{parts[0]}'}}
""",
    )
    pdf = run(config, "A/x.pdf", kind="pdf").lookup
    jpeg = run(config, "A/x.jpg", kind="jpeg").lookup
    assert pdf is not None and pdf.lookup.within == "worklist"
    assert jpeg is not None and jpeg.lookup.within == "studies"


@pytest.mark.parametrize(
    ("rel", "attrs", "message"),
    [
        ("x.dcm", {"AccessionNumber": ""}, "is empty for this file; stowd never asks"),
        ("x.dcm", {"AccessionNumber": "A*"}, "holds a wildcard character"),
        ("x.dcm", {}, "{dicom.AccessionNumber} has no value: the file has no AccessionNumber"),
    ],
)
def test_an_empty_or_wildcard_query_fails_the_file(
    tmp_path: Path, rel: str, attrs: dict[str, str], message: str
) -> None:
    config = load(
        tmp_path,
        """
rules:
  - lookup: {in: studies, query: {AccessionNumber: '{dicom.AccessionNumber}'}}
""",
    )
    with pytest.raises(RuleFailure, match="rule rules\\[0\\]") as info:
        run(config, rel, attrs)
    assert message in str(info.value)


def test_every_lookup_problem_is_reported_at_once_with_key_and_line(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
rules:
  - lookup:
      in: study
      query: {AccessionNumber: '{parts[0]}'}
  - lookup:
      in: studies
      query: {StudyDate: '{date}', Modality: XC}
      url: http://mwl.example/mwlitems
      wait: soon
      colour: red
  - lookup: {in: worklist}
  - match: {regex: '^(?P<a>x)'}
    lookup: {in: worklist, query: {AccessionNumber: '{regex.b}'}, url: mwl.example}
""",
    )
    text = [str(p) for p in found]
    expected = [  # the config starts with test_rules.HEAD (15 lines)
        "line 19: rules[0].lookup.in: unknown in 'study' (known: studies, worklist); "
        "did you mean 'studies'?",
        "line 26: rules[1].lookup.colour: unknown key; expected one of: in, query, url",
        "line 23: rules[1].lookup.query.Modality: a studies lookup cannot ask by Modality",
        "line 23: rules[1].lookup.query: the query needs at least one of AccessionNumber",
        "line 24: rules[1].lookup.url: only a worklist lookup takes a url",
        "line 25: rules[1].lookup.wait: expected a duration",
        "line 27: rules[2].lookup.query: required key is missing",
        "line 29: rules[3].lookup.query.AccessionNumber: {regex.b}: the rule's regex has no "
        "group named 'b'",
        "line 29: rules[3].lookup.url: expected an http:// or https:// URL",
    ]
    for start in expected:
        assert any(t.startswith(start) for t in text), (start, text)
    assert len(text) == len(expected), text


def test_the_lookup_is_part_of_the_rules_fingerprint(tmp_path: Path) -> None:
    a = load(tmp_path, LOOKUP)
    b = load(tmp_path, LOOKUP.replace("wait: 2h", "wait: 3h"))
    c = load(tmp_path, LOOKUP.replace("cache: 30s", "cache: 10s"))
    assert digest(a, a.sources[0]) != digest(b, b.sources[0])
    assert digest(a, a.sources[0]) == digest(c, c.sources[0])  # the cache changes no answer


# --------------------------------------------------------------------------- answers

STUDY = item(
    PatientName="Doe^Jane",
    PatientID="P1",
    PatientBirthDate="19700101",
    PatientSex="F",
    StudyInstanceUID="1.2.3",
    AccessionNumber="ACC1",
    StudyDate="20240101",
    ReferringPhysicianName="",
    ModalitiesInStudy="OT",
    NumberOfStudyRelatedInstances=2,
)


def wanted(config: Config, rel: str = "ACC1/x.jpg") -> Wanted:
    found = run(config, rel, kind="jpeg").lookup
    assert found is not None
    return found


def test_the_dicom_json_answer_is_read_and_only_patient_and_study_values_copied(
    tmp_path: Path,
) -> None:
    [study] = parse(json.dumps([STUDY]).encode(), "here")
    assert study["PatientName"] == "Doe^Jane" and study["NumberOfStudyRelatedInstances"] == 2
    values = copied(wanted(load(tmp_path, LOOKUP)), study)
    assert values == {
        "PatientName": "Doe^Jane",
        "PatientID": "P1",
        "PatientBirthDate": "19700101",
        "PatientSex": "F",
        "StudyInstanceUID": "1.2.3",
        "AccessionNumber": "ACC1",
        "StudyDate": "20240101",
        "IssuerOfPatientID": None,
        "ReferringPhysicianName": None,
        "StudyTime": None,
        "StudyID": None,
        "StudyDescription": None,
    }  # empty what the archive left empty or did not return (never the file's); no more


def test_only_exact_matches_count(tmp_path: Path) -> None:
    other = dict(STUDY) | item(AccessionNumber="acc1")  # Orthanc matches without case
    found = exact(wanted(load(tmp_path, LOOKUP)), parse(json.dumps([STUDY, other]).encode(), ""))
    assert [s["AccessionNumber"] for s in found] == ["ACC1"]


def test_padding_spaces_of_the_archive_are_not_part_of_the_value(tmp_path: Path) -> None:
    padded = dict(STUDY) | item(AccessionNumber="ACC1 ")  # some archives keep the padding
    other = dict(STUDY) | item(AccessionNumber="ACC10")
    found = exact(wanted(load(tmp_path, LOOKUP)), parse(json.dumps([padded, other]).encode(), ""))
    assert [s["AccessionNumber"] for s in found] == ["ACC1 "]


def test_includefield_is_repeated_per_attribute(tmp_path: Path) -> None:
    sent = params(wanted(load(tmp_path, LOOKUP)))
    assert sent[0] == ("AccessionNumber", "ACC1")
    assert ("includefield", "00100030") in sent and ("includefield", "00081030") in sent


@pytest.mark.parametrize("body", [b"<html>", b'{"a": 1}', b"[1, 2]"])
def test_an_answer_that_is_not_dicom_json_is_archive_trouble(body: bytes) -> None:
    with pytest.raises(LookupUnavailable, match="the answer of here"):
        parse(body, "here")


# --------------------------------------------------------------------------- the finder

WORKLIST = """
rules:
  - lookup:
      in: worklist
      query: {{AccessionNumber: '{{parts[0]}}', ScheduledProcedureStepID: '{{parts[1]}}'}}
      url: {url}/mwlitems
      wait: 10m
      cache: 60s
"""


def entry(accession: str, step: str, patient: str = "P1") -> dict[str, object]:
    return item(
        PatientID=patient,
        PatientName=f"Wl^{patient}",
        AccessionNumber=accession,
        StudyInstanceUID=f"1.2.{len(step)}",
        RequestedProcedureID="RP1",
        ScheduledProcedureStepSequence=[item(ScheduledProcedureStepID=step, Modality="XC")],
    )


def queued(queue: Queue, rel: str) -> Job:
    queue.enqueue([NewFile("ct1", "pacs", f"/d/{rel}", rel, 1, 1)])
    [job] = [j for j in queue.jobs() if j.rel == rel]
    return job


def test_the_finder_asks_once_per_query_and_waits_then_fails(
    tmp_path: Path, queue: Queue, clock: Clock
) -> None:
    worklist = Worklist([entry("A1", "S1"), entry("A1", "S2", "P2"), entry("A2", "S1")])
    with serve(worklist) as url:
        config = load(tmp_path, WORKLIST.format(url=url))
        finder = Finder(config, queue, clock=clock)
        try:
            one = finder.find(queued(queue, "A1/S1/a.jpg"), wanted(config, "A1/S1/a.jpg"))
            again = finder.find(queued(queue, "A1/S1/b.jpg"), wanted(config, "A1/S1/b.jpg"))
            assert one.values == again.values and one.values["PatientID"] == "P1"
            assert [r for r in worklist.requests if "A1" in r] == [worklist.requests[0]]
            assert (
                "ScheduledProcedureStepSequence.ScheduledProcedureStepID=S1"
                in (worklist.requests[0])
            )
            assert one.values["RequestAttributesSequence"] == [
                {
                    "RequestedProcedureID": "RP1",
                    "AccessionNumber": "A1",
                    "StudyInstanceUID": "1.2.2",
                    "ScheduledProcedureStepID": "S1",
                }
            ]
            job = queued(queue, "A9/S1/c.jpg")
            with pytest.raises(
                LookupNoMatchYet, match="no worklist item with AccessionNumber A9, "
            ):
                finder.find(job, wanted(config, "A9/S1/c.jpg"))
            clock.now += 601
            with pytest.raises(FileProblem, match=r"\(looked for 10 min; rule rules\[0\]"):
                finder.find(job, wanted(config, "A9/S1/c.jpg"))
        finally:
            finder.close()


def test_several_items_fail_naming_each_and_trouble_is_not_a_miss(
    tmp_path: Path, queue: Queue, clock: Clock
) -> None:
    worklist = Worklist([entry("A1", "S1"), entry("A1", "S1", "P2")])
    with serve(worklist) as url:
        config = load(tmp_path, WORKLIST.format(url=url))
        finder = Finder(config, queue, clock=clock)
        try:
            with pytest.raises(FileProblem) as info:
                finder.find(queued(queue, "A1/S1/a.jpg"), wanted(config, "A1/S1/a.jpg"))
            text = str(info.value)
            assert text.startswith("2 worklist items with AccessionNumber A1, ")
            assert "PatientID P1" in text and "PatientID P2" in text and "never guesses" in text
            worklist.status = 401
            with pytest.raises(LookupUnavailable, match="refused the login \\(HTTP 401\\)"):
                finder.find(queued(queue, "A3/S1/a.jpg"), wanted(config, "A3/S1/a.jpg"))
            asked = len(worklist.requests)
            with pytest.raises(LookupUnavailable):  # remembered: not asked again at once
                finder.find(queued(queue, "A3/S1/b.jpg"), wanted(config, "A3/S1/b.jpg"))
            assert len(worklist.requests) == asked
        finally:
            finder.close()


def test_a_recorded_answer_is_used_only_for_the_same_query(
    tmp_path: Path, queue: Queue, clock: Clock
) -> None:
    worklist = Worklist([entry("A1", "S1")])
    with serve(worklist) as url:
        config = load(tmp_path, WORKLIST.format(url=url))
        finder = Finder(config, queue, clock=clock)
        try:
            job = queued(queue, "A1/S1/a.jpg")
            found = finder.find(job, wanted(config, "A1/S1/a.jpg"))
            worklist.items = []
            clock.now += 3600  # the cache is old
            recorded = Job(**{**job.__dict__, "lookup": found.record})
            assert finder.find(recorded, wanted(config, "A1/S1/a.jpg")).values == found.values
            with pytest.raises(FileProblem, match="no worklist item"):  # asked again: none
                finder.find(recorded, wanted(config, "A1/S2/a.jpg"))
        finally:
            finder.close()


def test_explain_shows_the_query_without_asking(tmp_path: Path) -> None:
    config = load(tmp_path, LOOKUP)
    photo = config.sources[0].watch / "ACC 7" / "x.jpg"
    make_jpeg(photo)
    [result] = explain(config, [str(photo)])
    assert result.problem is None and result.lookup is not None
    assert result.lookup.startswith(
        "GET http://127.0.0.1:8042/dicom-web/studies?AccessionNumber=ACC+7 (rule rules[0]"
    )
    assert "none -> waits up to 2 h, then failed/" in render([result])


def test_dry_run_counts_the_lookup_questions_without_asking(tmp_path: Path) -> None:
    config = load(tmp_path, LOOKUP)  # its archive (port 8042) is never asked
    watch = config.sources[0].watch
    for n in range(3):
        make_jpeg(watch / "ACC 7" / f"p{n}.jpg")
    make_jpeg(watch / "ACC 8" / "p.jpg")
    past = time.time() - 7200
    for photo in watch.rglob("*.jpg"):
        os.utime(photo, (past, past))
    p = dryrun.plan_sources(config)[0]  # the first source, whose folder holds the photos
    assert dict(p.lookups) == {
        "studies with AccessionNumber ACC 7": 3,
        "studies with AccessionNumber ACC 8": 1,
    }
    assert (p.ready, len(p.studies)) == (4, 2)
    text = dryrun.render([p])
    assert "would look up: 2 question(s)" in text
    assert "studies with AccessionNumber ACC 7: 3 file(s)" in text
