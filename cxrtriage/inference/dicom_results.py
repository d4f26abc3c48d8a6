"""Results as standard DICOM: a BINARY Segmentation and a TID 1500 Structured Report.

* Segmentation (PS3.3 A.51), BINARY, at the source image's full resolution
  (CR/DX have no Frame of Reference, so a resampled grid is not allowed):
  segments right lung, left lung, opacity, and the six lung zones, coded
  with SNOMED CT / DCM, laterality as Segmented Property Type Modifier.
* Comprehensive 3D SR (PS3.3 A.35.13) holding a TID 1500 Measurement
  Report: one TID 1411 volumetric ROI group per zone (affected fraction,
  binary zone score, Brixia-style grade, severity, finding site with
  laterality; the zone's segment referenced with the source image), one for
  the opacity segment, and a TID 1501 image-level group with the totals and
  P(disease).

Both carry the IHE AI Results Contributing Equipment item ("Processing
Algorithm", 99IHE) and the source's patient/study attributes, so they file
into the source's study. Both name the models that produced them: the SEG in
its Series Description and each segment's Algorithm Identification (name,
version, parameters), the SR in TID 4019 Algorithm Identification (PS3.16),
whose parameters list each model, its origin and training data, and the
research-use notice when the models never saw a real radiograph. Zones of a
lung that was not found are left out of the SR (unscored, never "absent").
Their UIDs are derived from the source SOP Instance UID and the algorithm
version: re-scoring the same image with the same models gives the same UIDs,
never a second copy.

This highdicom builder is the reference; the node encodes through
:mod:`.result_templates`, which fills compiled templates of these objects and
is tested to give the same bytes. ``now`` pins every timestamp the objects
carry (creation, content, contribution), so the two paths can be compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless
from pydicom.valuerep import DA, DT, TM

from ..dicom_header import EncodedObject, derived_uid
from .pipeline import Result
from .scoring import BRIXIA_LETTERS, Box, hull, take_box

MANUFACTURER = "cxrtriage"
MODEL_NAME = "cxrtriage zone severity"

#: Private coding scheme for quantities no standard code names exactly.
SCHEME = "99CXRT"
AFFECTED_FRACTION = hd.sr.CodedConcept("AFFFRAC", SCHEME, "Affected fraction of zone")
ZONE_SCORE = hd.sr.CodedConcept("ZONESCORE", SCHEME, "Zone severity score")
BRIXIA_GRADE = hd.sr.CodedConcept("BRIXGRADE", SCHEME, "Brixia-style zone grade")
TOTAL_SCORE = hd.sr.CodedConcept("TOTSCORE", SCHEME, "Zone severity score total (0-6)")
BRIXIA_TOTAL = hd.sr.CodedConcept("BRIXTOTAL", SCHEME, "Brixia-style score total (0-18)")
EXTENT_RIGHT = hd.sr.CodedConcept("EXTRIGHT", SCHEME, "Geographic extent score, right lung (0-4)")
EXTENT_LEFT = hd.sr.CodedConcept("EXTLEFT", SCHEME, "Geographic extent score, left lung (0-4)")
PROCESSING_ALGORITHM = hd.sr.CodedConcept("Newcode1", "99IHE", "Processing Algorithm")
PLAIN_CHEST_XRAY = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")

UNIT_PERCENT = codes.UCUM.Percent
UNIT_MM2 = codes.UCUM.SquareMillimeter
UNIT_ONE = codes.UCUM.NoUnits
UNIT_SCORE = hd.sr.CodedConcept("{score}", "UCUM", "score")

ZONE_TYPES = (codes.SCT.UpperZoneOfLung, codes.SCT.MiddleZoneOfLung, codes.SCT.LowerZoneOfLung)
SEVERITY = {1: codes.SCT.Mild, 2: codes.SCT.Moderate, 3: codes.SCT.Severe}

#: Segment numbers in the SEG.
SEG_RIGHT_LUNG, SEG_LEFT_LUNG, SEG_OPACITY = 1, 2, 3
SEG_FIRST_ZONE = 4  # zones A-F are segments 4-9


@dataclass
class ResultObjects:
    """The SEG and SR of one scored image, as datasets."""

    seg: Dataset
    sr: Dataset

    def encode(self) -> tuple[EncodedObject, EncodedObject]:
        """Both as the file bytes the node stores and sends, with their UIDs and series facts."""
        return EncodedObject.encode(self.seg, "seg"), EncodedObject.encode(self.sr, "sr")

    def save(self, folder: Path) -> tuple[Path, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        seg_path = folder / f"{self.seg.SOPInstanceUID}.seg.dcm"
        sr_path = folder / f"{self.sr.SOPInstanceUID}.sr.dcm"
        self.seg.save_as(seg_path, enforce_file_format=True)
        self.sr.save_as(sr_path, enforce_file_format=True)
        return seg_path, sr_path


def _segment_descriptions(
    algorithm: hd.AlgorithmIdentificationSequence, source_uid: str, version: str
) -> list[hd.seg.SegmentDescription]:
    def describe(number: int, label: str, category, kind, side=None) -> hd.seg.SegmentDescription:
        desc = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=category,
            segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=derived_uid(source_uid, version, f"segment-{number}"),
            tracking_id=label,
        )
        if side is not None:
            # Segmented Property Type Modifier Code Sequence (0062,0011): laterality.
            modifier = hd.sr.CodedConcept(side.value, side.scheme_designator, side.meaning)
            desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [modifier]
        return desc

    anatomy = codes.SCT.AnatomicalStructure
    descs = [
        describe(SEG_RIGHT_LUNG, "Right lung", anatomy, codes.SCT.Lung, codes.SCT.Right),
        describe(SEG_LEFT_LUNG, "Left lung", anatomy, codes.SCT.Lung, codes.SCT.Left),
        describe(SEG_OPACITY, "Opacity", codes.SCT.MorphologicallyAbnormalStructure, codes.DCM.AbnormalOpacity),
    ]
    for k in range(6):
        side = codes.SCT.Right if k < 3 else codes.SCT.Left
        level = ("upper", "middle", "lower")[k % 3]
        label = f"Zone {BRIXIA_LETTERS[k]} ({'right' if k < 3 else 'left'} {level})"
        descs.append(describe(SEG_FIRST_ZONE + k, label, anatomy, ZONE_TYPES[k % 3], side))
    return descs


def contributing_equipment(versions: list[str]) -> hd.ContributingEquipment:
    """IHE AIR's Contributing Equipment item for the processing algorithm.

    highdicom only admits the CID 7005 purposes, so the item is built as
    "Processing Equipment" and then given AIR's (Newcode1, 99IHE,
    "Processing Algorithm"); CID 7005 is extensible.
    """
    equipment = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=MODEL_NAME,
        software_versions=versions,
        contribution_description="AI lung zone severity scoring",
    )
    equipment.PurposeOfReferenceCodeSequence = [PROCESSING_ALGORITHM]
    return equipment


def _source_header(source: Dataset) -> Dataset:
    """The source dataset without Pixel Spacing for highdicom.

    highdicom derives a Pixel Measures Sequence from Pixel Spacing but
    without Slice Thickness, which its own reader then rejects; a CR has no
    frame of reference, so the SEG carries no spacing (the source has it).
    """
    header = Dataset()
    header.update(source)
    header.file_meta = getattr(source, "file_meta", FileMetaDataset())
    for keyword in ("PixelSpacing",):
        if keyword in header:
            delattr(header, keyword)
    return header


def algorithm_name(result: Result) -> str:
    """Algorithm Name (LO, at most 64 characters): the product and which models, with the notice."""
    return f"{MANUFACTURER}: {result.identity.short_label}"[:64]


def algorithm_parameters(result: Result) -> list[str]:
    """TID 4019 Algorithm Parameters: each model, its origin and training data; T; the P(disease) gate; the notice."""
    return [*result.identity.lines(), f"zone threshold T={result.scores.zone_threshold:g}",
            f"P(disease) gate {result.disease_gate:g}"]


#: Manufacturer of the Contributing Equipment item highdicom adds for itself (it stamps it with the time).
HIGHDICOM_EQUIPMENT = "Highdicom open-source contributors"


def pin_times(ds: Dataset, now: datetime) -> None:
    """Give every timestamp highdicom set by its own clock the one time ``now``."""
    ds.InstanceCreationDate, ds.InstanceCreationTime = DA(now.date()), TM(now.time())
    ds.ContentDate, ds.ContentTime = DA(now.date()), TM(now.time())
    for item in ds.get("ContributingEquipmentSequence", []):
        if item.get("Manufacturer") == HIGHDICOM_EQUIPMENT and "ContributionDateTime" in item:
            item.ContributionDateTime = DT(now)


def segmentation_planes(result: Result) -> list[np.ndarray]:
    """The SEG's segments 1-9 as full-resolution masks, in segment order."""
    zones = result.zones
    return [zones.right, zones.left, result.disease, *zones.zones]


