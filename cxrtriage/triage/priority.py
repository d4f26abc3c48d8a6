"""Priorities that came with the order, as numbers the queue can sort by."""

from __future__ import annotations

#: Requested Procedure Priority (0040,1003) defined terms, most urgent first.
REQUESTED_PRIORITY_RANK: dict[str, int] = {"STAT": 3, "HIGH": 2, "ROUTINE": 1, "MEDIUM": 1, "LOW": 0}
#: DIMSE Priority (0000,0700): 1 HIGH, 0 MEDIUM, 2 LOW (PS3.7 C.4.2.1.7.1).
DIMSE_PRIORITY_RANK: dict[int, int] = {1: 2, 0: 1, 2: 0}


def order_priority(requested: str | None, dimse: int | None) -> int:
    """Scoring-queue priority: the more urgent the order, the sooner the AI result exists.

    The Requested Procedure Priority dominates; the C-STORE's DIMSE priority
    only breaks ties between images of equal requested priority.
    """
    requested_rank = REQUESTED_PRIORITY_RANK.get((requested or "").strip().upper(), 1)
    dimse_rank = DIMSE_PRIORITY_RANK.get(dimse if dimse is not None else 0, 1)
    return 10 * requested_rank + dimse_rank
