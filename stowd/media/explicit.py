"""From Implicit VR Little Endian to Explicit VR Little Endian (``transcode: explicit-vr``).

``rewrite.py`` converts a file with these pieces.  The header is written by pydicom, which
gives each element its dictionary VR; before that ``prepare`` makes every private element
UN with its bytes as they are (pydicom's private dictionary is a guess, and a wrong guess
changes the value) and checks that each sequence read as raw bytes is made of whole items
(pydicom reads a damaged one as an empty item, silently).  ``LOSSY_WARNINGS`` are pydicom's
warnings that converting would change a value, errors while the header is written.
``write_tail`` writes the pixel data and the elements after it, each with its explicit
header and its value copied in chunks: memory does not grow with the pixel data.

Every reason says the file cannot be converted and why, for the PACS administrator.
"""

from __future__ import annotations

import re
import struct
from typing import BinaryIO

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

from stowd.errors import FileProblem
from stowd.media.dicomfile import ITEM, SEQ_END, UNDEFINED

TRANSCODE_NOTE = "transcode: explicit-vr"
CHUNK = 1024 * 1024
# VRs whose explicit header has a 32-bit length (PS3.5 7.1.2); the others have 16 bits
_LONG_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)
_SHORT_MAX = 0xFFFF
PIXEL_DATA = BaseTag(0x7FE00010)
ITEM_END = (0xFFFE, 0xE00D)
# What pydicom warns when it would write a value too long for its VR as UN instead (PS3.5
# 6.2.2), and when it decodes text its character set does not allow with replacement
# characters (it decodes every text value to convert it): converting must change neither a
# VR nor a value, so these are errors while the header is written.
TOO_LONG_WARNING = r".*cannot be written in an explicit transfer syntax"
LOSSY_WARNINGS = (
    TOO_LONG_WARNING,
    r".*using replacement characters",
    r"Found unknown escape sequence",
)


# -- the header --------------------------------------------------------------------------------


def prepare(ds: Dataset) -> None:
    """Before pydicom converts ``ds``: every private element read without a VR gets UN, its
    bytes as they are, here and in sequence items; every sequence still raw is checked to
    be whole items (else ``FileProblem``)."""
    for tag in list(ds.keys()):
        elem: object = ds.get_item(tag)
        if isinstance(elem, RawDataElement) and _unknown_private(elem):
            ds[tag] = DataElement(tag, "UN", elem.value)
        elif isinstance(elem, DataElement | RawDataElement) and _is_sequence(tag, elem):
            if _raw_implicit(elem):
                check_items(bytes(elem.value or b""), name_of(tag))
            for item in ds[tag].value:
                prepare(item)


def _raw_implicit(elem: object) -> bool:
    """A sequence still as read, in Implicit VR, of a defined length (its items unread)."""
    if not isinstance(elem, RawDataElement):
        return False
    return elem.is_implicit_VR and elem.length != UNDEFINED


def _unknown_private(raw: RawDataElement) -> bool:
    tag = raw.tag
    return tag.is_private and not tag.is_private_creator and raw.VR is None


def _is_sequence(tag: BaseTag, elem: DataElement | RawDataElement) -> bool:
    if elem.VR is not None:
        return elem.VR == "SQ"
    return not tag.is_private and dictionary_vr(tag) == "SQ"


def check_items(data: bytes, name: str) -> None:
    """``data``, the value of the sequence ``name``, is whole Implicit VR items, each of
    whole elements (nested sequences too), ending where their lengths say."""
    if _items(data, 0, len(data), name, delimited=False) != len(data):
        raise _damaged_sequence(name)


def _items(data: bytes, at: int, end: int, name: str, *, delimited: bool) -> int:
    """Where the items from ``at`` end: at ``end``, or after the Sequence Delimitation Item."""
    while at < end:
        tag, length, at = _header(data, at, end, name)
        if delimited and tag == SEQ_END:
            return at
        if tag != ITEM:
            raise _damaged_sequence(name)
        if length == UNDEFINED:
            at = _elements(data, at, end, name, delimited=True)
        else:
            _within(at, length, end, name)
            if _elements(data, at, at + length, name, delimited=False) != at + length:
                raise _damaged_sequence(name)
            at += length
    if delimited:
        raise _damaged_sequence(name)
    return at


def _elements(data: bytes, at: int, end: int, name: str, *, delimited: bool) -> int:
    """Where the elements of an item from ``at`` end: at ``end``, or after its Item
    Delimitation Item."""
    while at < end:
        tag, length, at = _header(data, at, end, name)
        if delimited and tag == ITEM_END:
            return at
        if length == UNDEFINED:
            at = _items(data, at, end, name, delimited=True)
            continue
        _within(at, length, end, name)
        if _public_sequence(tag) and _items(data, at, at + length, name, delimited=False) != (
            at + length
        ):
            raise _damaged_sequence(name)
        at += length
    if delimited:
        raise _damaged_sequence(name)
    return at


def _public_sequence(tag: tuple[int, int]) -> bool:
    found = Tag(*tag)
    return not found.is_private and dictionary_vr(found) == "SQ"


def _header(data: bytes, at: int, end: int, name: str) -> tuple[tuple[int, int], int, int]:
    if at + 8 > end:
        raise _damaged_sequence(name)
    group, elem, length = struct.unpack_from("<HHL", data, at)
    return (group, elem), length, at + 8


