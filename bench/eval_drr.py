"""Held-out quality on radiographs rendered from the shipped chest CT (DRRs).

    python bench/eval_drr.py [--images 120] [--normals 8] [--config config.yaml]
                             [--lungs W --disease W] [--png reliability.png] [--json out.json]
                             [--seed-base N --normal-seed-base N] [--gates 0.5,0.6,...] [--processed]
                             [--zone-threshold T] [--zone-thresholds 0.1,0.15,...] [--workers N]

Views, deformations and lesions come from seeds HELD_OUT_SEED_BASE.. which
training never draws (training: 0..; model selection: HELD_OUT_SEED_BASE +
50 000..). Every image goes through the real Pipeline; its 0-6 score is
compared with the truth computed from the true masks with the same zone
definition, as bench/eval_synthetic.py does for phantoms. Also reported: the
scores of lesion-free views of the CT (a normal chest should score low) and a
reliability curve of P(disease) (PNG with matplotlib, else a table).

With ``--gates`` every image is scored once with the P(disease) gate off, and
the 0-6 scores are reported for each gate g: an image whose P(disease) is
below g scores 0 in every zone, else as with the gate off (exactly what the
pipeline gives at that gate). The main table is then the gate-off one. With
``--seed-base`` / ``--normal-seed-base`` other seeds are scored (the gate's
validation set, docs/model-card.md), never the held-out ones for tuning.
With ``--zone-thresholds`` the 0-6 scores are also reported at each zone
threshold T, from the same pass (for choosing a model's T on validation
seeds); ``--zone-threshold`` scores with a given T. The truth is always
computed at the paper's T = 0.30, whatever the model's T. With
``--processed`` each DRR first gets a CR/DR console's multi-scale processing
(``training.augment.console_processing``, drawn from the DRR's own seed, so
every model sees the same images).

DRRs not yet in the render cache are rendered first on ``--workers``
processes (all cores by default); lesion-free views are rendered as scored.

All DRRs come from ONE patient's CT: these numbers measure how well the models
learned this rendering of this chest, not how they do on other patients.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cxrtriage.config import InferenceSettings, load_settings
from cxrtriage.inference.pipeline import Pipeline
from cxrtriage.inference.radiograph import Radiograph
from cxrtriage.inference.training.augment import console_processing
from cxrtriage.inference.training.datasets import (
    CTSource,
    _volume,
    cached_drr,
    default_drr_cache,
    prepare_volume,
    render_drrs,
)
from cxrtriage.inference.training.drr import DRR, RenderSettings, render
from cxrtriage.inference.training.evaluation import candidate_settings, truth_scoring, zone_fractions
from cxrtriage.inference.training.metrics import auc_interval, dice, roc_auc
from cxrtriage.inference.training.trainer import HELD_OUT_SEED_BASE

NORMAL_SEED_BASE = HELD_OUT_SEED_BASE + 80_000
GATE_OFF = 1e-9  # the smallest gate a spec takes (> 0): every image's opacity counts


def _radiograph(drr: DRR, processed: bool = False) -> Radiograph:
    spacing = (drr.pixel_spacing_mm, drr.pixel_spacing_mm)
    image = console_processing(np.random.default_rng(drr.seed), drr.image.astype(np.float32)) if processed \
        else drr.image
    return Radiograph(pixels=image, source=f"drr-{drr.seed}", pixel_spacing_mm=spacing,
                      patient_orientation=["L", "F"])


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """Per bin of P(disease): count, mean P and the observed rate of disease."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (probs >= lo) & ((probs < hi) if hi < 1.0 else (probs <= hi))
        if inside.any():
            rows.append({"bin": f"{lo:.1f}-{hi:.1f}", "count": int(inside.sum()),
                         "mean_p": float(probs[inside].mean()), "observed": float(labels[inside].mean())})
    return rows


