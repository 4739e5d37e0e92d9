"""The real daemon, as a subprocess, against a real Orthanc: the required scenarios (those
taking ``archive`` run against tiny_pacs too)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path

import httpx
import pydicom
from archives import Archive
from dicomgen import (
    make_instance,
    make_study,
    pydicom_all_files,
    pydicom_sample_files,
    write_empty,
    write_garbage,
    write_truncated,
    write_without_study_uid,
)
from harness import Layout, Stowd, make_layout, run_cli, wait_for
from orthanc import Orthanc
from stowproxy import StowProxy


def status(layout: Layout) -> dict[str, object]:
    result = run_cli("status", "-c", str(layout.config), "--json")
    assert result.returncode == 0, result.stderr
    data: dict[str, object] = json.loads(result.stdout)
    return data


def counts(layout: Layout) -> dict[str, int]:
    data = status(layout)["counts"]
    assert isinstance(data, dict)
    return data


def assert_settled_once(layout: Layout) -> None:
    """Nothing left in drop/, nothing in both folders."""
    assert layout.files(layout.drop) == set()
    assert layout.files(layout.sent) & layout.files(layout.failed) == set()


def test_files_dropped_while_running_reach_the_archive(tmp_path: Path, archive: Archive) -> None:
    layout = make_layout(tmp_path / "run", archive.dicomweb_url)
    with Stowd(layout) as daemon:
        wait_for(lambda: "watching" in daemon.log, 20, "the daemon to start", lambda: daemon.log)
        uids: set[str] = set()
        for study in range(4):
            uids |= {u for _, u in make_study(layout.drop / f"study{study}", 50)}
        wait_for(
            lambda: len(layout.files(layout.sent)) == 200,
            120,
            "200 files in sent/",
            lambda: daemon.log,
        )
        assert archive.sop_instance_uids() == uids
        assert_settled_once(layout)
        assert layout.files(layout.failed) == set()
        assert "study0/IM00001.dcm" in layout.files(layout.sent)
        assert counts(layout) == {"sent": 200}
        assert daemon.terminate() == 0
    assert "stopped" in daemon.log


def test_files_present_before_start_are_sent(tmp_path: Path, archive: Archive) -> None:
    layout = make_layout(tmp_path / "run", archive.dicomweb_url)
    uids = {u for _, u in make_study(layout.drop / "old", 30)}
    past = time.time() - 3600
    for path in (layout.drop / "old").iterdir():
        os.utime(path, (past, past))
    with Stowd(layout) as daemon:
        wait_for(
            lambda: len(layout.files(layout.sent)) == 30,
            60,
            "30 files in sent/",
            lambda: daemon.log,
        )
        assert archive.sop_instance_uids() == uids
        assert_settled_once(layout)


def test_a_slowly_written_file_is_sent_once_complete(tmp_path: Path, orthanc: Orthanc) -> None:
    # quiet 2 s: 1.7 s to spare for a writer the busy machine holds up between two chunks
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url, source={"quiet_period": "2s"})
    source = tmp_path / "source.dcm"
    uid = make_instance(source, size_bytes=2 * 1024 * 1024)
    data = source.read_bytes()
    with Stowd(layout) as daemon:
        wait_for(lambda: "watching" in daemon.log, 20, "the daemon to start", lambda: daemon.log)
        target = layout.drop / "slow.dcm"
        chunk = len(data) // 10 + 1
        with open(target, "wb") as fp:  # ten chunks, 0.3 s apart: 3 s in all, longer than quiet
            for start in range(0, len(data), chunk):
                fp.write(data[start : start + chunk])
                fp.flush()
                time.sleep(0.3)
        wait_for(
            lambda: layout.files(layout.sent) == {"slow.dcm"},
            60,
            "slow.dcm in sent/",
            lambda: daemon.log,
        )
        assert (layout.sent / "slow.dcm").read_bytes() == data
        [found] = httpx.post(f"{orthanc.url}/tools/lookup", content=uid).json()
        stored = httpx.get(f"{orthanc.url}/instances/{found['ID']}/file").content
        assert pydicom.dcmread(io.BytesIO(stored)).SOPInstanceUID == uid
        assert len(stored) >= len(data) - 132  # Orthanc may re-write the meta header
        assert daemon.log.count("slow.dcm -> failed") == 0
        assert counts(layout) == {"sent": 1}


def test_kill_9_during_uploads_loses_nothing(tmp_path: Path, archive: Archive) -> None:
    layout = make_layout(tmp_path / "run", archive.dicomweb_url)
    uids: set[str] = set()
    for study in range(8):
        uids |= {u for _, u in make_study(layout.drop / f"s{study}", 50, size_bytes=200_000)}
    with Stowd(layout) as daemon:
        wait_for(
            lambda: len(layout.files(layout.sent)) >= 20, 120, "some files sent", lambda: daemon.log
        )
        daemon.kill()
    assert len(layout.files(layout.sent)) < 400, "killed too late to prove anything"
    with Stowd(layout) as again:
        wait_for(
            lambda: len(layout.files(layout.sent)) == 400,
            180,
            "all 400 in sent/",
            lambda: again.log,
        )
        assert archive.sop_instance_uids() == uids
        assert_settled_once(layout)
        assert layout.files(layout.failed) == set()
        assert counts(layout) == {"sent": 400}


def test_archive_down_mid_run_holds_files_then_sends_them(tmp_path: Path, orthanc: Orthanc) -> None:
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url)
    with Stowd(layout) as daemon:
        first = {u for _, u in make_study(layout.drop / "a", 40)}
        wait_for(
            lambda: len(layout.files(layout.sent)) == 40, 60, "first 40 sent", lambda: daemon.log
        )
        orthanc.stop()
        second = {u for _, u in make_study(layout.drop / "b", 40)}
        wait_for(
            lambda: "unavailable" in daemon.log, 30, "the outage to be noticed", lambda: daemon.log
        )
        time.sleep(4)  # several retry rounds while the archive is down
        held = status(layout)
        assert held["destinations"]["pacs"]["state"] == "held"  # type: ignore[index]
        assert layout.files(layout.failed) == set()
        assert len(layout.files(layout.drop)) == 40
        orthanc.start()
        wait_for(
            lambda: len(layout.files(layout.sent)) == 80, 90, "all 80 sent", lambda: daemon.log
        )
        assert orthanc.sop_instance_uids() == first | second
        assert layout.files(layout.failed) == set()
        assert status(layout)["destinations"]["pacs"]["state"] == "ok"  # type: ignore[index]
        assert daemon.alive()


def test_one_outage_counts_once_however_many_workers_failed_in_it(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    """Four workers' requests are in flight when the archive goes down: they all fail, but
    it is one outage, so the hold waits ``retry.initial`` (its first step), not that grown
    once per failed request (x 2^3 here: minutes with longer waits)."""
    outage = threading.Event()  # set: the archive is down; the proxy drops every request
    four = threading.Event()

    def on_arrival(number: int) -> bool:
        if number == 4:
            four.set()
        if number <= 4:  # the first four requests wait for the archive to go down
            outage.wait(120)
        return not outage.is_set()  # False: no answer, the connection closed

    initial = 20.0
    proxy = StowProxy(orthanc.dicomweb_url)
    try:
        proxy.on_arrival = on_arrival
        url = proxy.base
        layout = make_layout(
            tmp_path / "run",
            url,
            retry={"initial": f"{initial:g}s", "maximum": "10m", "max_age": "1h"},
            destinations={"pacs": {"url": url, "workers": 4, "timeouts": {"read": "60s"}}},
        )
        uids = {make_instance(layout.drop / f"s{i}.dcm") for i in range(8)}  # 8 studies
        with Stowd(layout) as daemon:
            wait_for(four.is_set, 60, "four requests in flight", lambda: daemon.log)
            orthanc.stop()
            outage.set()
            wait_for(
                lambda: daemon.log.count("stay queued, next try in") >= 4,
                60,
                "the four requests to fail",
                lambda: daemon.log,
            )
            pacs = status(layout)["destinations"]["pacs"]  # type: ignore[index]
            assert pacs["state"] == "held"
            assert pacs["failures"] == 1, pacs
            assert pacs["held_until"] - pacs["held_since"] <= initial, pacs
            orthanc.start()
            outage.clear()
            wait_for(
                lambda: len(layout.files(layout.sent)) == 8,
                90,
                "all 8 sent after the hold",
                lambda: daemon.log,
            )
            assert orthanc.sop_instance_uids() == uids
            assert layout.files(layout.failed) == set()
    finally:
        outage.set()  # no request left waiting
        proxy.stop()


def test_archive_killed_mid_request_loses_nothing(tmp_path: Path, orthanc: Orthanc) -> None:
    """kill -9 of the archive while bodies are on the wire: connections reset mid-request."""
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url)
    uids: set[str] = set()
    for study in range(4):
        uids |= {u for _, u in make_study(layout.drop / f"s{study}", 40, size_bytes=500_000)}
    with Stowd(layout) as daemon:
        wait_for(
            lambda: len(layout.files(layout.sent)) >= 10, 60, "some files sent", lambda: daemon.log
        )
        orthanc.kill()
        time.sleep(3)
        assert layout.files(layout.failed) == set()
        assert len(layout.files(layout.sent)) < 160, "the archive died too late to prove it"
        orthanc.start()
        wait_for(
            lambda: len(layout.files(layout.sent)) == 160, 120, "all 160 sent", lambda: daemon.log
        )
        assert orthanc.sop_instance_uids() == uids
        assert layout.files(layout.failed) == set()
        assert_settled_once(layout)
        assert daemon.alive()


def test_bad_files_fail_with_reasons_and_the_daemon_keeps_running(
    tmp_path: Path, archive: Archive
) -> None:
    layout = make_layout(tmp_path / "run", archive.dicomweb_url)
    archive.stop()  # hold the good files in the queue while one of them is deleted
    with Stowd(layout) as daemon:
        write_garbage(layout.drop / "garbage.dcm")
        write_empty(layout.drop / "empty.dcm")
        write_truncated(layout.drop / "truncated.dcm")
        write_without_study_uid(layout.drop / "nostudy.dcm")
        good = make_instance(layout.drop / "good.dcm")
        make_instance(layout.drop / "deleted.dcm")
        bad = {"garbage.dcm", "empty.dcm", "truncated.dcm", "nostudy.dcm"}
        wait_for(
            lambda: layout.files(layout.failed) == bad,
            60,
            "the bad files in failed/",
            lambda: daemon.log,
        )
        wait_for(
            lambda: (
                counts(layout).get("pending", 0)
                + counts(layout).get("waiting", 0)
                + counts(layout).get("claimed", 0)
                == 2
            ),
            30,
            "two good files queued",
        )
        (layout.drop / "deleted.dcm").unlink()
        archive.start()
        wait_for(
            lambda: layout.files(layout.sent) == {"good.dcm"},
            60,
            "good.dcm sent",
            lambda: daemon.log,
        )
        wait_for(lambda: counts(layout).get("gone") == 1, 30, "the deleted file forgotten")
        assert archive.sop_instance_uids() == {good}
        reasons = {
            name: json.loads(path.read_text())["reason"]
            for name, path in layout.error_files().items()
        }
        assert "empty" in reasons["empty.dcm"]
        assert "not a DICOM file" in reasons["garbage.dcm"]
        assert "truncated" in reasons["truncated.dcm"]
        assert "StudyInstanceUID" in reasons["nostudy.dcm"]
        assert daemon.alive()
        make_instance(layout.drop / "after.dcm")
        wait_for(
            lambda: "after.dcm" in layout.files(layout.sent),
            30,
            "a later file sent",
            lambda: daemon.log,
        )


def test_malformed_config_lists_every_problem(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(
        "queue: ./q.db\n"
        "sources:\n"
        "  - name: ct1\n"
        "    watch: ./drop\n"
        "    sent: ./sent\n"
        "    destination: nowhere\n"
        "    quiet_period: soon\n"
        "destinations:\n"
        "  pacs:\n"
        "    url: ftp://archive\n"
        "    wrokers: 2\n"
    )
    result = run_cli("check-config", "-c", str(config))
    assert result.returncode == 2
    err = result.stderr
    assert str(config) in err
    for needle in (
        "sources[0].failed",
        "nowhere",
        "quiet_period",
        "line 7",
        "url",
        "wrokers",
        "workers",
    ):
        assert needle in err, f"{needle!r} missing from:\n{err}"
    run = run_cli("run", "-c", str(config))
    assert run.returncode == 2
    assert run.stderr == err


def test_status_works_while_the_daemon_runs(tmp_path: Path, orthanc: Orthanc) -> None:
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url)
    with Stowd(layout) as daemon:
        make_study(layout.drop / "x", 5)
        wait_for(lambda: len(layout.files(layout.sent)) == 5, 60, "5 sent", lambda: daemon.log)
        data = status(layout)
        assert data["daemon_pid"] == daemon.proc.pid  # type: ignore[union-attr]
        assert data["counts"] == {"sent": 5}
        assert isinstance(data["files_per_minute"], float) and data["files_per_minute"] > 0
        human = run_cli("status", "-c", str(layout.config))
        assert "5 sent" in human.stdout and "running" in human.stdout
        assert run_cli("check-config", "-c", str(layout.config)).returncode == 0


def test_pydicom_corpus_every_file_settles(tmp_path: Path, orthanc: Orthanc) -> None:
    """Every file pydicom ships (DICOM or not, good or broken) ends in sent/ or failed/."""
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url)
    samples = pydicom_all_files()
    assert len(samples) > 200
    folders: dict[Path, str] = {}
    for sample in samples:
        folder = folders.setdefault(sample.parent, f"d{len(folders)}")
        (layout.drop / folder).mkdir(exist_ok=True)
        shutil.copy(sample, layout.drop / folder / sample.name)
    with Stowd(layout) as daemon:
        wait_for(
            lambda: (
                len(layout.files(layout.sent)) + len(layout.files(layout.failed)) == len(samples)
            ),
            240,
            "every sample settled",
            lambda: daemon.log,
        )
        assert_settled_once(layout)
        reasons = {
            name: json.loads(path.read_text())["reason"]
            for name, path in layout.error_files().items()
        }
        assert set(reasons) == layout.files(layout.failed)
        assert all(reasons.values())
        by_name = {Path(name).name: reason for name, reason in reasons.items()}
        assert "not a file type stowd can send" in by_name["README.txt"]
        assert "DICOMDIR" in by_name["DICOMDIR"]
        usable = {s.name for s in pydicom_sample_files()}
        sent_names = {Path(n).name for n in layout.files(layout.sent)}
        assert len(sent_names & usable) >= len(usable) - 10  # Orthanc refuses a few broken ones
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # some samples carry odd values on purpose
            sent_uids = {
                str(pydicom.dcmread(layout.sent / name, stop_before_pixels=True).SOPInstanceUID)
                for name in layout.files(layout.sent)
            }
        assert sent_uids <= orthanc.sop_instance_uids()
        assert daemon.alive()


def test_sigterm_lets_the_daemon_exit_cleanly_and_a_second_one_exits_at_once(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url)
    with Stowd(layout) as daemon:
        wait_for(lambda: "watching" in daemon.log, 20, "the daemon to start", lambda: daemon.log)
        assert daemon.terminate() == 0
    with Stowd(layout) as second:
        wait_for(lambda: "watching" in second.log, 20, "the daemon to restart", lambda: second.log)
        assert second.proc is not None
        os.kill(second.proc.pid, signal.SIGTERM)
        os.kill(second.proc.pid, signal.SIGTERM)
        assert second.proc.wait(10) in (0, 1)  # 1 when the second signal cut the shutdown short
    with Stowd(layout) as third:  # the queue is usable again right away
        make_instance(layout.drop / "later.dcm")
        wait_for(
            lambda: layout.files(layout.sent) == {"later.dcm"},
            30,
            "later.dcm sent",
            lambda: third.log,
        )
