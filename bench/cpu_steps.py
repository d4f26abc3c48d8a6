"""CPU milliseconds per image for each step around the networks, on 2500 x 2048 CRs.

    python bench/cpu_steps.py [--images 6] [--rounds 3] [--json bench/results/cpu-steps.json]

Each step is timed with the calling thread's CPU clock (``time.thread_time``)
at one torch thread, on phantom CRs of a chest film's size scored by the
bundled models (their lung and opacity masks are non-empty: the script says
how many pixels). The steps follow ``Pipeline.run_batch`` and
``encode_result`` call by call, so each line is one piece of the node's own
code; the two networks are timed too but reported apart, since the goal
(issue #15: <= 60 CPU-ms per image for everything else) excludes them.

``receive`` is a real C-STORE: DCMTK's ``storescu`` (another process) sends
the file to the node's storage SCP running in this process behind its guard
(storescu sends P-DATA up to the node's 1 MiB maximum PDU); it is this process's CPU time (all threads)
for the whole association, divided by the images sent.

Rounds are repeated, every round is kept in the JSON, and the table shows
the median per step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import torch  # noqa: E402
from netutil import free_port  # noqa: E402

from cxrtriage.config import DicomSettings, InferenceSettings  # noqa: E402
from cxrtriage.inference.dicom_results import build_result_objects  # noqa: E402
from cxrtriage.inference.overlay import write_overlay  # noqa: E402
from cxrtriage.inference.phantom import PhantomGenerator, write_cr  # noqa: E402
from cxrtriage.inference.pipeline import Pipeline, Result, lung_blobs  # noqa: E402
from cxrtriage.inference.preprocess import equalize, lung_box, masked_lung_crop, resize  # noqa: E402
from cxrtriage.inference.radiograph import radiograph_from_dataset  # noqa: E402
from cxrtriage.inference.scoring import score  # noqa: E402
from cxrtriage.observability import Metrics  # noqa: E402
from cxrtriage.scp.ingest import Ingest  # noqa: E402
from cxrtriage.scp.server import start_server  # noqa: E402
from cxrtriage.storage.archive import Archive  # noqa: E402
from cxrtriage.storage.db import Database  # noqa: E402
from cxrtriage.storage.queue import JobQueue  # noqa: E402

ROWS, COLS = 2500, 2048
NETWORKS = ("stage1 network", "stage2 network")


class Clock:
    """CPU ms of this thread per named step, summed over the calls."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.thread_time()
        value = fn()
        self.ms[name] = self.ms.get(name, 0.0) + (time.thread_time() - t0) * 1000
        return value


def score_one(pipeline: Pipeline, path: Path, scratch: Path, clock: Clock) -> Result:
    """One image through the node's steps, as Pipeline.run_batch and encode_result run them."""
    lung_spec, disease_spec = pipeline.lungs_model.spec, pipeline.disease_model.spec
    ds = clock("read (dcmread)", lambda: pydicom.dcmread(path))
    r = clock("decode + LUTs", lambda: radiograph_from_dataset(ds, "bench"))
    equalized = clock("equalise", lambda: equalize(r.pixels))
    inputs = clock("stage1 inputs", lambda: pipeline._inputs([equalized], lung_spec))
    lung_probs, _ = clock("stage1 network", lambda: pipeline.lungs_model(inputs))

    def lungs_post() -> tuple[Any, Any, Any, Any]:
        kept = lung_blobs(lung_probs[0], lung_spec.pixel_threshold, pipeline.settings.min_lung_blob_fraction,
                          r.shape)
        full = np.logical_or.reduce(kept) if kept else np.zeros(r.shape, dtype=bool)
        box = lung_box(full, pipeline.settings.crop_margin)
        return full, kept, box, masked_lung_crop(equalized, full, box)

    lungs, kept, box, crop = clock("stage1 post + crop", lungs_post)
    crop_inputs = clock("stage2 inputs", lambda: pipeline._inputs([crop], disease_spec))
    seg_probs, p_disease = clock("stage2 network", lambda: pipeline.disease_model(crop_inputs))
    p = float(p_disease[0]) if p_disease is not None else float(seg_probs[0].max())

    def disease_post() -> Any:
        refined = seg_probs[0] * float(p >= 0.5)
        return box.paste(resize(refined, box.shape) > disease_spec.pixel_threshold, r.shape) & lungs

    disease = clock("stage2 post", disease_post)
    scores, zones = clock("zones + scores", lambda: score(lungs, disease, pipeline.scoring, r.patient_orientation,
                                                          r.image_laterality, r.pixel_spacing_mm, kept))
    result = Result(source="bench", lungs=lungs, disease=disease, zones=zones, scores=scores, p_disease=p,
                    timings_ms={}, models=pipeline.model_versions, identity=pipeline.identity)
    objects = clock("SEG + SR build", lambda: build_result_objects(ds, result))
    encoded = clock("SEG + SR encode", objects.encode)
    archive = Archive(scratch / "results")

    def write() -> None:
        for obj in encoded:
            archive.write(archive.relative_path(obj.study_instance_uid, obj.series_instance_uid,
                                                obj.sop_instance_uid), obj.data)

    clock("write (fsync)", write)
    clock("overlay PNG", lambda: write_overlay(scratch / "overlay.png", r.pixels, result))
    clock("record (JSON)", result.as_dict)
    return result


