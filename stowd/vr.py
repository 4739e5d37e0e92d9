"""DICOM keywords and values for metadata rules and sidecars: look up, check against the VR.

Contract (shared by rules.py, sidecar.py and rewrite.py):

* A ``Value`` is what a rule or sidecar writes into one attribute, already checked:
  ``None`` (zero-length, for Type 2 attributes), ``str`` (text VRs, DA/TM/DT, UI, PN, DS),
  ``int`` (IS, US, SS, UL, SL, UV, SV), ``float`` (FL, FD), a ``list`` of scalars for a value
  multiplicity above 1, or for SQ a ``list`` of items, each a ``dict`` keyword -> ``Value``.
"""

from __future__ import annotations

from typing import TypeAlias

Scalar: TypeAlias = str | int | float
Value: TypeAlias = "Scalar | None | list[Scalar | Item]"
Item: TypeAlias = "dict[str, Value]"
