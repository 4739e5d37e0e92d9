"""Walking a YAML node tree with key paths and line numbers, and converting its values.

Used by ``load.py`` and ``ruleconfig.py``: a ``Section`` reads one mapping, checks its keys
and converts values with the ``as_*`` converters; every problem is added to the ``Context``
with its key path and line, so a bad file is reported completely in one go.
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

from stowd.errors import ConfigProblem

# --------------------------------------------------------------------------- value parsing

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

_T = TypeVar("_T")
NAME = re.compile(r"[A-Za-z0-9_.-]+")
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
# A rate's unit is required and written as usual (case matters: bit is b, byte is B).
_RATE = re.compile(_NUMBER + r"\s*(?P<unit>\S*)")
_BITS = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9}
_RATE_UNITS = {
    **{f"{p}bit/s": n / 8 for p, n in _BITS.items()},
    **{f"{p}bps": n / 8 for p, n in _BITS.items()},
    "B/s": 1,
    "kB/s": 10**3,
    "KB/s": 10**3,
    "MB/s": 10**6,
    "GB/s": 10**9,
    "KiB/s": 2**10,
    "MiB/s": 2**20,
    "GiB/s": 2**30,
}
_RATE_HINT = "expected a rate with its unit, such as 50Mbit/s, 10MB/s or 500KiB/s"


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


def parse_rate(text: object) -> float:
    """Bytes per second from a rate with its unit: ``50Mbit/s``, ``10MB/s``, ``500KiB/s``.

    Units (case as written here): bit/s, kbit/s (Kbit/s), Mbit/s, Gbit/s and bps, kbps
    (Kbps), Mbps, Gbps (bits, decimal); B/s, kB/s (KB/s), MB/s, GB/s (bytes, decimal);
    KiB/s, MiB/s, GiB/s (bytes, binary).  Raises ``ValueError`` with a message for humans
    on anything else: no unit, an unknown unit, 0 or a negative rate.
    """
    written = isinstance(text, str | int | float) and not isinstance(text, bool)
    match = _RATE.fullmatch(str(text).strip()) if written else None
    if match is None:
        raise ValueError(f"{_RATE_HINT}, got {describe_value(text)}")
    if not match["unit"]:
        raise ValueError(
            f"a unit is required, such as 50Mbit/s or 10MB/s, got {describe_value(text)}"
        )
    unit = match["unit"]
    factor = _RATE_UNITS.get(unit)
    if factor is None:
        raise ValueError(_unknown_rate_unit(unit, text))
    rate = float(match["num"]) * factor
    if not rate > 0:
        raise ValueError(f"must be more than 0, got {describe_value(text)}")
    if math.isinf(rate):  # 309 digits or more: no cap at all, shown as 'inf'
        raise ValueError(f"too large to be a rate, got {describe_value(text)}")
    return rate


def _unknown_rate_unit(unit: str, text: object) -> str:
    got = describe_value(text)
    if re.match(r"[eE][-+]?\d", unit):  # "1e3MB/s": the unit is not 'e3MB/s'
        return f"a rate is written without an exponent, such as 1000MB/s, got {got}"
    bits_or_bytes = re.fullmatch(r"([kKmMgG]?)b/s", unit)
    if bits_or_bytes:  # "Mb/s": megabits to some, megabytes to others
        p = bits_or_bytes[1].upper().replace("K", "k")
        return f"unknown unit {unit!r} in {got}: write {p}bit/s for bits or {p}B/s for bytes"
    same = [u for u in _RATE_UNITS if u.lower() == unit.lower()]
    if same:
        return f"unknown unit {unit!r} in {got} (case matters): did you mean {same[0]}?"
    known = ", ".join(u for u in _RATE_UNITS if u not in ("Kbit/s", "Kbps", "KB/s"))
    return f"unknown unit {unit!r} in {got}; known units: {known}"


def describe_value(value: object) -> str:
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
            raise ValueError(f"{hint}, got {describe_value(value)}")
        return float(value), ""
    match = pattern.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{hint}, got {describe_value(value)}")
    return match["num"], (match["unit"] or "").lower()


def _not_negative(number: float, value: object) -> None:
    if number < 0:
        raise ValueError(f"must not be negative, got {describe_value(value)}")


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
            raise ValueError(f"{_SIZE_HINT} (whole bytes), got {describe_value(value)}")
    _not_negative(size, value)
    return size


# --------------------------------------------------------------------------- converters
# Each converter turns a value built by the YAML safe constructor into a typed value, or
# raises ValueError with a message; the message is reported with the key path and line.


def as_duration(*, positive: bool) -> Callable[[object], float]:
    def convert(value: object) -> float:
        seconds = _duration_of(value)
        if positive and seconds <= 0:
            raise ValueError(f"must be more than 0 seconds, got {describe_value(value)}")
        return seconds

    return convert


def as_rate(value: object) -> float | None:
    """A rate cap in bytes per second (``parse_rate``)."""
    return parse_rate(value)


def as_size(value: object) -> int:
    size = _size_of(value)
    if size < 1:
        raise ValueError(f"must be at least 1 byte, got {describe_value(value)}")
    return size


def as_number(minimum: float) -> Callable[[object], float]:
    def convert(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected a number, got {describe_value(value)}")
        if not math.isfinite(value) or value < minimum:
            raise ValueError(
                f"must be a number of at least {minimum:g}, got {describe_value(value)}"
            )
        return float(value)

    return convert


def as_int(minimum: int) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected a whole number, got {describe_value(value)}")
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")
        return value

    return convert


def as_cpu(value: object) -> int | None:
    """``cpu:``: a core number (0 or more), or ``auto`` (None)."""
    if value == "auto" and isinstance(value, str):
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"expected a CPU core number such as 1, or auto, got {describe_value(value)}"
        )
    if value < 0:
        raise ValueError(f"a CPU core number is 0 or more, got {value}")
    return value


def as_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false (without quotes), got {describe_value(value)}")
    return value


def as_text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected text, got {describe_value(value)}")
    return value.strip()


def as_choice(choices: Collection[str]) -> Callable[[object], str]:
    """One of ``choices`` (written exactly so)."""

    def convert(value: object) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {describe_value(value)}")
        return value

    return convert


def as_name(value: object) -> str:
    name = as_text(value)
    if not NAME.fullmatch(name):
        raise ValueError(f"names may use only letters, digits, '_', '.' and '-', got {name!r}")
    return name


def as_log_level(value: object) -> str:
    level = as_text(value).upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got {describe_value(value)}")
    return level


def as_url(value: object) -> str:
    url = as_text(value)
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


def as_dicomweb_base(value: object) -> str:
    """A destination's url: the DICOMweb base, to which stowd adds ``/studies`` itself."""
    url = as_url(value)
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    if path.lower().endswith("/studies"):
        base = parts._replace(path=path[: -len("/studies")]).geturl()
        raise ValueError(
            f"ends with /studies, which stowd adds itself: the url is the DICOMweb base, "
            f"here {redact_url(base)!r}"
        )
    return url


