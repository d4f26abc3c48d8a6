"""Scoring on several worker processes, so that every core stays busy.

Decoding, full-resolution post-processing and SEG/SR encoding are Python and
numpy work that holds the GIL; the networks are torch work that releases it
but scales imperfectly over threads. A pool of worker processes, each running
the whole chain for a small batch of files (decode, Stage I, Stage II,
scoring, SEG + SR) with ``cores // workers`` torch threads, overlaps one
batch's encoding with another's networks. Each worker loads the models once.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from ..config import InferenceSettings
from .instance import InstanceRefused, InstanceScored, score_instance
from .score_files import FileOutcome, score_batch

_pipeline = None  # one per worker process


def steady_heap() -> None:
    """Keep this worker's freed image buffers in its heap (glibc): a fixed mmap threshold of 64 MB and a trim
    threshold of 256 MB.

    By default glibc maps each large array (an image, a mask) on its own and gives it back when freed, or
    trims the heap's top, so the next image faults in and zeroes its pages again: the scoring engine's CPU
    workers, three a core and idle while the engine runs their networks, spent several times the pool's
    kernel CPU on it; with these thresholds both spend about 3 ms an image there (``bench/engine_cpu.py``'s
    kernel column, docs/benchmarks.md). Fixed thresholds also stop glibc's own adjustment.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to set
        return
    libc.mallopt(M_MMAP_THRESHOLD, 64 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def _start_worker(settings_json: str) -> None:
    global _pipeline
    from .pipeline import Pipeline

    steady_heap()
    _pipeline = Pipeline(InferenceSettings.model_validate_json(settings_json))


def _score_in_worker(
    items: list[tuple[int, Path]], out_dir: Path, dicom: bool, jpeg2000: bool, overlay: bool
) -> list[FileOutcome]:
    assert _pipeline is not None, "worker started without a pipeline"
    return score_batch(_pipeline, items, out_dir, dicom=dicom, jpeg2000=jpeg2000, overlay=overlay)


def _score_instance_in_worker(
    path: Path, sop_instance_uid: str, overlay: Path | None, jpeg2000: bool, secondary_capture: bool = False
) -> InstanceScored | InstanceRefused:
    assert _pipeline is not None, "worker started without a pipeline"
    return score_instance(_pipeline, path, sop_instance_uid, overlay, jpeg2000=jpeg2000,
                          secondary_capture=secondary_capture)


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    return max(1, (cores or os.cpu_count() or 1) // workers)


class RestartingPool:
    """Worker processes (``executor``, made by :meth:`_start`) that start again when one has died.

    A dead worker (killed for memory, say) breaks a ``ProcessPoolExecutor``: the
    jobs in flight fail and are retried by the queue; the next submission starts
    a new pool rather than failing too.
    """

    executor: ProcessPoolExecutor

    def _start(self) -> ProcessPoolExecutor:
        raise NotImplementedError

    def _submit(self, fn: Any, *args: Any) -> Future[Any]:
        try:
            return self.executor.submit(fn, *args)
        except BrokenProcessPool:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = self._start()
            return self.executor.submit(fn, *args)


class ScoringPool(RestartingPool):
    """``workers`` processes scoring files; results come back in input order.

    Use as a context manager. :meth:`warm_up` waits until every worker has
    loaded its models (a few seconds), so that timings exclude start-up.
    """

    def __init__(self, settings: InferenceSettings, workers: int = 2) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self.batch_size = settings.batch_size
        threads = settings.threads or threads_per_worker(workers)
        self._settings_json = settings.model_copy(update={"threads": threads}).model_dump_json()
        self.executor = self._start()

    def _start(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),  # no fork of a threaded torch
            initializer=_start_worker,
            initargs=(self._settings_json,),
        )

    def warm_up(self, sample: Path | None = None, timeout: float = 300.0) -> None:
        """Return once every worker has answered, so has loaded its models.

        With a ``sample`` DICOM file, each worker also scores a batch of it
        (SEG + SR to a scratch folder), paying its first-call costs
        (kernel selection for the batch shape, highdicom's first object) now.
        """
        seen: set[int] = set()
        deadline = time.monotonic() + timeout
        with tempfile.TemporaryDirectory(prefix="cxrtriage-warm-") as scratch:
            while len(seen) < self.workers:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {len(seen)} of {self.workers} scoring workers started")
                tasks = [self.executor.submit(_warm_worker, sample, Path(scratch), self.batch_size)
                         for _ in range(self.workers * 2)]
                seen.update(task.result() for task in tasks)

    def map(
        self, files: Iterable[Path], out_dir: Path, *, dicom: bool = True, jpeg2000: bool = False,
        overlay: bool = False,
    ) -> Iterator[FileOutcome]:
        """Score ``files`` in batches of ``batch_size``, two batches per worker in flight.

        Yields in input order.
        """
        out_dir.mkdir(parents=True, exist_ok=True)
        numbered = list(enumerate(files))
        pending: deque[Future[list[FileOutcome]]] = deque()
        for start in range(0, len(numbered), self.batch_size):
            items = numbered[start : start + self.batch_size]
            pending.append(self.executor.submit(_score_in_worker, items, out_dir, dicom, jpeg2000, overlay))
            if len(pending) >= 2 * self.workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()

    def submit_instance(
        self, path: Path, sop_instance_uid: str, overlay: Path | None = None, *, jpeg2000: bool = False,
        secondary_capture: bool = False,
    ) -> Future[InstanceScored | InstanceRefused]:
        """:func:`~cxrtriage.inference.instance.score_instance` in a worker: the node's scoring job.

        A worker that died (killed for memory, say) breaks the pool: the jobs
        in flight fail and are retried by the queue, and a new pool starts.
        """
        return self._submit(_score_instance_in_worker, path, sop_instance_uid, overlay, jpeg2000, secondary_capture)

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ScoringPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _warm_worker(sample: Path | None, scratch: Path, batch_size: int) -> int:
    if sample is not None:
        _score_in_worker([(0, sample)] * batch_size, scratch, True, False, False)
    time.sleep(0.05)  # long enough that the tasks spread over the workers
    return os.getpid()
