"""The reading priority of a study: AI severity, the order's priority, and waiting time.

A study's priority is a number; the worklist shows studies from the highest
down, ties broken by arrival (earlier first). Three rules:

1. **Base**: the higher of the AI's severity base and the order's base. The
   AI never lowers a priority that came with the order (Requested Procedure
   Priority (0040,1003) STAT/HIGH/ROUTINE/MEDIUM/LOW, or a HIGH DIMSE priority).
2. **Band**: critical, high, moderate, low from the AI result (the most
   severe image of the study counts); ``unscored`` while scoring is pending,
   ``ai_failed`` when the AI could not score it. Those two are never hidden:
   they rank as if moderate and are flagged.
   A zone of a lung the AI did not find is unscored, never clear: for ranking
   it counts as affected (``missing_lung_zones_affected``; a white-out lung
   is exactly what a lung model can miss), and the study is flagged
   "one lung found" / "no lung found".
3. **Aging**: priority rises linearly with waiting time from the base to
   :data:`TOP` at the band's maximum wait, so any study reaches the top of
   the list no later than its maximum wait, whatever arrives meanwhile
   (newly arrived studies have a base below TOP). Overdue studies keep
   rising above TOP, the longest-overdue first.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..config import PrioritySettings
from ..inference.scoring import ZONE_NAMES
from ..storage.models import ResultStatus

#: Requested Procedure Priority (0040,1003) defined terms, most urgent first.
REQUESTED_PRIORITY_RANK: dict[str, int] = {"STAT": 3, "HIGH": 2, "ROUTINE": 1, "MEDIUM": 1, "LOW": 0}
#: DIMSE Priority (0000,0700): 1 HIGH, 0 MEDIUM, 2 LOW (PS3.7 C.4.2.1.7.1).
DIMSE_PRIORITY_RANK: dict[int, int] = {1: 2, 0: 1, 2: 0}

TOP = 100.0
ZONES_PER_IMAGE = len(ZONE_NAMES)  # zones A-F
#: Within-band severity: up to 9.9 points for zone score (0-6), Brixia-style total (0-18), P(disease).
SEVERITY_WEIGHTS = (1.2, 0.1, 0.9)
BRIXIA_MAX = 18
#: An image's status while it has no result yet (never stored: results.status holds a ResultStatus).
PENDING = "pending"


def order_priority(requested: str | None, dimse: int | None) -> int:
    """Scoring-queue priority: the more urgent the order, the sooner the AI result exists.

    The Requested Procedure Priority dominates; the C-STORE's DIMSE priority
    only breaks ties between images of equal requested priority.
    """
    requested_rank = REQUESTED_PRIORITY_RANK.get((requested or "").strip().upper(), 1)
    dimse_rank = DIMSE_PRIORITY_RANK.get(dimse if dimse is not None else 0, 1)
    return 10 * requested_rank + dimse_rank


@dataclass
class ImageFinding:
    """What the priority model needs from one image of a study."""

    status: str  # scored | pending | not_scorable | failed
    total: int | None = None
    brixia: int | None = None
    p_disease: float | None = None
    unscored_zones: int = 0  # zones of a lung that was not found

    def ranking_total(self, settings: PrioritySettings) -> int:
        """The zone score the ranking uses: unscored zones count as affected unless configured off."""
        extra = self.unscored_zones if settings.missing_lung_zones_affected else 0
        return min(ZONES_PER_IMAGE, (self.total or 0) + extra)


@dataclass
class StudyPriority:
    band: str
    base: float
    priority: float
    waited_minutes: float
    severity: float  # within-band order: zone score, Brixia-style total, P(disease)
    flags: list[str] = field(default_factory=list)
    worst: int | None = None  # index of the study's most severe scored image (:func:`worst_image`)


def worst_image(images: Sequence[ImageFinding], settings: PrioritySettings) -> int | None:
    """Index of the study's most severe scored image, or None when none is scored.

    The one rule of "how severe is this study", used by the worklist, the REST
    API, study-level C-FIND and UPS alike: one image's values, never a mix of
    several. Most severe = highest ranking zone score (a lung that was not
    found counts as affected, :meth:`ImageFinding.ranking_total`), then
    Brixia-style total, then P(disease); the first such image on a tie.
    """
    best: int | None = None
    best_key: tuple[int, int, float] | None = None
    for index, image in enumerate(images):
        if image.status != ResultStatus.SCORED:
            continue
        key = (image.ranking_total(settings), image.brixia or 0, image.p_disease or 0.0)
        if best_key is None or key > best_key:
            best, best_key = index, key
    return best


def study_band(images: Sequence[ImageFinding], settings: PrioritySettings) -> tuple[str, float, int | None]:
    """Band, within-band severity and the index of the most severe scored image of a study."""
    index = worst_image(images, settings)
    if index is not None:
        worst = images[index]
        total, p = worst.ranking_total(settings), worst.p_disease or 0.0
        if total >= settings.critical_total:
            band = "critical"
        elif total >= settings.high_total:
            band = "high"
        elif total >= settings.moderate_total or p >= settings.moderate_p_disease:
            band = "moderate"
        else:
            band = "low"
        w_total, w_brixia, w_p = SEVERITY_WEIGHTS
        severity = w_total * total + w_brixia * min(worst.brixia or 0, BRIXIA_MAX) + w_p * p
        return band, severity, index
    if any(i.status == PENDING for i in images) or not images:
        return "unscored", 0.0, None
    return "ai_failed", 0.0, None


def prioritise(
    images: Sequence[ImageFinding],
    requested_priorities: Iterable[str],
    received_at: dt.datetime,
    now: dt.datetime,
    settings: PrioritySettings | None = None,
    dimse_high: bool = False,
) -> StudyPriority:
    settings = settings or PrioritySettings()
    band, severity, worst = study_band(images, settings)
    requested = [r.strip().upper() for r in requested_priorities if r and r.strip()]
    order_base = max([settings.order_base.get(r, 0.0) for r in requested] + [0.0])
    if dimse_high:
        order_base = max(order_base, settings.order_base.get("HIGH", 0.0))
    ai_base = settings.base[band] + severity
    base = max(ai_base, order_base)  # the AI never lowers the order's priority
    waited = max(0.0, (now - received_at).total_seconds() / 60.0)
    max_wait = settings.max_wait_minutes[band]
    if waited <= max_wait:
        priority = base + (TOP - base) * waited / max_wait
    else:
        priority = TOP + (waited - max_wait) / max_wait  # overdue: the longest-overdue first
    flags = []
    if "STAT" in requested:
        flags.append("STAT")
    if band == "unscored":
        flags.append("AI pending")
    if band == "ai_failed":
        flags.append("AI failed")
    unscored = max((i.unscored_zones for i in images if i.status == ResultStatus.SCORED), default=0)
    if unscored:
        flags.append("no lung found" if unscored >= ZONES_PER_IMAGE else "one lung found")
    if waited > max_wait:
        flags.append("overdue")
    return StudyPriority(band=band, base=base, priority=priority, waited_minutes=waited, severity=severity, flags=flags,
                         worst=worst)


def rank(entries: Sequence[tuple[StudyPriority, dt.datetime]]) -> list[int]:
    """Indices of ``entries`` in reading order: priority descending, then arrival ascending."""
    return sorted(range(len(entries)), key=lambda i: (-entries[i][0].priority, entries[i][1]))
