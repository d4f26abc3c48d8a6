"""Reading and making DICOM headers: the helpers ingest, scoring and the stages share.

* UIDs derived from a source instance (the PS3.5 9.1 grammar check has one
  definition, ``storage.archive.check_uid``, where a UID becomes a path);
* reads: text and integers from a dataset, Requested Procedure Priority,
  the catalog attributes of a header, an element cut short by truncation;
* :func:`check_encoding`: dataset bytes walked element by element in their
  declared transfer syntax, strictly (PS3.5 7.1), before anything is stored;
* :class:`EncodedObject`: a SEG, SR or Secondary Capture as the bytes it will be stored and
  sent as, with the header facts the node needs about it, so nobody parses
  the bytes back to learn what the builder already knew.
"""

from __future__ import annotations

import io
import struct
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import pydicom

__all__ = [
    "ENCODINGS", "EncodedObject", "EncodingError", "catalog_attributes", "check_encoding", "derived_uid", "integer",
    "requested_priority", "text", "truncated_element",
]


#: Namespace of the name-based UUIDs behind derived UIDs (PS3.5 B.2: "2.25." + UUID as integer).
_UID_NAMESPACE = uuid.UUID("6f0c5a0e-2f3b-5a51-9a4e-6378727472ca")


def derived_uid(source_uid: str, algorithm_version: str, what: str) -> str:
    """A UID fixed by (source instance, algorithm version, object kind).

    A UUIDv5 of those three, written in the 2.25 form; pydicom's
    ``generate_uid(prefix=None)`` would ignore its entropy and be random.
    """
    return "2.25." + str(uuid.uuid5(_UID_NAMESPACE, f"{source_uid}|{algorithm_version}|{what}").int)


def text(ds: pydicom.Dataset, keyword: str, limit: int = 64) -> str:
    """The element's value as stripped text, cut to ``limit`` characters; "" when absent."""
    value = ds.get(keyword)
    return str(value).strip()[:limit] if value is not None else ""


def integer(ds: pydicom.Dataset, keyword: str) -> int | None:
    """The element's value as an integer; None when absent, empty or not a number."""
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def requested_priority(ds: pydicom.Dataset) -> str:
    """Requested Procedure Priority (0040,1003), top level or in the Request Attributes Sequence."""
    value = text(ds, "RequestedProcedurePriority", 16)
    if not value:
        for item in ds.get("RequestAttributesSequence", []) or []:
            value = text(item, "RequestedProcedurePriority", 16)
            if value:
                break
    return value.upper()


def truncated_element(ds: Any) -> str | None:
    """The keyword of an element cut short by the end of the file, or None.

    pydicom reads a truncated value without complaint; right after parsing,
    the last raw element still carries the length it declared, so the cut
    shows as a value shorter than that length.
    """
    elements = getattr(ds, "_dict", {})
    if not elements:
        return None
    tag = max(elements)
    last = elements[tag]
    length, value = getattr(last, "length", None), getattr(last, "value", None)
    if isinstance(value, (bytes, bytearray)) and length not in (None, 0xFFFFFFFF) and len(value) < length:
        from pydicom.datadict import keyword_for_tag

        return keyword_for_tag(tag) or str(tag)
    return None


def catalog_attributes(ds: pydicom.Dataset) -> dict[str, Any]:
    """The header's patient / study / series / instance attributes, as catalog columns (``storage.models.Instance``)."""
    return dict(
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        patient_id=text(ds, "PatientID"),
        patient_name=text(ds, "PatientName", 324),
        patient_birth_date=text(ds, "PatientBirthDate", 8),
        patient_sex=text(ds, "PatientSex", 16),
        study_date=text(ds, "StudyDate", 8),
        study_time=text(ds, "StudyTime", 16),
        study_id=text(ds, "StudyID", 16),
        accession_number=text(ds, "AccessionNumber", 16),
        study_description=text(ds, "StudyDescription"),
        referring_physician=text(ds, "ReferringPhysicianName", 324),
        modality=text(ds, "Modality", 16),
        series_number=integer(ds, "SeriesNumber"),
        series_description=text(ds, "SeriesDescription"),
        instance_number=integer(ds, "InstanceNumber"),
        body_part=text(ds, "BodyPartExamined", 16),
        view_position=text(ds, "ViewPosition", 16),
        requested_priority=requested_priority(ds),
    )


ResultKind = Literal["seg", "sr", "sc"]


