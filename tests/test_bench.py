"""The benchmarks end to end on a few small images: they run, compare like with like, and report it all.

Speeds are printed by the benchmarks, never asserted here; these check that the
published-inference re-implementation and cxrtriage give the same scores, that every
contender wrote the same outputs, and that the reports hold every round and the CPU
time beside the wall time. The GPU script's CPU dry run is run as the GPU machine
would run it (bench/gpu.sh), at tiny sizes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_pipeline_benchmark_compares_equal_layouts_and_agrees_with_the_published_inference(tmp_path: Path) -> None:
    report_path = tmp_path / "pipeline.json"
    contenders = ["published as run", "published fp32", "cxrtriage fp32", "cxrtriage bf16"]
    proc = subprocess.run(
        [sys.executable, str(BENCH / "pipeline.py"), "--preset", "bundled", "--images", "2", "--batch", "1",
         "--workers", "2", "--rounds", "1", "--size", "1200x1000", "--contenders", *contenders,
         "--json", str(report_path)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert list(report["summary"]) == contenders
    assert (report["workers"], report["threads"]) == (2, 1)
    for name, numbers in report["summary"].items():
        assert numbers["images_per_s"] > 0 and numbers["cpu_s_per_image"] > 0, name
        assert numbers["non_empty_lungs"] == 2, name  # real masks: the bundled models are trained
        assert f"{name:16s}:" in proc.stdout
        (run,) = report["runs"][name]  # one round, kept
        if name == "published as run":  # the published program's outputs: two PNGs per image, no DICOM
            assert run["outputs"] == {"seg": 0, "sr": 0, "png": 4}
        else:  # the same SEG + SR from every other contender
            assert run["outputs"] == {"seg": 2, "sr": 2, "png": 0}, name
            assert numbers["agreement"]["same_total"] == 2, name
    assert report["summary"]["published fp32"]["vs_published_fp32"] == 1.0


def test_gpu_script_dry_run_on_the_cpu(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", str(BENCH / "gpu.sh"), str(tmp_path), "--dry-run"], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-dry-run.json").read_text())
    phases = report["phases"]
    assert list(phases) == ["environment", "weights", "ceiling", "baseline", "end_to_end"]
    assert not [name for name, numbers in phases.items() if "error" in numbers]
    assert phases["ceiling"]["stage1"]["images_per_s"] > 0 and phases["ceiling"]["stage2"]["images_per_s"] > 0
    # the ceiling runs the networks as the engine does, BatchNorm folded into the convolutions
    assert phases["ceiling"]["stage1"]["bn_folded"] > 0 and phases["ceiling"]["stage2"]["bn_folded"] > 0
    assert phases["baseline"]["outputs"]["png"] == 2 * phases["baseline"]["images"]
    e2e = phases["end_to_end"]
    assert e2e["outputs"]["seg"] == e2e["outputs"]["sr"] == e2e["images"]
    assert e2e["fraction_of_ceiling"] > 0 and e2e["device_lanes"] == 1
    # the CPU per image split by process: the engine runs the networks, the workers decode and write
    by_process = e2e["cpu_ms_per_image_by_process"]
    assert by_process["engine"] > 0 and by_process["workers"] > 0
    assert sum(by_process.values()) / 1000 == pytest.approx(e2e["cpu_s_per_image"], rel=0.01, abs=1e-3)
    # on the same engine, a run of each variant (Stage I's input, lung blobs: host or device), every run kept
    runs = e2e["variants"]["runs"]
    assert [r["variant"] for r in runs] == ["default", "all lanes", "stage1 on device", "blobs on device",
                                            "all of them"]
    assert all(r["images_per_s"] > 0 for r in runs) and set(e2e["variants"]["vs_default"]) == set(
        r["variant"] for r in runs[1:])
    # the dry run's engine is on the CPU: a lane a core, switched between one and all; no device steps
    assert [r["lanes"] for r in runs] == [1, e2e["variants"]["started_lanes"], 1, 1, e2e["variants"]["started_lanes"]]
    assert not any(r["on_device"] for r in runs) and not e2e["variants"]["cut_by_deadline"]
    assert all(r["steps"]["engine_blobs_device"] == 0 for r in runs)  # a CPU engine has no device blobs
    assert "images/s against the default: all lanes" in proc.stdout
    assert "models-alone ceiling" in proc.stdout and (tmp_path / "gpu.log").exists()


def test_profile_summary_gives_each_process_its_role_and_shares() -> None:
    """py-spy's raw stacks (a command line may hold ";") are split by process: the benchmark itself, the
    engine (its stacks pass through engine.serve), and the CPU workers; shares are of each role's samples."""
    sys.path.insert(0, str(BENCH))
    from profile_summary import parse, summary

    parent, spawned = 'process 10:"python bench/gpu.py"', 'process {}:"python -c from x import y; spawn_main(3)"'
    raw = "\n".join([
        f"{parent};main (gpu.py:1);select (selectors.py:415) 2",
        f"{parent};{spawned.format(11)};serve (cxrtriage/inference/engine.py:546);_run (engine.py:9);conv (c.py:1) 6",
        f"{parent};{spawned.format(11)};serve (cxrtriage/inference/engine.py:546);model_blobs (p.py:2) 2",
        f"{parent};{spawned.format(12)};finish (engine_jobs.py:3);encode (instance.py:4) 5",
        f"{parent};{spawned.format(13)};prepare (engine_jobs.py:5) 5",
        "not a stack line",
    ])
    stacks = parse(raw)
    assert [(pids, count) for pids, _, count in stacks] == [(["10"], 2), (["10", "11"], 6), (["10", "11"], 2),
                                                            (["10", "12"], 5), (["10", "13"], 5)]
    result = summary(stacks, top=3)
    assert {role: (r["processes"], r["samples"]) for role, r in result.items()} == {
        "worker": (2, 10), "engine": (1, 8), "caller": (1, 2)}
    assert result["engine"]["innermost"][0] == ("conv (c.py:1)", 0.75)
    assert ("serve (cxrtriage/inference/engine.py:546)", 1.0) in result["engine"]["inclusive"]
    assert result["worker"]["share_of_samples"] == 0.5


