"""Losses of the two stages, and the dynamic weighting of Stage II's two tasks."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per image, averaged over the batch."""
    prob = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1)
    inter = (prob * target).sum(1)
    denom = prob.sum(1) + target.sum(1)
    return (1.0 - (2.0 * inter + eps) / (denom + eps)).mean()


def below_base(target: torch.Tensor) -> torch.Tensor:
    """1 where a pixel lies below the lowest target pixel of its column (columns holding any target), else 0.

    For lung masks that is the abdomen under the domes and the heart under the medial lung edges: where a
    lung drawn too low lands (the failure on real films).
    """
    at_or_above_lowest = torch.flip(torch.cummax(torch.flip(target, dims=[-2]), dim=-2).values, dims=[-2])
    return (1.0 - at_or_above_lowest) * target.amax(dim=-2, keepdim=True)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, base_weight: float = 1.0) -> torch.Tensor:
    """Dice + binary cross-entropy: Dice for overlap, BCE for calibrated probabilities.

    ``base_weight`` > 1 weighs the cross-entropy of pixels :func:`below_base` that much more: a false
    positive under the lung's base costs more than one elsewhere, so uncertain bases are drawn higher.
    """
    weight = None if base_weight == 1.0 else 1.0 + (base_weight - 1.0) * below_base(target)
    return dice_loss(logits, target) + F.binary_cross_entropy_with_logits(logits, target, weight=weight)


class DynamicWeighting:
    """Balances the segmentation and classification losses of Stage II.

    Each task's weight is inversely proportional to a running mean of its
    own loss, so that both contribute about equally to the gradient however
    different their scales are (Danilov et al. 2022 use such a dynamic
    weighting; ``alpha`` is the smoothing factor of the running means, 0.5
    by default: each step's loss counts half). Weights sum to the number of
    tasks.
    """

    def __init__(self, alpha: float = 0.5, tasks: int = 2) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.running: list[float] | None = None
        self.tasks = tasks

    def weights(self, losses: list[torch.Tensor]) -> list[float]:
        values = [max(float(loss.detach()), 1e-8) for loss in losses]
        if self.running is None:
            self.running = values
        else:
            self.running = [self.alpha * v + (1 - self.alpha) * r for v, r in zip(values, self.running)]
        inverse = [1.0 / r for r in self.running]
        scale = self.tasks / sum(inverse)
        return [scale * i for i in inverse]

    def __call__(self, losses: list[torch.Tensor]) -> torch.Tensor:
        terms = [w * loss for w, loss in zip(self.weights(losses), losses)]
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        return total
