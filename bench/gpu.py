"""The GPU run (issue #15.4): models-alone ceiling, end to end, the published baseline, GPU utilisation.

    bash bench/gpu.sh [OUT_DIR]                 # on a GPU machine: under 8 minutes on one H100
    python bench/gpu.py --out DIR [--dry-run]   # what gpu.sh runs; --dry-run: CPU, tiny sizes, seconds

Phases, in this order (the JSON is rewritten after each, so a run cut short keeps what it measured):

1. ``environment``: torch, the device's name, CPU cores.
2. ``weights``: the paper's architectures (DeepLabV3+/efficientnet-b1 @ 512, MA-Net/regnetx_064 @ 544)
   with weights trained briefly on phantoms (bench/paper_weights.py, on the device, cached), so that
   post-processing sees real masks; the dry run uses untrained weights at 64 px.
3. ``ceiling``: the two networks alone at ``--batch``, bf16, channels_last, inputs already on the
   device: images/s of Stage I + Stage II back to back (eager here; compiled in phase 6).
4. ``baseline``: the published inference as the paper ran it (bench/covid_scoring.py: one process,
   batch 1, fp32, writing its PNGs; paper: 7.9 images/s on an RTX 2080 Ti).
5. ``end_to_end``: DICOM files in, SEG + SR files out, with as many CPU worker processes as the box
   has cores: through the scoring engine where cxrtriage.stages.engine_scorer exists (``max_batch``
   = ``--batch``), else through ``ScoringPool`` (every worker on the GPU, ``--pool-batch`` per call).
   Reported as images/s, CPU s/image and the fraction of the models-alone ceiling. Then, on the same started
   engine, ``steady_latency``: images offered at a steady ``--latency-rate`` (50/s) for ``--latency-seconds``,
   open loop, p50/p95/p99 from hand-over to SEG + SR bytes (the first quarter left out as warm-up).
   The engine starts with ``--device-lanes`` lanes (2: batches in flight at once on the device, each on its
   own streams) and runs the timed pass with one of them taking batches, the node's default. After the
   latency, ``variants`` on the same warm engine (``EngineSwitches``; a new engine would pay minutes of kernel
   search): ``--variant-rounds`` rounds of runs over the same images of each of :data:`VARIANTS`, the order
   rotating, every run kept: one lane or all, Stage I's input made in the CPU workers or on the device
   (``inference.stage1_on_device``), the lung blobs found on host threads or on the device
   (``inference.lung_blobs_on_device``). None starts after 380 s; the timed pass and latency are saved first.
6. ``ceiling_compiled``: phase 3 with ``torch.compile(mode="reduce-overhead")`` (CUDA graphs); skipped
   on the dry run and with ``--no-compile``.

GPU utilisation (nvidia-smi, sampled every 100 ms) is recorded for phases 3-6 where nvidia-smi exists.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from pipeline import (  # noqa: E402
    Cxrtriage,
    Engine,
    Published,
    cpu_per_image,
    engine_available,
    make_images,
    measure,
    outputs,
    replicate,
    tree_cpu,
)

from cxrtriage.config import InferenceSettings  # noqa: E402
from cxrtriage.inference.models import ModelSpec, create_model  # noqa: E402
from cxrtriage.inference.predictors import inference_model  # noqa: E402
from cxrtriage.inference.presets import danilov2022, model_specs  # noqa: E402

OUT_ENV = "CXRTRIAGE_GPU_BENCH_OUT"


class GpuSampler:
    """nvidia-smi utilisation and memory every ``period_ms`` while the block runs; None without nvidia-smi."""

    def __init__(self, period_ms: int = 100) -> None:
        self.period_ms = period_ms
        self.samples: list[tuple[float, float]] = []

    @contextmanager
    def sampling(self) -> Iterator[GpuSampler]:
        self.samples = []
        exe = shutil.which("nvidia-smi")
        if exe is None:
            yield self
            return
        proc = subprocess.Popen([exe, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                                 f"--loop-ms={self.period_ms}"], stdout=subprocess.PIPE, text=True)
        reader = threading.Thread(target=self._read, args=(proc,), daemon=True)
        reader.start()
        try:
            yield self
        finally:
            proc.terminate()
            proc.wait()
            reader.join(timeout=2)

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                util, memory = (float(v) for v in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((util, memory))

    def summary(self) -> dict[str, Any] | None:
        if not self.samples:
            return None
        utils = sorted(u for u, _ in self.samples)
        return {"samples": len(utils), "util_mean_pct": sum(utils) / len(utils), "util_p50_pct": utils[len(utils) // 2],
                "memory_max_mib": max(m for _, m in self.samples)}


def environment(device: str) -> dict[str, Any]:
    facts: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                             "cpu_cores": os.cpu_count(), "device": device}
    if device.startswith("cuda"):
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["cuda"] = torch.version.cuda
        facts["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return facts


def paper_settings(args: argparse.Namespace, folder: Path) -> tuple[InferenceSettings, dict[str, Any]]:
    """The paper's pair: phantom-trained weights on a real run, untrained 64-px models on a dry run."""
    if args.dry_run:
        overrides = {}
        for name, spec in zip(("lungs", "disease"), danilov2022((False, False))):
            torch.manual_seed(len(name))
            path = folder / f"{name}-untrained-64.pth"
            torch.save(create_model(spec.model_copy(update={"input_size": 64})).state_dict(), path)
            overrides[name] = {"weights": str(path), "input_size": 64}
        settings = InferenceSettings(preset="danilov2022", device=args.device, **overrides)
        return settings, {"kind": "untrained (dry run)", "input_sizes": [64, 64]}
    from paper_weights import paper_weights

    t0 = time.monotonic()
    paths = paper_weights(args.weights_dir, tuple(args.train_steps), args.device, crop=256, batch_sizes=(8, 8),
                          images=64, workers=min(8, os.cpu_count() or 1))
    settings = InferenceSettings(preset="danilov2022", device=args.device, lungs={"weights": str(paths["lungs"])},
                                 disease={"weights": str(paths["disease"])})
    from safetensors import safe_open

    training = {}
    for name, path in paths.items():  # held-out Dice and mask pixels: are the masks real?
        with safe_open(str(path), "pt") as f:
            training[name] = json.loads((f.metadata() or {}).get("cxrtriage_training", "{}"))
    return settings, {"kind": "trained on phantoms (bench/paper_weights.py)", "steps": args.train_steps,
                      "files": {k: str(v) for k, v in paths.items()}, "training": training,
                      "seconds": round(time.monotonic() - t0, 1)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def models_alone(specs: tuple[ModelSpec, ModelSpec], device_name: str, batch: int, iterations: int,
                 compiled: bool) -> dict[str, Any]:
    """Images/s of Stage I then Stage II on ready device tensors: the ceiling of the whole node."""
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    dtype = torch.bfloat16
    per_stage: dict[str, dict[str, Any]] = {}
    for stage, spec in zip(("stage1", "stage2"), specs):
        # made as the engine makes them (BatchNorm folded): the ceiling of the node's own networks
        model, folded = inference_model(spec, device, dtype)
        run: Callable[[torch.Tensor], Any] = model
        t0 = time.monotonic()
        if compiled:
            run = torch.compile(model, mode="reduce-overhead")
        x = torch.randn(batch, spec.in_channels, spec.input_size, spec.input_size, device=device, dtype=dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            for _ in range(3):  # compile, cudnn autotuning, CUDA graph capture
                run(x)
            _sync(device)
            warm = time.monotonic() - t0
            t0 = time.perf_counter()
            for _ in range(iterations):
                run(x)
            _sync(device)
        seconds = (time.perf_counter() - t0) / iterations
        per_stage[stage] = {"model": f"{spec.arch}/{spec.encoder} @ {spec.input_size}", "ms_per_batch": seconds * 1000,
                            "images_per_s": batch / seconds, "warm_up_s": round(warm, 1), "bn_folded": folded}
        del model, run
        if device.type == "cuda":
            torch.cuda.empty_cache()
    both = per_stage["stage1"]["ms_per_batch"] + per_stage["stage2"]["ms_per_batch"]
    return {"batch": batch, "precision": "bf16", "compiled": compiled, "iterations": iterations, **per_stage,
            "images_per_s": batch / (both / 1000)}


#: Seconds into the run after which no variant run starts: gpu.sh stops the script at 460 s, and the compiled
#: ceiling and the summary come after.
VARIANTS_DEADLINE_S = 380.0
#: Engine options compared on one started engine (``variants``): name -> (all lanes, stage1_on_device,
#: lung_blobs_on_device); the default is the node's (one lane, neither on the device).
VARIANTS = {"default": (False, False, False), "all lanes": (True, False, False),
            "stage1 on device": (False, True, False), "blobs on device": (False, False, True),
            "all of them": (True, True, True)}


def variants(contender: Engine, files: list[Path], root: Path, rounds: int, deadline: float,
             progress: Callable[[dict[str, Any]], None] = lambda _: None) -> dict[str, Any]:
    """On ``contender``'s started engine, ``rounds`` runs over ``files`` of each of :data:`VARIANTS`, the order
    rotating each round: one lane taking batches or all the engine started with, Stage I's input made in the
    CPU workers or by the engine from the uploaded image (``inference.stage1_on_device``), the lung blobs found
    on the engine's host threads or on the device (``inference.lung_blobs_on_device``); images/s, CPU per image
    by process and the median step times of each run. Only a device engine can do the last two
    (``on_device``; ``steps`` counts the images whose blobs were found on the host and on the device).

    A run that fails is kept with its error and the next goes on; none starts after ``deadline``
    (time.monotonic()); ``progress`` gets the result so far after each run."""
    pool = contender.scorer.pool
    switches = pool.engine.switches
    before, saved = (pool.stage1_on_device, switches.lanes, switches.blobs_on_device), contender.timings
    names = list(VARIANTS)
    runs: list[dict[str, Any]] = []

    def summary(cut: bool) -> dict[str, Any]:
        done = {name: [r["images_per_s"] for r in runs if r["variant"] == name and "images_per_s" in r]
                for name in names}
        medians = {name: statistics.median(v) for name, v in done.items() if v}
        return {"started_lanes": switches.started_lanes, "cut_by_deadline": cut, "runs": runs,
                "images_per_s_median": medians,
                "vs_default": {name: medians[name] / medians["default"] for name in names[1:]
                               if name in medians and "default" in medians}}

    cut = False
    try:
        for n in range(rounds):
            for name in names[n % len(names):] + names[:n % len(names)]:
                if time.monotonic() > deadline:
                    cut = True
                    break
                all_lanes, stage1, blobs = VARIANTS[name]
                switches.lanes = switches.started_lanes if all_lanes else 1
                pool.stage1_on_device, switches.blobs_on_device = stage1 and pool.stored_values, blobs
                contender.timings = []
                out = root / f"variant-{n}-{name.replace(' ', '-')}"
                entry: dict[str, Any] = {"round": n, "variant": name, "lanes": switches.lanes,
                                         "on_device": pool.stored_values}
                try:
                    c0, t0 = tree_cpu(contender.engine_pid), time.perf_counter()
                    contender.run(files, out)
                    seconds, c1 = time.perf_counter() - t0, tree_cpu(contender.engine_pid)
                    written = outputs(out)
                    if (written["seg"], written["sr"]) != (len(files), len(files)):
                        raise RuntimeError(f"wrote {written} for {len(files)} images")
                    timings = contender.timings
                    keys = ("prepare", "engine", "engine_upload", "engine_stage1", "engine_blobs",
                            "engine_blobs_device", "engine_masks", "engine_wait")
                    entry |= {"images_per_s": len(files) / seconds, **cpu_per_image(c0, c1, len(files)),
                              "steps": {k: sum(k in t for t in timings) for k in keys},  # images that had it
                              "timings_ms_median": {k: round(statistics.median(t[k] for t in timings if k in t), 2)
                                                    for k in keys if any(k in t for t in timings)}}
                    print(f"  {name}: {entry['images_per_s']:.1f} images/s, "
                          f"{entry['cpu_s_per_image'] * 1000:.0f} CPU-ms an image", flush=True)
                except Exception as exc:  # this run only: the others' numbers stand
                    entry["error"] = f"{type(exc).__name__}: {exc}"
                    print(f"  {name}: failed: {entry['error']}", flush=True)
                finally:
                    shutil.rmtree(out, ignore_errors=True)
                runs.append(entry)
                progress(summary(False))
            if cut:
                break
    finally:
        (pool.stage1_on_device, switches.lanes, switches.blobs_on_device), contender.timings = before, saved
    return summary(cut)


@contextmanager
def py_spy(output: Path | None) -> Iterator[dict[str, Any]]:
    """Sample this process and every descendant (the engine, the CPU workers) with py-spy while the block runs,
    into ``output`` (collapsed stacks, one line per stack with its count; each stack starts with its process):
    where the CPU time goes, per process. Nothing where ``output`` is None or py-spy is not installed."""
    facts: dict[str, Any] = {}
    spy = shutil.which("py-spy") if output is not None else None
    if spy is None or output is None:
        yield facts
        return
    command = [spy, "record", "--pid", str(os.getpid()), "--subprocesses", "--nonblocking", "--rate", "50",
               "--format", "raw", "--output", str(output)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(2.0)  # it attaches to every process first
    try:
        yield facts
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes its file when interrupted
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        facts["profile"] = output.name if output.exists() else f"none (py-spy: {err.strip()[-300:]})"


def steady_latency(scorer: Callable[[Path, str, Path | None], Any], files: list[Path], rate: float,
                   seconds: float, settle: float) -> dict[str, Any]:
    """Offer ``files`` (cycled) at ``rate`` images/s for ``seconds``, open loop: each image is handed over at its
    time whether or not earlier ones are done. Latency is from that time to its SEG + SR bytes (no network, no
    disk); images offered in the first ``settle`` seconds warm the queues and are left out of the percentiles."""
    import pydicom

    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    count = max(1, int(rate * seconds))
    latencies: list[tuple[float, float]] = []  # (offered at, seconds to result)
    failures: list[str] = []
    lock = threading.Lock()

    def one(i: int, due: float) -> None:
        outcome = scorer(files[i % len(files)], uids[i % len(files)], None)  # scoring keeps no state per UID
        done = time.perf_counter()
        with lock:
            if hasattr(outcome, "objects"):
                latencies.append((due - start, done - due))
            else:
                failures.append(f"{outcome.reason}")

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(8, int(rate * 4))) as threads:
        start = time.perf_counter()
        for i in range(count):
            due = start + i / rate
            time.sleep(max(0.0, due - time.perf_counter()))
            threads.submit(one, i, due)
    finished = time.perf_counter() - start
    kept = sorted(lat for at, lat in latencies if at >= settle) or sorted(lat for _, lat in latencies)

    def pct(q: float) -> float:
        return round(1000 * kept[min(len(kept) - 1, int(q * len(kept)))], 1) if kept else float("nan")

    return {"offered_per_s": rate, "offered": count, "seconds": seconds, "settle_s": settle,
            "completed": len(latencies), "failed": len(failures), "failures": failures[:5],
            "achieved_per_s": len(latencies) / finished, "measured": len(kept),
            # served slower than offered: the queue grows for the whole run and the percentiles measure it
            "above_capacity": len(latencies) / finished < 0.95 * rate,
            "latency_ms": {"p50": pct(0.50), "p95": pct(0.95), "p99": pct(0.99), "max": pct(1.0)},
            "note": "engine scorer called directly: decode, both networks, SEG + SR bytes; no C-STORE, no disk"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (${OUT_ENV}, else bench/results)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, 64-px untrained models, 256x256 images: seconds")
    parser.add_argument("--device", default=None, help="default cuda (cpu on the dry run)")
    parser.add_argument("--batch", type=int, default=None, help="network batch for the ceiling and the engine (32)")
    parser.add_argument("--pool-batch", type=int, default=None, help="images per call of each pool worker (4)")
    parser.add_argument("--images", type=int, default=None, help="end-to-end images (256)")
    parser.add_argument("--distinct", type=int, default=32, help="distinct phantoms among them")
    parser.add_argument("--baseline-images", type=int, default=None, help="published baseline images (48)")
    parser.add_argument("--workers", type=int, default=None, help="CPU worker processes (default: all cores)")
    parser.add_argument("--iterations", type=int, default=None, help="timed model calls per stage (20)")
    parser.add_argument("--size", default=None, help="rows x columns of the CRs (2500x2048)")
    parser.add_argument("--train-steps", type=int, nargs=2, default=[800, 600], metavar=("LUNGS", "DISEASE"))
    parser.add_argument("--weights-dir", type=Path, default=None)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--skip", nargs="*", default=[], choices=("ceiling", "baseline", "end_to_end"),
                        help="phases not to run (e.g. measured already on this card)")
    parser.add_argument("--latency-rate", type=float, default=None, help="images/s offered for the latency (50)")
    parser.add_argument("--latency-seconds", type=float, default=None, help="how long they are offered (20)")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                        help="py-spy over the engine and workers during each steady-rate latency run (default: on, "
                        "where py-spy is installed, except on the dry run)")
    parser.add_argument("--variant-rounds", type=int, default=None,
                        help="rounds of end-to-end runs of each engine variant (Stage I's input, lung blobs: on "
                        "the host or the device) on each started engine (2; dry run: 1; 0: none)")
    parser.add_argument("--device-lanes", type=int, default=None,
                        help="lanes the engine starts with (2); the timed pass runs one, the variants all")
    args = parser.parse_args()
    dry = args.dry_run
    args.device = args.device or ("cpu" if dry else "cuda")
    batch = args.batch or (2 if dry else 32)
    pool_batch = args.pool_batch or (2 if dry else 4)
    images = args.images or (8 if dry else 256)  # enough that the workers' CPU shows at 10 ms ticks
    baseline_images = args.baseline_images or (1 if dry else 48)
    workers = args.workers or (1 if dry else (os.cpu_count() or 1))
    if dry:  # one thread each: the shared test machine has 2 cores for everything
        torch.set_num_threads(1)
    iterations = args.iterations or (1 if dry else 20)
    device_lanes = args.device_lanes or 2  # on the CPU (the dry run) the engine starts a lane per core
    args.profile = (not dry) if args.profile is None else args.profile
    variant_rounds = (1 if dry else 2) if args.variant_rounds is None else args.variant_rounds
    rate = args.latency_rate or (4.0 if dry else 50.0)
    offer_s = args.latency_seconds or (1.0 if dry else 20.0)
    rows, cols = (int(v) for v in (args.size or ("256x256" if dry else "2500x2048")).split("x"))
    out = args.out or Path(os.environ.get(OUT_ENV, "bench/results"))
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / ("gpu-dry-run.json" if dry else "gpu.json")
    if args.weights_dir is None:
        from paper_weights import DEFAULT_DIR

        args.weights_dir = DEFAULT_DIR
    started = time.monotonic()
    report: dict[str, Any] = {"started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                              "dry_run": dry, "phases": {}}

    def save() -> None:
        report_path.write_text(json.dumps(report, indent=1))

    def phase(name: str, fn: Callable[[], dict[str, Any] | None], sample_gpu: bool = True) -> dict[str, Any] | None:
        """Run one phase; a failure is recorded and the next phase still runs."""
        if name in args.skip:
            return None
        print(f"== {name} ({time.monotonic() - started:.0f} s into the run)", flush=True)
        sampler = GpuSampler()
        t0 = time.monotonic()
        try:
            with sampler.sampling():
                result = fn()
        except Exception as exc:  # keep the other phases' numbers
            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {exc}"}
        if result is not None:
            result["phase_seconds"] = round(time.monotonic() - t0, 1)
            if sample_gpu:
                result["gpu_utilisation"] = sampler.summary()
            report["phases"][name] = result
            print(json.dumps(result, indent=1, default=str), flush=True)
            save()
        return result

    phase("environment", lambda: environment(args.device), sample_gpu=False)
    with tempfile.TemporaryDirectory(prefix="cxrt-gpu-") as tmp:
        root = Path(tmp)
        holder: dict[str, Any] = {}

        def weights() -> dict[str, Any]:
            holder["settings"], facts = paper_settings(args, root)
            holder["specs"] = model_specs(holder["settings"])
            return facts

        phase("weights", weights, sample_gpu=False)
        if "specs" not in holder:
            raise SystemExit("no weights: nothing else can run")
        settings: InferenceSettings = holder["settings"]
        specs: tuple[ModelSpec, ModelSpec] = holder["specs"]
        ceiling = phase("ceiling", lambda: models_alone(specs, args.device, batch, iterations, compiled=False))

        distinct = make_images(root / "in", min(images, args.distinct), rows, cols)
        files = replicate(distinct, images, root / "in")
        print(f"  {images} images ready ({time.monotonic() - started:.0f} s into the run)", flush=True)

        def baseline() -> dict[str, Any]:
            threads = 1 if dry else (os.cpu_count() or 1)
            published = Published("published as run", specs[0], specs[1], args.device, 1, threads, as_run=True)
            chosen = files[:baseline_images]
            run = measure(published, chosen, root, 0)
            return {"images": len(chosen), "batch": 1, "precision": "fp32", "images_per_s": run["images_per_s"],
                    "cpu_s_per_image": run["cpu_s_per_image"], "outputs": run["outputs"],
                    "lung_px_median": sorted(run["lung_px"])[len(chosen) // 2]}

        phase("baseline", baseline)

        def end_to_end() -> dict[str, Any]:
            engine = engine_available()
            if engine:
                e2e_settings = settings.model_copy(update={"precision": "bf16", "max_batch": batch,
                                                           "device_lanes": device_lanes})
                contender: Any = Engine("engine bf16", e2e_settings, workers, lanes=1)
            else:
                e2e_settings = settings.model_copy(update={"precision": "bf16", "batch_size": pool_batch, "threads": 1})
                contender = Cxrtriage("cxrtriage bf16 pool", e2e_settings, workers)
            # on the same started engine (a pool has no per-image call to offer to): the variants, in rotating
            # order; then the steady-rate latency, profiled: at a steady rate below capacity, where the CPU goes
            def after(c: Any, timed: dict[str, Any]) -> dict[str, Any]:
                with py_spy(out / "profile.txt" if args.profile else None) as facts:
                    done = {"latency": steady_latency(c.scorer, files, rate, offer_s, offer_s / 4) | facts}
                # kept if the run is cut during the variants
                report["phases"]["end_to_end_so_far"] = {"timed": timed, **done}
                save()
                if variant_rounds:
                    def progress(so_far: dict[str, Any]) -> None:
                        report["phases"]["end_to_end_so_far"]["variants"] = so_far
                        save()

                    done["variants"] = variants(c, files, root, variant_rounds, started + VARIANTS_DEADLINE_S,
                                                progress)
                del report["phases"]["end_to_end_so_far"]
                return done
            run = measure(contender, files, root, 0, after=after if engine else None)
            result = {"scorer": "engine" if engine else "ScoringPool", "device_lanes": 1 if engine else None,
                      "workers": workers, "images": images,
                      "distinct_images": len(distinct), "size": [rows, cols],
                      "batch": batch if engine else pool_batch, "precision": "bf16",
                      "images_per_s": run["images_per_s"], "cpu_s_per_image": run["cpu_s_per_image"],
                      "cpu_ms_per_image_by_process": run["cpu_ms_per_image_by_process"],
                      "outputs": run["outputs"], "lung_px_median": sorted(run["lung_px"])[images // 2],
                      "opacity_px_median": sorted(run["opacity_px"])[images // 2]}
            if "after" in run:
                result["steady_latency"] = run["after"]["latency"]
                if "variants" in run["after"]:
                    result["variants"] = run["after"]["variants"]
            if getattr(contender, "timings", None):  # where each image's time went: the engine's steps, the waits
                keys = sorted({k for t in contender.timings for k in t})
                result["timings_ms_median"] = {k: round(statistics.median(t[k] for t in contender.timings if k in t), 2)
                                               for k in keys}
            if ceiling and "images_per_s" in ceiling:
                result["fraction_of_ceiling"] = run["images_per_s"] / ceiling["images_per_s"]
            return result

        phase("end_to_end", end_to_end)
        if not dry and not args.no_compile:
            phase("ceiling_compiled", lambda: models_alone(specs, args.device, batch, iterations, compiled=True))
    report["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    save()
    p = report["phases"]

    def number(name: str, key: str = "images_per_s") -> str:
        value = (p.get(name) or {}).get(key)
        return f"{value:.1f}" if isinstance(value, float) else str((p.get(name) or {}).get("error", "not run"))

    print(f"\n{p['environment'].get('gpu', args.device)}: models-alone ceiling {number('ceiling')} images/s "
          f"(compiled {number('ceiling_compiled')}), end to end {number('end_to_end')} images/s "
          f"({number('end_to_end', 'fraction_of_ceiling')} of the ceiling"
          + "), published baseline "
          f"{number('baseline')} images/s; p95 latency at {rate:g} images/s offered: "
          f"{((p.get('end_to_end') or {}).get('steady_latency') or {}).get('latency_ms', {}).get('p95', 'not run')} ms"
          + "".join(f"; {name}, images/s against the default: "
                    + ", ".join(f"{variant} {ratio:.2f}x" for variant, ratio in v["vs_default"].items())
                    for name, phase_result in p.items() if (v := (phase_result or {}).get("variants")))
          + f"; JSON: {report_path}")


if __name__ == "__main__":
    main()
