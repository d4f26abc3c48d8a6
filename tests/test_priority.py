"""The priority model: severity order, never-lower, aging caps, ties, ranking quality."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from scipy.stats import spearmanr

from cxrtriage.config import PrioritySettings
from cxrtriage.inference.training.evaluation import Evaluation
from cxrtriage.triage.priority import TOP, ImageFinding, prioritise, rank, worst_image

T0 = dt.datetime(2026, 11, 22, 8, 0, tzinfo=dt.UTC)
SETTINGS = PrioritySettings()


def scored(total: int, p: float = 0.9, brixia: int | None = None) -> ImageFinding:
    return ImageFinding("scored", total=total, brixia=brixia if brixia is not None else 2 * total, p_disease=p)


def at(minutes: float) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minutes)


def test_severity_orders_studies_that_waited_equally() -> None:
    studies = [scored(0, p=0.1), scored(6), scored(3), scored(1), scored(4)]
    entries = [(prioritise([s], [], T0, T0), T0) for s in studies]
    assert [studies[i].total for i in rank(entries)] == [6, 4, 3, 1, 0]
    assert [entries[i][0].band for i in rank(entries)] == ["critical", "high", "high", "moderate", "low"]


def test_ai_never_lowers_the_orders_priority() -> None:
    stat_but_normal = prioritise([scored(0, p=0.05)], ["STAT"], T0, T0)
    critical = prioritise([scored(6)], [], T0, T0)
    assert stat_but_normal.base == SETTINGS.order_base["STAT"] and "STAT" in stat_but_normal.flags
    assert stat_but_normal.priority > critical.priority
    low_order_but_severe = prioritise([scored(5)], ["LOW"], T0, T0)
    assert low_order_but_severe.band == "critical" and low_order_but_severe.base >= SETTINGS.base["critical"]
    high_dimse = prioritise([scored(0, p=0.05)], [], T0, T0, dimse_high=True)
    assert high_dimse.base == SETTINGS.order_base["HIGH"]


@pytest.mark.parametrize("band_total", [0, 1, 3])
def test_a_low_study_reaches_the_top_by_its_maximum_wait(band_total: int) -> None:
    """Severe STAT studies keep arriving (and are read within their own maximum
    wait); the waiting study still gets to the top of the list by its maximum wait."""
    first = prioritise([scored(band_total, p=0.1)], [], T0, T0)
    max_wait = SETTINGS.max_wait_minutes[first.band]
    critical_wait = SETTINGS.max_wait_minutes["critical"]
    now = at(max_wait)

    def ranked_first(when: dt.datetime) -> bool:
        # Unread critical STAT studies: one a minute over the last 29 minutes.
        unread = [when - dt.timedelta(minutes=m) for m in range(0, int(critical_wait) - 1)]
        entries = [(prioritise([scored(band_total, p=0.1)], [], T0, when), T0)]
        entries += [(prioritise([scored(6)], ["STAT"], a, when), a) for a in unread]
        return rank(entries)[0] == 0

    assert ranked_first(now)
    assert prioritise([scored(band_total, p=0.1)], [], T0, now).priority == pytest.approx(TOP)
    # Half way through its wait, the fresh critical studies still come first.
    assert not ranked_first(at(max_wait / 2))


def test_overdue_studies_keep_rising_and_are_flagged() -> None:
    low = prioritise([scored(0, p=0.1)], [], T0, at(2 * SETTINGS.max_wait_minutes["low"]))
    assert low.priority > TOP and "overdue" in low.flags


def test_ties_are_broken_by_arrival() -> None:
    entries = [(prioritise([scored(2)], [], at(m), at(10)), at(m)) for m in (5, 1, 3)]
    entries = [(entries[i][0], at(m)) for i, m in enumerate((5, 1, 3))]
    for e in entries:
        e[0].priority = 50.0  # exactly equal priorities
    assert rank(entries) == [1, 2, 0]


def test_unscored_and_failed_studies_are_visible_and_flagged() -> None:
    pending = prioritise([ImageFinding("pending")], [], T0, T0)
    failed = prioritise([ImageFinding("failed"), ImageFinding("not_scorable")], [], T0, T0)
    assert pending.band == "unscored" and "AI pending" in pending.flags
    assert failed.band == "ai_failed" and "AI failed" in failed.flags
    assert pending.priority == failed.priority == SETTINGS.base["moderate"]  # ranked, not hidden


def test_a_study_takes_its_most_severe_image() -> None:
    study = prioritise([scored(1), scored(5), ImageFinding("not_scorable")], [], T0, T0)
    assert study.band == "critical"


def test_the_worst_image_is_one_image_chosen_by_ranking_total() -> None:
    """One rule picks the study's most severe image; every value shown comes from it."""
    images = [scored(4, p=0.60, brixia=8), scored(2, p=0.99, brixia=4), ImageFinding("pending")]
    assert worst_image(images, SETTINGS) == 0  # not zone score 4 with P 0.99: no image showed that
    assert prioritise(images, [], T0, T0).worst == 0
    one_lung = ImageFinding("scored", total=2, brixia=4, p_disease=0.7, unscored_zones=3)
    assert worst_image([scored(4), one_lung], SETTINGS) == 1  # the missing lung's zones count as affected
    assert worst_image([scored(4), one_lung], PrioritySettings(missing_lung_zones_affected=False)) == 0
    assert worst_image([scored(3, p=0.5), scored(3, p=0.9)], SETTINGS) == 1  # then Brixia-style, then P(disease)
    assert worst_image([scored(3), scored(3)], SETTINGS) == 0  # ties: the first image
    assert worst_image([ImageFinding("failed"), ImageFinding("pending")], SETTINGS) is None


