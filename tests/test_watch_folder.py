"""The watch folder itself deleted and created again while the real daemon runs (issue 22)."""

from __future__ import annotations

import json
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from dicomgen import make_instance
from harness import Layout, Stowd, make_layout, run_cli, wait_for
from orthanc import Orthanc

from stowd.config.model import Source
from stowd.pipeline.queue import NewFile
from stowd.pipeline.watch import Watcher


def status_warnings(layout: Layout) -> list[str]:
    result = run_cli("status", "-c", str(layout.config), "--json")
    assert result.returncode == 0, result.stderr
    warnings: list[str] = json.loads(result.stdout)["warnings"]
    return warnings


def missing_said(layout: Layout) -> bool:
    return any("is missing" in w for w in status_warnings(layout))


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_a_recreated_watch_folder_is_watched_again_at_once(
    tmp_path: Path, orthanc: Orthanc, polling: bool
) -> None:
    # rescans every hour: a file found within the test's bounds was found by watching
    source = {"rescan_interval": "1h", "polling": polling}
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url, source=source)
    with Stowd(layout) as daemon:
        wait_for(lambda: "watching" in daemon.log, 30, "the daemon to start", lambda: daemon.log)
        make_instance(layout.drop / "before.dcm")
        wait_for(lambda: layout.files(layout.sent) == {"before.dcm"}, 60, "before.dcm sent")
        shutil.rmtree(layout.drop)
        wait_for(
            lambda: "watch folder" in daemon.log and "was deleted" in daemon.log,
            30,
            "a warning that the watch folder was deleted",
            lambda: daemon.log,
        )
        assert missing_said(layout)
        layout.drop.mkdir()
        make_instance(layout.drop / "right-after.dcm")
        wait_for(
            lambda: layout.files(layout.sent) == {"before.dcm", "right-after.dcm"},
            60,
            "the file dropped right after the re-creation sent (rescans are an hour apart)",
            lambda: daemon.log,
        )
        # found by the scan of the returned folder; this one only events can announce
        make_instance(layout.drop / "later" / "x.dcm")
        wait_for(
            lambda: "later/x.dcm" in layout.files(layout.sent),
            60,
            "a file dropped later sent (rescans are an hour apart)",
            lambda: daemon.log,
        )
        assert not missing_said(layout)
        assert daemon.terminate() == 0
    lines = [line for line in daemon.log.splitlines() if "watch folder" in line]
    assert sum("was deleted;" in line for line in lines) == 1, lines
    assert sum("is back; watching it again" in line for line in lines) == 1, lines
    assert all("WARNING" in line for line in lines), lines


def test_a_watch_folder_replaced_between_two_looks_is_watched_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Deleted and created again at once (maybe within one look): the new folder is watched."""
    watch = tmp_path / "drop"
    watch.mkdir()
    source = Source("ct", watch, tmp_path / "sent", tmp_path / "failed", "pacs")
    source = replace(source, quiet_period=0.0, rescan_interval=3600.0)
    found: list[str] = []

    def sink(files: list[NewFile]) -> int:
        found.extend(f.rel for f in files)
        return len(files)

    watcher = Watcher(source, "pacs", sink)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,))
    thread.start()
    try:
        wait_for(watcher.observer_alive, 30, "the observer")
        shutil.rmtree(watch)
        watch.mkdir()
        wait_for(lambda: "watching it again" in caplog.text, 30, "the warning")
        (watch / "a.dcm").write_bytes(b"a")
        wait_for(lambda: "a.dcm" in found, 30, "a.dcm found")  # the scan of the return ran
        (watch / "x.dcm").write_bytes(b"x")
        wait_for(lambda: "x.dcm" in found, 30, "x.dcm found (the next rescan is in an hour)")
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
