"""The plain radiograph beside its overlay: the archived source image as a downsampled PNG.

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
from ..storage.archive import Archive
from ..storage.db import Database
from ..storage.models import Instance

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
    data = render_plain(load_dicom(archive.path(relative), source=sop_instance_uid).pixels)
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(f".{cached.name}.{uuid.uuid4().hex}.partial")  # concurrent requests never share it
    try:
        partial.write_bytes(data)
        partial.replace(cached)
    finally:
        partial.unlink(missing_ok=True)
    return cached
