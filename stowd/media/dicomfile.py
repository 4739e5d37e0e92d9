"""What stowd knows of a DICOM file's encoding, shared by reading (classify) and writing
(rewrite, explicit): transfer syntaxes, the pixel data and item tags, and how pydicom's errors
while a header is read become stowd's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from stowd.errors import FileProblem
from stowd.media import deflated, elements

DEFLATED = deflated.DEFLATED
BIG_ENDIAN = "1.2.840.10008.1.2.2"
IMPLICIT = "1.2.840.10008.1.2"
PIXEL_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}
UNDEFINED = 0xFFFFFFFF
ITEM = (0xFFFE, 0xE000)
SEQ_END = (0xFFFE, 0xE0DD)
HEAD_BYTES = 64 * 1024  # a header that ends within these bytes is parsed from memory


@contextmanager
def header_errors() -> Iterator[None]:
    """pydicom's errors while a header is read become ``FileProblem`` (the file is damaged);
    a real I/O error (with an errno) passes, since the file may be readable later."""
    try:
        yield
    except FileProblem:
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
