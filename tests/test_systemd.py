"""The systemd units in ``systemd/``: ``systemd-analyze verify`` is clean and
``systemd-analyze security --offline=yes`` rates each at most 1.5, also with the drop-in that
grants CAP_NET_BIND_SERVICE for a receiving port below 1024 (the figures are printed:
``pytest -rA tests/test_systemd.py`` shows them).

No running systemd is needed (CI runs in a container without it).  The units name the installed
layout (``/opt/stowd/venv/bin/stowd``), which does not exist here and which ``verify`` would
report, so they are checked as copies that start this environment's ``stowd`` instead; every
other line is checked as shipped.  ``verify`` exits 0 even for an unknown key or a bad value and
only says so on stderr, so any output on stderr fails the test.  Without ``systemd-analyze``
(Debian package ``systemd``) the tests are skipped, or fail when ``CI`` is ``"true"``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from needs import require

from stowd.config.model import DEFAULT_SHUTDOWN_TIMEOUT

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"
INSTALLED_STOWD = "/opt/stowd/venv/bin/stowd"
MAX_EXPOSURE = 1.5  # issue 16
# (file in systemd/, the unit name it is checked under)
CASES = [("stowd.service", "stowd.service"), ("stowd@.service", "stowd@ct.service")]
EXPOSURE_LINE = re.compile(r"Overall exposure level for (\S+): (\d+\.\d+)")


def systemd_analyze() -> str:
    """The systemd-analyze binary; skips the test (fails it under CI=true) when missing."""
    found = shutil.which("systemd-analyze")
    if found is not None:
        return found
    require("systemd-analyze is not installed (Debian package: systemd)")
    raise AssertionError("unreachable: require() skips or fails")


def checkable_copy(unit_file: str, folder: Path) -> str:
    """Copy ``unit_file`` into ``folder`` with this environment's stowd as the program."""
    text = (UNITS / unit_file).read_text()
    assert INSTALLED_STOWD in text
    here = Path(sys.prefix) / "bin" / "stowd"
    assert os.access(here, os.X_OK), f"{here} missing: install the project into this venv"
    (folder / unit_file).write_text(text.replace(INSTALLED_STOWD, str(here)))
    return str(folder / unit_file)


def analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [systemd_analyze(), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""},
    )


@pytest.mark.parametrize(("unit_file", "unit"), CASES)
def test_verify_is_clean(unit_file: str, unit: str, tmp_path: Path) -> None:
    checkable_copy(unit_file, tmp_path)
    done = analyze("verify", "--man=no", f"./{unit}", cwd=tmp_path)
    print(f"systemd-analyze verify {unit}: exit {done.returncode}, stderr {done.stderr!r}")
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", f"systemd-analyze verify {unit} complains:\n{done.stderr}"


@pytest.mark.parametrize(("unit_file", "unit"), CASES)
def test_security_exposure_is_at_most_1_5(unit_file: str, unit: str, tmp_path: Path) -> None:
    checkable_copy(unit_file, tmp_path)
    exposure, flagged = security(unit, tmp_path)
    assert "AmbientCapabilities=" not in flagged  # no capability by default
    assert exposure <= MAX_EXPOSURE, flagged


def security(unit: str, folder: Path) -> tuple[float, str]:
    """``systemd-analyze security --offline=yes``: the exposure and the lines it flags."""
    done = analyze("security", "--offline=yes", f"./{unit}", cwd=folder)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == "", f"systemd-analyze security {unit} complains:\n{done.stderr}"
    found = EXPOSURE_LINE.search(done.stdout)
    assert found is not None, done.stdout
    assert found.group(1) == unit
    exposure = float(found.group(2))
    print(f"systemd-analyze security --offline=yes {unit}: exposure {exposure} (at most 1.5)")
    flagged = "\n".join(line for line in done.stdout.splitlines() if line.startswith("✗"))
    print(flagged)
    return exposure, flagged


def documented_drop_in(unit_file: str) -> str:
    """The drop-in for a port below 1024, as the unit's comments give it."""
    lines = (UNITS / unit_file).read_text().splitlines()
    granted = [line[1:].strip() for line in lines if re.fullmatch(r"#\s+\w+=CAP_\w+", line)]
    assert granted == [
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
    ]
    return "[Service]\n" + "\n".join(granted) + "\n"


@pytest.mark.parametrize(("unit_file", "unit"), CASES)
def test_the_port_below_1024_drop_in_keeps_exposure_at_most_1_5(
    unit_file: str, unit: str, tmp_path: Path
) -> None:
    """The drop-in documented for port 104, applied as systemctl edit would (a .d folder)."""
    checkable_copy(unit_file, tmp_path)
    (tmp_path / f"{unit_file}.d").mkdir()
    (tmp_path / f"{unit_file}.d" / "override.conf").write_text(documented_drop_in(unit_file))
    done = analyze("verify", "--man=no", f"./{unit}", cwd=tmp_path)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    exposure, flagged = security(unit, tmp_path)
    assert "AmbientCapabilities=" in flagged  # the drop-in was read
    assert exposure <= MAX_EXPOSURE, flagged


