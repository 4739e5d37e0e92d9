"""Count a header's data elements before pydicom parses it, so that its size is bounded.

pydicom holds every element of a header it reads as a Python object: about 330 bytes for an
element of 8 bytes in the file, so a 16 MB header of two million empty elements took 716 MB
(and a deflated one of 12 MB, inflating to eight million, 3.6 GB).  A header is therefore
walked first, element by element without keeping any, and one with more than
``MAX_ELEMENTS`` is a ``FileProblem``.  The walk goes into sequences (defined length or not)
and stops, as pydicom's ``stop_before_pixels`` does, at the pixel data of the top level.
Headers with more elements than ``SMALL_HEADER`` are parsed one at a time (``parsing``), so
that the workers together never hold more than one large header.

The walk follows PS3.5, and pydicom reads some malformed headers otherwise (it decides
implicit or explicit VR once per data set, reads any 8 bytes in a sequence as an item, scans
an undefined-length value that is not made of items for the delimiter's bytes): such a
header can be counted short.  So pydicom reads a header through ``Bounded``, which counts
the element and item headers pydicom itself reads, and stops it past the same limit.

Real headers are far below the limit: an enhanced multi-frame image lists a few dozen
elements per frame (100,000 for 3,000 frames); the limit leaves room for five times that.
"""

from __future__ import annotations

import functools
import struct
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, BinaryIO

from stowd.errors import FileProblem
from stowd.rules.vr import dictionary

MAX_ELEMENTS = 500_000  # about 165 MB as pydicom objects
SMALL_HEADER = 20_000  # parsed without waiting for other workers' large headers (~7 MB)
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)


@functools.cache
def sequences() -> frozenset[int]:
    """The tags the data dictionary says are sequences (SQ), for an element whose VR is not
    written (read on the first such element: not at start, issue 19)."""
    return frozenset(tag for tag, entry in dictionary()[0].items() if entry[0] == "SQ")


_ONE_AT_A_TIME = threading.Lock()

# What an open container holds: items of a sequence, elements of an item, or the fragments
# of encapsulated pixel data (whose bytes are skipped, never walked as elements).
_SEQ, _ITEM, _FRAGMENTS = 0, 1, 2


def count(
    read: Callable[[int], bytes],
    skip: Callable[[int], object],
    *,
    explicit: bool,
    little: bool,
    whole: bool = False,
    limit: int = MAX_ELEMENTS,
) -> int:
    """The number of elements (items included) of the data set that ``read`` returns, up to
    the top level's pixel data (``whole``: past it, to the end) or its end; ``skip(n)``
    passes over ``n`` bytes of a value.  Raises ``FileProblem`` past ``limit``.  A header
    cut short ends the count (pydicom then says what is wrong with it)."""
    return _Walk(read, skip, explicit, "<" if little else ">", whole).run(limit)


def too_many(limit: int = MAX_ELEMENTS) -> FileProblem:
    return FileProblem(
        f"the DICOM header has more than {limit:,} data elements; stowd does not read a "
        "header that large (each element takes hundreds of bytes of memory to parse), so "
        "it was not sent: a whole-slide image of tens of thousands of tiles (TILED_SPARSE) "
        "can have that many, otherwise the file is damaged or made to exhaust memory"
    )


class Bounded:
    """``fp`` as pydicom reads a header from it, with the elements and items pydicom reads
    counted: it reads each one's first 8 bytes in one ``read(8)`` (pydicom 3.0
    ``filereader.data_element_generator`` and ``read_sequence_item``; a value of 8 bytes
    is counted too, which errs on the safe side).  Past ``MAX_ELEMENTS``: ``FileProblem``,
    which pydicom may wrap in an ``OSError`` (``refused`` finds it)."""

    def __init__(self, fp: BinaryIO) -> None:
        self._fp = fp
        self._limit = MAX_ELEMENTS
        self.heads = 0

    def read(self, size: int = -1) -> bytes:
        if size == 8:
            self.heads += 1
            if self.heads > self._limit:
                raise too_many(self._limit)
        return self._fp.read(size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fp, name)


