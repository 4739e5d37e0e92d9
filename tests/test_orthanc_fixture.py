"""The test Orthanc: starts empty, stores generated files through STOW-RS, survives restarts."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from dicomgen import make_instance, make_instance_bytes, write_garbage, write_without_study_uid
from needs import require
from orthanc import Orthanc, OrthancError, find_dicomweb_plugin, find_orthanc
from tinypacs import TinyPacs, tiny_pacs_missing_reason

SUPPORT_DIR = Path(__file__).resolve().parent / "support"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def stow(dicomweb_url: str, parts: list[bytes]) -> httpx.Response:
    """POST *parts* as one multipart/related; type="application/dicom" STOW-RS request."""
    boundary = uuid.uuid4().hex
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n"
        for part in parts
    )
    body += b"--" + boundary.encode() + b"--\r\n"
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    return httpx.post(f"{dicomweb_url}/studies", content=body, headers=headers, timeout=60)


def sequence_items(answer: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = answer.get(tag, {}).get("Value", [])
    return items


def referenced_uids(answer: dict[str, Any]) -> list[str]:
    return [item["00081155"]["Value"][0] for item in sequence_items(answer, "00081199")]


def test_fixture_starts_empty_with_dicomweb(orthanc: Orthanc) -> None:
    assert orthanc.is_running()
    assert orthanc.url == f"http://127.0.0.1:{orthanc.port}"
    assert orthanc.dicomweb_url == orthanc.url + "/dicom-web"
    system = orthanc.get_json("/system")
    assert system["HttpPort"] == orthanc.port
    assert "dicom-web" in orthanc.get_json("/plugins")
    assert orthanc.instance_count() == 0
    assert orthanc.study_count() == 0
    assert orthanc.sop_instance_uids() == set()
    # QIDO-RS answers on the DICOMweb root too: the plugin really is mounted there.
    qido = httpx.get(f"{orthanc.dicomweb_url}/studies", timeout=10)
    assert qido.status_code == 200
    assert qido.json() == []


def test_stow_stores_generated_files(orthanc: Orthanc, tmp_path: Path) -> None:
    study_uid = "1.2.826.0.1.3680043.8.498.4242"
    paths = [tmp_path / f"in{i}.dcm" for i in range(3)]
    uids = [make_instance(p, study_uid=study_uid, instance_number=i) for i, p in enumerate(paths)]

    response = stow(orthanc.dicomweb_url, [p.read_bytes() for p in paths])

    assert response.status_code == 200, response.text
    answer = response.json()
    assert sorted(referenced_uids(answer)) == sorted(uids)
    assert sequence_items(answer, "00081198") == []
    for item in sequence_items(answer, "00081199"):
        assert item["00081150"]["Value"] == [SECONDARY_CAPTURE]
    assert orthanc.sop_instance_uids() == set(uids)
    assert orthanc.instance_count() == 3
    assert orthanc.study_count() == 1
    assert orthanc.study_instance_uids() == {study_uid}


def test_large_generated_file_is_stored(orthanc: Orthanc) -> None:
    data, uid = make_instance_bytes(size_bytes=512 * 1024)
    response = stow(orthanc.dicomweb_url, [data])
    assert response.status_code == 200, response.text
    assert referenced_uids(response.json()) == [uid]
    assert orthanc.sop_instance_uids() == {uid}


def test_restart_keeps_data_and_port(orthanc: Orthanc) -> None:
    first = [make_instance_bytes() for _ in range(2)]
    assert stow(orthanc.dicomweb_url, [data for data, _ in first]).status_code == 200
    port, url, log = orthanc.port, orthanc.dicomweb_url, orthanc.log_path

    orthanc.restart()

    assert orthanc.is_running()
    assert (orthanc.port, orthanc.dicomweb_url) == (port, url)
    assert orthanc.sop_instance_uids() == {uid for _, uid in first}
    data, uid = make_instance_bytes()
    assert stow(url, [data]).status_code == 200
    assert orthanc.instance_count() == 3
    assert uid in orthanc.sop_instance_uids()
    assert log.read_text(encoding="utf-8", errors="replace").count("Orthanc has started") == 2


def test_stopped_archive_refuses_connections_then_comes_back(orthanc: Orthanc) -> None:
    data, uid = make_instance_bytes()
    orthanc.stop()
    assert not orthanc.is_running()
    with pytest.raises(httpx.ConnectError):
        stow(orthanc.dicomweb_url, [data])

    orthanc.start()
    assert stow(orthanc.dicomweb_url, [data]).status_code == 200
    assert orthanc.sop_instance_uids() == {uid}


def test_kill_keeps_stored_data(orthanc: Orthanc) -> None:
    data, uid = make_instance_bytes()
    assert stow(orthanc.dicomweb_url, [data]).status_code == 200
    orthanc.kill()
    assert not orthanc.is_running()
    orthanc.start()
    assert orthanc.sop_instance_uids() == {uid}


def test_bad_files_are_refused_as_the_notes_say(orthanc: Orthanc, tmp_path: Path) -> None:
    garbage = write_garbage(tmp_path / "garbage.bin").read_bytes()
    no_study = tmp_path / "nostudy.dcm"
    no_study_uid = write_without_study_uid(no_study)
    good, good_uid = make_instance_bytes()

    # One unparsable part: 400 for the whole request, yet the good part is stored.
    response = stow(orthanc.dicomweb_url, [good, garbage])
    assert response.status_code == 400
    assert referenced_uids(response.json()) == [good_uid]

    # A parsable instance without StudyInstanceUID: listed as failed (0xC000).
    response = stow(orthanc.dicomweb_url, [no_study.read_bytes()])
    assert response.status_code == 400
    failed = sequence_items(response.json(), "00081198")
    assert [item["00081155"]["Value"][0] for item in failed] == [no_study_uid]
    assert failed[0]["00081197"]["Value"] == [0xC000]

    assert orthanc.sop_instance_uids() == {good_uid}


@pytest.mark.usefixtures("orthanc_required")
def test_start_fails_with_log_tail_when_the_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        server = Orthanc(tmp_path / "o", port=port)
        with pytest.raises(OrthancError, match="already in use"):
            server.start()
        assert not server.is_running()
        assert server.port == port


def test_start_does_not_mistake_another_orthanc_for_its_own(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    second = Orthanc(tmp_path / "second", port=orthanc.port)
    with pytest.raises(OrthancError, match="already in use"):
        second.start()
    assert not second.is_running()
    assert orthanc.is_running()


@contextlib.contextmanager
def port_taken(port: int) -> Iterator[int]:
    """``port`` on 127.0.0.1 bound and listened on by someone else (another suite's server)
    until the block ends."""
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        yield port


@pytest.mark.usefixtures("orthanc_required")
def test_automatic_port_moves_when_taken_before_first_start(tmp_path: Path) -> None:
    server = Orthanc(tmp_path / "o")
    with port_taken(server.port) as taken, server:
        assert server.port != taken
        assert server.instance_count() == 0
    assert not server.is_running()


def test_tiny_pacs_moves_to_another_port_when_its_own_was_taken_before_first_start(
    tmp_path: Path,
) -> None:
    """Its ports are chosen when it is made: another suite's server may bind one first."""
    require(tiny_pacs_missing_reason())
    server = TinyPacs(tmp_path / "t")
    with port_taken(server.port) as taken, server:
        assert server.port != taken
        assert httpx.get(f"{server.dicomweb_url}/studies", timeout=10).status_code in (200, 204)
    assert not server.is_running()


@pytest.mark.usefixtures("orthanc_required")
def test_find_functions_point_at_installed_files() -> None:
    binary, plugin = find_orthanc(), find_dicomweb_plugin()
    assert binary is not None
    assert os.access(binary, os.X_OK)
    assert plugin is not None
    assert Path(plugin).name.startswith("libOrthancDicomWeb.so")


@pytest.mark.usefixtures("orthanc_required")
def test_script_runs_in_foreground_until_sigterm(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    process = subprocess.Popen(
        [
            sys.executable,
            str(SUPPORT_DIR / "orthanc.py"),
            *("--dir", str(tmp_path / "o")),
            *("--ready-file", str(ready)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "orthanc.py never became ready"
        url = ready.read_text(encoding="utf-8").strip()
        assert url.startswith("http://127.0.0.1:")
        assert httpx.get(f"{url}/system", timeout=10).status_code == 200
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output
    assert url.encode() in output
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/system", timeout=5)
