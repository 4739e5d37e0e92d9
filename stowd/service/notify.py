"""systemd's notification protocol (sd_notify) without libsystemd.

``NOTIFY_SOCKET`` names an ``AF_UNIX`` datagram socket (a path, or ``@name`` for the abstract
namespace); each message is ``KEY=value`` lines. ``WATCHDOG_USEC`` (for our ``WATCHDOG_PID``)
says how often systemd expects ``WATCHDOG=1``: we send it three times per period, and only while
the daemon is healthy (``daemon.py`` decides). Without ``NOTIFY_SOCKET`` every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("stowd.notify")

STATUS_LIMIT = 200  # characters of STATUS= (systemctl status shows one line)


class Notifier:
    """Sends state changes to systemd; failures are logged once and never raise."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_period = int(usec) / 1e6 if usec.isdigit() and mine else None
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    @property
    def watchdog_interval(self) -> float | None:
        """How often to send WATCHDOG=1 (a third of systemd's period); None: no watchdog."""
        return None if self.watchdog_period is None else self.watchdog_period / 3

    def ready(self, status: str) -> None:
        self.send(READY="1", STATUS=status)

    def status(self, text: str) -> None:
        self.send(STATUS=text)

    def watchdog(self) -> None:
        self.send(WATCHDOG="1")

    def reloading(self) -> None:
        monotonic = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send(RELOADING="1", MONOTONIC_USEC=str(monotonic), STATUS="reloading the config")

    def stopping(self) -> None:
        self.send(STOPPING="1", STATUS="stopping: letting uploads in flight finish")

    def send(self, **fields: str) -> None:
        if not self.address:
            return
        lines = [f"{key}={_one_line(value)}" for key, value in fields.items()]
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            if not self._warned:
                log.warning("cannot notify systemd at NOTIFY_SOCKET: %s", exc)
                self._warned = True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(value: str) -> str:
    text = " ".join(value.split())
    return text[:STATUS_LIMIT]
