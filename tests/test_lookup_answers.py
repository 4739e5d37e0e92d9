"""Lookups (issue 8) when the archive answers badly: an archive that hangs, values the archive
left out, answers that do not show the keys asked; and the config checks of a lookup's query."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from dicomgen import make_instance
from harness import Clock, make_layout, run_until
from orthanc import Orthanc
from test_lookup import instances, store
from test_lookup_rules import WORKLIST, entry, queued, wanted
from test_rules import load, problems
from test_worker import Rig
from worklist import Worklist, serve

from stowd.config.model import Destination
from stowd.errors import FileProblem, LookupUnavailable
from stowd.pipeline.lookup import Finder
from stowd.pipeline.queue import Queue
from stowd.rules.engine import Lookup, Rule, Template, Wanted
from stowd.rules.vr import Item


class Hanging(Worklist):
    """A worklist that takes ``hang`` seconds (of the test's clock) to answer an error."""

    def __init__(self, clock: Clock, hang: float) -> None:
        super().__init__([])
        self.clock, self.hang, self.status = clock, hang, 500

    def answer(self, path: str) -> tuple[int, list[dict[str, object]]]:
        self.clock.now += self.hang  # the read timeout of a hung archive
        return super().answer(path)


def test_a_hung_archive_is_asked_once_not_once_per_file(
    tmp_path: Path, queue: Queue, clock: Clock
) -> None:
    """Files are read one at a time; a query that hangs for the read timeout (30 s) must not
    be repeated for every next file (before: the failure was dated from when the query began,
    so it was already forgotten when it came back, and each file waited 30 s again)."""
    worklist = Hanging(clock, 30.0)
    with serve(worklist) as url:
        config = load(tmp_path, WORKLIST.format(url=url))
        finder = Finder(config, queue, clock=clock)
        try:
            for rel in ("A1/S1/a.jpg", "A1/S1/b.jpg", "A2/S1/c.jpg"):
                with pytest.raises(LookupUnavailable, match="HTTP 500"):
                    finder.find(queued(queue, rel), wanted(config, rel))
            assert len(worklist.requests) == 1
            clock.now += 16  # remembered briefly, then asked again
            with pytest.raises(LookupUnavailable):
                finder.find(queued(queue, "A3/S1/d.jpg"), wanted(config, "A3/S1/d.jpg"))
            assert len(worklist.requests) == 2
        finally:
            finder.close()


BY_ISSUER = """
rules:
  - lookup:
      in: worklist
      query: {{PatientID: '{{parts[0]}}', IssuerOfPatientID: '{{parts[1]}}'}}
      url: {url}/mwlitems
"""


class IgnoresIssuer(Worklist):
    """A worklist that does not support IssuerOfPatientID: it ignores the key (PS3.18 asks
    only for a Warning header) and does not return the attribute."""

    def answer(self, path: str) -> tuple[int, list[dict[str, object]]]:
        base, _, query = path.partition("?")
        kept = [p for p in query.split("&") if not p.startswith("IssuerOfPatientID=")]
        return super().answer(f"{base}?{'&'.join(kept)}")


def test_an_entry_that_does_not_show_a_key_asked_is_no_match(
    tmp_path: Path, queue: Queue, clock: Clock
) -> None:
    """Before: a key the archive did not return counted as matched, so the one item of
    PatientID P1 at another hospital was joined."""
    worklist = IgnoresIssuer([entry("A1", "S1", "P1")])
    with serve(worklist) as url:
        config = load(tmp_path, BY_ISSUER.format(url=url))
        finder = Finder(config, queue, clock=clock)
        try:
            rel = "P1/HOSP_B/a.jpg"
            with pytest.raises(LookupUnavailable, match="does not show IssuerOfPatientID"):
                finder.find(queued(queue, rel), wanted(config, rel))
        finally:
            finder.close()


def test_what_the_archive_leaves_empty_is_emptied_not_kept_from_the_file(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    """A scanner sent a DICOM file with another patient's ID, issuer and birth date; the
    archive's patient has no issuer and no birth date.  Before: only the archive's non-empty
    values were copied, so the instance got the right PatientID with the wrong patient's
    IssuerOfPatientID and birth date (another patient's identity)."""
    study = store(orthanc, "ACC-R1", patient="RIGHT-1", PatientBirthDate="", PatientSex="")
    rule = {
        "match": {"type": "dicom"},
        "lookup": {"in": "studies", "query": {"AccessionNumber": "{dicom.AccessionNumber}"}},
    }
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url, rules=[rule])
    sop = make_instance(
        layout.drop / "scanner/x.dcm",
        patient_id="WRONG-1",
        extra={
            "AccessionNumber": "ACC-R1",
            "IssuerOfPatientID": "OTHER-HOSPITAL",
            "PatientBirthDate": "19991231",
            "PatientSex": "M",
        },
    )
    run_until(layout, lambda: layout.files(layout.sent) == {"scanner/x.dcm"}, "sent", 90)
    [ds] = [d for d in instances(orthanc) if d.SOPInstanceUID == sop]
    assert ds.PatientID == "RIGHT-1" and ds.StudyInstanceUID == study
    assert ds.get("IssuerOfPatientID", "") == "" and ds.PatientBirthDate == ""
    assert ds.PatientSex == ""


def test_an_entry_without_a_study_instance_uid_is_joined_by_no_file(
    tmp_path: Path, queue: Queue, clock: Clock
) -> None:
    """A worklist item without StudyInstanceUID: before, each photo's study came from its
    folder (bulkdata.study_key with the PatientID the file had before the lookup), so items
    of two patients in one folder could share a made study."""
    bare = entry("A1", "S1")
    del bare["0020000D"]
    with serve(Worklist([bare])) as url:
        config = load(tmp_path, WORKLIST.format(url=url))
        finder = Finder(config, queue, clock=clock)
        try:
            with pytest.raises(FileProblem, match="has no StudyInstanceUID"):
                finder.find(queued(queue, "A1/S1/a.jpg"), wanted(config, "A1/S1/a.jpg"))
        finally:
            finder.close()


def test_waiting_for_the_study_does_not_use_up_retry_max_age(tmp_path: Path) -> None:
    """``wait: 3h`` with ``retry.max_age: 1h``: before, the first 'not yet' set first_try,
    so a one-off archive hiccup after 2 h of waiting gave the file up at once ('gave up after
    N attempts'), as would a transient upload failure right after the study appeared."""
    query = (("AccessionNumber", Template.parse("{parts[0]}")),)
    rule = Rule("rules[0]", 1, lookup=Lookup("studies", query, wait=3 * 3600.0))
    rig = Rig(tmp_path, lambda _r: httpx.Response(500), (rule,), max_age=3600.0)
    try:
        _wait_then_hiccup(rig)
    finally:
        rig.close()


def _wait_then_hiccup(rig: Rig) -> None:
    answers: list[Exception | None] = [None]  # None: no study (yet)

    def ask(_destination: Destination, _wanted: Wanted) -> list[Item]:
        answer = answers.pop(0)
        if answer is not None:
            raise answer
        return []

    rig.worker.reader.finder._ask = ask  # type: ignore[method-assign,assignment]
    make_instance(rig.source.watch / "A1" / "x.dcm", extra={"AccessionNumber": "A1"})
    rig.find()
    rig.drain()
    [job] = rig.queue.jobs()
    assert "no study with AccessionNumber A1" in json.loads(job.error or "{}")["reason"]
    rig.clock.now += 2 * 3600
    answers.append(LookupUnavailable("the lookup at x failed: HTTP 503"))
    rig.drain()
    assert rig.names(rig.source.failed) == set()
    [job] = rig.queue.jobs()
    assert rig.queue.counts() == {"waiting": 1}
    assert "HTTP 503" in json.loads(job.error or "{}")["reason"]


def test_a_password_in_the_worklist_url_is_not_written_to_the_queue(
    tmp_path: Path, queue: Queue, clock: Clock
) -> None:
    """The query key (the lookups cache and each file's record) held the lookup URL as
    configured, so a ``user:password@`` URL put the password into queue.db, which stowd
    status and others read; everywhere else such a URL is shown as ``***@``."""
    with serve(Worklist([entry("A1", "S1")])) as url:
        secret = url.replace("http://", "http://stowd:s3cret-pw@")
        config = load(tmp_path, WORKLIST.format(url=secret))
        finder = Finder(config, queue, clock=clock)
        try:
            job = queued(queue, "A1/S1/a.jpg")
            found = finder.find(job, wanted(config, "A1/S1/a.jpg"))
        finally:
            finder.close()
    assert "s3cret-pw" not in found.record
    cache = queue._conn().execute("SELECT key, answer FROM lookups").fetchall()
    assert cache and not any("s3cret-pw" in str(row) for row in cache)


def test_a_fixed_empty_or_wildcard_query_value_is_a_config_problem(tmp_path: Path) -> None:
    """Before: the config loaded, and every file the rule matched went to failed/."""
    found = problems(
        tmp_path,
        """
rules:
  - lookup: {in: studies, query: {AccessionNumber: ''}}
  - lookup: {in: studies, query: {AccessionNumber: 'A*'}}
  - lookup: {in: studies, query: {PatientID: ' '}}
""",
    )
    text = [f"line {p.line}: {p.key}: {p.message}" for p in found]
    assert len(text) == 3, text
    assert text[0].startswith("line 18: rules[0].lookup.query.AccessionNumber: is empty")
    assert "'A*' holds a wildcard" in text[1] and "is empty" in text[2]
