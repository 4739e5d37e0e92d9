"""The PS3.18 metadata + bulkdata form of an instance stowd builds (``bulkdata: metadata``).

The instance travels as its DICOM JSON (one item of the request's ``application/dicom+json``
array), whose bulk attribute (EncapsulatedDocument or PixelData) carries a ``BulkDataURI``,
and one bulk part with the same ``Content-Location``: the PDF, the JPEG stream, the video,
sent from the file itself. Archives such as dcm4chee-arc derive what is missing themselves.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stowd import dicomlib
from stowd.dicomweb.stowbody import Part
from stowd.media.reading import Media
from stowd.pipeline.queue import Job
from stowd.rules.vr import Item

if TYPE_CHECKING:  # bulkdata (pydicom) is imported where an instance is built (issue 19)
    from stowd.media import bulkdata


def sop_class_name(uid: str) -> str:
    """The name of a SOP Class, e.g. "Encapsulated PDF Storage"."""
    dicomlib.load()  # pydicom whole, one thread at a time
    from pydicom.uid import UID  # noqa: PLC0415 - as bulkdata below

    return str(UID(uid).name)


def bulk_part(
    job: Job,
    media: Media,
    values: Item,
    uids: bulkdata.Uids,
    *,
    scratch: Path,
    now: datetime,
    instance_number: int,
    photographic: bool,
    expect: tuple[int, int],
) -> Part:
    """The metadata and the bulk part of the instance built from ``job``'s file."""
    dicomlib.load()  # pydicom whole, one thread at a time
    from stowd.media import bulkdata  # noqa: PLC0415 - pydicom: not at start (issue 19)

    source = Path(job.path)
    instance = bulkdata.describe_instance(
        source,
        media,
        values,
        uids,
        now=now,
        instance_number=instance_number,
        photographic=photographic,
        scratch=scratch,
        expect=expect,
    )
    bulk = bulkdata.metadata_bulk(instance, source, media)
    sop_uid = job.sop_uid or str(instance.dataset.SOPInstanceUID)
    location = f"bulk/{sop_uid}"
    content_type = bulk.media_type
    if bulk.transfer_syntax:
        content_type += f"; transfer-syntax={bulk.transfer_syntax}"
    own = bulk.path == source  # a range of the file itself, not decoded pixels
    return Part(
        str(bulk.path),
        bulk.length,
        sop_uid,
        job.mtime_ns if own else None,
        offset=bulk.offset,
        file_size=job.size if own else None,
        content_type=content_type,
        location=location,
        metadata=instance_json(instance, location),
    )


def instance_json(instance: bulkdata.Instance, location: str) -> dict[str, Any]:
    """The instance in the DICOM JSON model, its bulk attribute pointing at ``location``."""
    dicomlib.load()  # pydicom whole, one thread at a time
    from stowd.media import bulkdata  # noqa: PLC0415 - as bulk_part

    doc: dict[str, Any] = instance.dataset.to_json_dict(bulk_data_threshold=2**31)
    doc[f"{int(instance.tag):08X}"] = {"vr": bulkdata.bulk_vr(instance), "BulkDataURI": location}
    return dict(sorted(doc.items()))
