"""stowd as a systemd service: notifications on a real datagram socket, SIGHUP reloads, the
watchdog, and the log formats journald and log shippers read."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
import yaml
from dicomgen import make_instance
from harness import Layout, Stowd, make_layout, serving_metrics, wait_for
from orthanc import Orthanc

from stowd.config.load import load_config
from stowd.pipeline import classify as classify_mod
from stowd.pipeline.classify import Classified
from stowd.pipeline.queue import Classification, NewFile
from stowd.service.daemon import RESTART_LIMIT, Daemon, Generation, _spawn
from stowd.service.notify import Notifier
from stowd.service.status import gather


class NotifySocket:
    """An AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append(fields)

    def states(self) -> list[str]:
        """The state keys in arrival order (STATUS alone is left out)."""
        order = ("READY", "RELOADING", "STOPPING", "WATCHDOG")
        return [k for m in list(self.messages) for k in order if k in m]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    server = NotifySocket(tmp_path / "notify.sock")
    try:
        yield server
    finally:
        server.close()


def env_for(notify: NotifySocket, watchdog_s: float = 1.5) -> dict[str, str]:
    return {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(int(watchdog_s * 1e6))}


def rewrite_config(layout: Layout, change: dict[str, object]) -> None:
    doc = yaml.safe_load(layout.config.read_text())
    doc.update(change)
    layout.config.write_text(yaml.safe_dump(doc, sort_keys=False))


def test_readiness_watchdog_reload_and_stopping_arrive_in_order(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    layout = make_layout(tmp_path / "run", "http://127.0.0.1:9/dicom-web")
    with Stowd(layout, env=env_for(notify_socket)) as daemon:
        wait_for(lambda: "READY" in notify_socket.states(), 30, "READY=1", lambda: daemon.log)
        assert "stowd started" in daemon.log and "watching" in daemon.log  # queue open, watching
        wait_for(lambda: notify_socket.states().count("WATCHDOG") >= 2, 60, "watchdog pings")
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: notify_socket.states().count("READY") >= 2, 30, "READY=1 after reload")
        assert daemon.terminate() == 0
    # sent before the daemon exited, read by the socket's own thread a moment later
    wait_for(lambda: "STOPPING" in notify_socket.states(), 30, "STOPPING=1")
    keys = notify_socket.states()
    assert keys[0] == "READY"
    reload_at = keys.index("RELOADING")
    assert "READY" in keys[reload_at:] and keys[-1] == "STOPPING"
    assert all(k == "WATCHDOG" for k in keys[1:reload_at])
    reloading = next(m for m in notify_socket.messages if "RELOADING" in m)
    assert reloading["MONOTONIC_USEC"].isdigit()
    statuses = [m["STATUS"] for m in notify_socket.messages if "STATUS" in m]
    assert any("sent" in s for s in statuses) and all(len(s) <= 200 for s in statuses)


def test_sighup_with_a_new_source_starts_watching_it(tmp_path: Path, orthanc: Orthanc) -> None:
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url)
    with Stowd(layout) as daemon:
        first = make_instance(layout.drop / "a.dcm")
        wait_for(lambda: layout.files(layout.sent) == {"a.dcm"}, 60, "a.dcm", lambda: daemon.log)
        doc = yaml.safe_load(layout.config.read_text())
        second = dict(doc["sources"][0], name="ward", watch="./ward", sent="./ward-sent")
        second["failed"] = "./ward-failed"
        (layout.root / "ward").mkdir()  # made first: stowd does not make watch folders
        rewrite_config(layout, {"sources": [*doc["sources"], second]})
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reloaded" in daemon.log, 30, "the reload", lambda: daemon.log)
        uid = make_instance(layout.root / "ward" / "b.dcm")
        wait_for((layout.root / "ward-sent" / "b.dcm").exists, 60, "b.dcm", lambda: daemon.log)
        assert daemon.alive()
        assert daemon.terminate() == 0
    assert {first, uid} <= orthanc.sop_instance_uids()
    assert orthanc.instance_count() == 2  # nothing sent twice across the reload


