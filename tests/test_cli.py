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
    assert "no input files" in proc.stderr  # stdout stays clean for --json


def test_version() -> None:
    import subprocess
    import sys

    from cxrtriage import __version__

    done = subprocess.run([sys.executable, "-m", "cxrtriage", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"cxrtriage {__version__}"


def test_help_and_version_import_no_torch() -> None:
    """The command answers --help at once: torch (seconds to import) loads only in the commands that score."""
    probe = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from cxrtriage.cli import app\n"
        "for args in (['--help'], ['--version'], ['score', '--help'], ['serve', '--help'], ['models', '--help'],"
        " ['models', 'pull', '--help']):\n"
        "    assert CliRunner().invoke(app, args).exit_code == 0, args\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'segmentation_models_pytorch') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_models_pull_help_names_the_base_url_variable() -> None:
    from cxrtriage.inference.model_cache import BASE_URL_ENV

    done = run("models", "pull", "--help")
    assert f"${BASE_URL_ENV}" in done.stdout


def test_boolean_options_are_flags() -> None:
    help_text = run("score", "--help").stdout
    for name in ("dicom", "jpeg2000", "json"):
        line = next(line for line in help_text.splitlines() if f"--{name} " in line)
        assert f"--no-{name}" in line and "<bool>" not in line, line
    done = run("score", "--dicom", "true", "missing.dcm")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "'true' is not a file" in done.stderr and "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def two_phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("two")
    generator = PhantomGenerator(600, 560)
    write_cr(generator(2_000_020, affected_zones=(0, 3)), folder / "a-rather-long-file-name-for-a-narrow-table.dcm")
    (folder / "not-an-image.dcm").write_bytes(b"\0" * 300)
    return folder


def test_score_json_prints_only_json(tmp_path: Path, two_phantoms: Path) -> None:
    done = subprocess.run([*CLI, "score", str(two_phantoms), "--out", str(tmp_path), "--json"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr  # one scored, one rejected
    report = json.loads(done.stdout)  # nothing but JSON on stdout
    assert report == json.loads((tmp_path / "results.json").read_text())
    assert [r["status"] for r in sorted(report["results"], key=lambda r: r["file"])] == ["scored", "rejected"]


def test_score_table_fits_a_narrow_terminal(tmp_path: Path, two_phantoms: Path) -> None:
    done = subprocess.run([*CLI, "score", str(two_phantoms), "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "COLUMNS": "60"})
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert max(len(line) for line in lines) <= 60, done.stdout
    assert "…" not in done.stdout  # wrapped, never cut
    file_column = "".join(line.split("│")[1].strip() for line in lines if line.startswith("│"))
    assert "a-rather-long-file-name-for-a-narrow-table.dcm" in file_column  # wrapped over lines, in full
    header = next(line for line in lines if "file" in line and "status" in line)
    assert "score 0-6" in header and "P(disease)" in header and " ms " not in header  # a column dropped
    assert "not_dicom" in done.stdout


def test_demo_draws_its_phantoms_with_progress(tmp_path: Path) -> None:
    import pydicom

    from cxrtriage.demo import demo_files

    heard: list[str] = []
    files = demo_files(tmp_path, 3, 7_000_000, heard.append)
    phantoms = [(label, path) for label, path in files if path.parent == tmp_path]
    assert sorted(heard) == sorted(label for label, _ in phantoms) and len(phantoms) == 3
    assert "ordered STAT" in phantoms[1][0]
    assert pydicom.dcmread(phantoms[1][1]).RequestAttributesSequence[0].RequestedProcedurePriority == "STAT"