@pytest.mark.slow
def test_ranking_quality_on_200_synthetic_studies(held_out_evaluation: Evaluation) -> None:
    """Spearman rho between worklist position and true severity (Goncharov et al. report rho), on the
    held-out phantoms that tests/test_quality.py scores."""
    result = held_out_evaluation
    entries = []
    truth = []
    for row in result.per_image:
        finding = ImageFinding("scored", total=int(row["score"]), brixia=int(row["brixia"]), p_disease=row["p_disease"])
        entries.append((prioritise([finding], [], T0, T0), T0))
        truth.append(row["truth_brixia"] + 10 * row["truth"])  # true severity: zone score, then extent
    order = rank(entries)
    position = np.empty(len(order))
    position[order] = np.arange(len(order))
    rho = spearmanr(-position, truth).statistic
    print(f"Spearman rho (worklist order vs true severity, 200 studies): {rho:.3f}")
    assert rho >= 0.9


def test_a_missing_lung_is_not_ranked_as_clear() -> None:
    # Two zones of the found lung affected, the other lung not found (a white-out is
    # exactly what a lung model can miss): ranked with the missing zones as affected.
    one_lung = ImageFinding("scored", total=2, brixia=4, p_disease=0.9, unscored_zones=3)
    two_lungs = scored(2, brixia=4)
    flagged = prioritise([one_lung], [], T0, T0)
    plain = prioritise([two_lungs], [], T0, T0)
    assert flagged.band == "critical" and plain.band == "moderate"
    assert "one lung found" in flagged.flags and "one lung found" not in plain.flags
    assert flagged.priority > plain.priority
    # Configurable, and then it is still flagged for a human to look at.
    off = prioritise([one_lung], [], T0, T0, PrioritySettings(missing_lung_zones_affected=False))
    assert off.band == "moderate" and "one lung found" in off.flags
    nothing = prioritise([ImageFinding("scored", total=0, brixia=0, p_disease=0.2, unscored_zones=6)], [], T0, T0)
    assert nothing.band == "critical" and "no lung found" in nothing.flags
