"""Sidecars: small JSON or YAML files beside dropped files that give DICOM attribute values.

For a data file ``dir/img.jpg`` the sidecars are, in the order they are applied (later wins,
key by key): the folder sidecar ``dir/<folder>`` (e.g. ``_metadata.yaml``), then the per-file
sidecars ``dir/img.json|yaml|yml`` (stem form) and ``dir/img.jpg.json|yaml|yml`` (full-name
form).  A sidecar holds either keywords -> values (``PatientID: X``) or the DICOM JSON model
of PS3.18 F.2 (``{"00100020": {"vr": "LO", "Value": ["X"]}}``); every value is checked with
``vr.check``, and a sidecar with problems raises one ``FileProblem`` listing all of them.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from collections.abc import Callable, Collection
from pathlib import Path
from typing import BinaryIO

import yaml

from stowd import dicomlib
from stowd.config.model import Sidecars
from stowd.config.yamlwalk import DicomLoader
from stowd.errors import FileProblem, FileUnreadable, FileVanished, judging_input
from stowd.rules import vr
from stowd.rules.vr import Item

SUFFIXES = (".json", ".yaml", ".yml")
MAX_BYTES = 1024 * 1024
_LOOKED_FOR = (*SUFFIXES, *(s.upper() for s in SUFFIXES))  # names tried beside a data file
_TAG = re.compile(r"[0-9A-Fa-f]{8}")
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
_PLAIN = "stowd reads a sidecar only as a regular file in the drop folder, never through a link"


# --- which sidecars apply ---------------------------------------------------------------


def is_sidecar(path: Path, settings: Sidecars) -> bool:
    """Whether ``path`` is a sidecar (kept back from upload) under ``settings``."""
    if path.name == settings.folder:
        return True
    return settings.per_file and path.suffix.lower() in SUFFIXES


def sidecars_of(path: Path, settings: Sidecars) -> list[Path]:
    """The existing sidecars of data file ``path``, in the order they are applied."""
    names = [settings.folder] if settings.folder else []
    if settings.per_file:
        names += _per_file_names(path.name)
    return _existing(path.parent, names)


def _per_file_names(name: str) -> list[str]:
    """The per-file sidecar names of data file ``name``: stem forms, then full-name forms."""
    stem = Path(name).stem
    return [*(stem + s for s in _LOOKED_FOR), *(name + s for s in _LOOKED_FOR)]


def _existing(folder: Path, names: list[str]) -> list[Path]:
    """The regular files among ``names`` in ``folder``, each file once (case-blind disks)."""
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for name in dict.fromkeys(names):
        info = _stat(folder / name)
        if info is not None and stat.S_ISREG(info.st_mode):
            if (info.st_dev, info.st_ino) not in seen:
                found.append(folder / name)
            seen.add((info.st_dev, info.st_ino))
    return found


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:  # <name>.json of a very long name cannot exist
            return None
        raise _unreadable(path, exc) from exc


def still_needed(sidecar: Path, settings: Sidecars, *, leaving: Collection[Path]) -> bool:
    """Whether a data file other than ``leaving`` still uses ``sidecar`` in its folder."""
    here = sidecar.parent.resolve()
    gone = {p.name for p in leaving if p.parent.resolve() == here}
    names = [n for n in _data_files(sidecar.parent, settings) if n not in gone]
    if sidecar.name == settings.folder:
        return bool(names)
    return settings.per_file and any(sidecar.name in _per_file_names(n) for n in names)


def folder_in_use(folder: Path, settings: Sidecars) -> bool:
    """Any file in ``folder`` that is not a sidecar, hidden ones included (a copy in
    progress under a temporary name still needs the folder's sidecar)."""
    try:
        with os.scandir(folder) as entries:
            return any(e.is_file() and not is_sidecar(Path(e.name), settings) for e in entries)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise FileUnreadable.from_os_error(exc, str(folder)) from exc


def _data_files(folder: Path, settings: Sidecars) -> list[str]:
    """Names of the files directly in ``folder`` that are neither hidden nor sidecars."""
    try:
        with os.scandir(folder) as entries:
            files = [e.name for e in entries if not e.name.startswith(".") and e.is_file()]
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise FileUnreadable.from_os_error(exc, str(folder)) from exc
    return [name for name in files if not is_sidecar(Path(name), settings)]


Used = list[tuple[Path, str]]  # the sidecars a file was read with, and their text then


def read_all(path: Path, settings: Sidecars) -> Used:
    """The sidecars of ``path`` with their text, in the order they are applied."""
    return [(sidecar, _read_text(sidecar)) for sidecar in sidecars_of(path, settings)]


def values_of(used: Used) -> Item:
    """The values the sidecars give (later ones win); ``FileProblem`` for a bad one."""
    merged: Item = {}
    for sidecar, text in used:
        merged.update(parse(sidecar, text))
    return merged


def load(path: Path, settings: Sidecars) -> tuple[Item, list[Path]]:
    """The values all sidecars of ``path`` give (later ones win) and the sidecars used."""
    used = read_all(path, settings)
    return values_of(used), [sidecar for sidecar, _ in used]


def text_of(path: Path) -> str | None:
    """A sidecar's text now; None when it is gone or cannot be read."""
    try:
        return _read_text(path)
    except (FileProblem, FileUnreadable):
        return None


# --- reading one sidecar ----------------------------------------------------------------


def read_sidecar(path: Path) -> Item:
    """The checked values of one sidecar; ``FileProblem`` listing every problem in it."""
    return parse(path, _read_text(path))


def parse(path: Path, text: str) -> Item:
    """The checked values in ``text``, read from the sidecar ``path``."""
    with judging_input(f"sidecar {path.name}", str(path)):  # e.g. a number of 5,000 digits
        return _read(path, text)


def _read(path: Path, text: str) -> Item:
    data = _parse(path, text)
    if data is None:  # only comments
        return {}
    if not isinstance(data, dict):
        raise _problem(path, f"must hold keywords and their values, got {_kind(data)}")
    item, problems = _checked(data)
    if problems:
        raise _problem(path, "; ".join(problems))
    return item


def _problem(path: Path, message: str) -> FileProblem:
    return FileProblem(f"sidecar {path.name}: {message}", path=str(path))


def _unreadable(path: Path, exc: OSError) -> FileUnreadable:
    """Name the sidecar, not the data file, when it cannot be read."""
    plain = FileUnreadable.from_os_error(exc, str(path))
    return FileUnreadable(f"cannot read its sidecar {path.name}: {plain}", path=str(path))


def read_text(path: Path) -> str:
    """The text of a sidecar (at most 1 MiB of UTF-8)."""
    return _read_text(path)


def _read_text(path: Path) -> str:
    try:
        with open_plain(path) as stream:
            data = stream.read(MAX_BYTES + 1)
    except FileNotFoundError:
        message = f"sidecar {path.name} disappeared before it was read"
        raise FileVanished(message, path=str(path)) from None
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    if len(data) > MAX_BYTES:
        raise _problem(path, "is larger than 1 MiB, too large for a sidecar")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _problem(path, f"is not UTF-8 text (bad byte at offset {exc.start})") from None


def open_plain(path: Path) -> BinaryIO:
    """Open a sidecar for reading: a regular file, never through a symbolic link (a writer
    could point one at a secret stowd can read: it would be stored and copied to failed/).
    ``FileProblem`` when it is a link or not a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _problem(path, f"is a symbolic link; {_PLAIN}") from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        raise _problem(path, f"is not a regular file; {_PLAIN}")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _parse(path: Path, text: str) -> object:
    if not text.strip():
        return None
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise _problem(path, f"is not valid JSON at line {exc.lineno}: {exc.msg}") from None
    try:
        return yaml.load(text, Loader=DicomLoader)  # a SafeLoader
    except yaml.YAMLError as exc:
        raise _problem(path, f"is not valid YAML{_yaml_where(exc)}") from None


def _yaml_where(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        return f" at line {exc.problem_mark.line + 1}: {exc.problem}"
    return f": {exc}"


def _kind(data: object) -> str:
    if isinstance(data, list):
        return "a list"
    return "text" if isinstance(data, str) else f"the value {data!r}"


# --- checking the values ----------------------------------------------------------------


def _checked(data: dict[object, object]) -> tuple[Item, list[str]]:
    """Keyword -> checked value, and every problem found."""
    pairs, problems = _keyword_pairs(data)
    item: Item = {}
    for keyword, value in pairs:
        try:
            item[keyword] = vr.check(keyword, value)
        except ValueError as exc:
            problems.append(str(exc))
    return item, problems


def _keyword_pairs(data: dict[object, object]) -> tuple[list[tuple[str, object]], list[str]]:
    tags = [k for k in data if _is_tag(k)]
    others = [k for k in data if not _is_tag(k)]
    if tags and others:
        mix = f"mixes DICOM JSON tags (such as {tags[0]!r}) with keywords (such as {others[0]!r})"
        return [], [f"{mix}; use one form per file"]
    return _collect(_model_element if tags else _keyword_pair, data)


def _is_tag(key: object) -> bool:
    """Whether ``key`` is a tag of the DICOM JSON model: 8 hex digits such as '00100020'."""
    return isinstance(key, str) and bool(_TAG.fullmatch(key))


def _keyword_pair(key: object, value: object) -> tuple[str, object]:
    if not isinstance(key, str):
        raise ValueError(f"{key!r} is not a DICOM keyword; write keywords such as PatientID")
    return key, value


def _collect(
    convert: Callable[[object, object], tuple[str, object]], data: dict[object, object]
) -> tuple[list[tuple[str, object]], list[str]]:
    """``convert`` applied to every entry of ``data``, and the problems of those that fail."""
    pairs: list[tuple[str, object]] = []
    problems: list[str] = []
    for key, value in data.items():
        try:
            pairs.append(convert(key, value))
        except ValueError as exc:
            problems.append(str(exc))
    return pairs, problems


# --- the DICOM JSON model (PS3.18 F.2) ---------------------------------------------------


def _model_element(key: object, element: object) -> tuple[str, object]:
    """One model element -> (keyword, value as a person would write it for ``vr.check``)."""
    tag = str(key)
    attr = vr.lookup(_keyword_of(tag))
    label = f"{attr.keyword} ({tag})"
    if not isinstance(element, dict):
        raise ValueError(f'{label} must be an object such as {{"vr": "LO", "Value": [...]}}')
    _check_vr(label, attr, element.get("vr"))
    if "InlineBinary" in element or "BulkDataURI" in element:
        raise ValueError(
            f"{label} holds binary data (InlineBinary or BulkDataURI), which sidecars cannot set"
        )
    return attr.keyword, _model_values(attr, label, element.get("Value"))


def _model_values(attr: vr.Attr, label: str, values: object) -> object:
    """The "Value" list of an element, as one value, a list of values, or None."""
    if values is None:
        return None
    if not isinstance(values, list):
        raise ValueError(f'{label}: "Value" must be a list, got {values!r}')
    converted = [_model_value(attr, v, f"{attr.keyword}[{i}]") for i, v in enumerate(values)]
    return converted[0] if len(converted) == 1 and attr.vr != "SQ" else converted


def _keyword_of(tag: str) -> str:
    number = int(tag, 16)
    if (number >> 16) % 2:
        raise ValueError(f"tag {tag} is a private tag; sidecars can only set standard attributes")
    if number & 0xFFFF == 0:
        raise ValueError(f"tag {tag} is a group length, which is computed when the file is written")
    dicomlib.load()  # pydicom whole, one thread at a time
    from pydicom.datadict import get_entry  # noqa: PLC0415 - a sidecar names it: not at start

    try:
        return get_entry(number)[4]
    except KeyError:
        raise ValueError(f"tag {tag} is not in the DICOM dictionary") from None


def _check_vr(label: str, attr: vr.Attr, written: object) -> None:
    dicomlib.load()  # pydicom whole, one thread at a time
    from pydicom.datadict import get_entry  # noqa: PLC0415 - as _keyword_of

    allowed = get_entry(attr.tag)[0].split(" or ")
    if written not in allowed:
        raise ValueError(
            f"{label} is {' or '.join(allowed)} in DICOM, but the sidecar says {written!r}"
        )


def _model_value(attr: vr.Attr, value: object, path: str) -> object:
    """One entry of "Value": SQ items and PN objects become keyword items and name text."""
    if attr.vr == "SQ":
        return _model_item(value, path)
    if attr.vr == "PN" and isinstance(value, dict):
        return _pn_text(value, path)
    return value


def _model_item(value: object, path: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise ValueError(f"{path} must be a DICOM JSON dataset, got {value!r}")
    try:
        return dict(_model_element(*_tag_entry(key, v)) for key, v in value.items())
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _tag_entry(key: object, value: object) -> tuple[object, object]:
    if not _is_tag(key):
        raise ValueError(f"{key!r} is not a tag such as '00100020' (the DICOM JSON model)")
    return key, value


def _pn_text(value: dict[object, object], path: str) -> str:
    """A PN object {"Alphabetic": ..., "Ideographic": ..., "Phonetic": ...} -> 'A=I=P'."""
    groups = [value.get(name) or "" for name in _PN_GROUPS]
    if not all(isinstance(g, str) for g in groups):
        raise ValueError(f"{path}: the name groups must be text, got {value!r}")
    return "=".join(str(g) for g in groups).rstrip("=")
