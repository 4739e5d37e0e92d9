"""What stowd knows of a DICOM file's encoding, shared by reading (classify) and writing
(rewrite, explicit): transfer syntaxes, the pixel data and item tags, and how pydicom's errors
while a header is read become stowd's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stowd import dropped
from stowd.errors import FileProblem, reading
from stowd.media import deflated, elements
from stowd.media.quickheader import VRS

DEFLATED = deflated.DEFLATED
BIG_ENDIAN = "1.2.840.10008.1.2.2"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"  # Explicit VR Little Endian
PIXEL_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}
UNDEFINED = 0xFFFFFFFF
ITEM = (0xFFFE, 0xE000)
SEQ_END = (0xFFFE, 0xE0DD)
HEAD_BYTES = 64 * 1024  # a header that ends within these bytes is parsed from memory


@contextmanager
def header_errors() -> Iterator[None]:
    """pydicom's errors while a header is read become ``FileProblem`` (the file is damaged);
    a real I/O error (with an errno) passes, since the file may be readable later, and so
    does a failed import (of pydicom, imported only now: stowd's fault, not the file's)."""
    try:
        yield
    except (FileProblem, ImportError):  # an import that failed says nothing of the file
        raise
    except OSError as exc:
        if exc.errno is not None:
            raise
        # pydicom reports some damage as OSError, and wraps elements.Bounded's refusal so
        raise elements.refused(exc) or unreadable_header(exc) from exc
    except Exception as exc:  # any other parse error of a damaged header
        raise elements.refused(exc) or unreadable_header(exc) from exc


def unreadable_header(exc: Exception) -> FileProblem:
    detail = str(exc) or type(exc).__name__
    return FileProblem(f"the DICOM header cannot be read (the file is damaged): {detail}")


def needs_explicit(src: Path) -> bool:
    """Does ``transcode: explicit-vr`` convert ``src``: is it a Part-10 file whose data set
    is Implicit VR Little Endian (by its TransferSyntaxUID, or by its bytes where it says
    Explicit VR Little Endian)?  Reads its File Meta and the first element after it, never
    the whole header (``rewrite`` reads that, counted first); here, not in rewrite.py, so
    that a file not converted imports none of pydicom (issue 19)."""
    with reading(src), dropped.open_file(src) as fp, header_errors():
        start, syntax = deflated.file_meta(fp, fp.read(HEAD_BYTES))
        if syntax == IMPLICIT:
            return True
        fp.seek(start)
        first = fp.read(6)
    return syntax == EXPLICIT and len(first) == 6 and first[4:6] not in VRS  # a VR pydicom knows
