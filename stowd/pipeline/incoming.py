"""The folders received instances wait in, and clearing what a stop left there.

Apart from ``receive`` so that the daemon can clear them at every start without importing
pynetdicom (about 60 ms of CPU at every start) when no source receives.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from stowd.config.model import INCOMING, RECEIVED, Source
from stowd.printable import escape

log = logging.getLogger("stowd.receive")

PART = ".part"


def parts_folder(source: Source) -> Path:
    """Where a receiving source's finished files wait for their name: inside its own folder
    (a rename, never across filesystems), hidden from its watcher."""
    return source.watch / INCOMING


def incoming_folder(queue: Path) -> Path:
    """Where instances wait while they arrive: never queued, cleared when stowd starts."""
    return queue.parent / RECEIVED / INCOMING


def clear_parts(source: Source) -> int:
    """At start: finished files a stop left before their rename (none was acknowledged)."""
    folder = parts_folder(source)
    removed = 0
    for path in folder.glob(f"*{PART}") if folder.is_dir() else ():
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def clear_incoming(queue: Path, older_than: float | None = None) -> int:
    """Remove what a stop or a crash left while instances arrived (none was acknowledged);
    with ``older_than`` (a time), only files last written before it: what an association
    that was aborted mid-instance left behind (pynetdicom does not remove it)."""
    folder = incoming_folder(queue)
    removed = 0
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    for name in names:
        try:
            path = folder / name
            if older_than is None or path.lstat().st_mtime < older_than:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot remove %s from %s: %s", escape(name), folder, exc)
    return removed
