"""The result as a picture every PACS shows: a Secondary Capture image with everything burned in.

Many PACS viewers do not render DICOM SEG, and few show a TID 1500 SR
usefully. A Secondary Capture Image (PS3.3 A.8.1) is the lowest common
denominator: an RGB, 8-bit image (PS3.3 C.7.6.3, Photometric Interpretation
RGB, Planar Configuration 0) of the overlay PNG's picture
(:func:`~cxrtriage.inference.overlay.render_overlay`): the radiograph with the
lungs, the zones and their scores, the opacity tinted, the totals and
P(disease) in a header band, and the models and research-use notice in a
footer band. Burned In Annotation (0028,0301) is YES, so that a viewer or
de-identification tool knows the pixels carry text.

It files into the source's study (patient and study modules copied from the
source by highdicom's ``from_ref_dataset``), in a series of its own, and
references the source image (Source Image Sequence, PS3.3 C.7.6.1.1.4,
purpose "Source image for image processing operation"). Like the SEG and
SR, its UIDs are derived from the source SOP Instance UID and the algorithm
version, so a re-score replaces it instead of adding a copy.
"""

from __future__ import annotations

import cv2
import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from ..dicom_header import EncodedObject, derived_uid
from .dicom_results import MANUFACTURER, MODEL_NAME, contributing_equipment
from .overlay import render_overlay
from .pipeline import Result

#: Series Number of the Secondary Capture series (the SEG is 9901, the SR 9902).
SC_SERIES_NUMBER = 9903
#: Longest side of the picture; the overlay PNG's size, enough to read the labels on a PACS screen.
SC_MAX_SIDE = 1024


def build_secondary_capture(
    source: Dataset, pixels: np.ndarray, result: Result, *, series_number: int = SC_SERIES_NUMBER,
    max_side: int = SC_MAX_SIDE,
) -> hd.sc.SCImage:
    """The Secondary Capture image of one scored radiograph (``pixels``: the decoded radiograph, 0-1)."""
    version = result.algorithm_version
    src_uid = str(source.SOPInstanceUID)
    rgb = cv2.cvtColor(render_overlay(pixels, result, max_side=max_side), cv2.COLOR_BGR2RGB)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=np.ascontiguousarray(rgb),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        # The picture is the radiograph's own grid, so it keeps its orientation; highdicom insists on a value
        # (then replaced by the source's verbatim, which may be empty or use letters highdicom's enum lacks).
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        patient_orientation=("L", "F"),
        series_instance_uid=derived_uid(src_uid, version, "sc-series"),
        series_number=series_number,
        sop_instance_uid=derived_uid(src_uid, version, "sc"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[contributing_equipment(result.software_versions)],
    )
    sc.PatientOrientation = source.get("PatientOrientation", "")  # General Image, Type 2C
    sc.Laterality = source.get("Laterality", "")  # General Series, Type 2C (a paired body part, e.g. the lungs)
    sc.ConversionType = "WSD"  # made on a workstation (PS3.3 C.8.6.1), not digitized
    sc.ManufacturerModelName = MODEL_NAME
    sc.SoftwareVersions = "\\".join(result.software_versions)  # LO, one value per version
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = "; ".join(result.identity.lines())[:10240]
    sc.SeriesDescription = f"cxrtriage overlay ({result.identity.short_label})"[:64]
    sc.DerivationDescription = "lung zone severity overlay with scores burned in"
    sc.SourceImageSequence = [_source_reference(source)]
    return sc


def _source_reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    purpose = codes.DCM.SourceImageForImageProcessingOperation
    item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept(purpose.value, purpose.scheme_designator,
                                                             purpose.meaning)]
    return item


def encode_secondary_capture(source: Dataset, pixels: np.ndarray, result: Result) -> EncodedObject:
    """The Secondary Capture as the file bytes the node stores and sends."""
    return EncodedObject.encode(build_secondary_capture(source, pixels, result), "sc")
