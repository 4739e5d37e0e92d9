"""YAML configuration -> frozen, typed objects, validated once at start.

Parsing collects every problem (with the key path and its YAML line) and raises one
``ConfigError`` listing them all.  Relative paths resolve against the config file's folder.

The file is composed with PyYAML's ``SafeLoader`` into a node tree and walked by hand, so
every problem can name its line; scalar values are built by the safe constructor, so YAML
types are the usual ones (``true`` is a bool, ``"true"`` is text).  Folder rules that
prevent upload loops are described in ``_check_folders``.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from stowd.config.access import ACCESS_KEYS, read_access
from stowd.config.httpconfig import read_http
from stowd.config.model import (
    BULK_MODES,
    BULK_TYPES,
    DEFAULT_ADAPTIVE,
    DEFAULT_BATCH_BYTES,
    DEFAULT_BATCH_FILES,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_DUPLICATES,
    DEFAULT_FOLDER_LINGER,
    DEFAULT_FOLDER_SIDECAR,
    DEFAULT_FOLLOW_LINKS,
    DEFAULT_HISTORY_DAYS,
    DEFAULT_HOLD_PROBE,
    DEFAULT_IGNORE,
    DEFAULT_INCOMPLETE_WAIT,
    DEFAULT_MAX_RATE,
    DEFAULT_MAX_REFUSALS,
    DEFAULT_POOL_TIMEOUT,
    DEFAULT_QUIET_PERIOD,
    DEFAULT_READ_TIMEOUT,
    DEFAULT_RESCAN_INTERVAL,
    DEFAULT_RETRY_INITIAL,
    DEFAULT_RETRY_MAX,
    DEFAULT_RETRY_MAX_AGE,
    DEFAULT_RETRY_MULTIPLIER,
    DEFAULT_SHUTDOWN_TIMEOUT,
    DEFAULT_TRANSCODE,
    DEFAULT_VERIFY,
    DEFAULT_WORKERS,
    DEFAULT_WRITE_TIMEOUT,
    DUPLICATE_ACTIONS,
    IMAGE_CLASSES,
    MAX_UID_ROOT,
    MIN_FOLDER_LINGER,
    RECEIVED,
    TRANSCODE_POLICIES,
    UNKNOWN_ACTIONS,
    BatchLimits,
    Bulkdata,
    Config,
    Cpu,
    Destination,
    Receive,
    Retry,
    Sidecars,
    Source,
    Timeouts,
)
from stowd.config.queueconfig import QUEUE_KEYS, QueuePlace, read_queue
from stowd.config.receiveconfig import RECEIVE_KEYS, check_ports, read_receive
from stowd.config.ruleconfig import read_rules
from stowd.config.schedule import Schedule, Window, parse
from stowd.config.yamlwalk import (
    NAME,
    Context,
    Section,
    as_bool,
    as_choice,
    as_cpu,
    as_destination,
    as_dicomweb_base,
    as_duration,
    as_int,
    as_log_level,
    as_name,
    as_number,
    as_path,
    as_patterns,
    as_rate,
    as_size,
    as_text,
    describe_node,
    describe_value,
    entries,
    is_null,
    join,
    value_of,
)
from stowd.errors import ConfigError, ConfigProblem
from stowd.rules.engine import Template

# --------------------------------------------------------------------------- sections

_TOP_KEYS = (
    "queue",
    "log_level",
    "shutdown_timeout",
    "history_days",
    "retry",
    "defaults",
    "sources",
    "destinations",
    "rules",
    "original_attributes",
    "uid_root",
    "metrics",
    "http",
    "cpu",
    *QUEUE_KEYS[1:],  # queue_password, node, state, lease (queueconfig.py)
)
_RETRY_KEYS = ("initial", "maximum", "multiplier", "max_age", "hold_probe", "max_refusals")
_SOURCE_OWN_KEYS = ("name", "watch", "receive", "sent", "failed", "destination", "rules")
_SOURCE_OPTION_KEYS = (
    "quiet_period",
    "ignore",
    "rescan_interval",
    "polling",
    "remove_empty_dirs",
    "follow_links",
    "sidecars",
    "bulkdata",
    "sent_retention",
    "incomplete_wait",
)
_SOURCE_KEYS = _SOURCE_OWN_KEYS + _SOURCE_OPTION_KEYS
_DEFAULTS_HINTS = {
    key: f"{key!r} cannot have a default; set it in each source" for key in _SOURCE_OWN_KEYS
} | {"rules": "rules for every source go in the top-level 'rules' list, not in defaults"}
_DESTINATION_KEYS = (
    "url",
    "workers",
    "verify_tls",
    "batch",
    "timeouts",
    "bulkdata",
    "duplicates",
    "transcode",
    "verify",
    "max_rate",  # ratecap (issue 20)
    "schedule",
    "adaptive",  # adaptive concurrency (issue 20)
    *ACCESS_KEYS,
)
# destination settings that ``defaults`` may also give every destination (issue 20)
_DESTINATION_DEFAULT_KEYS = ("schedule", "max_rate", "adaptive")
_BULK_KEYS = ("types", "study_key", "images", "unknown")
_BATCH_KEYS = ("max_files", "max_bytes")
_TIMEOUT_KEYS = ("connect", "read", "write", "pool")


@dataclass(frozen=True)
class _SourceOptions:
    """The source settings that ``defaults`` may provide for every source."""

    quiet_period: float = DEFAULT_QUIET_PERIOD
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    rescan_interval: float = DEFAULT_RESCAN_INTERVAL
    polling: bool = False
    remove_empty_dirs: bool = False
    follow_links: bool = DEFAULT_FOLLOW_LINKS
    sidecars: Sidecars | None = None
    bulkdata: Bulkdata = field(default_factory=Bulkdata)
    sent_retention: float | None = None
    incomplete_wait: float = DEFAULT_INCOMPLETE_WAIT


@dataclass(frozen=True)
class _DestinationDefaults:
    """The destination settings that ``defaults`` may provide for every destination."""

    schedule: Schedule = field(default_factory=Schedule)
    max_rate: float | None = DEFAULT_MAX_RATE
    adaptive: bool = DEFAULT_ADAPTIVE


def _read_destination_defaults(sec: Section) -> _DestinationDefaults:
    return _DestinationDefaults(
        schedule=_read_schedule(sec, Schedule()),
        max_rate=sec.get("max_rate", DEFAULT_MAX_RATE, as_rate),
        adaptive=sec.get("adaptive", DEFAULT_ADAPTIVE, as_bool),
    )


@dataclass(frozen=True)
class _Folders:
    """A source's folders as far as they are valid, for the folder rules."""

    label: str
    section: Section
    watch: Path | None
    sent: Path | None
    failed: Path | None

    def outputs(self) -> list[tuple[str, Path]]:
        pairs = (("sent", self.sent), ("failed", self.failed))
        return [(key, folder) for key, folder in pairs if folder is not None]