def segmentation_parts(result: Result) -> list[tuple[Box | None, np.ndarray]]:
    """:func:`segmentation_planes` as (box, the plane inside it): each box holds all of its plane's pixels;
    None: the whole plane (the disease mask's).

    The zones carry their boxes; each lung is the union of its three zones. So the
    SEG template reads a zone's few percent of the film, not its full plane.
    """
    zones = result.zones
    right, left = hull(zones.boxes[:3]), hull(zones.boxes[3:])
    parts: list[tuple[Box | None, np.ndarray]] = [(right, take_box(zones.right, right)),
                                                   (left, take_box(zones.left, left)), (None, result.disease)]
    return parts + list(zip(zones.boxes, zones.insides))


def zone_values(result: Result, k: int) -> tuple[float, int, int]:
    """Zone ``k``'s measured values, as its SR group carries them: affected %, binary score, grade."""
    s = result.scores
    return round(100.0 * s.fractions[k], 2), s.binary[k], s.brixia[k]


def total_values(result: Result) -> tuple[float | int, ...]:
    """The image-level group's measured values, in order."""
    s = result.scores
    return s.total, s.brixia_total, s.extent_right, s.extent_left, round(result.p_disease, 4)


def build_segmentation(
    source: Dataset, result: Result, *, series_number: int = 9901, jpeg2000: bool = False,
    now: datetime | None = None,
) -> hd.seg.Segmentation:
    version = result.algorithm_version
    src_uid = str(source.SOPInstanceUID)
    identity = result.identity
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name(result), family=codes.DCM.ArtificialIntelligence, version=version,
        parameters={"lungs": identity.lungs.describe(), "disease": identity.disease.describe(),
                    "research_use": "yes" if identity.research_use else "no"},
    )
    # Segments stacked as planes, then viewed as (1, rows, columns, segments):
    # highdicom's per-pixel checks and frame extraction run over contiguous
    # planes, 3x faster than over an interleaved last axis.
    planes = np.stack(segmentation_planes(result), dtype=np.uint8)
    stack = np.moveaxis(planes, 0, -1)[None]
    seg = hd.seg.Segmentation(
        source_images=[_source_header(source)],
        pixel_array=stack,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segment_descriptions(algorithm, src_uid, version),
        series_instance_uid=derived_uid(src_uid, version, "seg-series"),
        series_number=series_number,
        sop_instance_uid=derived_uid(src_uid, version, "seg"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        # highdicom annotates a one-element tuple; it takes any sequence of versions.
        software_versions=result.software_versions,  # type: ignore[arg-type]
        device_serial_number="0",
        content_label="LUNGZONES",
        content_description="Lungs, opacity and lung zones",
        transfer_syntax_uid=JPEG2000Lossless if jpeg2000 else ExplicitVRLittleEndian,
        omit_empty_frames=bool(stack.any()),
        contributing_equipment=[contributing_equipment(result.software_versions)],
    )
    seg.SeriesDescription = f"cxrtriage lung zones ({identity.short_label})"[:64]
    # Type 2C in the General Image module; highdicom does not copy it.
    seg.PatientOrientation = source.get("PatientOrientation", "")
    # highdicom draws a random Dimension Organization UID; derive it like the others.
    organization = derived_uid(src_uid, version, "dimension-organization")
    seg.DimensionOrganizationSequence[0].DimensionOrganizationUID = organization
    for item in seg.DimensionIndexSequence:
        item.DimensionOrganizationUID = organization
    pin_times(seg, now or datetime.now())
    return seg


def _zone_group(
    k: int, result: Result, seg: Dataset, source: Dataset, algorithm_id: hd.sr.AlgorithmIdentification
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    s = result.scores
    side = codes.SCT.Right if k < 3 else codes.SCT.Left
    site = hd.sr.FindingSite(anatomic_location=ZONE_TYPES[k % 3], laterality=side)
    fraction, binary, grade = zone_values(result, k)
    measurements = [
        hd.sr.Measurement(name=AFFECTED_FRACTION, value=fraction, unit=UNIT_PERCENT,
                          algorithm_id=algorithm_id, finding_sites=[site]),
        hd.sr.Measurement(name=ZONE_SCORE, value=binary, unit=UNIT_SCORE, algorithm_id=algorithm_id),
        hd.sr.Measurement(name=BRIXIA_GRADE, value=grade, unit=UNIT_SCORE, algorithm_id=algorithm_id),
    ]
    evaluations = [
        hd.sr.QualitativeEvaluation(
            name=codes.DCM.AbnormalOpacity, value=codes.SCT.Present if s.binary[k] else codes.SCT.Absent
        )
    ]
    if s.brixia[k]:
        evaluations.append(hd.sr.QualitativeEvaluation(name=codes.SCT.Severity, value=SEVERITY[s.brixia[k]]))
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(str(source.SOPInstanceUID), result.algorithm_version, f"zone-{k}"),
            identifier=f"Zone {BRIXIA_LETTERS[k]}",
        ),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=SEG_FIRST_ZONE + k,
            source_images=[hd.sr.SourceImageForSegmentation(source.SOPClassUID, source.SOPInstanceUID)],
        ),
        finding_type=codes.DCM.AbnormalOpacity,
        finding_sites=[site],
        algorithm_id=algorithm_id,
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )


