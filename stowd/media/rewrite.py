"""Change attributes of a DICOM file for upload, without touching the original.

``apply`` changes a header read with ``stop_before_pixels`` (set, empty, remove attributes;
convert the character set to UTF-8 when a new value needs it; record the previous values in
the Original Attributes Sequence).  ``rewrite`` writes the changed header to a spool file and
copies the rest of the original, from the Pixel Data element on, byte for byte and in chunks:
memory does not grow with the pixel data.  Deflated files are compressed as a whole, so they
are read, changed and written whole (up to ``DEFLATED_LIMIT`` bytes, inflated).

With ``explicit`` (``transcode: explicit-vr``) an Implicit VR Little Endian file is written as
Explicit VR Little Endian: the header by pydicom (VRs from the dictionary, UN for private
elements; text is decoded and encoded again, so only padding may differ, and what pydicom
would change fails the file), the pixel data and what follows it by ``explicit.py``,
element by element, values copied in chunks.  Only the File Meta's TransferSyntaxUID
changes.  ``dicomfile.needs_explicit`` says which files are converted.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import struct
import threading
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, cast

import pydicom
from pydicom import config
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID

from stowd import dropped
from stowd.errors import FileProblem, FileUnreadable, SpoolFull, no_space, reading
from stowd.media import deflated, elements, explicit
from stowd.media.dicomfile import (
    BIG_ENDIAN,
    DEFLATED,
    EXPLICIT,
    HEAD_BYTES,
    IMPLICIT,
    PIXEL_TAGS,
    UNDEFINED,
    header_errors,
    unreadable_header,
)
from stowd.rules.vr import Value

CHUNK = 1024 * 1024
SPOOL_MODE = 0o600  # the copies sent hold patient data: stowd's alone, whatever the umask
UTF8 = "ISO_IR 192"
DEFLATED_LIMIT = 32 * 1024 * 1024  # inflated; held whole about four times over while changed
# One deflated data set is held whole at a time (the workers would each hold one).
_HOLDING_WHOLE = threading.Lock()
MODIFYING_SYSTEM = "stowd"
_CHARSET = BaseTag(0x00080005)
_META_SYNC = {
    "SOPInstanceUID": "MediaStorageSOPInstanceUID",
    "SOPClassUID": "MediaStorageSOPClassUID",
}
_TAG_IN_MESSAGE = re.compile(r"With tag \(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)")


# -- apply: change a data set in memory ------------------------------------------------------


def apply(
    ds: Dataset,
    values: Mapping[str, Value],
    remove: Collection[str],
    *,
    record_original: bool = False,
    now: datetime | None = None,
    reason: str = "COERCE",
) -> None:
    """Set ``values`` and delete ``remove`` (keywords) in ``ds``; a keyword in both is removed.

    Values equal to the present ones are left alone.  With ``record_original`` the previous
    values of what changed are appended to the Original Attributes Sequence (PS3.3 C.12.1.1.9).
    Raises ``FileProblem`` for an unknown keyword or a value the VR does not allow.
    """
    wanted = [_element(k, v, ds) for k, v in values.items() if k not in remove]
    changed = {e.tag: e for e in wanted if not _same(ds, e)}
    removed = [tag for tag in map(_tag, remove) if tag in ds]
    if not changed and not removed:
        return
    texts = [text for k, v in values.items() if _tag(k) in changed for text in _strings(v)]
    if _needs_utf8(ds, texts):
        _convert_to_utf8(ds)
    if record_original:
        _record(ds, changed, removed, now or datetime.now().astimezone(), reason)
    for tag, elem in changed.items():
        ds[tag] = elem
    for tag in removed:
        del ds[tag]
    _sync_file_meta(ds, changed)


def _tag(keyword: str) -> BaseTag:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise FileProblem(f"'{keyword}' is not a DICOM attribute keyword")
    return Tag(tag)


def _vr(tag: BaseTag, ds: Dataset) -> str:
    """The dictionary VR; for 'US or SS' and the like the present element's VR, else the first."""
    vr = dictionary_VR(tag)
    if " or " not in vr:
        return vr
    present = ds.get(tag)
    if present is not None and len(present.VR) == 2:  # a resolved VR, not 'US or SS'
        return str(present.VR)
    return vr.split(" or ")[0]


def _element(keyword: str, value: Value, ds: Dataset) -> DataElement:
    tag = _tag(keyword)
    vr = _vr(tag, ds)
    try:
        content = _sequence(keyword, value) if vr == "SQ" else value
        return DataElement(tag, vr, content, validation_mode=config.RAISE)
    except (ValueError, TypeError, OverflowError) as exc:
        raise FileProblem(f"the value for {keyword} cannot be written: {exc}") from exc


