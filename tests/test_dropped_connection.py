"""Issue 14: an archive that drops the connection whenever one file is sent (Orthanc 1.10.1
crashes on a file of 150 nested sequences) must not block the files beside it for ever: the
batch is singled out as for a 500, and the file fails after ``MAX_DROPS`` drops sent alone.
An archive that is simply down (connection refused) fails no file."""

from __future__ import annotations

import json
from pathlib import Path

from bombgen import nested_sequences
from dicomgen import make_instance
from harness import Stowd, make_layout, wait_for
from orthanc import Orthanc

from stowd.pipeline.worker import MAX_DROPS

DEAD_URL = "http://127.0.0.1:9/dicom-web"  # nothing listens: connection refused
DROPPED = "the archive drops the connection whenever this file is sent"


def test_a_file_that_crashes_the_archive_fails_and_the_others_are_stored(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    """Was: "Server disconnected without sending a response" held the destination and the
    same batch was sent again after every restart of the archive, which crashed again: the
    files beside the bad one never moved."""
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url)
    study = "1.2.826.0.1.3680043.8.498.14.1"
    bad = nested_sequences(layout.drop / "deep.dcm", study_uid=study)
    good = {
        "a.dcm": make_instance(layout.drop / "a.dcm", study_uid=study),
        "b.dcm": make_instance(layout.drop / "b.dcm", study_uid=study),  # one batch with deep
        "c.dcm": make_instance(layout.drop / "c.dcm"),  # other studies: other batches,
        "d.dcm": make_instance(layout.drop / "d.dcm"),  # sent beside it by the other worker
    }
    crashes = 0

    def restarted_until_done() -> bool:
        nonlocal crashes
        if not orthanc.is_running():  # it crashed (as an archive's service restarts it)
            crashes += 1
            orthanc.start()
        return layout.files(layout.failed) == {"deep.dcm"} and layout.files(layout.sent) == set(
            good
        )

    with Stowd(layout) as daemon:
        wait_for(restarted_until_done, 120, "deep.dcm failed, the others sent", lambda: daemon.log)
        assert daemon.alive()
        assert daemon.terminate() == 0
    print(f"\nOrthanc crashed {crashes} times on the file of 150 nested sequences")
    assert crashes >= MAX_DROPS
    assert orthanc.sop_instance_uids() == set(good.values())
    assert bad not in orthanc.sop_instance_uids()
    error = json.loads(layout.error_files()["deep.dcm"].read_text())
    assert DROPPED in error["reason"], error
    assert error["connection_drops"] == MAX_DROPS
    assert "Traceback" not in daemon.log


def test_an_archive_that_is_down_fails_no_file(tmp_path: Path) -> None:
    """Connection refused is not a dropped connection: the file waits, however often.
    (Short backoffs: each round is mostly the in-process retries' 1 s + 2 s anyway.)"""
    fast = {"initial": "100ms", "maximum": "200ms", "hold_probe": "200ms", "max_age": "1h"}
    layout = make_layout(tmp_path / "run", DEAD_URL, retry=fast)
    make_instance(layout.drop / "a.dcm")
    with Stowd(layout) as daemon:
        wait_for(
            lambda: daemon.log.count("cannot connect") > 2 * MAX_DROPS,
            120,
            f"more than {2 * MAX_DROPS} refused connections",
            lambda: daemon.log,
        )
        assert daemon.terminate() == 0
    assert layout.files(layout.drop) == {"a.dcm"}
    assert layout.files(layout.failed) == set()
    assert DROPPED not in daemon.log
