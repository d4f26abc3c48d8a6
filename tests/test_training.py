"""Training: dataset layouts, augmentations, loss weighting, and a real (tiny) run."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cxrtriage.config import InferenceSettings
from cxrtriage.inference.phantom import PhantomGenerator
from cxrtriage.inference.pipeline import Pipeline
from cxrtriage.inference.radiograph import Radiograph
from cxrtriage.inference.training.augment import augment
from cxrtriage.inference.training.datasets import (
    decode_supervisely_bitmap,
    folder_examples,
    prepare,
    supervisely_examples,
)
from cxrtriage.inference.training.losses import DynamicWeighting


def _png(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array)
    assert ok
    return buf.tobytes()


def _bitmap(mask: np.ndarray) -> str:
    rgba = np.zeros((*mask.shape, 4), dtype=np.uint8)
    rgba[mask] = (255, 255, 255, 255)
    return base64.b64encode(zlib.compress(_png(rgba))).decode()


def write_folder_layout(root: Path, count: int = 3) -> None:
    """Mendeley 8gf9vpkhgy: <dataset>/img/*.png + <dataset>/mask/*.png (soft edges)."""
    generator = PhantomGenerator(160, 144)
    for i in range(count):
        p = generator(3_000_000 + i)
        for sub in ("img", "mask"):
            (root / "Montgomery" / sub).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "Montgomery/img" / f"{i}.png"), (p.image * 255).astype(np.uint8))
        soft = cv2.GaussianBlur(p.lungs.astype(np.float32) * 255, (5, 5), 1).astype(np.uint8)
        cv2.imwrite(str(root / "Montgomery/mask" / f"{i}.png"), soft)


def write_supervisely_layout(root: Path) -> list:
    """Mendeley 36fjrg9s69: <dataset>/img/<f> + <dataset>/ann/<f>.json with bitmaps."""
    generator = PhantomGenerator(160, 144)
    phantoms = [generator(3_000_100, affected_zones=(1, 2)), generator(3_000_101, affected_zones=())]
    (root / "Actualmed/img").mkdir(parents=True)
    (root / "Actualmed/ann").mkdir(parents=True)
    for i, p in enumerate(phantoms):
        name = f"case{i}.png"
        cv2.imwrite(str(root / "Actualmed/img" / name), (p.image * 255).astype(np.uint8))
        objects = []
        for title, mask in (("Lungs", p.lungs), ("COVID-19", p.disease)):
            if not mask.any():
                continue
            ys, xs = np.nonzero(mask)
            y0, x0 = int(ys.min()), int(xs.min())
            patch = mask[y0 : ys.max() + 1, x0 : xs.max() + 1]
            objects.append({"classTitle": title, "bitmap": {"data": _bitmap(patch), "origin": [x0, y0]}})
        scored = [{"name": "Score R", "value": 2}, {"name": "Score D", "value": 3}]
        tags = scored if p.has_disease else [{"name": "Normal", "value": None}]
        ann = {"size": {"height": 160, "width": 144}, "tags": tags, "objects": objects}
        (root / "Actualmed/ann" / f"{name}.json").write_text(json.dumps(ann))
    return phantoms


def test_folder_layout(tmp_path: Path) -> None:
    write_folder_layout(tmp_path)
    examples = list(folder_examples(tmp_path))
    assert len(examples) == 3
    truth = PhantomGenerator(160, 144)(3_000_000).lungs
    assert (examples[0].lungs == truth).mean() > 0.98  # soft edge cut at 127


def test_supervisely_layout(tmp_path: Path) -> None:
    phantoms = write_supervisely_layout(tmp_path)
    examples = list(supervisely_examples(tmp_path))
    assert [e.label for e in examples] == [1, 0]
    np.testing.assert_array_equal(examples[0].lungs, phantoms[0].lungs)
    np.testing.assert_array_equal(examples[0].disease, phantoms[0].disease)
    assert examples[0].scores == {"Score R": 2.0, "Score D": 3.0}
    sample = prepare("disease", examples[0], 64)
    assert sample.image.shape == (64, 64) and sample.mask.any() and sample.label == 1.0


def test_supervisely_bitmap_decodes_alpha() -> None:
    mask = np.zeros((7, 9), dtype=bool)
    mask[2:5, 3:8] = True
    np.testing.assert_array_equal(decode_supervisely_bitmap(_bitmap(mask)), mask)


def test_missing_layout_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="img"):
        list(folder_examples(tmp_path))


def test_augmentations_keep_mask_aligned() -> None:
    image = np.zeros((64, 64), dtype=np.float32)
    mask = np.zeros((64, 64), dtype=bool)
    image[20:40, 10:30] = 1.0
    mask[20:40, 10:30] = True
    for seed in range(20):
        out, (m,) = augment(np.random.default_rng(seed), image, [mask])
        assert out.shape == m.shape == (64, 64)
        if m.sum() > 20:
            # The bright square and the mask moved together.
            assert out[m].mean() > out[~m].mean() + 0.2


def test_console_processing_flattens_large_scale_contrast_and_sharpens_edges() -> None:
    """A radiograph console's processing (train --console-processing): the difference between a dark and a
    bright half shrinks, an edge gets over- and undershoot, the output stays in [0, 1], and a seed gives the
    same image; with ``console`` 1.0 augment applies it (equalising again) while the mask stays as it was."""
    from cxrtriage.inference.training.augment import console_processing

    image = np.full((128, 128), 0.25, dtype=np.float32)
    image[:, 64:] = 0.75
    out = console_processing(np.random.default_rng(3), image)
    assert out.dtype == np.float32 and out.shape == image.shape and 0.0 <= out.min() and out.max() <= 1.0
    far_left, far_right = float(out[:, :8].mean()), float(out[:, -8:].mean())
    # the halves keep their order but no longer span the range: the edge's overshoots do (unprocessed, the
    # same stretch would put the halves at 0 and 1)
    assert 0.0 < far_right - far_left < 0.8 * float(out.max() - out.min())
    step = float(out[64, 64] - out[64, 63])  # at the edge: unsharp masking steepens it ...
    assert step > (far_right - far_left) / 2
    assert out[64, 66] > far_right or out[64, 61] < far_left  # ... with an overshoot beside it
    np.testing.assert_array_equal(out, console_processing(np.random.default_rng(3), image))
    mask = image > 0.5
    for seed in range(5):
        augmented, (m,) = augment(np.random.default_rng(seed), image, [mask], console=1.0)
        assert augmented.shape == m.shape == (128, 128) and m.sum() > 0


def test_dynamic_weighting_balances_losses() -> None:
    weighting = DynamicWeighting(alpha=0.5)
    for _ in range(10):
        w = weighting.weights([torch.tensor(10.0), torch.tensor(0.1)])
    assert sum(w) == pytest.approx(2.0)
    assert w[0] * 10.0 == pytest.approx(w[1] * 0.1, rel=1e-6)
    with pytest.raises(ValueError):
        DynamicWeighting(alpha=0.0)


def test_train_command_writes_weights_the_pipeline_loads(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    for task in ("lungs", "disease"):
        proc = subprocess.run(
            [sys.executable, "-m", "cxrtriage", "train", task, "--steps", "3", "--train-images", "6",
             "--val-images", "4", "--eval-every", "2", "--input-size", "64", "--batch-size", "2", "--out", str(out)],
            capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        records = [json.loads(line) for line in (out / task / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "step" in r] == [1, 2, 3]
        assert any("val_dice" in r for r in records) and records[-1]["event"] == "done"
        assert (out / task / f"{task}.best.safetensors").exists() and (out / task / f"{task}.last.safetensors").exists()
    settings = InferenceSettings(
        lungs={"weights": str(out / "lungs/lungs.safetensors")},
        disease={"weights": str(out / "disease/disease.safetensors")},
    )
    pipeline = Pipeline(settings)
    phantom = PhantomGenerator(200, 180)(7)
    result = pipeline(Radiograph(pixels=phantom.image, source="x"))
    assert result.lungs.shape == (200, 180)


def test_train_on_folder_layout(tmp_path: Path) -> None:
    from cxrtriage.inference.training.trainer import TrainConfig, train

    write_folder_layout(tmp_path / "data", count=4)
    result = train(TrainConfig(task="lungs", data="folder", data_root=str(tmp_path / "data"), steps=2,
                               eval_every=1, input_size=64, batch_size=2, out=str(tmp_path / "out")))
    assert result.weights.exists() and 0.0 <= result.best["dice"] <= 1.0


@pytest.mark.parametrize("arch,encoder", [("DeepLabV3Plus", "efficientnet-b1"), ("MAnet", "resnet18")])
def test_the_papers_architectures_can_be_trained(arch: str, encoder: str) -> None:
    """The bundled Unet's small decoder is the default only for a Unet: the paper's models build as published."""
    from cxrtriage.inference.models import create_model
    from cxrtriage.inference.training.trainer import TrainConfig

    spec = TrainConfig(task="lungs", arch=arch, encoder=encoder, input_size=64, in_channels=3).spec()
    assert spec.arch_kwargs == {}
    with torch.no_grad():
        out = create_model(spec).eval()(torch.zeros(1, 3, 64, 64))
    assert (out[0] if isinstance(out, tuple) else out).shape[-2:] == (64, 64)


def test_training_models_update_batchnorm_statistics_fast_enough() -> None:
    """EfficientNet encoders come with TensorFlow's BatchNorm momentum (0.01): trained from scratch, their running
    statistics lagged so far behind that validation saw an empty mask from a model that segmented."""
    from cxrtriage.inference.models import create_model
    from cxrtriage.inference.training.trainer import BN_MOMENTUM, TrainConfig, training_model

    spec = TrainConfig(task="lungs", arch="DeepLabV3Plus", encoder="efficientnet-b1").spec()

    def norms(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
        return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    assert min(m.momentum for m in norms(create_model(spec))) < BN_MOMENTUM  # what smp builds
    model = training_model(spec)
    assert all(m.momentum >= BN_MOMENTUM for m in norms(model))
    # Twenty training batches of the same bright image: the stem's running mean gets 1 - 0.9**20 = 88 % of the way
    # from 0 to the mean of what the stem normalises (at 0.01 it would get 18 %).
    stem = norms(model)[0]
    seen: list[torch.Tensor] = []
    stem.register_forward_hook(lambda module, args, out: seen.append(args[0].mean(dim=(0, 2, 3))))
    model.train()
    x = torch.full((2, 1, 64, 64), 3.0) + torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for _ in range(20):
            model(x)
    target = seen[-1]
    share = (stem.running_mean * target).sum() / (target * target).sum()
    assert 0.8 < float(share) < 0.95


def test_auc_interval_holds_the_auc_and_narrows_with_more_images() -> None:
    from cxrtriage.inference.training.metrics import auc_interval, roc_auc

    rng = np.random.default_rng(3)
    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(n) % 2 == 0
        return rng.normal(labels * 0.8, 1.0), labels  # a weak marker: AUC about 0.7

    small, large = sample(40), sample(400)
    (lo_s, hi_s), (lo_l, hi_l) = auc_interval(*small), auc_interval(*large)
    assert lo_s < roc_auc(*small) < hi_s and lo_l < roc_auc(*large) < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 2  # ten times the images: about a third of the width
    assert auc_interval(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == (1.0, 1.0)
    with pytest.raises(ValueError):
        auc_interval(np.array([0.1, 0.2]), np.array([1, 1]))


def test_lesion_free_share_sets_how_often_lesion_free_images_are_drawn() -> None:
    from cxrtriage.inference.training.datasets import Sample
    from cxrtriage.inference.training.trainer import lesion_free_weights

    image, mask = np.zeros((4, 4), np.float32), np.zeros((4, 4), bool)
    samples = [Sample(image, mask, float(i < 3)) for i in range(10)]  # 3 with opacity, 7 lesion-free
    assert lesion_free_weights(samples, None) is None  # uniform draws, the rng stream of older runs
    weights = lesion_free_weights(samples, 0.5)
    assert weights is not None and weights.sum() == pytest.approx(1.0)
    draws = np.random.default_rng(0).choice(10, 20_000, p=weights)
    assert (draws >= 3).mean() == pytest.approx(0.5, abs=0.02)  # 70 % of the data, half of the draws
    per_image = np.bincount(draws[draws >= 3])[3:]
    assert per_image.max() / per_image.min() < 1.2  # alike within their class (about 1430 draws each)
    only_lungs = [Sample(image, mask, 0.0) for _ in range(4)]  # Stage I: one class, nothing to weight
    assert lesion_free_weights(only_lungs, 0.5) is None


def test_train_command_names_an_option_out_of_range() -> None:
    proc = subprocess.run([sys.executable, "-m", "cxrtriage", "train", "disease", "--lesion-free-share", "1.5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--lesion-free-share" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout


def test_base_weight_costs_a_false_lung_under_the_base_more_than_one_beside_it() -> None:
    """losses.below_base marks what lies under each column's lowest lung pixel (abdomen, heart), and
    segmentation_loss weighs a false positive there ``base_weight`` times, one elsewhere once."""
    from cxrtriage.inference.training.losses import below_base, segmentation_loss

    target = torch.zeros(1, 1, 8, 6)
    target[0, 0, 1:5, 1:3] = 1.0  # a lung ending at row 4 in columns 1-2
    target[0, 0, 2:3, 4] = 1.0  # a column whose lung ends at row 2
    marked = below_base(target)[0, 0]
    expected = torch.zeros(8, 6)
    expected[5:, 1:3] = 1.0
    expected[3:, 4] = 1.0
    assert torch.equal(marked, expected)  # nothing above a base, nothing in columns without lung

    logits = torch.where(target > 0, 6.0, -6.0)
    under, beside = logits.clone(), logits.clone()
    under[0, 0, 6, 1] = 6.0  # a false lung pixel under the base
    beside[0, 0, 6, 0] = 6.0  # the same mistake in a column without lung
    def cost(mistake: torch.Tensor, weight: float) -> float:  # what the one false pixel adds to the loss
        return (segmentation_loss(mistake, target, weight) - segmentation_loss(logits, target, weight)).item()

    assert cost(under, 1.0) == pytest.approx(cost(beside, 1.0))
    assert cost(beside, 4.0) == pytest.approx(cost(beside, 1.0))
    assert cost(under, 4.0) > 2.5 * cost(beside, 4.0)


def test_base_weight_is_refused_for_the_disease_task() -> None:
    proc = subprocess.run([sys.executable, "-m", "cxrtriage", "train", "disease", "--base-weight", "3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--base-weight" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout
