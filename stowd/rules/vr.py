"""DICOM keywords and values for metadata rules and sidecars: look up, check against the VR.

Contract (shared by engine.py, sidecar.py and rewrite.py):

* A ``Value`` is what a rule or sidecar writes into one attribute, already checked:
  ``None`` (zero-length, for Type 2 attributes), ``str`` (text VRs, DA/TM/DT, UI, PN, DS),
  ``int`` (IS, US, SS, UL, SL, UV, SV), ``float`` (FL, FD), a ``list`` of scalars for a value
  multiplicity above 1, or for SQ a ``list`` of items, each a ``dict`` keyword -> ``Value``.

``lookup`` finds a keyword in pydicom's data dictionary; ``check`` validates and normalizes a
value written by a person (YAML, JSON or a rendered template) by the rules of PS3.5 6.2, with
one checker function per VR in ``_CHECKS``.  Every error is a ``ValueError`` whose message
names the attribute, its VR and the bad value.
"""

from __future__ import annotations

import datetime as dt
import difflib
import functools
import importlib.util
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TypeAlias

from stowd import dicomlib

Scalar: TypeAlias = str | int | float
Value: TypeAlias = "Scalar | None | list[Scalar | Item]"  # noqa: RUF036
Item: TypeAlias = "dict[str, Value]"
Entry: TypeAlias = tuple[str, str, str, str, str]  # VR, VM, name, retired, keyword

PIXEL_DATA = 0x7FE00010
BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN", "AT", "NONE"})
_SINGLE_TEXT_VRS = frozenset({"ST", "LT", "UT", "UR"})  # VM 1; a backslash is just text
_INT_RANGES = {
    "IS": (-(2**31), 2**31 - 1),
    "US": (0, 2**16 - 1),
    "SS": (-(2**15), 2**15 - 1),
    "UL": (0, 2**32 - 1),
    "SL": (-(2**31), 2**31 - 1),
    "UV": (0, 2**64 - 1),
    "SV": (-(2**63), 2**63 - 1),
}
_FL_MAX = 3.4028234663852886e38
_DECIMAL = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_NOT_TEXT = "must be text, got the number {}; write it in quotes so YAML keeps it as written"


@dataclass(frozen=True)
class Attr:
    """One attribute of the DICOM data dictionary."""

    keyword: str
    tag: int
    vr: str
    vm: str


class _Invalid(ValueError):
    """What is wrong with a value, without the attribute's name (added by ``check``)."""


# --- keywords ---------------------------------------------------------------------------


def lookup(keyword: str) -> Attr:
    """The dictionary entry of ``keyword``; ``ValueError`` if unknown or not settable."""
    entry = _entries().get(keyword)
    if entry is None:
        raise ValueError(_unknown(keyword))
    tag, vr, vm = entry
    _refuse_tag(keyword, tag)
    return Attr(keyword, tag, vr.split(" or ")[0], vm)


def suggest(keyword: str) -> str | None:
    """The known keyword ``keyword`` was probably meant to be, if any."""
    lowered = _lowered()
    if keyword.lower() in lowered:
        return lowered[keyword.lower()]
    close = difflib.get_close_matches(keyword.lower(), list(lowered), n=1, cutoff=0.8)
    return lowered[close[0]] if close else None


@functools.cache
def dictionary() -> tuple[dict[int, Entry], dict[str, Entry]]:
    """pydicom's data dictionary: tag -> entry, and the repeating groups' mask (``60xx3000``)
    -> entry.  Importing any module of pydicom imports the whole package (0.2-0.3 s of CPU,
    with numpy when installed), which a config with a rule made ``stowd status`` and
    ``check-config`` pay for a dictionary that is plain data (issue 19): its file is read on
    its own, pydicom's own module used when pydicom is imported already or the file cannot
    be read alone."""
    module = None if "pydicom" in sys.modules else _dictionary_alone()
    if module is None:
        dicomlib.load()  # imported whole, or being imported by another thread: waited for
        from pydicom import _dicom_dict  # noqa: PLC0415

        module = _dicom_dict
    found: tuple[dict[int, Entry], dict[str, Entry]]
    found = (module.DicomDictionary, module.RepeatersDictionary)
    return found


def _dictionary_alone() -> ModuleType | None:
    """pydicom's ``_dicom_dict.py`` run as a module of its own, not part of the package (it
    imports nothing; its bytecode is the one pydicom's import cached); None when it is not
    found, or no longer runs alone."""
    package = importlib.util.find_spec("pydicom")  # finds the package, runs none of it
    folders = None if package is None else package.submodule_search_locations
    if not folders:
        return None
    path = os.path.join(next(iter(folders)), "_dicom_dict.py")
    spec = importlib.util.spec_from_file_location("_stowd_pydicom_dicom_dict", path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception:  # a later pydicom's file that no longer runs alone: its own import
        return None
    return module


@functools.cache
def _entries() -> dict[str, tuple[int, str, str]]:
    """keyword -> (tag, VR, VM); repeating groups (60xx...) use their first group."""
    tags, repeaters = dictionary()
    entries = {e[4]: (tag, e[0], e[1]) for tag, e in tags.items() if e[4]}
    for mask, (vr, vm, _, _, kw) in repeaters.items():
        entries.setdefault(kw, (int(mask.replace("x", "0"), 16), vr, vm))
    return entries


@functools.cache
def _lowered() -> dict[str, str]:
    return {kw.lower(): kw for kw in _entries()}


def _unknown(keyword: str) -> str:
    near = suggest(keyword)
    if near is not None:
        return f"unknown DICOM keyword {keyword!r}; did you mean {near!r}?"
    return f"unknown DICOM keyword {keyword!r}; keywords are spelled as in DICOM, e.g. 'PatientID'"


def _refuse_tag(keyword: str, tag: int) -> None:
    group = tag >> 16
    if group == 0x0002:  # with its group length; (0000,0000) is a command
        reason = "is part of the File Meta Information, which stowd writes itself"
    elif group == 0x0000:
        reason = "belongs to DICOM network commands, not to stored files"
    elif tag >= PIXEL_DATA:
        reason = "comes after the pixel data and cannot be changed by rules"
    else:
        return
    raise ValueError(f"{keyword} {_tag_text(tag)} {reason}")


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


# --- values -----------------------------------------------------------------------------


def check(keyword: str, value: object) -> Value:
    """``value`` validated for ``keyword`` and normalized to a ``Value``; else ``ValueError``."""
    return _check(lookup(keyword), value, keyword)


def check_single(keyword: str, value: object, index: int, count: int) -> None:
    """Check value ``index`` of ``count`` written for ``keyword`` on its own (not the count)."""
    attr = lookup(keyword)
    try:
        _check_one(attr.vr, _one_of_list(attr.vr, value, index), index, count)
    except _Invalid as exc:
        raise ValueError(f"{keyword} ({attr.vr}) {exc}") from None


def _check(attr: Attr, value: object, path: str) -> Value:
    try:
        return _check_value(attr, value, path)
    except _Invalid as exc:
        raise ValueError(f"{path} ({attr.vr}) {exc}") from None


def _check_value(attr: Attr, value: object, path: str) -> Value:
    if attr.vr in BINARY_VRS:
        raise _Invalid("cannot be set by rules or sidecars (binary data)")
    if _is_empty(value):
        return None
    if attr.vr == "SQ":
        return _check_items(value, path)
    if isinstance(value, dict):
        raise _Invalid(f"takes a value or a list of values, not a mapping, got {_show(value)}")
    values = _split(attr.vr, value)
    _check_count(attr.vm, len(values), isinstance(value, str))
    checked = [_check_one(attr.vr, v, i, len(values)) for i, v in enumerate(values, 1)]
    many: list[Scalar | Item] = [*checked]
    return checked[0] if len(checked) == 1 else many


def _is_empty(value: object) -> bool:
    return value is None or value == [] or (isinstance(value, str) and not value.strip())


def _split(vr: str, value: object) -> list[object]:
    """The single values: a list, or text with backslashes between values."""
    if isinstance(value, list):
        return [_one_of_list(vr, v, i) for i, v in enumerate(value, 1)]
    if isinstance(value, str) and vr not in _SINGLE_TEXT_VRS:
        return list[object](value.split("\\"))
    return [value]


def _one_of_list(vr: str, value: object, index: int) -> object:
    if isinstance(value, (list, dict)):
        raise _Invalid(f"value {index} must be a single value, got {_show(value)}")
    if isinstance(value, str) and "\\" in value and vr not in _SINGLE_TEXT_VRS:
        raise _Invalid(f"value {index} contains a backslash, which separates values: {value!r}")
    return value


def _check_one(vr: str, value: object, index: int, count: int) -> Scalar:
    where = f"value {index} of {count} " if count > 1 else ""
    if isinstance(value, str):
        value = value.rstrip() if vr in _SINGLE_TEXT_VRS else value.strip()
    try:
        if value is None or value == "":
            raise _Invalid("is empty")
        if isinstance(value, bool):
            raise _Invalid(f"got {_show(value)}: true/false is not a DICOM value; write text")
        return _CHECKS[vr](value)
    except _Invalid as exc:
        raise _Invalid(f"{where}{exc}") from None


def _check_count(vm: str, count: int, text: bool) -> None:
    low, high, step = _parse_vm(vm)
    if low <= count and (high is None or count <= high) and count % step == 0:
        return
    got = f"got {count}" + (" (a backslash separates values)" if text and count > 1 else "")
    if step > 1:
        raise _Invalid(f"takes a multiple of {step} values ({step}, {2 * step}, ...), {got}")
    if high is None:
        raise _Invalid(f"takes {low} or more values, {got}")
    wanted = "one value" if high == 1 else f"{high} values"
    raise _Invalid(f"takes {wanted if low == high else f'{low} to {high} values'}, {got}")


def _parse_vm(vm: str) -> tuple[int, int | None, int]:
    """VM text -> (fewest, most or None, step): '1' -> (1, 1, 1), '2-2n' -> (2, None, 2)."""
    low, _, high = vm.partition("-")
    if not high:
        return int(low), int(low), 1
    if high.endswith("n"):
        return int(low), None, int(high[:-1] or 1)
    return int(low), int(high), 1


def _check_items(value: object, path: str) -> list[Scalar | Item]:
    if not isinstance(value, list):
        raise _Invalid(f"is a sequence: it takes a list of items, got {_show(value)}")
    items: list[Scalar | Item] = []
    problems: list[str] = []
    for index, item in enumerate(value):
        try:
            items.append(_check_item(item, f"{path}[{index}]"))
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise ValueError("; ".join(problems))
    return items


def _check_item(item: object, path: str) -> Item:
    if not isinstance(item, dict):
        raise ValueError(f"{path} must be a mapping of keywords to values, got {_show(item)}")
    checked: Item = {}
    problems: list[str] = []
    for key, value in item.items():
        try:
            checked[key] = _check(_lookup_in(key, path), value, f"{path}.{key}")
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise ValueError("; ".join(problems))
    return checked


def _lookup_in(key: object, path: str) -> Attr:
    if not isinstance(key, str):
        raise ValueError(f"{path}: {key!r} is not a DICOM keyword")
    try:
        return lookup(key)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _show(value: object) -> str:
    """A value as the person wrote it, for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    return repr(value)


# --- one checker per VR -----------------------------------------------------------------


def _text_of(value: object) -> str:
    """Text, or a whole number as its digits; a float is refused (1.10 was read as 1.1)."""
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        raise _Invalid(_NOT_TEXT.format(_show(value)))
    raise _Invalid(f"must be text, got {_show(value)}")


def _text(limit: int | None, controls: str = "\x1b") -> Callable[[object], Scalar]:
    """A checker for free text of at most ``limit`` characters."""

    def checker(value: object) -> Scalar:
        text = _text_of(value)
        _check_length(text, limit)
        _check_controls(text, controls)
        return text

    return checker


def _check_length(text: str, limit: int | None) -> None:
    if limit is not None and len(text) > limit:
        raise _Invalid(f"must be at most {limit} characters, got {len(text)}: {text!r}")


def _check_controls(text: str, allowed: str) -> None:
    bad = [c for c in text if (ord(c) < 32 or ord(c) == 127) and c not in allowed]
    if bad:
        raise _Invalid(f"must not contain control characters such as {bad[0]!r}, got {text!r}")


def _ae(value: object) -> Scalar:
    return _text(16, "")(value)


def _as(value: object) -> Scalar:
    text = _text_of(value)
    if not re.fullmatch(r"\d{3}[DWMY]", text):
        raise _Invalid(
            f"must be an age written nnnD, nnnW, nnnM or nnnY (e.g. '045Y'), got {text!r}"
        )
    return text


def _cs(value: object) -> Scalar:
    text = _text_of(value)
    _check_length(text, 16)
    if re.fullmatch(r"[A-Z0-9 _]*", text):
        return text
    if re.fullmatch(r"[A-Z0-9 _]*", text.upper()):
        raise _Invalid(f"must be upper case: write {text.upper()!r}, got {text!r}")
    raise _Invalid(f"may only hold A-Z, 0-9, space and underscore, got {text!r}")


def _da(value: object) -> Scalar:
    if isinstance(value, dt.datetime):
        raise _Invalid(f"takes a date without a time, got {_show(value)}")
    if isinstance(value, dt.date):
        return f"{value.year:04d}{value.month:02d}{value.day:02d}"
    text = _text_of(value)
    if re.fullmatch(r"\d{8}", text) and _is_date(text):
        return text
    raise _Invalid(f"must be a date written YYYYMMDD, got {_show(value)}{_da_hint(text)}")


def _da_hint(text: str) -> str:
    m = re.fullmatch(r"(\d{4})[-/.](\d{2})[-/.](\d{2})", text)
    compact = "".join(m.groups()) if m else ""
    return f"; write {compact!r}" if m and _is_date(compact) else ""


def _is_date(text: str) -> bool:
    """Whether YYYY[MM[DD]] is a real calendar date."""
    parts = (text[0:4], text[4:6] or "01", text[6:8] or "01")
    try:
        dt.date(*(int(p) for p in parts))
    except ValueError:
        return False
    return True


def _is_time(text: str) -> bool:
    """Whether HH[MM[SS[.F]]] has valid hours, minutes and seconds (60: a leap second)."""
    hh, mm, ss = int(text[0:2]), int(text[2:4] or 0), int(text[4:6] or 0)
    return hh < 24 and mm < 60 and ss <= 60


_DT = re.compile(r"(\d{4}(?:\d\d(?:\d\d(?:\d\d(?:\d\d(?:\d\d(?:\.\d{1,6})?)?)?)?)?)?)([+-]\d{4})?")
_TM = re.compile(r"\d\d(?:\d\d(?:\d\d(?:\.\d{1,6})?)?)?")


def _dt(value: object) -> Scalar:
    if isinstance(value, dt.datetime):
        return _format_dt(value)
    if isinstance(value, dt.date):
        return _da(value)
    text = _text_of(value)
    m = _DT.fullmatch(text)
    if m and _is_date(m[1][:8]) and _is_time(m[1][8:] or "00") and _is_offset(m[2]):
        return text
    raise _Invalid(
        "must be a date and time written YYYYMMDDHHMMSS.FFFFFF&ZZXX (later parts optional, "
        f"&ZZXX a UTC offset such as +0100), got {_show(value)}"
    )


def _is_offset(text: str | None) -> bool:
    return text is None or (-1200 <= int(text) <= 1400 and int(text[3:]) < 60)


def _format_dt(value: dt.datetime) -> str:
    text = f"{value.year:04d}{value:%m%d%H%M%S}"
    text += f".{value.microsecond:06d}" if value.microsecond else ""
    offset = value.utcoffset()
    if offset is not None:
        minutes = int(offset.total_seconds()) // 60
        text += f"{'-' if minutes < 0 else '+'}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"
    return text


def _tm(value: object) -> Scalar:
    if isinstance(value, dt.time):
        return f"{value:%H%M%S}" + (f".{value.microsecond:06d}" if value.microsecond else "")
    if isinstance(value, (int, float)):
        raise _Invalid(
            f"got the number {_show(value)}, which is ambiguous for a time (leading zeros are "
            "lost); write the time as text in quotes, e.g. '093000' for 9:30"
        )
    text = _text_of(value)
    if _is_tm(text):
        return text
    hint = text.replace(":", "")
    fix = f"; write {hint!r}" if ":" in text and _is_tm(hint) else ""
    raise _Invalid(
        "must be a time written HHMMSS.FFFFFF (later parts optional, hours 00-23), "
        f"got {text!r}{fix}"
    )


def _is_tm(text: str) -> bool:
    return bool(_TM.fullmatch(text)) and _is_time(text)


def _pn(value: object) -> Scalar:
    text = _text_of(value)
    _check_controls(text, "\x1b")
    groups = text.split("=")
    if len(groups) > 3:
        raise _Invalid(f"has at most 3 '='-separated groups, got {len(groups)}: {text!r}")
    for group in groups:
        _check_length(group, 64)
        if group.count("^") > 4:
            raise _Invalid(f"has at most 5 '^'-separated name parts, got {text!r}")
    return text


def _ui(value: object) -> Scalar:
    if isinstance(value, float):
        raise _Invalid(
            f"got the number {_show(value)}: a UID must be written in quotes in YAML, "
            "e.g. '1.2.840.10008.5.1.4.1.1.7', or it is read as a number"
        )
    text = _text_of(value)
    _check_length(text, 64)
    parts = text.split(".")
    if not all(re.fullmatch(r"0|[1-9]\d*", p) for p in parts):
        raise _Invalid(
            "must be digits separated by single dots, with no part starting with 0 "
            f"(except '0' itself), got {text!r}"
        )
    return text


def _integer(vr: str) -> Callable[[object], Scalar]:
    """A checker for the integer VR ``vr`` (IS: its range keeps it within 12 characters)."""
    low, high = _INT_RANGES[vr]

    def checker(value: object) -> Scalar:
        number = _whole(value)
        if not low <= number <= high:
            raise _Invalid(f"must be between {low} and {high}, got {_show(value)}")
        return number

    return checker


def _whole(value: object) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value):
        return int(value)
    raise _Invalid(f"must be a whole number, got {_show(value)}")


def _ds(value: object) -> Scalar:
    if isinstance(value, float):
        return _ds_float(value)
    text = _text_of(value)
    if not _DECIMAL.fullmatch(text):
        raise _Invalid(f"must be a decimal number such as '1.5' or '-2e-3', got {_show(value)}")
    _check_length(text, 16)
    return text


def _ds_float(value: float) -> str:
    if not math.isfinite(value):
        raise _Invalid(f"must be a finite number, got {_show(value)}")
    forms = (repr(value), *(format(value, f".{digits}g") for digits in range(16, 0, -1)))
    return next(text for text in forms if len(text) <= 16)


def _float(limit: float) -> Callable[[object], Scalar]:
    """A checker for FL (``limit``: the largest 32-bit float) or FD."""

    def checker(value: object) -> Scalar:
        number = _number(value)
        if not math.isfinite(number):
            raise _Invalid(f"must be a finite number, got {_show(value)}")
        if abs(number) > limit:
            raise _Invalid(f"must be between -{limit:.7g} and {limit:.7g}, got {_show(value)}")
        return number

    return checker


def _number(value: object) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and _DECIMAL.fullmatch(value):
        return float(value)
    raise _Invalid(f"must be a number, got {_show(value)}")


_CHECKS: dict[str, Callable[[object], Scalar]] = {
    "AE": _ae,
    "AS": _as,
    "CS": _cs,
    "DA": _da,
    "DS": _ds,
    "DT": _dt,
    "FL": _float(_FL_MAX),
    "FD": _float(math.inf),
    "IS": _integer("IS"),
    "LO": _text(64),
    "LT": _text(10240, "\t\n\f\r\x1b"),
    "PN": _pn,
    "SH": _text(16),
    "SL": _integer("SL"),
    "SS": _integer("SS"),
    "ST": _text(1024, "\t\n\f\r\x1b"),
    "SV": _integer("SV"),
    "TM": _tm,
    "UC": _text(None),
    "UI": _ui,
    "UL": _integer("UL"),
    "UR": _text(None, ""),
    "US": _integer("US"),
    "UT": _text(None, "\t\n\f\r\x1b"),
    "UV": _integer("UV"),
}
