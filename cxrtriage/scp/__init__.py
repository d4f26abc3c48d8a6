"""DICOM networking: storage SCP, query/retrieve SCP, C-STORE SCU to PACS."""
