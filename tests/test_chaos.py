"""Everything at once: files keep arriving while the daemon is killed -9 twice and the archive
is killed -9 and brought back.  At the end every file is where it belongs, exactly once."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

from dicomgen import make_study, write_garbage, write_truncated
from harness import Layout, Stowd, make_layout, run_cli, wait_for
from orthanc import Orthanc

ROUNDS = 30
PER_ROUND = 8


def stage_files(stage: Path) -> tuple[dict[str, str], set[str]]:
    """Good files (relative path -> SOPInstanceUID) and bad ones, ready to be dropped."""
    good: dict[str, str] = {}
    bad: set[str] = set()
    for n in range(ROUNDS):
        for path, uid in make_study(stage / f"r{n:02d}", PER_ROUND, size_bytes=400_000):
            good[str(path.relative_to(stage))] = uid
        if n % 5 == 0:
            write_garbage(stage / f"r{n:02d}" / "garbage.dcm")
            write_truncated(stage / f"r{n:02d}" / "truncated.dcm")
            bad |= {f"r{n:02d}/garbage.dcm", f"r{n:02d}/truncated.dcm"}
    return good, bad


def drop_slowly(stage: Path, layout: Layout, done: threading.Event) -> None:
    """One study folder every 0.25 s, moved in file by file (as a DICOM receiver would)."""
    for folder in sorted(stage.iterdir()):
        target = layout.drop / folder.name
        target.mkdir()
        for path in sorted(folder.iterdir()):
            shutil.move(path, target / path.name)
        time.sleep(0.25)
    done.set()


def queue_counts(layout: Layout) -> dict[str, int]:
    result = run_cli("status", "-c", str(layout.config), "--json")
    counts: dict[str, int] = json.loads(result.stdout)["counts"]
    return counts


def test_daemon_and_archive_killed_while_files_arrive(tmp_path: Path, orthanc: Orthanc) -> None:
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url)
    good, bad = stage_files(tmp_path / "stage")
    dropped = threading.Event()
    dropper = threading.Thread(
        target=drop_slowly, args=(tmp_path / "stage", layout, dropped), daemon=True
    )
    daemon = Stowd(layout).start()
    dropper.start()
    try:
        time.sleep(2.0)
        daemon.kill()
        daemon = Stowd(layout).start()
        time.sleep(1.5)
        orthanc.kill()
        time.sleep(4.5)  # longer than the in-process retries (1 s + 2 s): the queue holds
        orthanc.start()
        time.sleep(1.5)
        daemon.kill()
        daemon = Stowd(layout).start()
        assert dropped.wait(60)
        total = len(good) + len(bad)
        wait_for(
            lambda: len(layout.files(layout.sent)) + len(layout.files(layout.failed)) == total,
            180,
            f"all {total} files settled",
            lambda: daemon.log,
        )
        assert layout.files(layout.sent) == set(good)
        assert layout.files(layout.failed) == bad
        assert set(layout.error_files()) == bad
        assert layout.files(layout.drop) == set()
        assert orthanc.sop_instance_uids() == set(good.values())
        # one job per file: nothing pending, claimed or settling, nothing counted twice
        assert queue_counts(layout) == {"sent": len(good), "failed": len(bad)}
        assert daemon.alive()
    finally:
        daemon.stop()
