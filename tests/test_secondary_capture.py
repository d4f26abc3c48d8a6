"""The Secondary Capture result: valid DICOM, the overlay burned in, stable UIDs, made by both scoring paths."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from cxrtriage.config import InferenceSettings
from cxrtriage.dicom_header import EncodedObject
from cxrtriage.inference.instance import InstanceScored, score_instance
from cxrtriage.inference.parallel import ScoringPool
from cxrtriage.inference.radiograph import load_radiograph
from cxrtriage.inference.secondary_capture import SC_SERIES_NUMBER

from .tools import dciodvfy_errors

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _read(obj: EncodedObject, tmp_path: Path) -> tuple[Path, pydicom.Dataset]:
    path = tmp_path / f"{obj.sop_instance_uid}.dcm"
    path.write_bytes(obj.data)
    return path, pydicom.dcmread(path)


@pytest.fixture(scope="module")
def scored(pipeline, phantom_cr: Path) -> InstanceScored:
    outcome = score_instance(pipeline, phantom_cr, "1.2.3", secondary_capture=True)
    assert isinstance(outcome, InstanceScored)
    return outcome


def test_sc_is_the_third_object_and_passes_dciodvfy(scored: InstanceScored, tmp_path: Path) -> None:
    assert [o.kind for o in scored.objects] == ["seg", "sr", "sc"]
    sc = scored.objects[2]
    assert sc.sop_class_uid == SECONDARY_CAPTURE and sc.series_number == SC_SERIES_NUMBER
    path, _ = _read(sc, tmp_path)
    assert dciodvfy_errors(path) == []


def test_sc_files_into_the_source_study_and_references_it(scored: InstanceScored, phantom_cr: Path,
                                                         tmp_path: Path) -> None:
    source = pydicom.dcmread(phantom_cr)
    _, sc = _read(scored.objects[2], tmp_path)
    assert sc.StudyInstanceUID == source.StudyInstanceUID and sc.PatientID == source.PatientID
    assert sc.SeriesInstanceUID not in (source.SeriesInstanceUID, scored.seg.series_instance_uid,
                                        scored.sr.series_instance_uid)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert (sc.PhotometricInterpretation, sc.SamplesPerPixel, sc.BitsAllocated) == ("RGB", 3, 8)
    assert sc.BurnedInAnnotation == "YES"
    assert "Research use" in sc.ImageComments


def test_scores_and_notice_are_burned_into_the_pixels(scored: InstanceScored, phantom_cr: Path,
                                                       tmp_path: Path) -> None:
    _, sc = _read(scored.objects[2], tmp_path)
    rgb = sc.pixel_array
    plain = load_radiograph(phantom_cr).pixels
    grey = cv2.resize(np.clip(plain * 255, 0, 255).astype(np.uint8), (sc.Columns, sc.Rows),
                      interpolation=cv2.INTER_AREA)
    assert rgb.shape == (*grey.shape, 3)
    coloured = (rgb[..., 0] != rgb[..., 1]) | (rgb[..., 1] != rgb[..., 2])
    assert coloured.mean() > 0.01  # outlines, tint, the amber notice: the plain radiograph is all grey
    # The header band (scores) and the footer band (notice, models) replace the radiograph's rows.
    differs = np.abs(rgb.mean(axis=2) - grey) > 8
    assert differs[:10].mean() > 0.5 and differs[-10:].mean() > 0.5
    footer = rgb[-5:].reshape(-1, 3)
    amber = (footer[:, 0] > 200) & (footer[:, 1] > 150) & (footer[:, 2] < 50)  # research-use banner, RGB
    assert amber.mean() > 0.3


def test_uids_are_stable_on_a_rescore(pipeline, scored: InstanceScored, phantom_cr: Path) -> None:
    again = score_instance(pipeline, phantom_cr, "1.2.3", secondary_capture=True)
    assert isinstance(again, InstanceScored) and again.sc is not None and scored.sc is not None
    assert (again.sc.sop_instance_uid, again.sc.series_instance_uid) == (
        scored.sc.sop_instance_uid, scored.sc.series_instance_uid)
    without = score_instance(pipeline, phantom_cr, "1.2.3")
    assert isinstance(without, InstanceScored) and [o.kind for o in without.objects] == ["seg", "sr"]


def test_the_scoring_pool_makes_it_too(scored: InstanceScored, phantom_cr: Path) -> None:
    with ScoringPool(InferenceSettings(), workers=1) as pool:
        outcome = pool.submit_instance(phantom_cr, "1.2.3", secondary_capture=True).result(timeout=300)
    assert isinstance(outcome, InstanceScored) and outcome.sc is not None and scored.sc is not None
    assert outcome.sc.sop_instance_uid == scored.sc.sop_instance_uid
