"""SEG and SR from compiled templates: highdicom builds once per configuration, each image fills in its values.

The reference builder (:mod:`.dicom_results`, highdicom) costs hundreds of
CPU-ms per image, nearly all of it re-deriving what is the same for every
image. Here highdicom builds the SEG and SR once per *shape* (:func:`_key`:
source SOP class, character set and which patient/study attributes it has,
image size, transfer syntax, the models and settings), from a "full" version
of the first result of that shape: all zones scored, every zone graded,
a lesion area, all nine segments non-empty. The encoded dataset is then
compiled (:func:`_compile`, with :mod:`.dataset_template`) into constant
bytes and *slots*, by the rules here (:class:`_Rules`):

* UIDs derived from the source, and the source's own UIDs, wherever they
  occur (found by value);
* the patient/study attributes highdicom copies from the source, Patient
  Orientation, the source's acquisition equipment item, the timestamps;
* each measured value (``MeasuredValueSequence``, in document order) and each
  qualitative evaluation's code (present/absent, severity);
* optional items: a zone group (unscored zone), a severity item (grade 0),
  the lesion area, a SEG frame (empty segment, as highdicom omits it);
* Number of Frames and Pixel Data: the frames bit-packed with
  ``np.packbits`` in highdicom's order (or JPEG 2000, frame by frame, with
  highdicom's own encoder).

A compiled template must render its own template inputs to exactly the
bytes pydicom wrote, or it is not used (the reference builds that shape
instead, with a warning). tests/test_result_templates.py holds the proof that
matters: varied real results give the same bytes here as through highdicom.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from highdicom.enum import PatientSexValues
from highdicom.frame import encode_frame
from pydicom import Dataset
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.encaps import encapsulate
from pydicom.sr.codedict import codes
from pydicom.uid import JPEG2000Lossless
from pydicom.valuerep import DA, DS, DT, TM

from ..dicom_header import EncodedObject, ResultKind, derived_uid, integer, text
from . import dicom_results as ref
from .dataset_template import (
    Slot,
    Template,
    encode_element,
    encode_item,
    file_header,
    item_bytes,
    long_element,
    long_header,
    short_element,
)
from .pipeline import Result
from .scoring import Box, ZoneMasks, whole_plane

log = logging.getLogger(__name__)

__all__ = ["clear_templates", "encode_result_objects", "save_result_objects", "template_counts"]

# -- what varies per image --------------------------------------------------

#: Slot names of the UIDs that differ per image, derived as dicom_results derives them.
_DERIVED = ("seg", "seg-series", "sr", "sr-series", "dimension-organization", "opacity", "totals",
            *(f"segment-{n}" for n in range(1, 10)), *(f"zone-{k}" for k in range(6)))
#: What SOPClass.__init__ takes from the source itself, before (and besides) copying its Patient and Study modules.
_BASE_COPIED = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "AccessionNumber",
                "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")
_TIMES = {"InstanceCreationDate": "date", "ContentDate": "date", "InstanceCreationTime": "time",
          "ContentTime": "time", "ContributionDateTime": "datetime"}
_EVALUATION = (codes.DCM.AbnormalOpacity.value, codes.DCM.AbnormalOpacity.scheme_designator)
_SEVERITY = (codes.SCT.Severity.value, codes.SCT.Severity.scheme_designator)
_AREA = (codes.SCT.Area.value, codes.SCT.Area.scheme_designator)
_ZONES = 6


def _copied_tags(sop_class_uid: str, modules: tuple[tuple[str, str | None], ...]) -> tuple[int, ...]:
    """Root-level tags highdicom copies from a source of this SOP class (SOPClass._copy_root_attributes_of_module)."""
    from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map, get_sop_class_iod_map

    attributes = get_module_attribute_map()
    keywords: list[str] = list(_BASE_COPIED)
    for entry in get_iod_module_map()[get_sop_class_iod_map()[sop_class_uid]]:
        for ie, module in modules:
            wanted = module is None or entry["key"] == module
            if entry["ie"] == ie and wanted:
                keywords += [str(a["keyword"]) for a in attributes[entry["key"]] if len(a["path"]) == 0]
    return tuple(sorted({t for t in (tag_for_keyword(k) for k in keywords) if t is not None}))


_SEG_MODULES = (("Patient", None), ("Study", None), ("Image", "specimen"))
_SR_MODULES = (("Patient", None), ("Study", None))
_copied_cache: dict[tuple[str, str], tuple[int, ...]] = {}


def copied_tags(source: Dataset, kind: str) -> tuple[int, ...]:
    key = (str(source.SOPClassUID), kind)
    if key not in _copied_cache:
        _copied_cache[key] = _copied_tags(key[0], _SEG_MODULES if kind == "seg" else _SR_MODULES)
    return _copied_cache[key]


@dataclass
class Values:
    """One image's values for the slots of its SEG and SR templates."""

    source: Dataset
    now: datetime
    uids: dict[str, str]
    numbers: list[float | int]
    codes: dict[str, hd.sr.CodedConcept]
    options: dict[str, bool]
    parts: list[tuple[Box | None, np.ndarray]]  # per segment plane, a box holding all its pixels and the plane in it
    shape: tuple[int, int]  # the planes' rows and columns
    present: list[bool]
    jpeg2000: bool
    acquisition: bytes | None = None  # the source's acquisition equipment item, once made
    packed: dict[int, np.ndarray] = field(default_factory=dict)

    def packed_plane(self, index: int) -> np.ndarray:
        """Segment plane ``index`` bit-packed as DICOM packs 1-bit pixels (little bit order), made once."""
        if index not in self.packed:
            box, inside = self.parts[index]
            self.packed[index] = packed_frame(inside, box, self.shape)
        return self.packed[index]

    def plane(self, index: int) -> np.ndarray:
        """Segment plane ``index`` whole (for JPEG 2000, or frames whose bits run across rows)."""
        box, inside = self.parts[index]
        return inside if box is None else whole_plane(inside, box, self.shape)

    def overlap(self) -> bool:
        """Is any pixel in more than one segment (highdicom's Segments Overlap)?"""
        seen: np.ndarray | None = None
        for index, present in enumerate(self.present):
            if not present:
                continue
            plane = self.packed_plane(index)
            if seen is None:
                seen = plane.copy()
            elif np.bitwise_and(seen, plane).any():
                return True
            else:
                seen |= plane
        return False


