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

import math
from collections.abc import Sequence

import numpy as np
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


def boxes_of(masks: torch.Tensor, margin: float) -> list[CropBox]:
    """:func:`~.preprocess.lung_box` of each bool (H, W) mask of ``masks`` (N, H, W): one host wait for all."""
    _, h, w = masks.shape
    rows, cols = masks.any(dim=2), masks.any(dim=1)

    def span(lines: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # first and last True of each row
        as_u8 = lines.to(torch.uint8)
        return as_u8.argmax(dim=1), lines.shape[1] - 1 - as_u8.flip(1).argmax(dim=1)

    (top, bottom), (left, right) = span(rows), span(cols)
    found = rows.any(dim=1).to(top.dtype)
    my, mx = int(round(margin * h)), int(round(margin * w))
    boxes = []
    for t, b, lt, rt, ok in host_copy(torch.stack([top, bottom, left, right, found], dim=1)).tolist():
        boxes.append(CropBox(max(0, t - my), min(h, b + 1 + my), max(0, lt - mx), min(w, rt + 1 + mx))
                     if ok else CropBox(0, h, 0, w))
    return boxes


def lung_masks_batch(blobs: torch.Tensor, shape: tuple[int, int], threshold: float) -> torch.Tensor:
    """(N, K, s, s) kept blob probabilities of N images of one ``shape`` (all-zero planes where an image has
    fewer than K) -> (N, H, W) bool: each image's lungs at full resolution, as :func:`~.pipeline.lung_masks`
    makes their union (each blob brought to ``shape`` bilinearly, thresholded)."""
    if blobs.shape[1] == 0:
        return torch.zeros((blobs.shape[0], *shape), dtype=torch.bool, device=blobs.device)
    return (F.interpolate(blobs.float(), size=shape, mode="bilinear", align_corners=False) > threshold).any(dim=1)


def crop_to_input(
    image: torch.Tensor, lungs: torch.Tensor, box: CropBox, size: int, mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
) -> torch.Tensor:
    """Stage II's (C, size, size) input: ``image`` inside ``box``, masked by ``lungs`` (bool), resized and
    normalised. Pass ``mean`` and ``std`` as tensors on the image's device: a list is copied there from the
    host, and that copy waits for everything queued before it."""
    rows, columns = slice(box.top, box.bottom), slice(box.left, box.right)
    crop = torch.where(lungs[rows, columns], image[rows, columns], torch.zeros((), dtype=image.dtype,
                                                                              device=image.device))
    return model_input(crop, size, mean, std)


def model_input(image: torch.Tensor, size: int, mean: Sequence[float] | torch.Tensor,
                std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """:func:`~.pipeline.model_inputs` of one float (H, W) image: (C, size, size), resized and normalised
    (tensors for ``mean`` and ``std`` on the image's device, as for :func:`crop_to_input`)."""
    resized = resize_like_cv2(image, (size, size))
    m = torch.as_tensor(mean, dtype=torch.float32, device=image.device)[:, None, None]
    s = torch.as_tensor(std, dtype=torch.float32, device=image.device)[:, None, None]
    return (resized[None] - m) / s


#: Label-propagation rounds between two checks for convergence (each check waits for the device).
_ROUNDS_PER_CHECK = 4
#: Pointer jumps in each round of :func:`label_components`.
_JUMPS_PER_ROUND = 2
#: Rounds after which :func:`lung_blobs_batch` gives up and the caller finds the blobs on the host (lungs,
#: crescents and serpentines take 5-12 at 512 px; no map seen needs more than a few tens).
MAX_LABEL_ROUNDS = 256


def _morphology(mask: torch.Tensor, offsets: list[tuple[int, int]], radius: int, erode: bool) -> torch.Tensor:
    """cv2.erode / cv2.dilate of the bool (N, H, W) ``mask`` with a symmetric kernel (its ``offsets`` into a
    window of ``2 * radius + 1``), cv2's default border: the outside neither erodes nor dilates."""
    h, w = mask.shape[1:]
    padded = F.pad(mask.to(torch.uint8), (radius, radius, radius, radius), value=1 if erode else 0)
    windows = (padded[:, dy:dy + h, dx:dx + w] for dy, dx in offsets)
    out = next(windows).clone()
    for window in windows:
        torch.minimum(out, window, out=out) if erode else torch.maximum(out, window, out=out)
    return out.bool()


def label_components(mask: torch.Tensor) -> torch.Tensor | None:
    """8-connected components of the bool (N, H, W) ``mask``: (N, H, W) int64, each pixel of a component
    labelled with the component's first pixel in raster order (its smallest flat index, so labels sort as
    scipy.ndimage.label numbers them), H * W outside; None if it takes over :data:`MAX_LABEL_ROUNDS` rounds
    (or H * W is over 2**24, where float32 labels would not be exact).

    Each round takes the smallest label of each pixel's 3 x 3 neighbourhood; gives it also to the pixel the
    label names (hooking: a smaller label found at one end of a long thin blob reaches the component's
    representative at once, where a 3 x 3 minimum alone crawls along a crescent one pixel a round, about 240
    rounds at 512 px); then follows each label to that pixel's own label (:data:`_JUMPS_PER_ROUND` times).
    Labels only fall and always name a pixel of the same component, so at the fixed point each component
    holds one label, its smallest index."""
    n, h, w = mask.shape
    if h * w > 1 << 24:
        return None
    outside = float(h * w)  # float32 labels: exact up to 2**24, and max_pool2d takes no integers on CUDA
    flat_index = torch.arange(h * w, dtype=torch.float32, device=mask.device).view(1, h, w)
    labels = torch.where(mask, flat_index, outside)
    for _ in range(0, MAX_LABEL_ROUNDS, _ROUNDS_PER_CHECK):
        before = labels
        for _ in range(_ROUNDS_PER_CHECK):
            smallest = torch.where(mask, -F.max_pool2d(-labels[:, None], 3, stride=1, padding=1)[:, 0], outside)
            flat = labels.reshape(n, -1)
            # outside pixels name the last pixel with the outside label: amin leaves it as it is
            hooked = flat.scatter_reduce(1, flat.long().clamp(max=h * w - 1), smallest.reshape(n, -1), "amin")
            labels = torch.where(mask, torch.minimum(hooked.view(n, h, w), smallest), outside)
            for _ in range(_JUMPS_PER_ROUND):
                flat = labels.view(n, -1)
                labels = torch.where(mask, flat.gather(1, flat.long().clamp(max=h * w - 1)).view(n, h, w),
                                     outside)
        if not _on_host((labels != before).any()):
            return labels.long()
    return None


def _on_host(flag: torch.Tensor) -> bool:
    """A 0-d bool tensor's value, waited for asleep (:func:`host_copy`)."""
    return bool(host_copy(flag))


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the host. On CUDA copied into page-locked memory and waited for on a blocking event,
    asleep: ``.cpu()`` or ``.tolist()`` would spin a CPU core until the stream gets there, behind another
    lane's network."""
    if tensor.device.type != "cuda":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    done = torch.cuda.Event(blocking=True)
    done.record()
    done.synchronize()
    return host


def _areas(labels: torch.Tensor) -> torch.Tensor:
    """(N, H * W + 1) int64: the pixels of each label of ``labels`` (:func:`label_components`); the last is the
    outside."""
    n = labels.shape[0]
    flat = labels.view(n, -1)
    return torch.zeros((n, flat.shape[1] + 1), dtype=torch.int64, device=labels.device).scatter_add_(
        1, flat, torch.ones_like(flat))


def lung_blobs_batch(probs: torch.Tensor, threshold: float, min_fraction: float,
                     kernel: np.ndarray) -> torch.Tensor | None:
    """:func:`~.pipeline.model_blobs` of each (S, S) map of Stage I's ``probs`` (N, S, S), on their device:
    (N, 2, S, S), each image's (at most) two lungs' cleaned probabilities, largest first, all-zero planes
    where it has fewer; ``kernel`` is :func:`~.pipeline.lung_kernel`'s. The same values as the host's
    (opening and closing as OpenCV's, components as scipy's, ties by raster order); None where the labelling
    does not settle (:func:`label_components`), for the host to do."""
    n, h, w = probs.shape
    radius = kernel.shape[0] // 2
    offsets = [(int(dy), int(dx)) for dy, dx in zip(*np.nonzero(kernel))]
    mask = probs > threshold
    opened = _morphology(_morphology(mask, offsets, radius, True), offsets, radius, False)
    mask = _morphology(_morphology(opened, offsets, radius, False), offsets, radius, True)
    labels = label_components(mask)
    if labels is None:
        return None
    # whole pixels: the host compares the areas with the float64 min_fraction * (h * w), the same as this
    large = _areas(labels).gather(1, labels.view(n, -1)).view(n, h, w) >= math.ceil(min_fraction * (h * w))
    cleaned = probs * (mask & large)
    labels = label_components(cleaned > threshold)
    if labels is None:
        return None
    areas = _areas(labels)[:, :-1]
    # the two largest, the first in raster order among equals (a stable sort of scipy's labels)
    order = areas * (h * w + 1) + (h * w - torch.arange(h * w, device=probs.device))
    top = order.topk(min(2, h * w), dim=1)
    chosen = torch.where(areas.gather(1, top.indices) > 0, top.indices, -1)  # -1: no such blob
    return cleaned[:, None] * (labels[:, None] == chosen[:, :, None, None])
