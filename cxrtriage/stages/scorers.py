"""Which scorer a node's score stage uses, and how many scoring threads feed it.

* in the node process (:class:`~.score.LocalScorer`): ``workers.scoring_workers`` threads;
* a pool of worker processes each running the whole chain (:class:`~.score.PoolScorer`):
  ``workers.scoring_processes``;
* the scoring engine (:class:`~.engine_scorer.EngineScorer`, ``workers.scoring_engine``): one
  process owns the device and batches both networks across jobs, ``scoring_processes`` CPU workers
  (0 = one per core) decode and write SEG/SR around it. Each scoring thread waits on one job, so
  the engine gets enough threads to fill a batch while the CPU workers decode and encode.
"""

from __future__ import annotations

import os

from ..config import Settings
from .score import PoolScorer, Scorer


def scoring_threads(settings: Settings) -> int:
    """Threads claiming score jobs on this node (0: it does not score)."""
    w = settings.workers
    threads = max(w.scoring_workers, w.scoring_processes) if settings.node.runs("scorer") else 0
    if threads and w.scoring_engine:
        cpu_workers = w.scoring_processes or os.cpu_count() or 1
        threads = max(threads, 2 * cpu_workers + settings.inference.max_batch)
    return threads


def process_scorer(settings: Settings) -> Scorer | None:
    """The engine's or the worker pool's scorer, or None when the node scores in its own process."""
    w, results = settings.workers, settings.results
    if w.scoring_engine:
        from .engine_scorer import EngineScorer

        return EngineScorer(settings.inference, w.scoring_processes, jpeg2000=w.seg_jpeg2000,
                            secondary_capture=results.secondary_capture)
    if w.scoring_processes:
        from ..inference.parallel import ScoringPool

        return PoolScorer(ScoringPool(settings.inference, w.scoring_processes), jpeg2000=w.seg_jpeg2000,
                          secondary_capture=results.secondary_capture)
    return None
