"""Reading chest radiographs: DICOM (CR, DX, Secondary Capture) and image files.

:func:`load_radiograph` returns a :class:`Radiograph` whose ``pixels`` are
float32 in [0, 1] as a radiologist would see them (MONOCHROME2: air dark):
Modality LUT (rescale) then VOI LUT / window (PS3.3 C.11), MONOCHROME1
inverted, percentile-stretched. Compressed transfer syntaxes are decoded by
pydicom's plugins (pylibjpeg-libjpeg: JPEG baseline/extended/lossless;
pylibjpeg-openjpeg: JPEG 2000; pyjpegls: JPEG-LS; pydicom: RLE).

Anything that is not a frontal chest radiograph raises a
:class:`RadiographError` subclass whose ``reason`` is a stable code, so the
DICOM node can map it to a status and a log line; nothing else escapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import cv2
import numpy as np

from ..dicom_header import truncated_element
from .preprocess import EQUALIZE_TABLE_LIMIT, equalize, equalized_table

#: SOP classes accepted as chest radiographs (PS3.4 B.5).
ACCEPTED_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image",
}
#: Body Part Examined (0018,0015) values that are a chest (PS3.16 CID 4031 terms
#: plus common vendor spellings). A missing value is accepted.
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "LUNGS", "TORSO", "CHEST_PA", "CHEST_AP", "PORT CHEST"})
#: View Position (0018,5101) values of lateral and decubitus views.
LATERAL_VIEWS = frozenset({"LL", "RL", "LLD", "RLD", "LAT", "LATERAL", "LLO", "RLO"})
MIN_SIDE = 64
MAX_SIDE = 8192
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class RadiographError(ValueError):
    """A file that cannot be scored; ``reason`` is a stable machine-readable code."""

    reason = "unreadable"

    def __init__(self, message: str) -> None:
        super().__init__(f"{self.reason}: {message}")
        self.detail = message


class NotDicomError(RadiographError):
    reason = "not_dicom"


class NoPixelDataError(RadiographError):
    reason = "no_pixel_data"


class UnsupportedSOPClassError(RadiographError):
    reason = "unsupported_sop_class"


class NotChestError(RadiographError):
    reason = "not_chest"


class LateralViewError(RadiographError):
    reason = "lateral_view"


class ImageSizeError(RadiographError):
    reason = "bad_image_size"


class PhotometricError(RadiographError):
    reason = "unsupported_photometric"


class BitDepthError(RadiographError):
    reason = "unsupported_bit_depth"


class MultiFrameError(RadiographError):
    reason = "multi_frame"


class PixelDecodeError(RadiographError):
    reason = "pixel_decode_failed"


class UnreadableImageError(RadiographError):
    reason = "unreadable"


@dataclass(frozen=True)
class StoredValues:
    """A grey image as its stored values and one presentation value per stored value.

    Every step from stored value to presentation (rescale, LUTs, windows, inversion,
    stretch) maps a stored value to one value, so the chain runs once per stored value
    (``table``) and an image is one lookup; ``counts`` (pixels per stored value) gives
    any histogram of a per-value table without reading the pixels again.
    """

    codes: np.ndarray  # (rows, columns) non-negative integers, indices into table
    table: np.ndarray  # float32 in [0, 1], one per code
    counts: np.ndarray  # int64, pixels per code

    def pixels(self) -> np.ndarray:
        return lookup(self.table, self.codes)


class Radiograph:
    """A decoded radiograph and the header facts the pipeline uses.

    ``pixels`` are float32 (rows, columns) in [0, 1], MONOCHROME2. Built from
    :class:`StoredValues` (grey DICOM of at most 16 bits), the pixel array is made
    when something first reads it: scoring reads only :meth:`equalized`, which is
    one lookup from the stored values too.
    """

    def __init__(
        self,
        pixels: np.ndarray | StoredValues,
        source: str,
        pixel_spacing_mm: tuple[float, float] | None = None,
        patient_orientation: list[str] | None = None,
        image_laterality: str | None = None,
        sop_instance_uid: str | None = None,
        study_instance_uid: str | None = None,
        dataset: Any = None,  # the pydicom Dataset, for DICOM inputs
    ) -> None:
        self.stored: StoredValues | None = pixels if isinstance(pixels, StoredValues) else None
        self._pixels: np.ndarray | None = None if isinstance(pixels, StoredValues) else pixels
        self.source = source
        self.pixel_spacing_mm = pixel_spacing_mm
        self.patient_orientation = patient_orientation
        self.image_laterality = image_laterality
        self.sop_instance_uid = sop_instance_uid
        self.study_instance_uid = study_instance_uid
        self.dataset = dataset

    @property
    def pixels(self) -> np.ndarray:
        if self._pixels is None:
            assert self.stored is not None
            self._pixels = self.stored.pixels()
        return self._pixels

    @property
    def shape(self) -> tuple[int, int]:
        if self._pixels is not None:
            return self._pixels.shape
        assert self.stored is not None
        return self.stored.codes.shape

    def equalized(self) -> np.ndarray:
        """:func:`~.preprocess.equalize` of :attr:`pixels`, without making them where the stored values are kept."""
        if self.stored is None or self._pixels is not None or self.stored.codes.size >= EQUALIZE_TABLE_LIMIT:
            return equalize(self.pixels)
        return lookup(equalized_table(self.stored.table, self.stored.counts), self.stored.codes)

    def as_lookup(self, equalized: bool) -> tuple[np.ndarray, np.ndarray] | None:
        """``(codes, table)`` with ``table[codes]`` equal to :meth:`equalized` (or :attr:`pixels`), value for
        value, where the stored values are kept; else None. A 16-bit image so travels in half the bytes of
        its float32 copy, and the lookup can run where the image goes (the scoring engine's device)."""
        if self.stored is None:
            return None
        if not equalized:
            return self.stored.codes, self.stored.table
        if self._pixels is not None or self.stored.codes.size >= EQUALIZE_TABLE_LIMIT:  # equalized()'s own choice
            return None
        return self.stored.codes, equalized_table(self.stored.table, self.stored.counts)

    def __repr__(self) -> str:
        return f"Radiograph(source={self.source!r}, shape={self.shape})"


def stretch(values: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> np.ndarray:
    """Map the ``low_pct``..``high_pct`` percentile range to [0, 1], clipping outside."""
    values = values.astype(np.float32)
    lo, hi = np.percentile(values, [low_pct, high_pct])
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros_like(values)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


def _check_size(rows: int, cols: int) -> None:
    if min(rows, cols) < MIN_SIDE:
        raise ImageSizeError(f"image is {rows}x{cols}; at least {MIN_SIDE} pixels per side are needed")
    if max(rows, cols) > MAX_SIDE:
        raise ImageSizeError(f"image is {rows}x{cols}; at most {MAX_SIDE} pixels per side are accepted")


def _text(ds: Any, keyword: str) -> str:
    value = ds.get(keyword)
    return str(value).strip().upper() if value is not None else ""


def check_header(ds: Any) -> None:
    """Reject datasets that are not a single-frame frontal chest radiograph."""
    sop_class = str(ds.get("SOPClassUID", ""))
    if not sop_class and "Rows" not in ds and "PixelData" not in ds:
        raise UnreadableImageError("incomplete dataset (truncated?): no SOP Class UID and no image attributes")
    if sop_class not in ACCEPTED_SOP_CLASSES:
        raise UnsupportedSOPClassError(f"SOP class {sop_class or '(none)'} is not a radiograph class")
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise NoPixelDataError("dataset has no Pixel Data (7FE0,0010)")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    _check_size(rows, cols)
    body_part = _text(ds, "BodyPartExamined")
    if body_part and body_part not in CHEST_BODY_PARTS:
        raise NotChestError(f"Body Part Examined is {body_part!r}")
    view = _text(ds, "ViewPosition")
    if view in LATERAL_VIEWS:
        raise LateralViewError(f"View Position is {view!r}; only frontal (PA/AP) views are scored")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise MultiFrameError(f"{frames} frames; one image per instance is expected")
    bits = int(ds.get("BitsStored", 0) or 0)
    if not 8 <= bits <= 16:
        raise BitDepthError(f"Bits Stored is {bits}; 8 to 16 are supported")
    photometric = _text(ds, "PhotometricInterpretation")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    grey = photometric in ("MONOCHROME1", "MONOCHROME2") and samples == 1
    colour = photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT") and samples == 3
    if not grey and not colour:
        raise PhotometricError(f"Photometric Interpretation {photometric or '(none)'} with {samples} samples")
    if colour and body_part not in CHEST_BODY_PARTS:
        # Colour is only plausible for a screen capture of a chest film.
        raise PhotometricError(f"{photometric} image that does not say it is a chest (Body Part Examined)")


def dicom_pixels(ds: Any) -> np.ndarray:
    """Presentation pixels of a checked dataset, float32 in [0, 1] (MONOCHROME2)."""
    image = dicom_image(ds)
    return image.pixels() if isinstance(image, StoredValues) else image


def _stored_bits_mask(ds: Any) -> int | None:
    """The mask of the stored bits where :func:`dicom_image` may read the words as stored, unused high bits and
    all: native (uncompressed) unsigned single-frame grey data whose Bits Stored is below Bits Allocated (8 or
    16); else None (signed values need their sign extended, compressed data is decoded anyway)."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        allocated, stored = int(ds.BitsAllocated), int(ds.BitsStored)
        native = syntax is not None and not syntax.is_compressed
        grey = int(ds.get("SamplesPerPixel", 1)) == 1 and int(ds.get("NumberOfFrames", 1) or 1) == 1
        unsigned = int(ds.get("PixelRepresentation", 0)) == 0
    except (AttributeError, TypeError, ValueError):  # missing or odd header values: pydicom's own path says why
        return None
    if native and grey and unsigned and allocated in (8, 16) and 0 < stored < allocated:
        return (1 << stored) - 1
    return None


def _raw_pixels(ds: Any, mask: int | None) -> np.ndarray:
    """``ds.pixel_array``; with ``mask``, a read-only view of the words as stored instead. pydicom would copy
    the array and shift every word twice to clear the unused high bits (PS3.5 8.1.1: they may hold anything);
    :func:`_stored_value_lut` masks them in its table instead (the decode step of a 2500 x 2048 CR, alone:
    27-33 -> 16-23 CPU-ms, ``bench/prepare.py``)."""
    if mask is None:
        return ds.pixel_array
    from pydicom.pixels import get_decoder

    options: dict[str, Any] = {"correct_unused_bits": False, "view_only": True}  # pydicom types **kwargs oddly
    raw, _ = get_decoder(ds.file_meta.TransferSyntaxUID).as_array(ds, **options)
    return raw


def dicom_image(ds: Any) -> np.ndarray | StoredValues:
    """:func:`dicom_pixels`, kept as :class:`StoredValues` for grey images of at most 16-bit integers."""
    mask = _stored_bits_mask(ds)
    try:
        raw = _raw_pixels(ds, mask)
    except Exception as exc:  # pydicom raises many types for codec problems
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        raise PixelDecodeError(f"cannot decode pixel data ({name}): {exc}") from exc
    photometric = _text(ds, "PhotometricInterpretation")
    if raw.ndim == 3:
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            raw = convert_color_space(raw, photometric, "RGB")
        raw = raw.astype(np.float32).mean(axis=2)
        return stretch(raw)
    if raw.dtype.kind in "ui" and raw.dtype.itemsize <= 2:
        return _stored_value_lut(raw, ds, photometric, mask)
    return stretch(_presentation(raw, ds, photometric))  # never masked: a mask means 8- or 16-bit words


def _presentation(values: np.ndarray, ds: Any, photometric: str, present: np.ndarray | None = None) -> np.ndarray:
    """Modality LUT, then VOI LUT or window (PS3.3 C.11), float32; MONOCHROME1 inverted (over the
    values marked ``present``: all of them by default)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(values, ds)
    has_voi = "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)
    if has_voi:
        try:
            values = apply_voi_lut(values, ds, index=0)
        except Exception:  # a malformed window is not worth rejecting the image for
            pass
    values = np.asarray(values).astype(np.float32)
    if photometric == "MONOCHROME1":
        values = values.max(initial=-np.inf, where=present if present is not None else True) - values
    return values


def _stored_value_lut(raw: np.ndarray, ds: Any, photometric: str, mask: int | None = None) -> StoredValues:
    """:func:`stretch` of :func:`_presentation`, computed once per stored value instead of once per pixel.

    Every step maps a stored value to one output value (rescale, LUTs, windows, inversion), so
    the chain runs on the at most 65 536 stored values, the percentiles come from a histogram of
    the stored values, and the image is one table lookup: one pass for the histogram and one
    for the lookup, no float64 and no per-pixel arithmetic (about 12 CPU-ms on a 5-megapixel
    film, against 25 for a bincount and an int32 copy, and 150 for the per-pixel float64 path).

    With ``mask`` (:func:`_stored_bits_mask`) ``raw`` holds the words as stored: the codes are those words,
    and code ``c`` gets the presentation of the stored value ``c & mask``. Codes with the same stored value
    get the same entry, so the pixels, the percentiles and any histogram of the table are those of the
    masked image (usually the unused bits are 0 and the codes are the stored values themselves).
    """
    lowest = int(raw.min()) if raw.dtype.kind == "i" else 0
    codes = raw if raw.dtype.kind == "u" else (raw.astype(np.int32) - lowest)
    counts = _histogram(codes)
    present = counts > 0
    stored = np.arange(lowest, lowest + counts.size)
    stored = (stored if mask is None else stored & mask).astype(raw.dtype)
    table = _presentation(stored, ds, photometric, present)
    lo, hi = _histogram_percentiles(table[present], counts[present], (0.5, 99.5))
    if hi <= lo:
        lo, hi = float(table[present].min()), float(table[present].max())
    if hi <= lo:
        return StoredValues(codes, np.zeros(table.shape, np.float32), counts)
    return StoredValues(codes, np.clip((table - lo) / (hi - lo), 0.0, 1.0).astype(np.float32), counts)


#: Rows per block of :func:`lookup`: its int64 index copy stays in the cache.
_LOOKUP_ROWS = 64


def lookup(table: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """``table[codes]`` for a 2-D integer image, a block of rows at a time (a quarter less CPU time than
    one ``np.take``, which first copies the whole image into int64 indices).

    Every code indexes the table (callers build it for codes 0..max), so ``mode="wrap"`` never wraps:
    it only skips the bounds check of the default mode, about a third of the lookup's CPU time.
    """
    out = np.empty(codes.shape, table.dtype)
    for top in range(0, codes.shape[0], _LOOKUP_ROWS):
        np.take(table, codes[top:top + _LOOKUP_ROWS], out=out[top:top + _LOOKUP_ROWS], mode="wrap")
    return out


#: cv2.calcHist counts in float32, exact up to 2**24 pixels per value; larger images use np.bincount.
_FLOAT_EXACT = 2**24


def _histogram(codes: np.ndarray) -> np.ndarray:
    """Pixels per value 0..max of non-negative integer ``codes`` (as ``np.bincount``), int64.

    OpenCV's histogram of uint8/uint16 images is a fifth of ``np.bincount``'s CPU time (no int64 index copy).
    """
    top = int(codes.max()) + 1
    if codes.dtype in (np.uint8, np.uint16) and codes.size < _FLOAT_EXACT and codes.ndim == 2:
        image = np.ascontiguousarray(codes)
        return cv2.calcHist([image], [0], None, [top], [0, top]).ravel().astype(np.int64)
    return np.bincount(codes.ravel(), minlength=top)


def _histogram_percentiles(values: np.ndarray, counts: np.ndarray, percents: tuple[float, ...]) -> list[float]:
    """``np.percentile`` (linear method) of the sample where ``values[i]`` occurs ``counts[i]`` times."""
    order = np.argsort(values, kind="stable")
    values, cumulative = values[order].astype(np.float64), np.cumsum(counts[order])
    n = int(cumulative[-1])
    found = []
    for q in percents:
        h = (n - 1) * q / 100.0
        below = int(np.floor(h))
        a, b = (values[np.searchsorted(cumulative, k, side="right")] for k in (below, min(below + 1, n - 1)))
        t = h - below
        found.append(float(b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t))  # numpy's _lerp
    return found


def _spacing(ds: Any) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is None:
            continue
        try:
            rows, cols = float(value[0]), float(value[1])
        except (TypeError, ValueError, IndexError):
            continue
        if rows > 0 and cols > 0:  # "0\0" means unknown (seen in real CRs)
            return rows, cols
    return None


def radiograph_from_dataset(ds: Any, source: str = "<dataset>") -> Radiograph:
    """Check and decode an in-memory pydicom Dataset."""
    check_header(ds)
    pixels = dicom_image(ds)
    orientation = ds.get("PatientOrientation")
    laterality = ds.get("ImageLaterality") or ds.get("Laterality")
    return Radiograph(
        pixels=pixels,
        source=source,
        pixel_spacing_mm=_spacing(ds),
        patient_orientation=[str(v) for v in orientation] if orientation else None,
        image_laterality=str(laterality) if laterality else None,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")) or None,
        study_instance_uid=str(ds.get("StudyInstanceUID", "")) or None,
        dataset=ds,
    )


def load_dicom(path_or_file: str | Path | BinaryIO, source: str | None = None) -> Radiograph:
    import pydicom
    from pydicom.errors import InvalidDicomError

    source = source or str(path_or_file)
    try:
        ds = pydicom.dcmread(path_or_file)
    except InvalidDicomError as exc:
        raise NotDicomError(f"{source} is not a DICOM file ({exc})") from exc
    except Exception as exc:  # truncated or corrupt headers raise assorted errors
        raise UnreadableImageError(f"{source}: cannot parse DICOM ({type(exc).__name__}: {exc})") from exc
    if (cut := truncated_element(ds)) is not None:
        raise UnreadableImageError(f"{source}: the file ends inside {cut}: truncated")
    return radiograph_from_dataset(ds, source)


def load_image_file(path: str | Path) -> Radiograph:
    """PNG / JPEG / TIFF for research use; colour is converted to grey."""
    path = Path(path)
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise UnreadableImageError(f"{path}: not a readable image file")
    if image.ndim == 3:
        image = cv2.cvtColor(image[:, :, :3], cv2.COLOR_BGR2GRAY) if image.shape[2] >= 3 else image[:, :, 0]
    _check_size(*image.shape[:2])
    if image.dtype == np.uint8:
        pixels = image.astype(np.float32) / 255.0
    else:
        pixels = stretch(image.astype(np.float32), 0.0, 100.0)
    return Radiograph(pixels=pixels, source=str(path))


def load_radiograph(path: str | Path) -> Radiograph:
    """Read a DICOM or image file by content, not by name."""
    path = Path(path)
    if not path.is_file():
        raise UnreadableImageError(f"{path}: no such file")
    with path.open("rb") as handle:
        head = handle.read(132)
    if len(head) == 132 and head[128:132] == b"DICM":
        return load_dicom(path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return load_image_file(path)
    # DICOM without a preamble (old ACR-NEMA style) or a misnamed file.
    return load_dicom(path)
