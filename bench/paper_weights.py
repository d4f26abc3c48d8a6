"""Briefly trained weights for the paper's architectures, so that benchmarks see real masks.

    python bench/paper_weights.py [--steps 400 300] [--out ~/.cache/cxrtriage/bench-weights]

The published checkpoints (DeepLabV3+/efficientnet-b1 @ 512, MA-Net/regnetx_064 @ 544)
cannot be downloaded here, and untrained weights give empty masks, which hides the
post-processing a real mask costs. This trains both architectures on phantoms (the
datasets, losses and file format of ``cxrtriage train``) on random crops of model-sized
images: meant to give lung and opacity masks of a realistic size, not a model to use.
The held-out Dice and mask pixel counts are printed and stored in the file's metadata:
check them. Measured on the shared 2-core machine: 50 lung steps (192-px crops, batch 4,
one thread, 258 s) still gave all-background masks; the default step counts are a guess
that no run here has confirmed. The files (fp16 safetensors, 15 MB and ~200 MB) are
cached and reused; they stay out of git. (``cxrtriage train`` builds these architectures too
since its Unet-only decoder default was fixed; this script adds the crops and the caching.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cxrtriage.inference.models import create_model, save_bundled  # noqa: E402
from cxrtriage.inference.training.datasets import synthetic_samples  # noqa: E402
from cxrtriage.inference.training.losses import DynamicWeighting, segmentation_loss  # noqa: E402
from cxrtriage.inference.training.metrics import dice  # noqa: E402
from cxrtriage.inference.training.trainer import HELD_OUT_SEED_BASE, TrainConfig  # noqa: E402

DEFAULT_DIR = Path(os.environ.get("CXRTRIAGE_CACHE", Path.home() / ".cache" / "cxrtriage")) / "bench-weights"

#: (task, arch, encoder, input size): the paper's pair (docs/models.md, preset danilov2022).
PAPER = (("lungs", "DeepLabV3Plus", "efficientnet-b1", 512), ("disease", "MAnet", "timm-regnetx_064", 544))


def train_on_crops(task: str, arch: str, encoder: str, size: int, steps: int, path: Path, *, crop: int = 192,
                   batch_size: int = 4, images: int = 32, device: str = "cpu", seed: int = 0, workers: int = 1) -> Path:
    """Train one stage on random ``crop`` x ``crop`` windows of model-sized phantom samples.

    A fully convolutional network trained on crops of the model-sized image sees
    lungs and opacities at the scale it will meet at ``size``, for a fraction of
    the cost of whole images (CPU training at 512 px took about a minute per step
    on the shared 2-core machine). The spec (input size, normalisation,
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
    held_out = synthetic_samples(task, range(HELD_OUT_SEED_BASE + 60_000, HELD_OUT_SEED_BASE + 60_004), size,  # type: ignore[arg-type]
                                 workers=workers, equalize_image=True)
    dev = torch.device(device)
    model = create_model(spec).to(dev).to(memory_format=torch.channels_last)
    model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    weighting = DynamicWeighting(0.5)
    rng = np.random.default_rng(seed + 1)
    mean, std = spec.mean[0], spec.std[0]
    crop = min(crop, size)
    for _ in range(steps):
        xs, ys, labels = [], [], []
        for i in rng.integers(0, len(samples), batch_size):
            s = samples[int(i)]
            y0, x0 = (int(v) for v in rng.integers(0, size - crop + 1, 2))
            xs.append(s.image[y0 : y0 + crop, x0 : x0 + crop])
            ys.append(s.mask[y0 : y0 + crop, x0 : x0 + crop])
            labels.append(float(ys[-1].any()))
        x = ((torch.from_numpy(np.stack(xs))[:, None] - mean) / std).expand(-1, 3, -1, -1).to(dev)
        y = torch.from_numpy(np.stack(ys).astype(np.float32))[:, None].to(dev)
        out = model(x.contiguous(memory_format=torch.channels_last))
        if isinstance(out, tuple):
            cls_loss = torch.nn.functional.binary_cross_entropy_with_logits(
                out[1].float(), torch.tensor(labels, device=dev)[:, None])
            loss = weighting([segmentation_loss(out[0].float(), y), cls_loss])
        else:
            loss = segmentation_loss(out.float(), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    model.eval()
    dices, pixels = [], []
    with torch.inference_mode():
        for s in held_out:
            x = ((torch.from_numpy(s.image)[None, None] - mean) / std).expand(-1, 3, -1, -1).to(dev)
            out = model(x)
            seg, cls = out if isinstance(out, tuple) else (out, None)
            pred = (torch.sigmoid(seg.float())[0, 0] > 0.5).cpu().numpy()
            if cls is not None and float(torch.sigmoid(cls.float())) < 0.5:
                pred = np.zeros_like(pred)
            dices.append(dice(pred, s.mask))
            pixels.append(int(pred.sum()))
    facts = {"steps": steps, "crop": crop, "batch_size": batch_size, "train_images": images, "data": "synthetic",
             "held_out_dice": [round(float(d), 3) for d in dices], "held_out_mask_pixels": pixels,
             "seconds": round(time.monotonic() - t0, 1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_bundled(model, spec, path, facts)
    print(f"trained {task} {arch}/{encoder} @ {size} on {crop}-px crops: {json.dumps(facts)} -> {path}",
          file=sys.stderr)
    return path


def paper_weights(folder: Path = DEFAULT_DIR, steps: tuple[int, int] = (400, 300), device: str = "cpu",
                  sizes: tuple[int, int] | None = None, crop: int = 192, batch_sizes: tuple[int, int] = (4, 2),
                  images: int = 32, workers: int = 1) -> dict[str, Path]:
    """``{"lungs": path, "disease": path}``: cached files, or trained now (minutes on 2 CPU cores).

    ``sizes`` overrides the input sizes (the tests' dry runs use tiny ones); the file
    name holds size and steps, so a dry run never replaces the benchmark's weights.
    """
    paths = {}
    for (task, arch, encoder, size), n, override, batch in zip(PAPER, steps, sizes or (None, None), batch_sizes):
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
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a busy shared machine, more threads wait on each other)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for task, path in paper_weights(args.out, tuple(args.steps), args.device, crop=args.crop).items():
        print(f"{task}: {path} ({path.stat().st_size / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
