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
import math
import os
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from stowd.errors import ConfigError, ConfigProblem

DEFAULT_QUIET_PERIOD = 5.0
DEFAULT_RESCAN_INTERVAL = 300.0
DEFAULT_IGNORE = (".*", "*.part", "*.tmp", "*.partial", "*.crdownload", "~*")
DEFAULT_BATCH_FILES = 50
DEFAULT_BATCH_BYTES = 64 * 1024 * 1024
DEFAULT_WORKERS = 2
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 300.0
DEFAULT_WRITE_TIMEOUT = 300.0
DEFAULT_POOL_TIMEOUT = 30.0
DEFAULT_RETRY_INITIAL = 10.0
DEFAULT_RETRY_MAX = 3600.0
DEFAULT_RETRY_MULTIPLIER = 2.0
DEFAULT_RETRY_MAX_AGE = 7 * 24 * 3600.0
DEFAULT_HOLD_PROBE = 60.0
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
DEFAULT_HISTORY_DAYS = 30.0
DEFAULT_FOLDER_SIDECAR = "_metadata.yaml"


@dataclass(frozen=True)
class Timeouts:
    """Per-phase HTTP timeouts in seconds (httpx's connect/read/write/pool)."""

    connect: float = DEFAULT_CONNECT_TIMEOUT
    read: float = DEFAULT_READ_TIMEOUT
    write: float = DEFAULT_WRITE_TIMEOUT
    pool: float = DEFAULT_POOL_TIMEOUT


@dataclass(frozen=True)
class BatchLimits:
    """How much one STOW request may carry; a single larger file is still sent alone."""

    max_files: int = DEFAULT_BATCH_FILES
    max_bytes: int = DEFAULT_BATCH_BYTES


