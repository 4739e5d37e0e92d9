"""What a test leaves behind: child processes never waited for, objects never closed.

conftest's ``no_child_left`` fixture asks both after every test, so the test that leaked fails
rather than whichever test the garbage collector happens to run in later.
"""

from __future__ import annotations

import gc
import os
import sys


def collected() -> list[str]:
    """What a garbage collection reports as unraisable (``Popen.__del__``'s warning, an
    unclosed file), caught here to be said under the test that runs, not left to pytest's
    hook, which a failure in a fixture's teardown would keep until the next test."""
    caught: list[str] = []

    def hook(unraisable: sys.UnraisableHookArgs) -> None:
        what = unraisable.err_msg or "Exception ignored in"
        caught.append(f"{what}: {unraisable.object!r}: {unraisable.exc_value!r}")

    previous, sys.unraisablehook = sys.unraisablehook, hook
    try:
        gc.collect()
    finally:
        sys.unraisablehook = previous
    return caught


def children() -> dict[str, str]:
    """``pid (name) state`` of each child process of this one by its pid, from /proc (state
    ``Z``: a zombie, a child that exited and was never waited for)."""
    found = {}
    me = os.getpid()
    with os.scandir("/proc") as listing:
        pids = [entry.name for entry in listing if entry.name.isdigit()]
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as stat_file:
                line = stat_file.read()
        except OSError:
            continue  # gone meanwhile
        name, _, rest = line.partition(" (")[2].rpartition(") ")
        fields = rest.split()
        if len(fields) > 1 and fields[1] == str(me):
            found[pid] = f"{pid} ({name}) {fields[0]}"
    return found


def reap_zombies() -> list[str]:
    """Each child that exited and was never waited for (a zombie), said and then reaped, so
    that the next test starts clean.  Cheap (no /proc walk): asked after every test."""
    found: list[str] = []
    while True:
        try:
            dead = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return found  # no children at all
        if dead is None:
            return found
        found.append(children().get(str(dead.si_pid), f"{dead.si_pid} (exited)"))
        os.waitpid(dead.si_pid, 0)