def _read_options(sec: Section, base: _SourceOptions) -> _SourceOptions:
    return _SourceOptions(
        quiet_period=sec.get("quiet_period", base.quiet_period, as_duration(positive=False)),
        ignore=sec.get("ignore", base.ignore, as_patterns),
        rescan_interval=sec.get(
            "rescan_interval", base.rescan_interval, as_duration(positive=True)
        ),
        polling=sec.get("polling", base.polling, as_bool),
        remove_empty_dirs=sec.get("remove_empty_dirs", base.remove_empty_dirs, as_bool),
        follow_links=sec.get("follow_links", base.follow_links, as_bool),
        sidecars=_read_sidecars(sec, base.sidecars),
        bulkdata=_read_bulkdata(sec.section("bulkdata", _BULK_KEYS), base.bulkdata),
        sent_retention=sec.get("sent_retention", base.sent_retention, _as_retention) or None,
        incomplete_wait=sec.get(
            "incomplete_wait", base.incomplete_wait, as_duration(positive=False)
        ),
    )


def _as_retention(value: object) -> float | Literal[False]:
    """``forever`` (False: keep), or a duration of at least a day."""
    if value == "forever":
        return False
    seconds = as_duration(positive=True)(value)
    if seconds < 86400:
        raise ValueError(
            "expected forever or a duration of at least 1d (such as 30d), "
            f"got {describe_value(value)}"
        )
    return seconds


