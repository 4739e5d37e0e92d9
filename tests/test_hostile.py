"""Issue 14: hostile drop folders and hostile answers, against the real daemon."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from dicomgen import make_instance, write_garbage
from harness import Layout, Stowd, make_layout, run_cli, wait_for
from hostileserver import BOMB_BYTES, HostileArchive, gzip_bomb
from orthanc import Orthanc

DEAD_URL = "http://127.0.0.1:9/dicom-web"  # nothing listens: no file reaches an archive


# -- retrying what can never work -------------------------------------------------------------
def test_a_sidecar_with_a_5000_digit_number_fails_the_file_at_once(tmp_path: Path) -> None:
    """Was: ``ValueError: Exceeds the limit (4300 digits)`` logged with a traceback as an
    unexpected error, and the file retried until retry.max_age."""
    layout = make_layout(tmp_path / "run", DEAD_URL, source={"sidecars": True})
    make_instance(layout.drop / "big/a.dcm")
    (layout.drop / "big/a.json").write_text('{"InstanceNumber": %s}' % ("9" * 5000))
    make_instance(layout.drop / "deep/b.dcm")
    (layout.drop / "deep/b.yaml").write_text("PatientID: " + "[" * 5000 + "]" * 5000 + "\n")
    with Stowd(layout) as daemon:
        wait_for(
            lambda: {"big/a.dcm", "deep/b.dcm"} <= layout.files(layout.failed),
            60,
            "both files in failed/",
            lambda: daemon.log,
        )
        assert daemon.terminate() == 0
    errors = layout.error_files()
    big = json.loads(errors["big/a.dcm"].read_text())
    assert "sidecar a.json" in big["reason"], big
    assert "4300 digits" in big["reason"], big
    deep = json.loads(errors["deep/b.dcm"].read_text())
    assert "sidecar b.yaml" in deep["reason"], deep
    assert "Traceback" not in daemon.log
    assert "unexpected error" not in daemon.log


def with_damaged_series_uid(path: Path) -> None:
    """``path`` with its SeriesInstanceUID stored as FD (8-byte numbers) in 12 bytes: a
    value pydicom cannot convert (``BytesLengthException``, not a ValueError)."""
    make_instance(path, series_uid="1.2.3.4.5.6")  # 11 characters, padded to 12
    data = path.read_bytes()
    element = b"\x20\x00\x0e\x00UI\x0c\x00"  # (0020,000E) UI, 12 bytes (explicit VR LE)
    assert data.count(element) == 1
    path.write_bytes(data.replace(element, b"\x20\x00\x0e\x00FD\x0c\x00"))


def test_a_rule_on_an_attribute_whose_bytes_cannot_be_read_fails_the_file(
    tmp_path: Path,
) -> None:
    """Was: pydicom's ``BytesLengthException`` while the rules read the file's own
    SeriesInstanceUID (to compare it with the rule's) was logged with a traceback as an
    unexpected error, and the file retried until retry.max_age; it is never sent with a
    UID stowd could not read."""
    rules = [{"name": "new series", "match": {"path": "*"}, "set": {"SeriesInstanceUID": "1.2.3"}}]
    layout = make_layout(tmp_path / "run", DEAD_URL, rules=rules)
    with_damaged_series_uid(layout.drop / "a.dcm")
    with Stowd(layout) as daemon:
        wait_for(
            lambda: "a.dcm" in layout.files(layout.failed),
            60,
            "a.dcm in failed/",
            lambda: daemon.log,
        )
        assert daemon.terminate() == 0
    reason = json.loads(layout.error_files()["a.dcm"].read_text())["reason"]
    assert "SeriesInstanceUID cannot be read" in reason, reason
    assert "b'" not in reason, reason  # no bytes of the file quoted
    assert "Traceback" not in daemon.log
    assert "unexpected error" not in daemon.log


# -- memory bombs and trickles in the archive's answers ---------------------------------------
MAX_PEAK_MB = 300.0


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM in /proc/PID/status), in MB (10^6 bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def bombed(layout: Layout, archive: HostileArchive, request: str, reason: str) -> float:
    """Run the daemon until ``request`` was answered with the bomb twice and ``reason`` is in
    its log; the daemon's peak RSS in MB (printed)."""
    with Stowd(layout) as daemon:
        wait_for(lambda: reason in daemon.log, 120, repr(reason), lambda: daemon.log)
        wait_for(lambda: archive.seen(request) >= 2, 60, f"a second {request}", lambda: daemon.log)
        assert daemon.proc is not None
        peak = peak_rss_mb(daemon.proc.pid)
        status = run_cli("status", "-c", str(layout.config)).stdout
        assert daemon.terminate() == 0
    bomb = f"a gzip bomb of {BOMB_BYTES >> 20} MiB"
    print(f"\n{request} answered by {bomb}: daemon VmHWM {peak:.1f} MB")
    print(status)
    assert "Traceback" not in daemon.log
    return peak


def test_a_gzip_bomb_as_stow_answer_holds_the_destination_in_bounded_memory(
    tmp_path: Path,
) -> None:
    gzip_bomb()  # made before the daemon starts (a few seconds)
    with HostileArchive("bomb") as archive:
        layout = make_layout(tmp_path / "run", archive.base)
        make_instance(layout.drop / "a.dcm")
        reason = "the archive sent an answer larger than 16 MiB (decoded)"
        peak = bombed(layout, archive, "POST /dicom-web/studies", reason)
    assert peak < MAX_PEAK_MB
    assert layout.files(layout.drop) == {"a.dcm"}  # waits: neither sent nor failed
    assert layout.files(layout.failed) == set()


def test_a_gzip_bomb_as_lookup_answer_makes_the_file_wait_in_bounded_memory(
    tmp_path: Path,
) -> None:
    gzip_bomb()
    rule = {
        "match": {"type": "dicom"},
        "lookup": {"in": "studies", "query": {"AccessionNumber": "{dicom.AccessionNumber}"}},
    }
    with HostileArchive("ok") as archive:
        layout = make_layout(tmp_path / "run", archive.base, rules=[rule])
        make_instance(layout.drop / "a.dcm", extra={"AccessionNumber": "ACC-1"})
        reason = "failed: the archive sent an answer larger than 16 MiB (decoded)"
        peak = bombed(layout, archive, "GET /dicom-web/studies", reason)
        assert archive.seen("POST") == 0  # nothing is sent without the archive's study
    assert peak < MAX_PEAK_MB
    assert layout.files(layout.drop) == {"a.dcm"}
    assert layout.files(layout.failed) == set()


def test_a_gzip_bomb_from_the_token_endpoint_holds_the_destination_in_bounded_memory(
    tmp_path: Path,
) -> None:
    gzip_bomb()
    with HostileArchive("ok") as archive:
        auth = {
            "type": "oauth2",
            "token_url": f"{archive.url}/token",
            "client_id": "stowd",
            "client_secret": "not-a-real-secret",
        }
        layout = make_layout(tmp_path / "run", archive.base)
        config = yaml.safe_load(layout.config.read_text())
        config["destinations"]["pacs"]["auth"] = auth
        layout.config.write_text(yaml.safe_dump(config))
        make_instance(layout.drop / "a.dcm")
        reason = "sent an answer larger than 1 MiB (decoded)"
        peak = bombed(layout, archive, "POST /token", reason)
        assert archive.seen("POST /dicom-web") == 0
    assert peak < MAX_PEAK_MB
    assert layout.files(layout.drop) == {"a.dcm"}
    assert layout.files(layout.failed) == set()


def test_an_answer_trickled_a_byte_a_second_ends_at_its_deadline(tmp_path: Path) -> None:
    """Each byte arrives within the read timeout (2 s), so only the deadline for the whole
    answer (twice the read timeout: 4 s after the request body was sent) ends the request.
    Was: a worker held for as long as the archive kept trickling."""
    with HostileArchive("trickle") as archive:
        layout = make_layout(tmp_path / "run", archive.base)
        config = yaml.safe_load(layout.config.read_text())
        config["destinations"]["pacs"]["timeouts"] = {"read": "2s"}
        layout.config.write_text(yaml.safe_dump(config))
        make_instance(layout.drop / "a.dcm")
        with Stowd(layout) as daemon:
            reason = "the archive was still sending its answer 4 s after the request"
            wait_for(lambda: reason in daemon.log, 60, repr(reason), lambda: daemon.log)
            wait_for(lambda: len(archive.trickles) >= 1, 30, "the connection closed")
            assert layout.files(layout.drop) == {"a.dcm"}  # the file waits ...
            assert layout.files(layout.failed) == set()
            archive.stow = "ok"  # ... and is sent once the archive answers in time
            wait_for(lambda: layout.files(layout.sent) == {"a.dcm"}, 60, "sent", lambda: daemon.log)
            assert daemon.terminate() == 0
    read, gone = archive.trickles[0]
    print(f"\ntrickled answer: stowd hung up {gone - read:.1f} s after its request was read")
    # 4 s deadline; the server notices the closed connection at its next write or the one after
    assert gone - read < 4 + 2 + 5


def test_an_answer_whose_header_is_trickled_ends_at_its_deadline(tmp_path: Path) -> None:
    """The same trickle in the answer's header (status line sent, then a header a byte a
    second): the deadline for the whole answer must count from the request, not from the
    end of the header.  Was: the worker waited for as long as the header kept coming (httpx
    reads the header with the read timeout for each read)."""
    with HostileArchive("slow-headers") as archive:
        layout = make_layout(tmp_path / "run", archive.base)
        config = yaml.safe_load(layout.config.read_text())
        config["destinations"]["pacs"]["timeouts"] = {"read": "2s"}
        layout.config.write_text(yaml.safe_dump(config))
        make_instance(layout.drop / "a.dcm")
        with Stowd(layout) as daemon:
            # TRICKLE_SECONDS (60) of header: a hang-up within 30 s is the deadline's doing
            wait_for(
                lambda: len(archive.trickles) >= 1, 30, "the connection closed", lambda: daemon.log
            )
            assert layout.files(layout.drop) == {"a.dcm"}  # the file waits
            assert layout.files(layout.failed) == set()
            assert daemon.terminate() == 0
    read, gone = archive.trickles[0]
    print(f"\ntrickled header: stowd hung up {gone - read:.1f} s after its request was read")
    assert gone - read < 4 + 2 + 5


# -- names that try to forge log lines ------------------------------------------------------
FORGED = "2026-01-01 00:00:00,000 INFO stowd.worker: FAKE.dcm: stored, moved to sent"
NEWLINE_NAME = f"a\n{FORGED}.dcm"
TERMINAL_NAME = "b\x1b[2J\x1b]0;owned\x07.dcm"  # clear the screen, set the window title, BEL
RAW = ("\x1b", "\x07", "\r")


def names_dropped(layout: Layout) -> None:
    make_instance(layout.drop / NEWLINE_NAME)
    make_instance(layout.drop / TERMINAL_NAME)
    write_garbage(layout.drop / f"c\n{FORGED}.dcm")  # fails: status shows it


@pytest.mark.parametrize("log_format", ["text", "journal"])
def test_names_with_control_characters_cannot_forge_log_or_status_lines(
    tmp_path: Path, orthanc: Orthanc, log_format: str
) -> None:
    """Was: the newline started a forged record in the log, the journal and status, and the
    ESC/BEL bytes reached the reader's terminal."""
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url)
    names_dropped(layout)
    with Stowd(layout, args=("--log-format", log_format)) as daemon:
        wait_for(
            lambda: len(layout.files(layout.sent)) == 2 and len(layout.files(layout.failed)) == 1,
            90,
            "two files sent and one failed",
            lambda: daemon.log,
        )
        status = run_cli("status", "-c", str(layout.config))
        assert daemon.terminate() == 0
    assert layout.files(layout.sent) == {NEWLINE_NAME, TERMINAL_NAME}
    log = daemon.log
    escaped = "a\\n" + FORGED
    assert escaped in log and "b\\x1b[2J\\x1b]0;owned\\x07.dcm" in log
    for line in log.splitlines():
        assert not line.startswith(FORGED), line
        assert not line.startswith(f"<6>{FORGED}"), line  # a record of its own in the journal
        if log_format == "journal":
            assert re.match(r"<\d>", line), line
    assert not any(c in log for c in RAW)
    assert status.returncode == 0, status.stderr
    assert "c\\n" + FORGED in status.stdout, status.stdout
    assert not any(line.startswith(FORGED) for line in status.stdout.splitlines())
    assert not any(c in status.stdout for c in RAW)


