"""Briefly trained weights for the paper's architectures, so that benchmarks see real masks.

    python bench/paper_weights.py [--steps 400 300] [--tasks lungs disease] [--out ~/.cache/cxrtriage/bench-weights]

The published checkpoints (DeepLabV3+/efficientnet-b1 @ 512, MA-Net/regnetx_064 @ 544)
cannot be downloaded here, and untrained weights give empty masks, which hides the
post-processing a real mask costs. This trains both architectures on phantoms (the
datasets, losses and file format of ``cxrtriage train``) on random crops of model-sized
images: meant to give lung and opacity masks of a realistic size, not a model to use.
The step counts are budgets: training stops early once the held-out masks are good
enough (see ``good_enough``); the held-out Dice, mask pixel counts and every check are
stored in the file's metadata: check them. Measured on the shared 2-core machine
(2026-11-27, one thread each, both stages at once, load 3-9): lungs used all 400 steps
(1060 s, held-out Dice 0.82-0.97), disease stopped after 50 (775 s, opacity Dice
0.42-0.93, P(disease) 0.85-1.0). Before BatchNorm statistics were recomputed on whole
images, 50-100 lung steps gave all-background masks. The files (fp16 safetensors, 15 MB
and ~210 MB) are cached and reused; they stay out of git. (``cxrtriage train`` builds these architectures too
since its Unet-only decoder default was fixed; this script adds the crops and the caching.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cxrtriage.inference.models import create_model, save_bundled  # noqa: E402
from cxrtriage.inference.training.datasets import Sample, synthetic_samples  # noqa: E402
from cxrtriage.inference.training.losses import DynamicWeighting, segmentation_loss  # noqa: E402
from cxrtriage.inference.training.metrics import dice  # noqa: E402
from cxrtriage.inference.training.trainer import HELD_OUT_SEED_BASE, TrainConfig  # noqa: E402

DEFAULT_DIR = Path(os.environ.get("CXRTRIAGE_CACHE", Path.home() / ".cache" / "cxrtriage")) / "bench-weights"

#: (task, arch, encoder, input size): the paper's pair (docs/models.md, preset danilov2022).
PAPER = (("lungs", "DeepLabV3Plus", "efficientnet-b1", 512), ("disease", "MAnet", "timm-regnetx_064", 544))


def _crop_origin(mask: np.ndarray, crop: int, rng: np.random.Generator, positive: float) -> tuple[int, int]:
    """Top-left corner of a crop: centred on a random mask pixel with probability ``positive``, else anywhere.

    Positive-rich crops: uniform crops of a Stage II input rarely hold an opacity, and a
    network that sees mostly background learns to predict background.
    """
    size = mask.shape[0]
    ys, xs = np.nonzero(mask) if rng.random() < positive else ((), ())
    if len(ys):
        k = int(rng.integers(0, len(ys)))
        centre = np.array([ys[k], xs[k]]) + rng.integers(-crop // 4, crop // 4 + 1, 2)
        return tuple(int(v) for v in np.clip(centre - crop // 2, 0, size - crop))  # type: ignore[return-value]
    y0, x0 = (int(v) for v in rng.integers(0, size - crop + 1, 2))
    return y0, x0


def _batch(samples: list[Sample], rng: np.random.Generator, batch_size: int, crop: int, positive: float,
           mean: float, std: float) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Normalised 3-channel crops, their masks and their labels (whether the crop holds any mask)."""
    xs, ys, labels = [], [], []
    for i in rng.integers(0, len(samples), batch_size):
        s = samples[int(i)]
        y0, x0 = _crop_origin(s.mask, crop, rng, positive)
        xs.append(s.image[y0 : y0 + crop, x0 : x0 + crop])
        ys.append(s.mask[y0 : y0 + crop, x0 : x0 + crop])
        labels.append(float(ys[-1].any()))
    x = ((torch.from_numpy(np.stack(xs))[:, None] - mean) / std).expand(-1, 3, -1, -1)
    y = torch.from_numpy(np.stack(ys).astype(np.float32))[:, None]
    return x.contiguous(memory_format=torch.channels_last), y, labels


