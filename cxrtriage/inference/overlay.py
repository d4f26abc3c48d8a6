"""An overlay PNG a person can look at: lungs, zones with their scores, opacity.

A footer names the models that produced it and, when they never saw a real
radiograph, carries the research-use notice in amber: the picture may be
shown on its own, so it has to say this itself.

It is stored as an 8-bit palette PNG (PNG, ISO/IEC 15948, colour type 3),
not 24-bit RGB: the picture is a grey radiograph, the same radiograph
tinted red, and a handful of drawing colours, so one palette of 256 holds
it: 128 grey levels, 96 tinted levels and the drawing colours exactly.
Greys are rounded to the nearest even level (invisible on screen: the
radiograph is a preview here, the diagnostic image is the DICOM) and
annotations keep their exact colours; the file is about a third of the
RGB PNG's size.

The node does not draw it while scoring (about 100 CPU-ms an image that most
readers never open): the study page's first request draws it from the
archived source image, its SEG (the masks) and its result record (the
scores), :func:`overlay_from_seg`, and the archive keeps the PNG for the
next request.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from .identity import RESEARCH_USE_NOTICE, ModelIdentity, StageModel
from .result_model import ImageResult, StageModelRecord
from .scoring import BRIXIA_LETTERS, ZONE_NAMES, ZoneMasks, ZoneScores

LUNG_COLOUR = (255, 255, 0)  # cyan (BGR)
ZONE_COLOUR = (0, 215, 255)  # amber
OPACITY_COLOUR = (0, 0, 255)  # red
NOTICE_COLOUR = (0, 191, 255)  # amber banner behind the research-use notice


class Drawable(Protocol):
    """What the overlay draws: a pipeline :class:`~.pipeline.Result`, or an :class:`OverlayContent` read back."""

    @property
    def disease(self) -> np.ndarray: ...
    @property
    def zones(self) -> ZoneMasks: ...
    @property
    def scores(self) -> ZoneScores: ...
    @property
    def p_disease(self) -> float: ...
    @property
    def identity(self) -> ModelIdentity: ...


@dataclass(frozen=True)
class OverlayContent:
    """The masks and scores of a scored image as the archive holds them (its SEG and its result record)."""

    disease: np.ndarray
    zones: ZoneMasks
    scores: ZoneScores
    p_disease: float
    identity: ModelIdentity


#: Segment numbers of the node's SEG (dicom_results.py): right lung, left lung, opacity, then zones A-F.
_RIGHT, _LEFT, _OPACITY, _FIRST_ZONE = 1, 2, 3, 4


def seg_masks(seg: Any) -> dict[int, np.ndarray]:
    """Each segment's full-resolution mask of a single-image BINARY SEG, by segment number.

    Frames of empty segments may be left out of a SEG (highdicom's
    ``omit_empty_frames``): those segments are all False.
    """
    rows, cols = int(seg.Rows), int(seg.Columns)
    frames = np.asarray(seg.pixel_array).reshape(-1, rows, cols).astype(bool)
    numbers = [int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
               for item in seg.PerFrameFunctionalGroupsSequence]
    masks = {int(d.SegmentNumber): np.zeros((rows, cols), bool) for d in seg.SegmentSequence}
    for number, frame in zip(numbers, frames):
        masks[number] = masks.get(number, np.zeros((rows, cols), bool)) | frame
    return masks


def _stage(record: StageModelRecord | None, stage: str, version: str) -> StageModel:
    if record is None:  # a record from before identities were kept: only the synthetic bundle existed
        return StageModel(stage, "unknown model", version, "bundled", ())
    return StageModel(record.stage or stage, record.name, record.version, record.origin,
                      tuple(record.training_data))


def scores_from_record(record: ImageResult) -> ZoneScores:
    """The :class:`ZoneScores` a result record was made from (fractions as stored: rounded to 4 places)."""
    zones = [record.zones.get(name) for name in ZONE_NAMES]
    return ZoneScores(
        fractions=[float(z.affected_fraction or 0.0) if z else 0.0 for z in zones],
        binary=[int(z.binary_score or 0) if z else 0 for z in zones],
        brixia=[int(z.brixia_grade or 0) if z else 0 for z in zones],
        total=record.total_score, brixia_total=record.brixia_total,
        extent_right=record.geographic_extent.right, extent_left=record.geographic_extent.left,
        zone_threshold=record.zone_threshold, lungs_found=record.lungs_found,
        lung_area_px=record.lung_area_px, lesion_area_px=record.lesion_area_px,
        lung_area_mm2=record.lung_area_mm2, lesion_area_mm2=record.lesion_area_mm2,
        zone_area_px=[z.area_px if z else 0 for z in zones],
    )


def overlay_from_seg(seg: Any, record: ImageResult) -> OverlayContent:
    """What the overlay draws, from the node's SEG of the image (masks) and its result record (scores)."""
    masks = seg_masks(seg)
    empty = np.zeros((int(seg.Rows), int(seg.Columns)), bool)
    identity = record.model_identity
    lungs = _stage(identity.lungs if identity else None, "lungs", record.models.get("lungs", ""))
    disease = _stage(identity.disease if identity else None, "disease", record.models.get("disease", ""))
    zones = ZoneMasks.of_planes([masks.get(_FIRST_ZONE + k, empty) for k in range(len(ZONE_NAMES))],
                                masks.get(_RIGHT, empty), masks.get(_LEFT, empty), record.lungs_found)
    return OverlayContent(disease=masks.get(_OPACITY, empty), zones=zones, scores=scores_from_record(record),
                          p_disease=record.p_disease, identity=ModelIdentity(lungs, disease))


