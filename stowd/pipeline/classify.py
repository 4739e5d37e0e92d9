"""What a file is, and the keys it is grouped by, read from its bytes (headers only).

A Part-10 DICOM file gives its StudyInstanceUID, SOPInstanceUID and SOPClassUID. Any other
file is looked at by ``probe.detect`` (PDF, JPEG, video, ...): its kind is the media's, and its
UIDs are made later (they are empty here). Anything that cannot be sent raises
``FileProblem`` with a reason written for a PACS administrator; an image that ends before
its pixel data is complete raises ``FileIncomplete`` (a writer may still be adding the rest).
A usual header held whole in the first 64 KiB gives its keys without pydicom
(``quickheader``); its pydicom header is then parsed only when first asked for.

A file stowd has just read itself (the C-STORE receiver reads each instance it writes) is
``remember``-ed: the next ``classify`` of that path (the reader of new files) gets those keys
instead of reading the header again, once, and only while the file is the same one, unchanged
(device, inode, size, modification and change times as they were) and its header was parsed
from memory (nothing left to read from the file later).  At most ``RECENT`` are kept.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, cast

from stowd import dicomlib, dropped
from stowd.errors import FileIncomplete, FileProblem, FileUnreadable, FileVanished, NotDicom
from stowd.media import deflated, elements, quickheader
from stowd.media.dicomfile import (
    BIG_ENDIAN,
    DEFLATED,
    HEAD_BYTES,
    IMPLICIT,
    ITEM,
    PIXEL_TAGS,
    SEQ_END,
    UNDEFINED,
    header_errors,
)
from stowd.media.probe import detect
from stowd.media.reading import Media

if TYPE_CHECKING:
    import pydicom  # imported where a header is parsed: not at start (issue 19)

DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
# Rows, Columns, BitsAllocated, SamplesPerPixel, PhotometricInterpretation (Image Pixel module)
IMAGE_PIXEL_TAGS = (0x00280010, 0x00280011, 0x00280100, 0x00280002, 0x00280004)
SPECTROSCOPY_DATA = 0x56000020
STUDY, INSTANCE, SOP_CLASS = 0x0020000D, 0x00080018, 0x00080016  # the keys' tags
KEY_TAGS = (STUDY, INSTANCE, SOP_CLASS)
DIRECTORY_RECORDS = 0x00041220  # DirectoryRecordSequence: only a DICOMDIR has it
_WANTED = frozenset((*KEY_TAGS, DIRECTORY_RECORDS))  # the values the quick walk keeps
PIXEL_TAG_BYTES = tuple(struct.pack(order, *tag) for tag in PIXEL_TAGS for order in ("<HH", ">HH"))
CUT_ELEMENT = (
    "the file is truncated: it ends inside the header of its pixel data (was it copied completely?)"
)
_MAGIC_AT = 128
DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic")
DEFER = 256 * 1024  # larger values (an encapsulated document) are not loaded to classify


class Header:
    """A classified file's pydicom header: parsed already, or parsed from the bytes held when
    first asked for (a header ``quickheader`` read needs pydicom only for the rules)."""

    def __init__(
        self, dataset: pydicom.Dataset | None, parse: Callable[[], pydicom.Dataset] | None = None
    ) -> None:
        self._dataset, self._parse = dataset, parse
        self._lock = threading.Lock()  # two threads asking at once parse it once

    def get(self) -> pydicom.Dataset | None:
        if self._parse is None:
            return self._dataset
        with self._lock:
            parse = self._parse
            if parse is not None:
                self._dataset, self._parse = parse(), None
        return self._dataset

    def in_memory(self) -> bool:
        """Was (or will) the header be parsed from memory, nothing left to read from the file?"""
        if self._parse is not None:
            return True
        return self._dataset is not None and self._dataset.filename is None


@dataclass(frozen=True, init=False)
class Classified:
    """The keys of a file that can be sent; ``header`` is its pydicom header (None for a file
    that is not DICOM), parsed when first used if it was not needed to find the keys."""

    kind: str
    study_uid: str
    sop_uid: str
    sop_class: str
    held: Header = field(compare=False, repr=False)
    media: Media | None = None  # what a file that is not DICOM holds

    def __init__(
        self,
        kind: str,
        study_uid: str,
        sop_uid: str,
        sop_class: str,
        *,
        header: pydicom.Dataset | Header | None = None,
        media: Media | None = None,
    ) -> None:
        held = header if isinstance(header, Header) else Header(header)
        put = object.__setattr__  # frozen: each field set once, here (one made per new file)
        put(self, "kind", kind)
        put(self, "study_uid", study_uid)
        put(self, "sop_uid", sop_uid)
        put(self, "sop_class", sop_class)
        put(self, "media", media)
        put(self, "held", held)

    @property
    def header(self) -> pydicom.Dataset | None:
        return self.held.get()


RECENT = 256  # files remembered (each header holds its 64 KiB copy: 16 MiB at most)
_Identity = tuple[int, int, int, int, int]
_recent: OrderedDict[str, tuple[_Identity, Classified]] = OrderedDict()
_recent_lock = threading.Lock()


def remember(path: str, found: Classified) -> None:
    """Hand ``found``, just read from ``path``, on to the next ``classify`` of it."""
    if not found.held.in_memory():
        return  # not parsed from memory: values may still be read from the file
    try:
        identity = _identity(os.lstat(path))
    except OSError:
        return  # classify reads it
    with _recent_lock:
        _recent[path] = (identity, found)
        while len(_recent) > RECENT:
            _recent.popitem(last=False)


def _recalled(path: str) -> Classified | None:
    with _recent_lock:
        entry = _recent.pop(path, None)
    if entry is None:
        return None
    try:
        same = _identity(os.lstat(path)) == entry[0]
    except OSError:
        return None  # read it, and say what became of it
    return entry[1] if same else None


def _identity(st: os.stat_result) -> _Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def classify(path: str) -> Classified:
    """A DICOM file's keys, or what another file holds; raise ``FileProblem`` when it cannot
    be sent."""
    found = _recalled(path)
    if found is not None:
        return found
    try:
        return classify_dicom(path)
    except NotDicom:
        if Path(path).suffix.lower() in DICOM_EXTENSIONS:
            raise  # named as DICOM: a damaged or mislabelled file, not a document or image
        media = detect(Path(path))
        return Classified(media.kind, "", "", "", media=media)


def classify_dicom(path: str) -> Classified:
    """Read the DICOM header of ``path``; raise ``FileProblem`` when it cannot be sent."""
    try:
        with dropped.open_file(path, unbuffered=True) as fp:  # read in a few large reads
            size = os.fstat(fp.fileno()).st_size
            if size == 0:
                raise FileProblem("the file is empty (0 bytes)")
            return _classify_dicom(fp, size, path)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise FileVanished("the file was removed before it could be sent") from exc
    except IsADirectoryError as exc:
        raise FileVanished("the path is now a folder") from exc
    except OSError as exc:  # pydicom's own parse errors were turned into FileProblem below
        raise FileUnreadable.from_os_error(exc, path) from exc


def _classify_dicom(fp: BinaryIO, size: int, path: str | None = None) -> Classified:
    """``fp``: the file, unbuffered (``read_fully`` reads it); ``path``: its name, by which
    a value of its header left in it is read (None: ``fp``'s own name)."""
    head = read_fully(fp, min(HEAD_BYTES, size))  # no read more to find the end it knows
    if not _looks_like_part10(head, size):
        raise NotDicom(
            "not a DICOM file: no 'DICM' marker at byte 128 and no File Meta Information"
        )
    held = cast(BinaryIO, _Held(fp, head, size))
    try:
        with header_errors():
            keys, syntax, end = _read_keys(fp, size, head, path)
            held.seek(end)
            _check_pixel_data(held, size, syntax, lambda: _described(keys))
    except FileIncomplete:
        raise
    except FileProblem as problem:
        if _ends_in_pixel_element(held, size):  # pydicom could not read the cut length
            raise FileIncomplete(CUT_ELEMENT) from problem
        raise
    return keys


class _Held:
    """A file read through its first bytes, held in memory: a read within them (most reads
    after the header) is no system call, each of which waits for the GIL while other threads
    are busy.  The bytes read are the file's either way."""

    def __init__(self, fp: BinaryIO, head: bytes, size: int) -> None:
        self._fp, self._head, self._at = fp, head, 0
        self._whole = len(head) == size  # nothing more to read from the file

    def tell(self) -> int:
        return self._at

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence not in (os.SEEK_SET, os.SEEK_CUR):
            raise ValueError("only SEEK_SET and SEEK_CUR")
        self._at = offset if whence == os.SEEK_SET else self._at + offset
        return self._at

    def read(self, n: int) -> bytes:
        if self._whole or self._at + n <= len(self._head):
            data = self._head[self._at : self._at + n]
        else:
            self._fp.seek(self._at)
            data = read_fully(self._fp, n)
        self._at += len(data)
        return data


def read_fully(fp: BinaryIO, n: int) -> bytes:
    """``n`` bytes of ``fp`` from where it is, fewer only at its end: what a buffered file's
    read gives (an unbuffered one's may give fewer, as a network filesystem may)."""
    data = fp.read(n)
    while 0 < len(data) < n:
        more = fp.read(n - len(data))
        if not more:
            break
        data += more
    return data


def _ends_in_pixel_element(fp: BinaryIO, size: int) -> bool:
    """Does the file end within the header (tag, VR, length) of a pixel data element?"""
    fp.seek(max(size - 11, 0))
    tail = fp.read(11)
    for tag in PIXEL_TAG_BYTES:
        at = tail.find(tag)
        rest = tail[at:] if at >= 0 else b""
        explicit = rest[4:6].isalpha()
        if rest and (len(rest) < 8 or explicit):  # an explicit header has 12 bytes
            return True
    return False


def _read_keys(
    fp: BinaryIO, size: int, head: bytes, path: str | None
) -> tuple[Classified, str, int]:
    """The keys, the transfer syntax and where the header ends; ``head``: the file's first
    ``HEAD_BYTES``.

    A header held whole in the first ``HEAD_BYTES`` that ``quickheader`` can read exactly as
    pydicom does, with the three UIDs and the transfer syntax plainly there, gives its keys
    without pydicom (whose parse was most of the CPU spent on a new file); its pydicom header
    is parsed from the same bytes only if something asks for it (a rule reading an attribute,
    a received file's sender).  Any other header, every refusal included, is parsed by
    pydicom at once and judged by ``_keys``, as before."""
    walked = quickheader.walk(head, size, _WANTED)
    quick = None if walked is None else _quick_keys(walked, head)
    if quick is not None and walked is not None:
        return (*quick, walked.end)  # no pydicom: no warnings to silence
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _parsed_keys(fp, size, head, path)


def _parsed_keys(
    fp: BinaryIO, size: int, head: bytes, path: str | None
) -> tuple[Classified, str, int]:
    """``_read_keys`` through pydicom's parse: the unbuffered ``fp`` read through a buffer
    (pydicom reads a few bytes at a time), detached after (``fp`` stays open: ``_Held``
    reads it, seeking first)."""
    buffered = io.BufferedReader(cast(io.RawIOBase, fp))
    try:
        ds = _read_header(cast(BinaryIO, buffered), size, head, path)
        end = buffered.tell()
    finally:
        buffered.detach()
    return _keys(ds), _transfer_syntax(ds), end


def _quick_keys(walked: quickheader.Walked, head: bytes) -> tuple[Classified, str] | None:
    """The keys of a walked header, or None when pydicom must judge it (a key missing or not
    plain, a DICOMDIR)."""
    study, sop, sop_class = (quickheader.uid(walked.values.get(tag)) for tag in KEY_TAGS)
    syntax = quickheader.uid(walked.syntax)
    if not (study and sop and sop_class and syntax):
        return None
    if sop_class == DICOMDIR_CLASS or DIRECTORY_RECORDS in walked.values:
        return None
    header = Header(None, lambda: _parse_held(head))
    return Classified("dicom", study, sop, sop_class, header=header), syntax


def _parse_held(head: bytes) -> pydicom.Dataset:
    """pydicom's header of bytes ``quickheader`` walked: the parse ``_read_header`` makes of
    them (the walk accepts only what it parses without an error, ending where it ended)."""
    dicomlib.load()  # pydicom whole, one thread at a time
    import pydicom  # noqa: PLC0415 - a header walked needs none of pydicom until now

    with header_errors(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        memory = io.BytesIO(head)
        return pydicom.dcmread(memory, stop_before_pixels=True, force=True, defer_size=DEFER)


def _read_header(fp: BinaryIO, size: int, head: bytes, path: str | None) -> pydicom.Dataset:
    """The header, read up to the pixel data; ``fp`` is left where the header ends.

    Parsed from an in-memory copy of the first ``HEAD_BYTES`` when the header ends there (or
    the whole file is in them), else from the file, once its elements are counted (a header
    of too many is a ``FileProblem``: ``stowd.elements``).  A deflated data set is inflated by
    ``stowd.deflated`` within its limits.  pydicom asks its file for the position
    at every element; on a real file each answer is a system call that releases the GIL, and
    while other threads are busy each one waits to get it back: a header read took ~5 ms
    instead of ~0.6 ms with a busy thread beside it.  The bytes parsed are the same either way.
    ``head``: the file's first ``HEAD_BYTES``.
    """
    dicomlib.load()  # pydicom whole, one thread at a time
    import pydicom  # noqa: PLC0415 - only a header the walk left to pydicom comes here

    start = deflated.data_set_start(fp, head)
    if start is not None:  # never given to pydicom whole: it would inflate all of it
        return deflated.read_header(fp, start)
    memory = io.BytesIO(head)
    try:
        ds = pydicom.dcmread(memory, stop_before_pixels=True, force=True, defer_size=DEFER)
    except Exception:
        ds = None  # cut off by the copy's end, or damaged: the file itself says which
    end = memory.tell()
    # At least an element header left after where parsing stopped: it stopped at the pixel
    # data, not at the end of the copy (a value skipped past that end moves tell() beyond it).
    if ds is not None and (len(head) == size or end + 12 <= len(head)):
        fp.seek(end)
        return ds
    found = deflated.count_header(fp, head)  # more than HEAD_BYTES: bounded first
    fp.seek(0)
    with elements.parsing(found):  # the count may be short: pydicom's reads are counted too
        bounded = cast(BinaryIO, elements.Bounded(fp))
        ds = pydicom.dcmread(bounded, stop_before_pixels=True, force=True, defer_size=DEFER)
    # pydicom reads a deferred value later through the file object it was given, or by
    # opening its type again: as for a file, the file is opened again by its name (the
    # caller goes on from fp's position, and Bounded cannot open a path), through
    # dropped.open_file (beneath a guarded watch folder, never a link put there since).
    # Its name is the path: a file opened beneath a guarded folder is named by its
    # descriptor, closed by then (a deferred read raised, a rule failed the file as damaged)
    ds.buffer, ds.fileobj_type = None, _reopen
    if path is not None:
        ds.filename = path
    return ds


def _reopen(path: str, _mode: str) -> BinaryIO:
    """The dropped file ``path`` opened again, for pydicom's read of a deferred value."""
    return dropped.open_file(path)


def _looks_like_part10(head: bytes, size: int) -> bool:
    if head[_MAGIC_AT : _MAGIC_AT + 4] == b"DICM":
        return True
    # A Part-10 file whose preamble was stripped starts with the File Meta group (0002,xxxx).
    return size > 8 and head[:2] == b"\x02\x00" and head[4:6].isalpha()


def _keys(ds: pydicom.Dataset) -> Classified:
    """Each value read once, by tag (a read by keyword looks the keyword up first)."""
    meta = getattr(ds, "file_meta", None)
    found = {"SOPClassUID": _value(ds, SOP_CLASS)}
    sop_class = str(found["SOPClassUID"] or (meta and meta.get("MediaStorageSOPClassUID")))
    if sop_class == DICOMDIR_CLASS or DIRECTORY_RECORDS in ds:
        raise FileProblem(
            "this is a DICOMDIR (an index of a DICOM medium), not an image or document; "
            "archives do not store it, so it was not sent"
        )
    found |= {"StudyInstanceUID": _value(ds, STUDY), "SOPInstanceUID": _value(ds, INSTANCE)}
    missing = [k for k in ("StudyInstanceUID", "SOPInstanceUID", "SOPClassUID") if not found[k]]
    if missing:
        raise FileProblem(
            f"the DICOM header has no {', '.join(missing)}; an archive cannot store an "
            "instance without it"
        )
    if meta is None or not meta.get("TransferSyntaxUID"):
        raise FileProblem("the file has no File Meta Information with a TransferSyntaxUID")
    study, sop = str(found["StudyInstanceUID"]), str(found["SOPInstanceUID"])
    return Classified("dicom", study, sop, sop_class, header=ds)


def _value(ds: pydicom.Dataset, tag: int) -> object:
    """``ds.get(keyword)`` by tag: the element's value, None when it is absent (or when
    reading it raises AttributeError, which ``get`` takes for absent too)."""
    try:
        return ds[tag].value if tag in ds else None
    except AttributeError:
        return None


def _transfer_syntax(ds: pydicom.Dataset) -> str:
    return str(ds.file_meta.TransferSyntaxUID)


def _described(keys: Classified) -> str | None:
    ds = keys.header
    return None if ds is None else _image_description(ds)


def _image_description(ds: pydicom.Dataset) -> str | None:
    """What makes the header an image's (so pixel data must follow it), or None.

    An image has the Image Pixel module (group 0028: Rows, Columns, BitsAllocated, ...).  A
    header cut before it looks like an object without pixel data (a report, a plan): the
    quiet period is all that protects such a cut (see docs/how-it-works.md).  MR
    spectroscopy has Rows and Columns but its data in SpectroscopyData, not in pixel data."""
    if SPECTROSCOPY_DATA in ds or not any(tag in ds for tag in IMAGE_PIXEL_TAGS):
        return None
    try:  # a value cut short by the end of the file cannot be read: say less
        return f"of {int(ds.Rows)} x {int(ds.Columns)} pixels"
    except Exception:
        return "(its Image Pixel attributes are there)"


def _check_pixel_data(
    fp: BinaryIO, size: int, syntax: str, image: Callable[[], str | None] = lambda: None
) -> None:
    """Make sure the pixel data that follows the header is complete (not cut short).

    ``image()``: how the header describes an image (``_image_description``), asked only when
    no pixel data follows; such a file must go on with its pixel data.  Raises
    ``FileIncomplete`` when the file ends too soon."""
    if syntax == DEFLATED:
        return
    little = syntax != BIG_ENDIAN
    start = fp.tell()
    header = fp.read(8)
    if len(header) < 8:
        described = image()
        if described is not None:  # an image without pixel data: the rest may still come
            raise FileIncomplete(
                f"the file is truncated: its header describes an image {described} but the "
                "file ends before the pixel data (was it copied completely?)"
            )
        return  # no pixel data and not an image (a report, a plan): nothing more to check
    # Some files say explicit VR but are written implicit (pydicom reads them so): follow
    # the bytes, not the label, so such a file is not called truncated.
    implicit = syntax == IMPLICIT or not header[4:6].isalpha()
    group, elem = struct.unpack("<HH" if little else ">HH", header[:4])
    if (group, elem) not in PIXEL_TAGS:
        return
    length, offset = _element_length(fp, header, little, implicit)
    if length == UNDEFINED:
        _walk_fragments(fp, size, little)
    elif start + offset > size:
        raise FileIncomplete(CUT_ELEMENT)
    elif start + offset + length > size:
        raise FileIncomplete(
            f"the file is truncated: its pixel data should have {length} bytes but only "
            f"{max(size - start - offset, 0)} are there (was it copied completely?)"
        )


def _element_length(fp: BinaryIO, header: bytes, little: bool, implicit: bool) -> tuple[int, int]:
    order = "<" if little else ">"
    if implicit:
        return struct.unpack(order + "I", header[4:8])[0], 8
    extra = fp.read(4)
    if len(extra) < 4:
        return 0, 12
    return struct.unpack(order + "I", extra)[0], 12


def _walk_fragments(fp: BinaryIO, size: int, little: bool) -> None:
    """Encapsulated pixel data: every fragment must fit and the sequence must end."""
    order = "<HHI" if little else ">HHI"
    while True:
        item = fp.read(8)
        if len(item) < 8:
            raise FileIncomplete(
                "the file is truncated: its compressed pixel data ends without the closing "
                "sequence delimiter (was it copied completely?)"
            )
        group, elem, length = struct.unpack(order, item)
        if (group, elem) == SEQ_END:
            return
        if (group, elem) != ITEM or fp.tell() + length > size:
            raise FileIncomplete(
                "the file is truncated or damaged: a compressed pixel data fragment runs past "
                "the end of the file"
            )
        fp.seek(length, os.SEEK_CUR)
