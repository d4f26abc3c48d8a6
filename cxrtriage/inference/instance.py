"""One archived DICOM instance scored into what the node stores: SEG and SR bytes, scores.

:func:`score_instance` is the CPU-heavy part of the node's scoring job
(decode, both stages, scoring, SEG + SR encoding, overlay PNG), with plain,
picklable results, so that it can run in the node's own thread or in a
:class:`~cxrtriage.inference.parallel.ScoringPool` worker process. Storing
the bytes durably and recording them in the database stay with the caller.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom

from .dicom_results import build_result_objects
from .overlay import write_overlay
from .pipeline import Pipeline
from .radiograph import RadiographError, radiograph_from_dataset


@dataclass
class InstanceScored:
    """A scored instance: the result record and the encoded SEG and SR."""

    details: dict[str, Any]
    total: int
    brixia_total: int
    p_disease: float
    algorithm_version: str
    seg: bytes
    sr: bytes
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class InstanceRefused:
    """An instance the pipeline cannot score, with the reader's reason code."""

    reason: str
    detail: str


def dataset_bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def score_instance(
    pipeline: Pipeline, path: Path, sop_instance_uid: str, overlay: Path | None = None, *, jpeg2000: bool = False
) -> InstanceScored | InstanceRefused:
    t0 = time.perf_counter()
    ds = pydicom.dcmread(path)
    try:
        radiograph = radiograph_from_dataset(ds, sop_instance_uid)
    except RadiographError as exc:
        return InstanceRefused(exc.reason, exc.detail)
    result = pipeline(radiograph)
    t1 = time.perf_counter()
    objects = build_result_objects(ds, result, jpeg2000=jpeg2000)
    seg, sr = dataset_bytes(objects.seg), dataset_bytes(objects.sr)
    if overlay is not None:
        write_overlay(overlay, radiograph.pixels, result)
    scores = result.scores
    return InstanceScored(
        details=result.as_dict(), total=scores.total, brixia_total=scores.brixia_total, p_disease=result.p_disease,
        algorithm_version=result.algorithm_version, seg=seg, sr=sr,
        seconds={"inference": t1 - t0, "dicom_results": time.perf_counter() - t1},
    )
