"""The command line: ``stowd run | check-config | status | dry-run | explain | retry | purge |
migrate``.

Exit codes: 0 ok, 1 runtime error, 2 usage or configuration error, 75 (EX_TEMPFAIL of
sysexits.h: try again later) when ``run`` or ``migrate`` finds the queue in use by another
stowd, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from stowd import __version__
from stowd.config.load import load_config, process_cores
from stowd.config.model import Config, Source
from stowd.config.schedule import local_now, window_note
from stowd.config.yamlwalk import host_port, parse_duration
from stowd.errors import ConfigError, MigrationConflict, QueueLockedError, StowdError
from stowd.printable import escape_lines, is_utf8
from stowd.service import logs
from stowd.service.status import daemon_pid, gather, render

if TYPE_CHECKING:
    from stowd.commands import listen, writable

# Each command imports what only it needs when it runs (PLC0415 below): the daemon (watchdog,
# the workers) is not loaded for ``status``, nor the other commands for ``run`` (issue 19).

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_QUEUE_BUSY = 75  # EX_TEMPFAIL: another stowd holds the queue; try again later
EXIT_READER_GONE = 128 + signal.SIGPIPE  # 141, as a C tool ended by SIGPIPE
DEFAULT_CONFIG = "/etc/stowd/config.yaml"
# Commands that never look into the config's watch folders: status must work while one is
# missing (it is what says so); migrate walks only its SRC folders, and a machine that only
# migrates has no drop folder to watch.
_NO_WATCHING = frozenset({"status", "migrate"})
# the commands that pin their threads as ``cpu:`` says, and check-config, which judges it
_PINNING = frozenset({"run", "migrate", "check-config"})

log = logging.getLogger("stowd")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stowd",
        description="Watch drop folders and upload what lands there to a DICOMweb archive "
        "with STOW-RS.",
    )
    parser.add_argument("--version", action="version", version=f"stowd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the daemon in the foreground (logs to stderr)")
    check = sub.add_parser("check-config", help="validate the configuration, list every problem")
    check.add_argument(
        "--connect",
        action="store_true",
        help="also reach each destination (TCP, TLS, login, a QIDO-RS query) and say what "
        "works; exit code 1 when any does not",
    )
    check.add_argument(
        "--user",
        metavar="NAME",
        help="check that this user can write the queue's, watch, sent and failed folders "
        "(default: the current user; as root, the unit's user stowd when it exists)",
    )
    status = sub.add_parser("status", help="show the queue: counts, age, rate, last errors")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--queue",
        metavar="PATH",
        help="read this queue database instead of the config's queue (such as a migration's "
        "own queue, stowd migrate --queue PATH)",
    )
    dry = sub.add_parser(
        "dry-run", help="show what would be sent or fail now; sends, moves and queues nothing"
    )
    dry.add_argument("--json", action="store_true", help="machine-readable output")
    why = sub.add_parser(
        "explain", help="show which rules match FILEs and what they change; sends nothing"
    )
    why.add_argument("files", nargs="+", metavar="FILE", help="files to explain")
    why.add_argument("--source", help="explain as if the files were in this source's folder")
    why.add_argument("--json", action="store_true", help="machine-readable output")
    again = sub.add_parser("retry", help="put files from failed/ back into the watch folders")
    again.add_argument("--source", help="only this source's failed/ folder")
    again.add_argument("--reason", help="only files whose error reason contains TEXT (any case)")
    again.add_argument("--since", help="only files that failed since T (2h, 3d, or a date/time)")
    again.add_argument("--dry-run", action="store_true", help="list, move nothing")
    purge = sub.add_parser("purge", help="delete from sent/ what has been there too long")
    purge.add_argument("--sent-older-than", required=True, metavar="AGE", help="such as 30d")
    purge.add_argument("--source", help="only this source's sent/ folder")
    purge.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    mig = sub.add_parser(
        "migrate",
        help="upload existing folder trees once (an old archive) through the queue, then exit",
    )
    mig.add_argument("folders", nargs="+", metavar="SRC", help="folders to upload, recursively")
    mig.add_argument("--destination", required=True, metavar="NAME", help="a destination")
    mig.add_argument(
        "--keep",
        action="store_true",
        help="leave the files where they are (read-only archives); without it stored files "
        "go to SRC.sent/ and failed ones to SRC.failed/ beside SRC",
    )
    mig.add_argument(
        "--verify",
        action="store_true",
        help="a stored file counts as stored only once the archive lists it (QIDO-RS), as "
        "the destination's verify: true; a file it does not list is sent again",
    )
    mig.add_argument(
        "--now",
        action="store_true",
        help="send at once, ignoring the destination's schedule (transfer windows) for this run",
    )
    mig.add_argument(
        "--report",
        metavar="FILE",
        help="list every file not stored or not moved (any run) in FILE.csv/.json",
    )
    mig.add_argument(
        "--queue",
        metavar="PATH",
        help="use this queue database instead of the config's queue (so a migration can run "
        "while the daemon runs on its own queue)",
    )
    mig.add_argument(
        "--progress-every",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="a progress line this often when not on a terminal (default 10)",
    )
    mig.add_argument(
        "--log-level",
        default="WARNING",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="log level on stderr (WARNING: problems only)",
    )
    for p in (run, check, status, dry, why, again, purge, mig):
        p.add_argument(
            "-c", "--config", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})"
        )
    run.add_argument("--log-level", help="override log_level from the config")
    run.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        default="auto",
        help="text, journal (syslog priorities, no time stamps) or json; auto: journal under "
        "systemd's journald, else text",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cores = process_cores() if args.command in _PINNING else None
        config = load_config(
            args.config, watch_exists=args.command not in _NO_WATCHING, cores=cores
        )
        code = _COMMANDS[args.command](config, args)
        sys.stdout.flush()  # here, where a closed pipe can still be caught
        return code
    except BrokenPipeError:
        return _reader_gone()
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_USAGE
    except StowdError as exc:
        print(f"stowd: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _reader_gone() -> int:
    """Whoever read stdout stopped early (``stowd status | head``): end quietly, without
    a traceback, and point stdout at /dev/null so that Python's own flush at exit does not
    meet the closed pipe again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_READER_GONE