def as_patterns(value: object) -> tuple[str, ...]:
    items = value if isinstance(value, list) else []
    patterns = [item for item in items if isinstance(item, str) and item]
    if not isinstance(value, list) or len(patterns) != len(items):
        raise ValueError(
            "expected a list of file name patterns such as ['.*', '*.part'], "
            f"got {describe_value(value)}"
        )
    for pattern in patterns:
        if "/" in pattern:
            raise ValueError(f"patterns match the file name only; {pattern!r} can never match")
    return tuple(patterns)


def as_path(base: Path) -> Callable[[object], Path]:
    def convert(value: object) -> Path:
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"expected a folder or file path, got {describe_value(value)}")
        expanded = os.path.expanduser(value.strip())
        return Path(os.path.abspath(os.path.join(base, expanded)))

    return convert


def as_destination(known: Collection[str] | None) -> Callable[[object], str]:
    def convert(value: object) -> str:
        name = as_text(value)
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


def line_of(node: Node | None) -> int | None:
    return None if node is None else int(node.start_mark.line) + 1


def join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def value_of(node: Node, loader_class: type[yaml.SafeLoader] = yaml.SafeLoader) -> object:
    """The Python value of a node, built by PyYAML's safe constructor (or ``loader_class``)."""
    loader = loader_class("")
    try:
        return loader.construct_object(node, deep=True)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        raise ValueError(f"cannot read this value: {problem}") from None
    finally:
        loader.dispose()


