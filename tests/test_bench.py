"""bench/pipeline.py end to end on a few small images: the baseline and cxrtriage agree.

Speeds are printed by the benchmark, never asserted here; this checks that the
published-inference re-implementation and cxrtriage give the same scores and
that the benchmark's report is complete.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_pipeline_benchmark_agrees_with_the_published_inference(tmp_path: Path) -> None:
    report_path = tmp_path / "pipeline.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "pipeline.py"), "--images", "4", "--rounds", "1", "--size", "1200x1000",
         "--json", str(report_path)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert set(report["contenders"]) == {"covid_scoring", "cxrtriage fp32", "cxrtriage bf16"}
    for name, numbers in report["contenders"].items():
        assert numbers["images_per_s"] > 0
        assert numbers["agreement"]["same_total"] == 4, name
        assert f"{name:15s}:" in proc.stdout
    assert report["fp32_vs_bf16"]["same_total"] == 4
