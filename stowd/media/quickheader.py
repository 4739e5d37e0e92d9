"""A DICOM header held in memory walked without pydicom: the keys classify needs, quickly.

pydicom's parse of a header (``dcmread``) builds an object for every element and converts
the File Meta values: about 0.3 ms for a small header, most of the work of reading a new file.
``walk`` reads the same bytes in about fifteen microseconds and keeps only where the header ends
and the raw bytes of the few top-level values classify asks for.  It reads every element up to
the pixel data all the same (it cannot stop after the last of those: where the header ends is
what the pixel data check starts from, and an element after them that pydicom refuses must
leave the file to pydicom, as before).  It answers only for
headers it reads exactly as pydicom does (pydicom would parse them without an error, stop at
the same byte and give the same values); for anything else it answers None and pydicom reads
the header as before.  What it accepts:

- the 128-byte preamble and ``DICM``; File Meta elements of the standard group 0002 tags, each
  with its own VR and a length that fits (so converting them cannot fail);
- a transfer syntax other than Explicit VR Big Endian, Deflated or a private one pydicom was
  told of: the data set is then Implicit VR Little Endian (that syntax, when the first element
  does not look explicit) or Explicit VR Little Endian (any other);
- elements of defined length whose value ends within the bytes held (or an explicit sequence
  of undefined length, below), each with a VR pydicom knows (explicit), none of group 0000
  (a command set) or FFFE (items and delimiters); a Specific Character Set of known terms
  (never a sequence); up to the pixel data (with its whole element header held) or the exact
  end of the file.

Sequences of undefined length (which pydicom parses at once) are walked when explicit: items of
defined or undefined length holding such elements, up to ``MAX_DEPTH`` levels.  Any other
element of undefined length is left to pydicom.  Nothing here raises: damage is for pydicom to
describe.
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass

IMPLICIT = "1.2.840.10008.1.2"
REFUSED_SYNTAXES = frozenset({"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"})  # big, deflated
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
CHARSET = 0x00080005
ITEM, SEQ_END = (0xFFFE, 0xE000), (0xFFFE, 0xE0DD)
ITEM_END = b"\xfe\xff\x0d\xe0\0\0\0\0"  # (FFFE,E00D), length 0
MAX_DEPTH = 16  # sequences within sequences walked; deeper ones are left to pydicom
# pydicom's own tables, written out so that the usual header imports none of pydicom (its
# import is most of stowd's start, issue 19); tests/test_quickheader.py checks that they are
# pydicom's: the VRs it knows (pydicom.valuerep.VR), those with a 4-byte length in explicit VR
# (EXPLICIT_VR_LENGTH_32), and the Specific Character Set terms it converts (python_encoding)
VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN "
    b"UR US UT UV".split()
)
LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
CHARSET_TERMS = frozenset(
    {"", "GB18030", "GBK"}
    | {f"ISO_IR {n}" for n in (6, 13, 100, 101, 109, 110, 126, 127, 138, 144, 148, 166, 192)}
    | {f"ISO 2022 IR {n}" for n in (6, 13, 58, 87, 100, 101, 109, 110, 126, 127, 138, 144)}
    | {f"ISO 2022 IR {n}" for n in (148, 149, 159, 166)}
    | {"ISO 2022 GBK", "ISO 2022 58"}
)
# File Meta tags and their VRs (PS3.10 7.1); (0002,0000) with its 4-byte value only
_META_VRS = {
    0x0000: b"UL",
    0x0001: b"OB",
    0x0002: b"UI",
    0x0003: b"UI",
    0x0010: b"UI",
    0x0012: b"UI",
    0x0013: b"SH",
    0x0016: b"AE",
    0x0017: b"AE",
    0x0018: b"AE",
    0x0026: b"UR",
    0x0027: b"UR",
    0x0028: b"UR",
    0x0100: b"UI",
    0x0102: b"OB",
}
_Element = tuple[int, bytes, int, int]  # tag, VR (empty when implicit), value offset, length
_EXPLICIT = struct.Struct("<HH2sH")
_IMPLICIT = struct.Struct("<HHL")
_LONG = struct.Struct("<L")
_UNDEFINED = 0xFFFFFFFF
_ODD_GROUPS = (0x0000, 0xFFFE)  # a command set, items and delimiters: left to pydicom
_CUT = (0, 0, b"", 0)  # an explicit element header cut short: no VR pydicom knows
_META_START = 132


@dataclass(frozen=True)
class Walked:
    """What the walk found: the raw values of the top-level ``wanted`` tags there, the
    transfer syntax's raw value, and the offset where pydicom would stop (the pixel data's
    element, or the end of the file)."""

    syntax: bytes
    values: dict[int, bytes | None]  # None: there, but not read as a UI value
    implicit: bool
    end: int


def walk(head: bytes, size: int, wanted: frozenset[int]) -> Walked | None:
    """The header in ``head`` (the first bytes of a file of ``size`` bytes), or None when
    pydicom must read it."""
    if len(head) < _META_START or head[128:_META_START] != b"DICM":
        return None
    meta = _meta(head)
    if meta is None:
        return None
    syntax, at = meta
    implicit = _implicit(head, at, syntax)
    if implicit is None:
        return None
    found = _data_set(head, at, implicit, wanted)
    if found is None:
        return None
    values, end = found
    whole = len(head) == size
    if end == len(head) and not whole:
        return None  # the header may go on beyond the bytes held
    return Walked(syntax, values, implicit, end)


def _meta(head: bytes) -> tuple[bytes, int] | None:
    """The raw TransferSyntaxUID and where the data set starts; None unless every File Meta
    element is one pydicom converts without a doubt."""
    at, syntax, limit = _META_START, None, len(head)
    while at + 8 <= limit:
        group, elem, vr, length = _EXPLICIT.unpack_from(head, at)
        if group != 2:
            break
        if _META_VRS.get(elem) != vr or (elem == 0 and length != 4):
            return None
        at += 8
        if vr in LONG_VRS:  # its 2-byte length is the reserved bytes: they must be 0
            if length != 0 or at + 4 > limit:
                return None
            length = _LONG.unpack_from(head, at)[0]
            at += 4
        if at + length > limit:
            return None
        if elem == 0x0010:
            syntax = head[at : at + length]
        at += length
    if syntax is None or at + 8 > limit:
        return None
    return syntax, at


def _implicit(head: bytes, at: int, raw: bytes) -> bool | None:
    """Is the data set Implicit VR Little Endian (as pydicom decides); None: pydicom reads it."""
    syntax = _uid(raw)
    if syntax is None or syntax in REFUSED_SYNTAXES or syntax in _private_syntaxes():
        return None
    looks_explicit = head[at + 4 : at + 6] in VRS
    if syntax == IMPLICIT:
        # pydicom switches to explicit when the first VR's bytes are capital letters
        capitals = all(0x40 < c < 0x5B for c in head[at + 4 : at + 6])
        return None if capitals else True
    return False if looks_explicit else None


def _data_set(
    head: bytes, at: int, implicit: bool, wanted: frozenset[int]
) -> tuple[dict[int, bytes | None], int] | None:
    """The values of the top-level ``wanted`` tags there, and where the walk stopped.

    A usual element is read in the loop itself (no call: most of the walk's time was the
    two calls per element); any other (a long VR, an undefined length, a command or item
    tag, the character set, a header cut short) goes to ``_unusual``, which judges it as
    ``_element`` and ``_after`` always did."""
    if implicit:
        return _implicit_set(head, at, wanted)
    return _explicit_set(head, at, wanted)


def _explicit_set(
    head: bytes, at: int, wanted: frozenset[int]
) -> tuple[dict[int, bytes | None], int] | None:
    """``_data_set`` of an explicit VR data set."""
    values: dict[int, bytes | None] = {}
    limit, unpack = len(head), _EXPLICIT.unpack_from
    while at < limit:
        group, elem, vr, length = unpack(head, at) if at + 8 <= limit else _CUT
        if vr not in VRS:
            return None  # a VR pydicom does not know, or a header cut short
        tag = group << 16 | elem
        if tag in PIXEL_TAGS:
            return (values, at) if at + 12 <= limit else None
        if vr in LONG_VRS or group in _ODD_GROUPS or tag == CHARSET:
            after = _unusual(head, at, False)
        else:
            after = at + 8 + length
        if after is None or after > limit:
            return None
        if tag in wanted:  # a UID pydicom reads as such: explicit UI (a short VR)
            values[tag] = head[at + 8 : after] if vr == b"UI" else None
        at = after
    return values, at


def _implicit_set(
    head: bytes, at: int, wanted: frozenset[int]
) -> tuple[dict[int, bytes | None], int] | None:
    """``_data_set`` of an implicit VR data set."""
    values: dict[int, bytes | None] = {}
    limit, unpack = len(head), _IMPLICIT.unpack_from
    while at < limit:
        if at + 8 > limit:
            return None  # a header cut short
        group, elem, length = unpack(head, at)
        tag = group << 16 | elem
        if tag in PIXEL_TAGS:
            return (values, at) if at + 12 <= limit else None
        if length == _UNDEFINED or group in _ODD_GROUPS or tag == CHARSET:
            after = _unusual(head, at, True)
        else:
            after = at + 8 + length
        if after is None or after > limit:
            return None
        if tag in wanted:  # a UID pydicom reads as such
            values[tag] = head[at + 8 : after]
        at = after
    return values, at


def _unusual(head: bytes, at: int, implicit: bool) -> int | None:
    """Where the element at ``at`` ends (``_after``); None when pydicom must read it."""
    element = _element(head, at, implicit)
    return None if element is None else _after(head, element, 0)


def _after(head: bytes, element: _Element, depth: int) -> int | None:
    """Where ``element`` (from ``_element``) ends; None when pydicom must read it: a command
    or item tag, a value past the bytes held, an unknown character set, or an undefined
    length other than an explicit sequence's (whose items pydicom parses at once)."""
    tag, vr, start, length = element
    if tag >> 16 in _ODD_GROUPS:
        return None
    if tag == CHARSET and length == _UNDEFINED:
        return None  # pydicom parses it as a sequence, then fails to read it as terms
    if length == _UNDEFINED:
        return _sequence(head, start, depth + 1) if vr == b"SQ" else None
    if start + length > len(head):
        return None
    if tag == CHARSET and not _known_charset(head[start : start + length], vr):
        return None
    return start + length