def packed_frame(inside: np.ndarray, box: Box | None, shape: tuple[int, int]) -> np.ndarray:
    """``np.packbits(plane, axis=None, bitorder="little")`` of the ``shape`` plane that is ``inside`` within ``box``
    (which holds all the plane's pixels) and empty elsewhere; ``box`` None: ``inside`` is the whole plane.

    With a whole number of bytes per row, packed rows start on byte boundaries: the box's rows are
    packed over its columns widened to whole bytes, into a zeroed frame (a zone is a few percent of a film).
    """
    rows, columns = shape
    if box is None:
        return np.packbits(inside, axis=None, bitorder="little")
    if columns % 8:
        return np.packbits(whole_plane(inside, box, shape), axis=None, bitorder="little")
    frame = np.zeros((rows, columns // 8), np.uint8)
    top, bottom, left, right = box
    first, end = left // 8, -(-right // 8)
    if bottom > top and end > first:
        widened = np.zeros((bottom - top, 8 * (end - first)), bool)  # the box's columns out to whole bytes
        widened[:, left - 8 * first:right - 8 * first] = inside
        frame[top:bottom, first:end] = np.packbits(widened, axis=1, bitorder="little")
    return frame.ravel()


def _values(source: Dataset, result: Result, now: datetime, jpeg2000: bool) -> Values:
    src, version = str(source.SOPInstanceUID), result.algorithm_version
    uids = {name: derived_uid(src, version, name) for name in _DERIVED}
    uids.update(source=src, source_series=str(source.SeriesInstanceUID), study=str(source.StudyInstanceUID))
    s = result.scores
    numbers: list[float | int] = []
    for k in range(_ZONES):
        numbers += ref.zone_values(result, k)
    if s.lesion_area_mm2 is not None:
        numbers.append(round(s.lesion_area_mm2, 1))
    else:
        numbers.append(0.0)  # left out below
    numbers += ref.total_values(result)
    chosen = {}
    for k in range(_ZONES):
        chosen[f"evaluation-{k}"] = codes.SCT.Present if s.binary[k] else codes.SCT.Absent
        chosen[f"severity-{k}"] = ref.SEVERITY.get(s.brixia[k], codes.SCT.Mild)
    scored = s.scored
    parts = ref.segmentation_parts(result)
    present = [bool(inside.any()) for _, inside in parts]
    omit = any(present)  # highdicom omits empty frames unless all are empty
    options = {f"zone-{k}": scored[k] for k in range(_ZONES)}
    options.update({f"severity-{k}": bool(s.brixia[k]) for k in range(_ZONES)})
    options["area"] = s.lesion_area_mm2 is not None
    options.update({f"frame-{i}": present[i] or not omit for i in range(len(parts))})
    shape = (result.lungs.shape[0], result.lungs.shape[1])
    return Values(source, now, uids, numbers, chosen, options, parts, shape, present, jpeg2000)


_has_pixels: dict[str, bool] = {}


def _acquisition_equipment(source: Dataset) -> hd.ContributingEquipment | None:
    """highdicom's ContributingEquipment.for_image_acquisition, its IOD lookup cached; None where it gives none."""
    from highdicom._standard_utils import does_iod_have_pixel_data

    sop_class = str(source.SOPClassUID)
    if sop_class not in _has_pixels:
        _has_pixels[sop_class] = bool(does_iod_have_pixel_data(sop_class))
    manufacturer = source.get("Manufacturer")
    if not _has_pixels[sop_class] or manufacturer is None or manufacturer == "":
        return None
    when = source.get("AcquisitionDateTime")
    if when is None:
        date, time = source.get("AcquisitionDate"), source.get("AcquisitionTime")
        if isinstance(date, dt.date) and isinstance(time, dt.time):
            when = dt.datetime.combine(date, time)
    try:
        return hd.ContributingEquipment(
            manufacturer=manufacturer, purpose_of_reference=codes.DCM.AcquisitionEquipment,
            manufacturer_model_name=source.get("ManufacturerModelName"),
            software_versions=source.get("SoftwareVersions"), device_serial_number=source.get("DeviceSerialNumber"),
            institution_name=source.get("InstitutionName"),
            institutional_department_name=source.get("InstitutionalDepartmentName"),
            institution_address=source.get("InstitutionAddress"), station_name=source.get("StationName"),
            contribution_datetime=when, contribution_description="Acquisition equipment of the source image(s)",
        )
    except Exception:  # highdicom's builder leaves the item out when it cannot make it
        return None


def _checked(source: Dataset) -> bool:
    """Does the source pass the checks highdicom makes of what it takes from it (SOPClass.__init__)?

    The template copies these values without looking at them; where highdicom
    would refuse one, the reference builder runs instead, so the node refuses
    the same sources with the same errors.
    """
    try:
        for keyword in ("PatientID", "PatientName", "AccessionNumber", "StudyID"):
            getattr(source, keyword)
        DA(source.PatientBirthDate)
        if source.StudyDate is not None:
            DA(source.StudyDate)
        if source.StudyTime is not None:
            TM(source.StudyTime)
        if source.PatientSex not in (None, ""):
            PatientSexValues(source.PatientSex)
    except (AttributeError, ValueError, TypeError):
        return False
    return True


def _full(result: Result) -> Result:
    """The template's inputs: ``result`` with every optional part present."""
    s = result.scores
    scores = replace(s, brixia=[b or 1 for b in s.brixia], zone_area_px=[1] * _ZONES,
                     lesion_area_mm2=s.lesion_area_mm2 if s.lesion_area_mm2 is not None else 1.0)
    ones = np.ones(result.lungs.shape, dtype=bool)
    zones = ZoneMasks.of_planes((ones,) * _ZONES, ones, ones, result.zones.lungs_found)  # whole planes now
    return replace(result, disease=ones, zones=zones, scores=scores)


# -- compiling ---------------------------------------------------------------


class _Rules:
    """Which parts of the SEG and SR vary per image (see the module docstring): :class:`.dataset_template.Rules`."""

    def __init__(self, values: Values, copied: tuple[int, ...]) -> None:
        self.uid_names = {v: k for k, v in values.uids.items()}
        self.copied = set(copied)
        self.numbers = 0
        self.evaluations = 0
        self.severities = 0

    def slot(self, elem: DataElement, parent: Dataset, encoding: Any, depth: int) -> Slot | None:
        tag, keyword = int(elem.tag), elem.keyword
        if depth == 0 and tag in self.copied:
            return Slot.of(elem, "copy", tag)
        if depth == 0 and keyword in ("PatientOrientation", "NumberOfFrames", "PixelData", "SegmentsOverlap"):
            return Slot.of(elem, keyword)
        if keyword in _TIMES:
            return Slot.of(elem, "time", _TIMES[keyword])
        if elem.VR == "UI" and isinstance(elem.value, str) and elem.value in self.uid_names:
            return Slot.of(elem, "uid", self.uid_names[elem.value])
        if keyword == "MeasuredValueSequence":
            self.numbers += 1
            units = encode_element(elem.value[0]["MeasurementUnitsCodeSequence"], encoding)
            return Slot.of(elem, "number", (self.numbers - 1, units))
        if keyword == "ConceptCodeSequence" and parent.get("ValueType") == "CODE":
            concept = _concept(parent)
            if concept == _EVALUATION:
                self.evaluations += 1
                return Slot.of(elem, "code", f"evaluation-{self.evaluations - 1}")
            if concept == _SEVERITY:  # its item was counted just before (item)
                return Slot.of(elem, "code", f"severity-{self.severities - 1}")
        return None

    def item(self, sequence: DataElement, index: int, item: Dataset, depth: int) -> str | Slot | None:
        keyword = sequence.keyword
        if depth == 0 and keyword == "ContributingEquipmentSequence":
            # the source's acquisition equipment: made per image, or left out, as highdicom does
            return Slot("acquisition") if index == 0 and _is_acquisition(item) else None
        if keyword == "PerFrameFunctionalGroupsSequence":
            return f"frame-{index}"
        if keyword != "ContentSequence":
            return None
        concept = _concept(item)
        if item.get("ValueType") == "CODE" and concept == _SEVERITY:
            self.severities += 1
            return f"severity-{self.severities - 1}"
        if item.get("ValueType") == "NUM" and concept == _AREA:
            return "area"
        if item.get("ValueType") == "CONTAINER":
            for child in item.get("ContentSequence", []):
                name = self.uid_names.get(str(child.get("UID", "")), "")
                if name.startswith("zone-"):
                    return name
        return None


def _concept(item: Dataset) -> tuple[str, str] | None:
    names = item.get("ConceptNameCodeSequence")
    if not names:
        return None
    return str(names[0].CodeValue), str(names[0].CodingSchemeDesignator)


def _is_acquisition(item: Dataset) -> bool:
    purpose = item.get("PurposeOfReferenceCodeSequence")
    return bool(purpose) and str(purpose[0].CodeValue) == codes.DCM.AcquisitionEquipment.value


# -- rendering ---------------------------------------------------------------


class _Slots:
    """Renders a template's slots for one image; what is the same for many images is encoded once."""

    def __init__(self, encoding: Any) -> None:
        self.encoding = encoding
        self.codes: dict[tuple[str, str], bytes] = {}
        self.values: dict[tuple[type, float | int], bytes] = {}

    def __call__(self, slot: Slot, v: Values) -> bytes | list[Any]:
        kind = slot.kind
        if kind == "uid":
            uid = v.uids[slot.arg].encode()
            return short_element(slot.head, uid + b"\0" if len(uid) % 2 else uid)
        if kind == "copy":
            return encode_element(v.source[slot.tag], self.encoding) if slot.tag in v.source else b""
        if kind == "time":
            value: Any = {"date": DA(v.now.date()), "time": TM(v.now.time()), "datetime": DT(v.now)}[slot.arg]
            return self.element(slot, value)
        if kind == "number":
            return self.number(slot, v)
        if kind == "code":
            return self.code(v.codes[slot.arg])
        if kind == "acquisition":
            return self.acquisition(v)
        if kind == "PatientOrientation":
            return self.element(slot, v.source.get("PatientOrientation", ""))
        if kind == "NumberOfFrames":
            return self.element(slot, sum(v.options[f"frame-{i}"] for i in range(len(v.parts))))
        if kind == "PixelData":
            return self.pixel_data(slot, v)
        if kind == "SegmentsOverlap":
            return self.element(slot, "YES" if v.overlap() else "NO")
        raise ValueError(f"unknown slot {kind}")

    def element(self, slot: Slot, value: Any) -> bytes:
        return encode_element(DataElement(slot.tag, slot.vr, value), self.encoding)

    def number(self, slot: Slot, v: Values) -> bytes:
        index, units = slot.arg
        value = v.numbers[index]
        key = (type(value), value)
        if key not in self.values:
            # As highdicom's NumContentItem: Numeric Value (DS) always, Floating Point Value (FD) for a float.
            fp = encode_element(DataElement(0x0040A161, "FD", value), None) if isinstance(value, float) else b""
            self.values[key] = fp + encode_element(DataElement(0x0040A30A, "DS", DS(value, auto_format=True)), None)
        return long_element(slot.head, item_bytes(units + self.values[key]))

    def code(self, code: Any) -> bytes:
        key = (code.value, code.scheme_designator)
        if key not in self.codes:
            item = hd.sr.CodeContentItem(name=codes.DCM.Finding, value=code,
                                         relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
            self.codes[key] = encode_element(item["ConceptCodeSequence"], self.encoding)
        return self.codes[key]

    def acquisition(self, v: Values) -> bytes:
        if v.acquisition is None:
            item = _acquisition_equipment(v.source)
            v.acquisition = b"" if item is None else encode_item(item, self.encoding)
        return v.acquisition

    def pixel_data(self, slot: Slot, v: Values) -> bytes | list[Any]:
        if not v.jpeg2000:
            return self.pixel_parts(slot, v)
        # frame by frame with highdicom's own encoder, then encapsulated (with a Basic Offset Table) as it does
        frames = [v.plane(i) for i in range(len(v.parts)) if v.options[f"frame-{i}"]]
        encoded = [encode_frame(np.ascontiguousarray(p, dtype=np.uint8), transfer_syntax_uid=JPEG2000Lossless,
                                bits_allocated=1, bits_stored=1, photometric_interpretation="MONOCHROME2",
                                pixel_representation=0) for p in frames]
        return long_element(slot.head, encapsulate(encoded), undefined=True)

    def pixel_parts(self, slot: Slot, v: Values) -> list[Any]:
        """Native Pixel Data as pieces (header, packed frames, pad), so that 5 MB are copied once."""
        included = [i for i in range(len(v.parts)) if v.options[f"frame-{i}"]]
        rows, columns = v.shape
        packed: list[Any]
        if (rows * columns) % 8 == 0:  # frames pack on byte boundaries: one at a time, no stacked copy
            packed = [v.packed_plane(i) for i in included]
        else:  # bits run on across frames, as highdicom packs them
            packed = [np.packbits(np.stack([v.plane(i) for i in included]), axis=None, bitorder="little")]
        size = sum(int(p.size) for p in packed)
        pad = [b"0"] if size % 2 else []  # highdicom's pad byte
        return [long_header(slot.head, size + len(pad)), *packed, *pad]


@dataclass
class _Filling:
    """One image's values for one template (:class:`.dataset_template.Filling`)."""

    slots: _Slots
    values: Values

    def slot(self, slot: Slot) -> bytes | list[Any]:
        return self.slots(slot, self.values)

    def written(self, option: str) -> bool:
        return self.values.options[option]


@dataclass
class ResultTemplate:
    """One compiled SEG or SR: its dataset's template, file meta and the facts the node records for it."""

    kind: ResultKind
    body: Template
    meta: Dataset
    facts: dict[str, Any]
    slots: _Slots

    def render(self, values: Values) -> bytes:
        meta = Dataset()
        meta.update(self.meta)
        meta.MediaStorageSOPInstanceUID = values.uids[self.kind]
        return b"".join([file_header(meta), *self.body.parts(_Filling(self.slots, values))])

    def encoded(self, values: Values) -> EncodedObject:
        f = self.facts
        return EncodedObject(
            kind=self.kind, sop_class_uid=f["sop_class_uid"], sop_instance_uid=values.uids[self.kind],
            series_instance_uid=values.uids[f"{self.kind}-series"], study_instance_uid=values.uids["study"],
            transfer_syntax_uid=f["transfer_syntax_uid"], modality=f["modality"], series_number=f["series_number"],
            series_description=f["series_description"], instance_number=f["instance_number"],
            body_part=f["body_part"], data=self.render(values),
        )


def _compile(kind: ResultKind, ds: Dataset, values: Values, copied: tuple[int, ...]) -> ResultTemplate:
    body = Template.compile(ds, _Rules(values, copied))
    facts = dict(
        sop_class_uid=str(ds.SOPClassUID), transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        modality=text(ds, "Modality", 16), series_number=integer(ds, "SeriesNumber"),
        series_description=text(ds, "SeriesDescription"), instance_number=integer(ds, "InstanceNumber"),
        body_part=text(ds, "BodyPartExamined", 16),
    )
    return ResultTemplate(kind, body, ds.file_meta, facts, _Slots(ds.get("SpecificCharacterSet")))


# -- the cache -----------------------------------------------------------------

_Pair = tuple[ResultTemplate, ResultTemplate]  # a shape's SEG and SR

#: Templates kept (LRU); a node sees a few shapes (detector sizes, sites), each costs one highdicom build.
MAX_TEMPLATES = 32
_templates: OrderedDict[tuple[Any, ...], _Pair | None] = OrderedDict()
_lock = threading.Lock()


def clear_templates() -> None:
    with _lock:
        _templates.clear()


def template_counts() -> tuple[int, int]:
    """(shapes with a compiled template, shapes whose template failed its check and use highdicom)."""
    with _lock:
        compiled = sum(t is not None for t in _templates.values())
        return compiled, len(_templates) - compiled


def _key(source: Dataset, result: Result, jpeg2000: bool) -> tuple[Any, ...]:
    """What changes the structure of the SEG and SR (everything else is a slot)."""
    identity = result.identity
    numbers = [type(x) for k in range(_ZONES) for x in ref.zone_values(result, k)]
    numbers += [type(x) for x in ref.total_values(result)]
    present = tuple(t for t in sorted(set(copied_tags(source, "seg")) | set(copied_tags(source, "sr")))
                    if t in source)
    return (
        str(source.SOPClassUID), str(source.get("SpecificCharacterSet", "")), present, result.lungs.shape, jpeg2000,
        result.algorithm_version, tuple(result.software_versions), ref.algorithm_name(result),
        tuple(ref.algorithm_parameters(result)), identity.short_label, identity.lungs.describe(),
        identity.disease.describe(), identity.research_use, tuple(numbers),
    )


def _build(source: Dataset, result: Result, jpeg2000: bool, now: datetime) -> _Pair | None:
    """Compile the SEG and SR templates of this shape; None when they do not reproduce highdicom exactly."""
    full = _full(result)
    objects = ref.build_result_objects(source, full, jpeg2000=jpeg2000, now=now)
    seg_ref, sr_ref = objects.encode()  # also settles the VRs pydicom writes
    values = _values(source, full, now, jpeg2000)
    seg = _compile("seg", objects.seg, values, copied_tags(source, "seg"))
    sr = _compile("sr", objects.sr, values, copied_tags(source, "sr"))
    if seg.render(values) != seg_ref.data or sr.render(values) != sr_ref.data:
        log.warning("SEG/SR template does not reproduce highdicom's bytes; this shape uses highdicom")
        return None
    return seg, sr


def encode_result_objects(
    source: Dataset, result: Result, *, jpeg2000: bool = False, now: datetime | None = None, reference: bool = False
) -> tuple[EncodedObject, EncodedObject]:
    """The SEG and SR of one scored image as the node stores them.

    ``reference``: build them with highdicom (:mod:`.dicom_results`), as the
    templates are tested against; otherwise a compiled template of this
    shape is filled in.
    """
    now = now or datetime.now()
    if reference or not _checked(source):
        return ref.build_result_objects(source, result, jpeg2000=jpeg2000, now=now).encode()
    key = _key(source, result, jpeg2000)
    with _lock:
        found = key in _templates
        templates = _templates.get(key)
        if found:
            _templates.move_to_end(key)
    if not found:
        templates = _build(source, result, jpeg2000, now)
        with _lock:
            _templates[key] = templates
            while len(_templates) > MAX_TEMPLATES:
                _templates.popitem(last=False)
    if templates is None:
        return ref.build_result_objects(source, result, jpeg2000=jpeg2000, now=now).encode()
    values = _values(source, result, now, jpeg2000)
    seg, sr = templates
    return seg.encoded(values), sr.encoded(values)


def save_result_objects(source: Dataset, result: Result, folder: Path, *, jpeg2000: bool = False) -> tuple[Path, Path]:
    """Write the SEG and SR to ``folder`` under the names :meth:`.dicom_results.ResultObjects.save` gives them."""
    folder.mkdir(parents=True, exist_ok=True)
    seg, sr = encode_result_objects(source, result, jpeg2000=jpeg2000)
    seg_path, sr_path = folder / f"{seg.sop_instance_uid}.seg.dcm", folder / f"{sr.sop_instance_uid}.sr.dcm"
    seg_path.write_bytes(seg.data)
    sr_path.write_bytes(sr.data)
    return seg_path, sr_path
