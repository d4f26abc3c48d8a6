"""Held-out quality of the configured models on synthetic radiographs.

    python bench/eval_synthetic.py [--images 200] [--seed-base 1000000] [--config config.yaml] [--lungs W]
                                   [--disease W] [--zone-threshold T] [--zone-thresholds 0.2,0.25,...] [--json F]

Prints lung Dice, 0-6 score MAE, P(disease) ROC AUC and more; the numbers
in docs/model-card.md come from this script. ``--seed-base 1050000`` scores
the validation phantoms instead of the held-out ones (for fitting T);
``--zone-thresholds`` adds the 0-6 scores at each T from the same pass.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cxrtriage.config import InferenceSettings, load_settings
from cxrtriage.inference.pipeline import Pipeline
from cxrtriage.inference.training.evaluation import candidate_settings, evaluate_synthetic
from cxrtriage.inference.training.trainer import HELD_OUT_SEED_BASE

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_drr import threshold_table  # noqa: E402  (a sibling script: one definition of the table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--seed-base", type=int, default=HELD_OUT_SEED_BASE, help="first phantom seed scored")
    parser.add_argument("--config", default=None)
    parser.add_argument("--lungs", default=None, help="Stage I weights instead of the configured ones")
    parser.add_argument("--disease", default=None, help="Stage II weights instead of the configured ones")
    parser.add_argument("--zone-threshold", type=float, default=None,
                        help="score with this T instead of the disease model's (a candidate's T, before bundling)")
    parser.add_argument("--zone-thresholds", default=None, help="comma-separated T: report the 0-6 scores at each, "
                        "from one scoring pass")
    parser.add_argument("--json", default=None, help="write all numbers, with every image's row, here")
    args = parser.parse_args()
    settings: InferenceSettings = load_settings(args.config).inference
    # candidate weights or T, e.g. a training run's, scored before they are bundled
    settings = candidate_settings(settings, args.lungs, args.disease, args.zone_threshold)
    pipeline = Pipeline(settings)
    result = evaluate_synthetic(pipeline, args.images, args.seed_base)
    out: dict = {"models": pipeline.model_versions, "zone_threshold": pipeline.scoring.zone_threshold,
                 "seeds": [args.seed_base, args.seed_base + args.images - 1], **result.as_dict()}
    print(json.dumps(out, indent=2))
    print(
        f"lung Dice {result.lung_dice:.4f} (goal >= 0.95) | score MAE {result.score_mae:.3f} (goal <= 0.5) | "
        f"AUC {result.auc:.4f} (goal >= 0.95)"
    )
    if args.zone_thresholds:
        out["zone_thresholds"] = threshold_table(result.per_image, [],
                                                 [float(t) for t in args.zone_thresholds.split(",")])
        print(f"\n0-6 scores by zone threshold T ({args.images} phantoms; the line above is at "
              f"T = {pipeline.scoring.zone_threshold:g}):\n| T | MAE | exact | zone accuracy |\n|---|---|---|---|")
        for t in out["zone_thresholds"]:
            print(f"| {t['zone_threshold']:.2f} | {t['mae']:.3f} | {t['exact']:.2f} | {t['zone_accuracy']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({**out, "per_image": result.per_image}, indent=1, default=float))


if __name__ == "__main__":
    main()