def _read_bulkdata(sec: Section, base: Bulkdata) -> Bulkdata:
    return Bulkdata(
        types=sec.get("types", base.types, _as_types),
        study_key=sec.get("study_key", base.study_key, _as_study_key),
        images=sec.get("images", base.images, as_choice(IMAGE_CLASSES)),
        unknown=sec.get("unknown", base.unknown, as_choice(UNKNOWN_ACTIONS)),
    )


def _as_types(value: object) -> tuple[str, ...]:
    items = value if isinstance(value, list) else None
    if items is None or not all(isinstance(v, str) for v in items):
        raise ValueError(
            f"expected a list of file types such as [pdf, jpeg], got {describe_value(value)}"
        )
    wrong = [v for v in items if v not in BULK_TYPES]
    if wrong:
        raise ValueError(
            f"unknown type(s) {', '.join(map(repr, wrong))}; known: {', '.join(BULK_TYPES)}"
        )
    return tuple(dict.fromkeys(items))


def _as_study_key(value: object) -> Template:
    text = as_text(value)
    template = Template.parse(text)
    if not template.placeholders:
        raise ValueError(
            f"{text!r} has no placeholder, so every file would join one study forever; "
            "use for example {folder} or {sidecar.AccessionNumber}"
        )
    for p in template.placeholders:
        if p.var == "regex":
            raise ValueError(f"{p.text}: a study key has no regex; use {{parts[N]}} or {{folder}}")
    return template


def as_uid_root(value: object) -> str:
    text = as_text(value)
    if not re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+", text):
        raise ValueError(
            f"{text!r} is not a UID root: numbers separated by dots, without leading zeros "
            "(for example 1.2.826.0.1.3680043.10.1234)"
        )
    if len(text) > MAX_UID_ROOT:
        raise ValueError(f"a UID root may have at most {MAX_UID_ROOT} characters, got {len(text)}")
    return text


_SIDECAR_KEYS = ("per_file", "folder", "folder_linger")


def _read_sidecars(sec: Section, base: Sidecars | None) -> Sidecars | None:
    found = sec.get("sidecars", None, _as_sidecars)
    return base if found is None else found or None


def _as_sidecars(value: object) -> Sidecars | Literal[False]:
    """``true`` (the defaults), ``false``, or a mapping of per_file and folder."""
    if isinstance(value, bool):
        return Sidecars() if value else False
    if not isinstance(value, dict) or set(value) - set(_SIDECAR_KEYS):
        raise ValueError(
            "expected true, false or a mapping with per_file (true/false), folder (a file "
            "name such as _metadata.yaml, or false) and folder_linger (a duration), "
            f"got {describe_value(value)}"
        )
    folder = value.get("folder", DEFAULT_FOLDER_SIDECAR)
    if folder is False or folder is None:
        folder = None
    elif not isinstance(folder, str) or not folder.strip() or "/" in folder:
        raise ValueError(f"folder must be a file name such as _metadata.yaml, got {folder!r}")
    linger = as_duration(positive=False)(value.get("folder_linger", DEFAULT_FOLDER_LINGER))
    if linger < MIN_FOLDER_LINGER:
        raise ValueError(
            f"folder_linger must be at least {MIN_FOLDER_LINGER:.0f}s, got {linger:g}s: a "
            "shorter wait removes a folder's sidecar between two files of one session"
        )
    return Sidecars(as_bool(value.get("per_file", True)), folder, linger)


