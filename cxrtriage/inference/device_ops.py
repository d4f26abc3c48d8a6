"""Stage I post-processing as torch operations, for the scoring engine on an accelerator.

The same steps as :func:`~.pipeline.lung_crop` and :func:`~.pipeline.model_inputs`,
written so that the 5-megapixel work (bringing the lung probabilities to full
resolution, masking, cropping, shrinking the crop into Stage II) runs where
the image already is: the device. Each mirrors its OpenCV counterpart
(bilinear with half-pixel centres; area averaging with fractional edge
weights) so results agree with the CPU path to float rounding; the tests
check that on CPU tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .preprocess import CropBox


def area_weights(source: int, target: int, device: torch.device) -> torch.Tensor:
    """(target, source) matrix averaging ``source`` samples into ``target`` (OpenCV's INTER_AREA when shrinking)."""
    scale = source / target
    lo = torch.arange(target, device=device, dtype=torch.float64)[:, None] * scale
    j = torch.arange(source, device=device, dtype=torch.float64)[None, :]
    overlap = (torch.minimum(j + 1, lo + scale) - torch.maximum(j, lo)).clamp(min=0)
    return (overlap / scale).float()


def resize_like_cv2(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """:func:`~.preprocess.resize` for a float (H, W) tensor: area when shrinking both sides, else bilinear."""
    h, w = size
    if tuple(image.shape) == (h, w):
        return image
    if h < image.shape[0] and w < image.shape[1]:
        rows = area_weights(image.shape[0], h, image.device)
        cols = area_weights(image.shape[1], w, image.device)
        return rows @ image.float() @ cols.T
    return F.interpolate(image[None, None].float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0]


def box_of(mask: torch.Tensor, margin: float) -> CropBox:
    """:func:`~.preprocess.lung_box` of a bool (H, W) tensor (one host sync for four integers)."""
    h, w = mask.shape
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    if rows.numel() == 0 or cols.numel() == 0:
        return CropBox(0, h, 0, w)
    top, bottom, left, right = (int(v) for v in torch.stack([rows[0], rows[-1], cols[0], cols[-1]]).tolist())
    my, mx = int(round(margin * h)), int(round(margin * w))
    return CropBox(max(0, top - my), min(h, bottom + 1 + my), max(0, left - mx), min(w, right + 1 + mx))


def lung_labels(blobs: torch.Tensor, shape: tuple[int, int], threshold: float) -> torch.Tensor:
    """(K, s, s) kept blob probabilities -> (H, W) uint8: 0 outside the lungs, k + 1 inside blob k.

    Kept blobs are separate 8-connected components, so no bilinear sample
    mixes two of them and the full-resolution masks never overlap.
    """
    labels = torch.zeros(shape, dtype=torch.uint8, device=blobs.device)
    if blobs.shape[0] == 0:
        return labels
    full = F.interpolate(blobs[None].float(), size=shape, mode="bilinear", align_corners=False)[0] > threshold
    for k in range(blobs.shape[0] - 1, -1, -1):  # the largest blob written last wins, were they ever to touch
        labels[full[k]] = k + 1
    return labels


def crop_input(
    image: torch.Tensor, labels: torch.Tensor, margin: float, size: int, mean: Sequence[float], std: Sequence[float]
) -> tuple[CropBox, torch.Tensor]:
    """The lung box, and Stage II's (C, size, size) input: the image masked by the lungs, cropped, resized and
    normalised."""
    lungs = labels > 0
    box = box_of(lungs, margin)
    crop = torch.where(lungs, image, torch.zeros((), dtype=image.dtype, device=image.device))
    crop = crop[box.top : box.bottom, box.left : box.right]
    resized = resize_like_cv2(crop, (size, size))
    m = torch.tensor(mean, dtype=torch.float32, device=image.device)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32, device=image.device)[:, None, None]
    return box, (resized[None] - m) / s