@pytest.mark.parametrize("unit_file", [case[0] for case in CASES])
def test_nothing_blocks_receiving_connections(unit_file: str) -> None:
    """A receiving source accepts TCP connections on its port (issue 16); no capability is
    granted by default (a port below 1024 needs the drop-in)."""
    unit = settings(unit_file)
    keys = {key for key, _ in unit}
    blocking = {"IPAddressDeny", "IPAddressAllow", "SocketBindDeny", "SocketBindAllow"}
    assert not keys & blocking
    assert ("PrivateNetwork", "yes") not in unit
    families = dict(unit)["RestrictAddressFamilies"].split()
    assert {"AF_INET", "AF_INET6"} <= set(families)
    assert ("CapabilityBoundingSet", "") in unit and ("AmbientCapabilities", "") in unit


def test_verify_catches_mistakes(tmp_path: Path) -> None:
    """The check above would notice an unknown key and a bad value (verify still exits 0)."""
    path = Path(checkable_copy("stowd.service", tmp_path))
    text = path.read_text().replace("ProtectSystem=strict", "ProtectSystem=stricter")
    path.write_text(text.replace("[Service]\n", "[Service]\nWatchDogSec=60s\n"))
    done = analyze("verify", "--man=no", "./stowd.service", cwd=tmp_path)
    assert "Unknown key 'WatchDogSec'" in done.stderr
    assert "stricter" in done.stderr


def settings(unit_file: str) -> list[tuple[str, str]]:
    """(key, value) of every setting line, in order; comments and sections left out."""
    lines = (UNITS / unit_file).read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if "=" in line and not line.startswith("#")]
    return [(key, value) for key, value in pairs]


def seconds(value: str) -> float:
    found = re.fullmatch(r"(\d+)(s|min)", value)
    assert found is not None, f"time span {value!r}: write it as Ns or Nmin"
    return float(found.group(1)) * (60 if found.group(2) == "min" else 1)


def test_service_settings() -> None:
    """What the daemon relies on: sd_notify, watchdog, reload, restart rules, a queue dir."""
    unit = dict(settings("stowd.service"))
    assert unit["Type"] == "notify"
    assert unit["NotifyAccess"] == "main"
    assert unit["ExecStart"] == f"{INSTALLED_STOWD} run -c /etc/stowd/config.yaml"
    assert unit["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert unit["Restart"] == "on-failure"
    assert unit["RestartPreventExitStatus"] == "2"
    assert "ExecStartPre" not in unit  # its exit status would not stop the restarts
    assert unit["StateDirectory"] == "stowd"
    assert unit["User"] == "stowd"
    # A reload holds the main loop (no WATCHDOG=1) while uploads finish: up to
    # shutdown_timeout, after up to WatchdogSec/3 since the last ping.
    assert seconds(unit["WatchdogSec"]) >= 2 * DEFAULT_SHUTDOWN_TIMEOUT
    assert seconds(unit["TimeoutStopSec"]) > DEFAULT_SHUTDOWN_TIMEOUT


def megabytes(value: str) -> float:
    found = re.fullmatch(r"(\d+)([MG])", value)
    assert found is not None, f"size {value!r}: write it as NM or NG"
    return float(found.group(1)) * (1024 if found.group(2) == "G" else 1)


@pytest.mark.parametrize("unit_file", [case[0] for case in CASES])
def test_resource_limits(unit_file: str) -> None:
    """Memory and tasks are bounded (issue 14), with room above what the benchmarks measured
    (peak RSS 65-84 MB, docs/benchmarks.md) and the threads of a large config."""
    unit = dict(settings(unit_file))
    assert 256 <= megabytes(unit["MemoryHigh"]) < megabytes(unit["MemoryMax"]) <= 2048
    assert 64 <= int(unit["TasksMax"]) <= 1024


def test_template_differs_only_in_its_paths() -> None:
    instance = {
        "Description": "stowd DICOM drop-folder uploader (STOW-RS), config %i",
        "ExecStart": f"{INSTALLED_STOWD} run -c /etc/stowd/%i.yaml",
        "StateDirectory": "stowd/%i",
        "ReadWritePaths": "/srv/stowd/%i",
    }
    single = dict(settings("stowd.service"))
    expected = [(key, instance.get(key, value)) for key, value in settings("stowd.service")]
    assert settings("stowd@.service") == expected
    assert set(instance) <= set(single)
