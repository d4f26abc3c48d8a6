"""Pipeline throughput: the published covid_scoring inference against cxrtriage, like with like.

    python bench/pipeline.py [--preset paper|bundled] [--images 16] [--rounds 3] [--workers 2] [--threads 1]
                             [--batch 2] [--contenders ...] [--json bench/results/pipeline-PRESET.json]

The same synthetic 2500x2048 16-bit CRs (DICOM files) go through each contender:

* ``published as run``: the published inference (bench/covid_scoring.py) as its program runs:
  one process with every core's threads, batch 1, fp32, writing its two PNGs per image (lung mask
  and opacity probability in 512 x 512 crop space) and a CSV row; no DICOM out;
* ``published fp32`` / ``published bf16``: the same inference in the layout cxrtriage uses
  (``--workers`` processes x ``--threads`` torch threads, same N and M), batch 1, writing the
  same SEG + SR as cxrtriage; bf16 converts its weights and inputs as cxrtriage's bf16 does;
* ``cxrtriage fp32`` / ``cxrtriage bf16``: ``cxrtriage.inference.parallel.ScoringPool``
  (same N x M, ``--batch`` images per model call), writing SEG + SR; eager torch (``inference.backend:
  torch``), as in every earlier run;
* ``cxrtriage fp32 unfolded``: the same with ``inference.fold_batch_norm: false`` (each BatchNorm a pass of
  its own, as before folding), to credit the folding within one run;
* ``cxrtriage fp32 onnx``: the same with ONNX Runtime (its CPU provider, graph optimisations on, as many
  intra-op threads as torch has in the worker): what ``inference.backend: auto``, the default, runs on a CPU;
* ``cxrtriage fp32 compiled`` / ``cxrtriage bf16 compiled``: the same with ``inference.compile``
  (inductor's C++ kernels, weights frozen in; each worker compiles while warming up, untimed);
* ``engine fp32`` / ``engine bf16``: the device-owning scoring engine
  (``cxrtriage.stages.engine_scorer``), when that module exists, fed by enough threads
  to fill its batches, writing SEG + SR.

Exactly one pool is alive at a time: each contender's processes start, load the models and score
one warm-up image per worker before the clock starts, and stop after their run. The order of the
contenders rotates every round; every round is kept in the JSON. Beside wall time the script
reports CPU seconds per image: the CPU time (user + system) of this process and all its child
processes over the run, read with psutil, which a noisy shared machine distorts far less than
wall time. Every contender except ``published as run`` must write one SEG and one SR per image
(checked). ``--preset paper`` runs the paper's architectures (DeepLabV3+/efficientnet-b1 @ 512,
MA-Net/regnetx_064 @ 544) with weights trained briefly on phantoms (bench/paper_weights.py,
cached), so that masks are non-empty; the lung and opacity pixel counts are printed.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import inspect
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pydicom  # noqa: E402
import torch  # noqa: E402
from covid_scoring import CovidScoringNet  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from cxrtriage.config import InferenceSettings  # noqa: E402
from cxrtriage.inference.dicom_results import build_result_objects  # noqa: E402
from cxrtriage.inference.models import ModelSpec  # noqa: E402
from cxrtriage.inference.parallel import ScoringPool, threads_per_worker  # noqa: E402
from cxrtriage.inference.phantom import PhantomGenerator, write_cr  # noqa: E402
from cxrtriage.inference.presets import model_specs  # noqa: E402
from cxrtriage.inference.radiograph import load_radiograph  # noqa: E402

#: (zones' binary scores, lung pixels, opacity pixels) of one image
Scored = tuple[list[int], int, int]


def make_images(folder: Path, count: int, rows: int, cols: int) -> list[Path]:
    """Distinct phantoms drawn at a quarter size (drawing is slow at full size), enlarged."""
    generator = PhantomGenerator(max(rows // 4, 64), max(cols // 4, 64))
    files = []
    for i in range(count):
        phantom = generator(9_000_000 + i)
        image = cv2.resize(phantom.image, (cols, rows), interpolation=cv2.INTER_CUBIC).clip(0.0, 1.0)
        files.append(write_cr(dataclasses.replace(phantom, image=image), folder / f"cr{i:03d}.dcm"))
    return files


def replicate(files: list[Path], count: int, folder: Path, fresh: bool = False) -> list[Path]:
    """``count`` files: ``files`` (unless ``fresh``), then copies of them with new UIDs (drawing is slow)."""
    out = [] if fresh else list(files[:count])
    folder.mkdir(parents=True, exist_ok=True)
    i = 0
    while len(out) < count:
        ds = pydicom.dcmread(files[i % len(files)])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        path = folder / f"copy{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
        i += 1
    return out


def bench_settings(preset: str, device: str, batch: int, weights_dir: Path | None = None,
                   paper_steps: tuple[int, int] = (400, 300)) -> InferenceSettings:
    """``bundled``, or ``paper``: the danilov2022 architectures with phantom-trained weights (cached)."""
    if preset == "bundled":
        return InferenceSettings(preset="bundled", batch_size=batch, device=device)
    from paper_weights import DEFAULT_DIR, paper_weights

    paths = paper_weights(weights_dir or DEFAULT_DIR, paper_steps)
    return InferenceSettings(preset="danilov2022", batch_size=batch, device=device,
                             lungs={"weights": str(paths["lungs"])}, disease={"weights": str(paths["disease"])})


# -- the published inference in worker processes ------------------------------------------


class _Bf16(torch.nn.Module):
    """A model in bfloat16 whose outputs come back as float32, as cxrtriage's bf16 predictor does."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> Any:
        out = self.model(x.to(torch.bfloat16))
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()


