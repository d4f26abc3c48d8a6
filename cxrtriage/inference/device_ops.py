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


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The batch sizes the device runs: powers of two below ``max_batch``, and ``max_batch``.

    ``cudnn.benchmark`` searches kernels once per input shape, several seconds
    per shape for these networks on an H100; 32 sizes made the engine's
    warm-up take minutes. Padding each batch up to its bucket keeps that to
    log2(max_batch) + 1 shapes (and CUDA graphs, one per shape, as few) for
    at most twice the work on a half-full batch.
    """
    sizes = []
    n = 1
    while n < max_batch:
        sizes.append(n)
        n *= 2
    return (*sizes, max_batch)


def pad_to_bucket(x: torch.Tensor, buckets: Sequence[int]) -> torch.Tensor:
    """``x`` (N, ...) with zero rows appended up to the smallest bucket >= N (the caller keeps the first N)."""
    n = x.shape[0]
    size = next((b for b in buckets if b >= n), n)
    if size == n:
        return x
    return torch.cat([x, x.new_zeros((size - n, *x.shape[1:]))])


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


def lung_mask(blobs: torch.Tensor, shape: tuple[int, int], threshold: float) -> torch.Tensor:
    """(K, s, s) kept blob probabilities -> (H, W) bool: the lungs at full resolution, as
    :func:`~.pipeline.lung_masks` makes their union (each blob brought to ``shape`` bilinearly, thresholded)."""
    if blobs.shape[0] == 0:
        return torch.zeros(shape, dtype=torch.bool, device=blobs.device)
    full = F.interpolate(blobs[None].float(), size=shape, mode="bilinear", align_corners=False)[0] > threshold
    return full.any(dim=0)


def crop_input(
    image: torch.Tensor, lungs: torch.Tensor, margin: float, size: int, mean: Sequence[float], std: Sequence[float]
) -> tuple[CropBox, torch.Tensor]:
    """The lung box, and Stage II's (C, size, size) input: the image masked by ``lungs`` (bool), cropped,
    resized and normalised."""
    box = box_of(lungs, margin)
    crop = torch.where(lungs, image, torch.zeros((), dtype=image.dtype, device=image.device))
    crop = crop[box.top : box.bottom, box.left : box.right]
    resized = resize_like_cv2(crop, (size, size))
    m = torch.tensor(mean, dtype=torch.float32, device=image.device)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32, device=image.device)[:, None, None]
    return box, (resized[None] - m) / s