def test_gate_table_scores_each_gate_from_one_gate_off_run() -> None:
    """bench/eval_drr.py --gates: an image whose P(disease) is below the gate scores 0 in every zone, else its
    gate-off zones; MAE against the truth, lesion-free views (truth 0) counted apart and pooled."""
    sys.path.insert(0, str(BENCH))
    from eval_drr import gate_table

    rows = [  # zones as scored with the gate off, the truth's zones and total
        {"p_disease": 0.9, "zones": "110000", "truth_zones": "110000", "truth": 2},
        {"p_disease": 0.6, "zones": "111000", "truth_zones": "110000", "truth": 2},
        {"p_disease": 0.4, "zones": "000000", "truth_zones": "000001", "truth": 1},
    ]
    normals = [{"p_disease": 0.55, "zones": "111111"}, {"p_disease": 0.3, "zones": "100000"}]
    low, mid, high = gate_table(rows, normals, [0.3, 0.5, 0.7])
    assert (low["mae"], low["normals_2_or_more"], low["normal_max"]) == (pytest.approx(2 / 3), 1, 6)
    assert low["zone_accuracy"] == pytest.approx(16 / 18) and low["exact"] == pytest.approx(1 / 3)
    assert low["pooled_mae"] == pytest.approx((0 + 1 + 1 + 6 + 1) / 5) and low["pooled_images"] == 5
    assert (mid["mae"], mid["normal_mean_score"], mid["normal_max"]) == (pytest.approx(2 / 3), 3.0, 6)
    assert (high["mae"], high["normals_2_or_more"], high["normal_max"]) == (pytest.approx(1.0), 0, 0)
    assert high["zone_accuracy"] == pytest.approx(15 / 18)  # the 0.6 image: 111000 -> 000000


