"""Log lines carry the event's structured fields, as text or as JSON lines; PHI keys stay out."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from cxrtriage.config import LoggingSettings
from cxrtriage.observability import event, setup_logging


@pytest.fixture
def restore_loggers() -> Iterator[None]:
    """setup_logging replaces the handlers of the project's and pynetdicom's loggers: put them back."""
    saved = {}
    for name in ("cxrtriage", "pynetdicom"):
        logger = logging.getLogger(name)
        saved[name] = (list(logger.handlers), logger.level, logger.propagate)
    yield
    for name, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if handler not in handlers:
                handler.close()
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


def _log_refusal() -> None:
    log = logging.getLogger("cxrtriage.scp.ingest")
    event(log, logging.WARNING, "store refused", reason="disk_full", status="0xA700", calling_aet="MODALITY 1",
          free_bytes=1024, patient_name="PHANTOM^ONE")


def test_text_lines_carry_the_fields(tmp_path: Path, restore_loggers: None) -> None:
    path = tmp_path / "node.log"
    setup_logging(LoggingSettings(json_lines=False, file=str(path)))
    _log_refusal()
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    line = lines[0]
    assert " WARNING cxrtriage.scp.ingest store refused " in line
    assert "reason=disk_full" in line and "status=0xA700" in line and "free_bytes=1024" in line
    assert 'calling_aet="MODALITY 1"' in line  # a value with a space stays one token
    assert "PHANTOM" not in line and "patient_name" not in line


def test_json_lines_carry_the_fields(tmp_path: Path, restore_loggers: None) -> None:
    path = tmp_path / "node.log"
    setup_logging(LoggingSettings(json_lines=True, file=str(path)))
    _log_refusal()
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["logger"] == "cxrtriage.scp.ingest" and record["msg"] == "store refused"
    assert record["level"] == "WARNING"
    assert (record["reason"], record["status"], record["calling_aet"], record["free_bytes"]) == (
        "disk_full", "0xA700", "MODALITY 1", 1024
    )
    assert "patient_name" not in record


def test_patient_names_only_when_allowed(tmp_path: Path, restore_loggers: None) -> None:
    path = tmp_path / "node.log"
    setup_logging(LoggingSettings(json_lines=False, patient_names=True, file=str(path)))
    _log_refusal()
    assert "patient_name=PHANTOM^ONE" in path.read_text()


def test_phi_is_dropped_at_any_depth_and_blanked_elsewhere(tmp_path: Path, restore_loggers: None) -> None:
    path = tmp_path / "node.log"
    setup_logging(LoggingSettings(json_lines=True, file=str(path)))
    log = logging.getLogger("cxrtriage.triage.jobs")
    event(log, logging.ERROR, "escalation failed for ZZMARKACC", patient_id="ZZMARKERID",
          study={"PatientName": "ZZMARKER^NAME", "uid": "1.2.3", "AccessionNumber": "ZZMARKACC"},
          items=[{"patient_birth_date": "19010101"}], note="retry for ZZMARKERID later")
    record = json.loads(path.read_text())
    assert "ZZMARK" not in json.dumps(record) and "19010101" not in json.dumps(record)
    assert record["study"] == {"uid": "1.2.3"} and record["items"] == [{}]
    assert record["msg"] == "escalation failed for <redacted>" and record["note"] == "retry for <redacted> later"


def test_exception_tracebacks_are_scrubbed(tmp_path: Path, restore_loggers: None) -> None:
    path = tmp_path / "node.log"
    setup_logging(LoggingSettings(json_lines=False, file=str(path)))
    name, pid = "ZZMARKER^NAME", "ZZMARKERID"  # the traceback shows source lines: values come from variables
    try:
        raise ValueError(f"cannot store {name!r} with PatientID={pid}")
    except ValueError:
        logging.getLogger("pynetdicom.events").exception("Exception in handler for 'ZZMARKERID'")
    text = path.read_text()
    assert "ZZMARK" not in text
    assert "Traceback (most recent call last)" in text and "ValueError: cannot store <redacted>" in text


def test_safe_error_keeps_the_reason() -> None:
    from cxrtriage.observability import safe_error

    assert safe_error(OSError("association with PACS refused")) == "OSError: association with PACS refused"
    detail = 'duplicate key value violates unique constraint "ix"\nDETAIL:  Key (patient_id)=(ZZMARKERID) exists.'
    assert safe_error(RuntimeError(detail)) == "RuntimeError: duplicate key value violates unique constraint <redacted>"


def test_the_log_file_is_reopened_after_rotation(tmp_path: Path, restore_loggers: None) -> None:
    """logrotate renames the file; the next line goes to a new file under the configured name."""
    path = tmp_path / "node.log"
    setup_logging(LoggingSettings(file=str(path)))
    _log_refusal()
    path.rename(tmp_path / "node.log.1")
    _log_refusal()
    assert len((tmp_path / "node.log.1").read_text().splitlines()) == 1
    assert len(path.read_text().splitlines()) == 1


def _log_study_received() -> None:
    log = logging.getLogger("cxrtriage.scp.ingest")
    event(log, logging.INFO, "study received ACC-20260501-7", accession_number="ACC-20260501-7",
          patient_id="PID-123456", study_uid="1.2.3")


@pytest.mark.parametrize("json_lines", [True, False])
def test_accession_numbers_stay_out_by_default(tmp_path: Path, restore_loggers: None, json_lines: bool) -> None:
    path = tmp_path / "node.log"
    setup_logging(LoggingSettings(file=str(path), json_lines=json_lines))
    _log_study_received()
    text = path.read_text()
    assert "ACC-20260501-7" not in text and "PID-123456" not in text
    assert "1.2.3" in text  # the rest of the event is there


@pytest.mark.parametrize("json_lines", [True, False])
def test_accession_numbers_logged_when_allowed(tmp_path: Path, restore_loggers: None, json_lines: bool) -> None:
    path = tmp_path / "node.log"
    setup_logging(LoggingSettings(file=str(path), json_lines=json_lines, accession_numbers=True))
    _log_study_received()
    text = path.read_text()
    assert "PID-123456" not in text  # only accession numbers are let through, not patient identity
    if json_lines:
        line = json.loads(text)
        assert line["accession_number"] == "ACC-20260501-7"
        assert line["msg"] == "study received ACC-20260501-7"
    else:
        assert "accession_number=ACC-20260501-7" in text