def _contours(mask: np.ndarray) -> list[np.ndarray]:
    found, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return list(found)


def render_overlay(pixels: np.ndarray, result: Drawable, max_side: int = 1024) -> np.ndarray:
    """BGR uint8 image: opacity tinted red, lung outlines, zone outlines and labels."""
    scale = min(1.0, max_side / max(pixels.shape))
    size = (max(1, round(pixels.shape[1] * scale)), max(1, round(pixels.shape[0] * scale)))

    def small(mask: np.ndarray) -> np.ndarray:
        return cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)

    grey = cv2.resize(np.clip(pixels * 255, 0, 255).astype(np.uint8), size, interpolation=cv2.INTER_AREA)
    canvas = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    disease = small(result.disease)
    tint = canvas.copy()
    tint[disease] = OPACITY_COLOUR
    canvas = cv2.addWeighted(tint, 0.45, canvas, 0.55, 0)
    thickness = max(1, round(2 * size[0] / 1024))
    font_scale = 0.45 * size[0] / 1024 + 0.15
    for k, zone in enumerate(result.zones.zones):
        zone_small = small(zone)
        cv2.drawContours(canvas, _contours(zone_small), -1, ZONE_COLOUR, 1)
        ys, xs = np.nonzero(zone_small)
        if xs.size == 0 or not result.scores.scored[k]:
            continue
        scores = result.scores
        label = f"{BRIXIA_LETTERS[k]} {100 * scores.fractions[k]:.0f}% s{scores.binary[k]} g{scores.brixia[k]}"
        org = (int(xs.mean()) - int(40 * font_scale), int(ys.mean()))
        cv2.putText(canvas, label, org, cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
        cv2.putText(canvas, label, org, cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255), thickness, cv2.LINE_AA)
    for lung in (result.zones.right, result.zones.left):
        cv2.drawContours(canvas, _contours(small(lung)), -1, LUNG_COLOUR, thickness)
    s = result.scores
    header = [f"score {s.total}/{sum(s.scored)}  Brixia-style {s.brixia_total}/18  P(disease) {result.p_disease:.2f}"
              "  (R = patient right)"]
    if s.missing_lungs:
        header.append(f"{' and '.join(s.missing_lungs)} lung not found: its zones are unscored")
    line_height = int(28 * font_scale * 2)
    _banner(canvas, 0, header, (0, 0, 0), (255, 255, 255), font_scale, thickness, line_height)
    identity = result.identity
    footer = [f"{m.stage}: {m.name}" for m in (identity.lungs, identity.disease)]
    if identity.research_use:
        footer.insert(0, RESEARCH_USE_NOTICE.upper())
    colour = NOTICE_COLOUR if identity.research_use else (0, 0, 0)
    text = (0, 0, 0) if identity.research_use else (255, 255, 255)
    _banner(canvas, size[1] - line_height * len(footer), footer, colour, text, font_scale, thickness, line_height)
    return canvas


def _banner(canvas: np.ndarray, top: int, lines: list[str], background: tuple[int, int, int],
            colour: tuple[int, int, int], font_scale: float, thickness: int, line_height: int) -> None:
    """Lines of text on a filled band across the whole image, starting at row ``top``."""
    width = canvas.shape[1]
    cv2.rectangle(canvas, (0, top), (width, top + line_height * len(lines)), background, -1)
    for i, line in enumerate(lines):
        baseline = top + i * line_height + int(0.72 * line_height)
        cv2.putText(canvas, line, (8, baseline), cv2.FONT_HERSHEY_SIMPLEX, font_scale, colour, thickness, cv2.LINE_AA)


TINT_WEIGHT = 0.45  # of OPACITY_COLOUR over the radiograph, where disease is found


