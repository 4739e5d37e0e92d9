"""A copy-on-write view of this machine's system folders, for installing a package for real
without touching the machine (needs root and overlayfs).

Each ``Sandbox.run`` starts the command in a private mount and PID namespace (``unshare``)
whose /etc, /usr, /var, /opt, /srv and /home are overlays: the machine's folders below,
``upper/<folder>`` above.  apt, dpkg, adduser and the package's scripts work as usual, but what
they write lands in ``upper/`` only; other processes (other tests running meanwhile) never see
it, and removing ``upper/`` undoes everything.  Successive runs share ``upper/``, so an install,
a check and a purge can be separate commands.  What ``upper/`` holds after a purge is exactly
what the package left behind.  /tmp, /run and /root are the machine's own, except that
/run/systemd is an empty folder: the machine's systemd, if it runs one, is out of reach.

The command line, for trying a guide by hand: ``python tests/support/sandbox.py DIR [CMD...]``
(default CMD: bash) runs CMD in the view kept in DIR.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FOLDERS = ("etc", "usr", "var", "opt", "srv", "home")

# Runs inside the namespace: mount each overlay, then the command.  "private" propagation keeps
# the mounts from reaching the machine's namespace.
_MOUNT = f"""
set -e
base=$1; shift
for folder in {" ".join(FOLDERS)}; do
    mkdir -p "$base/$folder" "$base/.work/$folder"
    mount -t overlay overlay \
        -o "lowerdir=/$folder,upperdir=$base/$folder,workdir=$base/.work/$folder" "/$folder"
done
# The machine's systemd, if it runs one, stays out of reach: without /run/systemd the
# package's scripts and systemctl see a system without a running systemd (as in a container)
# and work on the view's unit files, instead of asking the machine's manager, which knows
# nothing of the view (`systemctl enable stowd` would fail, daemon-reload reload the machine).
if [ -d /run/systemd ]; then
    mount -t tmpfs -o mode=0755 tmpfs /run/systemd
fi
exec "$@"
"""


def unavailable() -> str | None:
    """Why a sandbox cannot run here, or None."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("unshare") is None:
        return "unshare is missing (Debian package util-linux)"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlayfs"
    upper = Path(tempfile.mkdtemp(prefix="stowd-sandbox-probe-"))
    try:
        probe = Sandbox(upper).run("true", timeout=60)
    finally:
        shutil.rmtree(upper, ignore_errors=True)
    if probe.returncode != 0:
        return f"cannot mount the overlays: {probe.stderr.strip()}"
    return None


class Sandbox:
    """The view kept in ``upper`` (made if missing)."""

    def __init__(self, upper: Path) -> None:
        self.upper = upper
        upper.mkdir(parents=True, exist_ok=True)

    def command(self, *args: str) -> list[str]:
        """The command line that runs ``args`` in the view."""
        # A PID namespace of its own (--pid --fork --mount-proc): the view's processes see only
        # each other (the purge's search for processes of stowd does not find those of another
        # view or of the machine with the same uid), and every process a run leaves behind (a
        # daemon started with &) ends with it; --kill-child ends them when unshare is killed
        # (subprocess.run's timeout).
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            "--",
            "/bin/sh",
            "-c",
            _MOUNT,
            "sandbox",
            str(self.upper),
            *args,
        ]

    def run(
        self, *args: str, timeout: float, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``args`` run in the view, its output captured; never raises on an exit code."""
        return subprocess.run(
            self.command(*args),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, **(env or {})},
        )

    def left(self, folder: str) -> list[str]:
        """Every path written in the view below ``/folder``, relative to /."""
        top = self.upper / folder
        return sorted(str(Path("/") / path.relative_to(self.upper)) for path in top.rglob("*"))


if __name__ == "__main__":
    kept = Sandbox(Path(sys.argv[1]).resolve())
    os.execvp("unshare", kept.command(*(sys.argv[2:] or ["bash"])))