def recalibrate_batch_norm(model: torch.nn.Module, samples: list[Sample], mean: float, std: float,
                           device: torch.device, images: int = 8, batch_size: int = 2) -> None:
    """Recompute every BatchNorm's running statistics on whole model-sized images.

    Training on crops with the encoders' slow running averages (efficientnet's momentum is
    0.01) leaves statistics that do not fit whole images: eval-mode masks then came out
    empty while the training loss fell. A plain average over a few whole images fits them.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the passes below
    model.train()
    with torch.no_grad():
        for start in range(0, min(images, len(samples)), batch_size):
            chunk = samples[start : start + batch_size]
            x = ((torch.from_numpy(np.stack([s.image for s in chunk]))[:, None] - mean) / std).expand(-1, 3, -1, -1)
            model(x.contiguous(memory_format=torch.channels_last).to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


def held_out_check(model: torch.nn.Module, held_out: list[Sample], mean: float, std: float,
                   device: torch.device) -> dict[str, list[Any]]:
    """Whole model-sized held-out images in eval mode, as the pipeline sees them: Dice, mask pixels, P(disease)."""
    dices, pixels, probs = [], [], []
    model.eval()
    with torch.inference_mode():
        for s in held_out:
            x = ((torch.from_numpy(s.image)[None, None] - mean) / std).expand(-1, 3, -1, -1).to(device)
            out = model(x)
            seg, cls = out if isinstance(out, tuple) else (out, None)
            pred = (torch.sigmoid(seg.float())[0, 0] > 0.5).cpu().numpy()
            p = 1.0 if cls is None else float(torch.sigmoid(cls.float()))
            if p < 0.5:  # the pipeline's Stage II gate
                pred = np.zeros_like(pred)
            dices.append(round(dice(pred, s.mask), 3))
            pixels.append(int(pred.sum()))
            probs.append(round(p, 3))
    model.train()
    return {"dice": dices, "mask_pixels": pixels, "p_disease": probs}


def good_enough(task: str, check: dict[str, list[Any]]) -> bool:
    """Realistic masks: every held-out mask non-empty, lung Dice >= 0.8 / opacity Dice >= 0.3 with P >= 0.5."""
    if not check["dice"]:  # no held-out image with an opacity: nothing says the masks are real
        return False
    if task == "lungs":
        return min(check["mask_pixels"]) > 0 and min(check["dice"]) >= 0.8
    return (min(check["mask_pixels"]) > 0 and statistics.fmean(check["dice"]) >= 0.3
            and min(check["p_disease"]) >= 0.5)


def _held_out(task: str, size: int, count: int, workers: int) -> list[Sample]:
    """``count`` held-out phantoms; for Stage II only diseased ones (a normal one has no opacity to find)."""
    seeds = range(HELD_OUT_SEED_BASE + 60_000, HELD_OUT_SEED_BASE + 60_000 + 4 * count)
    samples = synthetic_samples(task, seeds, size, workers=workers, equalize_image=True)  # type: ignore[arg-type]
    if task == "disease":
        samples = [s for s in samples if s.mask.any()]
    return samples[:count]


def train_on_crops(task: str, arch: str, encoder: str, size: int, steps: int, path: Path, *, crop: int = 192,
                   batch_size: int = 4, images: int = 32, device: str = "cpu", seed: int = 0, workers: int = 1,
                   lr: float = 3e-3, warmup: int = 10, positive: float = 0.7, check_every: int = 25,
                   held_out_images: int = 4) -> Path:
    """Train one stage on ``crop`` x ``crop`` windows of model-sized phantom samples, up to ``steps`` steps.

    A fully convolutional network trained on crops of the model-sized image sees
    lungs and opacities at the scale it will meet at ``size``, for a fraction of
    the cost of whole images (CPU training at 512 px took about a minute per step
    on the shared 2-core machine). Dice + BCE, AdamW with a linear warm-up, crops
    centred on a mask pixel with probability ``positive``; every ``check_every``
    steps the BatchNorm statistics are recomputed on whole training images
    (:func:`recalibrate_batch_norm`), the held-out phantoms are scored whole, in eval mode, and training stops
    early once :func:`good_enough`. The spec (input size, normalisation,
    equalisation) is the one ``cxrtriage train`` writes.
    """
    t0 = time.monotonic()
    torch.manual_seed(seed)
    cfg = TrainConfig(task=task, arch=arch, encoder=encoder, arch_kwargs={}, input_size=size, in_channels=3,
                      steps=steps, batch_size=batch_size, device=device, version=f"bench-crops-{steps}steps")
    spec = cfg.spec()
    base = (HELD_OUT_SEED_BASE - 10_000) if seed == 0 else seed * 100_000
    samples = synthetic_samples(task, range(base, base + images), size, workers=workers,  # type: ignore[arg-type]
                                equalize_image=True)
    held_out = _held_out(task, size, held_out_images, workers)
    dev = torch.device(device)
    model = create_model(spec).to(dev).to(memory_format=torch.channels_last)
    model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: min(1.0, (step + 1) / warmup))
    weighting = DynamicWeighting(0.5)
    rng = np.random.default_rng(seed + 1)
    mean, std = spec.mean[0], spec.std[0]
    crop = min(crop, size)
    history: list[dict[str, Any]] = []
    done = 0
    while done < steps:
        x, y, labels = _batch(samples, rng, batch_size, crop, positive, mean, std)
        out = model(x.to(dev))
        if isinstance(out, tuple):
            cls_loss = torch.nn.functional.binary_cross_entropy_with_logits(
                out[1].float(), torch.tensor(labels, device=dev)[:, None])
            loss = weighting([segmentation_loss(out[0].float(), y.to(dev)), cls_loss])
        else:
            loss = segmentation_loss(out.float(), y.to(dev))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        done += 1
        if done % check_every == 0 or done == steps:
            recalibrate_batch_norm(model, samples, mean, std, dev)
            check = held_out_check(model, held_out, mean, std, dev)
            history.append({"step": done, "loss": round(loss.item(), 3), "seconds": round(time.monotonic() - t0)}
                           | check)
            print(f"  {task} step {done}: {json.dumps(history[-1])}", file=sys.stderr, flush=True)
            if good_enough(task, check):
                break
    model.eval()
    final = history[-1]
    facts = {"steps": done, "step_budget": steps, "crop": crop, "batch_size": batch_size, "lr": lr,
             "warmup": warmup, "positive_crops": positive, "train_images": images, "data": "synthetic",
             "held_out_images": len(held_out), "held_out_dice": final["dice"],
             "held_out_mask_pixels": final["mask_pixels"], "held_out_p_disease": final["p_disease"],
             "good_enough": good_enough(task, final), "checks": history,
             "seconds": round(time.monotonic() - t0, 1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_bundled(model, spec, path, facts)
    print(f"trained {task} {arch}/{encoder} @ {size} on {crop}-px crops: {json.dumps(facts)} -> {path}",
          file=sys.stderr)
    return path


def paper_weights(folder: Path = DEFAULT_DIR, steps: tuple[int, int] = (400, 300), device: str = "cpu",
                  sizes: tuple[int, int] | None = None, crop: int = 192, batch_sizes: tuple[int, int] = (4, 2),
                  images: int = 32, workers: int = 1, tasks: tuple[str, ...] = ("lungs", "disease")) -> dict[str, Path]:
    """``{"lungs": path, "disease": path}``: cached files, or trained now (minutes on 2 CPU cores).

    ``sizes`` overrides the input sizes (the tests' dry runs use tiny ones); the file
    name holds size and steps, so a dry run never replaces the benchmark's weights.
    """
    paths = {}
    for (task, arch, encoder, size), n, override, batch in zip(PAPER, steps, sizes or (None, None), batch_sizes):
        if task not in tasks:
            continue
        size = override or size
        path = folder / f"{task}-{arch}-{encoder}-{size}-{n}steps.safetensors"
        if not path.exists():
            train_on_crops(task, arch, encoder, size, n, path, crop=crop, device=device, batch_size=batch,
                           images=images, workers=workers)
        paths[task] = path
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs=2, default=[400, 300], metavar=("LUNGS", "DISEASE"))
    parser.add_argument("--crop", type=int, default=192)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--tasks", nargs="+", default=["lungs", "disease"], choices=["lungs", "disease"],
                        help="train only these (two commands can train both stages at once)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a busy shared machine, more threads wait on each other)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for task, path in paper_weights(args.out, tuple(args.steps), args.device, crop=args.crop,
                                    tasks=tuple(args.tasks)).items():
        print(f"{task}: {path} ({path.stat().st_size / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
