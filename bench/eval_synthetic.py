"""Held-out quality of the configured models on synthetic radiographs.

    python bench/eval_synthetic.py [--images 200] [--config config.yaml] [--lungs W] [--disease W] [--zone-threshold T]

Prints lung Dice, 0-6 score MAE, P(disease) ROC AUC and more; the numbers
in docs/model-card.md come from this script.
"""

from __future__ import annotations

import argparse
import json

from cxrtriage.config import InferenceSettings, load_settings
from cxrtriage.inference.pipeline import Pipeline
from cxrtriage.inference.training.evaluation import candidate_settings, evaluate_synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--config", default=None)
    parser.add_argument("--lungs", default=None, help="Stage I weights instead of the configured ones")
    parser.add_argument("--disease", default=None, help="Stage II weights instead of the configured ones")
    parser.add_argument("--zone-threshold", type=float, default=None,
                        help="score with this T instead of the disease model's (a candidate's T, before bundling)")
    args = parser.parse_args()
    settings: InferenceSettings = load_settings(args.config).inference
    # candidate weights or T, e.g. a training run's, scored before they are bundled
    settings = candidate_settings(settings, args.lungs, args.disease, args.zone_threshold)
    pipeline = Pipeline(settings)
    result = evaluate_synthetic(pipeline, args.images)
    print(json.dumps({"models": pipeline.model_versions, **result.as_dict()}, indent=2))
    print(
        f"lung Dice {result.lung_dice:.4f} (goal >= 0.95) | score MAE {result.score_mae:.3f} (goal <= 0.5) | "
        f"AUC {result.auc:.4f} (goal >= 0.95)"
    )


if __name__ == "__main__":
    main()