def _sequence(keyword: str, value: Value) -> Sequence:
    if value is None:
        return Sequence()
    if not isinstance(value, list):
        raise FileProblem(f"{keyword} is a sequence: its value must be a list of items")
    return Sequence([_item(keyword, item) for item in value])


def _item(keyword: str, item: object) -> Dataset:
    if not isinstance(item, dict):
        raise FileProblem(f"{keyword} is a sequence: each of its items must be a mapping")
    ds = Dataset()
    for key, value in item.items():
        elem = _element(str(key), value, ds)
        ds[elem.tag] = elem
    return ds


def _same(ds: Dataset, new: DataElement) -> bool:
    """True when ``ds`` already holds this value (two empty values are the same)."""
    if new.tag not in ds:
        return False
    old = ds[new.tag]
    if old.is_empty and new.is_empty:
        return True
    return bool(old == new)


def _strings(value: Value) -> Iterator[str]:
    """Every text in ``value``, recursively through sequence items."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for part in value:
            if isinstance(part, dict):
                for inner in part.values():
                    yield from _strings(inner)
            else:
                yield from _strings(part)


def _needs_utf8(ds: Dataset, texts: list[str]) -> bool:
    if all(text.isascii() for text in texts):
        return False
    present = ds.get(_CHARSET)
    return present is None or bool(present.value != UTF8)


def _convert_to_utf8(ds: Dataset) -> None:
    """Decode every element with its original character set, then declare UTF-8 (ISO_IR 192).

    pydicom writes elements that were never accessed back as their raw bytes; decoding them all
    first makes the writer encode every text value in UTF-8, including those in sequence items
    (whose own Specific Character Set is dropped: they inherit the top-level one).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # odd values are kept as they are, not our concern
        _decode_tree(ds)
    ds.SpecificCharacterSet = UTF8


def _decode_tree(ds: Dataset) -> None:
    for tag in list(ds.keys()):
        elem = ds[tag]  # converts a raw element with the character set it was read with
        if elem.VR == "SQ":
            for item in elem.value:
                _decode_tree(item)
                item.pop(_CHARSET, None)


def _record(
    ds: Dataset,
    changed: Mapping[BaseTag, DataElement],
    removed: list[BaseTag],
    now: datetime,
    reason: str,
) -> None:
    """Append one Original Attributes Sequence item with the previous values (PS3.3 C.12.1.1.9).

    An attribute that was absent is recorded with a zero-length value.
    """
    previous = Dataset()
    for tag in sorted({*changed, *removed}):
        previous[tag] = copy.deepcopy(ds[tag]) if tag in ds else _empty(changed[tag])
    entry = Dataset()
    entry.ModifiedAttributesSequence = Sequence([previous])
    entry.AttributeModificationDateTime = _datetime(now)
    entry.ModifyingSystem = MODIFYING_SYSTEM
    entry.SourceOfPreviousValues = ""
    entry.ReasonForTheAttributeModification = reason
    if "OriginalAttributesSequence" in ds:
        ds.OriginalAttributesSequence.append(entry)
    else:
        ds.OriginalAttributesSequence = Sequence([entry])


def _empty(elem: DataElement) -> DataElement:
    return DataElement(elem.tag, elem.VR, None)


def _datetime(now: datetime) -> str:
    """A DT value: YYYYMMDDHHMMSS.FFFFFF and the UTC offset when ``now`` knows it."""
    text = now.strftime("%Y%m%d%H%M%S.%f")
    return text + now.strftime("%z") if now.utcoffset() is not None else text


def _sync_file_meta(ds: Dataset, changed: Mapping[BaseTag, DataElement]) -> None:
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        return
    for keyword, meta_keyword in _META_SYNC.items():
        if _tag(keyword) in changed and keyword in ds:
            setattr(meta, meta_keyword, ds[keyword].value)


# -- rewrite: the changed header plus the original pixel data -------------------------------


def rewrite(
    src: Path, dst: Path, edit: Callable[[Dataset], None], *, explicit: bool = False
) -> int:
    """Write ``dst``: ``src`` with its header changed by ``edit``; return the size of ``dst``.

    ``src`` is only read.  Its bytes from the Pixel Data element to the end are copied as they
    are, in chunks.  With ``explicit`` an Implicit VR Little Endian file is converted to
    Explicit VR Little Endian (files in other transfer syntaxes are not).  On any error a
    partly written ``dst`` is removed.
    """
    with reading(src), warnings.catch_warnings(), dropped.open_file(src) as fp:
        warnings.simplefilter("ignore")  # files with odd values are sent, not judged
        return _rewrite_open(fp, dst, edit, explicit)


def _converts(ds: FileDataset) -> bool:
    """Is ``ds`` Implicit VR Little Endian, or labelled so (then only the label changes)?"""
    syntax = _transfer_syntax(ds)
    implicit, little = _encoding(ds)
    if syntax == IMPLICIT:
        return little
    return syntax == EXPLICIT and implicit and little


