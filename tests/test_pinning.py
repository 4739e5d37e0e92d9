"""``cpu:`` (issue 19): every thread of stowd on one core, read from the real daemon's
``/proc/<pid>/task/*/status`` (the key's own errors: tests/test_config.py).  Core numbers
come from this process's own allowed set, so the tests hold on a 1-core machine and under a
cpuset."""

from __future__ import annotations

import ctypes.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dicomgen import make_instance
from harness import Layout, Stowd, make_layout, run_cli, wait_for
from needs import require
from orthanc import Orthanc

from stowd.config.load import cores_text
from stowd.service import pinning

ALLOWED = frozenset(os.sched_getaffinity(0))
CORE = max(ALLOWED)  # the highest: on a 1-core machine the only one
OUTSIDE = max(ALLOWED) + 1  # never one this process may use


def allowed_lists(pid: int) -> dict[int, str]:
    """Each live thread of ``pid``: its ``Cpus_allowed_list``."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        for line in status.splitlines():
            if line.startswith("Cpus_allowed_list:"):
                found[int(task.name)] = line.split(":", 1)[1].strip()
    return found


def all_on(daemon: Stowd, cores: str) -> bool:
    assert daemon.proc is not None
    lists = allowed_lists(daemon.proc.pid)
    return len(lists) > 1 and set(lists.values()) == {cores}


def rewrite(layout: Layout, change: dict[str, object], drop: tuple[str, ...] = ()) -> None:
    doc = yaml.safe_load(layout.config.read_text())
    doc.update(change)
    for key in drop:
        doc.pop(key, None)
    layout.config.write_text(yaml.safe_dump(doc, sort_keys=False))


# ------------------------------------------------------------------------------ the daemon


@pytest.mark.timeout(180)
def test_a_daemon_with_a_core_runs_every_thread_there_and_sends(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url, cpu=CORE)
    with Stowd(layout) as daemon:
        uids = {make_instance(layout.drop / f"{n}.dcm") for n in range(3)}
        sent = {f"{n}.dcm" for n in range(3)}
        wait_for(lambda: layout.files(layout.sent) == sent, 60, "3 files", lambda: daemon.log)
        # the senders, reader, watcher and upkeep run by now: every one of them on CORE
        wait_for(lambda: all_on(daemon, str(CORE)), 30, f"threads on {CORE}", lambda: daemon.log)
        assert daemon.terminate() == 0
    assert f"stowd's threads run on CPU {CORE} (cpu: {CORE}, of {cores_text(ALLOWED)})" in (
        daemon.log
    )
    assert uids <= orthanc.sop_instance_uids()


@pytest.mark.timeout(180)
def test_auto_picks_one_allowed_core(tmp_path: Path, orthanc: Orthanc) -> None:
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url, cpu="auto")
    with Stowd(layout) as daemon:
        daemon.wait_started()
        make_instance(layout.drop / "a.dcm")
        wait_for(lambda: layout.files(layout.sent) == {"a.dcm"}, 60, "a.dcm", lambda: daemon.log)
        assert daemon.proc is not None
        lists = set(allowed_lists(daemon.proc.pid).values())
        assert len(lists) == 1, lists  # every thread on one core ...
        (chosen,) = lists
        assert chosen.isdigit() and int(chosen) in ALLOWED  # ... one it may use
        assert daemon.terminate() == 0
    said = f"stowd's threads run on CPU {chosen} (cpu: auto, of {cores_text(ALLOWED)})"
    assert said in daemon.log


@pytest.mark.timeout(240)
def test_a_reload_refuses_a_core_outside_and_restores_the_start_mask_without_the_key(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url, cpu=CORE)
    start = cores_text(ALLOWED)  # the daemon inherits this process's mask
    with Stowd(layout) as daemon:
        daemon.wait_started()
        assert daemon.proc is not None
        wait_for(lambda: all_on(daemon, str(CORE)), 30, f"threads on {CORE}", lambda: daemon.log)

        rewrite(layout, {"cpu": OUTSIDE})
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "still running with the old config" in daemon.log, 30, "the refusal")
        assert f"cpu: CPU {OUTSIDE} is not one stowd may use here (allowed: {start}" in daemon.log
        assert all_on(daemon, str(CORE))

        rewrite(layout, {}, drop=("cpu",))
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reloaded" in daemon.log, 60, "the reload", lambda: daemon.log)
        wait_for(lambda: all_on(daemon, start), 30, f"threads on {start}", lambda: daemon.log)
        make_instance(layout.drop / "b.dcm")
        wait_for(lambda: layout.files(layout.sent) == {"b.dcm"}, 60, "b.dcm", lambda: daemon.log)
        assert all_on(daemon, start)  # the new generation's threads too
        assert daemon.terminate() == 0
    assert f"stowd's threads run on CPUs {start} again, as at start (no cpu: key)" in daemon.log


@pytest.mark.timeout(60)
def test_a_core_outside_the_allowed_set_is_refused_at_start(tmp_path: Path) -> None:
    layout = make_layout(tmp_path / "run", "http://127.0.0.1:9/dicom-web", cpu=OUTSIDE)
    result = run_cli("run", "-c", str(layout.config))
    assert result.returncode == 2, result.stderr
    assert f"cpu: CPU {OUTSIDE} is not one stowd may use here" in result.stderr
    assert f"(allowed: {cores_text(ALLOWED)}, " in result.stderr
    assert str(layout.config) in result.stderr
    assert not (layout.root / "state" / "queue.db").exists()  # refused before anything ran


@pytest.mark.timeout(60)
def test_check_config_names_a_core_outside_with_every_other_problem(tmp_path: Path) -> None:
    """The loader judges the core (against the cores the process started with), so
    ``check-config`` says what ``run`` would refuse, with the other problems at once."""
    layout = make_layout(tmp_path / "run", "http://127.0.0.1:9/dicom-web", cpu=OUTSIDE)
    rewrite(layout, {"log_level": "chatty"})
    result = run_cli("check-config", "-c", str(layout.config))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"cpu: CPU {OUTSIDE} is not one stowd may use here" in result.stderr
    assert "log_level" in result.stderr


@pytest.mark.timeout(60)
def test_commands_that_never_pin_do_not_judge_the_core(tmp_path: Path) -> None:
    """``stowd status`` (a monitoring unit with its own CPUAffinity=, ``docker exec`` under
    another cpuset) reads the config whatever cores its own shell may use."""
    layout = make_layout(tmp_path / "run", "http://127.0.0.1:9/dicom-web", cpu=OUTSIDE)
    result = run_cli("status", "-c", str(layout.config))
    assert "is not one stowd may use here" not in result.stderr
    assert "cpu" not in result.stderr, result.stderr
    assert result.returncode != 2, result.stderr  # 2: the config refused


def test_auto_never_picks_a_core_missing_from_proc_stat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A core taken offline has no line in /proc/stat: never chosen (pinning to it fails)."""
    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  10 0 10 100 0 0 0 0 0 0\n"
        "cpu0 10 0 10 100 0 0 0 0 0 0\n"
        "intr 1\n"  # no cpu1 line: offline
    )
    monkeypatch.setattr(pinning, "STAT", stat)
    assert pinning.least_busy({0, 1}) == 0
    stat.write_text(stat.read_text() + "cpu1 10 0 10 100 0 0 0 0 0 0\n")
    assert pinning.least_busy({0, 1}) == 1  # online again: the highest among equals