def receive_ms(files: list[Path], scratch: Path) -> float:
    """This process's CPU ms per image while the node's SCP receives ``files`` from DCMTK storescu."""
    db = Database(f"sqlite:///{scratch / 'receive.db'}")
    db.migrate()
    archive = Archive(scratch / "archive")
    ingest = Ingest(db, archive, JobQueue(db), Metrics(), 0, 3)
    port = free_port()
    settings = DicomSettings(port=port)
    unused = {name: (lambda e: iter(())) for name in ("find", "move", "get")}  # only C-STORE is measured
    server = start_server(settings, {"store": ingest.handle, **unused})
    try:
        t0 = time.process_time()
        subprocess.run(["/usr/bin/storescu", "-aec", settings.ae_title, "127.0.0.1", str(port),
                        *map(str, files)], check=True, capture_output=True)
        return (time.process_time() - t0) * 1000 / len(files)
    finally:
        server.shutdown()
        db.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipeline = Pipeline(InferenceSettings(device="cpu", threads=1))
    rounds: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        generator = PhantomGenerator(ROWS, COLS, p_normal=0.0)
        files = [write_cr(generator(1_000 + i), scratch / f"{i}.dcm") for i in range(args.images)]
        score_one(pipeline, files[0], scratch, Clock())  # warm: imports, first calls
        masks: list[tuple[int, int]] = []
        for _ in range(args.rounds):
            clock = Clock()
            for path in files:
                result = score_one(pipeline, path, scratch, clock)
                masks.append((int(result.lungs.sum()), int(result.disease.sum())))
            per_image = {k: v / len(files) for k, v in clock.ms.items()}
            per_image["receive (C-STORE)"] = receive_ms(files, scratch / f"r{len(rounds)}")
            rounds.append(per_image)
    steps = list(rounds[0])
    median = {k: statistics.median(r[k] for r in rounds) for k in steps}
    outside = sum(v for k, v in median.items() if k not in NETWORKS)
    print(f"{args.images} phantom CRs of {ROWS}x{COLS}, {args.rounds} rounds, 1 thread, CPU ms per image (median)")
    print(f"lung pixels {min(m[0] for m in masks)}-{max(m[0] for m in masks)}, "
          f"opacity pixels {min(m[1] for m in masks)}-{max(m[1] for m in masks)} (non-empty masks)")
    for k in steps:
        print(f"  {k:24s}{median[k]:9.1f}{'   (network)' if k in NETWORKS else ''}")
    print(f"  {'outside the networks':24s}{outside:9.1f}   (goal <= 60)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": {"cpus": os.cpu_count(), "torch_threads": 1}, "images": args.images, "rows": ROWS,
            "columns": COLS, "rounds": rounds, "median_ms": median, "outside_networks_ms": outside,
            "mask_pixels": masks,
        }, indent=1))


if __name__ == "__main__":
    main()