def test_threshold_table_scores_each_zone_threshold_from_one_pass() -> None:
    """bench/eval_drr.py --zone-thresholds: a zone scores 1 when its fraction is above T (never when its lung was
    not found); the truth's zones stay as given; PA and AP views are reported apart."""
    sys.path.insert(0, str(BENCH))
    from eval_drr import threshold_table

    rows = [
        {"view": "PA", "fractions": [0.5, 0.2, 0.0, 0.0, 0.0, 0.0], "truth_zones": "110000", "truth": 2},
        {"view": "AP", "fractions": [None, None, None, 0.1, 0.35, 0.0], "truth_zones": "000110", "truth": 2},
    ]
    normals = [{"fractions": [0.15, 0.12, 0.0, 0.0, 0.0, 0.0]}]
    low, high = threshold_table(rows, normals, [0.1, 0.3])
    assert (low["mae"], low["mae_PA"], low["mae_AP"]) == (pytest.approx(0.5), 0.0, 1.0)  # 0.1 is not above 0.1
    assert (low["normals_2_or_more"], low["normal_max"], low["pooled_mae"]) == (1, 2, pytest.approx(1.0))
    assert low["zone_accuracy"] == pytest.approx(11 / 12)
    assert (high["mae"], high["exact"], high["normal_max"]) == (pytest.approx(1.0), 0.0, 0)
    assert high["zone_accuracy"] == pytest.approx(10 / 12)


def test_phantom_scores_at_each_zone_threshold_reproduce_the_pipelines_own(tmp_path: Path) -> None:
    """bench/eval_synthetic.py --zone-thresholds (T fitted against validation phantoms): at the model's own T the
    table's 0-6 MAE is the pipeline's, so every other T is the same scoring rule applied to the same fractions."""
    from cxrtriage.config import InferenceSettings
    from cxrtriage.inference.presets import model_specs, zone_threshold

    settings = InferenceSettings()
    bundled_t = zone_threshold(settings, model_specs(settings)[1])
    report = tmp_path / "phantoms.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "eval_synthetic.py"), "--images", "6", "--seed-base", "1050000",
         "--zone-thresholds", f"0.05,{bundled_t},0.95", "--json", str(report)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(report.read_text())
    assert out["seeds"] == [1050000, 1050005] and [r["seed"] for r in out["per_image"]] == list(range(1050000, 1050006))
    by_t = {t["zone_threshold"]: t for t in out["zone_thresholds"]}
    assert out["zone_threshold"] == bundled_t
    own, high = by_t[bundled_t], by_t[0.95]
    assert own["mae"] == pytest.approx(out["score_mae"])
    # At T = 0.95 a zone scores only where the pipeline found it more than 95 % opaque, from the same fractions.
    at_high = [sum(f is not None and f > 0.95 for f in r["fractions"]) for r in out["per_image"]]
    assert high["mae"] == pytest.approx(sum(abs(n - r["truth"]) for n, r in zip(at_high, out["per_image"])) / 6)
    assert high["mae"] != own["mae"]  # the threshold changes the scores: the table is not one scoring repeated


def test_truth_of_an_evaluation_does_not_move_with_the_models_threshold() -> None:
    """Two models with different T are measured against the same truth: the paper's T = 0.30."""
    from cxrtriage.config import InferenceSettings
    from cxrtriage.inference.pipeline import Pipeline
    from cxrtriage.inference.training.evaluation import evaluate_synthetic

    truths = []
    for t in (0.05, 0.6):
        pipeline = Pipeline(InferenceSettings(scoring={"zone_threshold": t}))
        assert pipeline.scoring.zone_threshold == t
        truths.append([r["truth"] for r in evaluate_synthetic(pipeline, images=6).per_image])
    assert truths[0] == truths[1] and sum(truths[0]) > 0