def test_sighup_with_a_broken_config_keeps_the_old_one_running(
    tmp_path: Path, orthanc: Orthanc, notify_socket: NotifySocket
) -> None:
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url)
    with Stowd(layout, env=env_for(notify_socket, 60)) as daemon:
        wait_for(lambda: "READY" in notify_socket.states(), 30, "READY=1", lambda: daemon.log)
        good = layout.config.read_text()
        broken = good.replace("quiet_period: 500ms", "quiet_period: soon").replace(
            "workers: 2", "workers: 0"
        )
        assert broken != good
        layout.config.write_text(broken)
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "still running with the old config" in daemon.log, 30, "the refusal")
        assert "quiet_period" in daemon.log and "workers" in daemon.log  # every problem
        wait_for(  # ready again after RELOADING: said after the refusal's log line
            lambda: notify_socket.states().count("READY") == 2, 30, "READY=1 again"
        )
        uid = make_instance(layout.drop / "after.dcm")
        wait_for(lambda: layout.files(layout.sent) == {"after.dcm"}, 60, "after.dcm")
        assert daemon.terminate() == 0
    assert uid in orthanc.sop_instance_uids()


def test_the_watchdog_is_not_fed_while_a_thread_makes_no_progress(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    layout = make_layout(tmp_path / "run", "http://127.0.0.1:9/dicom-web")
    config = load_config(layout.config)
    notifier = Notifier(env_for(notify_socket, 3))
    daemon = Daemon(config, notifier)
    daemon.queue.open()
    try:
        daemon.generation = daemon._start(config)
        daemon._feed_watchdog()
        wait_for(lambda: notify_socket.states() == ["WATCHDOG"], 60, "a first ping")
        daemon.generation.watchers[0].beat -= 3600  # as if stuck on a hung network share
        daemon._feed_watchdog()
        assert daemon._stuck is not None and "watcher of ct1" in daemon._stuck
        daemon.generation.watchers[0].beat = time.monotonic()
        daemon._feed_watchdog()
        wait_for(lambda: notify_socket.states() == ["WATCHDOG", "WATCHDOG"], 60, "fed again")
    finally:
        daemon.stop.set()
        daemon._shutdown()
        daemon.queue.close()
        notifier.close()


def test_under_journald_lines_carry_syslog_priorities_and_no_time(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url)
    daemon = Stowd(layout)
    log_path = daemon.log_path
    log_path.touch()
    st = os.stat(log_path)  # stderr will be this file: journald's JOURNAL_STREAM names it
    daemon.env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    with daemon:
        (layout.drop / "bad.dcm").write_text("not DICOM")
        wait_for(lambda: layout.files(layout.failed) == {"bad.dcm"}, 60, "bad.dcm failed")
        assert daemon.terminate() == 0
    lines = [line for line in daemon.log.splitlines() if line.strip()]
    assert lines and all(line[:3] in ("<3>", "<4>", "<6>", "<7>") for line in lines), lines[:5]
    assert any(line.startswith("<3>stowd.worker:") and "bad.dcm" in line for line in lines)
    assert any(line.startswith("<6>stowd: stowd started") for line in lines)
    assert not any(line[3:7].isdigit() for line in lines)  # no time stamps of our own


def test_json_log_lines_for_log_shippers(tmp_path: Path) -> None:
    layout = make_layout(tmp_path / "run", "http://127.0.0.1:9/dicom-web")
    with Stowd(layout, args=("--log-format", "json")) as daemon:
        wait_for(lambda: "stowd started" in daemon.log, 30, "start", lambda: daemon.log)
        assert daemon.terminate() == 0
    records = [json.loads(line) for line in daemon.log.splitlines() if line.strip()]
    assert {"time", "level", "logger", "message"} <= set(records[0])
    assert any(r["message"].startswith("stowd started") for r in records)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, value = line.rsplit(" ", 1)
        found = head[len(name) :].strip("{}")
        if head.split("{")[0] == name and ",".join(sorted(found.split(","))) == wanted:
            return float(value)
    raise AssertionError(f"no sample {name}{{{wanted}}}")


def test_a_metrics_scrape_shows_the_counts_after_a_run(tmp_path: Path, orthanc: Orthanc) -> None:
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url)
    with serving_metrics(layout) as (daemon, port):  # the files once the metrics are served
        for n in range(3):
            make_instance(layout.drop / f"s/{n}.dcm")
        (layout.drop / "bad.dcm").write_text("not DICOM")
        wait_for(
            lambda: len(layout.files(layout.sent)) == 3 and len(layout.files(layout.failed)) == 1,
            60,
            "3 sent, 1 failed",
            lambda: daemon.log,
        )
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert daemon.terminate() == 0
    ct1 = {"source": "ct1", "destination": "pacs"}
    assert metric(text, "stowd_files_queued_total", **ct1) == 4
    assert metric(text, "stowd_files_sent_total", **ct1) == 3
    assert metric(text, "stowd_files_failed_total", **ct1) == 1
    sent_bytes = sum(p.stat().st_size for p in layout.sent.rglob("*.dcm"))
    assert metric(text, "stowd_bytes_sent_total", destination="pacs") == sent_bytes
    assert metric(text, "stowd_request_duration_seconds_count", destination="pacs") >= 1
    assert metric(text, "stowd_queue_files", destination="pacs", state="pending") == 0
    assert metric(text, "stowd_destination_held", destination="pacs") == 0
    assert str(layout.drop) not in text  # labels carry names, never paths