class _AsRun(CovidScoringNet):
    """The published program's own outputs: crop-space masks for its PNGs, no full-resolution result."""

    def _result(self, radiograph: Any, lung_crop: np.ndarray, covid_crop: np.ndarray, left: Any, right: Any,
                zones: Any, fractions: list[float], p: float, box: Any) -> Any:
        order = [2, 1, 0, 5, 4, 3]
        binary = [int(fractions[i] > self.threshold) for i in order]
        return binary, lung_crop, covid_crop


_net: CovidScoringNet | None = None


def _start_published(lungs_json: str, disease_json: str, device: str, threads: int, precision: str,
                     as_run: bool) -> None:
    global _net
    torch.set_num_threads(threads)
    lungs, disease = ModelSpec.model_validate_json(lungs_json), ModelSpec.model_validate_json(disease_json)
    net = (_AsRun if as_run else CovidScoringNet)(lungs, disease, disease.zone_threshold or 0.5, device)
    if precision == "bf16":
        net.lung_model, net.disease_model = _Bf16(net.lung_model), _Bf16(net.disease_model)
    _net = net


def _published_one(path: Path, out: Path) -> Scored:
    """One image as a port of the published code would: score, then SEG + SR, one after another."""
    assert _net is not None, "worker started without the published network"
    radiograph = load_radiograph(path)
    if isinstance(_net, _AsRun):  # the published program: two PNGs and a CSV row
        binary, lung_crop, covid_crop = cast(Any, _net.predict(radiograph))
        for kind, mask in (("lungs", lung_crop), ("covid", covid_crop)):
            (out / kind).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(out / kind / f"{path.stem}.png"), (mask > 0).astype(np.uint8) * 255)
        with open(out / f"scores-{os.getpid()}.csv", "a", newline="") as f:
            csv.writer(f).writerow([path.name, sum(binary), *binary])
        return binary, int((lung_crop > 0).sum()), int(covid_crop.sum())
    result = _net.predict(radiograph)
    build_result_objects(radiograph.dataset, result).save(out / "dicom")
    return list(result.scores.binary), result.scores.lung_area_px, result.scores.lesion_area_px


def _published_warm(path: Path, out: Path) -> int:
    _published_one(path, out)
    time.sleep(0.05)  # long enough that the tasks spread over the workers
    return os.getpid()


# -- contenders -------------------------------------------------------------------------------


class Contender(Protocol):
    name: str

    @property
    def dicom(self) -> bool:  # writes SEG + SR
        ...

    def start(self, sample: Path, scratch: Path) -> None: ...

    def run(self, files: list[Path], out: Path) -> list[Scored]: ...

    def close(self) -> None: ...