def _run(config: Config, args: argparse.Namespace) -> int:
    from stowd.service.daemon import Daemon  # noqa: PLC0415
    from stowd.service.pinning import pin_at_start  # noqa: PLC0415

    logs.setup(args.log_level or config.log_level, args.log_format)
    pinning = pin_at_start(config)  # before the daemon's threads (they inherit the mask)
    daemon = Daemon(config, pinning=pinning)
    daemon.install_signals()
    try:
        daemon.run()
    except QueueLockedError as exc:
        # systemd restarts on 75 as on 1 (not in RestartPreventExitStatus): the daemon
        # comes back once the migration that holds its queue is done
        print(f"stowd: {exc}; start stowd again once that one has finished", file=sys.stderr)
        return EXIT_QUEUE_BUSY
    return EXIT_INTERRUPTED if daemon.last_signal == signal.SIGINT else EXIT_OK


def _input(source: Source) -> str:
    """Where a source's files come from: its watch folder, or its C-STORE receiver."""
    r = source.receive
    if r is None:
        return str(source.watch)
    allow = ", ".join(a.ae_title + (f"@{a.host}" if a.host else "") for a in r.allow) or "any AE"
    where = host_port(r.bind, r.port)
    return f"C-STORE to {r.ae_title} at {where} from {allow} (files in {source.watch})"


def _check(config: Config, args: argparse.Namespace) -> int:
    from stowd.commands import connect, writable  # noqa: PLC0415

    try:
        user = (
            writable.default_user()
            if args.user is None
            else writable.User.named(args.user, "--user")
        )
    except KeyError:
        print(f"stowd: --user: no user named {args.user!r} on this machine", file=sys.stderr)
        return EXIT_USAGE
    lines = [f"{config.path}: configuration is valid"]
    for source in config.sources:
        dest = config.destination_of(source)
        lines.append(
            f"  source {source.name}: {_input(source)} -> {dest.name} ({dest.display_url})"
        )
        lines.append(f"    sent: {source.sent}  failed: {source.failed}")
    lines += _schedule_lines(config)
    lines.append(f"  queue: {config.queue_shown()}")
    rules = len(config.rules) + sum(len(s.rules) for s in config.sources)
    lines.append(
        f"  metadata rules: {rules} (run 'stowd explain FILE' to see what they do to a file)"
    )
    lines += [f"WARNING: {warning}" for warning in config.warnings]
    lines += _write_lines(config, user)
    print(escape_lines(lines))  # folder names may hold anything a file system allows
    if not args.connect:
        return EXIT_OK
    reports = []
    for dest in config.destinations.values():
        reports.append(connect.check(dest))
        print(f"\n{connect.render(reports[-1:])}", flush=True)
    working = sum(r.ok for r in reports)
    print(f"\n{working} of {len(reports)} destination(s) work")
    ports = _check_ports(config)
    working_all = all(r.ok for r in reports) and all(p.ok for p in ports)
    return EXIT_OK if working_all else EXIT_RUNTIME


