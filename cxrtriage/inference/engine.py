"""The scoring engine: one process owns the device and runs both networks on batches formed across jobs.

CPU worker processes decode images and prepare Stage I's input
(:mod:`.engine_jobs`); the engine takes them from any number of jobs, waits
at most ``inference.max_wait_ms`` for a batch of up to
``inference.max_batch``, and runs Stage I, the lung post-processing at model
resolution, the masked crop into Stage II, and Stage II. It returns both
stages' outputs at model resolution and the crop's box; the workers do the
rest (full-resolution lung and disease masks, zones, SEG/SR): what leaves
the engine is a few hundred kilobytes an image, not 5-megapixel masks.
Images and outputs travel in shared memory (:mod:`.shm`): the pipes carry
only block names, shapes, boxes and a few numbers.

With ``inference.device: cpu`` the engine runs the very functions of
:class:`~.pipeline.Pipeline` (same predictors, same OpenCV steps), so its
outputs equal the in-process pipeline's; there the node's CPU workers send
it single network calls instead (:mod:`.engine_link`), since batching
pays for no more than the networks on a CPU. On CUDA it keeps the work on the
device (:mod:`.device_ops`): images read from a ring of page-locked
shared-memory slots (or staged in pinned buffers), copies on their own
stream overlapping Stage I, the lung masks and boxes of a batch in one
pass, batches padded to a few sizes for ``cudnn.benchmark``, bf16 weights,
and optionally ``torch.compile``.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np

from ..config import InferenceSettings
from .engine_link import JOBS, Inbox, accept_workers, answer_calls, listen, remove_socket, socket_dir
from .shm import Block, open_block, write_beside

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The engine could not score an image, or is gone; the job fails with this text and is retried."""


@dataclass(frozen=True)
class EngineOutput:
    """One image's engine result. The block holds ``prob`` (s, s), Stage I's lung probabilities, and ``seg``
    (S, S), Stage II's opacity probabilities in the crop, both float32 at their model's resolution."""

    block: Block
    box: tuple[int, int, int, int]  # top, bottom, left, right of the lung crop in the source image
    p_disease: float
    batch_size: int
    batch: int  # the engine's batch counter: images of one batch share it
    seconds: float  # this image's share of its batch's engine time
    steps_ms: dict[str, float] = field(default_factory=dict)  # its share of each step (StepClock), for benchmarks
    lane: int = 0  # which of the engine's lanes ran its batch (:func:`serve`)


@dataclass(frozen=True)
class EngineReply:
    job: int
    output: EngineOutput | None = None
    error: str | None = None


# --------------------------------------------------------------------------- engine process


#: Threads that find the lung blobs of a batch's images on a device engine (:class:`DeviceStages`).
BLOB_THREADS = min(8, os.cpu_count() or 1)


class EngineSwitches:
    """What a started engine reads before each batch, which its client may change: how many of the lanes it
    started take batches, and whether a device engine finds the lung blobs on the device. Shared memory,
    passed to each engine process the client starts; a benchmark so compares either way on one warm engine
    (``bench/gpu.py``'s variants), where a new engine pays minutes of kernel search."""

    def __init__(self, lanes: int, blobs_on_device: bool) -> None:
        context = multiprocessing.get_context("spawn")
        self.started_lanes = lanes
        self._lanes = context.Value("i", lanes, lock=False)
        self._blobs_on_device = context.Value("b", blobs_on_device, lock=False)

    @property
    def lanes(self) -> int:
        """Lanes taking batches (the others wait): 1 to :attr:`started_lanes`."""
        return int(self._lanes.value)

    @lanes.setter
    def lanes(self, n: int) -> None:
        if not 1 <= n <= self.started_lanes:
            raise ValueError(f"lanes must be 1 to {self.started_lanes}, the lanes the engine started with")
        self._lanes.value = n

    @property
    def blobs_on_device(self) -> bool:
        """``inference.lung_blobs_on_device``, from the next batch on."""
        return bool(self._blobs_on_device.value)

    @blobs_on_device.setter
    def blobs_on_device(self, on: bool) -> None:
        self._blobs_on_device.value = on