def _read_retry(sec: Section) -> Retry:
    positive = as_duration(positive=True)
    retry = Retry(
        initial=sec.get("initial", DEFAULT_RETRY_INITIAL, positive),
        maximum=sec.get("maximum", DEFAULT_RETRY_MAX, positive),
        multiplier=sec.get("multiplier", DEFAULT_RETRY_MULTIPLIER, as_number(1.0)),
        max_age=sec.get("max_age", DEFAULT_RETRY_MAX_AGE, positive),
        hold_probe=sec.get("hold_probe", DEFAULT_HOLD_PROBE, positive),
        max_refusals=sec.get("max_refusals", DEFAULT_MAX_REFUSALS, as_int(1)),
    )
    if retry.maximum < retry.initial:
        if sec.value_node("maximum") is not None:
            sec.add("maximum", f"must not be less than initial ({retry.initial:g}s)")
        else:
            sec.add("initial", f"must not be more than maximum ({retry.maximum:g}s)")
    return retry


def _read_destination(
    sec: Section, name: str, defaults: _DestinationDefaults
) -> Destination | None:
    url = sec.need("url", as_dicomweb_base)
    batch = sec.section("batch", _BATCH_KEYS)
    timeouts = sec.section("timeouts", _TIMEOUT_KEYS)
    positive = as_duration(positive=True)
    destination = Destination(
        name=name,
        url=url or "",
        batch=BatchLimits(
            max_files=batch.get("max_files", DEFAULT_BATCH_FILES, as_int(1)),
            max_bytes=batch.get("max_bytes", DEFAULT_BATCH_BYTES, as_size),
        ),
        timeouts=Timeouts(
            connect=timeouts.get("connect", DEFAULT_CONNECT_TIMEOUT, positive),
            read=timeouts.get("read", DEFAULT_READ_TIMEOUT, positive),
            write=timeouts.get("write", DEFAULT_WRITE_TIMEOUT, positive),
            pool=timeouts.get("pool", DEFAULT_POOL_TIMEOUT, positive),
        ),
        workers=sec.get("workers", DEFAULT_WORKERS, as_int(1)),
        verify_tls=sec.get("verify_tls", True, as_bool),
        bulkdata=sec.get("bulkdata", "encapsulate", as_choice(BULK_MODES)),
        access=read_access(sec),
        duplicates=sec.get("duplicates", DEFAULT_DUPLICATES, as_choice(DUPLICATE_ACTIONS)),
        transcode=sec.get("transcode", DEFAULT_TRANSCODE, as_choice(TRANSCODE_POLICIES)),
        verify=sec.get("verify", DEFAULT_VERIFY, as_bool),
        max_rate=sec.get("max_rate", defaults.max_rate, as_rate),  # ratecap (issue 20)
        schedule=_read_schedule(sec, defaults.schedule),
        adaptive=sec.get("adaptive", defaults.adaptive, as_bool),  # issue 20
    )
    return None if url is None else destination


# -- schedule (transfer windows) --
_SCHEDULE_HINT = 'expected a window such as "Mon-Fri 19:00-07:00", or a list of them'


def _read_schedule(sec: Section, default: Schedule) -> Schedule:
    """A destination's ``schedule``: one window's text or a list of them; each bad window
    is a problem of its own, with its own line (absent: ``default``)."""
    node = sec.value_node("schedule")
    if node is None:
        return default
    key = join(sec.key, "schedule")
    if not isinstance(node, SequenceNode):
        window = _read_window(sec.ctx, key, node)
        return Schedule(() if window is None else (window,))
    if not node.value:
        sec.add("schedule", "an empty list never sends; leave schedule out to send at any time")
    windows = [_read_window(sec.ctx, f"{key}[{n}]", item) for n, item in enumerate(node.value)]
    return Schedule(tuple(w for w in windows if w is not None))


def _read_window(ctx: Context, key: str, node: Node) -> Window | None:
    try:
        value = value_of(node)
        if not isinstance(value, str):
            raise ValueError(f"{_SCHEDULE_HINT}, got {_as_written(node)}")
        return parse(value)
    except ValueError as exc:
        ctx.add(key, str(exc), node)
        return None


