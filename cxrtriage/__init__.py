"""cxrtriage: chest radiograph severity triage, as a DICOM node."""

__version__ = "0.1.0"