@dataclasses.dataclass
class Published:
    name: str
    lungs: ModelSpec
    disease: ModelSpec
    device: str
    workers: int
    threads: int
    precision: str = "fp32"
    as_run: bool = False
    executor: ProcessPoolExecutor | None = None

    @property
    def dicom(self) -> bool:
        return not self.as_run

    def start(self, sample: Path, scratch: Path) -> None:
        self.executor = ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_published,
            initargs=(self.lungs.model_dump_json(), self.disease.model_dump_json(), self.device, self.threads,
                      self.precision, self.as_run))
        seen: set[int] = set()
        while len(seen) < self.workers:  # every worker loaded and warmed
            n = 2 * self.workers
            seen.update(self.executor.map(_published_warm, [sample] * n, [scratch] * n))

    def run(self, files: list[Path], out: Path) -> list[Scored]:
        assert self.executor is not None
        return list(self.executor.map(_published_one, files, [out] * len(files)))

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True)
            self.executor = None


@dataclasses.dataclass
class Cxrtriage:
    name: str
    settings: InferenceSettings
    workers: int
    pool: ScoringPool | None = None
    dicom: bool = True

    def start(self, sample: Path, scratch: Path) -> None:
        self.pool = ScoringPool(self.settings, self.workers)
        self.pool.warm_up(sample)

    def run(self, files: list[Path], out: Path) -> list[Scored]:
        assert self.pool is not None
        scored = []
        for outcome in self.pool.map(files, out, dicom=True):
            if not outcome.ok:
                raise RuntimeError(f"{outcome.path}: {outcome.reason} {outcome.message}")
            record = outcome.result
            assert record is not None
            scored.append(([z["binary_score"] for z in record["zones"].values()], record["lung_area_px"],
                           record["lesion_area_px"]))
        return scored

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None


def engine_available() -> bool:
    """Whether the device-owning scoring engine (issue #15, another change) is in this tree."""
    return importlib.util.find_spec("cxrtriage.stages.engine_scorer") is not None


def make_engine_scorer(settings: InferenceSettings, workers: int) -> Any:
    """The engine's Scorer (``__call__(path, uid, overlay)``, ``warm_up``, ``close``), built from its signature."""
    from cxrtriage.stages import engine_scorer

    cls = engine_scorer.EngineScorer
    params = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {}
    for name in ("workers", "processes", "cpu_workers", "scoring_processes"):
        if name in params:
            kwargs[name] = workers
            break
    return cls(settings, **kwargs)


@dataclasses.dataclass
class Engine:
    """The engine through its Scorer interface, with enough jobs in flight to fill its batches."""

    name: str
    settings: InferenceSettings
    workers: int
    scorer: Any = None
    dicom: bool = True
    timings: list[dict[str, float]] = dataclasses.field(default_factory=list)  # each image's, in ms
    lanes: int | None = None  # lanes taking batches once warm (EngineSwitches); None: all it started with

    def start(self, sample: Path, scratch: Path) -> None:
        t0 = time.monotonic()
        self.scorer = make_engine_scorer(self.settings, self.workers)
        self.scorer.warm_up(sample)
        if self.lanes is not None:
            self.scorer.pool.engine.switches.lanes = min(self.lanes, self.scorer.pool.engine.switches.started_lanes)
        print(f"  {self.name}: engine and {self.workers} workers warm in {time.monotonic() - t0:.0f} s", flush=True)

    @property
    def engine_pid(self) -> int | None:
        """The engine process, so that its CPU is told apart from the workers' (:func:`tree_cpu`)."""
        return self.scorer.pool.engine.pid if self.scorer is not None else None

    def run(self, files: list[Path], out: Path) -> list[Scored]:
        (out / "dicom").mkdir(parents=True, exist_ok=True)

        def one(path: Path) -> Scored:
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            outcome = self.scorer(path, uid, None)
            if not hasattr(outcome, "objects"):
                raise RuntimeError(f"{path}: {outcome.reason} {outcome.detail}")
            for obj in outcome.objects:
                (out / "dicom" / f"{obj.sop_instance_uid}.{obj.kind}.dcm").write_bytes(obj.data)
            zones = outcome.details["zones"].values()
            self.timings.append(outcome.details.get("timings_ms", {}))
            return ([z["binary_score"] for z in zones], outcome.details["lung_area_px"],
                    outcome.details["lesion_area_px"])

        jobs = 2 * max(self.settings.max_batch, self.workers)
        with ThreadPoolExecutor(jobs) as threads:
            return list(threads.map(one, files))

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.close()
            self.scorer = None


