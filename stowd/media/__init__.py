"""Files as DICOM: what a dropped photo, PDF, video or 3D model holds (``probe``, ``video``,
``reading``), the instance it becomes (``bulkdata``, ``instance``, ``decode``, ``part10``), and
a DICOM file's header read within bounds and rewritten for upload (``dicomfile``,
``elements``, ``deflated``, ``rewrite``, ``explicit``).

May import: base, rules.
"""