def _as_written(node: Node) -> str:
    """A window that YAML read as something else: ``19:00`` unquoted is the number 1140
    (YAML 1.1 reads it as minutes and seconds), so the message shows it as written too."""
    got = describe_node(node)
    if isinstance(node, ScalarNode) and not is_null(node) and node.value != got:
        return f"{node.value} (YAML reads it as {got}; put the window in quotes)"
    return got


def _read_destinations(
    top: Section, defaults: _DestinationDefaults
) -> tuple[dict[str, Destination], frozenset[str] | None]:
    """Every valid destination, and the names defined (None if they cannot be known)."""
    node = top.value_node("destinations")
    if node is None:
        top.missing("destinations")
        return {}, frozenset()
    if not isinstance(node, MappingNode):
        got = describe_node(node)
        top.add("destinations", f"expected a mapping of destination names to settings, got {got}")
        return {}, None
    found_entries = entries(top.ctx, "destinations", node)
    if not found_entries:
        top.add("destinations", "at least one destination is required")
    found: dict[str, Destination] = {}
    for name, (key_node, value_node) in found_entries.items():
        key = f"destinations.{name}"
        if not NAME.fullmatch(name):
            top.ctx.add(key, "names may use only letters, digits, '_', '.' and '-'", key_node)
        sec = Section(top.ctx, key, value_node, _DESTINATION_KEYS)
        destination = _read_destination(sec, name, defaults)
        if destination is not None:
            found[name] = destination
    return found, frozenset(found_entries)


def _read_source(
    sec: Section,
    name: str | None,
    defaults: _SourceOptions,
    known: Collection[str] | None,
    queue: Path | None,
    *,
    watch_exists: bool,
) -> tuple[Source | None, _Folders, Receive | None]:
    to_path = as_path(sec.ctx.base)
    watch, receive, valid = _watch_or_receive(sec, name, queue, watch_exists)
    sent = sec.need("sent", to_path)
    failed = sec.need("failed", to_path)
    folders = _Folders(repr(name) if name else sec.key, sec, watch, sent, failed)
    destination = sec.need("destination", as_destination(known))
    options = _read_options(sec, defaults)
    if name is None or watch is None or sent is None or failed is None or destination is None:
        return None, folders, receive
    if not valid:
        return None, folders, receive
    source = Source(
        name=name,
        watch=watch,
        sent=sent,
        failed=failed,
        destination=destination,
        quiet_period=options.quiet_period,
        ignore=options.ignore,
        rescan_interval=options.rescan_interval,
        polling=options.polling,
        remove_empty_dirs=options.remove_empty_dirs or receive is not None,
        follow_links=options.follow_links,
        sidecars=options.sidecars,
        bulkdata=options.bulkdata,
        sent_retention=options.sent_retention,
        incomplete_wait=options.incomplete_wait,
        rules=read_rules(sec.ctx, join(sec.key, "rules"), sec.value_node("rules"), None),
        receive=receive,
    )
    return source, folders, receive


def _watch_or_receive(
    sec: Section, name: str | None, queue: Path | None, exists: bool
) -> tuple[Path | None, Receive | None, bool]:
    """A source watches a folder (``watch``, which must be one when ``exists``) or receives
    C-STORE (``receive``): then its folder is ``received/<name>`` beside the queue.  The
    flag: what was given is valid."""
    if sec.value_node("receive") is None:
        watch = sec.need("watch", as_path(sec.ctx.base))
        problem = None if watch is None or not exists else watch_problem(watch)
        if problem is not None:
            sec.add("watch", problem)
        return watch, None, problem is None
    if sec.value_node("watch") is not None:
        sec.add(
            "watch",
            "a source either watches a folder or receives C-STORE ('receive'), not both; "
            "make two sources",
        )
    receive = read_receive(sec.section("receive", RECEIVE_KEYS))
    if name is not None and name.startswith("."):
        sec.add(
            "name",
            f"a receiving source's name is its folder's name in {RECEIVED}/: it "
            "may not start with '.'",
        )
        return None, receive, False
    watch = None if queue is None or name is None else queue.parent / RECEIVED / name
    return watch, receive, receive is not None and sec.value_node("watch") is None