class StepClock:
    """Wall time of a batch's steps in the engine's one thread (on a device: up to the host's next sync)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, step: str) -> None:
        now = time.perf_counter()
        self.seconds[step] = self.seconds.get(step, 0.0) + now - self._last
        self._last = now



class HostStages:
    """Both stages on the CPU with the pipeline's own functions: outputs equal :class:`~.pipeline.Pipeline`'s."""

    def __init__(self, settings: InferenceSettings, compile_models: bool = False) -> None:
        from .predictors import make_predictor
        from .presets import model_specs

        lung_spec, disease_spec = model_specs(settings)
        self.settings = settings
        self.lungs, self.disease = (make_predictor(spec, settings.backend, "cpu", settings.precision, compile_models,
                                                   settings.fold_batch_norm) for spec in (lung_spec, disease_spec))
        self._local = threading.local()  # each lane's last batch's steps (lanes run batches at once)

    @property
    def clock(self) -> StepClock:
        """This thread's last batch's steps."""
        clock: StepClock | None = getattr(self._local, "clock", None)
        return clock if clock is not None else StepClock()

    def network(self, name: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """One network on a batch of its inputs, for CPU workers that do the rest (:mod:`.engine_link`)."""
        return (self.lungs if name == "lungs" else self.disease)(x)

    def warm(self, max_batch: int) -> None:
        """Run both networks once per batch size, so that no job pays a kernel choice for a new shape."""
        for model in (self.lungs, self.disease):
            spec = model.spec
            for n in range(1, max_batch + 1):
                model(np.zeros((n, spec.in_channels, spec.input_size, spec.input_size), dtype=np.float32))

    def __call__(self, images: list[dict[str, np.ndarray]]) -> list[tuple[dict[str, np.ndarray], tuple[int, ...],
                                                                           float] | Exception]:
        from .pipeline import lung_crop, model_inputs, stage1_input, stage2_image

        lung_spec, disease_spec = self.lungs.spec, self.disease.spec
        clock = self._local.clock = StepClock()
        probs, _ = self.lungs(np.stack([stage1_input(im, lung_spec) for im in images]))
        clock.mark("stage1")
        crops: list[Any] = []
        for im, prob in zip(images, probs):
            try:
                crops.append((lung_crop(stage2_image(im), prob, lung_spec.pixel_threshold,
                                        self.settings.min_lung_blob_fraction, self.settings.crop_margin), prob))
            except Exception as exc:  # this image only; the others of the batch go on
                crops.append(exc)
        good = [c[0] for c in crops if not isinstance(c, Exception)]
        clock.mark("crop")
        seg, p = self.disease(model_inputs([c.crop for c in good], disease_spec)) if good else (None, None)
        clock.mark("stage2")
        if p is None and seg is not None:  # a segmentation-only Stage II model: gate on the mask itself
            p = np.array([float(s.max()) for s in seg])

        def output(crop: Any, i: int) -> tuple[dict[str, np.ndarray], tuple[int, ...], float]:
            box = crop[0].box
            assert seg is not None and p is not None
            return {"prob": crop[1], "seg": seg[i]}, (box.top, box.bottom, box.left, box.right), float(p[i])

        return in_batch_order(crops, output)


def in_batch_order(crops: list[Any], output: Callable[[Any, int], Any]) -> list[Any]:
    """Each image's outcome in batch order: the exception it failed with, or ``output(crop, i)``, ``i`` its
    index in Stage II's batch (which held the images that did not fail)."""
    out: list[Any] = []
    good = 0
    for crop in crops:
        if isinstance(crop, Exception):
            out.append(crop)
        else:
            out.append(output(crop, good))
            good += 1
    return out


class _Lane:
    """What one engine lane of :class:`DeviceStages` keeps to itself: its streams, staging buffers, step clock."""

    def __init__(self, torch: Any, device: Any) -> None:
        self.compute = torch.cuda.Stream(device)  # its own: a wait for this lane's batch never waits for another's
        self.copy = torch.cuda.Stream(device)
        self.pinned: dict[str, Any] = {}  # reused page-locked staging buffers, free again when a batch ends
        self.clock = StepClock()  # its last batch's steps


