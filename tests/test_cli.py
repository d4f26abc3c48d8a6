"""``cxrtriage score`` and ``cxrtriage train`` run as a user runs them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from cxrtriage.inference.phantom import PhantomGenerator, write_cr

from .bad_inputs import write_bad_corpus

CLI = [sys.executable, "-m", "cxrtriage"]


def run(*args: str) -> subprocess.CompletedProcess:
    # A wide terminal, so that rich does not wrap the reasons in the printed table.
    env = {**os.environ, "COLUMNS": "300"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_score_mixed_folder(tmp_path: Path, phantom_cr: Path, rg1: Path, workers: str) -> None:
    folder = tmp_path / "in"
    expected_bad = write_bad_corpus(phantom_cr, folder / "bad")
    generator = PhantomGenerator(600, 560)
    good = [
        write_cr(generator(2_000_010), folder / "good" / "a.dcm"),
        write_cr(generator(2_000_011), folder / "good" / "b_mono1.dcm", monochrome1=True),
        Path(shutil.copy(rg1, folder / "good" / "rg1.dcm")),
    ]
    png = folder / "good" / "c.png"
    cv2.imwrite(str(png), (generator(2_000_012).image * 255).astype(np.uint8))
    good.append(png)

    out = tmp_path / "out"
    proc = run("score", str(folder), "--out", str(out), "--workers", workers)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # some files were rejected
    report = json.loads((out / "results.json").read_text())
    by_name = {Path(r["file"]).name: r for r in report["results"]}
    assert report["scored"] == len(good) and report["rejected"] == len(expected_bad)
    for path in good:
        record = by_name[path.name]
        assert record["status"] == "scored"
        overlay = cv2.imread(record["overlay"])
        assert overlay is not None and overlay.shape[2] == 3
    for path, reason in expected_bad.items():
        record = by_name[path.name]
        assert record["status"] == "rejected" and record["reason"] == reason, record
        assert reason in proc.stdout.replace("\n", "")  # named in the printed table too


def test_score_rg1_saves_overlay(tmp_path: Path, rg1: Path) -> None:
    proc = run("score", str(rg1), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "results.json").read_text())
    record = report["results"][0]
    assert record["lungs_found"] == 2
    overlay = cv2.imread(record["overlay"])
    assert overlay.shape[0] == 1024  # long side scaled to 1024 from 1955


def test_score_with_nothing_to_score(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    proc = run("score", str(tmp_path / "empty"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "no input files" in proc.stdout


def test_version() -> None:
    import subprocess
    import sys

    from cxrtriage import __version__

    done = subprocess.run([sys.executable, "-m", "cxrtriage", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"cxrtriage {__version__}"
