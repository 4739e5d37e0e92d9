"""Other filesystems for tests: a small tmpfs (a disk that fills up, or ``sent/`` on another
filesystem than the drop folder) and a read-only bind mount (chmod does not stop root).

Mounting needs root.  Without it a test that mounts is skipped, except under ``CI=true``
(CI runs as root), where it fails: CI never skips what it cannot do.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def require_root() -> None:
    """Skip the calling test without root; fail it instead under ``CI=true``."""
    if os.geteuid() == 0:
        return
    if os.environ.get("CI") == "true":
        pytest.fail("CI=true but the tests do not run as root (needed to mount)", pytrace=False)
    pytest.skip("mounting needs root")


@contextmanager
def tmpfs(folder: Path, size: str = "4m") -> Iterator[Path]:
    """A tmpfs of ``size`` at ``folder`` (made if missing), unmounted afterwards.  4 MiB is
    well above ``disk.FULL_BELOW``, so that a freed tmpfs no longer counts as full."""
    require_root()
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """``folder`` as a read-only bind mount of itself."""
    require_root()
    subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
        yield
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(folder: Path) -> Path:
    """Write a file into ``folder`` until its filesystem has not one byte left."""
    filler = folder / ".filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    st = os.statvfs(folder)
    assert st.f_bavail == 0
    return filler
