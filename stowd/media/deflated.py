"""Read a deflated data set (Deflated Explicit VR Little Endian) without trusting its size.

Its data set is compressed as a whole; pydicom inflates all of it in memory to read even the
header, so a 3 MB file that inflates to 3 GiB (a decompression bomb) would take that much
memory.  Here the data set is inflated as a stream: at most ``HEADER_LIMIT`` bytes of it are
held to parse the header (the attributes before the pixel data), and the rest is inflated in
small pieces and thrown away, only to count it.  A data set that inflates to more than
``INFLATED_LIMIT`` bytes, or whose header needs more than ``HEADER_LIMIT``, is a
``FileProblem``; reading stops as soon as a limit is passed.  A file within the limits is
sent as it is (still deflated); only its header was read.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import TYPE_CHECKING, BinaryIO, cast

from stowd import dicomlib
from stowd.errors import FileProblem
from stowd.media import elements

if TYPE_CHECKING:  # pydicom is imported where a header is parsed: not at start (issue 19)
    from pydicom.dataset import Dataset, FileDataset

DEFLATED = "1.2.840.10008.1.2.1.99"
IMPLICIT_LE, EXPLICIT_BE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"
MIB = 1024 * 1024
HEADER_LIMIT = 64 * MIB  # inflated header bytes held in memory to parse it
INFLATED_LIMIT = 1024 * MIB  # the largest inflated data set sent (counted, never held)
PIECE = MIB  # inflated (and compressed) bytes handled per step
FIRST_TRY = 64 * 1024  # inflated bytes parsed first; grown fourfold until the header fits
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)


def data_set_start(fp: BinaryIO, head: bytes) -> int | None:
    """Where the deflated data set starts in ``fp`` (whose first bytes are ``head``); None
    when its File Meta Information does not name the Deflated transfer syntax."""
    start, syntax = file_meta(fp, head)
    return start if syntax == DEFLATED else None


def file_meta(fp: BinaryIO, head: bytes) -> tuple[int, str | None]:
    """Where the data set of ``fp`` (whose first bytes are ``head``) starts, after its File
    Meta Information, and the transfer syntax that names (None: none named).  The meta is
    walked element by element (from ``head`` while it lasts), never parsed by pydicom,
    which would inflate a deflated data set whole."""

    def read(at: int, n: int) -> bytes:
        if at + n <= len(head):
            return head[at : at + n]
        fp.seek(at)
        return fp.read(n)

    at = 132 if head[128:132] == b"DICM" else 0
    syntax = None
    while at < HEADER_LIMIT and (element := read(at, 12))[:2] == b"\x02\x00" and len(element) >= 8:
        elem, vr = struct.unpack_from("<H", element, 2)[0], element[4:6]
        if vr in _LONG_VRS:
            length, value_at = struct.unpack_from("<I", element.ljust(12, b"\0"), 8)[0], at + 12
        else:
            length, value_at = struct.unpack_from("<H", element, 6)[0], at + 8
        if elem == 0x0010 and length <= 64:
            syntax = read(value_at, length).rstrip(b"\x00 ").decode("ascii", "replace")
        at = value_at + length
    return at, syntax


def count_header(fp: BinaryIO, head: bytes, *, whole: bool = False) -> int:
    """The number of elements of the data set of ``fp`` (whose first bytes are ``head``)
    before its pixel data (``whole``: all of them), walked by ``stowd.elements`` without
    being kept; a deflated one inflated as a stream.  ``FileProblem`` past
    ``elements.MAX_ELEMENTS``."""
    start, syntax = file_meta(fp, head)
    fp.seek(start)
    if syntax == DEFLATED:
        stream = _Inflating(fp)
        return elements.count(stream.take, stream.skip, explicit=True, little=True, whole=whole)
    explicit, little = syntax != IMPLICIT_LE, syntax != EXPLICIT_BE
    if syntax is None:  # no meta naming it: guessed from the first element, as pydicom does
        dicomlib.load()  # pydicom whole, one thread at a time
        from pydicom.values import converters  # noqa: PLC0415

        first = fp.read(6)
        fp.seek(start)
        explicit = len(first) == 6 and first[4:6].decode("latin-1") in converters
        little = not explicit or int.from_bytes(first[:2], "little") < 1024
    return elements.count(
        fp.read, lambda n: fp.seek(n, 1), explicit=explicit, little=little, whole=whole
    )


def read_header(fp: BinaryIO, start: int) -> FileDataset:
    """The File Meta Information and the inflated header of the deflated data set at
    ``start``, after checking that the whole data set inflates to at most
    ``INFLATED_LIMIT`` bytes.  Raises ``FileProblem`` for a bomb or a damaged stream."""
    if start > HEADER_LIMIT:
        raise FileProblem(
            f"the DICOM header cannot be read: its File Meta Information is larger than "
            f"{HEADER_LIMIT // MIB} MiB (the file is damaged or made to exhaust memory)"
        )
    dicomlib.load()  # pydicom whole, one thread at a time
    import pydicom  # noqa: PLC0415

    fp.seek(0)
    meta = pydicom.dcmread(io.BytesIO(fp.read(start)), force=True)  # stops at the meta's end
    fp.seek(start)
    stream = _Inflating(fp)
    header = _header(stream)
    stream.count_rest()
    meta.update(header)
    return meta


def check_size(fp: BinaryIO, start: int, limit: int) -> None:
    """Raise ``FileProblem`` when the deflated data set at ``start`` inflates to more than
    ``limit`` bytes (inflated in pieces and counted, never held)."""
    fp.seek(start)
    _Inflating(fp, limit).count_rest()


class _Inflating:
    """The inflated data set as a stream, counted against a limit."""

    def __init__(self, fp: BinaryIO, limit: int = INFLATED_LIMIT) -> None:
        self._fp = fp
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._limit = limit
        self.count = 0

    @property
    def done(self) -> bool:
        return self._inflater.eof

    def take(self, most: int) -> bytes:
        """Up to ``most`` more inflated bytes (fewer only at the end of the data set)."""
        pieces: list[bytes] = []
        got = 0
        while got < most and not self._inflater.eof:
            piece = self._next(min(most - got, PIECE))
            pieces.append(piece)
            got += len(piece)
        return b"".join(pieces)

    def skip(self, length: int) -> None:
        """Inflate ``length`` more bytes (fewer at the end) and throw them away."""
        while length > 0 and not self._inflater.eof:
            length -= len(self._next(min(length, PIECE)))

    def count_rest(self) -> None:
        while not self._inflater.eof:
            self._next(PIECE)

    def _next(self, most: int) -> bytes:
        data = self._inflater.unconsumed_tail or self._fp.read(PIECE)
        if not data:
            raise FileProblem(
                "the DICOM header cannot be read (the file is damaged): the file ends before "
                "its deflated data set does (was it copied completely?)"
            )
        try:
            piece = self._inflater.decompress(data, most)
        except zlib.error as exc:
            raise FileProblem(
                f"the DICOM header cannot be read (the file is damaged): its deflated data set "
                f"cannot be inflated ({exc})"
            ) from exc
        self.count += len(piece)
        if self.count > self._limit:
            raise FileProblem(
                f"the deflated data set inflates to more than {self._limit // MIB} MiB (the "
                "file may be a decompression bomb); stowd stopped inflating it and does not "
                "send it"
            )
        return piece


def _header(stream: _Inflating) -> Dataset:
    """Parse the header from a growing inflated copy, until parsing stops before the pixel
    data (or at the end of the data set); at most ``HEADER_LIMIT`` bytes are held."""
    held = stream.take(FIRST_TRY)
    while True:
        ds, end = _parse(held, final=stream.done, big=len(held) > FIRST_TRY)
        # At least an element header after where parsing stopped: it stopped at the pixel
        # data, not at the end of the copy (as in classify._read_header).
        if ds is not None and (stream.done or end + 12 <= len(held)):
            return ds
        if len(held) >= HEADER_LIMIT:
            raise FileProblem(
                f"the deflated data set's header (its attributes before the pixel data) "
                f"inflates to more than {HEADER_LIMIT // MIB} MiB (the file may be a "
                "decompression bomb); stowd stopped inflating it and does not send it"
            )
        del ds  # its values are copies of the held bytes: not kept while more is inflated
        more = stream.take(min(3 * len(held), HEADER_LIMIT - len(held)))
        held = b"".join((held, more))
        del more


def _parse(held: bytes, *, final: bool, big: bool) -> tuple[Dataset | None, int]:
    """The data set parsed from ``held`` up to the pixel data, and where parsing stopped;
    (None, 0) when ``held`` is cut too short to parse (an error once ``final``).  A ``big``
    copy's elements are counted first (``FileProblem`` when there are too many)."""
    dicomlib.load()  # pydicom whole, one thread at a time
    from pydicom.filereader import read_dataset  # noqa: PLC0415

    memory = io.BytesIO(held)
    found = 0
    if big:
        found = elements.count(memory.read, lambda n: memory.seek(n, 1), explicit=True, little=True)
        memory.seek(0)
    try:
        with elements.parsing(found):
            bounded = cast(BinaryIO, elements.Bounded(memory))  # the count may be short
            ds = read_dataset(bounded, False, True, stop_when=_at_pixels)
    except Exception as exc:
        if (refused := elements.refused(exc)) is not None:
            raise refused from None  # too many elements: a larger copy has as many
        if final:
            raise
        return None, 0
    return ds, memory.tell()


def _at_pixels(tag: object, vr: object, length: object) -> bool:
    return tag in _PIXEL_TAGS
