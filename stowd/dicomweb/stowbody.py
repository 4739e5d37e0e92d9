"""The body of a STOW-RS request: a multipart/related body streamed from the files on disk.

Each ``Part`` is one instance (a whole Part-10 file, or a byte range of one in the metadata +
bulkdata form); ``Body`` opens every file before anything is sent, checks it is still the
content that was queued, and streams it in ``CHUNK``s.  A file that vanished, changed or
shrank raises ``FileVanished``; one stowd cannot read, ``FileUnreadable``.  With a rate cap
(``pacing.py``) each piece goes once its destination's bucket lets it.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from stowd import dropped
from stowd.dicomweb.pacing import Pacing
from stowd.errors import FileUnreadable, FileVanished, LinkRefused

CHUNK = 256 * 1024
DICOM_TYPE = "application/dicom"
JSON_TYPE = "application/dicom+json"


@dataclass(frozen=True)
class Part:
    """One instance to send: a file (or a byte range of it) and its SOPInstanceUID.

    ``size`` and ``mtime_ns`` are what the file had when queued (a changed file is not sent).
    In the metadata + bulkdata form (PS3.18) ``metadata`` is the instance's DICOM JSON and the
    bytes ``offset``..``offset + size`` of ``path`` are its bulk part, found by ``location``.
    """

    path: str
    size: int
    sop_uid: str
    mtime_ns: int | None = None
    offset: int = 0
    file_size: int | None = None  # the whole file's size when only a range is sent
    content_type: str = DICOM_TYPE
    location: str | None = None
    metadata: dict[str, Any] | None = field(default=None, compare=False, repr=False)


class Body:
    """A multipart/related body over open files: a fresh one (and boundary) per attempt.

    Part-10 files travel as ``application/dicom`` parts. Parts with ``metadata`` make the
    metadata + bulkdata form: one ``application/dicom+json`` part holding the array of
    instances, then one bulk part per instance with its ``Content-Location``.
    """

    def __init__(
        self,
        parts: Sequence[Part],
        progress: Callable[[], None] | None = None,
        pacing: Pacing | None = None,
    ) -> None:
        self.boundary = uuid.uuid4().hex
        self.parts = list(parts)
        # called for every chunk sent, and while a rate cap holds it back (the watchdog's
        # sign of life)
        self.progress = progress
        self.pacing = pacing  # the destination's rate cap (ratecap, issue 20)
        self._files: list[BinaryIO] = []
        self.sent_at: float | None = None  # time.monotonic() when the last byte was handed on
        metadata = [p.metadata for p in self.parts if p.metadata is not None]
        self.root = DICOM_TYPE if not metadata else JSON_TYPE
        self.json = json.dumps(metadata).encode("utf-8") if metadata else b""

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="{self.root}"; boundary={self.boundary}'

    def _head(self, content_type: str, size: int, location: str | None = None) -> bytes:
        where = f"Content-Location: {location}\r\n" if location else ""
        return (
            f"--{self.boundary}\r\nContent-Type: {content_type}\r\n{where}"
            f"Content-Length: {size}\r\n\r\n"
        ).encode("ascii")

    def _part_head(self, part: Part) -> bytes:
        return self._head(part.content_type, part.size, part.location)

    def _json_head(self) -> bytes:
        return self._head(f"{JSON_TYPE}; charset=utf-8", len(self.json)) if self.json else b""

    @property
    def tail(self) -> bytes:
        return f"--{self.boundary}--\r\n".encode("ascii")

    @property
    def length(self) -> int:
        heads = sum(len(self._part_head(p)) + p.size + 2 for p in self.parts)
        first = len(self._json_head()) + len(self.json) + 2 if self.json else 0
        return first + heads + len(self.tail)

    def open(self) -> None:
        """Open every file now, so a vanished or changed file is known before sending."""
        try:
            for part in self.parts:
                try:
                    # raw: read through its descriptor (preadv) or in CHUNKs, never
                    # through a buffer (a buffered reader's set-up asked for its position)
                    fp = dropped.open_file(part.path, open, unbuffered=True)  # open: tests' seam
                except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
                    raise FileVanished(f"{part.path} vanished", path=part.path) from exc
                except LinkRefused as exc:  # a link planted since it was read
                    raise FileVanished(f"{part.path} is now a link", path=part.path) from exc
                except OSError as exc:
                    raise FileUnreadable.from_os_error(exc, part.path) from exc
                self._files.append(fp)
                if _changed(os.fstat(fp.fileno()), part):
                    raise FileVanished(f"{part.path} changed", path=part.path)
        except BaseException:
            self.close()  # any failure (PermissionError too) leaves no file open
            raise

    def close(self) -> None:
        for fp in self._files:
            fp.close()
        self._files.clear()

    def __iter__(self) -> Iterator[bytes]:
        """The body in pieces of at most ``CHUNK`` bytes, each once the rate cap lets it go
        (in smaller slices at a low cap); raises ``Stopping`` when stowd stops meanwhile."""
        pieces = self._pieces()
        if self.pacing is not None:
            pieces = self.pacing.bucket.paced(pieces, self.pacing.halt, self.progress)
        yield from pieces
        self.sent_at = time.monotonic()

    def _pieces(self) -> Iterator[bytes]:
        """The body in pieces of at most ``CHUNK`` bytes (a large file in ``CHUNK``s, as read);
        small parts share one piece: each piece is a system call or more in httpx."""
        out = _Pieces()
        if self.json:
            yield from out.add(self._json_head() + self.json + b"\r\n")
        for part, fp in zip(self.parts, self._files, strict=True):
            head = self._part_head(part)
            if len(head) + part.size + 2 <= CHUNK:
                yield from out.add(head)
                yield from out.read_into(fp, part)  # read where it is sent from: no copy
                if self.progress is not None:
                    self.progress()
            else:  # in CHUNKs as read: nothing copied
                yield from out.flush()
                yield head
                yield from self._chunks(fp, part)
            yield from out.add(b"\r\n")
        yield from out.add(self.tail)
        yield from out.flush()

    def _chunks(self, fp: BinaryIO, part: Part) -> Iterator[bytes]:
        for chunk in _read_exactly(fp, part):
            if self.progress is not None:
                self.progress()
            yield chunk


class _Pieces:
    """Gathers small parts of the body into pieces of up to ``CHUNK`` bytes."""

    def __init__(self) -> None:
        self.view = memoryview(bytearray(CHUNK))
        self.held = 0

    def add(self, data: bytes) -> Iterator[bytes]:
        if self.held + len(data) > CHUNK:
            yield from self.flush()
        if len(data) >= CHUNK:
            yield data
            return
        self.view[self.held : self.held + len(data)] = data
        self.held += len(data)

    def read_into(self, fp: BinaryIO, part: Part) -> Iterator[bytes]:
        """Add ``part``'s bytes (at most ``CHUNK``) read from ``fp`` straight into the piece."""
        if self.held + part.size > CHUNK:
            yield from self.flush()
        # read at the part's offset through the descriptor: no seek (a body may be iterated
        # again) and no buffered reader's work, one system call for a whole small file
        fd, at, end = fp.fileno(), part.offset, self.held + part.size
        while self.held < end:
            got = os.preadv(fd, [self.view[self.held : end]], at)
            if not got:
                raise _shorter(part)
            self.held += got
            at += got

    def flush(self) -> Iterator[bytes]:
        if self.held:
            piece = bytes(self.view[: self.held])
            self.held = 0
            yield piece


def _changed(st: os.stat_result, part: Part) -> bool:
    """Not the content that was queued (the file was rewritten or replaced)."""
    size = part.size if part.file_size is None else part.file_size
    return st.st_size != size or part.mtime_ns not in (None, st.st_mtime_ns)


def _read_exactly(fp: BinaryIO, part: Part) -> Iterator[bytes]:
    fp.seek(part.offset)
    left = part.size
    while left > 0:
        chunk = fp.read(min(CHUNK, left))
        if not chunk:
            raise _shorter(part)
        left -= len(chunk)
        yield chunk


def _shorter(part: Part) -> FileVanished:
    return FileVanished(f"{part.path} became shorter while it was being sent", path=part.path)
