"""Held-out quality of the configured models on synthetic radiographs.

    python bench/eval_synthetic.py [--images 200] [--config config.yaml]

Prints lung Dice, 0-6 score MAE, P(disease) ROC AUC and more; the numbers
in docs/model-card.md come from this script.
"""

from __future__ import annotations

import argparse
import json

from cxrtriage.config import load_settings
from cxrtriage.inference.pipeline import Pipeline
from cxrtriage.inference.training.evaluation import evaluate_synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--config", default=None)
    args = parser.parse_args()
    pipeline = Pipeline(load_settings(args.config).inference)
    result = evaluate_synthetic(pipeline, args.images)
    print(json.dumps({"models": pipeline.model_versions, **result.as_dict()}, indent=2))
    print(
        f"lung Dice {result.lung_dice:.4f} (goal >= 0.95) | score MAE {result.score_mae:.3f} (goal <= 0.5) | "
        f"AUC {result.auc:.4f} (goal >= 0.95)"
    )


if __name__ == "__main__":
    main()
