"""stowd: watch drop folders and upload what lands there to a DICOMweb archive with STOW-RS."""

__version__ = "0.1.0"
