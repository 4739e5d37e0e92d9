"""The Debian package (``systemd/debian/build``): built from this checkout, installed with apt,
checked as installed (files, modes, the user and group, ``systemd-analyze verify`` of the
installed units, ``stowd --version``, ``stowd check-config`` as shipped, ``systemctl enable``),
then removed and purged, after which nothing of it may be left (files, user, group); a purge
that finds files of stowd left keeps them and the user (also on a mounted folder), a linked
folder and a user the admin made; an upgrade, postinst run again and a reinstall after remove
keep the admin's config; Depends names every system library the venv loads; and
docs/deploy.md's path from the scanner's account to the archive works with the installed
package (a real Orthanc).

The install is real apt and dpkg on this machine, but in a copy-on-write view of its system
folders (``tests/support/sandbox.py``: a private mount namespace with overlays on /etc, /usr,
/var, /opt, /srv, /home), so other tests running meanwhile never see the user stowd or the
files, and a killed test leaves nothing behind: the ``finally`` only removes the overlay folder.
That view also shows exactly what the package left after the purge.

Needs root, Debian, ``/usr/bin/python3`` with venv, dpkg-deb, apt-get, systemd-analyze and
PyPI (the build downloads the dependencies).  Outside CI the package tests skip when one is
missing; under ``CI=true`` they fail.  They also refuse to run when stowd is installed on the
machine itself (a package, /opt/stowd, /etc/stowd, the user): the checks would see that one.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicomgen import make_instance
from needs import require
from orthanc import Orthanc
from sandbox import Sandbox, unavailable

from stowd import __version__
from stowd.commands.cli import main

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "systemd" / "debian" / "build"
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive", "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""}
MACHINE_PATHS = ("/opt/stowd", "/etc/stowd", "/usr/bin/stowd", "/lib/systemd/system/stowd.service")
ACCOUNT_FILES = ("passwd", "group", "shadow", "gshadow", "subuid", "subgid")
# What apt, dpkg and adduser themselves keep (their database, caches, logs, backups).
BOOKKEEPING = re.compile(
    r"^/(var/lib/dpkg|var/lib/apt|var/cache|var/log)(/|$)|^/etc/(\.pwd\.lock|\w+-)$"
)
# (path, owner, group, mode in octal, type) as installed
INSTALLED = [
    ("/etc/stowd", "root", "root", "755", "directory"),
    ("/etc/stowd/config.yaml", "root", "stowd", "640", "regular file"),
    ("/var/lib/stowd", "stowd", "stowd", "750", "directory"),
    ("/srv/stowd", "root", "root", "755", "directory"),
    ("/srv/stowd/ct1/drop", "stowd", "stowd", "2770", "directory"),
    ("/srv/stowd/ct1/sent", "stowd", "stowd", "750", "directory"),
    ("/srv/stowd/ct1/failed", "stowd", "stowd", "750", "directory"),
    ("/opt/stowd/venv/bin/stowd", "root", "root", "755", "regular file"),
    ("/usr/bin/stowd", "root", "root", "777", "symbolic link"),
    ("/lib/systemd/system/stowd.service", "root", "root", "644", "regular file"),
    ("/lib/systemd/system/stowd@.service", "root", "root", "644", "regular file"),
]
KEPT_ON_REMOVE = ["/etc/stowd/config.yaml", "/var/lib/stowd", "/srv/stowd/ct1/drop"]
GONE_ON_REMOVE = ["/opt/stowd", "/usr/bin/stowd", "/lib/systemd/system/stowd.service"]


def test_version_option(capsys: pytest.CaptureFixture[str]) -> None:
    """``stowd --version``, which the package test and docs/deploy.md use."""
    with pytest.raises(SystemExit) as done:
        main(["--version"])

    assert done.value.code == 0
    assert capsys.readouterr().out == f"stowd {__version__}\n"


def missing_tool() -> str | None:
    if not Path("/etc/debian_version").exists():
        return "not Debian"
    for tool in ("dpkg-deb", "apt-get", "systemd-analyze", "runuser"):
        if shutil.which(tool) is None:
            return f"{tool} is missing"
    venv = subprocess.run(
        ["/usr/bin/python3", "-c", "import ensurepip, venv"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    return None if venv.returncode == 0 else "/usr/bin/python3 has no venv (python3-venv)"


def installed_on_machine() -> str | None:
    """What of stowd this machine has installed itself, if anything."""
    known = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", "stowd"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if known.returncode == 0 and known.stdout.strip() not in ("", "unknown ok not-installed"):
        return f"the package stowd is on this machine ({known.stdout.strip()})"
    for path in MACHINE_PATHS:
        if os.path.lexists(path):
            return f"{path} exists on this machine"
    try:
        pwd.getpwnam("stowd")
    except KeyError:
        return None
    return "the user stowd exists on this machine"


@pytest.fixture(scope="module")
def deb() -> Iterator[Path]:
    """The package, built once for this module."""
    require(unavailable() or missing_tool())
    require(installed_on_machine())
    out = Path(tempfile.mkdtemp(prefix="stowd-deb-"))
    try:
        built = subprocess.run(
            [str(BUILD), "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        assert built.returncode == 0, built.stderr[-3000:]
        print(built.stdout)
        (found,) = out.glob(f"stowd_{__version__}_*.deb")
        yield found
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture
def view() -> Iterator[Sandbox]:
    upper = Path(tempfile.mkdtemp(prefix="stowd-sandbox-"))
    try:
        yield Sandbox(upper)
    finally:
        shutil.rmtree(upper, ignore_errors=True)


def test_the_view_keeps_the_machines_systemd_out_of_reach(tmp_path: Path) -> None:
    """On a machine booted with systemd (a CI virtual machine), the package's scripts and
    ``systemctl enable`` in the view must not reach the machine's manager, which knows
    nothing of the view's units.  Such a machine is made here in a mount namespace of its own:
    /run/systemd/system exists, as systemd makes it at boot."""
    require(unavailable())
    booted = 'mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system && exec "$@"'
    machine = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", booted, "sh"]
    view = [sys.executable, str(REPO / "tests/support/sandbox.py"), str(tmp_path / "view")]
    done = subprocess.run(
        [*machine, *view, "sh", "-c", "[ ! -e /run/systemd/system ]"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr}"


def test_the_view_sees_and_leaves_only_its_own_processes(tmp_path: Path) -> None:
    """A process left running by a run of the view (a daemon started with &, as a failed
    script leaves it) ends with the run; and the view sees only its own processes, so the
    purge's check for processes of stowd never finds another view's stowd with the same uid."""
    require(unavailable())
    mark = "1234.567"  # sleep's argument: names the process left behind
    done = Sandbox(tmp_path / "view").run(
        "sh", "-c", f"sleep {mark} >/dev/null 2>&1 & ls -d /proc/[0-9]*", timeout=120
    )
    left = [
        path.parent.name
        for path in Path("/proc").glob("[0-9]*/cmdline")
        if path.exists() and f"sleep\0{mark}".encode() in path.read_bytes()
    ]
    for pid in left:  # the test's own sleep, so that a failure leaves nothing behind either
        os.kill(int(pid), 9)
    assert done.returncode == 0, done.stderr
    assert left == []
    assert len(done.stdout.split()) < 5, done.stdout


def inside(view: Sandbox, *args: str, timeout: float = 120) -> str:
    """``args`` run in the view; fails the test on a non-zero exit; its stdout."""
    done = view.run(*args, timeout=timeout, env=APT_ENV)
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def apt(view: Sandbox, *args: str) -> subprocess.CompletedProcess[str]:
    done = view.run("apt-get", "-y", *args, timeout=300, env=APT_ENV)
    assert done.returncode == 0, f"apt-get {args}: exit {done.returncode}\n{done.stderr}"
    return done


def present(view: Sandbox, paths: list[str]) -> list[str]:
    """Those of ``paths`` that exist in the view."""
    script = 'for p in "$@"; do if [ -e "$p" ] || [ -L "$p" ]; then echo "$p"; fi; done'
    return inside(view, "sh", "-c", script, "sh", *paths).split()


def check_installed(view: Sandbox) -> None:
    paths = [entry[0] for entry in INSTALLED]
    stat = inside(view, "stat", "-c", "%n %U %G %a %F", *paths)
    assert stat.splitlines() == [" ".join(entry) for entry in INSTALLED]
    assert inside(view, "readlink", "/usr/bin/stowd") == "/opt/stowd/venv/bin/stowd\n"
    python = inside(view, "readlink", "-f", "/opt/stowd/venv/bin/python").strip()
    assert re.fullmatch(r"/usr/bin/python3\.\d+", python), python
    user = inside(view, "getent", "passwd", "stowd").strip().split(":")
    assert user[5:] == ["/var/lib/stowd", "/usr/sbin/nologin"]
    assert int(user[2]) < 1000, "not a system user"
    group = inside(view, "getent", "group", "stowd").strip().split(":")
    assert user[3] == group[2]
    conffiles = inside(view, "dpkg-query", "-W", "-f=${Conffiles}", "stowd")
    assert "/etc/stowd/config.yaml" in conffiles


def check_commands(view: Sandbox) -> None:
    assert inside(view, "stowd", "--version") == f"stowd {__version__}\n"
    for command in (
        ["stowd", "check-config"],
        ["stowd", "check-config", "--user", "stowd"],
        ["runuser", "-u", "stowd", "--", "stowd", "check-config"],
    ):
        said = inside(view, *command)
        assert "/etc/stowd/config.yaml: configuration is valid" in said, said
        assert re.search(r"write access as user stowd \(.*\): ok", said), said
        assert "WARNING" not in said, said


def check_units(view: Sandbox) -> None:
    for unit in ("/lib/systemd/system/stowd.service", "stowd@ct.service"):
        done = view.run("systemd-analyze", "verify", "--man=no", unit, timeout=120, env=APT_ENV)
        print(f"systemd-analyze verify {unit}: exit {done.returncode}, stderr {done.stderr!r}")
        assert (done.returncode, done.stderr) == (0, "")
    inside(view, "systemctl", "enable", "stowd")
    assert inside(view, "systemctl", "is-enabled", "stowd") == "enabled\n"


def check_removed(view: Sandbox) -> None:
    assert present(view, GONE_ON_REMOVE) == []
    assert present(view, KEPT_ON_REMOVE) == KEPT_ON_REMOVE
    inside(view, "getent", "passwd", "stowd")
    status = inside(view, "dpkg-query", "-W", "-f=${Status}", "stowd")
    assert status == "deinstall ok config-files"


def leftovers(view: Sandbox) -> list[str]:
    """What the view holds that the machine does not, apart from apt's and dpkg's own files."""
    found = []
    for folder in ("etc", "usr", "var", "opt", "srv", "home"):
        for path in view.left(folder):
            copied_up = Path(path).is_dir() and (view.upper / path.lstrip("/")).is_dir()
            account = path.removeprefix("/etc/") in ACCOUNT_FILES  # compared below
            if not copied_up and not account and not BOOKKEEPING.search(path):
                found.append(path)
    return found


def check_purged(view: Sandbox) -> None:
    assert leftovers(view) == []
    for name in ACCOUNT_FILES:
        kept = view.upper / "etc" / name
        if kept.exists():
            assert kept.read_bytes() == (Path("/etc") / name).read_bytes(), f"/etc/{name}"
    assert [path for path in view.left("var") if "stowd" in path] == []
    assert "Package: stowd\n" not in (view.upper / "var/lib/dpkg/status").read_text()


def library_owner(library: str) -> str:
    """The Debian package that holds ``library`` (a path ldd printed; /lib is /usr/lib)."""
    real = os.path.realpath(library)
    candidates = {library, real, library.removeprefix("/usr"), real.removeprefix("/usr")}
    candidates |= {"/usr" + path for path in candidates if not path.startswith("/usr/")}
    found = subprocess.run(
        ["dpkg", "-S", *sorted(candidates)], capture_output=True, text=True, check=False, timeout=60
    )
    assert found.stdout, f"no package holds {library}"
    return found.stdout.split(":", 1)[0]


def test_depends_names_every_system_library_the_venv_loads(deb: Path, tmp_path: Path) -> None:
    """A fresh Debian 12 gets what the compiled modules in the venv load (ldd) from Depends."""
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path)], check=True, timeout=300)
    modules = [str(path) for path in tmp_path.rglob("*.so*") if path.is_file()]
    ldd = subprocess.run(
        ["ldd", *modules], capture_output=True, text=True, timeout=300, check=False
    )
    lines = [line.split() for line in ldd.stdout.splitlines()]
    needed = {line[2] for line in lines if len(line) > 2 and line[1] == "=>"}
    system = sorted(path for path in needed if not path.startswith(str(tmp_path)))
    assert any("/libc.so" in path for path in system), ldd.stdout
    depends = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Depends"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    named = {entry.split()[0] for entry in depends.split(",")}
    assert {library_owner(path) for path in system} <= named, depends


@pytest.mark.timeout(1500)
def test_install_check_remove_and_purge(deb: Path, view: Sandbox) -> None:
    apt(view, "install", str(deb))
    check_installed(view)
    check_commands(view)
    check_units(view)

    apt(view, "remove", "stowd")
    check_removed(view)

    apt(view, "purge", "stowd")
    check_purged(view)


@pytest.mark.timeout(1500)
def test_purge_keeps_files_of_stowd_and_so_the_user(deb: Path, view: Sandbox) -> None:
    apt(view, "install", str(deb))
    kept = ["/srv/stowd/ct1/sent/CT1/img1.dcm", "/var/lib/stowd/received/mr/img2.dcm"]
    for path in kept:
        inside(view, "install", "-D", "-o", "stowd", "-g", "stowd", "/dev/null", path)

    purged = apt(view, "purge", "stowd")

    assert present(view, kept) == kept
    inside(view, "getent", "passwd", "stowd")
    assert present(view, ["/etc/stowd", "/opt/stowd"]) == []
    said = purged.stdout + purged.stderr  # apt passes the scripts' stderr on as it likes
    assert "stowd: kept /var/lib/stowd: it holds DICOM files received" in said
    assert "stowd: kept the user and group stowd: they own /" in said


# docs/deploy.md, steps 3 to 7, with the service's user and umask (no systemd runs here): the
# scanner's account ct1scan in the group modality writes a study into the drop folder, and
# stowd, running as stowd, sends it and moves it to sent/.  Every wait is bounded (120 s).
FIRST_FILE = r"""
set -eu
url=$1 image=$2 log=$3
wait_for() {
    waited=0
    until eval "$1"; do
        [ "$waited" -lt 120 ] || { echo "not within 120 s: $1" >&2; exit 3; }
        sleep 1
        waited=$((waited + 1))
    done
}
groupadd modality
useradd --gid modality --no-create-home --shell /usr/sbin/nologin ct1scan
usermod -aG modality stowd
chgrp modality /srv/stowd/ct1/drop
sed -i "s|url: http://127.0.0.1:8042/dicom-web|url: $url|" /etc/stowd/config.yaml
stowd check-config --user stowd --connect
(umask 0027; exec setpriv --reuid stowd --regid stowd --init-groups stowd run) >"$log" 2>&1 &
daemon=$!
# A failed wait must not leave the daemon running on (in the view, after the test).
trap 'kill -TERM "$daemon" 2>/dev/null || true' EXIT
wait_for "grep -q 'watching /srv/stowd/ct1/drop' '$log'"
drop=/srv/stowd/ct1/drop
runuser -u ct1scan -- sh -c "umask 002; mkdir $drop/P1 && cp '$image' $drop/P1/"
wait_for "[ -e /srv/stowd/ct1/sent/P1/IM1.dcm ]"
stowd status
kill -TERM "$daemon"
wait "$daemon"
trap - EXIT
"""


@pytest.mark.timeout(1500)
def test_the_first_file_of_the_deploy_guide_reaches_the_archive(
    deb: Path, view: Sandbox, orthanc: Orthanc, tmp_path: Path
) -> None:
    shared = Path(tempfile.mkdtemp(prefix="stowd-first-file-"))  # ct1scan reads it
    try:
        shared.chmod(0o755)
        make_instance(shared / "IM1.dcm", patient_id="DEPLOY1")
        (shared / "IM1.dcm").chmod(0o644)
        apt(view, "install", str(deb))
        log = tmp_path / "daemon.log"

        said = inside(
            view,
            "sh",
            "-c",
            FIRST_FILE,
            "sh",
            orthanc.dicomweb_url,
            str(shared / "IM1.dcm"),
            str(log),
            timeout=600,
        )
    finally:
        shutil.rmtree(shared, ignore_errors=True)

    assert f"destination pacs: {orthanc.dicomweb_url}: works" in said
    assert "stored, moved to /srv/stowd/ct1/sent/P1/IM1.dcm" in log.read_text()
    assert re.search(r"^files: +1 sent$", said, re.MULTILINE), said
    assert orthanc.instance_count() == 1


def purge_in_one_run(view: Sandbox, deb: Path, setup: str) -> subprocess.CompletedProcess[str]:
    """Install, ``setup`` (sh), then purge, in one run of the view, so that mounts made by
    ``setup`` are still there during the purge."""
    script = 'set -e\napt-get -y install "$1" >/dev/null\n' + setup + "\napt-get -y purge stowd\n"
    return view.run("sh", "-c", script, "sh", str(deb), timeout=600, env=APT_ENV)


@pytest.mark.timeout(1500)
def test_purge_keeps_a_linked_folder_and_completes(deb: Path, view: Sandbox) -> None:
    """sent/ linked to a bigger disk: rmdir of the link failed the purge (set -e)."""
    setup = (
        "mkdir -p /srv/big/sent\nrmdir /srv/stowd/ct1/sent\nln -s /srv/big/sent /srv/stowd/ct1/sent"
    )

    purged = purge_in_one_run(view, deb, setup)

    said = purged.stdout + purged.stderr  # apt passes the scripts' stderr on as it likes
    assert purged.returncode == 0, said
    assert "stowd: kept /srv/stowd/ct1/sent: it is a link to /srv/big/sent" in said
    assert present(view, ["/srv/stowd/ct1/sent", "/srv/big/sent"]) == [
        "/srv/stowd/ct1/sent",
        "/srv/big/sent",
    ]


@pytest.mark.timeout(1500)
def test_purge_keeps_the_user_owning_files_on_a_mounted_folder(deb: Path, view: Sandbox) -> None:
    """failed/ on a filesystem of its own (a share) with stowd's files: the search for them
    did not cross the mount point (find -xdev), and the purge removed the user."""
    setup = (
        "mount -t tmpfs -o size=1m tmpfs /srv/stowd/ct1/failed\n"
        "install -D -o stowd -g stowd /dev/null /srv/stowd/ct1/failed/P1/IM1.dcm\n"
        "getent passwd stowd | cut -d: -f3"
    )

    purged = purge_in_one_run(view, deb, setup)

    said = purged.stdout + purged.stderr
    assert purged.returncode == 0, said
    assert "stowd: kept the user and group stowd: they own /srv/stowd/ct1/failed" in said
    inside(view, "getent", "passwd", "stowd")


@pytest.mark.timeout(1500)
def test_purge_keeps_a_user_the_admin_made(deb: Path, view: Sandbox) -> None:
    """A system user stowd made before the install (its uid pinned for a share) works with
    the package, and the purge leaves it: the package did not make it."""
    inside(
        view,
        *("useradd", "--system", "--uid", "880", "--user-group", "--home-dir", "/var/lib/stowd"),
        *("--no-create-home", "--shell", "/usr/sbin/nologin", "stowd"),
    )
    apt(view, "install", str(deb))
    said = inside(view, "stowd", "check-config", "--user", "stowd")
    assert "write access as user stowd" in said and "WARNING" not in said, said

    purged = apt(view, "purge", "stowd")

    assert inside(view, "id", "-u", "stowd") == "880\n"
    assert "stowd: kept the user and group stowd: the package did not make them" in (
        purged.stdout + purged.stderr
    )


def newer(deb: Path, folder: Path) -> Path:
    """``deb`` repacked as the next version whose shipped config changed too."""
    root = folder / "root"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(root)], check=True, timeout=300)
    control = root / "DEBIAN" / "control"
    control.write_text(control.read_text().replace(f"Version: {__version__}\n", "Version: 99\n"))
    with (root / "etc/stowd/config.yaml").open("a") as config:
        config.write("# the next version's comment\n")
    out = folder / "stowd_99_amd64.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Znone", "-b", str(root), str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


@pytest.mark.timeout(1500)
def test_upgrade_rerun_and_reinstall_keep_the_admins_config(
    deb: Path, view: Sandbox, tmp_path: Path
) -> None:
    """An upgrade whose config changed keeps the admin's edit and its mode (the new copy
    beside it, as protected); postinst run again changes nothing; remove then install again
    finds the kept config, folders and user."""
    apt(view, "install", str(deb))
    inside(view, "sh", "-c", "echo '# the admin was here' >>/etc/stowd/config.yaml")
    inside(view, "dpkg", "--force-confold", "-i", str(newer(deb, tmp_path)))
    assert inside(view, "tail", "-n", "1", "/etc/stowd/config.yaml") == "# the admin was here\n"
    shipped = "/etc/stowd/config.yaml.dpkg-dist"
    assert inside(view, "stat", "-c", "%U %G %a", shipped) == "root stowd 640\n"
    inside(view, "rm", shipped)
    before = inside(view, "getent", "passwd", "stowd")

    inside(view, "/var/lib/dpkg/info/stowd.postinst", "configure", "99")
    apt(view, "remove", "stowd")
    apt(view, "install", str(tmp_path / "stowd_99_amd64.deb"))

    assert inside(view, "getent", "passwd", "stowd") == before
    assert inside(view, "tail", "-n", "1", "/etc/stowd/config.yaml") == "# the admin was here\n"
    check_commands(view)
    stat = inside(view, "stat", "-c", "%n %U %G %a %F", *[entry[0] for entry in INSTALLED])
    assert stat.splitlines() == [" ".join(entry) for entry in INSTALLED]


@pytest.mark.timeout(1500)
def test_a_user_stowd_the_admin_made_in_another_group_can_read_the_config(
    deb: Path, view: Sandbox
) -> None:
    """``adduser --system stowd`` (primary group nogroup) before the install: postinst adds
    it to the group stowd, whose config it must read."""
    inside(view, "adduser", "--system", "--quiet", "--no-create-home", "stowd")
    apt(view, "install", str(deb))

    assert "stowd" in inside(view, "id", "-nG", "stowd").split()
    check_commands(view)
