"""Review of issue 22: what broke when it was tried on purpose (each test failed on main)."""

from __future__ import annotations

import os
from pathlib import Path

from dicomgen import make_instance
from harness import Stowd, make_layout, wait_for
from orthanc import Orthanc
from test_diskfull import root_required, tmpfs  # noqa: F401  (root_required: autouse)

MIB = 1024 * 1024


def test_a_copy_that_found_no_room_in_sent_leaves_no_part_copy_that_keeps_it_full(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    """sent/ on its own 4 MiB tmpfs: a 6 MiB file cannot be copied there.  Its part copy
    (``.name.stowd-tmp``) used to stay and fill sent/, so that a small file stored after it
    could not be moved either, for as long as the big one waited."""
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url)
    with tmpfs(layout.sent, "4m"):
        make_instance(layout.drop / "big.dcm", size_bytes=6 * MIB)
        daemon = Stowd(layout).start()
        try:
            wait_for(
                lambda: "cannot move" in daemon.log and "big.dcm" in daemon.log,
                120,
                "the big file's move failed",
                lambda: daemon.log,
            )
            assert [p.name for p in layout.sent.iterdir()] == []  # no part copy left
            make_instance(layout.drop / "small.dcm", size_bytes=100_000)
            wait_for(
                (layout.sent / "small.dcm").exists,
                120,
                "the small file moved to sent/",
                lambda: daemon.log,
            )
            assert (layout.drop / "big.dcm").exists()  # waits for room, never lost
        finally:
            daemon.stop()
    assert "Traceback" not in daemon.log
    assert not os.path.exists(layout.drop / "small.dcm")