def contenders_for(settings: InferenceSettings, workers: int, threads: int, names: Sequence[str]) -> list[Contender]:
    lungs, disease = model_specs(settings)
    cores = workers * threads
    bf16 = settings.model_copy(update={"precision": "bf16"})
    # "cxrtriage fp32" stays eager torch, as in every earlier run; the node's default on a CPU (inference.backend
    # auto) is "cxrtriage fp32 onnx"
    pool_settings = settings.model_copy(update={"threads": threads, "backend": "torch"})
    makers: dict[str, Callable[[], Contender]] = {
        "published as run": lambda: Published("published as run", lungs, disease, settings.device, 1, cores,
                                              as_run=True),
        "published fp32": lambda: Published("published fp32", lungs, disease, settings.device, workers, threads),
        "published bf16": lambda: Published("published bf16", lungs, disease, settings.device, workers, threads,
                                            "bf16"),
        "cxrtriage fp32": lambda: Cxrtriage("cxrtriage fp32", pool_settings, workers),
        "cxrtriage bf16": lambda: Cxrtriage("cxrtriage bf16", bf16.model_copy(update={"threads": threads}), workers),
        "cxrtriage fp32 unfolded": lambda: Cxrtriage("cxrtriage fp32 unfolded",
                                                     pool_settings.model_copy(update={"fold_batch_norm": False}),
                                                     workers),
        "cxrtriage fp32 onnx": lambda: Cxrtriage("cxrtriage fp32 onnx",
                                                 pool_settings.model_copy(update={"backend": "onnx"}), workers),
        "cxrtriage fp32 compiled": lambda: Cxrtriage("cxrtriage fp32 compiled",
                                                     pool_settings.model_copy(update={"compile": True}), workers),
        "cxrtriage bf16 compiled": lambda: Cxrtriage("cxrtriage bf16 compiled",
                                                     bf16.model_copy(update={"threads": threads, "compile": True}),
                                                     workers),
        "engine fp32": lambda: Engine("engine fp32", settings, workers),
        "engine bf16": lambda: Engine("engine bf16", bf16, workers),
    }
    chosen = []
    for name in names:
        if name.startswith("engine") and not engine_available():
            print(f"  ({name}: cxrtriage.stages.engine_scorer is not in this tree; skipped)")
            continue
        chosen.append(makers[name]())
    return chosen


ALL = ("published as run", "published fp32", "published bf16", "cxrtriage fp32", "cxrtriage bf16",
       "cxrtriage fp32 unfolded", "cxrtriage fp32 onnx", "cxrtriage fp32 compiled", "cxrtriage bf16 compiled",
       "engine fp32", "engine bf16")


# -- measuring ----------------------------------------------------------------------------------


def tree_cpu(engine_pid: int | None = None) -> dict[str, float]:
    """CPU seconds so far (user + system) of this process ("caller"), the engine process (``engine_pid``), and
    every other descendant ("workers")."""
    me = psutil.Process()
    roles = {"caller": sum(me.cpu_times()[:2]), "engine": 0.0, "workers": 0.0}
    for child in me.children(recursive=True):
        try:
            roles["engine" if child.pid == engine_pid else "workers"] += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return roles


def cpu_per_image(c0: dict[str, float], c1: dict[str, float], images: int) -> dict[str, Any]:
    """CPU s/image over two :func:`tree_cpu` readings, and its ms/image split by process."""
    return {"cpu_s_per_image": sum(c1[r] - c0[r] for r in c0) / images,
            "cpu_ms_per_image_by_process": {r: round((c1[r] - c0[r]) * 1000 / images, 1) for r in c0}}


def outputs(folder: Path) -> dict[str, int]:
    return {"seg": len(list(folder.rglob("*.seg.dcm"))), "sr": len(list(folder.rglob("*.sr.dcm"))),
            "png": len(list(folder.rglob("*.png")))}


