"""CPU milliseconds per image for each step around the networks, on 2500 x 2048 CRs.

    python bench/cpu_steps.py [--images 6] [--rounds 3] [--seg-sr templates|highdicom]
                              [--overlay lazy|per-image] [--phantoms DIR] [--json FILE]
                              [--preset bundled|paper] [--precision fp32|bf16]

Each step is timed with the process's CPU clock (``time.process_time``: the
helper threads OpenCV starts are counted too) at one torch thread, on phantom CRs of a chest film's size scored by the
bundled models (their lung and opacity masks are non-empty: the script says
how many pixels). The steps follow ``Pipeline.run_batch`` (``stage_sources``,
``model_inputs``, ``lung_crop``, ``ResultBuilder``) and ``encode_result``
call by call, so each line is one piece of the node's own code; the two
networks are timed too but reported apart, since the goal (issue #15:
<= 60 CPU-ms per image for everything else) excludes them.

``receive`` is a real C-STORE: DCMTK's ``storescu`` (another process) sends
the file to the node's storage SCP running in this process behind its guard
(storescu sends P-DATA up to the node's 1 MiB maximum PDU); it is this process's CPU time (all threads)
for the whole association, divided by the images sent.

``--seg-sr`` picks how the SEG and SR are made: ``templates`` (the node's
path: compiled templates filled in, bytes out, one step) or ``highdicom``
(the reference builder: build, then encode, two steps). The template of the
images' shape is compiled while warming up, as a node compiles it once per
shape.

``--overlay``: the node draws the overlay PNG when the study page first
asks for it (``lazy``, the default: its cost is shown, once per image viewed,
but not counted per image scored); ``per-image`` counts it per image, as the
node did before (to measure an older tree with this script).

``--phantoms DIR`` keeps the phantom CRs in DIR and reuses them (a 2500 x 2048
phantom takes a minute or more to make), so alternating runs score the same files.

Rounds are repeated, every round is kept in the JSON with the command line,
and the table shows the median per step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cv2  # noqa: E402
import pydicom  # noqa: E402
import torch  # noqa: E402
from receive import receive  # noqa: E402

from cxrtriage.config import DicomSettings  # noqa: E402
from cxrtriage.inference.dicom_results import build_result_objects  # noqa: E402
from cxrtriage.inference.overlay import write_overlay  # noqa: E402
from cxrtriage.inference.phantom import PhantomGenerator, write_cr  # noqa: E402
from cxrtriage.inference.pipeline import (  # noqa: E402
    Pipeline,
    Result,
    disease_mask,
    lung_crop,
    model_inputs,
    stage_sources,
)
from cxrtriage.inference.radiograph import radiograph_from_dataset  # noqa: E402
from cxrtriage.inference.result_templates import encode_result_objects  # noqa: E402
from cxrtriage.inference.scoring import score  # noqa: E402
from cxrtriage.storage.archive import Archive  # noqa: E402

ROWS, COLS = 2500, 2048
NETWORKS = ("stage1 network", "stage2 network")
#: Steps not paid per image scored: the overlay is drawn when a reader first opens the image (``--overlay lazy``).
ON_VIEW = "overlay PNG (on first view)"
RECEIVE = "receive (C-STORE)"


class Clock:
    """CPU ms of this process per named step, summed over the calls."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.process_time()
        value = fn()
        self.ms[name] = self.ms.get(name, 0.0) + (time.process_time() - t0) * 1000
        return value


def score_one(pipeline: Pipeline, path: Path, scratch: Path, clock: Clock, seg_sr: str = "templates",
              overlay: str = "lazy") -> Result:
    """One image through the node's steps, as Pipeline.run_batch and encode_result run them."""
    lung_spec, disease_spec = pipeline.lungs_model.spec, pipeline.disease_model.spec
    ds = clock("read (dcmread)", lambda: pydicom.dcmread(path))
    r = clock("decode + LUTs", lambda: radiograph_from_dataset(ds, "bench"))
    stage1_image, stage2_image = clock("equalise", lambda: stage_sources(r, lung_spec, disease_spec))
    inputs = clock("stage1 inputs", lambda: model_inputs([stage1_image], lung_spec))
    lung_probs, _ = clock("stage1 network", lambda: pipeline.lungs_model(inputs))
    settings = pipeline.settings
    c = clock("stage1 post + crop", lambda: lung_crop(stage2_image, lung_probs[0], lung_spec.pixel_threshold,
                                                       settings.min_lung_blob_fraction, settings.crop_margin))
    lungs, kept, box = c.lungs, c.blobs, c.box
    crop_inputs = clock("stage2 inputs", lambda: model_inputs([c.crop], disease_spec))
    seg_probs, p_disease = clock("stage2 network", lambda: pipeline.disease_model(crop_inputs))
    p = float(p_disease[0]) if p_disease is not None else float(seg_probs[0].max())

    def disease_post() -> Any:  # ResultBuilder.__call__, before score()
        return disease_mask(seg_probs[0], p, pipeline.build_result.disease_threshold, box, lungs,
                            pipeline.build_result.disease_gate)

    disease = clock("stage2 post", disease_post)
    scores, zones = clock("zones + scores", lambda: score(lungs, disease, pipeline.scoring, r.patient_orientation,
                                                          r.image_laterality, r.pixel_spacing_mm, kept))
    result = Result(source="bench", lungs=lungs, disease=disease, zones=zones, scores=scores, p_disease=p,
                    timings_ms={}, models=pipeline.model_versions, identity=pipeline.identity)
    if seg_sr == "templates":
        encoded = clock("SEG + SR (templates)", lambda: encode_result_objects(ds, result))
    else:
        objects = clock("SEG + SR build", lambda: build_result_objects(ds, result))
        encoded = clock("SEG + SR encode", objects.encode)
    archive = Archive(scratch / "results")

    def write() -> None:
        for obj in encoded:
            archive.write(archive.relative_path(obj.study_instance_uid, obj.series_instance_uid,
                                                obj.sop_instance_uid), obj.data)

    clock("write (fsync)", write)
    clock("overlay PNG" if overlay == "per-image" else ON_VIEW,
          lambda: write_overlay(scratch / "overlay.png", r.pixels, result))
    clock("record (JSON)", result.as_dict)
    return result


