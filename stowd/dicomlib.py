"""pydicom, imported whole by one thread at a time, and only when something needs it.

stowd keeps pydicom off its start and off a usual file's path (its import is 0.2-0.3 s of
CPU, issue 19), so pydicom is imported for the first time while the daemon's threads run: a
reader meeting a header the quick walk leaves to pydicom, a worker rewriting a file or
building one from a PDF, a rule or a sidecar naming an attribute.  Two threads must never
import it for the first time together: in CPython a ``from pydicom.dataset import X`` does
not wait for another thread's ``import pydicom`` still under way, and gets its half-built
modules ("cannot import name 'Dataset' from partially initialized module"; a usual file
then went to failed/ as damaged).  Every import of pydicom or of a module of stowd that
imports it at its top is preceded by ``load()``
(``tests/test_dicomlib.py`` checks that each is).
"""

from __future__ import annotations

import importlib
import threading

# every module of pydicom stowd imports, so that each is whole once ``load`` returns
MODULES = (
    "pydicom",
    "pydicom.charset",
    "pydicom.config",
    "pydicom.datadict",
    "pydicom.dataelem",
    "pydicom.dataset",
    "pydicom.filebase",
    "pydicom.filereader",
    "pydicom.filewriter",
    "pydicom.multival",
    "pydicom.sequence",
    "pydicom.tag",
    "pydicom.uid",
    "pydicom.values",
)

_lock = threading.Lock()
_whole = threading.Event()


def load() -> None:
    """Import pydicom (its modules stowd uses), once, by one thread; the others wait."""
    if _whole.is_set():
        return
    with _lock:
        if not _whole.is_set():
            for name in MODULES:
                importlib.import_module(name)
            _whole.set()
