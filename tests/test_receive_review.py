"""Review of the C-STORE receiver (issue 16): a hostile or broken modality and a careless
administrator, with real processes (stowd, dcmtk, pynetdicom as the sender, Orthanc, strace).

Each test shows one defect found in review; each fails on the ``receive`` branch as reviewed."""

from __future__ import annotations

import re
import socket
import struct
import subprocess
from pathlib import Path

import pydicom
import pytest
import yaml
from dicomgen import make_instance
from harness import Stowd, make_watch_folders, run_cli, wait_for
from mounts import tmpfs
from orthanc import free_port
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    SecondaryCaptureImageStorage,
)
from test_receive import Site, _start, require_dcmtk, storescu

pytestmark = pytest.mark.usefixtures("require_dcmtk")
__all__ = ["require_dcmtk"]  # the fixture, used through pytestmark

NOWHERE = "http://127.0.0.1:9/dicom-web"  # nothing listens on port 9: files stay queued


def _config_of(root: Path, sources: list[dict[str, object]]) -> Path:
    config = root / "stowd.yaml"
    root.mkdir(parents=True, exist_ok=True)
    doc = {
        "queue": str(root / "state" / "queue.db"),
        "sources": sources,
        "destinations": {"pacs": {"url": NOWHERE}},
    }
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    make_watch_folders(config)  # so a refusal is about what each test means, not a folder
    return config


def _receiving(name: str, root: Path, port: int) -> dict[str, object]:
    return {
        "name": name,
        "receive": {"ae_title": "STOWD", "port": port, "bind": "127.0.0.1"},
        "sent": str(root / "sent" / f"of-{name}"),
        "failed": str(root / "failed" / f"of-{name}"),
        "destination": "pacs",
        "quiet_period": "500ms",
    }


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("name", ["..", ".", ".incoming"])
def test_a_receiving_source_whose_name_is_not_a_plain_folder_name_is_refused(
    tmp_path: Path, name: str
) -> None:
    """A receiving source's folder is ``received/<name>``: ``..`` is the queue's own folder
    (study folders written beside the database, the spool watched), ``.`` is ``received/``
    itself (``.incoming`` with its half-written instances inside the watch folder), and
    ``.incoming`` is the folder that is cleared at every start and sweep."""
    config = _config_of(tmp_path, [_receiving(name, tmp_path, free_port())])
    done = run_cli("check-config", "-c", str(config))
    assert done.returncode != 0, f"source {name!r} accepted:\n{done.stdout}"


def test_a_sent_folder_that_holds_the_received_folders_is_refused(tmp_path: Path) -> None:
    """Another source's ``sent`` (or ``failed``) folder holding ``received/`` would have its
    retention delete instances that were acknowledged and are still waiting to be sent."""
    drop: dict[str, object] = {
        "name": "drop",
        "watch": str(tmp_path / "drop"),
        "sent": str(tmp_path / "state"),
        "failed": str(tmp_path / "failed" / "drop"),
        "destination": "pacs",
    }
    config = _config_of(tmp_path, [_receiving("ct", tmp_path, free_port()), drop])
    done = run_cli("check-config", "-c", str(config))
    assert done.returncode != 0, f"accepted:\n{done.stdout}"


def _lying_store(port: int, path: Path) -> int | None:
    """Send ``path`` as pynetdicom does from a file: the C-STORE request's UIDs are taken
    from its file meta, the data set bytes are sent as they are (a modality that lies)."""
    was = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title="CT1")
        ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        assoc = ae.associate("127.0.0.1", port, ae_title="STOWD")
        assert assoc.is_established
        try:
            answer = assoc.send_c_store(path)
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = was
    return int(answer.Status) if "Status" in answer else None


