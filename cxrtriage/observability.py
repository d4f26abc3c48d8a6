"""Structured logs (no patient names unless configured) and Prometheus metrics."""

from __future__ import annotations

import json
import logging
import sys
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .config import LoggingSettings

#: Keys that may carry patient identity; dropped from log records unless allowed.
PHI_KEYS = ("patient_name", "patient_birth_date", "patient_id", "accession_number")


def record_fields(record: logging.LogRecord, patient_names: bool) -> dict[str, object]:
    """The structured fields :func:`event` attached to ``record``, without PHI keys unless allowed."""
    fields: dict[str, object] = getattr(record, "fields", None) or {}
    return {k: v for k, v in fields.items() if patient_names or k not in PHI_KEYS}


def _text_value(value: object) -> str:
    """``value`` in a ``key=value`` pair: a one-word string as it is, anything else as JSON."""
    if isinstance(value, str) and value and not any(c.isspace() or c in "=\"\\" for c in value):
        return value
    return json.dumps(value, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``<time> <LEVEL> <logger> <message> key=value ...``: the event's fields follow the message."""

    def __init__(self, patient_names: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")
        self.patient_names = patient_names

    def formatMessage(self, record: logging.LogRecord) -> str:
        pairs = "".join(f" {k}={_text_value(v)}" for k, v in record_fields(record, self.patient_names).items())
        return super().formatMessage(record) + pairs


class JsonFormatter(logging.Formatter):
    def __init__(self, patient_names: bool) -> None:
        super().__init__()
        self.patient_names = patient_names

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        payload.update(record_fields(record, self.patient_names))
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def setup_logging(settings: LoggingSettings) -> None:
    handler: logging.Handler
    handler = logging.FileHandler(settings.file) if settings.file else logging.StreamHandler(sys.stderr)
    if settings.json_lines:
        handler.setFormatter(JsonFormatter(settings.patient_names))
    else:
        handler.setFormatter(TextFormatter(settings.patient_names))
    root = logging.getLogger("cxrtriage")
    root.handlers[:] = [handler]
    root.setLevel(settings.level.upper())
    root.propagate = False
    # pynetdicom logs handler exceptions and protocol errors; only to a NullHandler by default.
    network = logging.getLogger("pynetdicom")
    network.handlers[:] = [handler]
    network.setLevel(logging.WARNING)
    network.propagate = False


def event(logger: logging.Logger, level: int, message: str, **fields: object) -> None:
    """Log ``message`` with structured ``fields`` (PHI keys filtered by the formatter)."""
    logger.log(level, message, extra={"fields": fields})


def hex_status(code: int) -> str:
    """A DIMSE status as the metrics and logs label it: ``0xA700``."""
    return f"0x{code:04X}"


class Metrics:
    """The node's Prometheus metrics, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("cxrtriage_received_total", "Instances received by C-STORE", ["status"], registry=r)
        self.scored = Counter("cxrtriage_scored_total", "Scoring outcomes", ["outcome"], registry=r)
        self.sent = Counter(
            "cxrtriage_sent_total", "Instances sent to destinations", ["destination", "outcome"], registry=r
        )
        self.queue_depth = Gauge("cxrtriage_queue_depth", "Jobs by kind and state", ["kind", "state"], registry=r)
        self.latency = Histogram(
            "cxrtriage_stage_seconds", "Latency of processing stages", ["stage"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