def watch_problem(watch: Path) -> str | None:
    """Why ``watch`` cannot be watched as it is, or None when it is a folder.  stowd does
    not make watch folders: a misspelled path would be made and watched while the scanner
    writes elsewhere."""
    try:
        if watch.is_dir():
            return None
        found = watch.exists()
    except OSError as exc:  # a parent that cannot be entered
        return f"{watch} cannot be checked: {exc.strerror or exc}"
    if found:
        return f"{watch} is not a folder (a file?); watch must name a folder"
    missing = _first_missing(watch)
    text = f"the folder {watch} does not exist"
    if missing != watch:
        text += f" (nor does {missing})"
    close = _close_sibling(missing)
    if close is not None:
        text += f"; did you mean {close}?"
    return text + "; stowd does not create watch folders: create it or correct the path"


def _first_missing(path: Path) -> Path:
    """The outermost folder of ``path`` that does not exist."""
    missing = path
    while missing.parent != missing and not missing.parent.exists():
        missing = missing.parent
    return missing


def _close_sibling(missing: Path) -> Path | None:
    """An existing folder beside ``missing`` whose name is close to its name."""
    try:
        names = [e.name for e in os.scandir(missing.parent) if e.is_dir()]
    except OSError:
        return None
    close = difflib.get_close_matches(missing.name, names, n=1, cutoff=0.6)
    return missing.parent / close[0] if close else None


def _read_sources(
    top: Section,
    defaults: _SourceOptions,
    known: Collection[str] | None,
    queue: Path | None,
    watch_exists: bool,
) -> tuple[list[Source], list[_Folders]]:
    """Every valid source, and the folders of every source (valid or not)."""
    node = top.value_node("sources")
    if node is None:
        top.missing("sources")
        return [], []
    if not isinstance(node, SequenceNode):
        got = describe_node(node)
        top.add("sources", f"expected a list of sources (each starting with '- name:'), got {got}")
        return [], []
    if not node.value:
        top.add("sources", "at least one source is required")
    sources: list[Source] = []
    folders: list[_Folders] = []
    receivers: list[tuple[Section, Receive]] = []
    first_line: dict[str, int | None] = {}
    for index, item in enumerate(node.value):
        sec = Section(top.ctx, f"sources[{index}]", item, _SOURCE_KEYS)
        name = sec.need("name", as_name)
        if name is not None and name in first_line:
            sec.add("name", f"duplicate source name (first used on line {first_line[name]})")
        elif name is not None:
            first_line[name] = sec.line("name")
        source, found, receive = _read_source(
            sec, name, defaults, known, queue, watch_exists=watch_exists
        )
        sources += [source] if source is not None else []
        folders.append(found)
        receivers += [(sec.section("receive", RECEIVE_KEYS), receive)] if receive else []
    check_ports(receivers)
    return sources, folders


# --------------------------------------------------------------------------- folder rules


def _inside(inner: Path, outer: Path) -> bool:
    """``inner`` is ``outer`` or somewhere below it (lexically; symlinks are not resolved)."""
    return inner.is_relative_to(outer)


def _relation(inner: Path, outer: Path) -> str:
    return "is the same as" if inner == outer else "is inside"


def _check_own_folders(source: _Folders) -> None:
    watch = source.watch
    for key, folder in source.outputs():
        if watch is not None and _inside(watch, folder):
            source.section.add(
                "watch",
                f"the watch folder {_relation(watch, folder)} its {key} folder "
                f"({folder}); moved files would be picked up again",
            )
    if source.sent is not None and source.sent == source.failed:
        source.section.add("failed", f"must not be the same folder as sent ({source.sent})")


