"""``stowd check-config --connect`` for receiving sources: can each one listen on its port?

One block per receiving source::

    receiving source ct: STOWD on 127.0.0.1:11112: can listen
      ok    listen   127.0.0.1:11112 is free (bound and released at once)

The address is bound as the daemon binds it (``SO_REUSEADDR``, as pynetdicom does, then
``listen``) and closed at once, so nothing is left holding the port.  When the port is taken,
``/proc`` tells which process listens there: the daemon that holds this queue (its pid is in
the queue's lock file) is stowd's own receiver, not a problem; anything else is named.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from stowd.commands.connect import FAIL, NOTE, OK
from stowd.config.model import Receive, Source
from stowd.config.yamlwalk import host_port
from stowd.printable import escape_lines
from stowd.service.status import daemon_pid

PRIVILEGED_BELOW = 1024  # ports below this need root or CAP_NET_BIND_SERVICE (Linux default)
UNPRIVILEGED_START = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")  # where it is set
COMMON_PORT = 11112  # the usual DICOM port above 1024
LISTEN_STATE = "0A"  # TCP_LISTEN in /proc/net/tcp
_PROC = Path("/proc")


@dataclass(frozen=True)
class ListenReport:
    """Whether one receiving source can listen where its config says."""

    source: str
    ae_title: str
    where: str  # 127.0.0.1:11112, [::1]:11112
    state: str  # OK, FAIL or NOTE (OK, with something to know)
    text: str

    @property
    def ok(self) -> bool:
        return self.state != FAIL


def check(source: Source, queue: Path) -> ListenReport:
    """Bind ``source``'s address and port and release them; say what stopped it if it could
    not, and whose the port is if it is taken."""
    assert source.receive is not None
    settings = source.receive
    where = host_port(settings.bind, settings.port)
    error = try_listen(settings.bind, settings.port)
    if error is None:
        state, text = _free(settings, where)
    else:
        state, text = _taken(error, settings, where, queue)
    return ListenReport(source.name, settings.ae_title, where, state, text)


def render(reports: list[ListenReport]) -> str:
    """The blocks for humans."""
    blocks = []
    for r in reports:
        verdict = "can listen" if r.ok else "can NOT listen"
        lines = [f"receiving source {r.source}: {r.ae_title} on {r.where}: {verdict}"]
        lines.append(f"  {r.state:<5} {'listen':<8} {r.text}")
        blocks.append(escape_lines(lines))
    return "\n\n".join(blocks)


def try_listen(bind: str, port: int) -> OSError | None:
    """Listen on ``bind``:``port`` as the daemon would and close at once; the error if not."""
    v6 = ipaddress.ip_address(bind).version == 6
    with socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((bind, port))
            sock.listen(1)
        except OSError as exc:
            return exc
    return None


def _free(settings: Receive, where: str) -> tuple[str, str]:
    text = f"{where} is free (bound and released at once)"
    if settings.port < privileged_below() and os.geteuid() == 0:
        return NOTE, (
            f"{text}, but as root: the daemon, when it runs as another user (the systemd "
            f"unit's stowd), needs CAP_NET_BIND_SERVICE for port {settings.port} "
            "(see docs/receiving.md)"
        )
    return OK, text


def _taken(error: OSError, settings: Receive, where: str, queue: Path) -> tuple[str, str]:
    port = settings.port
    if error.errno == errno.EACCES and port < privileged_below():
        return FAIL, (
            f"port {port} needs root or CAP_NET_BIND_SERVICE: grant it to the daemon (a "
            f"systemd drop-in, see docs/receiving.md) or use a port of {PRIVILEGED_BELOW} or "
            f"above, such as {COMMON_PORT}"
        )
    if error.errno == errno.EADDRNOTAVAIL:
        return FAIL, (
            f"{settings.bind}: no such address on this machine (bind must be one of its own "
            "addresses, such as 127.0.0.1, or 0.0.0.0 for all of them)"
        )
    if error.errno == errno.EADDRINUSE:
        return _in_use(where, port, queue)
    return FAIL, f"{where}: {_os_text(error)}"


def privileged_below() -> int:
    """The first port anyone may bind: 1024, unless the machine's sysctl lowered it."""
    try:
        return int(UNPRIVILEGED_START.read_text())
    except (OSError, ValueError):
        return PRIVILEGED_BELOW


def _in_use(where: str, port: int, queue: Path) -> tuple[str, str]:
    ours = daemon_pid(queue)
    holder = listener_of(port)
    if ours is not None and holder is not None and holder[0] == ours:
        return OK, f"{where} is stowd's own: the daemon (pid {ours}) on this queue listens there"
    if holder is not None:
        return FAIL, f"{where} is in use by another program ({holder[1]}, pid {holder[0]})"
    if ours is not None:  # the listener could not be seen (another user's process)
        return NOTE, (
            f"{where} is in use; stowd's daemon (pid {ours}) runs on this queue and is "
            "probably the one listening (run as root to see which program holds the port)"
        )
    return FAIL, f"{where} is in use by another program"


def listener_of(port: int) -> tuple[int, str] | None:
    """The pid and name of a process listening on TCP ``port`` (any address), if /proc shows
    one this user may see."""
    inodes = _listening_inodes(port)
    if not inodes:
        return None
    for entry in _PROC.iterdir():
        if entry.name.isdigit() and _holds(entry, inodes):
            return int(entry.name), _name(entry)
    return None


def _listening_inodes(port: int) -> set[str]:
    found: set[str] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (_PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == LISTEN_STATE and int(local.rsplit(":", 1)[1], 16) == port:
                found.add(f"socket:[{inode}]")
    return found


def _holds(process: Path, inodes: set[str]) -> bool:
    try:
        fds = list((process / "fd").iterdir())
    except OSError:
        return False  # gone, or another user's
    for fd in fds:
        try:
            if os.readlink(fd) in inodes:
                return True
        except OSError:
            continue
    return False


def _name(process: Path) -> str:
    try:
        return (process / "comm").read_text().strip() or "?"
    except OSError:
        return "?"


def _os_text(exc: OSError) -> str:
    text = exc.strerror or str(exc) or type(exc).__name__
    return text[:1].lower() + text[1:]
