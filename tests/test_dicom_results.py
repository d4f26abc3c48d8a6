"""SEG and TID 1500 SR: valid DICOM, deterministic, and carrying the scores."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from cxrtriage.inference.dicom_results import (
    SEG_FIRST_ZONE,
    SEG_OPACITY,
    algorithm_name,
    algorithm_parameters,
    build_result_objects,
)
from cxrtriage.inference.identity import RESEARCH_USE_NOTICE, ModelIdentity
from cxrtriage.inference.radiograph import load_radiograph
from cxrtriage.inference.scoring import ScoringConfig, score

from .tools import dciodvfy_errors


@pytest.fixture(scope="module")
def scored(pipeline, phantom_cr: Path):
    r = load_radiograph(phantom_cr)
    return r, pipeline(r)


@pytest.mark.parametrize("jpeg2000", [False, True])
def test_seg_and_sr_pass_dciodvfy(scored, tmp_path: Path, jpeg2000: bool) -> None:
    r, result = scored
    seg_path, sr_path = build_result_objects(r.dataset, result, jpeg2000=jpeg2000).save(tmp_path)
    assert dciodvfy_errors(seg_path) == []
    assert dciodvfy_errors(sr_path) == []


def test_rg1_results_pass_dciodvfy(pipeline, rg1: Path, tmp_path: Path) -> None:
    r = load_radiograph(rg1)
    seg_path, sr_path = build_result_objects(r.dataset, pipeline(r)).save(tmp_path)
    assert dciodvfy_errors(seg_path) == [] and dciodvfy_errors(sr_path) == []


def test_uids_are_deterministic_and_file_into_the_study(scored) -> None:
    r, result = scored
    a = build_result_objects(r.dataset, result)
    b = build_result_objects(r.dataset, result)
    assert a.seg.SOPInstanceUID == b.seg.SOPInstanceUID and a.sr.SOPInstanceUID == b.sr.SOPInstanceUID
    assert a.seg.SOPInstanceUID != a.sr.SOPInstanceUID
    for ds in (a.seg, a.sr):
        assert ds.StudyInstanceUID == r.dataset.StudyInstanceUID
        assert ds.PatientID == r.dataset.PatientID
        assert ds.SeriesInstanceUID != r.dataset.SeriesInstanceUID
        ours = [i for i in ds.ContributingEquipmentSequence if i.Manufacturer == "cxrtriage"]
        assert len(ours) == 1
        code = ours[0].PurposeOfReferenceCodeSequence[0]
        assert (code.CodeValue, code.CodingSchemeDesignator) == ("Newcode1", "99IHE")
    assert a.seg.PatientOrientation == r.dataset.PatientOrientation


def test_seg_round_trips_masks_at_full_resolution(scored, tmp_path: Path) -> None:
    r, result = scored
    seg_path, _ = build_result_objects(r.dataset, result).save(tmp_path)
    seg = hd.seg.segread(seg_path)
    assert (seg.Rows, seg.Columns) == r.shape
    labels = {d.SegmentNumber: d.SegmentLabel for d in seg.SegmentSequence}
    assert labels[1] == "Right lung" and labels[SEG_OPACITY] == "Opacity" and labels[SEG_FIRST_ZONE] == "Zone A (right upper)"
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[r.dataset.SOPInstanceUID], segment_numbers=[1, 2, SEG_OPACITY]
    )[0]
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), result.zones.right)
    np.testing.assert_array_equal(pixels[..., 1].astype(bool), result.zones.left)
    np.testing.assert_array_equal(pixels[..., 2].astype(bool), result.disease)


def test_sr_holds_the_zone_scores(scored, tmp_path: Path) -> None:
    r, result = scored
    _, sr_path = build_result_objects(r.dataset, result).save(tmp_path)
    sr = hd.sr.srread(sr_path)
    groups = sr.content.get_volumetric_roi_measurement_groups()
    zones = [g for g in groups if g.tracking_identifier.startswith("Zone")]
    assert [g.tracking_identifier for g in zones] == [f"Zone {c}" for c in "ABCDEF"]
    for k, group in enumerate(zones):
        values = {m.name.meaning: m.value for m in group.get_measurements()}
        assert values["Zone severity score"] == result.scores.binary[k]
        assert values["Affected fraction of zone"] == pytest.approx(100 * result.scores.fractions[k], abs=0.01)
        assert group.referenced_segment.referenced_segment_numbers == [SEG_FIRST_ZONE + k]
        site = group.finding_sites[0]
        assert site.laterality.meaning == ("Right" if k < 3 else "Left")
        assert site.value.meaning == ("Upper", "Middle", "Lower")[k % 3] + " zone of lung"
    totals = sr.content.get_image_measurement_groups()[0]
    values = {m.name.meaning: m.value for m in totals.get_measurements()}
    assert values["Zone severity score total (0-6)"] == result.scores.total
    assert values["Probability"] == pytest.approx(result.p_disease, abs=1e-4)


def test_score_command_writes_dicom(tmp_path: Path, phantom_cr: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cxrtriage", "score", str(phantom_cr), "--dicom", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads((tmp_path / "results.json").read_text())["results"][0]
    kinds = sorted(pydicom.dcmread(p).Modality for p in record["dicom"])
    assert kinds == ["SEG", "SR"]


def test_seg_and_sr_name_the_models_and_the_research_notice(scored, tmp_path: Path) -> None:
    r, result = scored
    assert result.identity.research_use  # the bundled models never saw a real radiograph
    seg_path, sr_path = build_result_objects(r.dataset, result).save(tmp_path)
    seg = pydicom.dcmread(seg_path)
    assert "RESEARCH USE" in seg.SeriesDescription and "bundled" in seg.SeriesDescription
    for segment in seg.SegmentSequence:
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert segment.SegmentAlgorithmName == algorithm.AlgorithmName == algorithm_name(result)
        assert result.identity.lungs.version in algorithm.AlgorithmParameters
        assert result.identity.disease.version in algorithm.AlgorithmParameters
    sr = pydicom.dcmread(sr_path)
    assert "RESEARCH USE" in sr.SeriesDescription
    # TID 4019 Algorithm Identification: name, version and parameters as TEXT items.
    items = set(text_items(sr))
    assert ("Algorithm Name", algorithm_name(result)) in items
    assert ("Algorithm Version", result.algorithm_version) in items
    parameters = [value for name, value in items if name == "Algorithm Parameters"]
    assert RESEARCH_USE_NOTICE in parameters
    assert any(result.identity.lungs.name in p and "trained on synthetic" in p for p in parameters)


def text_items(item: pydicom.Dataset):
    """(concept name, text) of every TEXT content item in an SR tree."""
    for child in item.get("ContentSequence", []):
        if child.ValueType == "TEXT":
            yield child.ConceptNameCodeSequence[0].CodeMeaning, child.TextValue
        yield from text_items(child)


def test_published_models_carry_no_research_notice(scored) -> None:
    _, result = scored
    real = ModelIdentity(*(replace(m, origin="published", training_data=("real",))
                           for m in (result.identity.lungs, result.identity.disease)))
    published = replace(result, identity=real)
    assert not real.research_use and RESEARCH_USE_NOTICE not in algorithm_parameters(published)
    assert algorithm_name(published) == "cxrtriage: published models"


def test_one_lung_result_leaves_the_missing_zones_out_of_the_sr(scored, tmp_path: Path) -> None:
    r, result = scored
    scores, zones = score(result.zones.right, result.disease, ScoringConfig(result.scores.zone_threshold),
                          r.patient_orientation, r.image_laterality, r.pixel_spacing_mm)
    one_lung = replace(result, lungs=result.zones.right, zones=zones, scores=scores)
    assert scores.missing_lungs == ["left"]
    seg_path, sr_path = build_result_objects(r.dataset, one_lung).save(tmp_path)
    assert dciodvfy_errors(seg_path) == [] and dciodvfy_errors(sr_path) == []
    groups = hd.sr.srread(sr_path).content.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups if g.tracking_identifier.startswith("Zone")] == ["Zone A", "Zone B", "Zone C"]
