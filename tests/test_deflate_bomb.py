"""Issue 14: a deflated data set that inflates to gigabytes (a decompression bomb) fails with a
reason, in bounded memory; a legitimate deflated file is still read, and sent as it is."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from bombgen import ENCAPSULATED_DOCUMENT, deflate_bomb, peak_rss_mb
from harness import Stowd, make_layout, run_cli, wait_for
from orthanc import Orthanc
from pydicom.data import get_testdata_file

from stowd.errors import FileProblem
from stowd.media import rewrite as rewrite_module
from stowd.media.rewrite import rewrite
from stowd.pipeline.classify import classify

MAX_PEAK_MB = 300.0
DATA_SET_REASON = "the deflated data set inflates to more than 1024 MiB"
HEADER_REASON = "the deflated data set's header (its attributes before the pixel data) inflates"


def legit_deflated(target: Path) -> Path:
    """pydicom's deflated test image (4.6 KB, 256 KiB of pixel data once inflated)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(get_testdata_file("image_dfl.dcm"), target)  # type: ignore[arg-type]
    return target


def test_a_bomb_in_the_pixel_data_fails_classification(tmp_path: Path) -> None:
    """Was: pydicom inflated the whole data set (3 GiB here) to read the header, and the file
    was classified (then sent)."""
    bomb = tmp_path / "bomb.dcm"
    deflate_bomb(bomb, inflated=(1 << 30) + (64 << 20))
    assert bomb.stat().st_size < 2_000_000
    with pytest.raises(FileProblem, match=re.escape(DATA_SET_REASON)):
        classify(str(bomb))


def test_a_bomb_in_the_header_fails_classification(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.dcm"
    deflate_bomb(bomb, inflated=200 << 20, tag=ENCAPSULATED_DOCUMENT)
    with pytest.raises(FileProblem, match=re.escape(HEADER_REASON)):
        classify(str(bomb))


def test_a_deflated_file_within_the_limits_is_classified(tmp_path: Path) -> None:
    found = classify(str(legit_deflated(tmp_path / "dfl.dcm")))
    assert found.kind == "dicom" and found.sop_uid and found.study_uid
    large = tmp_path / "large.dcm"  # 200 MiB of pixel data once inflated: within the limit
    uid = deflate_bomb(large, inflated=200 << 20)
    assert classify(str(large)).sop_uid == uid


def test_a_cut_deflated_file_is_damaged(tmp_path: Path) -> None:
    cut = tmp_path / "cut.dcm"
    deflate_bomb(cut, inflated=8 << 20)
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) - 2000])
    with pytest.raises(FileProblem, match="the file ends before its deflated data set does"):
        classify(str(cut))


def test_rules_refuse_a_deflated_file_that_inflates_beyond_their_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: the limit was on the compressed size, so a 200 KB file inflating to 200 MiB was
    read whole to change its header."""
    src = tmp_path / "big.dcm"
    deflate_bomb(src, inflated=200 << 20)
    assert src.stat().st_size < rewrite_module.DEFLATED_LIMIT
    out = tmp_path / "out.dcm"
    with pytest.raises(FileProblem, match="Deflated transfer syntax and is, or inflates to"):
        rewrite(src, out, lambda ds: setattr(ds, "PatientID", "NEW"))
    assert not out.exists()


def test_the_daemon_fails_deflate_bombs_in_bounded_memory_and_sends_a_deflated_file_as_it_is(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    """Was: a 3 MB file inflating to 3 GiB drove the daemon to 6.2 GB RSS and was stored."""
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url)
    pixels_uid = deflate_bomb(layout.drop / "pixels.dcm")  # 3 GiB of pixel data, 3 MB
    header_uid = deflate_bomb(layout.drop / "header.dcm", tag=ENCAPSULATED_DOCUMENT)
    original = legit_deflated(layout.drop / "dfl.dcm").read_bytes()
    with Stowd(layout) as daemon:
        wait_for(
            lambda: (
                layout.files(layout.failed) == {"pixels.dcm", "header.dcm"}
                and layout.files(layout.sent) == {"dfl.dcm"}
            ),
            120,
            "both bombs in failed/ and the deflated image in sent/",
            lambda: daemon.log,
        )
        assert daemon.proc is not None
        peak = peak_rss_mb(daemon.proc.pid)
        explained = run_cli(
            "explain",
            "-c",
            str(layout.config),
            "--source",
            "ct1",
            str(layout.failed / "pixels.dcm"),
        )
        assert daemon.terminate() == 0
    print(f"\ndaemon VmHWM with two 3 GiB deflate bombs: {peak:.1f} MB")
    assert peak < MAX_PEAK_MB
    errors = layout.error_files()
    assert DATA_SET_REASON in json.loads(errors["pixels.dcm"].read_text())["reason"]
    assert HEADER_REASON in json.loads(errors["header.dcm"].read_text())["reason"]
    assert DATA_SET_REASON in explained.stdout + explained.stderr
    stored = orthanc.sop_instance_uids()
    assert pixels_uid not in stored and header_uid not in stored and len(stored) == 1
    (instance,) = orthanc.get_json("/instances")
    assert orthanc.get_bytes(f"/instances/{instance}/file") == original  # not re-encoded
    assert "Traceback" not in daemon.log


def test_rules_change_deflated_files_in_bounded_memory(tmp_path: Path, orthanc: Orthanc) -> None:
    """Rules hold a deflated data set whole: only up to ``DEFLATED_LIMIT`` inflated, one at
    a time, so the two workers never hold two; a larger one fails with the reason."""
    layout = make_layout(
        tmp_path / "run", orthanc.dicomweb_url, rules=[{"set": {"PatientID": "CHANGED"}}]
    )
    within = rewrite_module.DEFLATED_LIMIT - (1 << 20)
    uids = {deflate_bomb(layout.drop / f"s{n}/ok.dcm", inflated=within) for n in range(3)}
    deflate_bomb(layout.drop / "big.dcm", inflated=4 * rewrite_module.DEFLATED_LIMIT)
    with Stowd(layout) as daemon:
        wait_for(
            lambda: (
                layout.files(layout.failed) == {"big.dcm"} and len(layout.files(layout.sent)) == 3
            ),
            120,
            "big.dcm failed and the three others sent",
            lambda: daemon.log,
        )
        assert daemon.proc is not None
        peak = peak_rss_mb(daemon.proc.pid)
        assert daemon.terminate() == 0
    print(f"\ndaemon VmHWM changing three deflated files of 31 MiB each: {peak:.1f} MB")
    assert peak < MAX_PEAK_MB
    assert orthanc.sop_instance_uids() == uids
    reason = json.loads(layout.error_files()["big.dcm"].read_text())["reason"]
    assert "Deflated transfer syntax and is, or inflates to, more than 32 MiB" in reason
    assert "Traceback" not in daemon.log