def _rewrite_open(
    fp: BinaryIO, dst: Path, edit: Callable[[Dataset], None], to_explicit: bool
) -> int:
    head = fp.read(HEAD_BYTES)
    if deflated.data_set_start(fp, head) is None:
        found = deflated.count_header(fp, head)  # too many elements: FileProblem
        fp.seek(0)
        with elements.parsing(found):  # the count may be short: pydicom's reads are counted
            bounded = cast(BinaryIO, elements.Bounded(fp))
            return _rewrite_read(bounded, dst, edit, to_explicit)
    fp.seek(0)
    with _HOLDING_WHOLE:  # counted in _read_deflated, once its inflated size is known
        return _rewrite_read(fp, dst, edit, to_explicit)


def _rewrite_read(
    fp: BinaryIO, dst: Path, edit: Callable[[Dataset], None], to_explicit: bool
) -> int:
    ds, pixels = _read_header(fp)
    encoding = _encoding(ds)
    convert = to_explicit and _converts(ds)
    if convert:
        with header_errors():
            explicit.prepare(ds)
    edit(ds)
    if pixels is not None:
        _check_before_pixels(ds, pixels[1])
    tail = None if pixels is None else pixels[0]
    if not convert:
        return _write(dst, ds, encoding, fp, tail)
    ds.file_meta.TransferSyntaxUID = UID(EXPLICIT)
    ds.set_original_encoding(*encoding)  # as the bytes are: pydicom converts what it must
    return _write(dst, ds, (False, True), fp, tail, converting=True, implicit_tail=encoding[0])


def _read_header(fp: BinaryIO) -> tuple[FileDataset, tuple[int, BaseTag] | None]:
    """The header, and where the pixel data starts with its tag (None: no pixel data to copy)."""
    with header_errors():
        start = deflated.data_set_start(fp, fp.read(HEAD_BYTES))
        if start is not None:  # not given to pydicom before its inflated size is known
            return _read_deflated(fp, start), None
        fp.seek(0)
        ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True)
        syntax = _transfer_syntax(ds)
        if syntax == DEFLATED:
            return _read_deflated(fp, None), None
        _check_complete(ds)
        return ds, _find_pixels(fp, syntax)


def _transfer_syntax(ds: FileDataset) -> str:
    meta = getattr(ds, "file_meta", None)
    if meta is None or not meta.get("TransferSyntaxUID"):
        raise FileProblem("the file has no File Meta Information with a TransferSyntaxUID")
    syntax = UID(str(meta.TransferSyntaxUID))
    if not syntax.is_valid:
        raise unreadable_header(ValueError("its TransferSyntaxUID is not a valid UID"))
    return str(syntax)


def _read_deflated(fp: BinaryIO, start: int | None) -> FileDataset:
    """A deflated data set is compressed as a whole: read all of it (pixel data included),
    once it is known to inflate to at most ``DEFLATED_LIMIT`` bytes (counted in pieces)."""
    size = os.fstat(fp.fileno()).st_size
    try:
        if size > DEFLATED_LIMIT:
            raise FileProblem("too large")
        if start is not None:
            deflated.check_size(fp, start, DEFLATED_LIMIT)
    except FileProblem as exc:
        raise FileProblem(
            f"the file uses the Deflated transfer syntax and is, or inflates to, more than "
            f"{DEFLATED_LIMIT // CHUNK} MiB: metadata rules cannot change it without holding "
            "it all in memory, so it was not sent"
        ) from exc
    fp.seek(0)
    deflated.count_header(fp, fp.read(HEAD_BYTES), whole=True)  # all of it is parsed
    fp.seek(0)
    return pydicom.dcmread(fp, force=True)


def _find_pixels(fp: BinaryIO, syntax: str) -> tuple[int, BaseTag] | None:
    """Offset and tag of the pixel data element: pydicom stops reading right before its tag."""
    at = fp.tell()
    head = fp.read(4)
    if len(head) < 4:
        return None  # the end of the file: no pixel data
    group, elem = struct.unpack(">HH" if syntax == BIG_ENDIAN else "<HH", head)
    if (group, elem) not in PIXEL_TAGS:
        raise FileProblem(
            f"the DICOM header cannot be read (the file is damaged): it ends at byte {at} "
            f"with ({group:04X},{elem:04X}) instead of the pixel data"
        )
    return at, Tag(group, elem)


def _check_before_pixels(ds: Dataset, pixel_tag: BaseTag) -> None:
    """An attribute after the pixel data (it stays in the copied tail) cannot be set."""
    late = [tag for tag in ds.keys() if tag >= pixel_tag]  # noqa: SIM118 - tags, not elements
    if late:
        name = keyword_for_tag(late[0]) or str(late[0])
        raise FileProblem(
            f"{name} comes after the pixel data in a DICOM file; metadata rules cannot set it"
        )


