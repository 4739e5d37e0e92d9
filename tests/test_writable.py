"""``check-config``'s write check (``stowd/commands/writable.py``) with real folders, real
permissions and a real unprivileged user (``nobody``); the tests run as root."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from stowd.commands import writable
from stowd.commands.cli import main


@pytest.fixture(autouse=True)
def as_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("these tests need root (to check for another user); CI runs as root")
        pytest.skip("needs root")


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A temporary folder every user may enter (the session's own is 0700, so no other user
    could reach anything below it); removed after the test."""
    folder = Path(tempfile.mkdtemp(prefix="stowd-writable-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def config_in(root: Path, queue: str = "./state/queue.db") -> Path:
    """A config in ``root`` with one source; its watch folder exists, owned by root, 0755."""
    (root / "drop").mkdir(parents=True)
    path = root / "stowd.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            queue: {queue}
            sources:
              - {{name: ct1, watch: ./drop, sent: ./done/sent, failed: ./done/failed,
                 destination: pacs}}
            destinations:
              pacs: {{url: http://127.0.0.1:9/dicom-web}}
            """
        )
    )
    root.chmod(0o755)
    return path


def check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    code = main(["check-config", *args])
    captured = capsys.readouterr()
    return code, (captured.out + captured.err).splitlines()


def test_folders_another_user_cannot_write_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "etc"
    config = config_in(root)

    code, lines = check(capsys, "-c", str(config), "--user", "nobody")

    assert code == 0  # the config is valid; the write check warns
    assert "  write access as user nobody (--user): NOT ok" in lines
    made_in = f"it does not exist yet and would be made in {root}, nobody cannot write in {root}"
    assert (
        f"WARNING: not writable by nobody: the queue's folder {root / 'state'}: {made_in} "
        "(owner root, mode 0755)"
    ) in lines
    assert (
        f"WARNING: not writable by nobody: source ct1: watch {root / 'drop'}: nobody cannot "
        f"write in {root / 'drop'} (owner root, mode 0755)"
    ) in lines
    assert sum("not writable by nobody: source ct1: sent" in line for line in lines) == 1
    assert sum("not writable by nobody: source ct1: failed" in line for line in lines) == 1


def test_folders_the_user_owns_or_shares_through_a_group_are_writable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nobody = pwd.getpwnam("nobody")
    root = tmp_path / "srv"
    config = config_in(root)
    os.chown(root, nobody.pw_uid, 0)  # its own: state/, done/ are made here
    os.chown(root / "drop", 0, nobody.pw_gid)  # the writers' group, as a drop folder is
    (root / "drop").chmod(0o2770)

    code, lines = check(capsys, "-c", str(config), "--user", "nobody")

    assert code == 0
    assert "  write access as user nobody (--user): ok" in lines
    assert not any("not writable" in line for line in lines), lines


def test_a_folder_above_that_the_user_cannot_enter_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nobody = pwd.getpwnam("nobody")
    closed = tmp_path / "closed"
    root = closed / "srv"
    config = config_in(root)
    os.chown(root, nobody.pw_uid, 0)
    os.chown(root / "drop", nobody.pw_uid, 0)
    closed.chmod(0o700)

    _, lines = check(capsys, "-c", str(config), "--user", "nobody")

    assert (
        f"WARNING: not writable by nobody: source ct1: watch {root / 'drop'}: nobody cannot "
        f"enter {closed} (owner root, mode 0700)"
    ) in lines


def test_a_read_only_mount_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "ro"
    config = config_in(root)
    mount = root / "done"
    mount.mkdir()
    assert os.system(f"mount -t tmpfs -o size=2m,ro tmpfs {mount}") == 0
    try:
        _, lines = check(capsys, "-c", str(config), "--user", "root")
    finally:
        assert os.system(f"umount {mount}") == 0

    assert "  write access as user root (--user): NOT ok" in lines
    assert (
        f"WARNING: not writable by root: source ct1: sent {mount / 'sent'}: it does not exist "
        f"yet and would be made in {mount}, {mount} is on a read-only file system"
    ) in lines


def test_as_root_without_user_the_units_user_is_checked_or_root_is_said(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = config_in(tmp_path / "etc")

    _, lines = check(capsys, "-c", str(config))

    try:
        pwd.getpwnam("stowd")
    except KeyError:
        expected = "(there is no user stowd (the unit's User=); give --user NAME)"
        assert any(line.startswith("  write access as user root ") for line in lines), lines
    else:
        expected = "(the unit's User=; give --user NAME for another)"
    assert any(expected in line for line in lines), lines


def test_an_unknown_user_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = config_in(tmp_path / "etc")

    code, lines = check(capsys, "-c", str(config), "--user", "no-such-user-x")

    assert code == 2
    assert lines == ["stowd: --user: no user named 'no-such-user-x' on this machine"]


def test_the_example_copied_to_etc_puts_the_queue_where_the_unit_cannot_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The Install section's copy: the queue at /etc/stowd/state/queue.db is read-only under
    the unit's ProtectSystem=strict (here the same layout in a temporary folder)."""
    root = tmp_path / "etc" / "stowd"
    config = config_in(root)

    _, lines = check(capsys, "-c", str(config))

    paths, where = writable.unit_writable([tmp_path / "no-unit-here"])
    assert paths == (Path("/var/lib/stowd"), Path("/srv/stowd"))
    assert (
        f"WARNING: under {where}: the queue's folder {root / 'state'}: read-only under the "
        "unit (ProtectSystem=strict); move it below one of its writable folders "
        "(/var/lib/stowd, /srv/stowd) or add it to ReadWritePaths= in a drop-in "
        "(systemctl edit stowd)"
    ) in lines


def test_the_installed_unit_and_its_drop_ins_give_the_writable_folders(tmp_path: Path) -> None:
    units = tmp_path / "system"
    (units / "stowd.service.d").mkdir(parents=True)
    (units / "stowd.service").write_text(
        "[Service]\nStateDirectory=stowd\nReadWritePaths=/srv/stowd\n"
    )
    (units / "stowd.service.d" / "paths.conf").write_text(
        "[Service]\nReadWritePaths=\nReadWritePaths=-/data/drop /data/done\n"
    )

    paths, where = writable.unit_writable([tmp_path / "elsewhere", units])

    assert where == str(units / "stowd.service")
    assert paths == (Path("/var/lib/stowd"), Path("/data/drop"), Path("/data/done"))


def test_folders_in_home_are_hidden_by_the_unit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = config_in(tmp_path / "etc", queue="/root/stowd/queue.db")

    _, lines = check(capsys, "-c", str(config))

    assert any(
        line.endswith("the queue's folder /root/stowd: hidden from the unit by ProtectHome=yes")
        for line in lines
    ), lines
