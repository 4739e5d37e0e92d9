"""The real archives the daemon and migrate tests run against: Orthanc and tiny_pacs.

Both fixtures offer what those tests use: ``dicomweb_url``, ``sop_instance_uids()``,
``instance_count()``, ``start()``, ``stop()`` and ``kill()``.  What differs is what each
refuses; ``write_refused`` makes a file that stowd reads fine and the given archive refuses.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from dicomgen import make_instance
from orthanc import Orthanc
from tinypacs import TinyPacs

Archive = Orthanc | TinyPacs
NAMES = ("orthanc", "tiny_pacs")


def write_refused(archive: Archive, path: Path, study_uid: str | None = None) -> str:
    """Write at *path* a file *archive* refuses (of *study_uid* if given); return the HTTP
    status it refuses it with when it comes alone."""
    if isinstance(archive, TinyPacs):
        # tiny_pacs_dicomweb/stow.py checks every UID against the PS3.5 form (no leading zero
        # in a component) and refuses the part with 0x0110, HTTP 409 when it came alone.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns of the bad UID it writes
            make_instance(path, study_uid=study_uid, sop_uid="1.2.826.0.1.3680043.8.498.012")
        return "409"
    # Orthanc: after the pixel data an element claims 100,000 bytes and 10 follow: HTTP 400.
    make_instance(path, study_uid=study_uid)
    with open(path, "ab") as fp:
        fp.write(b"\xfc\xff\xfc\xffOB\x00\x00" + (100_000).to_bytes(4, "little") + b"x" * 10)
    return "400"