class DeviceStages:
    """Both stages on a CUDA device; Stage I post-processing and the crop stay on the device.

    Cannot run on the CPU-only machines the tests use; its torch steps are
    :mod:`.device_ops`, which the tests check against the CPU path. Thread-safe for the engine's lanes
    (``inference.device_lanes``): each calling thread gets its own streams and buffers (:class:`_Lane`), so
    one lane's host work (blobs, outputs, the next batch's hand-off) runs while the GPU runs another's batch.
    """

    def __init__(self, settings: InferenceSettings, device: Any, compile_models: bool = False,
                 switches: EngineSwitches | None = None) -> None:
        import torch

        from .device_ops import batch_buckets
        from .predictors import compile_for_inference, inference_model
        from .presets import model_specs

        torch.backends.cudnn.benchmark = True  # one kernel search per batch shape: few shapes (batch_buckets)
        self.buckets = batch_buckets(settings.max_batch)
        self.torch = torch
        self.settings = settings
        self.device = device
        self.dtype = torch.bfloat16 if settings.precision == "bf16" else torch.float32
        self.lung_spec, self.disease_spec = model_specs(settings)
        self.models = []
        for spec in (self.lung_spec, self.disease_spec):
            model, _ = inference_model(spec, device, self.dtype, settings.fold_batch_norm)
            if compile_models:  # CUDA graphs per batch shape; the first batch of each size compiles
                model = compile_for_inference(model, device)
            self.models.append(model)
        self._lanes = threading.local()
        self._rings_lock = threading.Lock()
        # on the device once: a copy from the host syncs the stream
        self.lung_stats, self.disease_stats = (
            tuple(torch.tensor(v, dtype=torch.float32, device=device) for v in spec.channel_stats())
            for spec in (self.lung_spec, self.disease_spec))
        # each image's lung blobs at model resolution on threads (OpenCV and scipy's labelling let go of the
        # GIL): about 4 CPU-ms an image at the paper's 512 px (bench/lung_blobs.py), one after another a large
        # part of the engine's 11.3 ms "crop" step an image on an H200 (docs/benchmarks.md, GPU)
        self.blob_threads = ThreadPoolExecutor(max_workers=BLOB_THREADS, thread_name_prefix="engine-blobs")
        # or on the device (inference.lung_blobs_on_device), read per batch
        self.switches = switches or EngineSwitches(settings.device_lanes, settings.lung_blobs_on_device)
        self.rings: dict[str, tuple[int, int] | None] = {}  # ring name -> registered (address, size), or None

    @property
    def lane(self) -> _Lane:
        """The calling thread's lane, made on its first batch."""
        lane: _Lane | None = getattr(self._lanes, "lane", None)
        if lane is None:
            lane = self._lanes.lane = _Lane(self.torch, self.device)
        return lane

    @property
    def clock(self) -> StepClock:
        """This thread's last batch's steps."""
        return self.lane.clock

    def _pin_rings(self) -> None:
        """Register every ring this process has mapped with CUDA, once (page-locked: the GPU copies from it)."""
        import ctypes

        from .shm import ring_mappings

        with self._rings_lock:  # two lanes meeting a new ring register it once
            for name, segment in ring_mappings().items():
                if name in self.rings:
                    continue
                buffer = segment.buf
                assert buffer is not None
                address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))  # the mapping lives as long
                error = int(self.torch.cuda.cudart().cudaHostRegister(address, segment.size, 0))
                self.rings[name] = (address, segment.size) if error == 0 else None
                if error:
                    log.warning("ring %s not page-locked (cudaError %d): its images are staged by copying", name,
                                error)

    def _in_pinned_ring(self, array: np.ndarray) -> bool:
        start = array.__array_interface__["data"][0]
        return array.flags.c_contiguous and any(
            r is not None and r[0] <= start and start + array.nbytes <= r[0] + r[1] for r in self.rings.values())

    def _staging(self, key: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """A reused page-locked host array of ``shape``: written in place and copied without staging, it
        costs no fresh pages (a batch's 64 MB of blob planes: 5.4 instead of 9.9 ms, bench/lung_blobs.py) and
        the copy to the device needs no pageable staging."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        pinned = self.lane.pinned
        buffer = pinned.get(key)
        if buffer is None or buffer.numel() < nbytes:
            buffer = pinned[key] = self.torch.empty(nbytes, dtype=self.torch.uint8, pin_memory=True)
        return np.asarray(buffer[:nbytes].numpy()).view(dtype).reshape(shape)

    def _upload(self, key: str, array: np.ndarray) -> Any:
        """``array`` (any dtype) to the device on the copy stream, asynchronously: straight from a page-locked
        ring slot, else staged in a reused pinned buffer."""
        torch = self.torch
        source = torch.from_numpy(np.ascontiguousarray(array))
        if self._in_pinned_ring(array):
            with torch.cuda.stream(self.lane.copy):
                return source.to(self.device, non_blocking=True)
        host = self._staging(key, array.shape, array.dtype)
        torch.from_numpy(host).copy_(source)  # torch spreads a large copy over the engine's threads
        with torch.cuda.stream(self.lane.copy):
            return torch.from_numpy(host).to(self.device, non_blocking=True)

    def _upload_source(self, i: int, im: dict[str, np.ndarray]) -> Any:
        """Stage II's source image on the device, float32: uploaded, or looked up there from its stored values
        (half the bytes of a 16-bit image; :meth:`~.radiograph.Radiograph.as_lookup`)."""
        if "stage2" in im:
            return self._upload(f"source{i}", np.asarray(im["stage2"], dtype=np.float32))
        codes = self._upload(f"codes{i}", im["codes"])
        table = self._upload(f"table{i}", im["table"])
        with self.torch.cuda.stream(self.lane.copy):
            return table[codes.to(self.torch.int32)]

    def _upload_planes(self, n: int, kept: list[list[np.ndarray]], size: tuple[int, ...]) -> Any:
        """Images' blobs found on the host, as (N, K, s, s) on the device (all-zero planes where an image has
        fewer than K), through a reused pinned buffer on the copy stream."""
        planes = self._staging(f"planes{n}", (len(kept), max(len(blobs) for blobs in kept), *size), np.float32)
        for j, blobs in enumerate(kept):
            for k in range(planes.shape[1]):
                planes[j, k] = blobs[k] if k < len(blobs) else 0.0
        with self.torch.cuda.stream(self.lane.copy):
            return self.torch.from_numpy(planes).to(self.device, non_blocking=True)

    def _wait_for(self, stream: Any) -> None:
        """Block this thread until the work queued on ``stream`` so far is done, asleep: a blocking event
        (cudaEventBlockingSync), where a tensor copy or stream sync would spin a CPU core for the whole wait,
        the tens of milliseconds of a network's batch."""
        event = self.torch.cuda.Event(blocking=True)
        event.record(stream)
        event.synchronize()

    def _run(self, model: Any, x: Any) -> tuple[Any, Any]:
        from .device_ops import pad_to_bucket

        torch = self.torch
        n = x.shape[0]
        x = pad_to_bucket(x.to(self.dtype), self.buckets).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            out = model(x)
        seg, cls = out if isinstance(out, tuple) else (out, None)
        seg, cls = seg[:n], (cls[:n] if cls is not None else None)
        probs = torch.sigmoid(seg.float())[:, 0]
        return probs, (torch.sigmoid(cls.float())[:, 0] if cls is not None else probs.amax(dim=(1, 2)))

    def warm(self, max_batch: int) -> None:
        """One pass per batch bucket: cudnn's kernel search (and compilation, when on) before the first job."""
        torch = self.torch
        for model, spec in zip(self.models, (self.lung_spec, self.disease_spec)):
            for n in self.buckets:
                self._run(model, torch.zeros(n, spec.in_channels, spec.input_size, spec.input_size,
                                             device=self.device))
        torch.cuda.synchronize(self.device)

    def __call__(self, images: list[dict[str, np.ndarray]]) -> list[tuple[dict[str, np.ndarray], tuple[int, ...],
                                                                           float] | Exception]:
        lane = self.lane
        lane.clock = StepClock()
        with self.torch.cuda.stream(lane.compute):  # every kernel of this batch on this lane's stream
            try:
                return self._batch(images, lane)
            except Exception:
                self._drain(lane)
                raise

    def _drain(self, lane: _Lane) -> None:
        """After a failed batch: wait until its kernels and copies are done, so that the lane's next batch
        does not refill pinned buffers a copy still reads (a broken device raises here too; the batch's own
        error is the one that counts)."""
        try:
            self._wait_for(lane.compute)
            self._wait_for(lane.copy)
        except Exception as exc:
            log.warning("a failed batch's streams could not be waited for: %s", type(exc).__name__)

    def _batch(self, images: list[dict[str, np.ndarray]], lane: _Lane) -> list[
            tuple[dict[str, np.ndarray], tuple[int, ...], float] | Exception]:
        from .device_ops import boxes_of, crop_to_input, lung_blobs_batch, lung_masks_batch, model_input
        from .pipeline import lung_kernel, model_blobs

        torch = self.torch
        clock = lane.clock
        self._pin_rings()  # a ring first seen in this batch (its blocks were opened by _run_batch)
        compute = lane.compute
        # each image's Stage I input from its own block (a ring slot: straight to the GPU), stacked there
        uploads = [self._upload(f"stage1_{i}", im["stage1"]) if "stage1" in im else None
                   for i, im in enumerate(images)]
        if all(x is not None for x in uploads):
            with torch.cuda.stream(lane.copy):
                x1 = torch.stack(uploads)
            x1_ready = lane.copy.record_event()
            sources = [self._upload_source(i, im) for i, im in enumerate(images)]
            compute.wait_event(x1_ready)  # the full-resolution copies go on while Stage I runs
        else:  # inference.stage1_on_device: Stage I's input made here, from the full-resolution images
            sources = [self._upload_source(i, im) for i, im in enumerate(images)]
            compute.wait_stream(lane.copy)
            size = self.lung_spec.input_size
            x1 = torch.stack([x if x is not None else model_input(source, size, *self.lung_stats)
                              for x, source in zip(uploads, sources)])
        clock.mark("upload")  # the host's part: staging into pinned memory
        probs, _ = self._run(self.models[0], x1)
        self._wait_for(compute)
        host_probs = probs.cpu().numpy()  # model resolution: for the workers, and for blobs found on the host
        clock.mark("stage1")
        crops: list[Any] = [None] * len(images)
        kept: dict[int, list[np.ndarray]] = {}
        by_shape: dict[tuple[int, ...], list[int]] = {}  # one batched mask + box pass per image size
        threshold, min_fraction = self.lung_spec.pixel_threshold, self.settings.min_lung_blob_fraction
        # (N, 2, s, s) on the device, or None: on the host's threads (also where the labelling did not settle)
        on_device = None
        if self.switches.blobs_on_device:
            try:
                on_device = lung_blobs_batch(probs, threshold, min_fraction, lung_kernel(tuple(probs.shape[1:])))
            except Exception as exc:  # out of device memory, say: the host's threads find them
                log.warning("lung blobs on the device failed, found on the host: %s", type(exc).__name__)
        blobs = [] if on_device is not None else [
            self.blob_threads.submit(model_blobs, prob, threshold, min_fraction) for prob in host_probs]
        for i in range(len(images)):
            try:
                if on_device is None:
                    kept[i] = blobs[i].result()
                by_shape.setdefault(tuple(sources[i].shape), []).append(i)
            except Exception as exc:  # this image only
                crops[i] = exc
        clock.mark("blobs" if on_device is None else "blobs_device")
        masks_of: dict[tuple[int, ...], tuple[Any, list[Any]]] = {}
        for n, (shape, members) in enumerate(by_shape.items()):
            try:
                if on_device is not None:  # views of its images: no index copied from the host
                    uploaded = on_device if len(members) == len(images) else torch.stack(
                        [on_device[i] for i in members])
                else:
                    uploaded = self._upload_planes(n, [kept[i] for i in members], host_probs.shape[1:])
                compute.wait_stream(lane.copy)  # the planes, and the full-resolution images before them
                # full resolution stays here, for the crop only: the workers make the masks from ``prob``
                masks = lung_masks_batch(uploaded, (shape[0], shape[1]), threshold)
                masks_of[shape] = masks, boxes_of(masks, self.settings.crop_margin)
            except Exception as exc:  # the images of this size
                for i in members:
                    crops[i] = exc
        clock.mark("masks")
        for shape, (masks, boxes) in masks_of.items():
            for j, i in enumerate(by_shape[shape]):
                try:
                    x = crop_to_input(sources[i], masks[j], boxes[j], self.disease_spec.input_size,
                                      *self.disease_stats)
                    crops[i] = (host_probs[i], boxes[j], x)
                except Exception as exc:  # this image only
                    crops[i] = exc
        good = [c for c in crops if not isinstance(c, Exception)]
        clock.mark("crop")
        seg = p = None
        if good:
            seg, p = self._run(self.models[1], torch.stack([c[2] for c in good]))
            self._wait_for(compute)
            seg, p = seg.cpu().numpy(), p.cpu().numpy()
        clock.mark("stage2")

        def output(crop: Any, i: int) -> tuple[dict[str, np.ndarray], tuple[int, ...], float]:
            prob, box, _ = crop
            assert seg is not None and p is not None
            return {"prob": prob, "seg": seg[i]}, (box.top, box.bottom, box.left, box.right), float(p[i])

        out = in_batch_order(crops, output)
        self._wait_for(lane.copy)  # the pinned buffers are free for the next batch
        return out


