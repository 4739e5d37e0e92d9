"""How stowd reads real archives' answers (issue 15): the Accept header it sends, an XML answer,
and two files with one SOPInstanceUID, each judged by the archive's answer about it alone."""

from __future__ import annotations

import json
import shutil
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from archives import Archive, write_refused
from dicomgen import make_instance, make_study
from harness import Layout, Stowd, make_layout, wait_for, written_together
from localserver import LocalServer
from orthanc import Orthanc
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from tinypacs import TinyPacs

from stowd.config.model import Destination
from stowd.dicomweb.stow import StowClient
from stowd.dicomweb.stowanswer import StowOutcome, judge, parse_answer
from stowd.dicomweb.stowbody import Part

UNSUPPORTED = "Unsupported return MIME type"


def part_of(path: Path, sop_uid: str) -> Part:
    st = path.stat()
    return Part(str(path), st.st_size, sop_uid, st.st_mtime_ns)


def store_alone(url: str, part: Part) -> StowOutcome:
    """Send one file in a request of its own; what the archive's answer means for it."""
    client = StowClient(Destination(name="probe", url=url))
    try:
        return judge(client.store([part]), [part])[part.sop_uid].outcome
    finally:
        client.close()


def test_orthanc_logs_no_error_for_the_accept_header(tmp_path: Path, orthanc: Orthanc) -> None:
    """stowd asked for DICOM JSON, XML and JSON; Orthanc logged "Unsupported return MIME type"
    for every upload (and Azure accepts only application/dicom+json)."""
    uid = make_instance(tmp_path / "one.dcm")
    assert store_alone(orthanc.dicomweb_url, part_of(tmp_path / "one.dcm", uid)) is StowOutcome.SENT
    assert orthanc.sop_instance_uids() == {uid}
    assert UNSUPPORTED not in orthanc.log_path.read_text(errors="replace")


# Native DICOM Model (PS3.19 Annex A), the XML form of a STOW-RS answer (PS3.18 Annex I):
# an archive may send it although stowd asks for DICOM JSON only.
XML_ANSWER = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    '<NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">'
    '<DicomAttribute tag="00081199" vr="SQ"><Item number="1">'
    '<DicomAttribute tag="00081155" vr="UI"><Value number="1">{uid}</Value></DicomAttribute>'
    "</Item></DicomAttribute></NativeDicomModel>"
)


class XmlArchive(LocalServer):
    """Answers every STOW-RS request 200 with the XML form, naming ``uid`` as stored."""

    def __init__(self, uid: str) -> None:
        self.uid = uid
        self.accept: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                owner: XmlArchive = self.server.owner  # type: ignore[attr-defined]
                self.rfile.read(int(self.headers["Content-Length"]))
                owner.accept.append(self.headers.get("Accept", ""))
                body = XML_ANSWER.format(uid=owner.uid).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(Handler)


def test_an_xml_answer_is_still_read(tmp_path: Path) -> None:
    uid = make_instance(tmp_path / "one.dcm")
    with XmlArchive(uid) as server:
        outcome = store_alone(f"{server.url}/dicom-web", part_of(tmp_path / "one.dcm", uid))
    assert outcome is StowOutcome.SENT
    assert server.accept == ["application/dicom+json"]


def test_two_files_with_one_sop_instance_uid_are_each_judged_by_their_own_answer(
    tmp_path: Path, archive: Archive
) -> None:
    """pydicom's rtdose.dcm and rtdose_rle.dcm share a SOPInstanceUID.  Sent in one request,
    the answer named the UID once and both were settled by it: rtdose_rle.dcm, which Orthanc
    refuses when sent alone, went to sent/ because rtdose.dcm was stored."""
    plain, rle = (Path(str(get_testdata_file(name))) for name in ("rtdose.dcm", "rtdose_rle.dcm"))
    uid = "1.9.999.999.99.9.9999.9999.20030818153516"  # both files'
    probe = tmp_path / "probe"
    probe.mkdir()
    shutil.copy(rle, probe / rle.name)
    rle_alone = store_alone(archive.dicomweb_url, part_of(probe / rle.name, uid))
    assert rle_alone in (StowOutcome.SENT, StowOutcome.FAILED)
    if isinstance(archive, Orthanc):
        assert rle_alone is StowOutcome.FAILED  # Orthanc 1.10.1 answers it alone with HTTP 400

    layout = make_layout(tmp_path / "run", archive.dicomweb_url)
    for sample in (plain, rle):
        shutil.copy(sample, layout.drop / sample.name)
    with Stowd(layout) as daemon:
        wait_for(lambda: settled(layout) == 2, 60, "both files settled", lambda: daemon.log)
    assert "rtdose.dcm" in layout.files(layout.sent)
    if rle_alone is StowOutcome.SENT:
        assert "rtdose_rle.dcm" in layout.files(layout.sent)
    else:
        assert layout.files(layout.failed) == {"rtdose_rle.dcm"}
        reason = json.loads((layout.failed / "rtdose_rle.dcm.error.json").read_text())["reason"]
        assert "refused" in reason or "could not read" in reason, reason
    assert uid in archive.sop_instance_uids()


def settled(layout: Layout) -> int:
    return len(layout.files(layout.sent)) + len(layout.files(layout.failed))


def test_a_refused_file_in_a_batch_fails_at_once_with_the_archive_s_reason(
    tmp_path: Path, archive: Archive
) -> None:
    """tiny_pacs answers 202 for a batch with a part it cannot read, listed without its UID:
    that file was retried with backoff (here an hour) instead of being sent alone."""
    layout = make_layout(
        tmp_path / "run",
        archive.dicomweb_url,
        retry={"initial": "1h", "maximum": "1h", "hold_probe": "1s", "max_age": "1d"},
    )
    study = generate_uid()
    good = {u for _, u in make_study(layout.drop / "s", 5, study_uid=study)}
    status = write_refused(archive, layout.drop / "s" / "refused.dcm", study_uid=study)
    written_together(layout.drop)  # the refused file goes in the batch of the good ones
    with Stowd(layout) as daemon:
        wait_for(lambda: settled(layout) == 6, 60, "all six settled", lambda: daemon.log)
    assert layout.files(layout.failed) == {"s/refused.dcm"}
    assert archive.sop_instance_uids() == good
    error = json.loads((layout.failed / "s" / "refused.dcm.error.json").read_text())
    assert f"HTTP {status}" in error["reason"], error
    if isinstance(archive, TinyPacs):
        assert "failure reason 0110 (processing failure)" in error["reason"], error


def test_judge_a_failure_item_without_a_uid() -> None:
    """tiny_pacs' answers (observed) to a part it cannot read: alone, and with a good one."""
    unnamed = b'{"00081198": {"vr": "SQ", "Value": [{"00081197": {"vr": "US", "Value": [272]}}]}}'
    bad, good = Part("/d/bad.dcm", 1, "1.2.3.04"), Part("/d/good.dcm", 1, "1.2.3.4")
    alone = judge(parse_answer(409, unnamed), [bad])[bad.sop_uid]
    assert (alone.outcome, alone.code) == (StowOutcome.FAILED, 0x0110)
    stored = (
        b'"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3.4"]}}]}'
    )
    batch = judge(parse_answer(202, unnamed[:-1] + b", " + stored + b"}"), [bad, good])
    assert batch[good.sop_uid].outcome is StowOutcome.SENT
    assert batch[bad.sop_uid].outcome is StowOutcome.ISOLATE
