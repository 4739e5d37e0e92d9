"""Bulkdata end to end: photos, PDFs and videos dropped into the real daemon become DICOM
instances in a real Orthanc, with the bytes embedded unchanged and stable UIDs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydicom
from harness import Layout, Stowd, make_layout, run_cli, run_until, wait_for
from mediagen import dciodvfy_errors, make_jpeg, make_pdf, make_png, make_video
from orthanc import Orthanc
from pydicom.encaps import generate_fragments
from stowproxy import StowProxy

from stowd.media.probe import detect

PATIENT_RULE = {
    "name": "patient from the folder",
    "match": {"regex": "^(?P<pid>[^/]+)/"},
    "set": {"PatientID": "{regex.pid}", "PatientName": "Test^{regex.pid}"},
}
TS = "1.2.840.10008.1.2.4."


def bulk_layout(root: Path, url: str, **overrides: Any) -> Layout:
    return make_layout(root, url, rules=[PATIENT_RULE], **overrides)


def retrieved(orthanc: Orthanc) -> list[pydicom.FileDataset]:
    """Every instance Orthanc stored, as the archive returns it (WADO: the file)."""
    files = []
    for instance in orthanc.get_json("/instances"):
        data = orthanc.get_bytes(f"/instances/{instance}/file")
        files.append(pydicom.dcmread(pydicom.filebase.DicomBytesIO(data)))
    return files


def embedded(ds: pydicom.Dataset) -> bytes:
    """The document or the compressed stream inside an instance (padding included)."""
    if "EncapsulatedDocument" in ds:
        return bytes(ds.EncapsulatedDocument)
    return b"".join(list(generate_fragments(ds.PixelData))[1:])  # after the offset table


def padded(data: bytes) -> bytes:
    return data + b"\0" * (len(data) % 2)


def test_photos_pdfs_and_videos_arrive_as_dicom_with_their_bytes_unchanged(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    layout = bulk_layout(tmp_path / "run", orthanc.dicomweb_url)
    drop = layout.drop
    originals = {
        "P1/photo1.jpg": make_jpeg(drop / "P1/photo1.jpg", seed=1),
        "P1/photo2.jpeg": make_jpeg(drop / "P1/photo2.jpeg", (200, 100), seed=2),
        "P1/report.pdf": make_pdf(drop / "P1/report.pdf"),
        "P1/clip.mpg": make_video(drop / "P1/clip.mpg", "mpeg2"),
        "P1/clip.mp4": make_video(drop / "P1/clip.mp4", "h264"),
        "P2/scan.pdf": make_pdf(drop / "P2/scan.pdf", "another patient"),
    }
    media = {rel: detect(drop / rel) for rel in originals}
    run_until(layout, lambda: layout.files(layout.sent) == set(originals), "every file sent", 120)
    assert layout.files(layout.failed) == set() and layout.files(layout.drop) == set()

    stored = {padded(originals[rel]): rel for rel in originals}
    by_file: dict[str, pydicom.FileDataset] = {}
    for ds in retrieved(orthanc):
        by_file[stored[embedded(ds)]] = ds  # each instance holds one original, byte for byte
    assert set(by_file) == set(originals)

    for rel, ds in by_file.items():
        assert ds.PatientID == rel.split("/")[0] and str(ds.PatientName) == f"Test^{ds.PatientID}"
        found = media[rel]
        if found.rows:
            assert (ds.Rows, ds.Columns) == (found.rows, found.columns), rel
            assert ds.SamplesPerPixel == found.samples_per_pixel
            assert ds.file_meta.TransferSyntaxUID == found.transfer_syntax
        if found.frames:
            assert int(ds.NumberOfFrames) == found.frames

    p1 = [ds for rel, ds in by_file.items() if rel.startswith("P1/")]
    assert len({ds.StudyInstanceUID for ds in p1}) == 1  # one folder, one study
    assert by_file["P2/scan.pdf"].StudyInstanceUID != p1[0].StudyInstanceUID
    photos = [by_file["P1/photo1.jpg"], by_file["P1/photo2.jpeg"]]
    assert photos[0].SeriesInstanceUID == photos[1].SeriesInstanceUID  # one series per type
    assert sorted(int(ds.InstanceNumber) for ds in photos) == [1, 2]
    assert by_file["P1/report.pdf"].SeriesInstanceUID != photos[0].SeriesInstanceUID
    for clip in ("P1/clip.mpg", "P1/clip.mp4"):  # ffmpeg made 1 s at 25 frames a second
        assert (int(by_file[clip].NumberOfFrames), float(by_file[clip].FrameTime)) == (25, 40.0)
    assert by_file["P1/clip.mpg"].file_meta.TransferSyntaxUID == TS + "100"
    assert by_file["P1/clip.mp4"].file_meta.TransferSyntaxUID == TS + "102"
    assert by_file["P1/report.pdf"].MIMETypeOfEncapsulatedDocument == "application/pdf"

    for rel, ds in by_file.items():  # what the archive keeps is a valid object
        path = tmp_path / (rel.replace("/", "_") + ".dcm")
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], rel


def test_bad_and_unknown_files_are_refused_clearly_and_the_daemon_goes_on(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    layout = bulk_layout(
        tmp_path / "run", orthanc.dicomweb_url, source={"bulkdata": {"unknown": "ignore"}}
    )
    drop = layout.drop
    (drop / "P1").mkdir()
    (drop / "P1/fake.jpg").write_text("this is a text file named like a photo\n")
    (drop / "P1/empty.pdf").write_bytes(b"")
    clip = make_video(tmp_path / "clip.mp4", "h264")
    (drop / "P1/truncated.mp4").write_bytes(clip[: len(clip) // 2])
    (drop / "P1/notes.txt").write_text("an unknown type: left alone\n")
    make_pdf(drop / "P1/good.pdf")
    make_png(drop / "P1/small.png")
    bad = {"P1/fake.jpg", "P1/empty.pdf", "P1/truncated.mp4"}
    run_until(
        layout,
        lambda: layout.files(layout.failed) >= bad and len(layout.files(layout.sent)) == 2,
        "the bad files in failed/ and the good ones in sent/",
        120,
    )
    assert layout.files(layout.failed) == bad
    assert layout.files(layout.sent) == {"P1/good.pdf", "P1/small.png"}
    assert layout.files(layout.drop) == {"P1/notes.txt"}  # ignored: never moved or sent
    errors = layout.error_files()
    reasons = {rel: json.loads(errors[rel].read_text())["reason"] for rel in bad}
    assert "is not a JPEG image" in reasons["P1/fake.jpg"]
    assert "empty" in reasons["P1/empty.pdf"]
    assert "truncated or damaged" in reasons["P1/truncated.mp4"]
    assert orthanc.instance_count() == 2


def test_kill_9_mid_upload_reuses_the_same_uids(tmp_path: Path, orthanc: Orthanc) -> None:
    proxy = StowProxy(orthanc.dicomweb_url, delay=3.0)
    try:
        kill_mid_upload_and_restart(tmp_path, orthanc, proxy)
    finally:
        proxy.stop()


def kill_mid_upload_and_restart(tmp_path: Path, orthanc: Orthanc, proxy: StowProxy) -> None:
    layout = bulk_layout(
        tmp_path / "run",
        proxy.base,
        destinations={"pacs": {"url": proxy.base, "workers": 1, "batch": {"max_files": 5}}},
    )
    count = 20
    for n in range(count):
        make_pdf(layout.drop / f"P7/doc{n:02}.pdf", f"page {n}", padding=300_000)
    with Stowd(layout) as daemon:
        # Kill while a request is under way: Orthanc already holds instances whose files
        # have not been moved to sent/ yet, so the next run must send them again.
        wait_for(
            lambda: orthanc.instance_count() > len(layout.files(layout.sent)),
            60,
            "an upload in flight",
            lambda: daemon.log,
        )
        daemon.kill()
        proxy.delay = 0.0
        in_flight = orthanc.sop_instance_uids()
        assert len(in_flight) > len(layout.files(layout.sent)), "the kill came too late"
    with Stowd(layout) as daemon:
        wait_for(
            lambda: len(layout.files(layout.sent)) == count, 120, "all sent", lambda: daemon.log
        )
        assert daemon.terminate() == 0
    assert in_flight <= orthanc.sop_instance_uids()  # re-sent under the same UIDs
    assert orthanc.instance_count() == count  # one instance per file, none sent twice
    assert orthanc.study_count() == 1
    numbers = [int(ds.InstanceNumber) for ds in retrieved(orthanc)]
    assert sorted(numbers) == list(range(1, count + 1))
    assert not any(layout.root.joinpath("state", "queue.db.spool").glob("*")), "spool left behind"


def test_explain_of_a_photo_no_rule_matches_says_what_is_sent(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    """A photo no rule matches is not "sent exactly as it is": it becomes a Secondary Capture
    with an empty PatientID and PatientName, and explain says so; what the archive then holds
    shows it is true (whether such a photo should be refused is not decided here)."""
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url)  # no rules
    photo = layout.drop / "IMG_0001.jpg"
    make_jpeg(photo)
    result = run_cli("explain", "-c", str(layout.config), str(photo))
    assert result.returncode == 0, result.stderr
    assert "sent exactly as it is" not in result.stdout
    assert "rules matched: none" in result.stdout
    assert "sent as the Secondary Capture Image Storage object made from the file" in result.stdout
    assert "sent with an empty PatientID and PatientName: no rule or sidecar gives them" in (
        result.stdout
    )
    [doc] = json.loads(run_cli("explain", "-c", str(layout.config), "--json", str(photo)).stdout)
    assert doc["empty_patient_attributes"] == ["PatientID", "PatientName"]

    run_until(layout, lambda: layout.files(layout.sent) == {"IMG_0001.jpg"}, "the photo sent", 60)
    [ds] = retrieved(orthanc)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    assert (ds.PatientID, str(ds.PatientName)) == ("", "")