def on_device(settings: InferenceSettings) -> bool:
    """Whether the engine runs :class:`DeviceStages` (CUDA, torch backend) rather than :class:`HostStages`."""
    from .predictors import resolve_backend, resolve_device

    backend = resolve_backend(settings.backend, settings.device, settings.precision, settings.compile)
    return resolve_device(settings.device).type == "cuda" and backend == "torch"


def make_stages(settings: InferenceSettings, compile_models: bool = False,
                switches: EngineSwitches | None = None) -> HostStages | DeviceStages:
    if on_device(settings):
        from .predictors import resolve_device

        return DeviceStages(settings, resolve_device(settings.device), compile_models, switches)
    return HostStages(settings, compile_models)


def _read_jobs(requests: Connection, inbox: Inbox) -> None:
    """Thread: the scoring client's whole jobs into ``inbox``; its ``None`` (or its going) closes the inbox."""
    while True:
        try:
            item = requests.recv()
        except (EOFError, OSError):  # the client is gone
            item = None
        if item is None:
            inbox.close()
            return
        inbox.put(JOBS, item)


def _run_batch(stages: HostStages | DeviceStages, batch: list[tuple[int, Block]], number: int,
               lane: int = 0) -> list[EngineReply]:
    t0 = time.perf_counter()
    replies: dict[int, EngineReply] = {}
    images: list[dict[str, np.ndarray]] = []
    jobs: list[int] = []
    opened = []
    try:
        for job, block in batch:
            try:
                context = open_block(block)
                images.append(context.__enter__())
                opened.append(context)
                jobs.append(job)
            except Exception as exc:  # e.g. the block is gone: this job fails, the batch goes on
                replies[job] = EngineReply(job, error=f"input not readable: {type(exc).__name__}: {exc}")
        t1 = time.perf_counter()
        results = stages(images) if images else []
    finally:
        for context in opened:
            context.__exit__(None, None, None)
    n = max(1, len(batch))
    steps = {"open": (t1 - t0) * 1000 / n}
    if images:
        steps |= {step: seconds * 1000 / n for step, seconds in stages.clock.seconds.items()}
    t2 = time.perf_counter()
    inputs = dict(batch)
    blocks = {job: write_beside(inputs[job], r[0]) for job, r in zip(jobs, results) if not isinstance(r, Exception)}
    steps["outputs"] = (time.perf_counter() - t2) * 1000 / n
    share = (time.perf_counter() - t0) / n
    for job, result in zip(jobs, results):
        if isinstance(result, Exception):
            replies[job] = EngineReply(job, error=f"{type(result).__name__}: {result}")
            continue
        _, box, p = result
        output = EngineOutput(blocks[job], (box[0], box[1], box[2], box[3]), p, len(batch), number, share, steps,
                              lane)
        replies[job] = EngineReply(job, output=output)
    return [replies[job] for job, _ in batch]


