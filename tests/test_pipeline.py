"""The two-stage pipeline with the bundled models, on phantoms and the real RG1 CR."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxrtriage.inference.phantom import PhantomGenerator, write_cr
from cxrtriage.inference.radiograph import load_radiograph
from cxrtriage.inference.training.metrics import dice


def centre_column(mask: np.ndarray) -> float:
    return float(np.nonzero(mask)[1].mean())


def test_phantom_scores_match_truth(pipeline, phantom, phantom_cr: Path) -> None:
    result = pipeline(load_radiograph(phantom_cr))
    truth = phantom.truth(pipeline.scoring)
    assert result.lungs.shape == result.disease.shape == phantom.image.shape  # full resolution
    assert all(z.shape == phantom.image.shape for z in result.zones.zones)
    assert result.scores.lungs_found == 2
    assert dice(result.lungs, phantom.lungs) > 0.9
    assert abs(result.scores.total - truth.total) <= 1
    assert result.p_disease > 0.5
    assert result.scores.lung_area_mm2 == pytest.approx(result.lungs.sum() * phantom.pixel_spacing_mm**2, rel=1e-4)


def test_normal_phantom_is_called_normal(pipeline) -> None:
    phantom = PhantomGenerator(640, 600)(2_000_001, affected_zones=())
    from cxrtriage.inference.radiograph import Radiograph

    result = pipeline(Radiograph(pixels=phantom.image, source="normal"))
    assert result.p_disease < 0.5
    assert result.scores.total == 0 and not result.disease.any()


def test_mirrored_image_keeps_patient_sides(pipeline, tmp_path: Path) -> None:
    # Only the patient's right upper zone is affected; the image is stored
    # mirrored with Patient Orientation R\F.
    phantom = PhantomGenerator(800, 720)(2_000_002, affected_zones=(0,))
    r = load_radiograph(write_cr(phantom, tmp_path / "mirrored.dcm", mirrored=True))
    assert r.patient_orientation == ["R", "F"]
    result = pipeline(r)
    width = r.shape[1]
    assert centre_column(result.zones.right) > width / 2 > centre_column(result.zones.left)
    assert result.scores.binary[0] == 1  # right upper
    assert result.scores.binary[3] == 0  # left upper


def test_rg1_real_chest_cr(pipeline, rg1: Path) -> None:
    r = load_radiograph(rg1)
    result = pipeline(r)
    h, w = r.shape
    assert result.lungs.shape == (h, w)
    assert result.scores.lungs_found == 2
    right, left = result.zones.right, result.zones.left
    # Two large blobs, the patient's right on the image left (PA, orientation L\F).
    for lung in (right, left):
        assert lung.sum() > 0.04 * h * w
    assert centre_column(right) < w / 2 < centre_column(left)
    assert result.scores.lung_area_mm2 is None  # PixelSpacing 0\0 is unknown


def test_rg1_jpeg2000_twin_gives_identical_masks(pipeline, rg1: Path, rg1_j2k: Path) -> None:
    a, b = pipeline(load_radiograph(rg1)), pipeline(load_radiograph(rg1_j2k))
    np.testing.assert_array_equal(a.lungs, b.lungs)
    np.testing.assert_array_equal(a.disease, b.disease)
    assert a.scores.as_dict() == b.scores.as_dict()


def test_batch_gives_the_same_scores_as_single_images(pipeline, phantom_cr: Path, rg1: Path) -> None:
    images = [load_radiograph(phantom_cr), load_radiograph(rg1)]
    batch = pipeline.run_batch(images)
    single = [pipeline(r) for r in images]
    for x, y in zip(batch, single):
        assert x.scores.total == y.scores.total
        assert dice(x.lungs, y.lungs) > 0.999


def test_result_json_names_everything(pipeline, phantom_cr: Path) -> None:
    record = pipeline(load_radiograph(phantom_cr)).as_dict()
    assert set(record["zones"]) == {"right_upper", "right_middle", "right_lower", "left_upper", "left_middle", "left_lower"}
    assert record["zones"]["right_upper"]["brixia_zone"] == "A"
    assert record["zones"]["left_lower"]["brixia_zone"] == "F"
    assert 0 <= record["total_score"] <= 6 and 0 <= record["brixia_total"] <= 18
    assert record["models"]["lungs"] and record["models"]["disease"]
    assert {"stage1", "stage2", "scoring"} <= set(record["timings_ms"])


class _Gated:
    """The bundled disease model with its P(disease) scaled by ``scale`` (so that it lands between two gates)
    and its spec's ``disease_gate`` set: the network and its opacity map are the real ones."""

    def __init__(self, model, scale: float, gate: float) -> None:
        self.model, self.scale = model, scale
        self.spec = model.spec.model_copy(update={"disease_gate": gate})

    def __call__(self, x):
        seg, p = self.model(x)
        return seg, p * self.scale


def test_the_disease_models_gate_decides_whether_its_opacity_counts(pipeline, phantom_cr: Path) -> None:
    """ModelSpec.disease_gate: an image whose P(disease) is below the gate scores 0 in every zone; at or above
    it, the same as at the paper's 0.5. The gate travels with the result (record, SR parameters, version)."""
    from cxrtriage.config import InferenceSettings
    from cxrtriage.inference.dicom_results import algorithm_parameters
    from cxrtriage.inference.pipeline import Pipeline
    from cxrtriage.inference.presets import model_specs

    radiograph = load_radiograph(phantom_cr)
    paper = pipeline(radiograph)
    assert paper.disease_gate == 0.5 and paper.scores.total > 0 and paper.p_disease > 0.9

    def scored(gate: float):
        disease = _Gated(pipeline.disease_model, 0.6 / paper.p_disease, gate)  # P(disease) 0.6
        return Pipeline(pipeline.settings, lungs=pipeline.lungs_model, disease=disease)(radiograph)

    passed, stopped = scored(0.55), scored(0.65)
    assert passed.p_disease == stopped.p_disease == pytest.approx(0.6)
    assert passed.scores.binary == paper.scores.binary and np.array_equal(passed.disease, paper.disease)
    assert stopped.scores.total == 0 and not stopped.disease.any() and np.array_equal(stopped.lungs, paper.lungs)
    assert stopped.as_dict()["disease_gate"] == 0.65
    assert "P(disease) gate 0.65" in algorithm_parameters(stopped)
    assert "P(disease) gate 0.5" in algorithm_parameters(paper)
    assert len({paper.algorithm_version, passed.algorithm_version, stopped.algorithm_version}) == 3
    # a config sets it as any other field of the disease model
    assert model_specs(InferenceSettings(disease={"disease_gate": 0.7}))[1].disease_gate == 0.7
