"""SEG and SR from compiled templates are highdicom's SEG and SR, byte for byte (issue #15).

Real results of the real pipeline, varied in what changes the objects'
structure (diseased, normal, one lung missing, no mask at all, a frame size
whose bits run across frames, MONOCHROME1, the real RG1 CR with its own
character set and equipment, no lesion area, JPEG 2000): the template path
must give exactly the bytes highdicom gives for the same time, and dciodvfy
must find nothing wrong with them. Several results share one shape, so most
are rendered from a template compiled from another image.
"""

from __future__ import annotations

import io
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest

from cxrtriage.inference.phantom import PhantomGenerator, write_cr
from cxrtriage.inference.radiograph import load_radiograph
from cxrtriage.inference.result_templates import (
    clear_templates,
    encode_result_objects,
    save_result_objects,
    template_counts,
)
from cxrtriage.inference.scoring import ScoringConfig, ZoneMasks, score

from .tools import dciodvfy_errors

NOW = datetime(2026, 11, 26, 23, 59, 58, 123456)


@pytest.fixture(scope="module")
def cases(pipeline, rg1: Path, tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, pydicom.Dataset, object]]:
    folder = tmp_path_factory.mktemp("templates")
    phantom = PhantomGenerator(512, 448, p_normal=0.0)(2_000_101, affected_zones=(0, 4))  # graded and clear zones
    r = load_radiograph(write_cr(phantom, folder / "diseased.dcm"))
    diseased = pipeline(r)
    normal_r = load_radiograph(write_cr(PhantomGenerator(512, 448, p_normal=1.0)(2_000_102), folder / "normal.dcm"))
    scores, zones = score(diseased.zones.right, diseased.disease, ScoringConfig(diseased.scores.zone_threshold),
                          r.patient_orientation, r.image_laterality, r.pixel_spacing_mm)
    one_lung = replace(diseased, lungs=diseased.zones.right, zones=zones, scores=scores)
    none = np.zeros(r.shape, dtype=bool)
    empty = replace(diseased, lungs=none, disease=none,
                    zones=ZoneMasks.of_planes((none,) * 6, none, none, diseased.zones.lungs_found))
    # 301 x 250 pixels: not a multiple of 8, so the bits of a frame run on into the next
    odd = load_radiograph(write_cr(PhantomGenerator(301, 250, p_normal=0.0)(2_000_103), folder / "odd.dcm",
                                   monochrome1=True))
    real = load_radiograph(rg1)
    return [
        ("diseased", r.dataset, diseased),
        ("normal", normal_r.dataset, pipeline(normal_r)),
        ("one lung", r.dataset, one_lung),
        ("no masks", r.dataset, empty),
        ("odd size, MONOCHROME1", odd.dataset, pipeline(odd)),
        ("RG1", real.dataset, pipeline(real)),
    ]


def test_template_output_is_highdicoms_output(cases, tmp_path: Path) -> None:
    clear_templates()
    shapes = set()
    for name, source, result in cases:
        shapes.add(result.lungs.shape)
        template = encode_result_objects(source, result, now=NOW)
        reference = encode_result_objects(source, result, now=NOW, reference=True)
        for ours, theirs in zip(template, reference):
            assert ours.data == theirs.data, f"{name}: {ours.kind} differs from highdicom's"
            assert ours == theirs  # and every fact the node records about it
    # one compiled template per shape, none refused: four results were rendered from another image's template
    assert template_counts() == (len(shapes), 0) and len(shapes) < len(cases)
    # what the cases were meant to cover, they do cover
    results = {name: result for name, _, result in cases}
    assert results["one lung"].scores.missing_lungs == ["left"]
    assert results["RG1"].scores.lesion_area_mm2 is None and results["diseased"].scores.lesion_area_mm2
    assert any(results["diseased"].scores.brixia) and not all(results["diseased"].scores.brixia)


def test_template_output_passes_dciodvfy(cases, tmp_path: Path) -> None:
    for index, (name, source, result) in enumerate(cases):
        seg_path, sr_path = save_result_objects(source, result, tmp_path / str(index))
        for path in (seg_path, sr_path):
            assert dciodvfy_errors(path) == [], f"{name}: {path.name}"
        seg = pydicom.dcmread(seg_path)
        assert seg_path.name == f"{seg.SOPInstanceUID}.seg.dcm" and pydicom.dcmread(sr_path).Modality == "SR"
        expected = sum(bool(p.any()) for p in (result.zones.right, result.zones.left, result.disease,
                                               *result.zones.zones)) or 9
        assert seg.NumberOfFrames == expected, name


