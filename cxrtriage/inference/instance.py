"""One archived DICOM instance scored into what the node stores: SEG, SR (and SC) bytes, scores.

:func:`score_instance` is the CPU-heavy part of the node's scoring job
(decode, both stages, scoring, SEG + SR encoding, with ``secondary_capture``
a Secondary Capture image too, overlay PNG), with plain,
picklable results, so that it can run in the node's own thread or in a
:class:`~cxrtriage.inference.parallel.ScoringPool` worker process. Storing
the bytes durably and recording them in the database stay with the caller
(:mod:`cxrtriage.stages.score`), which learns every UID it needs from the
:class:`~cxrtriage.dicom_header.EncodedObject` and never parses the bytes.

The models, highdicom and OpenCV are imported when scoring first runs, so
that the result types can be imported cheaply.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..dicom_header import EncodedObject

if TYPE_CHECKING:
    import numpy as np

    from .pipeline import Pipeline, Result


@dataclass
class InstanceScored:
    """A scored instance: the result record and the encoded SEG, SR and (when asked for) Secondary Capture."""

    details: dict[str, Any]
    total: int
    brixia_total: int
    p_disease: float
    algorithm_version: str
    seg: EncodedObject
    sr: EncodedObject
    sc: EncodedObject | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def objects(self) -> tuple[EncodedObject, ...]:
        """The SEG, the SR and the Secondary Capture if any, in the order they are stored and sent."""
        return (self.seg, self.sr) if self.sc is None else (self.seg, self.sr, self.sc)


@dataclass
class InstanceRefused:
    """An instance the pipeline cannot score, with the reader's reason code."""

    reason: str
    detail: str


def score_instance(
    pipeline: Pipeline, path: Path, sop_instance_uid: str, overlay: Path | None = None, *, jpeg2000: bool = False,
    secondary_capture: bool = False,
) -> InstanceScored | InstanceRefused:
    """Score the DICOM file at ``path``: the encoded SEG + SR (+ SC) and the scores, or why it cannot be scored."""
    import pydicom

    from .radiograph import RadiographError, radiograph_from_dataset

    t0 = time.perf_counter()
    ds = pydicom.dcmread(path)
    try:
        radiograph = radiograph_from_dataset(ds, sop_instance_uid)
    except RadiographError as exc:
        return InstanceRefused(exc.reason, exc.detail)
    result = pipeline(radiograph)
    t1 = time.perf_counter()
    outcome = encode_result(ds, lambda: radiograph.pixels, result, overlay, jpeg2000=jpeg2000,
                            secondary_capture=secondary_capture)
    outcome.seconds = {"inference": t1 - t0, "dicom_results": time.perf_counter() - t1}
    return outcome


def encode_result(
    ds: Any, pixels: np.ndarray | Callable[[], np.ndarray], result: Result, overlay: Path | None = None, *,
    jpeg2000: bool = False, secondary_capture: bool = False, reference: bool = False,
) -> InstanceScored:
    """A pipeline result as the node stores it: the SEG and SR (and SC) encoded, the overlay written, the scores.

    The SEG and SR come from compiled templates (:mod:`.result_templates`);
    ``reference`` builds them with highdicom instead, byte for byte the same.
    """
    from .overlay import write_overlay
    from .result_templates import encode_result_objects
    from .secondary_capture import encode_secondary_capture

    seg, sr = encode_result_objects(ds, result, jpeg2000=jpeg2000, reference=reference)
    if secondary_capture or overlay is not None:  # the only readers of the pixels: a callable makes them now
        image = pixels() if callable(pixels) else pixels
        sc = encode_secondary_capture(ds, image, result) if secondary_capture else None
        if overlay is not None:
            write_overlay(overlay, image, result)
    else:
        sc = None
    scores = result.scores
    return InstanceScored(
        details=result.as_dict(), total=scores.total, brixia_total=scores.brixia_total, p_disease=result.p_disease,
        algorithm_version=result.algorithm_version, seg=seg, sr=sr, sc=sc,
    )