def _schedule_lines(config: Config) -> list[str]:
    """Each destination's transfer windows: open or closed now, and the next window (only
    when a destination has a schedule: otherwise every one sends at any time)."""
    if all(d.schedule.always for d in config.destinations.values()):
        return []
    now = local_now()
    lines = ["  transfer windows (schedule, local time):"]
    for dest in config.destinations.values():
        windows = ", ".join(w.text for w in dest.schedule.windows)
        told = f"{windows}: " if windows else ""
        if dest.schedule.always:
            told += "at any time (no schedule)"
        else:
            told += window_note(dest.schedule, now)
        lines.append(f"    {dest.name}: {told}")
    return lines


def _write_lines(config: Config, user: writable.User) -> list[str]:
    """Whether ``user`` can write every folder, and whether the unit's sandbox lets it."""
    from stowd.commands import writable  # noqa: PLC0415

    found = writable.problems(config, user)
    lines = [f"  write access as user {user.name} ({user.why}): " + ("NOT ok" if found else "ok")]
    lines += [f"WARNING: not writable by {user.name}: {problem}" for problem in found]
    paths, where = writable.unit_writable()
    lines += [
        f"WARNING: under {where}: {problem}" for problem in writable.sandbox_problems(config, paths)
    ]
    return lines


def _check_ports(config: Config) -> list[listen.ListenReport]:
    """Whether each receiving source can listen on its port (after the destinations)."""
    from stowd.commands import listen  # noqa: PLC0415

    reports = []
    for source in config.sources:
        if source.receive is not None:
            reports.append(listen.check(source, config.queue))
            print(f"\n{listen.render(reports[-1:])}", flush=True)
    if reports:
        working = sum(r.ok for r in reports)
        print(f"\n{working} of {len(reports)} receiving source(s) can listen")
    return reports


def _own_queue(config: Config, path: str | None) -> Config:
    """``config`` with the queue ``--queue PATH`` names, if given."""
    if path is None:
        return config
    return dataclasses.replace(config, queue=Path(os.path.abspath(path)))


def _status(config: Config, args: argparse.Namespace) -> int:
    data = gather(_own_queue(config, args.queue))
    print(json.dumps(data, indent=2) if args.json else render(data))
    return EXIT_OK


def _dry_run(config: Config, args: argparse.Namespace) -> int:
    from stowd.commands import dryrun  # noqa: PLC0415

    plans = dryrun.plan_sources(config)
    if args.json:
        print(json.dumps([p.as_dict() for p in plans], indent=2))
    else:
        print(dryrun.render(plans))
    return EXIT_OK


def _explain(config: Config, args: argparse.Namespace) -> int:
    from stowd.commands import explain  # noqa: PLC0415

    if args.source is not None and args.source not in {s.name for s in config.sources}:
        print(f"stowd: no source named {args.source!r} in {config.path}", file=sys.stderr)
        return EXIT_USAGE
    results = explain.explain(config, args.files, args.source)
    if args.json:
        docs = [r.as_dict() for r in results]
        text = json.dumps(docs, indent=2, ensure_ascii=False)
        print(text if is_utf8(text) else json.dumps(docs, indent=2))  # a name not UTF-8
    else:
        print(explain.render(results))
    if any(r.error for r in results):
        return EXIT_USAGE
    return EXIT_RUNTIME if any(r.problem for r in results) else EXIT_OK


def _unknown_source(config: Config, name: str | None) -> bool:
    known = [s.name for s in config.sources]
    if name is None or name in known:
        return False
    print(f"stowd: no source named {name!r}; known: {', '.join(known)}", file=sys.stderr)
    return True