def _encoding(ds: FileDataset) -> tuple[bool, bool]:
    """(implicit VR, little endian) of the data set as its bytes are, not as its label says.

    Some files declare explicit VR but are written implicit; pydicom reads them so, and the
    header is written back the same way, to match the pixel data element in the copied tail.
    """
    raw = next(_raw_elements(ds), None)
    if raw is not None:
        return raw.is_implicit_VR, raw.is_little_endian
    implicit, little = ds.original_encoding
    return bool(implicit), little is not False


def _raw_elements(ds: Dataset) -> Iterator[RawDataElement]:
    """The top-level elements still as read from the file (not accessed yet)."""
    for tag in ds.keys():  # noqa: SIM118 - tags, not elements
        elem: object = ds.get_item(tag)  # typed as DataElement, but raw until accessed
        if isinstance(elem, RawDataElement):
            yield elem


def _check_complete(ds: Dataset) -> None:
    """pydicom keeps an element cut off by the end of the file: refuse such a header."""
    for raw in _raw_elements(ds):
        if raw.length != UNDEFINED and len(raw.value or b"") < raw.length:
            name = keyword_for_tag(raw.tag) or str(raw.tag)
            raise FileProblem(
                f"the file is truncated: its header ends inside {name} (was it copied completely?)"
            )


def _encode(
    ds: FileDataset, encoding: tuple[bool, bool], out: BinaryIO, *, converting: bool = False
) -> None:
    """Preamble, File Meta as it is (group length updated) and the data set, as it was read
    (or, ``converting``, in Explicit VR Little Endian, refusing what would change a value).

    Written straight to ``out``: a large value in the header (an encapsulated document) is
    then held once, not once more in a buffer.
    """
    if ds.preamble is None:
        ds.preamble = b"\0" * 128
    implicit, little = encoding
    try:
        with warnings.catch_warnings():
            for lossy in explicit.LOSSY_WARNINGS if converting else ():
                warnings.filterwarnings("error", lossy, UserWarning)
            pydicom.dcmwrite(
                out,
                ds,
                enforce_file_format=False,
                implicit_vr=implicit,
                little_endian=little,
                force_encoding=True,
            )
    except OSError as exc:
        if exc.errno is not None:
            raise  # writing the spool copy failed (disk full, ...): not the value's fault
        raise unwritable(exc, converting=converting) from exc  # a value it cannot encode
    except Exception as exc:
        raise unwritable(exc, converting=converting) from exc


def unwritable(exc: Exception, *, converting: bool = False) -> FileProblem:
    """Name the attribute pydicom refused (its message carries the tag), with the first cause."""
    found = _TAG_IN_MESSAGE.search(str(exc))
    root: BaseException = exc
    while root.__cause__ is not None:
        root = root.__cause__
    what = "the changed header cannot be written"
    if converting:
        note = explicit.TRANSCODE_NOTE
        what = f"the file cannot be converted to Explicit VR Little Endian ({note})"
    if found is None:
        return FileProblem(f"{what}: {root}")
    tag = Tag(int(found[1], 16), int(found[2], 16))
    name = keyword_for_tag(tag) or str(tag)
    if isinstance(root, UserWarning):  # explicit.LOSSY_WARNINGS
        return explicit.lossy(f"{name} {tag}", str(root))
    return FileProblem(f"{what}: {name} {tag}: {root}")


def _write(
    dst: Path,
    ds: FileDataset,
    encoding: tuple[bool, bool],
    fp: BinaryIO,
    tail_at: int | None,
    *,
    converting: bool = False,
    implicit_tail: bool = False,
) -> int:
    """``ds`` encoded so, then the original from ``tail_at`` on: copied as it is, or element
    by element with explicit VR headers (``implicit_tail``)."""
    try:
        with private(dst) as out:
            _encode(ds, encoding, out, converting=converting)
            if tail_at is not None:
                fp.seek(tail_at)
                if implicit_tail:
                    explicit.write_tail(fp, out)
                else:
                    shutil.copyfileobj(fp, out, CHUNK)
            return out.tell()
    except BaseException as exc:
        dst.unlink(missing_ok=True)
        if no_space(exc):
            raise SpoolFull(f"no space left in the spool folder {dst.parent}: {exc}") from exc
        if isinstance(exc, OSError):
            raise FileUnreadable(
                f"copying the file to the spool folder {dst.parent} failed: "
                f"{exc.strerror or exc}; it is tried again later"
            ) from exc
        raise


def private(target: Path) -> BinaryIO:
    """Open a new spool file for writing, readable by stowd alone whatever the umask (it
    holds patient data)."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, SPOOL_MODE)
    try:
        os.fchmod(fd, SPOOL_MODE)  # a copy left by an older stowd may be wider
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise
