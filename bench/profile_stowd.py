"""Where ``stowd run`` spends its time against the discarding endpoint: one cProfile per thread.

Usage (from the repository root)::

    .venv/bin/python bench/profile_stowd.py --files 5000 [--size 64KiB] [--workers 2] [--top 12]
    .venv/bin/python bench/profile_stowd.py --files 3000 --cpu     # CPU seconds, no profiler
    .venv/bin/python bench/profile_stowd.py --files 10000 --cpu --sql   # and of each statement
    .venv/bin/python bench/profile_stowd.py --files 20000 --cpu-profile --keep DIR  # CPU time
    .venv/bin/python bench/profile_stowd.py --files 10000 --cpu --cpu-core auto  # cpu: auto

Generates the files (as bench/throughput.py does), starts ``stowd run`` in a child process
whose every thread runs under its own ``cProfile.Profile``, moves the study folders into the
drop folder, waits until all are in sent/, stops stowd with SIGTERM and prints, per thread,
the functions with the most own time (waiting on locks included: a sender thread waiting for
the archive's answer shows as ``acquire``/``recv``).  The profiler slows stowd down about 2x;
compare shares, not absolute times.  Add ``--keep DIR`` to keep the .prof files.

``--cpu`` runs stowd without the profiler and prints CPU seconds (user + system) per 1,000
files: of the whole process (and its user and system parts, and its context switches per
file), and of each thread (``time.thread_time`` when it ends; the main thread's when
``stowd run`` returns); with ``--sql`` also the CPU seconds of each of the queue's statements
(on the thread that runs it, COMMIT's WAL write and fsync included).  ``--log-level INFO``
runs stowd at its default level (the benchmarks' config logs warnings only) and prints the
log lines per file.  CPU seconds, unlike wall time, hardly depend on
what else the machine runs, so runs before and after a change compare on a busy machine.
``--cpu-profile`` profiles with each thread's CPU clock (``time.thread_time``) instead of the
wall clock: own time is then CPU time (waits drop out; each call's profiler cost is added).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchlib import count_files, discard_process, stowd_env

# the file system calls ``--strace`` records
STRACED = "openat,openat2,newfstatat,fstat,statx,close,read,pread64,preadv2,ioctl,lseek,fcntl"


def profiled_child(config: str, out: str, timer: str = "wall") -> int:
    """Run ``stowd run -c config`` here with a profiler per thread; dump ``out.<thread>``
    (*timer* ``cpu``: each profiler counts its thread's CPU time, not wall time)."""
    from stowd.commands.cli import main  # noqa: PLC0415 - after the patch below would be fine too

    profiles: list[tuple[str, cProfile.Profile]] = []
    original = threading.Thread.run

    def new_profile() -> cProfile.Profile:
        return cProfile.Profile(time.thread_time) if timer == "cpu" else cProfile.Profile()

    def run(self: threading.Thread) -> None:
        profile = new_profile()
        profiles.append((self.name, profile))
        profile.enable()
        try:
            original(self)
        finally:
            profile.disable()

    threading.Thread.run = run  # type: ignore[method-assign]
    main_profile = new_profile()
    main_profile.enable()
    try:
        return main(["run", "-c", config])
    finally:
        main_profile.disable()
        for name, profile in [("main", main_profile), *profiles]:
            profile.dump_stats(f"{out}.{name}")


def cpu_child(config: str, out: str, sql: bool = False) -> int:
    """Run ``stowd run -c config`` here; write the CPU seconds of it and each thread to ``out``
    (*sql*: and of the queue's SQL statements, by statement)."""
    from stowd.commands.cli import main  # noqa: PLC0415 - the patched Thread.run is in place

    threads: dict[str, float] = {}
    statements: dict[str, list[float]] = {}
    if sql:
        _count_sql(statements)
    original = threading.Thread.run

    def run(self: threading.Thread) -> None:
        try:
            original(self)
        finally:
            threads[self.name] = threads.get(self.name, 0.0) + time.thread_time()

    threading.Thread.run = run  # type: ignore[method-assign]
    try:
        return main(["run", "-c", config])
    finally:
        threads["main"] = time.thread_time()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        process = usage.ru_utime + usage.ru_stime
        found: dict[str, Any] = {"process": process, "threads": threads, "sql": statements}
        found |= {"user": usage.ru_utime, "system": usage.ru_stime}
        found |= {"switches": usage.ru_nvcsw, "preempted": usage.ru_nivcsw}
        Path(out).write_text(json.dumps(found))


def _count_sql(statements: dict[str, list[float]]) -> None:
    """Count the calling thread's CPU seconds in each of the queue's ``execute`` and
    ``executemany`` calls (the statement's step included; COMMIT is where a transaction's
    WAL write and fsync are), by the statement's first 60 characters."""
    from stowd.pipeline.queue import sqlite as queue_sqlite  # noqa: PLC0415

    lock = threading.Lock()
    connection: Any = queue_sqlite._Connection  # the one seam every statement passes

    def counted(method: Any) -> Any:
        def call(self: Any, sql: str, *args: Any) -> Any:
            started = time.thread_time()
            try:
                return method(self, sql, *args)
            finally:
                key = " ".join(sql.split())[:60]
                with lock:
                    entry = statements.setdefault(key, [0, 0.0])
                    entry[0] += 1
                    entry[1] += time.thread_time() - started

        return call

    connection.execute = counted(connection.execute)
    connection.executemany = counted(connection.executemany)


def cpu_report(out: Path, files: int) -> None:
    found = json.loads(out.read_text())
    per = 1000 / files
    print(
        f"CPU seconds per 1,000 files: stowd process {found['process'] * per:.3f} "
        f"(user {found['user'] * per:.3f}, system {found['system'] * per:.3f}); context "
        f"switches per file {found['switches'] / files:.1f} waiting, "
        f"{found['preempted'] / files:.1f} preempted"
    )
    for name, seconds in sorted(found["threads"].items(), key=lambda item: -item[1]):
        print(f"  thread {name:<28} {seconds * per:.3f}")
    if found["sql"]:
        total = sum(seconds for _, seconds in found["sql"].values())
        print(f"  of which the queue's SQL (calls, CPU s per 1,000 files)    {total * per:.3f}")
        for key, (calls, seconds) in sorted(found["sql"].items(), key=lambda item: -item[1][1]):
            print(f"    {calls:>7} {seconds * per:.3f}  {key}")


def report(folder: Path, top: int) -> None:
    for path in sorted(folder.glob("stowd.prof.*")):
        stats: Any = pstats.Stats(str(path))
        print(f"\n===== thread {path.name.removeprefix('stowd.prof.')}")
        stats.sort_stats("tottime").print_stats(top)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return profiled_child(sys.argv[2], sys.argv[3], sys.argv[4])
    if len(sys.argv) > 1 and sys.argv[1] == "--cpu-child":
        return cpu_child(sys.argv[2], sys.argv[3], sql=sys.argv[4:] == ["sql"])
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--size", default="64KiB")
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--keep", type=Path, help="copy the .prof files into this folder")
    parser.add_argument(
        "--cpu", action="store_true", help="no profiler: CPU seconds per thread and process"
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        help="stowd's log_level (its default is INFO: a line per file sent; the log goes to "
        "stowd.log in the run's folder, as in bench/throughput.py)",
    )
    parser.add_argument(
        "--sql", action="store_true", help="with --cpu: and the CPU seconds of each SQL statement"
    )
    parser.add_argument(
        "--cpu-profile",
        action="store_true",
        help="profile each thread's CPU time (time.thread_time), not wall time",
    )
    parser.add_argument(
        "--cpu-core",
        metavar="VALUE",
        help="write cpu: VALUE into stowd's config (a core number or auto: every thread of "
        "stowd on that one core, docs/configuration.md); default: no cpu: key",
    )
    parser.add_argument(
        "--strace",
        type=Path,
        metavar="FILE",
        help="run stowd under strace -f, its file system calls written to FILE (slow: count "
        "the calls per file, do not time it)",
    )
    args = parser.parse_args()
    with discard_process() as endpoint:
        return profile(args, endpoint.url)


def _allowed_cpus(pid: int) -> str:
    """The CPUs every thread of ``pid`` may run on (``Cpus_allowed_list``), or a note of
    threads that differ."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:
            continue  # the thread ended
        found |= {
            line.split(":", 1)[1].strip()
            for line in status.splitlines()
            if line.startswith("Cpus_allowed_list:")
        }
    return " and ".join(sorted(found)) + (" (the threads differ)" if len(found) > 1 else "")


def stop(proc: subprocess.Popen[bytes], *, traced: bool) -> None:
    """Stop stowd, ``proc`` or (``traced``) strace's child: strace would kill it, without
    its report; strace slows it a lot."""
    if traced:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        for pid in children:
            os.kill(int(pid), signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    proc.wait(600 if traced else 60)


def profile(args: argparse.Namespace, url: str) -> int:
    # Here, not at the top: the child that runs stowd is this file too, and what throughput.py
    # imports (pydicom by dicomgen, httpx, Orthanc's helpers) was counted as stowd's start-up.
    from throughput import generate, stowd_config, wait_started  # noqa: PLC0415

    from stowd.config.yamlwalk import parse_size  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="stowd-profile-") as name:
        tmp = Path(name)
        total = generate(tmp / "stage", args.files, parse_size(args.size), args.studies)
        work = tmp / "work"
        work.mkdir()
        config = stowd_config(work, url, args.workers, 50)
        if args.log_level != "WARNING":  # the benchmarks' own config logs warnings only
            text = config.read_text().replace("log_level: WARNING", f"log_level: {args.log_level}")
            config.write_text(text)
        if args.cpu_core is not None:
            config.write_text(config.read_text() + f"cpu: {args.cpu_core}\n")
        for study in sorted((tmp / "stage").iterdir()):
            shutil.copytree(study, work / "incoming" / study.name, copy_function=os.link)
        out = tmp / ("cpu.json" if args.cpu else "stowd.prof")
        child = "--cpu-child" if args.cpu else "--child"
        command = [sys.executable, __file__, child, str(config), str(out)]
        if not args.cpu:
            command.append("cpu" if args.cpu_profile else "wall")
        elif args.sql:
            command.append("sql")
        if args.strace:
            command = ["strace", "-f", "-e", f"trace={STRACED}", "-o", str(args.strace), *command]
        log = (work / "stowd.log").open("wb")  # as bench/throughput.py runs it
        proc = subprocess.Popen(command, stderr=log, env=stowd_env(), cwd=work)
        log.close()  # the child has its own descriptor
        wait_started(work / "state" / "queue.db", proc)
        allowed = _allowed_cpus(proc.pid) if args.cpu_core is not None else None
        started = time.monotonic()
        for study in sorted((work / "incoming").iterdir()):
            study.rename(work / "drop" / study.name)
        while count_files(work / "sent") < total and proc.poll() is None:
            time.sleep(0.05)
        seconds = time.monotonic() - started
        stop(proc, traced=bool(args.strace))
        if args.cpu:
            print(f"{total} files of {args.size}: {total / seconds:.0f} files/s")
            if allowed is not None:
                print(f"  cpu: {args.cpu_core}: stowd's threads ran on CPUs {allowed}")
            cpu_report(out, total)
            with (work / "stowd.log").open("rb") as log_file:
                lines = sum(1 for _ in log_file)
            print(f"  log lines (log_level {args.log_level}) per file {lines / total:.2f}")
            return 0
        print(f"{total} files of {args.size}: {total / seconds:.0f} files/s under the profiler")
        report(tmp, args.top)
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            for path in tmp.glob("stowd.prof.*"):
                shutil.copy(path, args.keep / path.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