def test_explain_escapes_a_names_control_characters(tmp_path: Path) -> None:
    layout = make_layout(tmp_path / "run", DEAD_URL)
    names_dropped(layout)
    files = [str(layout.drop / NEWLINE_NAME), str(layout.drop / TERMINAL_NAME)]
    done = run_cli("explain", "-c", str(layout.config), *files)
    assert done.returncode == 0, done.stderr
    assert "a\\n" + FORGED in done.stdout and "b\\x1b[2J" in done.stdout, done.stdout
    assert not any(line.startswith(FORGED) for line in done.stdout.splitlines())
    assert not any(c in done.stdout for c in RAW)


def test_check_config_escapes_folder_names(tmp_path: Path) -> None:
    folder = f"drop\n{FORGED}\x1b[2J"
    layout = make_layout(tmp_path / "run", DEAD_URL, source={"watch": f"./{folder}"})
    (layout.root / folder).mkdir()
    done = run_cli("check-config", "-c", str(layout.config))
    assert done.returncode == 0, done.stderr
    assert "drop\\n" + FORGED + "\\x1b[2J" in done.stdout, done.stdout
    assert not any(line.startswith(FORGED) for line in done.stdout.splitlines())
    assert not any(c in done.stdout for c in RAW)


def test_check_config_connect_ends_a_trickled_header_at_its_deadline(tmp_path: Path) -> None:
    """``check-config --connect`` reads the query's answer within twice its step timeout.
    Was: the trickled header kept the check waiting for as long as it lasted (60 s)."""
    with HostileArchive("ok") as archive:
        archive.qido = "slow-headers"
        layout = make_layout(tmp_path / "run", archive.base)
        config = yaml.safe_load(layout.config.read_text())
        config["destinations"]["pacs"]["timeouts"] = {"connect": "2s"}
        layout.config.write_text(yaml.safe_dump(config))
        result = run_cli("check-config", "--connect", "-c", str(layout.config), timeout=50)
    assert result.returncode != 0, result.stdout
    assert "was still sending its answer 4 s after the request" in result.stdout, result.stdout