@dataclass(frozen=True)
class EncodedObject:
    """A result object as stored and sent: its DICOM file bytes and what the node needs to know about it.

    Plain values only: it crosses the scoring pool's process boundary.
    The series-level facts fill the catalog row; patient and study
    attributes come from the source's row (the builder copied them).
    """

    kind: ResultKind
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    transfer_syntax_uid: str
    modality: str
    series_number: int | None
    series_description: str
    instance_number: int | None
    body_part: str
    data: bytes

    @classmethod
    def encode(cls, ds: pydicom.Dataset, kind: ResultKind) -> EncodedObject:
        """Encode ``ds`` in the DICOM file format (preamble, File Meta, its transfer syntax) and keep its facts."""
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return cls(
            kind=kind,
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            study_instance_uid=str(ds.StudyInstanceUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            modality=text(ds, "Modality", 16),
            series_number=integer(ds, "SeriesNumber"),
            series_description=text(ds, "SeriesDescription"),
            instance_number=integer(ds, "InstanceNumber"),
            body_part=text(ds, "BodyPartExamined", 16),
            data=buffer.getvalue(),
        )


# -- encoding check (PS3.5 7.1, 7.5, A.4) ---------------------------------

#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 Table 7.1-1); the rest have a 2-byte length.
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_SHORT_VRS = frozenset({
    "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "PN", "SH", "SL", "SS", "ST", "TM", "UI",
    "UL", "US",
})
UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_MAX_DEPTH = 32  # sequences nested deeper than this are refused rather than recursed into

#: (implicit VR, little endian) -> name, for messages.
ENCODINGS: dict[tuple[bool, bool], str] = {
    (False, True): "Explicit VR Little Endian",
    (True, True): "Implicit VR Little Endian",
    (False, False): "Explicit VR Big Endian",
}


class EncodingError(ValueError):
    """The dataset bytes cannot be walked element by element in the encoding they were declared in.

    ``reason``: ``truncated`` (the bytes end inside an element, item or sequence),
    ``encoding_mismatch`` (they walk cleanly in another encoding than the declared one)
    or ``malformed`` (anything else).
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class _Truncated(EncodingError):
    def __init__(self, detail: str) -> None:
        super().__init__("truncated", detail)


class _Malformed(EncodingError):
    def __init__(self, detail: str) -> None:
        super().__init__("malformed", detail)


def _tag_name(tag: int) -> str:
    from pydicom.datadict import keyword_for_tag

    text_tag = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    keyword = keyword_for_tag(tag)
    return f"{text_tag} {keyword}" if keyword else text_tag


def _dictionary_vr(tag: int) -> str | None:
    from pydicom.datadict import dictionary_VR

    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


class _Walker:
    """Walks dataset bytes element by element without decoding any value (PS3.5 7.1, 7.5).

    Checks what a strict reader relies on: every explicit VR is a VR, every
    length fits inside its parent, tags increase within each dataset, items and
    sequences are delimited, and the bytes end exactly where the last element
    does. Values are skipped by offset, so a large Pixel Data costs nothing.
    """

    def __init__(self, buf: memoryview, implicit: bool, little: bool) -> None:
        self.buf = buf
        self.implicit = implicit
        self.e = "<" if little else ">"

    def _u16x2_u32(self, pos: int) -> tuple[int, int]:
        """(tag, 32-bit value at pos+4), item headers and implicit element headers."""
        group, element, value = struct.unpack_from(self.e + "HHL", self.buf, pos)
        return (group << 16) | element, value

    def dataset(self, pos: int, end: int, depth: int, in_item: bool) -> int:
        """Walk a dataset from ``pos`` to ``end``; in an undefined-length item, stop after its delimiter."""
        last = -1
        while pos < end:
            if end - pos < 8:
                raise _Truncated(f"the bytes end inside an element header at offset {pos}")
            tag, word = self._u16x2_u32(pos)
            if tag == _ITEM_END and in_item:
                return pos + 8
            if tag >> 16 == 0xFFFE:
                raise _Malformed(f"{_tag_name(tag)} at offset {pos}, where a data element belongs")
            if tag <= last:
                raise _Malformed(f"{_tag_name(tag)} at offset {pos} follows {_tag_name(last)}: tags must increase")
            last = tag
            vr: str | None
            if self.implicit:
                vr, length, pos = _dictionary_vr(tag), word, pos + 8
            else:
                raw = bytes(self.buf[pos + 4:pos + 6])
                vr = raw.decode("latin-1")
                if vr in _LONG_VRS:
                    if end - pos < 12:
                        raise _Truncated(f"the bytes end inside the header of {_tag_name(tag)}")
                    length, pos = struct.unpack_from(self.e + "L", self.buf, pos + 8)[0], pos + 12
                elif vr in _SHORT_VRS:
                    length, pos = struct.unpack_from(self.e + "H", self.buf, pos + 6)[0], pos + 8
                else:
                    raise _Malformed(f"{_tag_name(tag)} at offset {pos}: bytes {raw.hex()} are not a VR")
            if length == UNDEFINED_LENGTH:
                pos = self._undefined(tag, vr, pos, end, depth)
                continue
            if length > end - pos:
                raise _Truncated(f"the bytes end inside {_tag_name(tag)}: {length} bytes declared, {end - pos} present")
            if vr == "SQ":
                self.sequence(pos, pos + length, depth + 1, defined=True)
            pos += length
        if in_item:
            raise _Truncated("the bytes end inside an item (no Item Delimitation Item)")
        return pos

    def _undefined(self, tag: int, vr: str | None, pos: int, end: int, depth: int) -> int:
        """An element of undefined length: a sequence, UN holding one (PS3.5 6.2.2), or encapsulated Pixel Data."""
        if tag == _PIXEL_DATA and vr != "SQ":
            return self.fragments(pos, end)
        if vr == "SQ" or (self.implicit and vr in (None, "UN")):
            return self.sequence(pos, end, depth + 1, defined=False)
        if vr == "UN":  # an SQ of unknown VR, encoded Implicit VR Little Endian whatever the transfer syntax
            inner = _Walker(self.buf, implicit=True, little=True)
            return inner.sequence(pos, end, depth + 1, defined=False)
        raise _Malformed(f"{_tag_name(tag)} ({vr}) has undefined length")

    def sequence(self, pos: int, end: int, depth: int, *, defined: bool) -> int:
        """Items up to ``end`` (defined length) or up to the Sequence Delimitation Item."""
        if depth > _MAX_DEPTH:
            raise _Malformed(f"sequences nested deeper than {_MAX_DEPTH}")
        while pos < end:
            if end - pos < 8:
                raise _Truncated(f"the bytes end inside an item header at offset {pos}")
            tag, length = self._u16x2_u32(pos)
            if tag == _SEQUENCE_END and not defined:
                return pos + 8
            if tag != _ITEM:
                raise _Malformed(f"{_tag_name(tag)} at offset {pos} inside a sequence, where an item belongs")
            pos += 8
            if length == UNDEFINED_LENGTH:
                pos = self.dataset(pos, end, depth, in_item=True)
            else:
                if length > end - pos:
                    raise _Truncated(f"the bytes end inside a sequence item: {length} bytes declared, "
                                     f"{end - pos} present")
                self.dataset(pos, pos + length, depth, in_item=False)
                pos += length
        if not defined:
            raise _Truncated("the bytes end inside a sequence (no Sequence Delimitation Item)")
        return pos

    def fragments(self, pos: int, end: int) -> int:
        """Encapsulated Pixel Data (PS3.5 A.4): items of defined length, then the Sequence Delimitation Item."""
        while pos < end:
            if end - pos < 8:
                raise _Truncated("the bytes end inside encapsulated Pixel Data")
            tag, length = self._u16x2_u32(pos)
            pos += 8
            if tag == _SEQUENCE_END:
                return pos
            if tag != _ITEM or length == UNDEFINED_LENGTH:
                raise _Malformed(f"{_tag_name(tag)} inside encapsulated Pixel Data, where a fragment belongs")
            if length > end - pos:
                raise _Truncated(f"the bytes end inside a Pixel Data fragment: {length} bytes declared, "
                                 f"{end - pos} present")
            pos += length
        raise _Truncated("the bytes end inside encapsulated Pixel Data (no Sequence Delimitation Item)")


def check_encoding(body: bytes | bytearray | memoryview, *, implicit: bool, little: bool) -> None:
    """Raise :class:`EncodingError` unless ``body`` walks cleanly in the declared encoding.

    ``body``: the dataset bytes after the File Meta Information (inflated, for a
    Deflated transfer syntax). When the walk fails, the other encodings are
    tried, so a body labelled with the wrong transfer syntax (implicit VR sent
    as explicit, little endian as big) is named as such: ``encoding_mismatch``.
    pydicom would read such a body by guessing; a strict reader (C-GET,
    another PACS) cannot, so the node refuses it rather than store it.
    """
    view = memoryview(body).cast("B")
    try:
        _Walker(view, implicit, little).dataset(0, len(view), 0, in_item=False)
    except EncodingError as exc:
        for (other_implicit, other_little), name in ENCODINGS.items():
            if (other_implicit, other_little) == (implicit, little):
                continue
            try:
                _Walker(view, other_implicit, other_little).dataset(0, len(view), 0, in_item=False)
            except EncodingError:
                continue
            declared = ENCODINGS.get((implicit, little), "the declared encoding")
            detail = f"the dataset is encoded {name}, not {declared} as declared"
            raise EncodingError("encoding_mismatch", detail) from exc
        raise
