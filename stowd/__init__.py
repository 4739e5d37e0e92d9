"""stowd: watch drop folders and upload what lands there to a DICOMweb archive with STOW-RS.

The packages read as the architecture, lowest first; each may import only what its
``__init__`` names (``tests/test_layout.py`` checks it): ``rules``, ``config``, ``media``,
``dicomweb``, ``pipeline``, ``service``, ``commands``.  The modules here are the base every
package may import, and they import no package: the exception tree (``errors``), text made safe
to print (``printable``), durable file operations (``fileops``) and opening a dropped file
without following a link a writer planted (``dropped``).

May import: base.
"""

__version__ = "0.1.0"