def _check_pair(first: _Folders, second: _Folders) -> None:
    if first.watch is not None and second.watch is not None:
        a, b = first.watch, second.watch
        if _inside(a, b) or _inside(b, a):
            how = "is the same as" if a == b else "overlaps"
            second.section.add(
                "watch",
                f"{how} the watch folder of source {first.label} ({a}, line "
                f"{first.section.line('watch')}); its files would be queued twice",
            )
            return
    for mover, other in ((first, second), (second, first)):
        for key, folder in mover.outputs():
            if other.watch is not None and _inside(folder, other.watch):
                mover.section.add(
                    key,
                    f"{_relation(folder, other.watch)} the watch folder of source "
                    f"{other.label} ({other.watch}); that source would send its files again",
                )
            elif other.watch is not None and _inside(other.watch, folder):
                mover.section.add(
                    key,
                    f"holds the watch folder of source {other.label} ({other.watch}); "
                    "retention (sent_retention, stowd purge) would delete its files before "
                    "they are sent",
                )


def _check_folders(top: Section, sources: list[_Folders], place: QueuePlace) -> None:
    """Refuse folder layouts that would loop files or send them twice.

    Decision: a source's ``sent`` and ``failed`` folders MAY live inside its own ``watch``
    folder (the watcher excludes them), because many drop-folder setups keep everything
    under one share.  Everything else that could feed a file back in is an error:

    * ``watch`` equal to or inside its own ``sent`` or ``failed`` folder;
    * ``sent`` equal to ``failed`` (outcomes could not be told apart);
    * two sources whose ``watch`` folders are equal or nested (each file queued twice);
    * a source's ``sent``/``failed`` inside another source's ``watch`` (sent again there);
    * the queue database (or a PostgreSQL queue's ``state`` folder) inside any ``watch``
      folder, or equal to or inside a ``sent``/``failed`` folder (retention would delete it).

    Paths are compared as written after ``~`` expansion and ``os.path.abspath``; symlinks
    are not resolved, so two spellings of one folder through a symlink are not detected.
    """
    queue = place.anchor
    for index, first in enumerate(sources):
        _check_own_folders(first)
        for second in sources[index + 1 :]:
            _check_pair(first, second)
        for key, folder in first.outputs() if queue is not None else ():
            if queue is not None and _inside(queue, folder):
                first.section.add(
                    key, f"holds {place.what} ({place.shown}); retention would delete it"
                )
        if queue is not None and first.watch is not None and _inside(queue, first.watch):
            top.add(
                place.key,
                f"is inside the watch folder of source {first.label} ({first.watch}); "
                f"{place.what} itself would be picked up",
            )


def process_cores() -> frozenset[int] | None:
    """The cores this process may use now (systemd's CPUAffinity=, a cpuset, taskset); None
    when the kernel will not say (a seccomp filter)."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except OSError:
        return None


def _read_cpu(top: Section, cores: frozenset[int] | None) -> Cpu | None:
    """``cpu:`` (issue 19): absent or null: no pinning.  With ``cores`` (those the process
    started with: ``run``, ``migrate``, ``check-config`` and a reload), a core outside them is
    a problem beside every other; other commands never pin, so they do not judge it."""
    node = top.value_node("cpu")
    if node is None or is_null(node):
        return None
    problems = len(top.ctx.problems)
    core = top.get("cpu", None, as_cpu)
    if len(top.ctx.problems) > problems:
        return None
    if core is not None and cores is not None and core not in cores:
        top.add("cpu", not_allowed(core, cores))
        return None
    return Cpu(core, top.line("cpu"))


def not_allowed(core: int, allowed: frozenset[int]) -> str:
    return (
        f"CPU {core} is not one stowd may use here (allowed: {cores_text(allowed)}, the "
        "cores this process started with: systemd's CPUAffinity=, a cpuset or taskset)"
    )


def cores_text(cores: Collection[int]) -> str:
    """``0-3,6``: cores as ``Cpus_allowed_list`` and ``taskset -c`` write them."""
    runs: list[list[int]] = []
    for core in sorted(cores):
        if runs and core == runs[-1][1] + 1:
            runs[-1][1] = core
        else:
            runs.append([core, core])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


# --------------------------------------------------------------------------- entry point


def _fail(path: Path, message: str, line: int | None = None) -> ConfigError:
    return ConfigError(str(path), [ConfigProblem("", message, line)])


def _compose(path: Path) -> Node | None:
    """The YAML node tree of the file; ConfigError if it cannot be read or parsed."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise _fail(path, "the configuration file does not exist") from None
    except UnicodeDecodeError:
        raise _fail(path, "cannot read the file: it is not UTF-8 text") from None
    except OSError as exc:
        raise _fail(path, f"cannot read the file: {exc.strerror or exc}") from None
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = None if mark is None else int(mark.line) + 1
        context = f" ({exc.context})" if exc.context else ""
        raise _fail(path, f"invalid YAML: {exc.problem}{context}", line) from None
    except yaml.YAMLError as exc:
        raise _fail(path, f"invalid YAML: {exc}") from None


