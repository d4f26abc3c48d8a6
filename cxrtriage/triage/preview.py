"""The pictures of the study page: the overlay and the plain radiograph, drawn on first request and cached.

The overlay (lungs, zones, opacity and scores over the image) is not drawn
while scoring: :func:`overlay_image` draws it when the page first asks, from
the archived source image, its SEG (the masks) and its result record (the
scores), and keeps it in the archive's overlays folder, so that the next
request is a file read. A re-score removes the kept picture
(:mod:`cxrtriage.stages.score`), so it never shows an older result.

The reader toggles between the overlay (lungs, zones, opacity drawn over the
image) and this plain picture, to see what the drawing covers. It is a
preview on screen, not the diagnostic image (that is the DICOM in the
archive); it is rendered once with the project's own reader
(:mod:`cxrtriage.inference.radiograph`, which applies the DICOM presentation:
PS3.3 C.11, MONOCHROME1 inverted) and cached next to the overlay.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import cv2
import numpy as np
from sqlalchemy import select

from ..inference.radiograph import load_dicom
from ..inference.result_model import ImageResult
from ..storage.archive import Archive
from ..storage.db import Database
from ..storage.models import Instance, ResultStatus, ScoreResult

#: The overlay's own longest side (inference/overlay.py ``render_overlay``), so the two line up on screen.
MAX_SIDE = 1024


def plain_path(archive: Archive, sop_instance_uid: str) -> Path:
    """Where the cached plain PNG lives: beside the overlay (``<uid>.plain.png`` in the overlays folder)."""
    return archive.overlays / f"{sop_instance_uid}.plain.png"


def render_plain(pixels: np.ndarray, max_side: int = MAX_SIDE) -> bytes:
    """An 8-bit greyscale PNG of ``pixels`` (float in [0, 1]), longest side at most ``max_side``."""
    scale = min(1.0, max_side / max(pixels.shape))
    size = (max(1, round(pixels.shape[1] * scale)), max(1, round(pixels.shape[0] * scale)))
    grey = cv2.resize(np.clip(pixels * 255, 0, 255).astype(np.uint8), size, interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".png", grey)
    if not ok:
        raise ValueError("PNG encoding failed")
    return data.tobytes()


def plain_image(db: Database, archive: Archive, sop_instance_uid: str) -> Path | None:
    """The plain PNG of a received image (rendered and cached on first use); None when no such source image."""
    cached = plain_path(archive, sop_instance_uid)
    if cached.is_file():
        return cached
    with db.session() as session:
        relative = session.scalar(select(Instance.path).where(
            Instance.sop_instance_uid == sop_instance_uid, Instance.kind == "source").limit(1))
    if relative is None or not archive.path(relative).is_file():
        return None
    return _keep(cached, render_plain(load_dicom(archive.path(relative), source=sop_instance_uid).pixels))


def _keep(cached: Path, data: bytes) -> Path:
    """Write ``data`` to ``cached`` whole (a reader never sees half a file) and return the path."""
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(f".{cached.name}.{uuid.uuid4().hex}.partial")  # concurrent requests never share it
    try:
        partial.write_bytes(data)
        partial.replace(cached)
    finally:
        partial.unlink(missing_ok=True)
    return cached


class NoOverlay(LookupError):
    """Why an image has no overlay: ``status`` 404 (no such image) or 409 (an image, but no scored result)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def overlay_image(db: Database, archive: Archive, sop_instance_uid: str) -> Path:
    """The overlay PNG of a scored image: drawn from its source, SEG and record on first use, then kept.

    Raises :class:`NoOverlay` with the reason when there is none to draw.
    """
    cached = archive.overlay_path(sop_instance_uid)
    if cached.is_file():
        return cached
    with db.session() as session:
        source = session.scalars(select(Instance).where(
            Instance.sop_instance_uid == sop_instance_uid, Instance.kind == "source").limit(1)).first()
        if source is None:
            raise NoOverlay(404, "no such image")
        result = session.scalars(select(ScoreResult).where(ScoreResult.instance_id == source.id)).first()
        if result is None:
            raise NoOverlay(409, "the image is not scored yet")
        if result.status != ResultStatus.SCORED:
            raise NoOverlay(409, f"the image has no scores ({result.status}: {result.reason})")
        seg = session.get(Instance, result.seg_instance_id) if result.seg_instance_id is not None else None
        source_path, seg_path = archive.path(source.path), archive.path(seg.path) if seg is not None else None
        details = result.details
    if not source_path.is_file():
        raise NoOverlay(409, "the source image is no longer in the archive")
    if seg_path is None or not seg_path.is_file():
        raise NoOverlay(409, "the result's segmentation is no longer in the archive")
    import pydicom

    from ..inference.overlay import overlay_from_seg, overlay_png

    content = overlay_from_seg(pydicom.dcmread(seg_path), ImageResult.model_validate_json(details or "{}"))
    pixels = load_dicom(source_path, source=sop_instance_uid).pixels
    return _keep(cached, overlay_png(pixels, content))
