"""The leak net conftest runs after every test (``leaks.py``): a child never waited for and a
``Popen`` dropped unreaped are found under the test that left them."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from harness import wait_for
from leaks import children, collected, reap_zombies

QUIET = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_a_killed_child_is_found_until_it_is_waited_for() -> None:
    proc = subprocess.Popen(QUIET)
    try:
        assert str(proc.pid) in children()
        proc.kill()  # and not waited for: a zombie
        wait_for(lambda: children().get(str(proc.pid), "").endswith(" Z"), 30, "a zombie")
    finally:
        proc.kill()
        proc.wait(30)
    assert str(proc.pid) not in children()


def test_a_popen_dropped_in_a_cycle_is_said_by_the_collection() -> None:
    proc = subprocess.Popen(QUIET)
    pid = proc.pid
    proc.kill()
    cycle: dict[str, Any] = {"proc": proc}
    cycle["self"] = cycle
    del proc, cycle  # only the garbage collector finds it now
    said = collected()
    assert any(f"subprocess {pid} is still running" in line for line in said), said
    # the warning, an error here (filterwarnings), cut __del__ short before it handed the
    # child to subprocess's own reaping: it is waited for here, or never
    os.waitpid(pid, 0)
    assert str(pid) not in children()


def test_a_zombie_is_said_and_reaped_so_the_next_test_starts_clean() -> None:
    proc = subprocess.Popen(QUIET)
    try:
        proc.kill()  # and not waited for
        wait_for(lambda: children().get(str(proc.pid), "").endswith(" Z"), 30, "a zombie")
        (said,) = reap_zombies()
        assert said.startswith(f"{proc.pid} (") and said.endswith(" Z"), said
        assert reap_zombies() == []
    finally:
        proc.kill()
        proc.wait(30)  # the Popen copes with a child reaped by another
