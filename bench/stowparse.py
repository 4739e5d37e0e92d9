"""Reading a STOW-RS request body as it arrives, for the fast discarding endpoint (discard.py).

``PartReader`` is fed the bytes of one ``multipart/related`` body in pieces of any size and
keeps, for each part, only what names its instance:

- an ``application/dicom`` part (a Part-10 file): the MediaStorageSOPClassUID (0002,0002) and
  MediaStorageSOPInstanceUID (0002,0003) of its File Meta Information, which PS3.10 7.1 has
  identify the SOP Instance of the data set that follows (always Explicit VR Little Endian,
  right after the 128-byte preamble and ``DICM``);
- an ``application/dicom+json`` part (the metadata + bulkdata form, PS3.18 8.6): the
  SOPClassUID (0008,0016) and SOPInstanceUID (0008,0018) of each instance in its JSON array;
- any other part (bulk data): nothing.

A part's bytes after its first META_LIMIT bytes are skipped, never copied: when its header has
a Content-Length (stowd, curl's and httpx's bodies in bench/senders.py all send one) by
counting, else by searching for the next delimiter.  A part that cannot be read (no File Meta)
is counted in ``unreadable``.  Pure logic: no sockets, no clock.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

META_LIMIT = 64 * 1024  # bytes of a part kept to read its File Meta (it is far shorter)
HEAD_LIMIT = 16 * 1024  # a part header longer than this is not one
ALL = 1 << 62  # "keep everything" (a JSON part without a Content-Length)
PREAMBLE = 128 + 4  # the preamble and b"DICM"
CLASS_TAG, INSTANCE_TAG = (2, 2), (2, 3)
LONG_VRS = {b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"}
JSON_CLASS, JSON_INSTANCE = "00080016", "00080018"
DICOM_KIND, JSON_KIND = "application/dicom", "application/dicom+json"

Instance = tuple[str, str]  # (SOP Class UID, SOP Instance UID)


def meta_uids(data: bytes | bytearray) -> Instance | None:
    """The SOP class and instance UIDs of a Part-10 file's File Meta Information, read from its
    first bytes; None when they are not there (not Part 10, or cut short)."""
    if data[128:PREAMBLE] != b"DICM":
        return None
    at, found = PREAMBLE, {}
    while at + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, at)
        if group != 2:
            break
        vr = bytes(data[at + 4 : at + 6])
        if vr in LONG_VRS:
            if at + 12 > len(data):
                return None
            length, start = struct.unpack_from("<I", data, at + 8)[0], at + 12
        else:
            length, start = struct.unpack_from("<H", data, at + 6)[0], at + 8
        if start + length > len(data):
            return None
        if (group, element) in (CLASS_TAG, INSTANCE_TAG):
            found[element] = bytes(data[start : start + length]).rstrip(b"\x00 ").decode("ascii")
        at = start + length
    if 3 not in found:
        return None
    return found.get(2, ""), found[3]


def json_uids(data: bytes | bytearray) -> list[Instance]:
    """The (SOPClassUID, SOPInstanceUID) of each instance of a DICOM JSON array."""
    try:
        doc: Any = json.loads(bytes(data))
    except ValueError:
        return []
    found = []
    for item in doc if isinstance(doc, list) else [doc]:
        if isinstance(item, dict) and JSON_INSTANCE in item:
            found.append((_json_value(item, JSON_CLASS), _json_value(item, JSON_INSTANCE)))
    return found


def _json_value(item: dict[str, Any], tag: str) -> str:
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0])


@dataclass
class PartReader:
    """Reads one multipart body fed in pieces (``feed``): ``instances`` and ``unreadable``
    are complete once ``done`` (its close delimiter was read).  ``ValueError``: not a
    multipart body this reader understands (the endpoint answers 400)."""

    boundary: bytes
    instances: list[Instance] = field(default_factory=list)
    unreadable: int = 0
    done: bool = False
    _buf: bytearray = field(default_factory=bytearray)  # delimiters, part headers, leftovers
    _state: str = "preamble"  # preamble, after, head, keep, seek, skip, delimiter
    _left: int = 0  # bytes of the current part still to skip (state skip)
    _kind: str = ""  # the current part's media type
    _length: int | None = None  # the current part's Content-Length
    _kept: bytearray = field(default_factory=bytearray)  # the current part's first bytes

    @property
    def delimiter(self) -> bytes:
        return b"\r\n--" + self.boundary

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Take the next bytes of the body (anything after its close delimiter is ignored)."""
        view = memoryview(data)
        while view and not self.done:
            if (
                self._state == "skip" and not self._buf
            ):  # the fast path: a part's body, counted, not copied
                used = min(self._left, len(view))
                self._left -= used
                view = view[used:]
                if not self._left:
                    self._state = "delimiter"
            elif self._state == "keep" and self._length is not None and not self._buf:
                want = self._want()
                self._kept += view[:want]
                view = view[want:]
                self._kept_some()
            else:
                self._buf += view
                view = view[len(view) :]
                while not self.done and self._advance():
                    pass

    def _want(self) -> int:
        """Bytes of the current part still to keep."""
        if self._kind == JSON_KIND:  # kept whole: its JSON is read at the end of the part
            return ALL if self._length is None else self._length - len(self._kept)
        cap = META_LIMIT if self._length is None else min(self._length, META_LIMIT)
        return max(0, cap - len(self._kept))

    def _kept_some(self) -> None:
        """After keeping bytes of a part with a Content-Length: skip the rest once enough."""
        assert self._length is not None
        if self._want():
            return
        self._left = self._length - len(self._kept)
        self._part_done()
        self._state = "skip" if self._left else "delimiter"

    def _advance(self) -> bool:
        """One step over the buffer; False when more bytes are needed."""
        step = {
            "preamble": self._preamble,
            "after": self._after,
            "head": self._head,
            "keep": self._keep,
            "seek": self._seek,
            "skip": self._skip,
            "delimiter": self._delimiter,
        }[self._state]
        return step()

    def _preamble(self) -> bool:
        # The first delimiter may come without the CRLF before it (RFC 2046 5.1.1).
        at = (b"\r\n" + bytes(self._buf)).find(self.delimiter)
        if at < 0:
            del self._buf[: max(0, len(self._buf) - len(self.delimiter))]
            return False
        del self._buf[: at - 2 + len(self.delimiter)]
        self._state = "after"
        return True

    def _after(self) -> bool:
        """Just after a delimiter: "--" closes the body, anything else opens a part."""
        if len(self._buf) < 2:
            return False
        if self._buf[:2] == b"--":
            self.done = True
            return False
        self._state = "head"
        return True

    def _head(self) -> bool:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > HEAD_LIMIT:
                raise ValueError("a part header longer than 16 KiB")
            return False
        headers = {}
        for line in bytes(self._buf[:end]).decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self._kind = headers.get("content-type", "").split(";")[0].strip().lower()
        length = headers.get("content-length")
        self._length = int(length) if length else None
        self._kept = bytearray()
        del self._buf[: end + 4]
        self._state = "keep" if self._length is not None else "seek"
        return True

    def _keep(self) -> bool:
        want = self._want()
        self._kept += self._buf[:want]
        del self._buf[:want]
        self._kept_some()
        return bool(self._buf) or not self._want()

    def _skip(self) -> bool:
        used = min(self._left, len(self._buf))
        del self._buf[:used]
        self._left -= used
        if not self._left:
            self._state = "delimiter"
        return bool(self._buf)

    def _delimiter(self) -> bool:
        if len(self._buf) < len(self.delimiter):
            return False
        if self._buf[: len(self.delimiter)] != self.delimiter:
            raise ValueError("a part is longer than its Content-Length")
        del self._buf[: len(self.delimiter)]
        self._state = "after"
        return True

    def _seek(self) -> bool:
        """A part without a Content-Length ends at the next delimiter."""
        at = self._buf.find(self.delimiter)
        end = at if at >= 0 else len(self._buf) - len(self.delimiter) + 1
        if end > 0:
            self._kept += self._buf[: min(end, self._want())]
            del self._buf[:end]
        if at < 0:
            return False
        del self._buf[: len(self.delimiter)]
        self._part_done()
        self._state = "after"
        return True

    def _part_done(self) -> None:
        if self._kind == JSON_KIND:
            self.instances += json_uids(self._kept)
        elif self._kind == DICOM_KIND:
            found = meta_uids(self._kept)
            if found is None:
                self.unreadable += 1
            else:
                self.instances.append(found)
        self._kept = bytearray()