@dataclass(frozen=True)
class Destination:
    """A DICOMweb archive; STOW goes to ``{url}/studies``."""

    name: str
    url: str
    batch: BatchLimits = field(default_factory=BatchLimits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    workers: int = DEFAULT_WORKERS
    verify_tls: bool = True

    @property
    def stow_url(self) -> str:
        return self.url.rstrip("/") + "/studies"

    @property
    def display_url(self) -> str:
        """The URL for logs and status, with any user:password@ replaced by ``***@``."""
        return redact_url(self.url)


def redact_url(url: str) -> str:
    """``url`` with everything between ``://`` and the last ``@`` hidden.

    Done on the text, not with urlsplit: a password with an unescaped ``#``, ``/`` or ``?``
    is mis-parsed by urlsplit and would leak.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


@dataclass(frozen=True)
class Sidecars:
    """Metadata files beside the files they describe (see ``stowd/sidecar.py``)."""

    per_file: bool = True  # <name>.json / .yaml / .yml beside the file
    folder: str | None = DEFAULT_FOLDER_SIDECAR  # one file for the whole folder


@dataclass(frozen=True)
class Source:
    """A watched drop folder and where its files go afterwards."""

    name: str
    watch: Path
    sent: Path
    failed: Path
    destination: str
    quiet_period: float = DEFAULT_QUIET_PERIOD
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    rescan_interval: float = DEFAULT_RESCAN_INTERVAL
    polling: bool = False
    remove_empty_dirs: bool = False
    sidecars: Sidecars | None = None  # None: no sidecars, every file is sent


@dataclass(frozen=True)
class Retry:
    """Backoff of transient failures, kept in the queue so it survives restarts."""

    initial: float = DEFAULT_RETRY_INITIAL
    maximum: float = DEFAULT_RETRY_MAX
    multiplier: float = DEFAULT_RETRY_MULTIPLIER
    max_age: float = DEFAULT_RETRY_MAX_AGE
    hold_probe: float = DEFAULT_HOLD_PROBE


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    path: Path
    queue: Path
    sources: tuple[Source, ...]
    destinations: dict[str, Destination]
    retry: Retry = field(default_factory=Retry)
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    history_days: float = DEFAULT_HISTORY_DAYS
    log_level: str = "INFO"

    def destination_of(self, source: Source) -> Destination:
        return self.destinations[source.destination]

    def source(self, name: str) -> Source:
        for src in self.sources:
            if src.name == name:
                return src
        raise KeyError(name)


# --------------------------------------------------------------------------- value parsing

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

_T = TypeVar("_T")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_NUMBER = r"(?P<num>[-+]?(?:\d+(?:\.\d*)?|\.\d+))"
_DURATION = re.compile(_NUMBER + r"\s*(?P<unit>ms|s|m|h|d)?", re.IGNORECASE)
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_HINT = "expected a duration such as 30s or 5m"
_SIZE = re.compile(_NUMBER + r"\s*(?P<unit>[kmgt]i?b|b)?", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_HINT = "expected a size such as 512KiB, 64MiB or 1GB"


def parse_duration(text: str | int | float) -> float:
    """Seconds from a number of seconds or a string such as ``500ms``, ``30s``, ``5m``, ``7d``.

    Raises ``ValueError`` with a message for humans on anything else, including negatives.
    """
    return _duration_of(text)


def parse_size(text: str | int | float) -> int:
    """Bytes from a whole number of bytes or a string such as ``512KiB``, ``64MiB``, ``10MB``.

    ``KB``/``MB``/``GB`` are decimal (1000), ``KiB``/``MiB``/``GiB`` binary (1024).
    Raises ``ValueError`` with a message for humans on anything else, including negatives.
    """
    return _size_of(text)


def _describe(value: object) -> str:
    """How a value read from YAML is shown in a message (``got ...``)."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def _amount(value: object, pattern: re.Pattern[str], hint: str) -> tuple[str | float, str]:
    """The number (plain, or as written in a string) and lower-case unit of ``value``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"{hint}, got {_describe(value)}")
        return float(value), ""
    match = pattern.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{hint}, got {_describe(value)}")
    return match["num"], (match["unit"] or "").lower()


def _not_negative(number: float, value: object) -> None:
    if number < 0:
        raise ValueError(f"must not be negative, got {_describe(value)}")


def _duration_of(value: object) -> float:
    number, unit = _amount(value, _DURATION, _DURATION_HINT)
    seconds = float(number) * _DURATION_UNITS[unit]
    _not_negative(seconds, value)
    return seconds


def _size_of(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        size = value  # exact, even for very large numbers
    else:
        number, unit = _amount(value, _SIZE, _SIZE_HINT)
        if isinstance(number, str) and "." not in number:
            size = int(number) * _SIZE_UNITS[unit]
        elif float(number).is_integer() or unit not in ("", "b"):
            size = round(float(number) * _SIZE_UNITS[unit])
        else:
            raise ValueError(f"{_SIZE_HINT} (whole bytes), got {_describe(value)}")
    _not_negative(size, value)
    return size


# --------------------------------------------------------------------------- converters
# Each converter turns a value built by the YAML safe constructor into a typed value, or
# raises ValueError with a message; the message is reported with the key path and line.


def _as_duration(*, positive: bool) -> Callable[[object], float]:
    def convert(value: object) -> float:
        seconds = _duration_of(value)
        if positive and seconds <= 0:
            raise ValueError(f"must be more than 0 seconds, got {_describe(value)}")
        return seconds

    return convert


def _as_size(value: object) -> int:
    size = _size_of(value)
    if size < 1:
        raise ValueError(f"must be at least 1 byte, got {_describe(value)}")
    return size


def _as_number(minimum: float) -> Callable[[object], float]:
    def convert(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected a number, got {_describe(value)}")
        if not math.isfinite(value) or value < minimum:
            raise ValueError(f"must be a number of at least {minimum:g}, got {_describe(value)}")
        return float(value)

    return convert


def _as_int(minimum: int) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected a whole number, got {_describe(value)}")
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")
        return value

    return convert


def _as_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false (without quotes), got {_describe(value)}")
    return value


def _as_text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected text, got {_describe(value)}")
    return value.strip()


def _as_name(value: object) -> str:
    name = _as_text(value)
    if not _NAME.fullmatch(name):
        raise ValueError(f"names may use only letters, digits, '_', '.' and '-', got {name!r}")
    return name


def _as_log_level(value: object) -> str:
    level = _as_text(value).upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got {_describe(value)}")
    return level


def _as_url(value: object) -> str:
    url = _as_text(value)
    shown = redact_url(url)
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(
            "expected an http:// or https:// URL with a host, such as "
            f"http://127.0.0.1:8042/dicom-web, got {shown!r}"
        )
    try:
        parts.port  # noqa: B018 - urlsplit checks the port only when it is read
    except ValueError:
        raise ValueError(f"the port is not a number from 0 to 65535 in {shown!r}") from None
    if parts.query or parts.fragment:
        raise ValueError(f"must not contain '?' or '#' (/studies is appended to it), got {shown!r}")
    return url


def _as_patterns(value: object) -> tuple[str, ...]:
    items = value if isinstance(value, list) else []
    patterns = [item for item in items if isinstance(item, str) and item]
    if not isinstance(value, list) or len(patterns) != len(items):
        raise ValueError(
            f"expected a list of file name patterns such as ['.*', '*.part'], "
            f"got {_describe(value)}"
        )
    for pattern in patterns:
        if "/" in pattern:
            raise ValueError(f"patterns match the file name only; {pattern!r} can never match")
    return tuple(patterns)


def _as_path(base: Path) -> Callable[[object], Path]:
    def convert(value: object) -> Path:
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"expected a folder or file path, got {_describe(value)}")
        expanded = os.path.expanduser(value.strip())
        return Path(os.path.abspath(os.path.join(base, expanded)))

    return convert


def _as_destination(known: Collection[str] | None) -> Callable[[object], str]:
    def convert(value: object) -> str:
        name = _as_text(value)
        if known is None or name in known:
            return name
        if not known:
            raise ValueError(f"destination {name!r} is not defined: no destinations are defined")
        close = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        listed = ", ".join(sorted(known))
        raise ValueError(
            f"destination {name!r} is not defined under destinations (known: {listed}){hint}"
        )

    return convert


# --------------------------------------------------------------------------- node walking


def _line(node: Node | None) -> int | None:
    return None if node is None else int(node.start_mark.line) + 1


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _value(node: Node) -> object:
    """The Python value of a node, built by PyYAML's safe constructor."""
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        raise ValueError(f"cannot read this value: {problem}") from None
    finally:
        loader.dispose()


def _describe_node(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    try:
        return _describe(_value(node))
    except ValueError:
        return repr(node.value)


def _is_null(node: Node | None) -> bool:
    return isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:null"


@dataclass
class _Context:
    """Where relative paths start, and every problem found so far."""

    base: Path
    problems: list[ConfigProblem] = field(default_factory=list)

    def add(self, key: str, message: str, node: Node | None) -> None:
        self.problems.append(ConfigProblem(key, message, _line(node)))


_Entries = dict[str, tuple[Node, Node]]


def _entries(ctx: _Context, key: str, node: MappingNode) -> _Entries:
    """The text keys of a mapping; odd or repeated keys are reported and skipped."""
    entries: _Entries = {}
    for key_node, value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            ctx.add(key, "YAML merge keys (<<) are not supported; use 'defaults'", key_node)
        elif not isinstance(key_node, ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
            ctx.add(key, f"keys must be text, got {_describe_node(key_node)}", key_node)
        elif key_node.value in entries:
            first = _line(entries[key_node.value][0])
            message = f"duplicate key (first given on line {first})"
            ctx.add(_join(key, key_node.value), message, key_node)
        else:
            entries[key_node.value] = (key_node, value_node)
    return entries


def _unknown_key(name: str, allowed: Collection[str]) -> str:
    close = difflib.get_close_matches(name, list(allowed), n=1, cutoff=0.6)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    return f"unknown key; expected one of: {', '.join(allowed)}"


class _Section:
    """One YAML mapping of the config with its key path; reads and checks its entries.

    An absent or empty (null) section reads as empty, so every key gets its default.
    A section of the wrong type is reported once and its missing keys are not.
    """

    def __init__(
        self,
        ctx: _Context,
        key: str,
        node: Node | None,
        allowed: Collection[str],
        hints: Mapping[str, str] | None = None,
    ) -> None:
        self.ctx, self.key, self.node = ctx, key, node
        self.broken = node is not None and not _is_null(node) and not isinstance(node, MappingNode)
        self.entries: _Entries = {}
        if self.broken and node is not None:
            ctx.add(key, f"expected a mapping of keys to values, got {_describe_node(node)}", node)
        elif isinstance(node, MappingNode):
            self.entries = _entries(ctx, key, node)
        for name, (key_node, _) in self.entries.items():
            if name not in allowed:
                message = (hints or {}).get(name) or _unknown_key(name, allowed)
                ctx.add(_join(key, name), message, key_node)

    def value_node(self, name: str) -> Node | None:
        entry = self.entries.get(name)
        return None if entry is None else entry[1]

    def line(self, name: str) -> int | None:
        return _line(self.value_node(name) or self.node)

    def add(self, name: str, message: str) -> None:
        self.ctx.add(_join(self.key, name), message, self.value_node(name) or self.node)

    def missing(self, name: str) -> None:
        if not self.broken:
            self.ctx.add(_join(self.key, name), "required key is missing", self.node)

    def get(self, name: str, default: _T, convert: Callable[[object], _T]) -> _T:
        """The converted value of ``name``, or ``default`` when absent or invalid."""
        node = self.value_node(name)
        value = None if node is None else self._convert(name, node, convert)
        return default if value is None else value

    def need(self, name: str, convert: Callable[[object], _T]) -> _T | None:
        """The converted value of a required key; None (and a problem) when missing."""
        node = self.value_node(name)
        if node is None:
            self.missing(name)
            return None
        return self._convert(name, node, convert)

    def section(
        self, name: str, allowed: Collection[str], hints: Mapping[str, str] | None = None
    ) -> _Section:
        return _Section(self.ctx, _join(self.key, name), self.value_node(name), allowed, hints)

    def _convert(self, name: str, node: Node, convert: Callable[[object], _T]) -> _T | None:
        try:
            return convert(_value(node))
        except ValueError as exc:
            self.ctx.add(_join(self.key, name), str(exc), node)
            return None


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
)
_RETRY_KEYS = ("initial", "maximum", "multiplier", "max_age", "hold_probe")
_SOURCE_OWN_KEYS = ("name", "watch", "sent", "failed", "destination")
_SOURCE_OPTION_KEYS = ("quiet_period", "ignore", "rescan_interval", "polling", "remove_empty_dirs")
_SOURCE_KEYS = _SOURCE_OWN_KEYS + _SOURCE_OPTION_KEYS
_DEFAULTS_HINTS = {
    key: f"{key!r} cannot have a default; set it in each source" for key in _SOURCE_OWN_KEYS
}
_DESTINATION_KEYS = ("url", "workers", "verify_tls", "batch", "timeouts")
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


@dataclass(frozen=True)
class _Folders:
    """A source's folders as far as they are valid, for the folder rules."""

    label: str
    section: _Section
    watch: Path | None
    sent: Path | None
    failed: Path | None

    def outputs(self) -> list[tuple[str, Path]]:
        pairs = (("sent", self.sent), ("failed", self.failed))
        return [(key, folder) for key, folder in pairs if folder is not None]


def _read_options(sec: _Section, base: _SourceOptions) -> _SourceOptions:
    return _SourceOptions(
        quiet_period=sec.get("quiet_period", base.quiet_period, _as_duration(positive=False)),
        ignore=sec.get("ignore", base.ignore, _as_patterns),
        rescan_interval=sec.get(
            "rescan_interval", base.rescan_interval, _as_duration(positive=True)
        ),
        polling=sec.get("polling", base.polling, _as_bool),
        remove_empty_dirs=sec.get("remove_empty_dirs", base.remove_empty_dirs, _as_bool),
    )


def _read_retry(sec: _Section) -> Retry:
    positive = _as_duration(positive=True)
    retry = Retry(
        initial=sec.get("initial", DEFAULT_RETRY_INITIAL, positive),
        maximum=sec.get("maximum", DEFAULT_RETRY_MAX, positive),
        multiplier=sec.get("multiplier", DEFAULT_RETRY_MULTIPLIER, _as_number(1.0)),
        max_age=sec.get("max_age", DEFAULT_RETRY_MAX_AGE, positive),
        hold_probe=sec.get("hold_probe", DEFAULT_HOLD_PROBE, positive),
    )
    if retry.maximum < retry.initial:
        if sec.value_node("maximum") is not None:
            sec.add("maximum", f"must not be less than initial ({retry.initial:g}s)")
        else:
            sec.add("initial", f"must not be more than maximum ({retry.maximum:g}s)")
    return retry


def _read_destination(sec: _Section, name: str) -> Destination | None:
    url = sec.need("url", _as_url)
    batch = sec.section("batch", _BATCH_KEYS)
    timeouts = sec.section("timeouts", _TIMEOUT_KEYS)
    positive = _as_duration(positive=True)
    destination = Destination(
        name=name,
        url=url or "",
        batch=BatchLimits(
            max_files=batch.get("max_files", DEFAULT_BATCH_FILES, _as_int(1)),
            max_bytes=batch.get("max_bytes", DEFAULT_BATCH_BYTES, _as_size),
        ),
        timeouts=Timeouts(
            connect=timeouts.get("connect", DEFAULT_CONNECT_TIMEOUT, positive),
            read=timeouts.get("read", DEFAULT_READ_TIMEOUT, positive),
            write=timeouts.get("write", DEFAULT_WRITE_TIMEOUT, positive),
            pool=timeouts.get("pool", DEFAULT_POOL_TIMEOUT, positive),
        ),
        workers=sec.get("workers", DEFAULT_WORKERS, _as_int(1)),
        verify_tls=sec.get("verify_tls", True, _as_bool),
    )
    return None if url is None else destination


def _read_destinations(top: _Section) -> tuple[dict[str, Destination], frozenset[str] | None]:
    """Every valid destination, and the names defined (None if they cannot be known)."""
    node = top.value_node("destinations")
    if node is None:
        top.missing("destinations")
        return {}, frozenset()
    if not isinstance(node, MappingNode):
        got = _describe_node(node)
        top.add("destinations", f"expected a mapping of destination names to settings, got {got}")
        return {}, None
    entries = _entries(top.ctx, "destinations", node)
    if not entries:
        top.add("destinations", "at least one destination is required")
    found: dict[str, Destination] = {}
    for name, (key_node, value_node) in entries.items():
        key = f"destinations.{name}"
        if not _NAME.fullmatch(name):
            top.ctx.add(key, "names may use only letters, digits, '_', '.' and '-'", key_node)
        sec = _Section(top.ctx, key, value_node, _DESTINATION_KEYS)
        destination = _read_destination(sec, name)
        if destination is not None:
            found[name] = destination
    return found, frozenset(entries)


def _read_source(
    sec: _Section, name: str | None, defaults: _SourceOptions, known: Collection[str] | None
) -> tuple[Source | None, _Folders]:
    as_path = _as_path(sec.ctx.base)
    watch = sec.need("watch", as_path)
    sent = sec.need("sent", as_path)
    failed = sec.need("failed", as_path)
    folders = _Folders(repr(name) if name else sec.key, sec, watch, sent, failed)
    destination = sec.need("destination", _as_destination(known))
    options = _read_options(sec, defaults)
    if name is None or watch is None or sent is None or failed is None or destination is None:
        return None, folders
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
        remove_empty_dirs=options.remove_empty_dirs,
    )
    return source, folders


def _read_sources(
    top: _Section, defaults: _SourceOptions, known: Collection[str] | None
) -> tuple[list[Source], list[_Folders]]:
    """Every valid source, and the folders of every source (valid or not)."""
    node = top.value_node("sources")
    if node is None:
        top.missing("sources")
        return [], []
    if not isinstance(node, SequenceNode):
        got = _describe_node(node)
        top.add("sources", f"expected a list of sources (each starting with '- name:'), got {got}")
        return [], []
    if not node.value:
        top.add("sources", "at least one source is required")
    sources: list[Source] = []
    folders: list[_Folders] = []
    first_line: dict[str, int | None] = {}
    for index, item in enumerate(node.value):
        sec = _Section(top.ctx, f"sources[{index}]", item, _SOURCE_KEYS)
        name = sec.need("name", _as_name)
        if name is not None and name in first_line:
            sec.add("name", f"duplicate source name (first used on line {first_line[name]})")
        elif name is not None:
            first_line[name] = sec.line("name")
        source, found = _read_source(sec, name, defaults, known)
        sources += [source] if source is not None else []
        folders.append(found)
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


def _check_folders(top: _Section, sources: list[_Folders], queue: Path | None) -> None:
    """Refuse folder layouts that would loop files or send them twice.

    Decision: a source's ``sent`` and ``failed`` folders MAY live inside its own ``watch``
    folder (the watcher excludes them), because many drop-folder setups keep everything
    under one share.  Everything else that could feed a file back in is an error:

    * ``watch`` equal to or inside its own ``sent`` or ``failed`` folder;
    * ``sent`` equal to ``failed`` (outcomes could not be told apart);
    * two sources whose ``watch`` folders are equal or nested (each file queued twice);
    * a source's ``sent``/``failed`` inside another source's ``watch`` (sent again there);
    * the queue database inside any ``watch`` folder.

    Paths are compared as written after ``~`` expansion and ``os.path.abspath``; symlinks
    are not resolved, so two spellings of one folder through a symlink are not detected.
    """
    for index, first in enumerate(sources):
        _check_own_folders(first)
        for second in sources[index + 1 :]:
            _check_pair(first, second)
        if queue is not None and first.watch is not None and _inside(queue, first.watch):
            top.add(
                "queue",
                f"is inside the watch folder of source {first.label} ({first.watch}); "
                "the queue database itself would be picked up",
            )


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


def _build(ctx: _Context, path: Path, root: Node) -> Config | None:
    top = _Section(ctx, "", root, _TOP_KEYS)
    queue = top.need("queue", _as_path(ctx.base))
    log_level = top.get("log_level", "INFO", _as_log_level)
    shutdown = top.get("shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT, _as_duration(positive=False))
    history_days = top.get("history_days", DEFAULT_HISTORY_DAYS, _as_number(0.0))
    retry = _read_retry(top.section("retry", _RETRY_KEYS))
    defaults_section = top.section("defaults", _SOURCE_OPTION_KEYS, _DEFAULTS_HINTS)
    defaults = _read_options(defaults_section, _SourceOptions())
    destinations, known = _read_destinations(top)
    sources, folders = _read_sources(top, defaults, known)
    _check_folders(top, folders, queue)
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
    )


def load_config(path: str | Path) -> Config:
    """Read, validate and return the configuration at ``path``; raise ``ConfigError``.

    Every problem found is collected (key path, message, line) and raised together in one
    ``ConfigError`` naming the file; problems are ordered by line.
    """
    config_path = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    root = _compose(config_path)
    if root is None:
        raise _fail(config_path, "the file is empty; it needs queue, sources and destinations")
    ctx = _Context(config_path.parent)
    config = _build(ctx, config_path, root)
    if config is None or ctx.problems:
        problems = ctx.problems or [ConfigProblem("", "the configuration is invalid")]
        raise ConfigError(str(config_path), sorted(problems, key=lambda p: p.line or 0))
    return config