def refused(exc: BaseException) -> FileProblem | None:
    """The ``FileProblem`` raised by ``Bounded`` behind ``exc``, if that is what it is."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, FileProblem):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def parsing(elements: int) -> AbstractContextManager[object]:
    """Hold this while pydicom parses (and the caller keeps) a header of ``elements``: a
    large one waits for any other large one to be done."""
    return _ONE_AT_A_TIME if elements > SMALL_HEADER else nullcontext()


class _Walk:
    """One walk over a data set's elements; ``open`` holds (kind, end, implicit) of each
    container entered: ``end`` None for one of undefined length (closed by a delimitation
    item), ``implicit`` for the content of a sequence encoded as UN (PS3.5 6.2.2: implicit VR
    little endian)."""

    def __init__(
        self,
        read: Callable[[int], bytes],
        skip: Callable[[int], object],
        explicit: bool,
        order: str,
        whole: bool,
    ) -> None:
        self.read, self.skip, self.explicit, self.whole = read, skip, explicit, whole
        self.tag = struct.Struct(order + "HH")
        self.u16, self.u32 = struct.Struct(order + "H"), struct.Struct(order + "I")
        self.at = 0
        self.open: list[tuple[int, int | None, bool]] = []

    def run(self, limit: int) -> int:
        found = 0
        while (head := self._next()) is not None:
            step = self._step(head)
            if step is None:
                return found
            found += step
            if found > limit:
                raise too_many(limit)
        return found

    def _next(self) -> bytes | None:
        """The next element's first 8 bytes, after closing the containers that end here."""
        while self.open and (end := self.open[-1][1]) is not None and self.at >= end:
            self.open.pop()
        head = self.read(8)
        self.at += len(head)
        return head if len(head) == 8 else None

    def _step(self, head: bytes) -> int | None:
        """Walk past one element, item or delimiter; how many elements and items that was
        (None: the top level's pixel data, where the walk ends)."""
        group, elem = self.tag.unpack_from(head)
        tag = group << 16 | elem
        if group == 0xFFFE:
            return self._item(tag, self.u32.unpack_from(head, 4)[0])
        if not self.open and tag in PIXEL_TAGS and not self.whole:
            return None
        vr, length = self._vr_and_length(head)
        inner = self._implicit or vr == b"UN"
        if length == UNDEFINED:  # a sequence, or (OB/OW) encapsulated pixel data
            kind = _FRAGMENTS if vr in (b"OB", b"OW") or tag in PIXEL_TAGS else _SEQ
            self.open.append((kind, None, inner))
        elif vr == b"SQ" or (vr in (None, b"UN") and tag in sequences()):
            self.open.append((_SEQ, self.at + length, inner))
        elif vr in (None, b"UN") and length >= 8:
            return 1 + self._maybe_sequence(length)  # pydicom reads one that looks like one
        else:
            self._pass(length)
        return 1

    @property
    def _implicit(self) -> bool:
        return not self.explicit or bool(self.open and self.open[-1][2])

    def _vr_and_length(self, head: bytes) -> tuple[bytes | None, int]:
        vr = head[4:6]
        if self._implicit or not (b"AA" <= vr <= b"ZZ"):  # pydicom reads that as implicit
            return None, self.u32.unpack_from(head, 4)[0]
        if vr not in LONG_VRS:
            return vr, self.u16.unpack_from(head, 6)[0]
        more = self.read(4)
        self.at += len(more)
        return vr, (self.u32.unpack(more)[0] if len(more) == 4 else 0)

    def _maybe_sequence(self, length: int) -> int:
        """A value of unknown VR that starts with an item is walked as a sequence (in
        implicit VR); how many items that started (0 or 1)."""
        end = self.at + length
        first = self.read(8)
        self.at += len(first)
        if len(first) == 8 and self.tag.unpack_from(first) == (0xFFFE, 0xE000):
            self.open.append((_SEQ, end, True))
            return self._item(ITEM, self.u32.unpack_from(first, 4)[0])
        self._pass(end - self.at)
        return 0

    def _item(self, tag: int, length: int) -> int:
        """An item (1) or a delimiter (0), which closes the container of undefined length."""
        if tag in (ITEM_END, SEQUENCE_END):
            if self.open and self.open[-1][1] is None:
                self.open.pop()
            return 0
        if self.open and self.open[-1][0] == _FRAGMENTS:
            self._pass(0 if length == UNDEFINED else length)
        else:
            end = None if length == UNDEFINED else self.at + length
            self.open.append((_ITEM, end, self._implicit))
        return 1

    def _pass(self, length: int) -> None:
        self.skip(length)
        self.at += length