def _build(
    ctx: Context, path: Path, root: Node, watch_exists: bool, cores: frozenset[int] | None
) -> Config | None:
    top = Section(ctx, "", root, _TOP_KEYS)
    place = read_queue(top)
    queue = place.anchor
    log_level = top.get("log_level", "INFO", as_log_level)
    shutdown = top.get("shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT, as_duration(positive=False))
    history_days = top.get("history_days", DEFAULT_HISTORY_DAYS, as_number(0.0))
    retry = _read_retry(top.section("retry", _RETRY_KEYS))
    defaults_section = top.section(
        "defaults", _SOURCE_OPTION_KEYS + _DESTINATION_DEFAULT_KEYS, _DEFAULTS_HINTS
    )
    defaults = _read_options(defaults_section, _SourceOptions())
    destination_defaults = _read_destination_defaults(defaults_section)
    destinations, known = _read_destinations(top, destination_defaults)
    sources, folders = _read_sources(top, defaults, known, queue, watch_exists)
    names = None if len(sources) != len(folders) else {s.name for s in sources}
    rules = read_rules(ctx, "rules", top.value_node("rules"), names)
    original = top.get("original_attributes", False, as_bool)
    uid_root = top.get("uid_root", None, as_uid_root)
    http, metrics = read_http(top)
    cpu = _read_cpu(top, cores)
    _check_folders(top, folders, place)
    if queue is None:
        return None
    return Config(
        path=path,
        queue=queue,
        sources=tuple(sources),
        destinations=destinations,
        retry=retry,
        shutdown_timeout=shutdown,
        history_days=history_days,
        log_level=log_level,
        rules=rules,
        original_attributes=original,
        uid_root=uid_root,
        metrics=metrics,
        http=http,
        database=place.database,
        node=place.node,
        lease=place.lease,
        cpu=cpu,
    )


def load_config(
    path: str | Path, *, watch_exists: bool = True, cores: frozenset[int] | None = None
) -> Config:
    """Read, validate and return the configuration at ``path``; raise ``ConfigError``.

    ``cores``: the CPU cores the process started with, for the commands that pin (``cpu:``
    must name one of them); None: ``cpu:`` is read but not judged.

    Each watch folder must exist and be a folder, unless ``watch_exists`` is False: only
    for ``stowd status``, which must work while a watch folder is missing (and says so),
    and ``stowd migrate``, which walks its own folders and never the config's.

    Every problem found is collected (key path, message, line) and raised together in one
    ``ConfigError`` naming the file; problems are ordered by line.
    """
    config_path = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    root = _compose(config_path)
    if root is None:
        raise _fail(config_path, "the file is empty; it needs queue, sources and destinations")
    ctx = Context(config_path.parent)
    config = _build(ctx, config_path, root, watch_exists, cores)
    if config is None or ctx.problems:
        problems = ctx.problems or [ConfigProblem("", "the configuration is invalid")]
        raise ConfigError(str(config_path), sorted(problems, key=lambda p: p.line or 0))
    return config