@pytest.mark.parametrize(
    ("keyword", "lie"),
    [("MediaStorageSOPInstanceUID", "1.2.3.4.5"), ("MediaStorageSOPClassUID", CTImageStorage)],
)
def test_a_data_set_that_is_not_what_the_request_says_is_refused(
    tmp_path: Path, keyword: str, lie: str
) -> None:
    """PS3.7 9.3.1.1: the Affected SOP Instance UID and SOP Class UID of a C-STORE request
    are the data set's.  Today stowd answers Success and writes a Part-10 file whose file
    meta names another instance (or class) than its data set; dcmtk's storescp answers
    0xA900 (Data Set does not match SOP Class) to both."""
    port = free_port()
    _config_of(tmp_path, [_receiving("ct", tmp_path, port)])
    site = Site(tmp_path, orthanc=None, ports={"ct": port})  # type: ignore[arg-type]
    path = tmp_path / "liar.dcm"
    make_instance(path)
    ds = pydicom.dcmread(path)
    setattr(ds.file_meta, keyword, pydicom.uid.UID(lie))
    ds.save_as(path, enforce_file_format=False)
    proc = _start(site)
    try:
        status = _lying_store(port, path)
        received = site.files(tmp_path / "state" / "received" / "ct")
        metas = [str(pydicom.dcmread(p).file_meta.get(keyword)) for p in received]
        assert status not in (None, 0x0000), f"answered 0x{status:04X}; file meta: {metas}"
        assert received == []
    finally:
        proc.stop()


# --------------------------------------------------------------------------- the network


