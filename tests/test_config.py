"""config.yaml documents the defaults; bad settings are refused with their name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cxrtriage.config import ConfigError, Settings, load_settings

ROOT = Path(__file__).parents[1]


def test_shipped_config_equals_the_defaults() -> None:
    assert load_settings(ROOT / "config.yaml") == Settings()


def test_unknown_or_bad_keys_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("dicom:\n  prot: 104\n")
    with pytest.raises(ConfigError, match="prot"):
        load_settings(bad)
    bad.write_text("dicom:\n  ae_title: THIS_TITLE_IS_TOO_LONG\n")
    with pytest.raises(ConfigError, match="ae_title"):
        load_settings(bad)
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_settings(tmp_path / "nowhere.yaml")


#: Values that were accepted and then failed at run time (issue #12): each is refused at load
#: with one line naming the key, the value and what is allowed.
BAD_VALUES = [
    ("triage:\n  priority:\n    base: {critical: 90}\n", "triage.priority.base", "missing ['high'"),
    ("triage:\n  priority:\n    max_wait_minutes: "
     "{critical: 0, high: 1, moderate: 1, low: 1, unscored: 1, ai_failed: 1}\n",
     "triage.priority.max_wait_minutes", "above 0"),
    ("triage:\n  priority:\n    critical_total: 1\n    high_total: 3\n", "triage.priority",
     "critical_total >= high_total"),
    ("inference:\n  preset: danilov\n", "inference.preset", "'danilov'"),
    ("inference:\n  scoring:\n    brixia_cutoffs: [0.9, 0.1, 0.5]\n", "inference.scoring.brixia_cutoffs", "increasing"),
    ("inference:\n  device: gpu7\n", "inference.device", "'gpu7'"),
    ("logging:\n  level: LOUD\n", "logging.level", "'LOUD'"),
]


@pytest.mark.parametrize(("text", "key", "detail"), BAD_VALUES)
def test_values_that_failed_at_run_time_are_refused_at_load(tmp_path: Path, text: str, key: str, detail: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and key in message and detail in message, message
    assert message.startswith(str(path))


def test_serve_with_a_bad_config_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(BAD_VALUES[3][0])
    proc = subprocess.run([sys.executable, "-m", "cxrtriage", "serve", "-c", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "inference.preset" in lines[0] and "Traceback" not in proc.stdout + proc.stderr
