"""config.yaml documents the defaults; bad settings are refused with their name."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from cxrtriage.config import Settings, load_settings

ROOT = Path(__file__).parents[1]


def test_shipped_config_equals_the_defaults() -> None:
    assert load_settings(ROOT / "config.yaml") == Settings()


def test_unknown_or_bad_keys_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("dicom:\n  prot: 104\n")
    with pytest.raises(ValidationError, match="prot"):
        load_settings(bad)
    bad.write_text("dicom:\n  ae_title: THIS_TITLE_IS_TOO_LONG\n")
    with pytest.raises(ValidationError, match="ae_title"):
        load_settings(bad)
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        load_settings(tmp_path / "nowhere.yaml")