def _answer(stages: HostStages | DeviceStages, batch: list[tuple[int, Block]], number: int,
            lane: int) -> list[EngineReply]:
    try:
        return _run_batch(stages, batch, number, lane)
    except Exception as exc:  # a failure of the whole batch (a network error): each job says why
        text = f"{type(exc).__name__}: {exc}"
        log.error("engine batch failed: %s", traceback.format_exc())
        return [EngineReply(job, error=text) for job, _ in batch]


#: The most images in one batch of an engine on the CPU. At one thread the bundled networks cost the least per
#: image at batches of 2-4, about 10 % more at 1 or 8 (``bench/engine_cpu.py --networks``); small batches leave
#: images for the other lanes (:func:`serve`): the engine reached 0.83x the pool's images/s with 2, 0.75x with 4.
CPU_MAX_BATCH = 2


#: How often a parked lane (:class:`EngineSwitches`) looks whether it may take batches again.
PARKED_LANE_POLL_S = 0.05


def serve(
    settings_json: str, requests: Connection, replies: Connection, threads: int, compile_models: bool, warm: bool,
    lanes: int = 1, address: str | None = None, switches: EngineSwitches | None = None,
) -> None:
    """The engine process: load the models (with ``warm``, run each batch size once), say ready, then batch
    until told to stop or the client goes.

    Work comes from the client's pipe (whole jobs) and, with ``address``, from CPU workers over a Unix socket
    (single network calls, :mod:`.engine_link`); a batch holds one kind. ``lanes`` threads take batches in turn
    and run them at the same time, each with ``threads`` torch threads. On the CPU the node gives one lane per
    core at one thread each: as many images' networks at once as the pool's processes run, where one batch
    over all cores would have OpenMP threads waiting at every barrier for a peer that the CPU workers have
    descheduled. On a device ``inference.device_lanes`` lanes share it, each on its own streams: one lane's
    host work runs while the GPU runs another's batch."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    settings = InferenceSettings.model_validate_json(settings_json)
    try:
        stages = make_stages(settings, compile_models, switches)
        on_cpu = isinstance(stages, HostStages)
        max_batch = min(settings.max_batch, CPU_MAX_BATCH) if on_cpu else settings.max_batch
        if warm or (compile_models and lanes > 1):  # lanes must not compile one graph at once
            stages.warm(max_batch)
        listener = listen(address) if address is not None and on_cpu else None
    except Exception as exc:
        replies.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    inbox = Inbox()
    threading.Thread(target=_read_jobs, args=(requests, inbox), name="engine-jobs", daemon=True).start()
    if listener is not None:
        threading.Thread(target=accept_workers, args=(listener, inbox), name="engine-accept", daemon=True).start()
    replies.send(("ready", type(stages).__name__))
    max_wait = settings.max_wait_ms / 1000.0
    taking, sending = threading.Lock(), threading.Lock()  # one lane forms a batch at a time; replies whole
    numbers = itertools.count(1)

    def lane(index: int) -> None:
        while True:
            with taking:  # looked at here, so that once a lane is parked it takes nothing more
                parked = switches is not None and index >= switches.lanes  # by the client (EngineSwitches)
                if not parked:
                    taken = inbox.take(max_batch, max_wait)
                    number = next(numbers)
            if parked:
                if inbox.closed:
                    return
                time.sleep(PARKED_LANE_POLL_S)
                continue
            if taken is None:
                return
            kind, batch = taken
            if kind == JOBS:
                out: list[Any] = _answer(stages, batch, number, index)
            else:
                assert isinstance(stages, HostStages)  # only a CPU engine listens for network calls
                answer_calls(stages.network, kind, batch)
                out = [("batch", len(batch))]  # for the client's count of batch sizes
            try:
                with sending:
                    for reply in out:
                        replies.send(reply)
            except OSError:  # the client is gone
                inbox.close()
                return

    others = [threading.Thread(target=lane, args=(n,), name=f"engine-lane-{n}", daemon=True)
              for n in range(1, lanes)]
    for thread in others:
        thread.start()
    lane(0)
    for thread in others:
        thread.join()


# --------------------------------------------------------------------------- client


@dataclass
class _Link:
    """One engine process, its request pipe, and the jobs it owes."""

    process: multiprocessing.process.BaseProcess
    requests: Connection
    pending: dict[int, Future[EngineOutput]]
    address: str | None = None  # its Unix socket for CPU workers' network calls (:mod:`.engine_link`)


class ScoringEngine:
    """The client of one engine process: :meth:`submit` a block, get a future of its :class:`EngineOutput`.

    Thread-safe. An engine that dies fails every job in flight with an
    :class:`EngineError` (no job waits forever); the next :meth:`submit`
    starts a new one. :attr:`batch_sizes` counts the batches by size. With ``for_workers`` it also listens for
    CPU workers' network calls (:meth:`worker_address`; a CPU engine only).
    """

    def __init__(self, settings: InferenceSettings, *, threads: int = 0, lanes: int = 1,
                 compile_models: bool = False, start_timeout: float = 300.0, for_workers: bool = False) -> None:
        self.settings = settings
        self.for_workers = for_workers
        self.threads = threads
        self.lanes = lanes  # batches run at once (:func:`serve`)
        self.compile_models = compile_models
        self.start_timeout = start_timeout
        self.warm_batches = False  # run every batch size once at start (a few seconds; the node's warm-up asks)
        self.batch_sizes: Counter[int] = Counter()
        self.switches = EngineSwitches(lanes, settings.lung_blobs_on_device)  # shared with each engine it starts
        self.stages = ""
        self._lock = threading.Lock()
        self._next_job = 0
        self._last_batch: tuple[int, int] | None = None
        self._link: _Link | None = None
        self._closing = False

    @property
    def pid(self) -> int | None:
        return self._link.process.pid if self._link is not None else None

    def start(self) -> None:
        with self._lock:
            self._ensure_started()

    def worker_address(self) -> str:
        """The socket CPU workers send network calls to, of the engine now running (started if need be)."""
        with self._lock:
            if self._closing:
                raise EngineError("scoring engine is closed")
            address = self._ensure_started().address
        if address is None:
            raise EngineError("this scoring engine takes whole jobs only")
        return address

    def _ensure_started(self) -> _Link:
        if self._link is not None and self._link.process.is_alive():
            return self._link
        context = multiprocessing.get_context("spawn")  # no fork of a threaded torch
        requests_read, requests_write = context.Pipe(duplex=False)
        replies_read, replies_write = context.Pipe(duplex=False)
        address = os.path.join(socket_dir(), "engine.sock") if self.for_workers else None
        process = context.Process(
            target=serve, name="cxrtriage-engine", daemon=True,
            args=(self.settings.model_dump_json(), requests_read, replies_write, self.threads, self.compile_models,
                  self.warm_batches, self.lanes, address, self.switches),
        )
        process.start()
        requests_read.close()
        replies_write.close()
        ready = wait([replies_read, process.sentinel], timeout=self.start_timeout)
        message = replies_read.recv() if replies_read in ready and replies_read.poll() else None
        if not (isinstance(message, tuple) and message[0] == "ready"):
            process.kill()
            process.join(5)
            requests_write.close()
            replies_read.close()
            remove_socket(address)
            why = message[1] if isinstance(message, tuple) else f"exit code {process.exitcode}"
            raise EngineError(f"scoring engine did not start: {why}")
        self.stages = message[1]
        link = self._link = _Link(process, requests_write, {}, address)
        threading.Thread(target=self._dispatch, args=(link, replies_read), name="engine-replies",
                         daemon=True).start()
        return link

    def submit(self, block: Block) -> Future[EngineOutput]:
        future: Future[EngineOutput] = Future()
        with self._lock:
            if self._closing:
                raise EngineError("scoring engine is closed")
            link = self._ensure_started()
            job, self._next_job = self._next_job, self._next_job + 1
            link.pending[job] = future
            try:
                link.requests.send((job, block))
            except OSError as exc:  # the engine died between the check and the send
                link.pending.pop(job, None)
                raise EngineError(f"scoring engine is gone: {exc}") from exc
        return future

    def _dispatch(self, link: _Link, replies: Connection) -> None:
        """Resolve futures as replies come; when the process ends, fail what it still owed."""
        while True:
            wait([replies, link.process.sentinel])
            try:
                if replies.poll():
                    reply = replies.recv()
                    if isinstance(reply, EngineReply):
                        self._resolve(link, reply)
                    elif isinstance(reply, tuple) and reply[0] == "batch":  # a batch of CPU workers' calls
                        with self._lock:
                            self.batch_sizes[reply[1]] += 1
                    continue
            except (EOFError, OSError):
                break  # the engine closed its end: it is exiting
            if not link.process.is_alive():
                break
        link.process.join(5)
        replies.close()
        remove_socket(link.address)
        with self._lock:
            if self._link is link:
                self._link = None
            owed = list(link.pending.values())
            link.pending.clear()
            link.requests.close()
        if owed and not self._closing:
            log.error("scoring engine exited with code %s; %d jobs failed", link.process.exitcode, len(owed))
        for future in owed:
            future.set_exception(EngineError(
                f"scoring engine process exited (code {link.process.exitcode}) before answering; the job is retried"))

    def _resolve(self, link: _Link, reply: EngineReply) -> None:
        with self._lock:
            future = link.pending.pop(reply.job, None)
            output = reply.output
            if output is not None and (link.process.pid, output.batch) != self._last_batch:
                self._last_batch = (link.process.pid or 0, output.batch)
                self.batch_sizes[output.batch_size] += 1
        if future is None:
            return
        if output is not None:
            future.set_result(output)
        else:
            future.set_exception(EngineError(f"scoring engine: {reply.error}"))

    def close(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._closing = True
            link = self._link
        if link is None:
            return
        try:
            link.requests.send(None)
        except OSError:
            pass
        link.process.join(timeout)
        if link.process.is_alive():
            link.process.kill()
            link.process.join(5)
        remove_socket(link.address)
