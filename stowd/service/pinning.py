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

from stowd.config.load import cores_text, process_cores
from stowd.config.model import Config, Cpu

log = logging.getLogger("stowd")

TASKS = Path("/proc/self/task")
STAT = Path("/proc/stat")
SAMPLE = 0.1  # seconds between the two reads of /proc/stat for ``cpu: auto``


class Pinning:
    """The process's CPU mask as ``cpu:`` asks, from start through reloads."""

    def __init__(self) -> None:
        self.start = process_cores()  # what the process may use (a reload's loader judges by it)
        self.cpu: Cpu | None = None  # as applied (None: the start mask)
        self.mask: frozenset[int] | None = None  # the one core applied (None: unpinned)

    def apply(self, config: Config) -> None:
        """Pin every thread as ``config.cpu`` says, when that changed, or when the threads'
        mask is no longer the one applied (the core went offline; ``taskset -a -p``)."""
        cpu = config.cpu
        if cpu == self.cpu and (self.mask is None or self._kept()):
            return
        if self.start is None:  # the kernel would not say which: nothing to pin within
            log.warning("cannot read which CPUs stowd may use; cpu: ignored, running unpinned")
            self.cpu, self.mask = cpu, None
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
                _reason(exc),
                allowed,
            )
            with contextlib.suppress(OSError):  # refused as well: the threads keep theirs
                pin_tasks(self.start)
            self.cpu, self.mask = None, None
            return
        self.cpu, self.mask = cpu, (None if cpu is None else mask)
        log.info("%s", said)

    def _kept(self) -> bool:
        """Every thread still has the mask applied."""
        try:
            tids = [int(name) for name in os.listdir(TASKS)]
        except OSError:
            return True  # cannot tell: leave it
        for tid in tids:
            try:
                if frozenset(os.sched_getaffinity(tid)) != self.mask:
                    return False
            except OSError:
                continue  # the thread ended meanwhile
        return True


def _reason(exc: OSError) -> str:
    """The error, with the path it concerns (``/proc/self/task`` missing says which)."""
    reason = exc.strerror or str(exc)
    return f"{reason}: {exc.filename}" if exc.filename else reason


def pin_at_start(config: Config) -> Pinning:
    """``stowd run`` and ``stowd migrate``, before their threads start: the threads pinned
    (or a warning); the loader has judged the core against the cores the process has."""
    pinning = Pinning()
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
    if len(allowed) == 1:
        return next(iter(allowed))
    first = _busy_times()
    time.sleep(SAMPLE)
    second = _busy_times()
    online = [core for core in allowed if core in first and core in second]  # not offline
    highest_first = sorted(online or allowed, reverse=True)
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