def test_compare_evals_tells_a_real_difference_from_noise() -> None:
    """bench/compare_evals.py: a candidate one zone nearer the truth on every image is better beyond noise; one
    that is 1 zone better on half the images and 1 worse on the other half is within noise; the same images are
    required."""
    sys.path.insert(0, str(BENCH))
    from compare_evals import compare

    truth = [1 + i % 5 for i in range(80)]

    def evaluation(errors: list[int]) -> dict:
        return {"per_image": [{"seed": i, "score": t + e, "truth": t, "lung_dice": 0.95, "overshoot": 0.0,
                               "opacity_dice": 0.5 if t > 2 else None, "p_disease": 0.1 * t}
                              for i, (t, e) in enumerate(zip(truth, errors))]}

    reference = evaluation([1] * 80)
    verdicts = {name: {r["metric"]: r for r in compare(reference, evaluation(errors), resamples=400)}["0-6 score MAE"]
                for name, errors in (("better", [0] * 80), ("mixed", [0, 2] * 40))}
    assert verdicts["better"]["difference"] == -1.0 and verdicts["better"]["verdict"] == "better"
    lo, hi = verdicts["mixed"]["interval"]
    assert verdicts["mixed"]["difference"] == 0.0 and lo < 0 < hi and verdicts["mixed"]["verdict"] == "within noise"
    assert {r["verdict"] for r in compare(reference, reference, resamples=100)} == {"identical"}
    rotated = {"per_image": reference["per_image"][1:] + reference["per_image"][:1]}
    with pytest.raises(ValueError, match="same images"):
        compare(reference, rotated)


def test_below_dome_counts_lung_drawn_under_a_dome_not_a_shifted_heart_border() -> None:
    """bench/eval_drr.py below_dome: a lung drawn 5 rows lower over its dome counts (5 / 100 of the height); the
    same lung shifted one column toward the heart does not, though that column's lowest row moves far."""
    sys.path.insert(0, str(BENCH))
    from eval_drr import below_dome

    truth = np.zeros((100, 80), dtype=bool)
    truth[10:70, 5:30] = True  # the patient's right lung: its dome at row 69
    truth[10:30, 30:35] = True  # its medial edge, ending high at the heart
    truth[10:72, 45:75] = True  # the left lung
    lower = truth.copy()
    lower[70:75, 5:30] = True
    assert below_dome(lower, truth) == (0.05, 0.0)
    shifted = truth.copy()
    shifted[10:70, 30] = True  # the lung's full height one column further in: not a dome column
    assert below_dome(shifted, truth) == (0.0, 0.0)


def test_compare_evals_counts_lungs_below_a_dome_when_both_evaluations_have_them() -> None:
    sys.path.insert(0, str(BENCH))
    from compare_evals import compare

    def evaluation(below: list[tuple[float, float]] | None) -> dict:
        rows = [{"seed": i, "score": 1, "truth": 1, "lung_dice": 0.95, "overshoot": 0.0,
                 "opacity_dice": 0.5 if i % 2 else None, "p_disease": 0.1 + 0.8 * (i % 2)} for i in range(60)]
        for row, b in zip(rows, below or []):
            row["below_dome"] = b
        return {"per_image": rows}

    name = "lungs > 2.5 % of the height below the base over a dome"
    reference, candidate = evaluation([(0.03, 0.04)] * 60), evaluation([(0.03, 0.0)] * 60)
    row = {r["metric"]: r for r in compare(reference, candidate, resamples=200)}[name]
    assert (row["reference"], row["candidate"], row["verdict"]) == (1.0, 0.5, "better")
    assert name not in {r["metric"] for r in compare(evaluation(None), candidate, resamples=50)}


def test_candidate_settings_change_only_what_they_name(tmp_path: Path) -> None:
    """The evaluation scripts score a candidate's weights and T with every other configured field kept."""
    from cxrtriage.config import InferenceSettings
    from cxrtriage.inference.pipeline import Pipeline
    from cxrtriage.inference.presets import model_specs
    from cxrtriage.inference.training.evaluation import candidate_settings

    configured = InferenceSettings(disease={"disease_gate": 0.6}, scoring={"brixia_cutoffs": (0.1, 0.3, 0.6)})
    assert candidate_settings(configured) is configured
    weights = str(model_specs(configured)[1].weights)
    candidate = candidate_settings(configured, disease=weights, zone_threshold=0.4)
    lungs, disease = model_specs(candidate)
    assert (disease.weights, disease.disease_gate) == (weights, 0.6)
    assert lungs == model_specs(configured)[0]
    scoring = Pipeline(candidate).scoring
    assert (scoring.zone_threshold, scoring.brixia_cutoffs) == (0.4, (0.1, 0.3, 0.6))
    assert model_specs(candidate_settings(configured, disease_gate=1e-9))[1].disease_gate == 1e-9