def _within(at: int, length: int, end: int, name: str) -> None:
    if at + length > end:
        raise _damaged_sequence(name)


def _damaged_sequence(name: str) -> FileProblem:
    return not_convertible(
        f"the sequence {name} is damaged (its items do not end where their lengths say)"
    )


# -- reasons -----------------------------------------------------------------------------------


def name_of(tag: BaseTag) -> str:
    keyword = keyword_for_tag(tag)
    return f"{keyword} {tag}" if keyword else str(tag)


def lossy(attribute: str, warning: str) -> FileProblem:
    """The reason for one of ``LOSSY_WARNINGS`` about ``attribute``."""
    if re.match(TOO_LONG_WARNING, warning):
        return too_long(f"{attribute} holds (or has in its items) a value")
    return not_convertible(
        f"{attribute} holds (or has in its items) text that is not valid in the file's "
        "character set (SpecificCharacterSet), and converting would change it"
    )


def too_long(what: str) -> FileProblem:
    return FileProblem(
        f"the file cannot be converted to Explicit VR Little Endian ({TRANSCODE_NOTE}): "
        f"{what} longer than the 65535 bytes its VR can hold in Explicit VR (only Implicit "
        "VR allows it), so it was not sent; send it to an archive that accepts Implicit VR "
        "Little Endian, or shorten that value"
    )


def not_convertible(what: str) -> FileProblem:
    return FileProblem(
        f"the file cannot be converted to Explicit VR Little Endian ({TRANSCODE_NOTE}): "
        f"{what}, so it was not sent; send it to an archive that accepts Implicit VR "
        "Little Endian"
    )


# -- the pixel data and what follows it ---------------------------------------------------------


def write_tail(fp: BinaryIO, out: BinaryIO) -> None:
    """Each element from the pixel data to the end gets its explicit VR header; its value is
    copied as it is, in chunks (Little Endian values are the same bytes in both)."""
    while head := fp.read(8):
        at = fp.tell() - len(head)
        if len(head) < 8:
            raise _damaged(f"it ends at byte {at} inside the header of an element")
        group, elem, length = struct.unpack("<HHL", head)
        tag = Tag(group, elem)
        out.write(_explicit_header(tag, _tail_vr(tag, length), length))
        if length == UNDEFINED:
            _copy_undefined(fp, out, tag)
        else:
            _copy_value(fp, out, tag, length)


def _tail_vr(tag: BaseTag, length: int) -> str:
    """The explicit VR of an element at or after the pixel data (PS3.5 A.1: native pixel
    data in Implicit VR is OW; OB keeps an odd length legal)."""
    if tag == PIXEL_DATA and length == UNDEFINED:
        raise not_convertible(
            f"{name_of(tag)} has an undefined length (it is encapsulated) where Implicit VR "
            "Little Endian allows none"
        )
    if tag == PIXEL_DATA:
        return "OB" if length % 2 else "OW"
    vr = dictionary_vr(tag)
    if vr == "SQ" or (length == UNDEFINED and vr != "UN"):
        raise not_convertible(
            f"{name_of(tag)} comes after the pixel data and is a sequence (or of undefined "
            "length); stowd converts only plain values there"
        )
    if vr not in _LONG_VRS and length > _SHORT_MAX:
        raise too_long(f"{name_of(tag)} holds a value")
    return vr


def dictionary_vr(tag: BaseTag) -> str:
    """The dictionary VR (the first of 'US or SS' and the like, whose bytes are the same);
    UN for a private or unknown element (an undefined length then holds Implicit VR Little
    Endian items, as PS3.5 6.2.2 wants them), LO for a private creator."""
    if tag.is_private_creator:
        return "LO"
    if tag.is_private:
        return "UN"
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    if vr == "OB or OW":
        return "OW"
    return vr.split(" or ")[0]


def _explicit_header(tag: BaseTag, vr: str, length: int) -> bytes:
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHL", tag.group, tag.element, vr.encode(), 0, length)
    return struct.pack("<HH2sH", tag.group, tag.element, vr.encode(), length)


def _copy_value(fp: BinaryIO, out: BinaryIO, tag: BaseTag, length: int) -> None:
    left = length
    while left:
        chunk = fp.read(min(CHUNK, left))
        if not chunk:
            raise FileProblem(
                f"the file is truncated: {name_of(tag)} should have {length} bytes but only "
                f"{length - left} are there (was it copied completely?)"
            )
        out.write(chunk)
        left -= len(chunk)


def _copy_undefined(fp: BinaryIO, out: BinaryIO, tag: BaseTag) -> None:
    """Copy the value of undefined length of ``tag`` up to its Sequence Delimitation Item,
    as it is: items and elements of a defined length whole, the others looked into."""
    depth = 1
    while depth:
        head = fp.read(8)
        if len(head) < 8:
            raise FileProblem(
                f"the file is truncated: it ends inside {name_of(tag)} (was it copied completely?)"
            )
        out.write(head)
        group, elem, length = struct.unpack("<HHL", head)
        if (group, elem) in (SEQ_END, ITEM_END):
            depth -= 1
        elif length == UNDEFINED:
            depth += 1
        else:
            _copy_value(fp, out, tag, length)


def _damaged(what: str) -> FileProblem:
    return not_convertible(f"the file is damaged after its pixel data: {what}")