def test_jpeg2000_template_is_highdicoms(cases, tmp_path: Path) -> None:
    for name, source, result in cases[:3]:
        template = encode_result_objects(source, result, now=NOW, jpeg2000=True)
        reference = encode_result_objects(source, result, now=NOW, jpeg2000=True, reference=True)
        assert template == reference, name
    path = tmp_path / "seg.dcm"
    path.write_bytes(template[0].data)
    assert dciodvfy_errors(path) == []
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == pydicom.uid.JPEG2000Lossless


def test_masks_round_trip_through_the_template_seg(cases) -> None:
    import highdicom as hd

    _, source, result = cases[2]  # one lung: empty frames left out
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(encode_result_objects(source, result)[0].data)))
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[source.SOPInstanceUID],
                                               segment_numbers=list(range(1, 10)))[0]
    planes = (result.zones.right, result.zones.left, result.disease, *result.zones.zones)
    for k, plane in enumerate(planes):
        np.testing.assert_array_equal(pixels[..., k].astype(bool), plane)


@pytest.mark.parametrize("change", ["invalid Patient's Sex", "no Study ID"])
def test_a_source_highdicom_refuses_is_refused_alike(cases, change: str) -> None:
    _, source, result = cases[0]
    bad = pydicom.Dataset()
    bad.update(source)
    bad.file_meta = source.file_meta
    if change == "invalid Patient's Sex":
        bad.PatientSex = "X"
    else:
        del bad.StudyID
    refused = []
    for reference in (True, False):
        with pytest.raises((ValueError, AttributeError)) as info:
            encode_result_objects(bad, result, reference=reference)
        refused.append(type(info.value))
    assert refused[0] is refused[1]


def test_frames_packed_inside_their_boxes_equal_whole_plane_packing() -> None:
    """A plane packed only inside a box holding its pixels is ``np.packbits`` of the whole plane, bit for bit
    (rows of whole bytes, or the whole-plane fallback where rows do not end on a byte)."""
    from cxrtriage.inference.result_templates import packed_frame
    from cxrtriage.inference.scoring import EMPTY_BOX, bounds

    rng = np.random.default_rng(15)
    for columns in (64, 2048, 250, 13):
        for _ in range(5):
            rows = int(rng.integers(1, 90))
            plane = np.zeros((rows, columns), bool)
            top, left = int(rng.integers(0, rows)), int(rng.integers(0, columns))
            plane[top:top + int(rng.integers(1, 30)), left:left + int(rng.integers(1, 40))] = rng.random() < 0.9
            box = bounds(plane)
            wider = (max(box[0] - 3, 0), min(box[1] + 2, rows), max(box[2] - 5, 0), min(box[3] + 9, columns))
            whole = np.packbits(plane, axis=None, bitorder="little")
            for b in (box, wider, None) if plane.any() else (EMPTY_BOX, None):
                inside = plane if b is None else plane[b[0]:b[1], b[2]:b[3]]
                np.testing.assert_array_equal(packed_frame(inside, b, plane.shape), whole)


@pytest.mark.parametrize("orientation", [None, ["L", "F"], ["R", "F"], ["R", "H"], ["F", "L"], ["H", "R"]])
def test_each_segment_lies_inside_its_box(orientation: list[str] | None) -> None:
    """The boxes the SEG packs within hold every pixel of their segment, in every display orientation, and the
    parts inside them are the planes' own pixels."""
    from types import SimpleNamespace

    from cxrtriage.inference.dicom_results import segmentation_parts, segmentation_planes

    rng = np.random.default_rng(16)
    lungs = np.zeros((120, 96), bool)
    lungs[10:100, 8:40] = True
    lungs[15:110, 55:90] = rng.random((95, 35)) < 0.95
    disease = lungs & (rng.random(lungs.shape) < 0.2)
    scores, zones = score(lungs, disease, ScoringConfig(0.3), orientation, None, None)
    result = SimpleNamespace(zones=zones, disease=disease)
    parts = segmentation_parts(result)  # type: ignore[arg-type]
    planes = segmentation_planes(result)  # type: ignore[arg-type]
    assert parts[2][0] is None and sum(box is not None for box, _ in parts) == 8
    for plane, (box, inside) in zip(planes, parts):
        if box is None:
            assert inside is plane
        else:
            np.testing.assert_array_equal(inside, plane[box[0]:box[1], box[2]:box[3]])
            outside = plane.copy()
            outside[box[0]:box[1], box[2]:box[3]] = False
            assert plane.any() and not outside.any()
