"""``cpu:`` (issue 19): every thread of stowd on one core.

One stowd process runs its Python threads one at a time (the GIL).  Spread over cores by the
kernel, they hand the GIL across cores at every system call; on one core the hand-over is a
switch on the same core (measured: a third less CPU per file, 9 voluntary context switches per
file down to 1).  Opt-in: without ``cpu:`` the kernel decides, as before.

The mask is set on every task of the process (``/proc/self/task``), so that threads started
before it are moved too; threads started after it inherit their creator's mask.  The cores
the process may use are those it started with (``os.sched_getaffinity``: systemd's
``CPUAffinity=``, a cpuset); removing the key at a reload gives that start mask back.  A
kernel that refuses (EPERM under a seccomp filter, EINVAL) leaves stowd unpinned, with a
warning: pinning is a speed-up, never a reason to stop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Collection
from pathlib import Path

from stowd.config.model import Config, Cpu
from stowd.errors import ConfigError, ConfigProblem

log = logging.getLogger("stowd")

TASKS = Path("/proc/self/task")
STAT = Path("/proc/stat")
SAMPLE = 0.1  # seconds between the two reads of /proc/stat for ``cpu: auto``


def cores_text(cores: Collection[int]) -> str:
    """``0-3,6``: cores as ``Cpus_allowed_list`` and ``taskset -c`` write them."""
    runs: list[list[int]] = []
    for core in sorted(cores):
        if runs and core == runs[-1][1] + 1:
            runs[-1][1] = core
        else:
            runs.append([core, core])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


class Pinning:
    """The process's CPU mask as ``cpu:`` asks, from start through reloads."""

    def __init__(self) -> None:
        self.start = frozenset(os.sched_getaffinity(0))  # what the process may use
        self.cpu: Cpu | None = None  # as applied (None: the start mask)

    def check(self, config: Config) -> None:
        """ConfigError when ``cpu:`` names a core this process may not use."""
        cpu = config.cpu
        if cpu is None or cpu.core is None or cpu.core in self.start:
            return
        message = (
            f"CPU {cpu.core} is not one stowd may use here (allowed: {cores_text(self.start)}, "
            "the cores this process started with: systemd's CPUAffinity=, a cpuset or taskset)"
        )
        raise ConfigError(str(config.path), [ConfigProblem("cpu", message, cpu.line)])

    def apply(self, config: Config) -> None:
        """Pin every thread as ``config.cpu`` says, when that changed (``check`` first)."""
        cpu = config.cpu
        if cpu == self.cpu:
            return
        allowed = cores_text(self.start)
        if cpu is None:
            mask = self.start
            said = f"stowd's threads run on CPUs {allowed} again, as at start (no cpu: key)"
        else:
            core = least_busy(self.start) if cpu.core is None else cpu.core
            mask = frozenset({core})
            said = f"stowd's threads run on CPU {core} (cpu: {cpu.shown()}, of {allowed})"
        try:
            pin_tasks(mask)
        except OSError as exc:
            log.warning(
                "cannot set stowd's threads' CPUs (cpu: %s): %s; running unpinned, on CPUs %s",
                "removed" if cpu is None else cpu.shown(),
                exc.strerror or exc,
                allowed,
            )
            with contextlib.suppress(OSError):  # refused as well: the threads keep theirs
                pin_tasks(self.start)
            self.cpu = None
            return
        self.cpu = cpu
        log.info("%s", said)


def pin_at_start(config: Config) -> Pinning:
    """``stowd run`` and ``stowd migrate``, before their threads start: ConfigError when the
    core is not allowed, else the threads pinned (or a warning)."""
    pinning = Pinning()
    pinning.check(config)
    pinning.apply(config)
    return pinning


def pin_tasks(mask: Collection[int]) -> None:
    """Set ``mask`` on every task of this process; a task that ended meanwhile is skipped,
    one started meanwhile is found by the next listing (until a listing finds none new)."""
    done: set[int] = set()
    while True:
        tids = {int(name) for name in os.listdir(TASKS)} - done
        if not tids:
            return
        for tid in tids:
            with contextlib.suppress(ProcessLookupError):  # the thread ended meanwhile
                os.sched_setaffinity(tid, mask)
        done |= tids


def least_busy(allowed: Collection[int]) -> int:
    """The allowed core that was least busy over ``SAMPLE`` seconds (two reads of
    /proc/stat); among equals the highest-numbered one, as interrupts often land on core 0.
    Unreadable: the highest-numbered allowed core."""
    first = _busy_times()
    time.sleep(SAMPLE)
    second = _busy_times()
    highest_first = sorted(allowed, reverse=True)
    return min(highest_first, key=lambda core: second.get(core, 0) - first.get(core, 0))


def _busy_times() -> dict[int, int]:
    """Each core's busy time so far (clock ticks): all but idle and iowait."""
    try:
        text = STAT.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError):
        return {}
    busy: dict[int, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or not name[3:].isdigit():
            continue
        # user nice system idle iowait irq softirq steal (guest is counted in user)
        ticks = [int(field) for field in rest.split()[:8]]
        busy[int(name[3:])] = sum(ticks) - sum(ticks[3:5])
    return busy