def plot_reliability(rows: list[dict[str, float]], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(4, 4), dpi=120)
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.plot([r["mean_p"] for r in rows], [r["observed"] for r in rows], "o-")
    for r in rows:
        ax.annotate(str(r["count"]), (r["mean_p"], r["observed"]), fontsize=7, xytext=(3, -9), textcoords="offset points")
    ax.set(xlabel="P(disease), bin mean", ylabel="observed rate", xlim=(0, 1), ylim=(0, 1), title=title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def overshoot(predicted: np.ndarray, truth: np.ndarray) -> float:
    """How far the predicted lung runs below the true lung base, as a share of the true lung's height.

    Per side (the image left half holds the patient's right lung); the worse side counts. 0 when the
    prediction stops at or above the domes: the failure seen on a real film (lung drawn over the
    gastric bubble) shows here as a large value.
    """
    w = truth.shape[1]
    worst = 0.0
    for half in (slice(0, w // 2), slice(w // 2, w)):
        t_rows = np.flatnonzero(truth[:, half].any(axis=1))
        p_rows = np.flatnonzero(predicted[:, half].any(axis=1))
        if t_rows.size and p_rows.size:
            worst = max(worst, (p_rows[-1] - t_rows[-1]) / max(1, t_rows[-1] - t_rows[0]))
    return float(worst)


def below_dome(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(right, left): how far the predicted lung's lowest pixel lies below the true one in any column over the
    dome, as a share of the image height (the image left half holds the patient's right lung).

    The column-wise form of :func:`overshoot`, as ``tests/test_quality.py`` checks RG1 against its traced domes: a
    mask that crosses a dome's slope while its lowest row stays above the sulcus shows here and not there. Dome
    columns are those whose true lung ends in the lowest quarter of that lung's height; elsewhere a column's lowest
    row is the heart's or the hilum's edge, nearly vertical, where a one-pixel shift moves it far. The summary
    counts images over 2.5 %, the RG1 test's 50 of 1955 rows.
    """
    h, w = truth.shape
    out = []
    for half in (slice(0, w // 2), slice(w // 2, w)):
        p, t = predicted[:, half], truth[:, half]
        rows = np.flatnonzero(t.any(axis=1))
        if not rows.size:
            out.append(0.0)
            continue
        lowest_p = h - 1 - np.argmax(p[::-1], axis=0)
        lowest_t = h - 1 - np.argmax(t[::-1], axis=0)
        dome = t.any(axis=0) & p.any(axis=0) & (lowest_t >= rows[0] + 0.75 * (rows[-1] - rows[0]))
        out.append(float(max(0, (lowest_p - lowest_t)[dome].max()) / h) if dome.any() else 0.0)
    return out[0], out[1]


def evaluate(pipeline: Pipeline, volume_path: Path, images: int, normals: int, seed_base: int = HELD_OUT_SEED_BASE,
             normal_seed_base: int = NORMAL_SEED_BASE, processed: bool = False) -> dict:
    rows, probs, labels = [], [], []
    elapsed = 0.0
    for seed in range(seed_base, seed_base + images):
        drr = cached_drr(volume_path, seed)
        t0 = time.perf_counter()
        result = pipeline(_radiograph(drr, processed))
        elapsed += time.perf_counter() - t0
        truth = drr.truth(truth_scoring(pipeline))
        rows.append({
            "seed": seed, "view": drr.view, "lesion": drr.lesion,
            "lung_dice": dice(result.lungs, drr.lungs), "overshoot": overshoot(result.lungs, drr.lungs),
            "below_dome": below_dome(result.lungs, drr.lungs),
            "opacity_dice": dice(result.disease, drr.disease) if drr.has_disease else None,
            "false_opacity": float(result.disease.sum() / max(1, result.lungs.sum())) if not drr.has_disease else None,
            "score": result.scores.total, "truth": truth.total,
            "zone_hits": sum(int(a == b) for a, b in zip(result.scores.binary, truth.binary)),
            "zones": "".join(str(z) for z in result.scores.binary), "truth_zones": "".join(str(z) for z in truth.binary),
            "p_disease": result.p_disease, "fractions": zone_fractions(result.scores),
        })
        probs.append(result.p_disease)
        labels.append(int(drr.has_disease))
    probs_a, labels_a = np.array(probs), np.array(labels)
    err = np.array([abs(r["score"] - r["truth"]) for r in rows])
    lung = np.array([r["lung_dice"] for r in rows])
    opacity = [r["opacity_dice"] for r in rows if r["opacity_dice"] is not None]
    auc, auc_ci = auc_with_interval(probs_a, labels_a)
    summary = {
        "images": images, "diseased": int(labels_a.sum()),
        "lung_dice": float(lung.mean()), "lung_dice_min": float(lung.min()),
        "overshoot_mean": float(np.mean([r["overshoot"] for r in rows])),
        "overshoot_over_5pct": float(np.mean([r["overshoot"] > 0.05 for r in rows])),
        **{f"below_dome_{side}_over_2_5pct": float(np.mean([r["below_dome"][i] > 0.025 for r in rows]))
           for i, side in enumerate(("right", "left"))},
        "opacity_dice": float(np.mean(opacity)) if opacity else float("nan"),
        "score_mae": float(err.mean()), "score_exact": float((err == 0).mean()),
        "zone_accuracy": float(sum(r["zone_hits"] for r in rows) / (6 * images)),
        "auc": auc, "auc_ci": auc_ci,
        "seconds_per_image": elapsed / images,
        **by_view(rows),
    }
    # Lesion-free views of the same chest: a normal chest should score low.
    volume, sides = _volume(str(volume_path))
    settings = RenderSettings(p_normal=1.0)
    normal_rows = []
    for seed in range(normal_seed_base, normal_seed_base + normals):
        drr = render(volume, seed, settings, sides=sides)  # type: ignore[arg-type]
        result = pipeline(_radiograph(drr, processed))
        normal_rows.append({"seed": seed, "view": drr.view, "score": result.scores.total,
                            "zones": "".join(str(z) for z in result.scores.binary),
                            "p_disease": result.p_disease, "lung_dice": round(dice(result.lungs, drr.lungs), 3),
                            "fractions": zone_fractions(result.scores)})
    return {"summary": summary, "reliability": reliability(probs_a, labels_a), "normal_views": normal_rows,
            "per_image": rows}


def threshold_table(rows: list[dict], normal_rows: list[dict], thresholds: list[float]) -> list[dict]:
    """0-6 scores at each zone threshold T (a zone scores 1 when its opacity fraction > T, as in
    :func:`~cxrtriage.inference.scoring.score_zones`), from the fractions of one scoring pass; the truth stays at
    its fixed definition (:func:`~cxrtriage.inference.training.evaluation.truth_scoring`)."""
    def zones_at(t: float) -> Callable[[dict], str]:
        return lambda row: "".join("1" if f is not None and f > t else "0" for f in row["fractions"])

    return [{"zone_threshold": t, **scores_at(rows, normal_rows, zones_at(t))} for t in thresholds]


def scores_at(rows: list[dict], normal_rows: list[dict], zones: Callable[[dict], str]) -> dict:
    """0-6 MAE, exact share and zone accuracy of ``rows`` (PA and AP apart where views are known), and the
    lesion-free views' scores, when ``zones`` gives each image's zones."""
    err = np.array([abs(zones(r).count("1") - r["truth"]) for r in rows])
    normal = np.array([zones(r).count("1") for r in normal_rows], dtype=int)
    hits = sum(a == b for r in rows for a, b in zip(zones(r), r["truth_zones"]))
    pooled = np.concatenate([err, normal]) if normal.size else err
    views = {f"mae_{v}": float(err[[r.get("view") == v for r in rows]].mean())
             for v in ("PA", "AP") if any(r.get("view") == v for r in rows)}
    return {
        "mae": float(err.mean()), "exact": float((err == 0).mean()), "zone_accuracy": float(hits / (6 * len(rows))),
        **views, "normal_mean_score": float(normal.mean()) if normal.size else 0.0,
        "normals_2_or_more": int((normal >= 2).sum()), "normal_max": int(normal.max()) if normal.size else 0,
        "pooled_mae": float(pooled.mean()), "pooled_images": int(pooled.size),
    }


def by_view(rows: list[dict]) -> dict:
    """0-6 MAE and P(disease) AUC of the PA and the AP views apart: the disease stage differs by view."""
    out: dict[str, float] = {}
    for view in ("PA", "AP"):
        mine = [r for r in rows if r["view"] == view]
        labels = np.array([r["opacity_dice"] is not None for r in mine], dtype=int)
        probs = np.array([r["p_disease"] for r in mine])
        out[f"score_mae_{view}"] = float(np.mean([abs(r["score"] - r["truth"]) for r in mine])) if mine else float("nan")
        out[f"auc_{view}"], out[f"auc_{view}_ci"] = auc_with_interval(probs, labels)
    return out


def auc_with_interval(probs: np.ndarray, labels: np.ndarray) -> tuple[float, tuple[float, float]]:
    """P(disease) ROC AUC and its 95 % bootstrap interval; NaN where the images hold only one class."""
    if 0 < labels.sum() < len(labels):
        return roc_auc(probs, labels), auc_interval(probs, labels)
    return float("nan"), (float("nan"), float("nan"))


def gate_table(rows: list[dict], normal_rows: list[dict], gates: list[float]) -> list[dict]:
    """0-6 scores at each P(disease) gate, from images scored with the gate off (see the module docstring)."""
    def zones_at(gate: float) -> Callable[[dict], str]:
        return lambda row: row["zones"] if row["p_disease"] >= gate else "0" * len(row["zones"])

    return [{"gate": gate, **scores_at(rows, normal_rows, zones_at(gate))} for gate in gates]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--normals", type=int, default=8, help="lesion-free views scored separately")
    parser.add_argument("--config", default=None)
    parser.add_argument("--lungs", default=None, help="Stage I weights instead of the configured ones")
    parser.add_argument("--disease", default=None, help="Stage II weights instead of the configured ones")
    parser.add_argument("--drr-cache", default=None, help="rendered DRRs are cached here (shared with training)")
    parser.add_argument("--png", default=None, help="write the reliability curve here")
    parser.add_argument("--json", default=None, help="write all numbers here")
    parser.add_argument("--seed-base", type=int, default=HELD_OUT_SEED_BASE, help="first DRR seed scored")
    parser.add_argument("--normal-seed-base", type=int, default=NORMAL_SEED_BASE, help="first lesion-free view's seed")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes rendering the DRRs not yet in the cache, before scoring")
    parser.add_argument("--processed", action="store_true", help="give each DRR a console's multi-scale processing")
    parser.add_argument("--zone-threshold", type=float, default=None,
                        help="score with this T instead of the disease model's (a candidate's T, before bundling)")
    parser.add_argument("--zone-thresholds", default=None, help="comma-separated T: report the 0-6 scores at each, "
                        "from one scoring pass (for choosing T on validation seeds)")
    parser.add_argument("--gates", default=None, help="comma-separated P(disease) gates: score with the gate off and "
                        "report the 0-6 scores at each")
    args = parser.parse_args()

    settings: InferenceSettings = load_settings(args.config).inference
    gates = [float(g) for g in args.gates.split(",")] if args.gates else []
    settings = candidate_settings(settings, args.lungs, args.disease, args.zone_threshold,
                                  GATE_OFF if gates else None)
    pipeline = Pipeline(settings)
    volume_path = prepare_volume(CTSource(), args.drr_cache or default_drr_cache())
    rendered = render_drrs(volume_path, range(args.seed_base, args.seed_base + args.images), args.workers)
    if rendered:
        print(f"rendered {rendered} DRRs into the cache on {args.workers} processes")
    out = evaluate(pipeline, volume_path, args.images, args.normals, args.seed_base, args.normal_seed_base,
                   args.processed)
    out["processed"] = args.processed
    out["models"] = pipeline.model_versions
    out["seeds"] = {"images": [args.seed_base, args.seed_base + args.images - 1],
                    "normals": [args.normal_seed_base, args.normal_seed_base + args.normals - 1]}
    if args.zone_thresholds:
        out["zone_thresholds"] = threshold_table(out["per_image"], out["normal_views"],
                                                 [float(t) for t in args.zone_thresholds.split(",")])
    if gates:
        out["gates"] = gate_table(out["per_image"], out["normal_views"], gates)
    s = out["summary"]

    print(f"models: {pipeline.model_versions}")
    print(f"held-out DRRs of the shipped CT: {s['images']} ({s['diseased']} with opacity)")
    print("| metric | value |\n|---|---|")
    for key, label in (("lung_dice", "lung Dice (mean)"), ("lung_dice_min", "lung Dice (worst)"),
                       ("overshoot_mean", "lung below the true base (share of lung height, mean)"),
                       ("overshoot_over_5pct", "images with lung > 5 % below the true base"),
                       ("below_dome_right_over_2_5pct", "images with right lung > 2.5 % of the height below the base over the dome"),
                       ("below_dome_left_over_2_5pct", "images with left lung > 2.5 % of the height below the base over the dome"),
                       ("opacity_dice", "opacity Dice (diseased)"), ("score_mae", "0-6 score MAE"),
                       ("score_exact", "0-6 score exact"), ("zone_accuracy", "zone accuracy"),
                       ("auc", "P(disease) ROC AUC"), ("score_mae_PA", "0-6 score MAE, PA views"),
                       ("score_mae_AP", "0-6 score MAE, AP views"), ("auc_PA", "P(disease) ROC AUC, PA views"),
                       ("auc_AP", "P(disease) ROC AUC, AP views"), ("seconds_per_image", "s / image")):
        interval = s.get(f"{key}_ci")  # AUCs: with their 95 % bootstrap interval
        print(f"| {label} | {s[key]:.3f}" + (f" ({interval[0]:.2f}-{interval[1]:.2f}) |" if interval else " |"))
    print("\nreliability of P(disease):\n| bin | n | mean P | observed |\n|---|---|---|---|")
    for r in out["reliability"]:
        print(f"| {r['bin']} | {r['count']} | {r['mean_p']:.2f} | {r['observed']:.2f} |")
    print("\nlesion-free views of the CT:\n| seed | view | score | zones | P(disease) | lung Dice |\n|---|---|---|---|---|---|")
    for r in out["normal_views"]:
        print(f"| {r['seed']} | {r['view']} | {r['score']} | {r['zones']} | {r['p_disease']:.2f} | {r['lung_dice']:.3f} |")
    if gates:
        print(f"\n0-6 scores by P(disease) gate ({args.images} images + {args.normals} lesion-free views; the tables "
              "above are with the gate off):")
        print("| gate | MAE | exact | zone accuracy | lesion-free: mean score | scoring >= 2 | max | MAE, all |")
        print("|---|---|---|---|---|---|---|---|")
        for g in out["gates"]:
            print(f"| {g['gate']:.2f} | {g['mae']:.3f} | {g['exact']:.2f} | {g['zone_accuracy']:.3f} | "
                  f"{g['normal_mean_score']:.2f} | {g['normals_2_or_more']} | {g['normal_max']} | {g['pooled_mae']:.3f} |")
    if args.zone_thresholds:
        print(f"\n0-6 scores by zone threshold T ({args.images} images + {args.normals} lesion-free views; the "
              f"tables above are at T = {pipeline.scoring.zone_threshold:g}):")
        print("| T | MAE | exact | zone accuracy | MAE, PA | MAE, AP | lesion-free scoring >= 2 | max | MAE, all |")
        print("|---|---|---|---|---|---|---|---|---|")
        for t in out["zone_thresholds"]:
            print(f"| {t['zone_threshold']:.2f} | {t['mae']:.3f} | {t['exact']:.2f} | {t['zone_accuracy']:.3f} | "
                  f"{t['mae_PA']:.3f} | {t['mae_AP']:.3f} | {t['normals_2_or_more']} | {t['normal_max']} | "
                  f"{t['pooled_mae']:.3f} |")
    if args.png and plot_reliability(out["reliability"], Path(args.png), "P(disease) on held-out DRRs"):
        print(f"\nreliability curve: {args.png}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
