"""A corpus of files the node must refuse, each with the reason it must give.

Built from one good synthetic CR by breaking one thing at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage, generate_uid

Breaker = Callable[[Dataset], Dataset | None]


def _resized(ds: Dataset, rows: int, cols: int) -> Dataset:
    ds.Rows, ds.Columns = rows, cols
    ds.PixelData = np.zeros((rows, cols), dtype=np.uint16).tobytes()
    return ds


def _rgb(ds: Dataset) -> Dataset:
    """An RGB image that does not say it is a chest."""
    ds.PhotometricInterpretation = "RGB"
    ds.SamplesPerPixel = 3
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    del ds.BodyPartExamined
    ds.PixelData = np.zeros((ds.Rows, ds.Columns, 3), dtype=np.uint8).tobytes()
    return ds


def _delete(keyword: str) -> Breaker:
    def breaker(ds: Dataset) -> Dataset:
        delattr(ds, keyword)
        return ds

    return breaker


def _set(**values: object) -> Breaker:
    def breaker(ds: Dataset) -> Dataset:
        for key, value in values.items():
            setattr(ds, key, value)
        return ds

    return breaker


#: name -> (how to break the dataset, the reason code the reader must give)
DATASET_BREAKERS: dict[str, tuple[Breaker, str]] = {
    "no_pixel_data": (_delete("PixelData"), "no_pixel_data"),
    "mr_sop_class": (_set(SOPClassUID=MRImageStorage), "unsupported_sop_class"),
    "no_sop_class": (_delete("SOPClassUID"), "unsupported_sop_class"),
    "non_chest": (_set(BodyPartExamined="KNEE"), "not_chest"),
    "lateral_ll": (_set(ViewPosition="LL"), "lateral_view"),
    "lateral_rl": (_set(ViewPosition="RL"), "lateral_view"),
    "one_by_one": (lambda ds: _resized(ds, 1, 1), "bad_image_size"),
    "huge_rows_columns": (_set(Rows=60000, Columns=60000), "bad_image_size"),
    "rgb_not_chest": (_rgb, "unsupported_photometric"),
    "palette_colour": (_set(PhotometricInterpretation="PALETTE COLOR"), "unsupported_photometric"),
    "bits_stored_4": (_set(BitsStored=4, HighBit=3), "unsupported_bit_depth"),
    "multi_frame": (_set(NumberOfFrames=3), "multi_frame"),
    "short_pixel_data": (lambda ds: _set(PixelData=ds.PixelData[:100])(ds), "pixel_decode_failed"),
}


def write_bad_corpus(good: Path, folder: Path) -> dict[Path, str]:
    """Write every broken variant of ``good`` into ``folder``; returns path -> expected reason."""
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[Path, str] = {}
    for name, (breaker, reason) in DATASET_BREAKERS.items():
        ds = pydicom.dcmread(good)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        broken = breaker(ds)
        path = folder / f"{name}.dcm"
        broken.save_as(path, enforce_file_format=False)
        expected[path] = reason
    raw = good.read_bytes()
    meta_end = 132 + 12 + int(pydicom.filereader.read_file_meta_info(good).FileMetaInformationGroupLength)
    (folder / "truncated_header.dcm").write_bytes(raw[: meta_end + 50])  # cut inside the dataset's header
    expected[folder / "truncated_header.dcm"] = "unreadable"
    (folder / "truncated_pixels.dcm").write_bytes(raw[: len(raw) - len(raw) // 3])
    expected[folder / "truncated_pixels.dcm"] = "unreadable"
    (folder / "not_dicom.dcm").write_bytes(b"this is a text file, not DICOM\n" * 10)
    expected[folder / "not_dicom.dcm"] = "not_dicom"
    (folder / "empty.dcm").write_bytes(b"")
    expected[folder / "empty.dcm"] = "not_dicom"
    (folder / "tiny.png").write_bytes(_png(np.zeros((10, 10), dtype=np.uint8)))
    expected[folder / "tiny.png"] = "bad_image_size"
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    expected[folder / "broken.png"] = "unreadable"
    return expected


def _png(array: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", array)
    assert ok
    return buf.tobytes()