def receive_ms(files: list[Path], scratch: Path) -> float:
    """This process's CPU ms per image while the node's SCP receives ``files`` from DCMTK storescu."""
    return receive(files, scratch, DicomSettings().maximum_pdu_size)["cpu_ms_per_image"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--seg-sr", choices=("templates", "highdicom"), default="templates")
    parser.add_argument("--overlay", choices=("lazy", "per-image"), default="lazy")
    parser.add_argument("--phantoms", type=Path, default=None, help="keep and reuse the phantom CRs here")
    parser.add_argument("--preset", choices=("bundled", "paper"), default="bundled",
                        help="paper: the danilov2022 architectures with bench/paper_weights.py's weights")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)  # one thread, as torch: the CPU time is the same, without the pool's spinning
    from pipeline import bench_settings  # bench/pipeline.py: the paper preset's cached weights

    settings = bench_settings(args.preset, "cpu", 1).model_copy(update={"threads": 1, "precision": args.precision})
    pipeline = Pipeline(settings)
    rounds: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        generator = PhantomGenerator(ROWS, COLS, p_normal=0.0)
        folder = args.phantoms or scratch
        folder.mkdir(parents=True, exist_ok=True)
        files = [folder / f"{ROWS}x{COLS}-{1_000 + i}.dcm" for i in range(args.images)]
        for i, path in enumerate(files):
            if not path.is_file():
                write_cr(generator(1_000 + i), path)
        # warm: imports, first calls, the template
        score_one(pipeline, files[0], scratch, Clock(), args.seg_sr, args.overlay)
        masks: list[tuple[int, int]] = []
        for _ in range(args.rounds):
            clock = Clock()
            for path in files:
                result = score_one(pipeline, path, scratch, clock, args.seg_sr, args.overlay)
                masks.append((int(result.lungs.sum()), int(result.disease.sum())))
            per_image = {k: v / len(files) for k, v in clock.ms.items()}
            per_image[RECEIVE] = receive_ms(files, scratch / f"r{len(rounds)}")
            rounds.append(per_image)
    steps = list(rounds[0])
    median = {k: statistics.median(r[k] for r in rounds) for k in steps}
    outside = sum(v for k, v in median.items() if k not in NETWORKS and k != ON_VIEW)
    print(f"{args.images} phantom CRs of {ROWS}x{COLS}, {args.rounds} rounds, 1 thread, SEG + SR by {args.seg_sr}, "
          f"{args.preset} models in {args.precision}, CPU ms per image (median)")
    print(f"lung pixels {min(m[0] for m in masks)}-{max(m[0] for m in masks)}, "
          f"opacity pixels {min(m[1] for m in masks)}-{max(m[1] for m in masks)} (non-empty masks)")
    for k in steps:
        note = "   (network)" if k in NETWORKS else "   (once per image viewed, not counted)" if k == ON_VIEW else ""
        print(f"  {k:28s}{median[k]:9.1f}{note}")
    print(f"  {'outside the networks':28s}{outside:9.1f}   (goal <= 60)")
    print(f"  {'  of which scoring (no receive)':28s}{outside - median.get(RECEIVE, 0.0):9.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": " ".join(["python", *sys.argv]), "clock": "process_time",
            "machine": {"cpus": os.cpu_count(), "torch_threads": 1, "cv2_threads": 1}, "seg_sr": args.seg_sr,
            "preset": args.preset, "precision": args.precision,
            "overlay": args.overlay, "images": args.images,
            "rows": ROWS,
            "columns": COLS, "rounds": rounds, "median_ms": median, "outside_networks_ms": outside,
            "mask_pixels": masks, "scoring_ms": outside - median.get(RECEIVE, 0.0),
        }, indent=1))


if __name__ == "__main__":
    main()
