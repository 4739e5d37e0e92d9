"""Receiving DICOM C-STORE (``receive:`` sources), end to end with real processes on loopback:
dcmtk's storescu/echoscu and pynetdicom as senders, the stowd daemon, a real Orthanc.

The promise under test: Success goes back only once an instance is fsynced and queued; what
was answered Success reaches the archive, whatever happens to stowd afterwards (kill -9)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from dicomgen import make_instance, make_study
from harness import Layout, Stowd, wait_for
from mounts import tmpfs
from orthanc import Orthanc, free_port
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import SecondaryCaptureImageStorage  # type: ignore[attr-defined]

pytestmark = pytest.mark.usefixtures("require_dcmtk")

TIMEOUT = 120.0


@pytest.fixture
def require_dcmtk() -> None:
    """dcmtk is installed by .ci/run; outside CI a machine without it skips these tests."""
    from needs import require  # noqa: PLC0415 - tests/support is on the path for tests

    missing = [tool for tool in ("storescu", "echoscu") if not _which(tool)]
    require(f"dcmtk is not installed ({', '.join(missing)} missing)" if missing else None)


def _which(tool: str) -> bool:
    return any(Path(folder, tool).exists() for folder in os.environ["PATH"].split(os.pathsep))


@dataclass
class Site:
    """A stowd with receiving sources, its folders and its Orthanc."""

    root: Path
    orthanc: Orthanc
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def config(self) -> Path:
        return self.root / "stowd.yaml"

    @property
    def sent(self) -> Path:
        return self.root / "sent"

    @property
    def failed(self) -> Path:
        return self.root / "failed"

    @property
    def queue(self) -> Path:
        return self.root / "state" / "queue.db"

    def write(self, receivers: dict[str, dict[str, Any]], **top: Any) -> None:
        sources = []
        for name, receive in receivers.items():
            self.ports.setdefault(name, free_port())
            sources.append(
                {
                    "name": name,
                    "receive": {
                        "ae_title": "STOWD",
                        "port": self.ports[name],
                        "bind": "127.0.0.1",
                        **receive,
                    },
                    "sent": f"./sent/{name}",
                    "failed": f"./failed/{name}",
                    "destination": "pacs",
                    "quiet_period": "500ms",
                    "rescan_interval": "3s",
                }
            )
        doc = {
            "queue": "./state/queue.db",
            "log_level": "DEBUG",
            "shutdown_timeout": "10s",
            "retry": {"initial": "500ms", "maximum": "2s", "hold_probe": "1s"},
            "sources": sources,
            "destinations": {"pacs": {"url": self.orthanc.dicomweb_url, "workers": 2}},
            **top,
        }
        self.root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(yaml.safe_dump(doc, sort_keys=False))

    def files(self, folder: Path) -> list[Path]:
        return sorted(p for p in folder.rglob("*.dcm") if p.is_file()) if folder.exists() else []


@pytest.fixture
def site(tmp_path: Path, orthanc: Orthanc) -> Site:
    found = Site(tmp_path / "site", orthanc)
    found.write({"ct": {}})
    return found


@pytest.fixture
def daemon(site: Site) -> Iterator[Stowd]:
    proc = _start(site)
    try:
        yield proc
    finally:
        proc.stop()


def _start(site: Site) -> Stowd:
    proc = Stowd(Layout(site.root, site.config)).start()
    for name, port in site.ports.items():
        wait_for(partial(_listening, port), 60, f"{name} to listen on {port}", lambda: proc.log)
    return proc


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def storescu(
    port: int, files: list[Path], *, calling: str = "CT1"
) -> subprocess.CompletedProcess[str]:
    """dcmtk's storescu, as a modality would send: one association, every file."""
    return subprocess.run(
        ["storescu", "-aet", calling, "-aec", "STOWD", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def data_set_bytes(data: bytes) -> bytes:
    """A Part-10 file's data set, without its preamble and file meta."""
    from io import BytesIO  # noqa: PLC0415

    fp = BytesIO(data)
    pydicom.filereader.read_preamble(fp, False)
    pydicom.filereader._read_file_meta_info(fp)
    return data[fp.tell() :]


def orthanc_file(orthanc: Orthanc, sop_uid: str) -> bytes:
    found = orthanc.post_json(
        "/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}}
    )
    assert len(found) == 1, f"{sop_uid}: {found}"
    return orthanc.get_bytes(f"/instances/{found[0]}/file")


def scu_association(port: int, calling: str = "CT1") -> Association:
    ae = AE(ae_title=calling)
    ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", port, ae_title="STOWD")
    assert assoc.is_established, "the association was not accepted"
    _RAW[id(assoc)] = assoc.dul.socket.socket  # type: ignore[union-attr]
    return assoc


_RAW: dict[int, socket.socket | None] = {}  # pynetdicom drops it unclosed when the peer dies


def _close(assoc: Association) -> None:
    """Release, or abort an association whose peer is gone, and close its socket."""
    if assoc.is_established:
        assoc.release()
    else:
        assoc.abort()
    raw = _RAW.pop(id(assoc), None)
    if raw is not None:
        raw.close()


def _no_answer_after_abort(assoc: Association) -> None:
    """Once ``assoc`` has seen its peer's connection close (a stowd killed), hand a C-STORE
    still waiting for its answer "no answer", as pynetdicom does only when its
    ``dimse_timeout`` (60 s) runs out: it keeps waiting on its message queue after the
    association aborted.  Answers that arrived before the close are ahead in that queue."""
    wait_for(lambda: assoc.is_aborted, 60, "the association to see the connection close")
    assoc.dimse.msg_queue.put((None, None))


def status_of(assoc: Association, path: Path) -> int | None:
    """Send one file; its C-STORE status, or None when no answer came."""
    answer = assoc.send_c_store(path)
    return int(answer.Status) if "Status" in answer else None


# --------------------------------------------------------------------------- senders


def test_a_study_from_dcmtk_storescu_reaches_the_archive_byte_identical(
    site: Site, daemon: Stowd, tmp_path: Path
) -> None:
    sent = make_study(tmp_path / "modality", 200, size_bytes=8192)
    done = storescu(site.ports["ct"], [path for path, _ in sent])
    assert done.returncode == 0, done.stderr
    wait_for(
        lambda: len(site.files(site.sent)) == 200, TIMEOUT, "200 files in sent/", lambda: daemon.log
    )
    assert site.orthanc.instance_count() == 200
    for path, sop_uid in sent:
        stored = orthanc_file(site.orthanc, sop_uid)
        assert data_set_bytes(stored) == data_set_bytes(path.read_bytes()), sop_uid
    assert site.files(site.failed) == []
    assert daemon.alive()


def test_pynetdicom_storescu_and_echo_from_both_toolkits(
    site: Site, daemon: Stowd, tmp_path: Path
) -> None:
    port = str(site.ports["ct"])
    dcmtk = subprocess.run(
        ["echoscu", "-aec", "STOWD", "127.0.0.1", port],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert dcmtk.returncode == 0, dcmtk.stderr
    echo = [sys.executable, "-m", "pynetdicom", "echoscu", "-aec", "STOWD", "127.0.0.1", port]
    assert subprocess.run(echo, capture_output=True, timeout=60, check=False).returncode == 0
    sent = make_study(tmp_path / "modality", 5)
    store = [
        sys.executable,
        "-m",
        "pynetdicom",
        "storescu",
        "-aet",
        "PYSCU",
        "-aec",
        "STOWD",
        "127.0.0.1",
        port,
    ]
    done = subprocess.run(
        [*store, *(str(p) for p, _ in sent)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    wait_for(
        lambda: site.orthanc.sop_instance_uids() >= {uid for _, uid in sent},
        TIMEOUT,
        "5 instances in Orthanc",
        lambda: daemon.log,
    )


def test_a_500_mb_multiframe_arrives_whole_and_memory_stays_bounded(
    site: Site, daemon: Stowd, tmp_path: Path
) -> None:
    big = tmp_path / "big.dcm"
    sop_uid = make_instance(big, size_bytes=500 * 1024 * 1024, extra={"NumberOfFrames": "50"})
    done = storescu(site.ports["ct"], [big])
    assert done.returncode == 0, done.stderr
    wait_for(
        lambda: len(site.files(site.sent)) == 1, 600, "the big file in sent/", lambda: daemon.log
    )
    stored = orthanc_file(site.orthanc, sop_uid)
    assert data_set_bytes(stored) == data_set_bytes(big.read_bytes())
    assert daemon.proc is not None
    peak = _peak_rss(daemon.proc.pid)
    assert peak < 300 * 1024 * 1024, f"stowd held {peak >> 20} MiB for a 500 MiB instance"


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


# --------------------------------------------------------------------------- refusals


def test_a_calling_ae_outside_allow_is_rejected_and_logged(site: Site, tmp_path: Path) -> None:
    site.write({"ct": {"allow": [{"ae_title": "CT1"}, {"ae_title": "MR2", "host": "10.9.9.9"}]}})
    proc = _start(site)
    try:
        files = [p for p, _ in make_study(tmp_path / "modality", 2)]
        for calling in ("EVIL", "MR2"):  # MR2 only from 10.9.9.9, this is 127.0.0.1
            refused = storescu(site.ports["ct"], files, calling=calling)
            assert refused.returncode != 0
            assert "Association Rejected" in refused.stderr + refused.stdout
        assert storescu(site.ports["ct"], files).returncode == 0
        wait_for(
            lambda: len(site.files(site.sent)) == 2, TIMEOUT, "CT1's files sent", lambda: proc.log
        )
        assert (
            "association from EVIL at 127.0.0.1 rejected: that calling AE title is not allowed"
            in proc.log
        )
        assert (
            "association from MR2 at 127.0.0.1 rejected: that calling AE title is not allowed "
            "from that host" in proc.log
        )
        assert proc.alive()
    finally:
        proc.stop()


def test_a_malformed_data_set_is_refused_and_nothing_is_queued(
    site: Site, daemon: Stowd, tmp_path: Path
) -> None:
    good = tmp_path / "good.dcm"
    make_instance(good)
    data = good.read_bytes()
    body = data_set_bytes(data)
    broken = tmp_path / "broken.dcm"
    # the file meta stays; the data set ends inside an element's value (a length that lies)
    broken.write_bytes(data[: len(data) - len(body)] + body[:200])
    assoc = scu_association(site.ports["ct"])
    try:
        assert status_of(assoc, broken) == 0xC000
        assert status_of(assoc, good) == 0x0000
    finally:
        assoc.release()
    wait_for(
        lambda: len(site.files(site.sent)) == 1, TIMEOUT, "the good file sent", lambda: daemon.log
    )
    assert daemon.log.count("stowd.queue: queued ") == 1  # the good one only
    assert "an instance was refused (status 0xC000)" in daemon.log
    assert site.files(site.root / "state" / "received") == []
    assert daemon.alive()


def test_a_port_that_cannot_be_bound_is_logged_and_the_rest_runs(
    site: Site, tmp_path: Path
) -> None:
    site.write({"ct": {}, "mr": {}})
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", site.ports["mr"]))
        squatter.listen()
        proc = Stowd(Layout(site.root, site.config)).start()
        try:
            wait_for(lambda: _listening(site.ports["ct"]), 60, "ct to listen", lambda: proc.log)
            wait_for(
                lambda: f"cannot listen on 127.0.0.1:{site.ports['mr']}" in proc.log,
                60,
                "the bind error",
                lambda: proc.log,
            )
            files = [p for p, _ in make_study(tmp_path / "modality", 2)]
            assert storescu(site.ports["ct"], files).returncode == 0
            wait_for(
                lambda: len(site.files(site.sent)) == 2,
                TIMEOUT,
                "ct's files sent",
                lambda: proc.log,
            )
            assert proc.alive()
        finally:
            proc.stop()


def test_disk_full_during_receipt_answers_out_of_resources_and_keeps_nothing(
    site: Site, tmp_path: Path
) -> None:
    with tmpfs(site.root / "state", "6m"):
        proc = _start(site)
        try:
            big = tmp_path / "big.dcm"
            make_instance(big, size_bytes=3 * 1024 * 1024)  # pynetdicom's copy fits, stowd's not
            small = tmp_path / "small.dcm"
            small_uid = make_instance(small)
            assoc = scu_association(site.ports["ct"])
            try:
                assert status_of(assoc, big) == 0xA700
                assert status_of(assoc, small) == 0x0000
            finally:
                assoc.release()
            wait_for(
                lambda: small_uid in site.orthanc.sop_instance_uids(),
                TIMEOUT,
                "the small file stored",
                lambda: proc.log,
            )
            assert site.orthanc.instance_count() == 1
            assert "an instance was refused (status 0xA700)" in proc.log
            assert [p.name for p in site.files(site.root / "state" / "received")] == []
            assert proc.alive()
        finally:
            proc.stop()


# --------------------------------------------------------------------------- crashes


def test_kill_9_while_receiving_loses_nothing_that_was_answered_success(
    site: Site, tmp_path: Path
) -> None:
    files = [p for p, _ in make_study(tmp_path / "modality", 1000, size_bytes=4096)]
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in files}
    proc = _start(site)
    succeeded: list[str] = []
    associations: list[Association] = []

    def send() -> None:
        assoc = scu_association(site.ports["ct"])
        associations.append(assoc)
        try:
            for uid, path in uids.items():
                if status_of(assoc, path) == 0x0000:
                    succeeded.append(uid)
                if not assoc.is_established:
                    return
        except Exception:
            return
        finally:
            _close(assoc)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        wait_for(
            lambda: len(succeeded) >= 200,
            TIMEOUT,
            "200 instances answered Success",
            lambda: proc.log,
        )
        proc.kill()
        _no_answer_after_abort(associations[0])
        sender.join(120)
        assert not sender.is_alive()
        assert 200 <= len(succeeded) < 1000
        acknowledged = set(succeeded)
        proc = _start(site)
        wait_for(
            lambda: site.orthanc.sop_instance_uids() >= acknowledged,
            TIMEOUT,
            "every acknowledged instance in Orthanc",
            lambda: proc.log,
        )
        rest = [path for uid, path in uids.items() if uid not in acknowledged]
        again = storescu(site.ports["ct"], rest)  # the modality sends the rest again
        refused = [line for line in proc.log.splitlines() if "refused" in line]
        assert again.returncode == 0, refused
        wait_for(
            lambda: site.orthanc.instance_count() == 1000,
            TIMEOUT,
            "all 1000 in Orthanc, once each",
            lambda: proc.log,
        )
        assert site.files(site.failed) == []
    finally:
        proc.stop()


# --------------------------------------------------------------------------- reloads and rules


def test_sighup_adds_and_removes_receivers_without_dropping_others(
    site: Site, tmp_path: Path
) -> None:
    site.write({"ct": {}, "old": {}})
    proc = _start(site)
    try:
        first, second = (tmp_path / "a.dcm", tmp_path / "b.dcm")
        make_instance(first)
        make_instance(second)
        assoc = scu_association(site.ports["ct"])
        try:
            assert status_of(assoc, first) == 0x0000
            site.write({"ct": {}, "new": {}})
            assert proc.proc is not None
            proc.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: _listening(site.ports["new"]), 60, "new to listen", lambda: proc.log)
            wait_for(
                lambda: not _listening(site.ports["old"]),
                60,
                "old to stop listening",
                lambda: proc.log,
            )
            assert assoc.is_established
            assert status_of(assoc, second) == 0x0000
        finally:
            assoc.release()
        wait_for(
            lambda: len(site.files(site.sent)) == 2, TIMEOUT, "both files sent", lambda: proc.log
        )
        assert proc.alive()
    finally:
        proc.stop()


def test_rules_see_the_calling_ae_and_the_sender_address(site: Site, tmp_path: Path) -> None:
    rules = [
        {"match": {"calling_ae": ["CT1"]}, "set": {"StationName": "{calling_ae}"}},
        {"set": {"InstitutionName": "from {source_address} to {called_ae}"}},
    ]
    site.write({"ct": {}}, rules=rules)
    proc = _start(site)
    try:
        path = tmp_path / "one.dcm"
        sop_uid = make_instance(path)
        assert storescu(site.ports["ct"], [path]).returncode == 0
        wait_for(
            lambda: sop_uid in site.orthanc.sop_instance_uids(),
            TIMEOUT,
            "the file stored",
            lambda: proc.log,
        )
        ds = pydicom.dcmread(__import__("io").BytesIO(orthanc_file(site.orthanc, sop_uid)))
        assert ds.StationName == "CT1"
        assert ds.InstitutionName == "from 127.0.0.1 to STOWD"
    finally:
        proc.stop()


def test_a_sop_instance_uid_sent_twice_in_one_association_is_kept_twice(
    site: Site, daemon: Stowd, tmp_path: Path
) -> None:
    path = tmp_path / "one.dcm"
    make_instance(path)
    assoc = scu_association(site.ports["ct"])
    try:
        assert status_of(assoc, path) == 0x0000
        assert status_of(assoc, path) == 0x0000
    finally:
        assoc.release()
    wait_for(
        lambda: len(site.files(site.sent)) == 2, TIMEOUT, "both copies in sent/", lambda: daemon.log
    )
    names = sorted(p.name for p in site.files(site.sent))
    assert names[1] == names[0].replace(".dcm", "~1.dcm")
    assert site.orthanc.instance_count() == 1


def test_status_metrics_and_logs_tell_what_each_receiver_took_in(
    site: Site, tmp_path: Path
) -> None:
    metrics_port = free_port()
    site.write({"ct": {}}, metrics={"listen": f"127.0.0.1:{metrics_port}"})
    proc = _start(site)
    try:
        files = [p for p, _ in make_study(tmp_path / "modality", 3, size_bytes=8192)]
        assert storescu(site.ports["ct"], files).returncode == 0
        assert storescu(site.ports["ct"], files[:1], calling="EVIL!").returncode == 0
        wait_for(
            lambda: "association from EVIL! at 127.0.0.1 released: 1 instance(s)" in proc.log,
            60,
            "the second association's log line",
            lambda: proc.log,
        )
        assert "association from CT1 at 127.0.0.1 released: 3 instance(s) received" in proc.log

        def shown() -> str:
            done = subprocess.run(
                [sys.executable, "-m", "stowd", "status", "-c", str(site.config)],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            return done.stdout

        wait_for(
            lambda: "since start 4 instance(s)" in shown(), 60, "status to show 4", lambda: proc.log
        )
        text = shown()
        assert f"source ct (C-STORE to STOWD at 127.0.0.1:{site.ports['ct']} -> pacs)" in text
        assert "0 association(s) open; since start 4 instance(s)" in text
        assert "0 refused" in text and "last from EVIL!" in text
        import httpx  # noqa: PLC0415

        page = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).text
        assert 'stowd_received_instances_total{source="ct"} 4.0' in page
        assert 'stowd_associations_open{source="ct"} 0.0' in page
    finally:
        proc.stop()


def test_no_instance_is_answered_success_once_a_stop_began(site: Site, tmp_path: Path) -> None:
    with socket.socket() as silent:  # an archive that takes the request and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/dicom-web"
        site.write({"ct": {}}, destinations={"pacs": {"url": url, "workers": 1}})
        proc = _start(site)
        try:
            first, second = tmp_path / "a.dcm", tmp_path / "b.dcm"
            make_instance(first)
            make_instance(second)
            assoc = scu_association(site.ports["ct"])
            try:
                assert status_of(assoc, first) == 0x0000
                wait_for(
                    partial(_uploading, site),
                    60,
                    "the upload to start",
                    lambda: proc.log,
                )
                assert proc.proc is not None
                proc.proc.send_signal(signal.SIGTERM)  # the upload keeps the stop waiting
                wait_for(
                    lambda: "stopping: waiting up to" in proc.log, 60, "the stop", lambda: proc.log
                )
                answer = status_of(assoc, second) if assoc.is_established else None
                assert answer != 0x0000, "an instance was acknowledged after the stop began"
            finally:
                _close(assoc)
            assert proc.proc.wait(60) == 0
            assert proc.log.count("stowd.queue: queued") == 1
        finally:
            proc.stop()


def _uploading(site: Site) -> bool:
    """The daemon shares its requests in flight with ``stowd status`` (``<queue>.state``)."""
    state = Path(f"{site.queue}.state")
    return state.exists() and '"pacs"' in state.read_text()


def test_instances_left_by_aborted_associations_are_swept_and_live_ones_stay(
    tmp_path: Path,
) -> None:
    from stowd.pipeline.incoming import clear_incoming, incoming_folder  # noqa: PLC0415

    queue = tmp_path / "state" / "queue.db"
    folder = incoming_folder(queue)
    folder.mkdir(parents=True)
    dead, live = folder / ".in-dead.dcm", folder / ".in-live.dcm"
    dead.write_bytes(b"x" * 100)
    live.write_bytes(b"y" * 100)
    os.utime(dead, (1_000_000, 1_000_000))
    assert clear_incoming(queue, older_than=2_000_000) == 1
    assert sorted(p.name for p in folder.iterdir()) == [".in-live.dcm"]
    assert clear_incoming(queue) == 1  # at start: everything
    assert list(folder.iterdir()) == []