def build_report(
    source: Dataset, seg: Dataset, result: Result, *, series_number: int = 9902, now: datetime | None = None
) -> hd.sr.Comprehensive3DSR:
    version = result.algorithm_version
    src_uid = str(source.SOPInstanceUID)
    s = result.scores
    # TID 4019 Algorithm Identification, repeated in every measurement it produced.
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm_name(result), version=version, parameters=algorithm_parameters(result)
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("cxrtriage-device", version, "observer"),
            name=MANUFACTURER,
            manufacturer_name=MANUFACTURER,
            model_name=MODEL_NAME,
        ),
    )
    groups: list = [_zone_group(k, result, seg, source, algorithm_id) for k in range(6) if s.scored[k]]
    opacity_measurements = []
    if s.lesion_area_mm2 is not None:
        opacity_measurements.append(
            hd.sr.Measurement(
                name=codes.SCT.Area, value=round(s.lesion_area_mm2, 1), unit=UNIT_MM2, algorithm_id=algorithm_id
            )
        )
    groups.append(
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derived_uid(src_uid, version, "opacity"), identifier="Opacity"
            ),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID,
                sop_instance_uid=seg.SOPInstanceUID,
                segment_number=SEG_OPACITY,
                source_images=[hd.sr.SourceImageForSegmentation(source.SOPClassUID, source.SOPInstanceUID)],
            ),
            finding_type=codes.DCM.AbnormalOpacity,
            finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)],
            algorithm_id=algorithm_id,
            measurements=opacity_measurements or None,
        )
    )
    names = (TOTAL_SCORE, BRIXIA_TOTAL, EXTENT_RIGHT, EXTENT_LEFT, codes.DCM.Probability)
    units = (UNIT_SCORE, UNIT_SCORE, UNIT_SCORE, UNIT_SCORE, UNIT_ONE)
    totals = [hd.sr.Measurement(name=name, value=value, unit=unit, algorithm_id=algorithm_id)
              for name, value, unit in zip(names, total_values(result), units)]
    groups.append(
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derived_uid(src_uid, version, "totals"), identifier="Totals"
            ),
            finding_type=codes.DCM.AbnormalOpacity,
            finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)],
            algorithm_id=algorithm_id,
            measurements=totals,
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source, seg],
        content=report,
        series_instance_uid=derived_uid(src_uid, version, "sr-series"),
        series_number=series_number,
        sop_instance_uid=derived_uid(src_uid, version, "sr"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        contributing_equipment=[contributing_equipment(result.software_versions)],
    )
    sr.SeriesDescription = f"cxrtriage zone severity ({result.identity.short_label})"[:64]
    # Declare the private coding scheme (PS3.3 C.12.1.1.8).
    scheme = Dataset()
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = "cxrtriage zone severity codes"
    scheme.CodingSchemeResponsibleOrganization = "cxrtriage project"
    sr.CodingSchemeIdentificationSequence = [scheme]
    pin_times(sr, now or datetime.now())
    return sr


def build_result_objects(
    source: Dataset, result: Result, *, jpeg2000: bool = False, now: datetime | None = None
) -> ResultObjects:
    """SEG and SR of one scored image, ready to save or send (highdicom: the reference builder)."""
    now = now or datetime.now()
    seg = build_segmentation(source, result, jpeg2000=jpeg2000, now=now)
    sr = build_report(source, seg, result, now=now)
    return ResultObjects(seg=seg, sr=sr)