def _sequence(head: bytes, at: int, depth: int) -> int | None:
    """The end of an explicit sequence of undefined length: items, then its delimiter."""
    if depth > MAX_DEPTH:
        return None
    while at + 8 <= len(head):
        group, elem, length = _IMPLICIT.unpack_from(head, at)
        at += 8
        if (group, elem) == SEQ_END:
            return at if length == 0 else None
        if (group, elem) != ITEM:
            return None
        end = None if length == _UNDEFINED else at + length
        if end is not None and end > len(head):
            return None
        found = _item(head, at, end, depth)
        if found is None:
            return None
        at = found
    return None


def _item(head: bytes, at: int, end: int | None, depth: int) -> int | None:
    """The end of an item's elements (explicit VR, no pixel data stop): at ``end``, or after
    its delimiter when its length is undefined."""
    while at != end:
        if end is None and head[at : at + 8] == ITEM_END:
            return at + 8
        element = _element(head, at, False)
        if element is None:
            return None
        after = _after(head, element, depth)
        if after is None or (end is not None and after > end):
            return None
        at = after
    return at


def _element(head: bytes, at: int, implicit: bool) -> _Element | None:
    """The tag, VR (empty when implicit), value offset and length of the element at ``at``;
    None when its header is cut short (pydicom stops reading there: let it say so) or its VR
    is one pydicom does not know."""
    if at + 8 > len(head):
        return None
    if implicit:
        group, elem, length = _IMPLICIT.unpack_from(head, at)
        return group << 16 | elem, b"", at + 8, length
    group, elem, vr, length = _EXPLICIT.unpack_from(head, at)
    if vr not in VRS:
        return None
    if vr in LONG_VRS:
        if at + 12 > len(head):
            return None
        return group << 16 | elem, vr, at + 12, _LONG.unpack_from(head, at + 8)[0]
    return group << 16 | elem, vr, at + 8, length


