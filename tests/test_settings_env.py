"""Settings from CXRTRIAGE_* environment variables and *_FILE secret files, over config.yaml."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cxrtriage.config import ConfigError, Peer, load_settings


@pytest.fixture()
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text("web:\n  port: 9000\n  token: from-file\nstorage:\n  archive_dir: /srv/archive\n")
    return path


def test_environment_overrides_the_file_and_nested_keys_merge(config: Path) -> None:
    settings = load_settings(config, environ={"CXRTRIAGE_WEB__TOKEN": "from-env",
                                              "CXRTRIAGE_STORAGE__DATABASE_URL": "postgresql://db/x"})
    assert settings.web.token == "from-env"
    assert settings.web.port == 9000  # the rest of web: still from the file
    assert settings.storage.database_url == "postgresql://db/x"
    assert settings.storage.archive_dir == "/srv/archive"


def test_values_are_converted_and_lists_are_json(config: Path) -> None:
    settings = load_settings(config, environ={
        "CXRTRIAGE_DICOM__PORT": "11113",
        "CXRTRIAGE_DICOM__REQUIRE_CALLED_AET": "true",
        "CXRTRIAGE_DICOM__ALLOWED_CALLING_AETS": '["MODALITY1", "MODALITY2"]',
        "CXRTRIAGE_DESTINATIONS": '[{"ae_title": "PACS", "host": "pacs.example", "port": 4242}]',
        "CXRTRIAGE_NODE_NAME": "node-b",
        "CXRTRIAGE_WEB__READERS__ALICE": "alice-token",
    })
    assert settings.dicom.port == 11113 and settings.dicom.require_called_aet is True
    assert settings.dicom.allowed_calling_aets == ["MODALITY1", "MODALITY2"]
    assert settings.destinations == [Peer(ae_title="PACS", host="pacs.example", port=4242)]
    assert settings.node_name == "node-b"
    assert settings.web.readers == {"alice": "alice-token"}


def test_no_file_still_reads_the_environment() -> None:
    assert load_settings(None, environ={"CXRTRIAGE_WEB__PORT": "8181"}).web.port == 8181
    assert load_settings(None, environ={}).web.port == 8080


def test_the_process_environment_is_read_by_default(monkeypatch: pytest.MonkeyPatch, config: Path) -> None:
    monkeypatch.setenv("CXRTRIAGE_METRICS__PORT", "9999")
    assert load_settings(config).metrics.port == 9999
    assert "CXRTRIAGE_METRICS__PORT" in os.environ


def test_file_form_reads_the_secret_without_its_trailing_newline(config: Path, tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("s3cret-token\n")
    settings = load_settings(config, environ={"CXRTRIAGE_WEB__TOKEN_FILE": str(secret)})
    assert settings.web.token == "s3cret-token"
    password = tmp_path / "password"
    password.write_text("pw")
    settings = load_settings(config, environ={
        "CXRTRIAGE_DESTINATIONS": '[{"ae_title": "WEB", "type": "dicomweb", "url": "http://pacs/dicom-web"}]',
        "CXRTRIAGE_NODE_NAME_FILE": str(password),
    })
    assert settings.node_name == "pw"


def test_a_key_named_file_is_a_value_not_a_secret_file(tmp_path: Path) -> None:
    """logging.file ends in _FILE: the variable sets the key, it does not read a file."""
    log = str(tmp_path / "node.log")
    assert load_settings(None, environ={"CXRTRIAGE_LOGGING__FILE": log}).logging.file == log


def test_missing_secret_file_is_one_line_naming_variable_and_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError) as caught:
        load_settings(None, environ={"CXRTRIAGE_WEB__TOKEN_FILE": str(missing)})
    message = str(caught.value)
    assert "\n" not in message
    assert "CXRTRIAGE_WEB__TOKEN_FILE" in message and str(missing) in message


def test_unreadable_secret_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CXRTRIAGE_WEB__TOKEN_FILE.*cannot read"):
        load_settings(None, environ={"CXRTRIAGE_WEB__TOKEN_FILE": str(tmp_path)})  # a directory


def test_typos_are_errors_naming_the_variable_and_the_keys_allowed() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, environ={"CXRTRIAGE_WEB__TOKN": "x", "CXRTRIAGE_WBE__PORT": "1"})
    lines = str(caught.value).splitlines()
    assert len(lines) == 2
    assert any(line.startswith("CXRTRIAGE_WEB__TOKN:") and "token" in line for line in lines)
    assert any(line.startswith("CXRTRIAGE_WBE__PORT:") and "web" in line for line in lines)


def test_other_cxrtriage_variables_are_not_config() -> None:
    """Tests and tools use the prefix too: only nested keys (``__``) and top-level key names are config."""
    environ = {"CXRTRIAGE_TEST_DATABASE_URL": "sqlite://", "CXRTRIAGE_CT_DIR": "/x", "CXRTRIAGE_CACHE": "/y"}
    assert load_settings(None, environ=environ).node_name == "cxrtriage"


def test_bad_values_name_the_variable_and_mask_secrets(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, environ={"CXRTRIAGE_DICOM__PORT": "http"})
    assert str(caught.value).startswith("CXRTRIAGE_DICOM__PORT='http': dicom.port:")
    with pytest.raises(ConfigError) as caught:
        load_settings(None, environ={"CXRTRIAGE_WEB__READERS": '{"alice": 12345}'})
    message = str(caught.value)
    assert "CXRTRIAGE_WEB__READERS=<secret>" in message and "12345" not in message
    with pytest.raises(ConfigError) as caught:
        load_settings(None, environ={"CXRTRIAGE_DESTINATIONS": "[{not json"})
    assert str(caught.value).startswith("CXRTRIAGE_DESTINATIONS='[{not json': destinations must be JSON")


def test_file_errors_keep_naming_the_file(config: Path) -> None:
    config.write_text("web:\n  port: nope\n")
    with pytest.raises(ConfigError, match=f"^{config}: web.port"):
        load_settings(config, environ={"CXRTRIAGE_WEB__TOKEN": "x"})


def test_a_string_setting_is_never_parsed_as_json() -> None:
    settings = load_settings(None, environ={"CXRTRIAGE_WEB__TOKEN": '{"not": "json to parse"}'})
    assert settings.web.token == '{"not": "json to parse"}'
