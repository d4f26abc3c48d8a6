"""Paired comparison of two held-out evaluations of the same images: is a difference more than noise?

    python bench/compare_evals.py REFERENCE.json CANDIDATE.json [--resamples 2000]

Both files are ``bench/eval_drr.py --json`` outputs over the same seeds (the script refuses
others). For each metric it prints both values, the candidate's difference and a 95 %
paired bootstrap interval of that difference: the same resampled images for both models,
so what the two share (an image that is hard for both) cancels. On 100 images a 0-6 MAE
has a standard error of about 0.1 on its own; the paired interval of a difference is
narrower, and a difference whose interval holds 0 is not one the set can resolve.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cxrtriage.inference.training.metrics import roc_auc

Rows = list[dict]


def _mae(rows: Rows) -> float:
    return float(np.mean([abs(r["score"] - r["truth"]) for r in rows]))


def _lung_dice(rows: Rows) -> float:
    return float(np.mean([r["lung_dice"] for r in rows]))


def _opacity_dice(rows: Rows) -> float:
    values = [r["opacity_dice"] for r in rows if r["opacity_dice"] is not None]
    return float(np.mean(values)) if values else float("nan")


def _below_base(rows: Rows) -> float:
    return float(np.mean([r["overshoot"] > 0.05 for r in rows]))


def _below_dome(rows: Rows) -> float:
    return float(np.mean([(r["below_dome"][0] > 0.025) + (r["below_dome"][1] > 0.025) for r in rows]) / 2)


def _auc(rows: Rows) -> float:
    labels = np.array([r["opacity_dice"] is not None for r in rows])
    if labels.all() or not labels.any():
        return float("nan")
    return roc_auc(np.array([r["p_disease"] for r in rows]), labels)


#: name, statistic over a list of per-image rows, and whether lower is better.
METRICS: list[tuple[str, Callable[[Rows], float], bool]] = [
    ("0-6 score MAE", _mae, True),
    ("P(disease) ROC AUC", _auc, False),
    ("opacity Dice (diseased)", _opacity_dice, False),
    ("lung Dice (mean)", _lung_dice, False),
    ("images with lung > 5 % below the true base", _below_base, True),
    ("lungs > 2.5 % of the height below the base over a dome", _below_dome, True),
]

#: Per-image fields a metric needs beyond those every evaluation has (older evaluations lack them).
NEEDS = {_below_dome: "below_dome"}


def paired_difference(reference: Rows, candidate: Rows, statistic: Callable[[Rows], float], resamples: int = 2000,
                      seed: int = 0) -> tuple[float, float, float]:
    """``statistic(candidate) - statistic(reference)`` and its 95 % percentile bootstrap interval, both models
    resampled with the same images. Resamples where the statistic is undefined (NaN) are left out."""
    if [r["seed"] for r in reference] != [r["seed"] for r in candidate]:
        raise ValueError("the two evaluations did not score the same images (seeds differ)")
    n = len(reference)
    rng = np.random.default_rng(seed)
    diffs = []
    for idx in rng.integers(0, n, size=(resamples, n)):
        d = statistic([candidate[i] for i in idx]) - statistic([reference[i] for i in idx])
        if not np.isnan(d):
            diffs.append(d)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return statistic(candidate) - statistic(reference), float(lo), float(hi)


def compare(reference: dict, candidate: dict, resamples: int = 2000) -> list[dict]:
    """One row per metric of :data:`METRICS`: both values, the difference, its interval and a verdict."""
    ref_rows, cand_rows = reference["per_image"], candidate["per_image"]
    table = []
    for name, statistic, lower_is_better in METRICS:
        field = NEEDS.get(statistic)
        if field and not all(field in r for r in ref_rows + cand_rows):
            continue
        diff, lo, hi = paired_difference(ref_rows, cand_rows, statistic, resamples)
        better = (hi < 0) if lower_is_better else (lo > 0)
        worse = (lo > 0) if lower_is_better else (hi < 0)
        table.append({"metric": name, "reference": statistic(ref_rows), "candidate": statistic(cand_rows),
                      "difference": diff, "interval": (lo, hi),
                      "verdict": "identical" if lo == hi == diff == 0 else "better" if better else "worse" if worse
                      else "within noise"})
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference")
    parser.add_argument("candidate")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--json", default=None, help="write the table here")
    args = parser.parse_args()
    reference, candidate = (json.loads(Path(p).read_text()) for p in (args.reference, args.candidate))
    table = compare(reference, candidate, args.resamples)
    print(f"reference: {reference.get('models')}\ncandidate: {candidate.get('models')}")
    print(f"{len(reference['per_image'])} images, paired bootstrap ({args.resamples} resamples)\n")
    print("| metric | reference | candidate | difference | 95 % interval | verdict |\n|---|---|---|---|---|---|")
    for row in table:
        lo, hi = row["interval"]
        print(f"| {row['metric']} | {row['reference']:.3f} | {row['candidate']:.3f} | {row['difference']:+.3f} | "
              f"{lo:+.3f} to {hi:+.3f} | {row['verdict']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