def _known_charset(raw: bytes, vr: bytes) -> bool:
    """A Specific Character Set pydicom converts without a doubt (it converts it at once)."""
    if vr not in (b"", b"CS"):
        return False
    terms = raw.decode("latin-1").strip(" \0").split("\\")
    return all(term.strip() in CHARSET_TERMS for term in terms)


def _private_syntaxes() -> list[str]:
    """The private transfer syntaxes pydicom was told of (``register_transfer_syntax``): none
    while pydicom is not imported, so it is not imported to ask; none either while another
    thread's import of it is under way (a half-built ``pydicom.uid`` has no list yet, and
    nothing can be registered before it has) or after an import of it failed."""
    uid = sys.modules.get("pydicom.uid")
    return [] if uid is None else list(getattr(uid, "PrivateTransferSyntaxes", ()))


def _uid(raw: bytes) -> str | None:
    """A UID value as pydicom gives it, when its bytes are plainly digits and dots (padded
    with one trailing NUL or space); None for anything else."""
    plain = raw[:-1] if raw[-1:] in (b"\0", b" ") else raw
    if not plain or plain.strip(b"0123456789.") != b"":
        return None
    return plain.decode("ascii")


def uid(raw: bytes | None) -> str | None:
    """``_uid`` of a value the walk kept; None when absent or not plain."""
    return None if raw is None else _uid(raw)