def _retry(config: Config, args: argparse.Namespace) -> int:
    from stowd.commands import putback  # noqa: PLC0415

    if _unknown_source(config, args.source):
        return EXIT_USAGE
    try:
        since = None if args.since is None else putback.parse_since(args.since, time.time())
    except ValueError as exc:
        print(f"stowd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    filters = putback.Filters(args.source, args.reason, since)
    report = putback.retry(config, filters, dry_run=args.dry_run)
    print(putback.render(report, daemon_pid(config.queue)))
    return EXIT_OK if report.ok else EXIT_RUNTIME


def _purge(config: Config, args: argparse.Namespace) -> int:
    try:
        age = parse_duration(args.sent_older_than)
        if age <= 0:
            raise ValueError("must be more than 0 seconds, such as 30d")
    except ValueError as exc:
        print(f"stowd: --sent-older-than: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if _unknown_source(config, args.source):
        return EXIT_USAGE
    from stowd.service.purge import purge_sent  # noqa: PLC0415

    errors, now, word = 0, time.time(), "would delete" if args.dry_run else "deleted"
    for source in config.sources:
        if args.source in (None, source.name):
            r = purge_sent(source, age, now, dry_run=args.dry_run)
            errors += len(r.errors)
            print(
                f"{source.name}: {word} {r.files} file(s), {r.bytes / 1e6:.1f} MB, and "
                f"{r.folders} empty folder(s) from {source.sent}"
                + (f"; {len(r.errors)} could not be deleted" if r.errors else "")
            )
    return EXIT_RUNTIME if errors else EXIT_OK


def _migrate(config: Config, args: argparse.Namespace) -> int:
    from stowd.commands import migrate, migreport  # noqa: PLC0415
    from stowd.service.pinning import pin_at_start  # noqa: PLC0415

    problem = _migrate_problem(config, args)
    if problem:
        print(f"stowd migrate: {problem}", file=sys.stderr)
        return EXIT_USAGE
    logs.setup(args.log_level, "text")
    pin_at_start(config)  # before the migration's threads (they inherit the mask)
    folders = tuple(Path(os.path.abspath(f)) for f in args.folders)
    tty = sys.stderr.isatty()
    if tty:
        logs.over_progress_bar()
    opts = migrate.Options(
        folders,
        args.destination,
        args.keep,
        args.progress_every,
        tty,
        verify=args.verify,
        now=args.now,
    )
    job = migrate.Migration(_own_queue(config, args.queue), opts)
    job.install_signals()
    try:
        summary = job.run()
    except MigrationConflict as exc:
        print(f"stowd migrate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except QueueLockedError as exc:
        print(
            f"stowd migrate: {exc}; to migrate while the daemon runs, give the migration a "
            "queue of its own with --queue PATH (such as /var/lib/stowd/migrate.db)",
            file=sys.stderr,
        )
        return EXIT_QUEUE_BUSY
    report = None if args.report is None else Path(args.report)
    if report is not None:
        migreport.write_report(report, summary.failures)
    print(migreport.render(summary, opts.folders, opts.keep, report))
    if summary.crashed:
        return EXIT_RUNTIME
    if summary.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_RUNTIME if summary.failures else EXIT_OK


def _migrate_problem(config: Config, args: argparse.Namespace) -> str | None:
    if args.destination not in config.destinations:
        known = ", ".join(config.destinations)
        return f"no destination named {args.destination!r} in {config.path}; known: {known}"
    folders = _folders_problem(args.folders, args.keep)
    if folders:
        return folders
    if args.progress_every <= 0:
        return "--progress-every must be more than 0 seconds"
    if args.report is not None and not args.report.lower().endswith((".csv", ".json")):
        return "--report must name a .csv or .json file"
    return None


def _folders_problem(folders: list[str], keep: bool) -> str | None:
    missing = [f for f in folders if not os.path.isdir(f)]
    if missing:
        return f"{missing[0]} is not a folder"
    if len(set(map(os.path.abspath, folders))) != len(folders):
        return "a folder is given twice"
    full = [os.path.abspath(f) for f in folders]
    for inner in full:
        outer = next((o for o in full if o != inner and inner.startswith(o + os.sep)), None)
        if outer is not None:
            return f"{inner} is inside {outer}: migrate {outer} alone"
    names = [os.path.basename(f) for f in full]
    if not keep and len(set(names)) != len(names):
        return "two folders have the same name (their .sent/.failed folders would mix)"
    return None if keep else _writable_problem(full)


def _writable_problem(folders: list[str]) -> str | None:
    """Without --keep, files move out of SRC into SRC.sent/SRC.failed beside it."""
    for folder in folders:
        beside = [folder + ".sent", folder + ".failed"]
        blocked = [b for b in beside if os.path.exists(b) and not os.path.isdir(b)]
        if (
            blocked
            or not os.access(folder, os.W_OK)
            or not os.access(os.path.dirname(folder), os.W_OK)
        ):
            return (
                f"cannot move files out of {folder} into {folder}.sent / {folder}.failed "
                "(read-only, or not a folder there?): use --keep to leave the files in place"
            )
    return None


_COMMANDS = {
    "run": _run,
    "check-config": _check,
    "status": _status,
    "dry-run": _dry_run,
    "explain": _explain,
    "retry": _retry,
    "purge": _purge,
    "migrate": _migrate,
}
