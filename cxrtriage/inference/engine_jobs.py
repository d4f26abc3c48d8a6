"""The CPU side of the scoring engine: worker processes around the one process that runs the networks.

:class:`EnginePool` is what a node's scoring threads call, one blocking call per job. How a job goes
depends on where the engine runs:

* **on a device**, three steps: :func:`prepare` in a CPU worker (read, decode, Stage I input; pixels into
  shared memory), the engine (:mod:`.engine`: both networks, the lung masks and the crop, batched across
  jobs), then :func:`finish` in a CPU worker (disease mask at full resolution, zones and scores, SEG + SR
  (+ SC), overlay). Both worker steps reuse the pipeline's and :mod:`.instance`'s functions.
* **on the CPU**, one step: :func:`score_with_engine` in a CPU worker runs the pool's own
  :func:`~.instance.score_instance`, each network call sent to the engine, which batches the calls of
  many jobs (:mod:`.engine_link`). The engine then does nothing that batching cannot pay for.

Either way an image scores the same as through :func:`~.instance.score_instance`.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..config import InferenceSettings
from .engine import EngineError, EngineOutput, ScoringEngine, on_device
from .engine_link import EngineGone, EngineLink, RemotePredictor
from .instance import InstanceRefused, InstanceScored
from .parallel import RestartingPool, steady_heap, threads_per_worker
from .shm import Block, Ring, create_ring, open_block, unlink, write_block, write_slot

if TYPE_CHECKING:
    from .models import ModelSpec
    from .pipeline import Pipeline, ResultBuilder


log = logging.getLogger(__name__)


def _shm_free_bytes() -> int:
    try:
        return shutil.disk_usage("/dev/shm").free
    except OSError:  # no /dev/shm: POSIX shared memory lives elsewhere; do not size a ring by a guess
        return 0


#: torch threads of an engine on a device (not measured yet: the next GPU run's ``engine_upload`` says).
DEVICE_ENGINE_THREADS = 4
#: CPU worker processes per core of an engine on the CPU, each scoring one whole job at a time: a worker waits
#: while the engine runs its networks. On 2 cores 1, 2 and 3 a core gave 0.65x, 0.95x and 0.98x the pool's
#: images/s (``bench/engine_cpu.py --jobs-per-core 1,2,3``, docs/benchmarks.md).
JOBS_PER_CORE = 3
#: Bytes of a ring slot: a 3000 x 3000 16-bit image's stored values (18 MB), Stage I's input and the table.
#: Larger inputs, or ones that also carry the pixels for an overlay, go into a segment of their own.
RING_SLOT_BYTES = 24 << 20


@dataclass(frozen=True)
class Prepared:
    """A decoded image waiting for the engine: its block (see :func:`prepare`) and header facts."""

    block: Block
    path: Path
    source: str
    pixel_spacing_mm: tuple[float, float] | None
    patient_orientation: list[str] | None
    image_laterality: str | None
    sop_instance_uid: str | None
    study_instance_uid: str | None
    seconds: float


@dataclass
class _Worker:
    settings: InferenceSettings
    lung_spec: ModelSpec
    disease_spec: ModelSpec
    build_result: ResultBuilder
    link: EngineLink
    pipeline: Pipeline  # its networks run in the engine (RemotePredictor)


_worker: _Worker | None = None  # one per worker process: the specs, no models


def _start_worker(settings_json: str, threads: int) -> None:
    global _worker
    from .pipeline import Pipeline, ResultBuilder, use_threads
    from .presets import model_specs

    use_threads(threads)
    steady_heap()
    settings = InferenceSettings.model_validate_json(settings_json)
    lung_spec, disease_spec = model_specs(settings)
    link = EngineLink()
    pipeline = Pipeline(settings, RemotePredictor(lung_spec, "lungs", link),
                        RemotePredictor(disease_spec, "disease", link))
    _worker = _Worker(settings, lung_spec, disease_spec, ResultBuilder(settings, lung_spec, disease_spec), link,
                      pipeline)


def _context() -> _Worker:
    assert _worker is not None, "engine worker started without its initializer"
    return _worker


def prepare(path: Path, sop_instance_uid: str, keep_pixels: bool = True, stored_values: bool = False,
            ring_slot: tuple[Ring, int] | None = None, stage1_on_device: bool = False) -> Prepared | InstanceRefused:
    """Read and decode ``path`` and prepare Stage I's input, into shared memory; or why it cannot be scored.

    The block holds ``stage1`` (Stage I's input), the image Stage II crops and, with ``keep_pixels``,
    ``pixels`` unless they are that image (for the overlay and Secondary Capture). The image Stage II crops
    is ``stage2``, float32, or with ``stored_values`` (an engine on a device, which looks it up there) its
    stored values and table where the radiograph keeps them (:meth:`~.radiograph.Radiograph.as_lookup`): half the
    bytes to copy and upload. An engine on the CPU would make the lookup in its one process, which the
    CPU workers around it do better. With ``stage1_on_device`` (``inference.stage1_on_device``) and stored
    values, ``stage1`` is left out where both stages start from the same image: the device engine makes it
    from that image (:func:`~.pipeline.stage1_input`), and this worker makes neither the float image nor its
    resize. With ``ring_slot`` the block goes into that slot of the ring where it fits
    (:func:`~.shm.write_slot`), else into a new segment.
    """
    import pydicom

    from .pipeline import model_inputs, stage_sources
    from .radiograph import RadiographError, radiograph_from_dataset

    t0 = time.perf_counter()
    worker = _context()
    ds = pydicom.dcmread(path)
    try:
        r = radiograph_from_dataset(ds, sop_instance_uid)
    except RadiographError as exc:
        return InstanceRefused(exc.reason, exc.detail)
    lookup = r.as_lookup(worker.disease_spec.equalize) if stored_values else None
    arrays = {"codes": lookup[0], "table": lookup[1]} if lookup is not None else {}
    if not (stage1_on_device and lookup is not None and worker.lung_spec.equalize == worker.disease_spec.equalize):
        stage1, stage2 = stage_sources(r, worker.lung_spec, worker.disease_spec)
        arrays["stage1"] = model_inputs([stage1], worker.lung_spec)[0]
        if lookup is None:
            arrays["stage2"] = stage2
    if keep_pixels and arrays.get("stage2") is not (pixels := r.pixels):  # made here only when asked for
        arrays["pixels"] = pixels
    block = (write_slot(*ring_slot, arrays) if ring_slot is not None else None) or write_block(arrays)
    return Prepared(block, path, r.source, r.pixel_spacing_mm, r.patient_orientation, r.image_laterality,
                    r.sop_instance_uid, r.study_instance_uid, time.perf_counter() - t0)


def finish(
    prepared: Prepared, output: EngineOutput, overlay: Path | None, jpeg2000: bool, secondary_capture: bool
) -> InstanceScored:
    """The engine's output -> the full-resolution masks, scores and the encoded SEG + SR (+ SC), overlay written."""
    import pydicom

    from .instance import encode_result
    from .pipeline import lung_masks, stage2_image
    from .preprocess import CropBox
    from .radiograph import Radiograph, StoredValues

    t0 = time.perf_counter()
    worker = _context()
    ds = pydicom.dcmread(prepared.path, defer_size="1 MB")  # the header; pixel data only if something reads it
    with open_block(prepared.block) as source, open_block(output.block) as engine:
        # the Radiograph gives the shape; the overlay and SC (the only readers of the pixels) get the real
        # ones, which the block holds whenever they are asked for
        stand_in = source["stage2"] if "stage2" in source else StoredValues(source["codes"], source["table"],
                                                                               np.zeros(0, np.int64))
        r = Radiograph(stand_in, prepared.source, prepared.pixel_spacing_mm, prepared.patient_orientation,
                       prepared.image_laterality, prepared.sop_instance_uid, prepared.study_instance_uid)
        # the pipeline's own full-resolution masks (the engine used its device copy for the crop alone)
        lungs, kept = lung_masks(engine["prob"], worker.lung_spec.pixel_threshold,
                                 worker.settings.min_lung_blob_fraction, r.shape)
        timings = {"prepare": prepared.seconds * 1000, "engine": output.seconds * 1000,
                   **{f"engine_{step}": ms for step, ms in output.steps_ms.items()}}
        result = worker.build_result(r, lungs, kept, CropBox(*output.box), engine["seg"].copy(),
                                     output.p_disease, timings)
        t1 = time.perf_counter()
        pixels = (lambda: source["pixels"]) if "pixels" in source else (lambda: stage2_image(source))
        outcome = encode_result(ds, pixels, result, overlay, jpeg2000=jpeg2000, secondary_capture=secondary_capture)
        del r, lungs, kept
    outcome.seconds = {"inference": t1 - t0, "dicom_results": time.perf_counter() - t1}
    return outcome


def score_with_engine(
    path: Path, sop_instance_uid: str, overlay: Path | None, jpeg2000: bool, secondary_capture: bool, address: str,
    ring_slot: tuple[Ring, int] | None,
) -> InstanceScored | InstanceRefused:
    """A whole job in this CPU worker, as a pool worker scores it, but each network call batched in the engine at
    ``address`` (inputs and outputs through ``ring_slot`` where given)."""
    from .instance import score_instance

    worker = _context()
    worker.link.use(address, ring_slot)
    try:
        return score_instance(worker.pipeline, path, sop_instance_uid, overlay, jpeg2000=jpeg2000,
                              secondary_capture=secondary_capture)
    except EngineGone as exc:
        raise EngineError(str(exc)) from None


def _warm(_: int) -> int:
    time.sleep(0.05)  # long enough that the tasks spread over the workers
    return os.getpid()


class EnginePool(RestartingPool):
    """CPU worker processes around one :class:`~.engine.ScoringEngine`; :meth:`score` is one node job.

    ``workers`` 0 means one per core. Blocks are unlinked here, whatever
    happens to the job; a worker pool broken by a dead worker is replaced
    (the jobs in flight fail and are retried), as is a dead engine.
    """

    def __init__(self, settings: InferenceSettings, workers: int = 0, *, engine_threads: int = 0,
                 compile_models: bool | None = None, ring_slots: int | None = None,
                 jobs_per_core: int = 0) -> None:
        self.workers = workers or os.cpu_count() or 1
        self._settings_json = settings.model_dump_json()
        # On the CPU the networks are most of the work: the engine runs one lane per core (engine.serve), each
        # a batch at one torch thread, beside the CPU workers. One batch over many OpenMP threads would have
        # them wait at every barrier for a peer the workers descheduled, at 10x the CPU time (measured: 1.25
        # vs 0.14 CPU-s an image on 2 busy cores). On a device its CPU work is copying each image into pinned
        # memory (page faults included), in its one Python thread: the H100 run found that thread the limit,
        # and torch spreads a large copy over its threads.
        self.stored_values = on_device(settings)  # hand Stage II's image over as stored values (prepare)
        self.networks_only = not self.stored_values  # on the CPU: workers score whole jobs (score_with_engine)
        # inference.stage1_on_device: the device engine makes Stage I's input (the benchmarks flip it between runs)
        self.stage1_on_device = self.stored_values and settings.stage1_on_device
        if self.stored_values:
            threads = engine_threads or settings.threads or max(threads_per_worker(self.workers + 1),
                                                                DEVICE_ENGINE_THREADS)
            lanes = settings.device_lanes
        else:
            threads = engine_threads or settings.threads or 1
            lanes = max(1, (os.cpu_count() or 1) // threads)
        # A worker that scores whole jobs waits while the engine runs its networks: JOBS_PER_CORE of them per
        # core keep the cores busy (one would leave its core idle for the networks' time).
        self.processes = self.workers * ((jobs_per_core or JOBS_PER_CORE) if self.networks_only else 1)
        compile_models = settings.compile if compile_models is None else compile_models  # inference.compile
        self.engine = ScoringEngine(settings, threads=threads, lanes=lanes, compile_models=compile_models,
                                    for_workers=self.networks_only)
        # The images go through a ring of slots, one per job in flight (queued for the engine, in it, or in a
        # worker), mapped once in every process: a new segment per image costs its writer and its reader a page
        # fault per 4 KiB page (a 2048 x 1664 float32 image: 11.0 CPU-ms to write and 3.9 to read through a new
        # segment, 0.7 and 1.6 through a slot; bench/shm_handoff.py); a GPU copies a slot from page-locked memory.
        if ring_slots is None:
            ring_slots = 2 * (settings.max_batch + self.processes)
        room = _shm_free_bytes() // (2 * RING_SLOT_BYTES)  # at most half of /dev/shm: the segments need room too
        if ring_slots > room:  # a container's 64 MB default, say: a write past tmpfs's size kills the writer
            log.warning("ring cut from %d to %d slots: /dev/shm has room for no more (raise it, e.g. docker "
                        "--shm-size)", ring_slots, room)
            ring_slots = room
        self.ring: Ring | None = None
        self._ring_segment = None
        # last in, first out: a job takes the slot freed last, whose pages this process and the workers have
        # mapped and most likely still hold in cache
        self._free_slots: queue.LifoQueue[int] = queue.LifoQueue()
        if ring_slots:
            self.ring, self._ring_segment = create_ring(ring_slots, RING_SLOT_BYTES)
            for slot in reversed(range(ring_slots)):
                self._free_slots.put(slot)
        self.executor = self._start()

    def _start(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.processes, mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker, initargs=(self._settings_json, threads_per_worker(self.workers)),
        )

    def warm_up(self, sample: Path | None = None, timeout: float = 300.0) -> None:
        """Start the engine (models loaded) and every worker; with ``sample``, also run the networks once per
        batch size and score ``sample`` end to end, so that no job pays a first call."""
        self.engine.warm_batches = sample is not None
        self.engine.start()
        seen: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(seen) < self.processes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(seen)} of {self.processes} engine workers started")
            seen.update(f.result() for f in [self._submit(_warm, i) for i in range(self.processes * 2)])
        if sample is not None:  # a burst, so that every worker most likely pays its first prepare and finish
            with ThreadPoolExecutor(2 * self.processes) as threads:
                list(threads.map(lambda i: self.score(sample, f"warm-up-{i}", None), range(2 * self.processes)))

    def score(
        self, path: Path, sop_instance_uid: str, overlay: Path | None = None, *, jpeg2000: bool = False,
        secondary_capture: bool = False,
    ) -> InstanceScored | InstanceRefused:
        """Decode in a worker, both networks in the engine, scores and SEG/SR in a worker; blocks the caller."""
        try:  # a free ring slot, if any: without one the image goes into a segment of its own
            slot = self._free_slots.get_nowait() if self.ring is not None else None
        except queue.Empty:
            slot = None
        try:
            return self._score(path, sop_instance_uid, overlay, jpeg2000, secondary_capture, slot)
        finally:
            if slot is not None:  # the job is over: nothing reads the slot any more
                self._free_slots.put(slot)

    def _score(self, path: Path, sop_instance_uid: str, overlay: Path | None, jpeg2000: bool,
               secondary_capture: bool, slot: int | None) -> InstanceScored | InstanceRefused:
        t0 = time.perf_counter()
        ring_slot = (self.ring, slot) if self.ring is not None and slot is not None else None
        if self.networks_only:
            try:
                return self._submit(score_with_engine, path, sop_instance_uid, overlay, jpeg2000, secondary_capture,
                                    self.engine.worker_address(), ring_slot).result()
            except BrokenProcessPool as exc:
                raise EngineError(f"a scoring worker process died: {exc}") from exc
        try:
            keep_pixels = overlay is not None or secondary_capture
            prepared = self._submit(prepare, path, sop_instance_uid, keep_pixels, self.stored_values,
                                    ring_slot, self.stage1_on_device).result()
        except BrokenProcessPool as exc:
            raise EngineError(f"a scoring worker process died: {exc}") from exc
        if isinstance(prepared, InstanceRefused):
            return prepared
        output: EngineOutput | None = None
        try:
            t_submit = time.perf_counter()
            output = self.engine.submit(prepared.block).result()
            t1 = time.perf_counter()
            outcome: InstanceScored = self._submit(
                finish, prepared, output, overlay, jpeg2000, secondary_capture).result()
        except BrokenProcessPool as exc:
            raise EngineError(f"a scoring worker process died: {exc}") from exc
        finally:
            unlink(prepared.block)
            unlink(output.block if output is not None else None)
        # the wait for the engine (batching, both networks) counts as inference, as in score_instance
        outcome.seconds["inference"] = outcome.seconds.get("inference", 0.0) + (t1 - t0)
        outcome.details["timings_ms"]["engine_wait"] = round((t1 - t_submit) * 1000, 1)  # queue + batch + engine
        return outcome

    def close(self) -> None:
        self.engine.close()
        self.executor.shutdown(wait=True, cancel_futures=True)
        if self._ring_segment is not None:  # the engine and the workers are gone: nobody maps it any more
            self._ring_segment.close()
            self._ring_segment.unlink()
            self._ring_segment = None

    def __enter__(self) -> EnginePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
