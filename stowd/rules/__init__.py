"""Metadata rules, pure: the rule model, its templates and their evaluation (``engine``), and
DICOM keywords and values checked against their VR (``vr``).  No I/O.

May import: base.
"""