@pytest.mark.skipif(len(ALLOWED) < 2, reason="one core: no other mask to reset the threads to")
@pytest.mark.timeout(180)
def test_a_reload_pins_again_threads_whose_mask_was_reset(tmp_path: Path, orthanc: Orthanc) -> None:
    """``taskset -a -p`` (or a core taken offline) reset the threads' masks: a reload with
    the same ``cpu:`` pins them again, not only a changed one."""
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url, cpu=CORE)
    with Stowd(layout) as daemon:
        daemon.wait_started()
        assert daemon.proc is not None
        wait_for(lambda: all_on(daemon, str(CORE)), 60, "threads pinned", lambda: daemon.log)
        for tid in allowed_lists(daemon.proc.pid):
            try:
                os.sched_setaffinity(tid, ALLOWED)
            except ProcessLookupError:
                continue  # the thread ended meanwhile
        assert not all_on(daemon, str(CORE))
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reloaded" in daemon.log, 60, "the reload", lambda: daemon.log)
        wait_for(lambda: all_on(daemon, str(CORE)), 30, "pinned again", lambda: daemon.log)
        assert daemon.terminate() == 0


@pytest.mark.timeout(180)
def test_migrate_runs_on_the_core_too(tmp_path: Path, orthanc: Orthanc) -> None:
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url, cpu=CORE)
    old = tmp_path / "old"
    uids = {make_instance(old / f"{n}.dcm") for n in range(3)}
    result = run_cli(
        "migrate", "-c", str(layout.config), str(old), "--destination", "pacs", "--keep",
        "--log-level", "INFO", timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"stowd's threads run on CPU {CORE} (cpu: {CORE}, of " in result.stderr
    assert uids <= orthanc.sop_instance_uids()

    layout.config.write_text(layout.config.read_text().replace(f"cpu: {CORE}", f"cpu: {OUTSIDE}"))
    refused = run_cli("migrate", "-c", str(layout.config), str(old), "--destination", "pacs")
    assert refused.returncode == 2, refused.stderr
    assert f"cpu: CPU {OUTSIDE} is not one stowd may use here" in refused.stderr


# a child that refuses sched_setaffinity with EPERM, as the shipped unit's SystemCallFilter=
# ~@resources does, then becomes ``stowd run`` (exec: the same process)
REFUSING = """\
import ctypes, os, sys
lib = ctypes.CDLL(sys.argv[1])
lib.seccomp_init.restype = ctypes.c_void_p
ctx = lib.seccomp_init(ctypes.c_uint32(0x7FFF0000))  # SCMP_ACT_ALLOW
call = lib.seccomp_syscall_resolve_name(b"sched_setaffinity")
errno_eperm = ctypes.c_uint32(0x00050000 | 1)  # SCMP_ACT_ERRNO(EPERM)
assert lib.seccomp_rule_add(ctypes.c_void_p(ctx), errno_eperm, call, 0) == 0
assert lib.seccomp_load(ctypes.c_void_p(ctx)) == 0
os.execv(sys.executable, [sys.executable, "-m", "stowd", "run", "-c", sys.argv[2]])
"""


@pytest.mark.timeout(180)
def test_a_kernel_that_refuses_leaves_stowd_running_unpinned(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    library = ctypes.util.find_library("seccomp")
    require(None if library else "libseccomp is not installed (Debian: libseccomp2)")
    assert library is not None
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url, cpu=CORE)
    log = layout.root / "stowd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", REFUSING, library, str(layout.config)],
            stdout=out,
            stderr=out,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        make_instance(layout.drop / "a.dcm")
        wait_for(lambda: layout.files(layout.sent) == {"a.dcm"}, 60, "a.dcm", log.read_text)
        assert set(allowed_lists(proc.pid).values()) == {cores_text(ALLOWED)}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    said = log.read_text()
    assert (
        f"WARNING stowd: cannot set stowd's threads' CPUs (cpu: {CORE}): Operation not "
        f"permitted; running unpinned, on CPUs {cores_text(ALLOWED)}"
    ) in said
    assert "stowd's threads run on CPU" not in said


def test_cores_are_written_as_the_kernel_lists_them() -> None:
    assert cores_text({0}) == "0"
    assert cores_text({0, 1, 2, 3, 6, 8, 9}) == "0-3,6,8-9"
    assert cores_text([5, 4]) == "4-5"
