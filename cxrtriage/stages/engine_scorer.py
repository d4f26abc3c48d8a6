"""The scoring engine as a :class:`~cxrtriage.stages.score.Scorer`, so that :class:`ScoreStage` uses it unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..config import InferenceSettings
from ..inference.instance import InstanceRefused, InstanceScored

if TYPE_CHECKING:
    from ..inference.engine_jobs import EnginePool


class EngineScorer:
    """Scores through an :class:`~cxrtriage.inference.engine_jobs.EnginePool`: CPU workers around one process
    that owns the device. The calling thread waits for its result; many threads' jobs share the engine's batches.
    """

    def __init__(
        self, settings: InferenceSettings, workers: int = 0, *, jpeg2000: bool = False,
        secondary_capture: bool = False, pool: EnginePool | None = None,
    ) -> None:
        if pool is None:
            from ..inference.engine_jobs import EnginePool

            pool = EnginePool(settings, workers)
        self.pool = pool
        self.jpeg2000 = jpeg2000
        self.secondary_capture = secondary_capture  # results.secondary_capture

    def __call__(self, path: Path, sop_instance_uid: str, overlay: Path | None) -> InstanceScored | InstanceRefused:
        return self.pool.score(path, sop_instance_uid, overlay, jpeg2000=self.jpeg2000,
                               secondary_capture=self.secondary_capture)

    def warm_up(self, sample: Path) -> None:
        self.pool.warm_up(sample)

    def close(self) -> None:
        self.pool.close()
