"""The DICOM instance a bulkdata file becomes, as values: what describe_instance makes and
write reads.

``bulkdata.describe_instance`` makes an ``Instance``: the data set and where its bulk value
comes from (a ``Bulk`` byte range); ``decode`` gives the ``Pixels`` and the ``Bulk`` of a
decoded PNG or GIF; ``part10.write`` streams an instance into a Part-10 file. The bulk element
is ``DOCUMENT`` (EncapsulatedDocument) or ``PIXEL_DATA``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import FileDataset
from pydicom.tag import BaseTag, Tag

DOCUMENT = Tag(0x0042, 0x0011)
PIXEL_DATA = Tag(0x7FE0, 0x0010)
_FOR_NAMESPACE = uuid.UUID("6f0c2c55-3b53-4f1e-9c59-5d1d2f0c6a21")  # stowd frames of reference


@dataclass(frozen=True)
class Uids:
    """The UIDs of the instance to build (generated once, stored, reused on every retry).

    ``frame_of_reference`` (STL and OBJ models): when None, one is derived from ``instance``,
    so it is the same on every retry.
    """

    study: str
    series: str
    instance: str
    frame_of_reference: str | None = None

    def frame_of_reference_uid(self) -> str:
        if self.frame_of_reference:
            return self.frame_of_reference
        return f"2.25.{uuid.uuid5(_FOR_NAMESPACE, self.instance).int}"


@dataclass(frozen=True)
class Bulk:
    """Where the bulk value's bytes come from.

    ``media_type`` is the bulk part's Content-Type in the metadata form: application/pdf,
    text/xml, model/stl, model/obj, model/mtl, image/jpeg, image/jp2 (a whole .jp2 file),
    image/j2c (a bare codestream), video/mpeg, video/mp4, video/quicktime, or
    application/octet-stream (native pixels). ``transfer_syntax`` is set for pixel data only.
    ``file_size`` and ``mtime_ns`` are those of ``path`` when it was described: ``write``
    refuses a file that changed since (None: not checked).
    """

    path: Path
    offset: int
    length: int
    media_type: str
    transfer_syntax: str | None
    file_size: int | None = None
    mtime_ns: int | None = None


@dataclass(frozen=True)
class Instance:
    """A DICOM instance to send: every attribute but the bulk element, and the bulk value.

    ``dataset`` holds the file meta too, and the values (rules) are applied. ``tag`` is
    EncapsulatedDocument or PixelData; ``encapsulated`` is True for pixel data in fragments
    (compressed), False for a native value or a document.
    """

    dataset: FileDataset
    tag: BaseTag
    bulk: Bulk
    encapsulated: bool


@dataclass(frozen=True)
class Pixels:
    """The Image Pixel description of an image or video."""

    rows: int
    columns: int
    samples: int
    bits: int
    photometric: str
    lossy: str | None  # LossyImageCompressionMethod, None when lossless
    frames: int | None = None  # video only
    frame_time_ms: float | None = None


def bulk_vr(instance: Instance) -> str:
    """The VR of the bulk element (for the BulkDataURI in DICOM JSON): OB, or OW for native
    pixels of more than 8 bits."""
    native = instance.tag == PIXEL_DATA and not instance.encapsulated
    return "OW" if native and instance.dataset.get("BitsAllocated", 8) > 8 else "OB"