def _echo(port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["echoscu", "-aec", "STOWD", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_tcp_connections_that_never_ask_for_an_association_do_not_lock_out_a_modality(
    tmp_path: Path,
) -> None:
    """A port scan, a load balancer's TCP health check or a hung peer opens a connection and
    sends nothing.  pynetdicom counts each against ``max_associations`` until
    ``acse_timeout`` (set to ``idle_timeout``, 60 s by default) ends it: two such
    connections lock every modality out of a receiver of two for a minute, again and again."""
    port = free_port()
    source = _receiving("ct", tmp_path, port)
    source["receive"] = {**source["receive"], "max_associations": 2}  # type: ignore[dict-item]
    _config_of(tmp_path, [source])
    site = Site(tmp_path, orthanc=None, ports={"ct": port})  # type: ignore[arg-type]
    proc = _start(site)
    before = _threads(proc)
    silent = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    try:
        wait_for(lambda: _threads(proc) >= before + 2, 30, "a thread for each connection")
        echo = _echo(port)
        assert echo.returncode == 0, echo.stdout + echo.stderr
    finally:
        for sock in silent:
            sock.close()
        proc.stop()


def _threads(proc: Stowd) -> int:
    """The threads of stowd (pynetdicom runs one for each connection)."""
    assert proc.proc is not None
    status = Path(f"/proc/{proc.proc.pid}/status").read_text()
    return int(re.search(r"Threads:\s+(\d+)", status).group(1))  # type: ignore[union-attr]


def test_a_peer_that_resets_mid_pdu_is_said_in_one_line_without_a_traceback(
    tmp_path: Path,
) -> None:
    """A modality that drops its connection half way through a PDU: stowd logs that the
    association was aborted (its own line).  pynetdicom also logs ERROR lines with a
    Python traceback for it: for an administrator that reads as a crash of stowd, and a
    peer that connects and resets in a loop writes a dozen lines per connection."""
    port = free_port()
    _config_of(tmp_path, [_receiving("ct", tmp_path, port)])
    site = Site(tmp_path, orthanc=None, ports={"ct": port})  # type: ignore[arg-type]
    proc = _start(site)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"\x01\x00\x00\x00\x10\x00")  # an A-ASSOCIATE-RQ of 4096 bytes...
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # ... of which 6 came before a reset (SO_LINGER 0 sends RST on close)
        wait_for(lambda: "Connection reset" in proc.log or "closed" in proc.log, 30, "the reset")
        assert _echo(port).returncode == 0  # and stowd still answers
        assert "Traceback" not in proc.log, proc.log
    finally:
        proc.stop()


def test_an_allowed_host_is_let_in_when_the_receiver_binds_every_address(
    tmp_path: Path,
) -> None:
    """``bind: "::"`` (documented as every address) takes IPv4 connections too, and the
    peer's address is then the IPv4-mapped ``::ffff:127.0.0.1``: compared as text with the
    ``host`` of ``allow`` (``127.0.0.1``), it never matches; every allowed modality is
    rejected as "not allowed from that host" (and rules see ``::ffff:...``)."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    port = free_port()
    source = _receiving("ct", tmp_path, port)
    allow = [{"ae_title": "ECHOSCU", "host": "127.0.0.1"}]
    source["receive"] = {**source["receive"], "bind": "::", "allow": allow}  # type: ignore[dict-item]
    _config_of(tmp_path, [source])
    site = Site(tmp_path, orthanc=None, ports={"ct": port})  # type: ignore[arg-type]
    proc = _start(site)
    try:
        echo = _echo(port)
        assert echo.returncode == 0, echo.stderr + proc.log
    finally:
        proc.stop()


def test_a_pdu_longer_than_stowd_takes_is_refused_before_it_fills_memory(tmp_path: Path) -> None:
    """pynetdicom reads a whole PDU into memory, for any length its header gives (up to
    4 GiB), even an A-ASSOCIATE-RQ from a host and AE title that ``allow`` would reject:
    one connection makes stowd hold what it sends (each of ``max_associations`` and more,
    since connections are taken before they associate), until the kernel kills stowd."""
    port = free_port()
    source = _receiving("ct", tmp_path, port)
    source["receive"] = {**source["receive"], "allow": [{"ae_title": "CT1"}]}  # type: ignore[dict-item]
    _config_of(tmp_path, [source])
    site = Site(tmp_path, orthanc=None, ports={"ct": port})  # type: ignore[arg-type]
    proc = _start(site)
    try:
        before = _rss(proc)
        chunk = b"\x00" * (1 << 20)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"\x01\x00" + (0xFFFFFFF0).to_bytes(4, "big"))  # an A-ASSOCIATE-RQ
            try:
                for _ in range(FLOOD_MIB):
                    sock.sendall(chunk)
            except OSError:
                pass  # stowd closed the connection: what it should do
            grown = _rss(proc) - before
        assert grown < 64 << 20, f"stowd grew by {grown >> 20} MiB for one unanswered PDU"
        assert proc.alive()
        # Once: the rest of the PDU was read as headers of 6 bytes, each one warned of
        assert proc.log.count("the association is aborted") == 1
    finally:
        proc.stop()


FLOOD_MIB = 256  # what the peer sends of its PDU


def _rss(proc: Stowd) -> int:
    assert proc.proc is not None
    status = Path(f"/proc/{proc.proc.pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) * 1024  # type: ignore[union-attr]


# --------------------------------------------------------------------------- the disks


def test_a_receive_folder_on_its_own_filesystem_takes_instances_in(tmp_path: Path) -> None:
    """An administrator gives the received images a disk of their own (``received/ct`` a
    mount point).  Each instance is hard-linked from ``received/.incoming`` into it, which
    fails across filesystems (EXDEV): every C-STORE is refused 0xA700, for ever, with
    "Invalid cross-device link" as the only reason, and check-config said nothing."""
    port = free_port()
    _config_of(tmp_path, [_receiving("ct", tmp_path, port)])
    site = Site(tmp_path, orthanc=None, ports={"ct": port})  # type: ignore[arg-type]
    with tmpfs(tmp_path / "state" / "received" / "ct", size="16m") as own:
        proc = _start(site)
        try:
            path = tmp_path / "one.dcm"
            make_instance(path)
            done = storescu(port, [path])
            refused = [line for line in proc.log.splitlines() if "refused" in line]
            assert done.returncode == 0, refused
            assert len(site.files(own)) == 1
        finally:
            proc.stop()


def test_an_instance_too_big_for_the_disk_is_refused_and_its_space_given_back(
    tmp_path: Path,
) -> None:
    """A sender whose instance does not fit (or never ends) fills the disk of the queue with
    pynetdicom's temporary file in ``received/.incoming``.  When the write fails the
    association ends, but the partial file stays until the next sweep (2 x idle_timeout +
    5 min): meanwhile every other instance, of every sender, is refused for a full disk
    and the queue cannot be written either."""
    port = free_port()
    _config_of(tmp_path, [_receiving("ct", tmp_path, port)])
    site = Site(tmp_path, orthanc=None, ports={"ct": port})  # type: ignore[arg-type]
    big, small = tmp_path / "big.dcm", tmp_path / "small.dcm"
    make_instance(big, size_bytes=48 << 20)
    make_instance(small)
    with tmpfs(tmp_path / "state", size="32m"):
        proc = _start(site)
        try:
            assert storescu(port, [big]).returncode != 0  # it cannot fit: not Success
            incoming = tmp_path / "state" / "received" / ".incoming"
            wait_for(lambda: _bytes_in(incoming) < 1 << 20, 60, "the partial instance removed")
            done = storescu(port, [small])
            assert done.returncode == 0, proc.log
            assert proc.alive()
        finally:
            proc.stop()


def _bytes_in(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
