"""``check-config``'s write check: can the user stowd runs as write every folder it writes,
and does the systemd unit's sandbox let it?

The folders: the queue's folder, each watch folder (files move out of it), and each
``sent``/``failed`` folder.  A folder that does not exist yet is made by stowd in the nearest
folder above it that does, so that one must be writable.  Permissions are judged from the
mode bits, the owner and the user's groups (ACLs are not read), and a read-only mount counts.

The unit (``systemd/stowd.service``) runs with ``ProtectSystem=strict``: everything is
read-only except its ``StateDirectory=`` (below /var/lib) and ``ReadWritePaths=``, and
``ProtectHome=yes`` hides /home, /root and /run/user.  Those paths are read from the installed
unit and its drop-ins when there is one, else they are the shipped unit's.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from stowd.config.model import Config

UNIT_USER = "stowd"
UNIT_NAME = "stowd.service"
UNIT_FOLDERS = (
    Path("/etc/systemd/system"),
    Path("/usr/lib/systemd/system"),
    Path("/lib/systemd/system"),
)
SHIPPED_WRITABLE = (Path("/var/lib/stowd"), Path("/srv/stowd"))  # StateDirectory=, ReadWritePaths=
HIDDEN = (Path("/home"), Path("/root"), Path("/run/user"))  # ProtectHome=yes
_WRITE, _ENTER = 2, 1  # the w and x bits of a rwx triple


@dataclass(frozen=True)
class User:
    """Who the folders are checked for, and why this user."""

    name: str
    uid: int
    groups: frozenset[int]
    why: str

    @classmethod
    def named(cls, name: str, why: str) -> User:
        """Raises ``KeyError`` when there is no such user."""
        entry = pwd.getpwnam(name)
        groups = frozenset(os.getgrouplist(name, entry.pw_gid))
        return cls(name, entry.pw_uid, groups, why)


def default_user() -> User:
    """The current user; as root, the unit's user ``stowd`` when it exists."""
    if os.geteuid() != 0:
        return User.named(pwd.getpwuid(os.geteuid()).pw_name, "the current user")
    try:
        return User.named(UNIT_USER, "the unit's User=; give --user NAME for another")
    except KeyError:
        return User.named(
            pwd.getpwuid(0).pw_name,
            f"there is no user {UNIT_USER} (the unit's User=); give --user NAME",
        )


def folders(config: Config) -> list[tuple[str, Path]]:
    """(what, folder) of every folder stowd writes."""
    found = [("the queue's folder", config.queue.parent)]
    for source in config.sources:
        if source.receive is None:
            found.append((f"source {source.name}: watch", source.watch))
        found.append((f"source {source.name}: sent", source.sent))
        found.append((f"source {source.name}: failed", source.failed))
    return found


def problems(config: Config, user: User) -> list[str]:
    """What ``user`` cannot write, one line each."""
    found = []
    for what, folder in folders(config):
        problem = write_problem(folder, user)
        if problem is not None:
            found.append(f"{what} {folder}: {problem}")
    return found


def write_problem(folder: Path, user: User) -> str | None:
    """Why ``user`` cannot make or change entries in ``folder``, or None."""
    existing = _nearest_existing(folder)
    made = "" if existing == folder else f"it does not exist yet and would be made in {existing}, "
    for above in reversed([existing, *existing.parents]):
        if not _may(above, user, _ENTER):
            return f"{made}{user.name} cannot enter {above} ({_owner_mode(above)})"
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        return f"{made}{existing} is on a read-only file system"
    if not _may(existing, user, _WRITE | _ENTER):
        return f"{made}{user.name} cannot write in {existing} ({_owner_mode(existing)})"
    return None


def _nearest_existing(folder: Path) -> Path:
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return folder


def _may(folder: Path, user: User, bits: int) -> bool:
    if user.uid == 0:
        return True
    st = folder.stat()
    if st.st_uid == user.uid:
        shift = 6
    elif st.st_gid in user.groups:
        shift = 3
    else:
        shift = 0
    return (st.st_mode >> shift) & bits == bits


def _owner_mode(folder: Path) -> str:
    st = folder.stat()
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    return f"owner {owner}, mode {stat.S_IMODE(st.st_mode):04o}"


# -- the unit's sandbox -------------------------------------------------------------------------
def unit_writable(unit_folders: Iterable[Path] = UNIT_FOLDERS) -> tuple[tuple[Path, ...], str]:
    """The folders the unit may write, and where that was read."""
    for where in unit_folders:
        unit = where / UNIT_NAME
        if unit.is_file():
            drop_ins = sorted((where / f"{UNIT_NAME}.d").glob("*.conf"))
            return _read_writable([unit, *drop_ins]), str(unit)
    return SHIPPED_WRITABLE, f"the shipped {UNIT_NAME} (not installed here)"


def _read_writable(files: list[Path]) -> tuple[Path, ...]:
    """StateDirectory= and ReadWritePaths= of a unit and its drop-ins (an empty value
    resets the list, as systemd does)."""
    state: list[Path] = []
    paths: list[Path] = []
    for file in files:
        for line in file.read_text(errors="replace").splitlines():
            key, _, value = line.strip().partition("=")
            if key == "StateDirectory":
                state = [Path("/var/lib") / v for v in value.split()] if value else []
            elif key == "ReadWritePaths":
                paths = (paths + [Path(v.lstrip("-+")) for v in value.split()]) if value else []
    return tuple(state + paths)


def sandbox_problems(config: Config, writable: tuple[Path, ...]) -> list[str]:
    """The folders the unit's sandbox would not let stowd write."""
    allowed = ", ".join(map(str, writable)) or "none"
    found = []
    for what, folder in folders(config):
        if any(folder.is_relative_to(h) for h in HIDDEN):
            found.append(f"{what} {folder}: hidden from the unit by ProtectHome=yes")
        elif not any(folder.is_relative_to(w) for w in writable):
            found.append(
                f"{what} {folder}: read-only under the unit (ProtectSystem=strict); "
                f"move it below one of its writable folders ({allowed}) or add it to "
                "ReadWritePaths= in a drop-in (systemctl edit stowd)"
            )
    return found
