"""The real daemon with other folder layouts and lifecycles: sent/ inside watch, sent/ on
another filesystem, re-dropped files, a second daemon on the same queue, exit codes."""

from __future__ import annotations

import json
import os
import re
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicomgen import make_instance, make_study
from harness import Layout, Stowd, make_layout, run_cli, wait_for
from orthanc import Orthanc

SHM = Path("/dev/shm")


def with_source(layout_root: Path, url: str, **source: object) -> Layout:
    """A layout whose single source has ``source`` keys overridden (rescans every second)."""
    return make_layout(layout_root, url, source={"rescan_interval": "1s", **source})


def test_sent_and_failed_inside_watch_never_loop(tmp_path: Path, orthanc: Orthanc) -> None:
    layout = with_source(
        tmp_path / "run", orthanc.dicomweb_url, sent="./drop/_sent", failed="./drop/_failed"
    )
    with Stowd(layout) as daemon:
        make_study(layout.drop / "s", 5)
        (layout.drop / "junk.dcm").write_bytes(b"junk")
        inside_sent, inside_failed = layout.drop / "_sent", layout.drop / "_failed"
        wait_for(
            lambda: (
                len(layout.files(inside_sent)) == 5 and layout.files(inside_failed) == {"junk.dcm"}
            ),
            60,
            "all settled",
            lambda: daemon.log,
        )
        time.sleep(3)  # three rescans of drop/, which holds _sent/ and _failed/
        data = json.loads(run_cli("status", "-c", str(layout.config), "--json").stdout)
        assert data["counts"] == {"sent": 5, "failed": 1}
        sent_in_batches = re.findall(r"batch of (\d+) file", daemon.log)
        assert sum(int(n) for n in sent_in_batches) == 5  # each file sent once, never again


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    if not SHM.is_dir() or os.stat(SHM).st_dev == os.stat(tempfile.gettempdir()).st_dev:
        pytest.skip("no second filesystem (/dev/shm) to move across")
    with tempfile.TemporaryDirectory(dir=SHM) as folder:
        yield Path(folder)


def test_sent_on_another_filesystem(tmp_path: Path, orthanc: Orthanc, shm_dir: Path) -> None:
    layout = with_source(tmp_path / "run", orthanc.dicomweb_url, sent=str(shm_dir / "sent"))
    files = make_study(layout.drop / "s", 3, size_bytes=300_000)
    originals = {p.name: p.read_bytes() for p, _ in files}
    with Stowd(layout) as daemon:
        wait_for(
            lambda: len(layout.files(shm_dir / "sent")) == 3,
            60,
            "3 files on /dev/shm",
            lambda: daemon.log,
        )
        for name, data in originals.items():
            assert (shm_dir / "sent" / "s" / name).read_bytes() == data
        assert layout.files(layout.drop) == set()
        assert not list((shm_dir / "sent").rglob("*stowd-tmp"))


def test_a_file_dropped_again_at_the_same_path_is_sent_again(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url)
    with Stowd(layout) as daemon:
        first = make_instance(layout.drop / "x.dcm")
        wait_for(
            lambda: layout.files(layout.sent) == {"x.dcm"}, 30, "x.dcm sent", lambda: daemon.log
        )
        second = make_instance(layout.drop / "x.dcm")
        wait_for(
            lambda: layout.files(layout.sent) == {"x.dcm", "x~1.dcm"},
            30,
            "the second x.dcm sent beside the first",
            lambda: daemon.log,
        )
        assert orthanc.sop_instance_uids() == {first, second}


def test_one_daemon_per_queue_and_exit_codes(tmp_path: Path, orthanc: Orthanc) -> None:
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url)
    assert run_cli("status", "-c", str(layout.config)).returncode == 1  # no queue yet
    with Stowd(layout) as daemon:
        wait_for(lambda: "watching" in daemon.log, 20, "the daemon to start", lambda: daemon.log)
        second = run_cli("run", "-c", str(layout.config), timeout=30)
        assert second.returncode == 75  # EX_TEMPFAIL (cli.EXIT_QUEUE_BUSY): try again later
        assert "another stowd" in second.stderr and str(daemon.proc.pid) in second.stderr  # type: ignore[union-attr]
        assert daemon.alive()
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop, exit 130
        assert daemon.proc.wait(30) == 130
    assert "not running" in run_cli("status", "-c", str(layout.config)).stdout
    assert run_cli("frobnicate").returncode == 2
    assert run_cli("check-config", "-c", str(tmp_path / "missing.yaml")).returncode == 2


def test_remove_empty_dirs(tmp_path: Path, orthanc: Orthanc) -> None:
    layout = with_source(tmp_path / "run", orthanc.dicomweb_url, remove_empty_dirs=True)
    with Stowd(layout) as daemon:
        make_study(layout.drop / "patient" / "study", 3)
        wait_for(lambda: len(layout.files(layout.sent)) == 3, 30, "3 sent", lambda: daemon.log)
        wait_for(lambda: not (layout.drop / "patient").exists(), 60, "empty folders removed")
        assert layout.drop.is_dir()


def test_an_unusable_queue_path_is_a_clear_runtime_error(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a folder")
    layout = make_layout(tmp_path, "http://127.0.0.1:9/dicom-web", queue="./afile/q.db")
    result = run_cli("run", "-c", str(layout.config), timeout=30)
    assert result.returncode == 1
    assert "cannot create the queue folder" in result.stderr
    assert "Traceback" not in result.stderr