def measure(contender: Contender, files: list[Path], root: Path, round_: int,
            after: Callable[[Contender, dict[str, Any]], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Start the contender's processes (untimed), time one run over ``files``, stop them; ``after`` runs on the
    started contender once the timed run is over, given its images/s and CPU s/image (its result under
    ``"after"``)."""
    out = root / f"out-{round_}-{contender.name.replace(' ', '-')}"
    scratch = root / "warm"
    contender.start(files[0], scratch)
    try:
        engine_pid = getattr(contender, "engine_pid", None)  # processes stay alive through the run: pids hold
        c0, t0 = tree_cpu(engine_pid), time.perf_counter()
        scored = contender.run(files, out)
        seconds = time.perf_counter() - t0
        c1 = tree_cpu(engine_pid)
        timed = {"images_per_s": len(files) / seconds, **cpu_per_image(c0, c1, len(files))}
        extra = after(contender, timed) if after is not None else None
    finally:
        contender.close()
    written = outputs(out)
    if contender.dicom and (written["seg"], written["sr"]) != (len(files), len(files)):
        raise RuntimeError(f"{contender.name} wrote {written} for {len(files)} images")
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(scratch, ignore_errors=True)
    return {"round": round_, "seconds": seconds, **timed, "outputs": written,
            "zones": [s[0] for s in scored], "lung_px": [s[1] for s in scored], "opacity_px": [s[2] for s in scored],
            **({"after": extra} if extra is not None else {})}


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, float]:
    totals = [(sum(x), sum(y)) for x, y in zip(a, b)]
    return {
        "same_total": sum(x == y for x, y in totals),
        "total_mae": statistics.fmean(abs(x - y) for x, y in totals),
        "same_zone": sum(p == q for x, y in zip(a, b) for p, q in zip(x, y)) / (6 * len(a)),
    }


def summarise(runs: dict[str, list[dict[str, Any]]], images: int) -> dict[str, dict[str, Any]]:
    """Medians per contender; ratios against ``published fp32`` (same layout) where it ran."""
    summary: dict[str, dict[str, Any]] = {}
    for name, rounds in runs.items():
        summary[name] = {
            "images_per_s": images / statistics.median(r["seconds"] for r in rounds),
            "cpu_s_per_image": statistics.median(r["cpu_s_per_image"] for r in rounds),
            "lung_px": [min(rounds[-1]["lung_px"]), int(statistics.median(rounds[-1]["lung_px"])),
                        max(rounds[-1]["lung_px"])],
            "opacity_px": [min(rounds[-1]["opacity_px"]), int(statistics.median(rounds[-1]["opacity_px"])),
                           max(rounds[-1]["opacity_px"])],
            "non_empty_lungs": sum(p > 0 for p in rounds[-1]["lung_px"]),
            "non_empty_opacity": sum(p > 0 for p in rounds[-1]["opacity_px"]),
        }
    for base in ("published fp32", "published as run"):
        if base in summary:
            for name, numbers in summary.items():
                key = "vs_published_fp32" if base == "published fp32" else "vs_published_as_run"
                numbers[key] = numbers["images_per_s"] / summary[base]["images_per_s"]
                numbers[key + "_cpu"] = summary[base]["cpu_s_per_image"] / numbers["cpu_s_per_image"]
                if base == "published fp32":
                    numbers["agreement"] = agreement(runs[base][-1]["zones"], runs[name][-1]["zones"])
    return summary


def markdown(report: dict[str, Any]) -> str:
    """The docs/benchmarks.md table of a saved report (``--table FILE``)."""
    images = report["images"]
    lines = ["| contender | images/s, every round | median | vs published fp32 | CPU s/image | CPU vs published "
             "fp32 | same 0-6 score as published fp32 | lung / opacity px (median) |",
             "|---|---|---|---|---|---|---|---|"]
    nan = float("nan")
    for name, s in report["summary"].items():
        rounds = ", ".join(f"{r['images_per_s']:.2f}" for r in report["runs"][name])
        agree = s.get("agreement")
        same = f"{agree['same_total']}/{images}" if agree else "-"
        lines.append(f"| {name} | {rounds} | {s['images_per_s']:.2f} | {s.get('vs_published_fp32', nan):.2f}x "
                     f"| {s['cpu_s_per_image']:.2f} | {s.get('vs_published_fp32_cpu', nan):.2f}x | {same} "
                     f"| {s['lung_px'][1]:,} / {s['opacity_px'][1]:,} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paper", choices=["paper", "bundled"])
    parser.add_argument("--images", type=int, default=None, help="default: 4 per worker x batch, at least 8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="processes (N), the same for every contender")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (M); default cores / N")
    parser.add_argument("--batch", type=int, default=2, help="cxrtriage images per model call")
    parser.add_argument("--size", default="2500x2048", help="rows x columns of the synthetic CRs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--contenders", nargs="+", default=list(ALL), choices=ALL, metavar="NAME",
                        help=f"any of: {', '.join(ALL)} (default: all; engine ones only where it exists)")
    parser.add_argument("--weights-dir", type=Path, default=None, help="paper preset: where trained weights are cached")
    parser.add_argument("--json", type=Path, help="also write every round here (bench/plot.py reads it)")
    parser.add_argument("--table", type=Path, help="only print the markdown table of a saved --json report")
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads(args.table.read_text())))
        return
    rows, cols = (int(v) for v in args.size.split("x"))
    threads = args.threads or threads_per_worker(args.workers)
    images = args.images or max(8, 4 * args.workers * args.batch)
    if images < args.workers * args.batch:
        raise SystemExit(f"--images {images} leaves a worker idle: use at least workers x batch")

    settings = bench_settings(args.preset, args.device, args.batch, args.weights_dir)
    lungs, disease = model_specs(settings)
    contenders = contenders_for(settings, args.workers, threads, args.contenders)
    runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in contenders}
    failures: dict[str, str] = {}
    specs = {k: {"arch": v.arch, "encoder": v.encoder, "input_size": v.input_size, "weights": v.weights}
             for k, v in (("lungs", lungs), ("disease", disease))}

    def report(complete: bool) -> dict[str, Any]:
        done = {name: rs for name, rs in runs.items() if rs}
        return {"preset": args.preset, "device": args.device, "images": images, "size": [rows, cols],
                "workers": args.workers, "threads": threads, "batch": args.batch, "rounds": args.rounds,
                "complete": complete, "cores": os.cpu_count(), "models": specs, "failures": failures,
                "summary": summarise(done, images),
                "runs": {name: [{k: v for k, v in r.items() if k != "zones"}
                                | {"totals": [sum(z) for z in r["zones"]]} for r in rs]
                         for name, rs in done.items()}}

    def save(complete: bool) -> None:  # after every run: a run cut short keeps its rounds
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report(complete), indent=1))

    with tempfile.TemporaryDirectory(prefix="cxrt-bench-") as tmp:
        root = Path(tmp)
        files = make_images(root / "in", images, rows, cols)
        for round_ in range(args.rounds):
            shift = round_ % len(contenders)
            for contender in contenders[shift:] + contenders[:shift]:  # the order rotates every round
                if contender.name in failures:
                    continue
                try:
                    runs[contender.name].append(measure(contender, files, root, round_))
                except Exception as exc:  # one broken contender must not lose the others' rounds
                    failures[contender.name] = f"round {round_ + 1}: {type(exc).__name__}: {exc}"
                    print(f"  round {round_ + 1} {contender.name:16s} FAILED: {failures[contender.name]}", flush=True)
                    continue
                last = runs[contender.name][-1]
                print(f"  round {round_ + 1} {contender.name:16s} {last['images_per_s']:6.2f} images/s "
                      f"{last['cpu_s_per_image']:6.2f} CPU s/image", flush=True)
                save(False)

    final = report(True)
    summary = final["summary"]
    print(f"{images} CRs {rows}x{cols} on {args.device}, preset {args.preset} ({lungs.arch}/{lungs.encoder} @ "
          f"{lungs.input_size}, {disease.arch}/{disease.encoder} @ {disease.input_size}), {args.rounds} rounds "
          f"(median), {os.cpu_count()} cores; every contender {args.workers} processes x {threads} threads "
          f"(published as run: 1 x {args.workers * threads}); cxrtriage batch {args.batch}")
    for name, s in summary.items():
        ratio = f"{s['vs_published_fp32']:5.2f}x" if "vs_published_fp32" in s else "  -  "
        cpu_ratio = f"{s['vs_published_fp32_cpu']:5.2f}x" if "vs_published_fp32_cpu" in s else "  -  "
        agree = s.get("agreement")
        same = f"same 0-6 score {agree['same_total']}/{images}" if agree else ""
        print(f"  {name:16s}: {s['images_per_s']:6.2f} images/s ({ratio})  {s['cpu_s_per_image']:6.2f} CPU s/image "
              f"({cpu_ratio})  lung px {s['lung_px'][1]}  opacity px {s['opacity_px'][1]} "
              f"(non-empty {s['non_empty_lungs']}/{s['non_empty_opacity']} of {images})  {same}")
    for name, error in failures.items():
        print(f"  {name:16s}: FAILED {error}")
    if any(s["non_empty_lungs"] < images for s in summary.values()):
        print("  WARNING: some lung masks are empty: post-processing is under-measured (train the weights longer)")
    save(True)
    if args.json:
        print(markdown(final))
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
