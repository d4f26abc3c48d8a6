"""Score files and folders without a network: the engine of ``cxrtriage score``."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import InferenceSettings
from .overlay import write_overlay
from .pipeline import Pipeline
from .presets import brixia_cutoffs, model_specs, zone_threshold
from .radiograph import RadiographError, load_radiograph
from .result_templates import save_result_objects


@dataclass
class FileOutcome:
    """What happened to one input file: a result dict, or the reason it was refused."""

    path: Path
    result: dict[str, Any] | None = None
    reason: str | None = None
    message: str | None = None
    overlay: Path | None = None
    dicom: list[Path] | None = None

    @property
    def ok(self) -> bool:
        return self.result is not None

    def as_dict(self) -> dict[str, Any]:
        if self.ok:
            extra = {"dicom": [str(p) for p in self.dicom]} if self.dicom is not None else {}
            picture = {"overlay": str(self.overlay)} if self.overlay is not None else {}
            return {"file": str(self.path), "status": "scored", **picture, **extra, **(self.result or {})}
        return {"file": str(self.path), "status": "rejected", "reason": self.reason, "message": self.message}


def expand_inputs(inputs: Iterable[Path]) -> list[Path]:
    """Files as given, and every file below a given folder (sorted, hidden ones skipped)."""
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files.extend(
                p for p in sorted(item.rglob("*")) if p.is_file() and not any(part.startswith(".") for part in p.parts)
            )
        else:
            files.append(item)
    return files


def score_batch(
    pipeline: Pipeline, items: list[tuple[int, Path]], out_dir: Path, *,
    dicom: bool = False, jpeg2000: bool = False, overlay: bool = True,
) -> list[FileOutcome]:
    """Score numbered files with one model call per stage; outcomes in input order.

    A bad file gives a refusal with its reason, never an exception. With
    ``dicom``, DICOM inputs also get the SEG and SR the node would send
    (image files have no DICOM header to derive them from; ``dicom`` is then []).
    """
    outcomes: dict[int, FileOutcome] = {}
    loaded = []
    for index, path in items:
        try:
            loaded.append((index, path, load_radiograph(path)))
        except RadiographError as exc:
            outcomes[index] = FileOutcome(path, reason=exc.reason, message=exc.detail)
    t0 = time.perf_counter()
    try:
        results = pipeline.run_batch([radiograph for _, _, radiograph in loaded])
    except Exception as exc:  # a model or scoring failure must not end the run
        if len(loaded) > 1:  # find the culprit: its neighbours still get scored
            singles = [score_batch(pipeline, [(i, p)], out_dir, dicom=dicom, jpeg2000=jpeg2000, overlay=overlay)[0]
                       for i, p, _ in loaded]
            outcomes.update({i: outcome for (i, _, _), outcome in zip(loaded, singles)})
            return [outcomes[i] for i, _ in items]
        results = []
        for index, path, _ in loaded:
            outcomes[index] = FileOutcome(path, reason="pipeline_error", message=f"{type(exc).__name__}: {exc}")
    elapsed_ms = (time.perf_counter() - t0) * 1000 / max(len(loaded), 1)
    for (index, path, radiograph), result in zip(loaded, results):
        record = result.as_dict()
        record["timings_ms"]["total"] = round(elapsed_ms, 1)
        picture = None
        if overlay:
            picture = write_overlay(out_dir / f"{index:04d}-{path.stem}.overlay.png", radiograph.pixels, result)
        written = None
        if dicom:
            written = []
            if radiograph.dataset is not None:
                written = list(save_result_objects(radiograph.dataset, result, out_dir / "dicom", jpeg2000=jpeg2000))
        outcomes[index] = FileOutcome(path, result=record, overlay=picture, dicom=written)
    return [outcomes[i] for i, _ in items]


def score_files(
    pipeline: Pipeline, files: list[Path], out_dir: Path, *, dicom: bool = False, jpeg2000: bool = False
) -> Iterator[FileOutcome]:
    """Score each file, in order, in this process (``batch_size`` files per model call)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    size = pipeline.settings.batch_size
    numbered = list(enumerate(files))
    for start in range(0, len(numbered), size):
        yield from score_batch(pipeline, numbered[start : start + size], out_dir, dicom=dicom, jpeg2000=jpeg2000)


def write_report(outcomes: list[FileOutcome], out_dir: Path, settings: InferenceSettings) -> Path:
    lungs, disease = model_specs(settings)
    report = {
        "models": {"lungs": lungs.version, "disease": disease.version},
        "zone_threshold": zone_threshold(settings, disease),
        "brixia_cutoffs": list(brixia_cutoffs(settings)),
        "scored": sum(o.ok for o in outcomes),
        "rejected": sum(not o.ok for o in outcomes),
        "results": [o.as_dict() for o in outcomes],
    }
    path = out_dir / "results.json"
    path.write_text(json.dumps(report, indent=2))
    return path
