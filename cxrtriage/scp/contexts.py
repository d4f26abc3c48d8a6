"""What the node negotiates: SOP classes and transfer syntaxes (PS3.4, PS3.5)."""

from __future__ import annotations

from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    EnhancedSRStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

#: Images the node scores.
IMAGE_CLASSES = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
)
#: Objects the node writes (and accepts back, e.g. from another node).
RESULT_CLASSES = (SegmentationStorage, Comprehensive3DSRStorage, ComprehensiveSRStorage, EnhancedSRStorage)
STORAGE_CLASSES = IMAGE_CLASSES + RESULT_CLASSES

FIND_CLASSES = (PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind)
MOVE_CLASSES = (PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelMove)
GET_CLASSES = (PatientRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelGet)
VERIFICATION = Verification

#: Transfer syntaxes accepted for storage: everything the pixel decoders read.
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
]
UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}


class Status:
    """C-STORE statuses the node answers with (PS3.4 Table B.2-1)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700  # free disk below the configured floor
    STORAGE_FAILED = 0xA701  # writing the archive or the database failed
    DATASET_MISMATCH = 0xA900  # does not match its SOP class (pixel data missing / too short, class differs)
    CANNOT_UNDERSTAND = 0xC000  # the dataset cannot be parsed
    INVALID_UID = 0xC001  # a UID is missing or malformed (never used as a path)
