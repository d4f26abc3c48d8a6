"""The training loop of both stages: CPU or CUDA (bf16 autocast), same code.

Samples are prepared once into memory at model size (the expensive part,
drawing phantoms or decoding files, happens once), then augmented on the fly
each step. Every ``eval_every`` steps the held-out set is scored and
``<task>.last.safetensors`` / ``<task>.best.safetensors`` checkpoints are
written; at the end the best model becomes ``<task>.safetensors`` (fp16, with
its :class:`~cxrtriage.inference.models.ModelSpec`), next to a JSONL metrics log.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from ..models import ModelSpec, create_model, save_bundled
from ..predictors import resolve_device
from ..scoring import DEFAULT_ZONE_THRESHOLD
from .augment import augment
from .datasets import CTSource, Sample, Task, dataset_samples, drr_samples, synthetic_samples
from .losses import DynamicWeighting, segmentation_loss
from .metrics import dice, roc_auc

#: Phantom seeds at or above this value are never used for training.
HELD_OUT_SEED_BASE = 1_000_000


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: Task
    arch: str = "Unet"
    encoder: str = "mobilenet_v2"
    arch_kwargs: dict[str, Any] | None = Field(
        None, description="extra smp arguments; default: the bundled Unet's small decoder for a Unet, none otherwise"
    )
    input_size: int = 256
    in_channels: int = 1
    equalize: bool = Field(True, description="histogram-equalise whole images first (see preprocess.equalize)")
    data: str = Field("synthetic", description="synthetic, drr, drr+synthetic, folder or supervisely")
    data_root: str | None = None
    ct: str | None = Field(None, description="CT volume (NIfTI) for drr data; default: the shipped CT")
    labels: str | None = Field(None, description="its label map (NIfTI, same grid)")
    lung_labels: tuple[int, ...] = Field((10, 11, 12, 13, 14), description="lung label ids in the label map")
    mix_synthetic: float | None = Field(
        None, ge=0.0, le=1.0, description="share of phantoms among drr training images (drr+synthetic: 0.5)"
    )
    drr_cache: str | None = Field(None, description="folder caching rendered DRRs (default ~/.cache/cxrtriage/drr)")
    init: str | None = Field(None, description="weights (.safetensors) to start from, e.g. the bundled ones")
    console_processing: float = Field(
        0.0, ge=0.0, le=1.0, description="share of training images given a console's multi-scale processing "
        "(augment.console_processing)"
    )
    base_weight: float = Field(
        1.0, ge=1.0, description="lungs: weight of the cross-entropy below each column's true lung base "
        "(losses.below_base); 1 weighs every pixel alike"
    )
    lesion_free_share: float | None = Field(
        None, gt=0.0, lt=1.0, description="disease: share of each batch drawn from the lesion-free training images "
        "(default: their share of the data, about 0.35 of DRRs)"
    )
    name: str | None = None
    train_images: int = Field(1600, ge=1, description="images drawn for training (synthetic / drr data)")
    val_images: int = Field(96, ge=2)
    steps: int = Field(1500, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = 2e-3
    weight_decay: float = 1e-4
    loss_alpha: float = 0.5
    zone_threshold: float = DEFAULT_ZONE_THRESHOLD
    eval_every: int = 250
    seed: int = 0
    device: str = "auto"
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1)
    version: str | None = Field(None, description="version suffix; default from the data, e.g. synthetic-1")
    out: str = "runs/train"

    @field_validator("base_weight")
    @classmethod
    def _base_weight_is_for_lungs(cls, value: float, info: ValidationInfo) -> float:
        if value != 1.0 and info.data.get("task") != "lungs":
            raise ValueError("weighs the lungs' loss below the lung base; the disease task has no such base")
        return value

    @property
    def synthetic_share(self) -> float:
        """Share of phantoms among the training images."""
        if self.data == "synthetic":
            return 1.0
        if self.data in ("drr", "drr+synthetic"):
            if self.mix_synthetic is not None:
                return self.mix_synthetic
            return 0.5 if self.data == "drr+synthetic" else 0.0
        return 0.0

    @property
    def training_data(self) -> tuple[str, ...]:
        if self.data in ("folder", "supervisely"):
            return ("real",)
        share = self.synthetic_share
        return ("synthetic",) if share >= 1.0 else ("ct-derived",) if share <= 0.0 else ("synthetic", "ct-derived")

    def ct_source(self) -> CTSource:
        return CTSource(self.ct, self.labels, tuple(self.lung_labels))

    def spec(self) -> ModelSpec:
        data = "+".join(self.training_data).replace("ct-derived", "drr")
        version = self.version or f"{data}-1"
        return ModelSpec(
            arch=self.arch,
            encoder=self.encoder,
            input_size=self.input_size,
            in_channels=self.in_channels,
            classification_head=self.task == "disease",
            arch_kwargs=self.arch_kwargs if self.arch_kwargs is not None
            else ({"decoder_channels": [128, 64, 32, 16, 8]} if self.arch == "Unet" else {}),
            equalize=self.equalize,
            mean=(0.5,),
            std=(0.25,),
            zone_threshold=self.zone_threshold if self.task == "disease" else None,
            version=f"{self.task}-{self.arch}-{self.encoder}-{self.input_size}-{version}",
            name=self.name or f"cxrtriage {self.task} ({self.arch}/{self.encoder}, {' + '.join(self.training_data)})",
            training_data=self.training_data,
        )


@dataclass
class TrainResult:
    weights: Path
    metrics_log: Path
    best: dict[str, float]


def load_samples(cfg: TrainConfig) -> tuple[list[Sample], list[Sample]]:
    """Training and held-out samples. Synthetic held-out seeds never overlap training ones."""
    if cfg.data == "synthetic":
        base = cfg.seed * 100_000
        train = synthetic_samples(
            cfg.task, range(base, base + cfg.train_images), cfg.input_size, cfg.workers, cfg.equalize
        )
        val_seeds = range(HELD_OUT_SEED_BASE + 50_000, HELD_OUT_SEED_BASE + 50_000 + cfg.val_images)
        val = synthetic_samples(cfg.task, val_seeds, cfg.input_size, cfg.workers, cfg.equalize)
        return train, val
    if cfg.data in ("drr", "drr+synthetic"):
        return _drr_and_synthetic(cfg)
    samples = dataset_samples(cfg.task, cfg.data, cfg.data_root, cfg.input_size, cfg.equalize)
    if len(samples) < 2:
        raise ValueError(f"{cfg.data_root}: found {len(samples)} usable images; need at least 2")
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(samples))
    n_val = max(1, min(cfg.val_images, len(samples) // 10))
    return [samples[i] for i in order[n_val:]], [samples[i] for i in order[:n_val]]


def _drr_and_synthetic(cfg: TrainConfig) -> tuple[list[Sample], list[Sample]]:
    """DRRs of the CT (seeds from cfg.seed * 100 000), mixed with phantoms at ``synthetic_share``.

    Held-out DRRs for model selection use seeds HELD_OUT_SEED_BASE + 50 000..;
    bench/eval_drr.py evaluates on HELD_OUT_SEED_BASE.., which neither touches.
    """
    share = cfg.synthetic_share
    n_synth = int(round(cfg.train_images * share))
    n_drr = cfg.train_images - n_synth
    base = cfg.seed * 100_000
    source = cfg.ct_source()

    def drrs(seeds: range) -> list[Sample]:
        return drr_samples(cfg.task, seeds, cfg.input_size, source=source, cache_dir=cfg.drr_cache,
                           workers=cfg.workers, equalize_image=cfg.equalize)

    def phantoms(seeds: range) -> list[Sample]:
        return synthetic_samples(cfg.task, seeds, cfg.input_size, workers=cfg.workers, equalize_image=cfg.equalize)

    train = drrs(range(base, base + n_drr)) if n_drr else []
    if n_synth:
        train += phantoms(range(base, base + n_synth))
    val_base = HELD_OUT_SEED_BASE + 50_000
    n_val_synth = int(round(cfg.val_images * share))
    val = drrs(range(val_base, val_base + cfg.val_images - n_val_synth))
    if n_val_synth:
        val += phantoms(range(val_base, val_base + n_val_synth))
    return train, val


def lesion_free_weights(samples: list[Sample], share: float | None) -> np.ndarray | None:
    """Draw probabilities that give the lesion-free samples (label 0) ``share`` of the draws, all of one class
    alike; None (uniform draws, as before the option) when ``share`` is None or only one class is present."""
    if share is None:
        return None
    free = np.array([s.label == 0 for s in samples])
    if free.all() or not free.any():
        return None
    return np.where(free, share / free.sum(), (1.0 - share) / (~free).sum())


def _batch(
    samples: list[Sample], idx: np.ndarray, rng: np.random.Generator | None, mean: float, std: float, channels: int,
    console: float = 0.0, equalized: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images, masks, labels = [], [], []
    for i in idx:
        s = samples[int(i)]
        image, (mask,) = (augment(rng, s.image, [s.mask], console, equalized) if rng is not None
                          else (s.image, [s.mask]))
        images.append(image)
        masks.append(mask)
        labels.append(s.label)
    x = (torch.from_numpy(np.stack(images))[:, None] - mean) / std
    x = x.expand(-1, channels, -1, -1).contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(np.stack(masks).astype(np.float32))[:, None]
    return x, y, torch.tensor(labels, dtype=torch.float32)[:, None]


def evaluate(model: torch.nn.Module, cfg: TrainConfig, val: list[Sample], device: torch.device) -> dict[str, float]:
    """Held-out Dice (of the gated mask for Stage II) and, for Stage II, ROC AUC."""
    spec = cfg.spec()
    model.eval()
    dices, probs, labels = [], [], []
    with torch.inference_mode():
        for start in range(0, len(val), cfg.batch_size):
            idx = np.arange(start, min(start + cfg.batch_size, len(val)))
            x, y, lab = _batch(val, idx, None, spec.mean[0], spec.std[0], cfg.in_channels)
            out = model(x.to(device))
            seg, cls = out if isinstance(out, tuple) else (out, None)
            prob = torch.sigmoid(seg.float()).cpu().numpy()[:, 0]
            if cls is not None:
                p = torch.sigmoid(cls.float()).cpu().numpy()[:, 0]
                probs.extend(p.tolist())
                labels.extend(lab.numpy()[:, 0].tolist())
                prob = prob * (p >= 0.5)[:, None, None]
            for pred, truth in zip(prob > 0.5, y.numpy()[:, 0] > 0.5):
                dices.append(dice(pred, truth))
    model.train()
    metrics = {"dice": float(np.mean(dices))}
    if probs and len(set(labels)) == 2:
        metrics["auc"] = roc_auc(np.array(probs), np.array(labels))
    return metrics


def _score(metrics: dict[str, float]) -> float:
    return metrics["dice"] + metrics.get("auc", 0.0)


#: BatchNorm's running-statistics update rate while training: PyTorch's default.
BN_MOMENTUM = 0.1


def training_model(spec: ModelSpec) -> torch.nn.Module:
    """``create_model(spec)`` with every BatchNorm updating its running statistics at :data:`BN_MOMENTUM` or faster.

    smp's EfficientNet encoders carry TensorFlow's momentum (0.01 here, 0.99 there): trained from scratch, their
    running statistics still hold mostly the initial mean 0 and variance 1 after 150 steps, so validation (in
    eval mode) scored a DeepLabV3+/efficientnet-b1 lung model's output as empty (Dice 0.0) while the same
    weights segmented in train mode, and the best checkpoint would be chosen on that. Training itself normalises
    with each batch's statistics and does not change; only what eval mode reads catches up.
    """
    model = create_model(spec)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.momentum is not None \
                and module.momentum < BN_MOMENTUM:  # None: a cumulative average, left as it is
            module.momentum = BN_MOMENTUM
    return model


def train(cfg: TrainConfig, on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train one stage; returns where the weights and the log were written."""
    torch.manual_seed(cfg.seed)
    if "OMP_NUM_THREADS" not in os.environ:  # an explicit thread limit (a shared CPU) wins over all cores
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "metrics.jsonl"
    log = log_path.open("w")

    t0 = time.time()
    train_set, val_set = load_samples(cfg)
    data_event = {"event": "data", "train": len(train_set), "val": len(val_set), "seconds": time.time() - t0}
    log.write(json.dumps(data_event) + "\n")

    spec = cfg.spec()
    model = training_model(spec)
    if cfg.init:
        from ..models import read_state_dict, resolve_weights

        # Fine-tuning: start from trained weights of the same architecture (strict).
        model.load_state_dict(read_state_dict(resolve_weights(cfg.init)), strict=True)
    model = model.to(device).to(memory_format=torch.channels_last)
    model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, cfg.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, cfg.steps - warmup)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    weighting = DynamicWeighting(cfg.loss_alpha)
    rng = np.random.default_rng(cfg.seed + 1)
    draw_weights = lesion_free_weights(train_set, cfg.lesion_free_share)
    autocast = device.type == "cuda"
    best: dict[str, float] = {}
    best_state: dict[str, torch.Tensor] | None = None
    start = time.time()
    for step in range(cfg.steps):
        for group in optimiser.param_groups:
            group["lr"] = lr_at(step)
        idx = (rng.integers(0, len(train_set), cfg.batch_size) if draw_weights is None
               else rng.choice(len(train_set), cfg.batch_size, p=draw_weights))
        x, y, lab = _batch(train_set, idx, rng, spec.mean[0], spec.std[0], cfg.in_channels, cfg.console_processing,
                           cfg.equalize)
        x, y, lab = x.to(device, non_blocking=True), y.to(device), lab.to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
            out_t = model(x)
        if isinstance(out_t, tuple):
            seg, cls = out_t
            seg_loss = segmentation_loss(seg.float(), y)
            cls_loss = torch.nn.functional.binary_cross_entropy_with_logits(cls.float(), lab)
            loss = weighting([seg_loss, cls_loss])
            parts = {"seg_loss": seg_loss.item(), "cls_loss": cls_loss.item()}
        else:
            loss = segmentation_loss(out_t.float(), y, cfg.base_weight)
            parts = {}
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

        record: dict[str, Any] = {"step": step + 1, "loss": loss.item(), "lr": lr_at(step), **parts}
        last = step + 1 == cfg.steps
        if (step + 1) % cfg.eval_every == 0 or last:
            metrics = evaluate(model, cfg, val_set, device)
            record.update({f"val_{k}": v for k, v in metrics.items()})
            # Checkpoints on disk at every evaluation: an interrupted run keeps its progress.
            save_bundled(model, spec, out / f"{cfg.task}.last.safetensors", {"step": step + 1, "val": metrics})
            if not best or _score(metrics) >= _score(best):
                best = metrics
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                save_bundled(model, spec, out / f"{cfg.task}.best.safetensors", {"step": step + 1, "val": metrics})
        record["elapsed_s"] = round(time.time() - start, 1)
        log.write(json.dumps(record) + "\n")
        log.flush()
        if on_step:
            on_step(step + 1, record)

    if best_state is not None:
        model.load_state_dict(best_state)
    extra = {
        "data": cfg.data,
        "data_root": cfg.data_root,
        "ct": cfg.ct,
        "labels": cfg.labels,
        "lung_labels": list(cfg.lung_labels),
        "synthetic_share": cfg.synthetic_share,
        "init": cfg.init,
        "train_images": len(train_set),
        "val_images": len(val_set),
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "console_processing": cfg.console_processing,
        "base_weight": cfg.base_weight,
        "lesion_free_share": cfg.lesion_free_share,
        "device": str(device),
        "seconds": round(time.time() - start, 1),
        "best_val": best,
    }
    weights = save_bundled(model, spec, out / f"{cfg.task}.safetensors", extra)
    log.write(json.dumps({"event": "done", "weights": str(weights), **extra}) + "\n")
    log.close()
    return TrainResult(weights=weights, metrics_log=log_path, best=best)
