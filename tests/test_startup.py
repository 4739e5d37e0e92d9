"""What ``stowd run`` imports to start and to send a usual DICOM file (issue 19: start-up CPU).

pydicom's import (the whole package, with numpy and requests when they are installed) was
0.2-0.25 s of the 0.5 s of CPU ``stowd run`` used before its first file.  It is imported only
once an unusual header, a conversion or a rule needs it: never to start, nor for a usual
file sent as it is.  The daemon runs as a subprocess with ``PYTHONPROFILEIMPORTTIME`` (as
``python -X importtime``), whose stderr lists every module it imports."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from dicomgen import make_instance
from harness import Stowd, make_layout, wait_for
from orthanc import Orthanc, free_port

IMPORTS = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", re.M)
# pydicom, and what it brings with it; PIL comes only with a photo (stowd.media.decode)
NOT_AT_START = ("pydicom", "numpy", "requests", "PIL")
RULE = {"name": "institution", "default": {"InstitutionName": "City Hospital"}}


def imported(log: str) -> set[str]:
    """The modules an ``-X importtime`` log says the process imported."""
    return set(IMPORTS.findall(log))


def unwanted(modules: set[str]) -> list[str]:
    """The modules of those packages the process loaded (their submodules: each package
    loads some as it is imported)."""
    return sorted(m for m in modules if m.split(".")[0] in NOT_AT_START and "." in m)


def test_run_starts_without_pydicom(tmp_path: Path) -> None:
    """Started (its queue open, its folders watched), with no archive to reach, and
    stopped: ``stowd run`` imported none of pydicom, its rule's keyword checked all the same
    (in pydicom's dictionary, read alone)."""
    layout = make_layout(
        tmp_path / "run", f"http://127.0.0.1:{free_port()}/dicom-web", rules=[RULE]
    )
    with Stowd(layout, env={"PYTHONPROFILEIMPORTTIME": "1"}) as daemon:
        daemon.wait_started()
        wait_for(lambda: "watching" in daemon.log, 30, "the daemon to watch", lambda: daemon.log)
        assert daemon.terminate() == 0
    modules = imported(daemon.log)
    assert {"stowd.service.daemon", "stowd.pipeline.worker", "httpx"} <= modules
    assert unwanted(modules) == []


def test_a_usual_file_is_sent_without_pydicom(tmp_path: Path, orthanc: Orthanc) -> None:
    """A usual DICOM file (Explicit VR Little Endian, no rules) is read, sent and moved to
    sent/ with the header walked by stowd itself: pydicom is never imported."""
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url)
    make_instance(layout.drop / "a.dcm")
    with Stowd(layout, env={"PYTHONPROFILEIMPORTTIME": "1"}) as daemon:
        wait_for(
            lambda: layout.files(layout.sent) == {"a.dcm"}, 60, "a.dcm sent", lambda: daemon.log
        )
        assert daemon.terminate() == 0
    assert orthanc.instance_count() == 1
    modules = imported(daemon.log)
    assert {"stowd.media.quickheader", "stowd.dicomweb.stowbody"} <= modules
    assert unwanted(modules) == []


def test_status_imports_nothing_of_the_daemon(tmp_path: Path) -> None:
    """``stowd status`` (its wall time was almost all Python's start) reads the config, a
    rule's keyword checked, and the queue: none of pydicom, nor the senders' httpx, the
    watcher's watchdog or the metrics' prometheus_client."""
    layout = make_layout(
        tmp_path / "run", f"http://127.0.0.1:{free_port()}/dicom-web", rules=[RULE]
    )
    with Stowd(layout) as daemon:  # the queue status reads
        daemon.wait_started()
        assert daemon.terminate() == 0
    shown = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "stowd", "status", "-c", str(layout.config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    modules = imported(shown.stderr)
    assert {"stowd.service.status", "stowd.config.load"} <= modules
    daemons = ("httpx", "httpcore", "watchdog", "prometheus_client")
    assert unwanted(modules) + sorted(m for m in modules if m.split(".")[0] in daemons) == []