def test_housekeeping_purges_sent_after_the_retention(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = make_layout(
        tmp_path / "run", "http://127.0.0.1:9/dicom-web", source={"sent_retention": "30d"}
    )
    config = load_config(layout.config)
    first = layout.sent / "s1" / "a.dcm"
    second = layout.sent / "s2" / "b.dcm"
    for path in (first, second):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x" * 10)
    daemon = Daemon(config, Notifier({}))
    daemon.queue.open()
    try:
        now = time.time()
        monkeypatch.setattr("stowd.service.daemon.time.time", lambda: now + 29 * 86400)
        daemon._housekeeping()
        assert first.exists() and second.exists()  # 29 days: within the retention
        monkeypatch.setattr("stowd.service.daemon.time.time", lambda: now + 31 * 86400)
        daemon._housekeeping()
        assert not first.exists() and not second.exists()
        assert layout.sent.is_dir() and not (layout.sent / "s1").exists()  # emptied folders go
    finally:
        daemon.queue.close()


def test_a_thread_still_busy_after_a_reload_is_watched_and_reaped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = make_layout(tmp_path / "run", "http://127.0.0.1:9/dicom-web", shutdown_timeout="500ms")
    config = load_config(layout.config)
    release = threading.Event()
    real_classify = classify_mod.classify

    hung: list[str] = []

    def hanging(path: str) -> Classified:
        if path.endswith("hung.dcm") and not hung:  # the first read only
            hung.append(path)
            release.wait(30)  # as if its share hung while its header was read
        return real_classify(path)

    monkeypatch.setattr("stowd.pipeline.classify.classify", hanging)
    daemon = Daemon(config, Notifier({}))
    daemon.queue.open()
    try:
        daemon.generation = daemon._start(config)
        make_instance(layout.drop / "hung.dcm")
        wait_for(lambda: bool(hung), 30, "the hung read")
        assert daemon.generation.classify_lock.locked()
        daemon._switch_to(load_config(layout.config))
        [old] = daemon.lingering
        assert old.busy() and daemon.generation is not old
        make_instance(layout.drop / "after.dcm")  # the new generation reads on its own lock
        wait_for(
            lambda: any(j.kind for j in daemon.queue.jobs() if j.path.endswith("after.dcm")),
            30,
            "after.dcm read by the new generation",
        )
        for worker in old.workers:
            worker.beat -= 7200
        assert daemon._stuck_thread() is not None  # the old thread is still watched
        release.set()
        wait_for(lambda: not old.busy(), 30, "the old thread to end")
        daemon._reap_lingering()
        assert daemon.lingering == [] and daemon._stuck_thread() is None
    finally:
        release.set()
        daemon.stop.set()
        daemon._shutdown()
        daemon.queue.close()


def test_a_thread_that_keeps_dying_is_reported_and_starves_the_watchdog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = make_layout(tmp_path / "run", "http://127.0.0.1:9/dicom-web")
    config = load_config(layout.config)
    daemon = Daemon(config, Notifier({}))
    daemon.queue.open()
    try:
        gen = daemon.generation = Generation(config)
        _spawn(
            gen, "flaky", lambda: None, daemon.queue
        )  # a thread that ends at once: dead each time
        for dead in range(1, RESTART_LIMIT + 2):
            thread = gen.threads["flaky"][0]
            wait_for(lambda t=thread: not t.is_alive(), 60, "the thread to end")  # type: ignore[misc]
            daemon._revive_dead_threads()
            assert (daemon._dying() is not None) == (dead > RESTART_LIMIT)
        gen.threads["flaky"][0].join(10)
        gen.threads.clear()  # (a dead thread alone already keeps the watchdog unfed)
        stuck = daemon._stuck_thread()
        assert stuck is not None and stuck[1] == "thread flaky died 6 times in 10 min"
        assert daemon._status_line().startswith("thread flaky died 6 times in 10 min; ")
        monkeypatch.setattr("stowd.service.status.daemon_pid", lambda _queue: os.getpid())
        data = gather(config)
        assert [t["text"] for t in data["daemon_troubles"]] == [
            "thread flaky died 6 times within 10 minutes"
        ]
        assert (
            "thread flaky died 6 times within 10 minutes; systemd's watchdog is no longer "
            "fed" in data["warnings"]
        )
        daemon._deaths["flaky"].clear()  # ten quiet minutes later
        assert daemon._stuck_thread() is None
        assert gather(config)["daemon_troubles"] == []
    finally:
        daemon.queue.close()


def test_a_full_disk_leads_the_status_line_and_keeps_the_watchdog_fed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    layout = make_layout(tmp_path / "run", "http://127.0.0.1:9/dicom-web")
    config = load_config(layout.config)
    daemon = Daemon(config, Notifier({}))
    daemon.queue.open()
    try:
        daemon.disks.hit(config.queue)  # a write to the queue failed: no space
        assert not daemon._disk_freed() and not daemon._disk_freed()  # checked twice
        line = daemon._status_line()  # every place shares the filesystem of the queue here
        assert line.startswith("DISK FULL: queue, spool, sent/ ct1, failed/ ct1; 0 pending")
        assert daemon._stuck_thread() is None  # a restart frees no space: still fed
        assert caplog.text.count("DISK FULL: the filesystem of the queue, the spool") == 1
        assert "but a write there failed for lack of space" in caplog.text
        daemon.disks.clock = lambda: time.monotonic() + 3600  # nothing failed for an hour
        assert daemon._disk_freed()
        assert "has space again; resuming" not in caplog.text  # (its free space is named)
        assert caplog.text.count("has space again") == 1
        assert not daemon._status_line().startswith("DISK FULL")
    finally:
        daemon.queue.close()


@pytest.mark.timeout(180)
def test_after_a_reload_whose_adopt_failed_no_file_of_a_removed_source_is_sent(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    """A reload removes source ct2 while the queue cannot be written (here: another process
    holds its write lock for longer than the busy timeout), so the queue cannot take the new
    sources yet.  The new generation's senders claim nothing until it has (the upkeep tries
    again): a file of ct2 is never sent, where before they sent it (again and again: its
    outcome cannot be settled without its source) until the adopt succeeded."""
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url)
    doc = yaml.safe_load(layout.config.read_text())
    first = doc["sources"][0]
    second = {**first, "name": "ct2", "watch": "./drop2", "sent": "./done2/sent"}
    second["failed"] = "./done2/failed"
    (layout.root / "drop2").mkdir()
    layout.config.write_text(yaml.safe_dump({**doc, "sources": [first, second]}))
    both = load_config(layout.config)
    layout.config.write_text(yaml.safe_dump({**doc, "sources": [first]}))
    only_ct1 = load_config(layout.config)
    daemon = Daemon(both, Notifier({}))
    daemon.queue.open()
    try:
        daemon._recover()
        files = {"ct1": layout.drop / "a.dcm", "ct2": layout.root / "drop2" / "b.dcm"}
        for source, path in files.items():
            make_instance(path)
            st = path.stat()
            daemon.queue.enqueue(
                [NewFile(source, "pacs", str(path), path.name, st.st_size, st.st_mtime_ns)]
            )
        sops = {}
        for job in daemon.queue.unclassified(2):
            ds = pydicom.dcmread(job.path, stop_before_pixels=True)
            sops[job.source] = str(ds.SOPInstanceUID)
            daemon.queue.set_classified(
                [Classification(job, "dicom", ds.StudyInstanceUID, sops[job.source], "1.2")]
            )
        locker = sqlite3.connect(both.queue, isolation_level=None)
        try:
            locker.execute("BEGIN IMMEDIATE")  # the queue cannot be written meanwhile
            daemon._switch_to(only_ct1)  # its adopt fails (logged), its senders start
            assert daemon._replan_due is only_ct1
        finally:
            locker.execute("COMMIT")
            locker.close()
        freed = time.monotonic()
        # the senders go round their loop with the queue free: they could have claimed
        wait_for(
            lambda: all(w.beat > freed + 2 for w in daemon.generation.senders),
            30,
            "the senders to look for work",
        )
        assert orthanc.instance_count() == 0, "sent before the queue took the new sources"
        daemon._replan_after_reload()  # as the upkeep does, once the queue can be written
        wait_for(lambda: orthanc.instance_count() == 1, 60, "ct1's file sent")
        assert orthanc.sop_instance_uids() == {sops["ct1"]}
    finally:
        daemon.stop.set()
        daemon._shutdown()
        daemon.queue.close()