def _palette(greys: int = 128, tinted: int = 96) -> np.ndarray:
    """The overlay's palette, BGR rows: grey ramp, red-tinted ramp, drawing colours, amber-to-black ramp.

    The ramps are ordered by brightness, so neighbouring pixels have
    neighbouring indices and PNG's row filters compress them well.
    """
    g = np.linspace(0, 255, greys)
    grey = np.stack([g, g, g], axis=1)
    t = np.linspace(0, 255, tinted)[:, None]
    tint = TINT_WEIGHT * np.array(OPACITY_COLOUR, float) + (1 - TINT_WEIGHT) * np.hstack([t, t, t])
    drawing = np.array([LUNG_COLOUR, ZONE_COLOUR, OPACITY_COLOUR], float)
    amber = np.linspace(1, 0, 8)[:, None] * np.array(NOTICE_COLOUR, float)  # black text on the amber notice
    palette = np.rint(np.vstack([grey, tint, drawing, amber])).astype(np.uint8)
    if len(palette) > 256:
        raise ValueError(f"a PNG palette holds 256 colours, not {len(palette)}")
    return palette


PALETTE = _palette()


def _nearest(bgr: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Index of the nearest palette entry (squared distance; the first on a tie) of each BGR row."""
    nearest = np.empty(len(bgr), np.uint8)
    pal = palette.astype(np.int32)
    for start in range(0, len(bgr), 4096):  # bounded memory: 4096 colours x 256 entries at a time
        block = bgr[start:start + 4096].astype(np.int32)
        nearest[start:start + 4096] = ((block[:, None, :] - pal[None, :, :]) ** 2).sum(axis=2).argmin(axis=1)
    return nearest


def palette_indices(canvas: np.ndarray, palette: np.ndarray = PALETTE) -> np.ndarray:
    """Each BGR pixel's nearest palette entry.

    Most pixels are grey (the radiograph): their entries come from a table of
    the 256 greys. The rest (tint, outlines, text) are looked up once per
    distinct colour, not per pixel.
    """
    b, g, r = canvas[..., 0], canvas[..., 1], canvas[..., 2]
    grey = (b == g) & (g == r)
    levels = np.arange(256, dtype=np.uint8)
    indices = _nearest(np.stack([levels, levels, levels], axis=1), palette)[b]
    if not grey.all():
        coloured = canvas[~grey]
        packed = (coloured[:, 0].astype(np.uint32) << 16) | (coloured[:, 1].astype(np.uint32) << 8) | coloured[:, 2]
        colours, inverse = np.unique(packed, return_inverse=True)
        bgr = np.stack([(colours >> 16) & 255, (colours >> 8) & 255, colours & 255], axis=1)
        indices[~grey] = _nearest(bgr, palette)[inverse]
    return indices


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_palette_png(indices: np.ndarray, palette: np.ndarray = PALETTE) -> bytes:
    """An 8-bit palette PNG (ISO/IEC 15948: IHDR colour type 3, PLTE, IDAT, IEND) of ``indices``.

    Every row uses the Up filter (type 2): the ramps make a row's indices
    close to the row above's, so the differences deflate well (Up beats
    None by a quarter). Deflate level 4: on RG1's overlay 5 % larger than
    level 6 for a sixth of the CPU time (15 ms against 87 ms; level 1 is 14 %
    larger again, level 9 would save 3 % for 5x the time of level 6).
    """
    height, width = indices.shape
    rows = indices.astype(np.uint8)
    up = np.empty_like(rows)
    up[0] = rows[0]
    up[1:] = rows[1:] - rows[:-1]  # modulo 256, as PNG defines it
    raw = np.hstack([np.full((height, 1), 2, np.uint8), up]).tobytes()
    header = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)
    rgb = palette[:, ::-1].astype(np.uint8).tobytes()  # PLTE is RGB
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"PLTE", rgb)
            + _chunk(b"IDAT", zlib.compress(raw, 4)) + _chunk(b"IEND", b""))


def overlay_png(pixels: np.ndarray, result: Drawable) -> bytes:
    """The overlay as palette PNG bytes."""
    return encode_palette_png(palette_indices(render_overlay(pixels, result)))


def write_overlay(path: str | Path, pixels: np.ndarray, result: Drawable) -> Path:
    """Render the overlay and write it as a palette PNG, atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = overlay_png(pixels, result)
    # A name of this writer's own: two workers scoring one image (an expired lease), on this host or on
    # another sharing the archive, never share a temp file.
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        partial.write_bytes(data)
        partial.replace(path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise OSError(f"cannot write overlay {path}: {exc.strerror}") from exc
    return path