def describe_node(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    try:
        return describe_value(value_of(node))
    except ValueError:
        return repr(node.value)


def is_null(node: Node | None) -> bool:
    return isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:null"


@dataclass
class Context:
    """Where relative paths start, and every problem found so far."""

    base: Path
    problems: list[ConfigProblem] = field(default_factory=list)

    def add(self, key: str, message: str, node: Node | None) -> None:
        self.problems.append(ConfigProblem(key, message, line_of(node)))


Entries = dict[str, tuple[Node, Node]]


def entries(ctx: Context, key: str, node: MappingNode) -> Entries:
    """The text keys of a mapping; odd or repeated keys are reported and skipped."""
    entries: Entries = {}
    for key_node, value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            ctx.add(key, "YAML merge keys (<<) are not supported; use 'defaults'", key_node)
        elif not isinstance(key_node, ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
            ctx.add(key, f"keys must be text, got {describe_node(key_node)}", key_node)
        elif key_node.value in entries:
            first = line_of(entries[key_node.value][0])
            message = f"duplicate key (first given on line {first})"
            ctx.add(join(key, key_node.value), message, key_node)
        else:
            entries[key_node.value] = (key_node, value_node)
    return entries


def unknown_key(name: str, allowed: Collection[str]) -> str:
    close = difflib.get_close_matches(name, list(allowed), n=1, cutoff=0.6)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    return f"unknown key; expected one of: {', '.join(allowed)}"


class Section:
    """One YAML mapping of the config with its key path; reads and checks its entries.

    An absent or empty (null) section reads as empty, so every key gets its default.
    A section of the wrong type is reported once and its missing keys are not.
    """

    def __init__(
        self,
        ctx: Context,
        key: str,
        node: Node | None,
        allowed: Collection[str],
        hints: Mapping[str, str] | None = None,
    ) -> None:
        self.ctx, self.key, self.node = ctx, key, node
        self.broken = node is not None and not is_null(node) and not isinstance(node, MappingNode)
        self.entries: Entries = {}
        if self.broken and node is not None:
            ctx.add(key, f"expected a mapping of keys to values, got {describe_node(node)}", node)
        elif isinstance(node, MappingNode):
            self.entries = entries(ctx, key, node)
        for name, (key_node, _) in self.entries.items():
            if name not in allowed:
                message = (hints or {}).get(name) or unknown_key(name, allowed)
                ctx.add(join(key, name), message, key_node)

    def value_node(self, name: str) -> Node | None:
        entry = self.entries.get(name)
        return None if entry is None else entry[1]

    def line(self, name: str) -> int | None:
        return line_of(self.value_node(name) or self.node)

    def add(self, name: str, message: str) -> None:
        self.ctx.add(join(self.key, name), message, self.value_node(name) or self.node)

    def missing(self, name: str) -> None:
        if not self.broken:
            self.ctx.add(join(self.key, name), "required key is missing", self.node)

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
    ) -> Section:
        return Section(self.ctx, join(self.key, name), self.value_node(name), allowed, hints)

    def _convert(self, name: str, node: Node, convert: Callable[[object], _T]) -> _T | None:
        try:
            return convert(value_of(node))
        except ValueError as exc:
            self.ctx.add(join(self.key, name), str(exc), node)
            return None


def host_port(host: str, port: int) -> str:
    """``host:port`` as a person writes it: an IPv6 address in brackets (``[::1]:104``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def redact_url(url: str) -> str:
    """``url`` with everything between ``://`` and the last ``@`` hidden.

    Done on the text, not with urlsplit: a password with an unescaped ``#``, ``/`` or ``?``
    is mis-parsed by urlsplit and would leak.
    """
    scheme, sep, rest = url.partition("://")
    if "@" not in (rest if sep else url):
        return url
    if not sep:  # no scheme (a mistake): hide everything before the last "@" all the same
        return f"***@{url.rpartition('@')[2]}"
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


# --------------------------------------------------------------------------- DICOM values
# YAML 1.1 reads 0012345 as octal and 10:30 as base 60: silently wrong for a PatientID or a
# time.  DICOM values (rules and sidecars) are read with this loader instead.
_DECIMAL_INT = re.compile(r"-?[1-9][0-9]*|0")  # what YAML reads as an int and is kept one


class DicomLoader(yaml.SafeLoader):
    """YAML's safe loader without aliases (no bombs), keeping 10:30 and 0123 as written."""

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            mark = self.current_event.start_mark
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed", mark)
        return super().compose_node(parent, index)


def _timestamp(loader: DicomLoader, node: yaml.ScalarNode) -> object:
    """A YAML date, or its text if it is impossible (1980-02-30): vr.check then explains."""
    try:
        return loader.construct_yaml_timestamp(node)
    except ValueError:
        return loader.construct_scalar(node)


def _int(loader: DicomLoader, node: yaml.ScalarNode) -> object:
    """A plain decimal integer; 0123 (octal), 10:30 (base 60), 0x1F, 1_000, +5 stay text."""
    text = loader.construct_scalar(node)
    return loader.construct_yaml_int(node) if _DECIMAL_INT.fullmatch(text) else text


def _float(loader: DicomLoader, node: yaml.ScalarNode) -> object:
    """A YAML float, but 10:30:00.5 (base 60 in YAML 1.1) stays text."""
    text = loader.construct_scalar(node)
    return text if ":" in text else loader.construct_yaml_float(node)


DicomLoader.add_constructor("tag:yaml.org,2002:timestamp", _timestamp)
DicomLoader.add_constructor("tag:yaml.org,2002:int", _int)
DicomLoader.add_constructor("tag:yaml.org,2002:float", _float)
