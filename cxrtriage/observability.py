"""Structured logs (no patient data unless configured) and Prometheus metrics.

Patient data stays out of logs and job errors in three ways:

* :func:`safe_error` turns an exception into ``"<Type>: <scrubbed message>"``;
  every log line and job error that carries an exception uses it, because
  driver and SQLAlchemy messages quote the bound values of the failed
  statement (the patient's name, ID, accession number, birth date).
* The formatters drop fields whose key names patient data (:func:`is_phi_key`),
  at any depth of nested dicts and lists.
* The values of those dropped fields are also blanked wherever else they
  appear in the same record: the message and the other fields.

``logging.patient_names: true`` lets all of it through; ``logging.accession_numbers:
true`` lets only accession numbers through (:data:`ACCESSION_KEYS`).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterable

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .config import LoggingSettings

#: Key names (lower case, without ``_``, ``-``, ``'`` or spaces) that carry patient identity:
#: the snake_case names the node uses and the DICOM keywords of the Patient and Study modules.
_PHI_KEY_NAMES = frozenset({
    "patientname", "patientsname", "patientid", "patientbirthdate", "patientsbirthdate", "birthdate",
    "accessionnumber", "accession", "otherpatientids", "otherpatientidssequence", "otherpatientnames",
    "patientbirthname", "patientmothersbirthname", "patientaddress", "patientsaddress",
    "patienttelephonenumbers", "issuerofpatientid", "referringphysicianname", "patientcomments",
    "patientbirthtime", "medicalrecordlocator", "studyid", "institutionname", "operatorsname",
    "performingphysicianname", "requestingphysician", "physiciansofrecord",
})

#: The PHI key names of the accession number: logged when ``logging.accession_numbers`` is true.
ACCESSION_KEYS = frozenset({"accessionnumber", "accession"})

#: What replaces a scrubbed value.
REDACTED = "<redacted>"
#: The longest scrubbed exception message kept (tracebacks and SQL are not useful in a job error).
MAX_ERROR_CHARS = 300

# SQLAlchemy appends the statement, its parameters and a help link, each in brackets or
# parentheses on its own line; PostgreSQL appends DETAIL/HINT/CONTEXT lines that quote key values.
_TRAILERS = re.compile(
    r"\s*(\[SQL:|\[parameters:|\[SQL parameters|\(Background on this error|DETAIL:|HINT:|CONTEXT:|LINE \d+:).*", re.S
)
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|`[^`]*`")
# Key (patient_id)=(ZZ123) in PostgreSQL's unique-violation detail.
_KEY_VALUE = re.compile(r"=\([^)]*\)")
# A DICOM person name: components joined by '^' (PS3.5 6.2, PN).
_PERSON_NAME = re.compile(r"[^\s'\"^=:,;()\[\]]*\^[^\s'\"=:,;()\[\]]*")
# A date (DA, PS3.5 6.2) as a bare 8-digit number, not part of a UID or a longer number.
_DATE = re.compile(r"(?<![\d.])(1[89]|20)\d{2}(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])(?![\d.])")
# Values printed after a key that names patient data: PatientID=ZZ1, patient_name: ZZ^A.
_PHI_ASSIGNMENT = re.compile(
    r"(?i)\b(patient[_ ']?s?[_ ]?(name|id|birth[_ ]?date)|accession[_ ]?(number)?|birth[_ ]?date)"
    r"(\s*[=:]\s*|\s+)([^\s,;)\]}]+)"
)


def scrub_text(text: str, *, keep_quoted: bool = False) -> str:
    """``text`` without what may be patient data: quoted values, person names, dates, key values.

    Also cuts SQLAlchemy's ``[SQL: ...]`` / ``[parameters: ...]`` trailers and
    PostgreSQL's DETAIL lines, and caps the length at :data:`MAX_ERROR_CHARS`.
    ``keep_quoted`` keeps quoted values (the node's own messages quote AE titles and paths).
    """
    text = _TRAILERS.sub("", text)
    if not keep_quoted:
        text = _QUOTED.sub(REDACTED, text)
    text = _KEY_VALUE.sub("=" + REDACTED, text)
    text = _PHI_ASSIGNMENT.sub(lambda m: f"{m.group(1)}{m.group(4)}{REDACTED}", text)
    text = _PERSON_NAME.sub(REDACTED, text)
    text = _DATE.sub(REDACTED, text)
    text = " ".join(text.split())  # one line: a log value or a database column, not a report
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 1] + "…"
    return text


def safe_error(exc: BaseException) -> str:
    """``exc`` as ``"<Type>: <scrubbed message>"``, fit for logs, job errors and result messages.

    For a SQLAlchemy error the driver's own message is used (the statement
    and its bound parameters, which carry the instance's patient data, are
    dropped); every message goes through :func:`scrub_text`. The node's own
    exceptions keep their quoted values: they quote AE titles and file names,
    never dataset values.
    """
    name = type(exc).__name__
    orig = getattr(exc, "orig", None)  # sqlalchemy.exc.DBAPIError wraps the driver's exception
    message = str(orig) if isinstance(orig, BaseException) else _message(exc)
    own = type(exc).__module__.partition(".")[0] == __name__.partition(".")[0] and orig is None
    message = scrub_text(message, keep_quoted=own)
    return f"{name}: {message}" if message else name


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a broken __str__ must not break the error path
        return ""


def is_phi_key(key: object, allowed: frozenset[str] = frozenset()) -> bool:
    """Whether a field named ``key`` carries patient identity (``patient_id``, ``PatientName``, ...).

    ``allowed``: normalised key names the configuration lets through (:data:`ACCESSION_KEYS`).
    """
    if not isinstance(key, str):
        return False
    name = re.sub(r"[\s_\-']", "", key).lower()
    return name in _PHI_KEY_NAMES and name not in allowed


def _phi_values(value: object, under_phi: bool = False, allowed: frozenset[str] = frozenset()) -> Iterable[str]:
    """Every string (and number) found under a PHI key in ``value``, at any depth."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _phi_values(v, under_phi or is_phi_key(k, allowed), allowed)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from _phi_values(item, under_phi, allowed)
    elif under_phi and value is not None:
        text = str(value).strip()
        if len(text) >= 3:  # blanking "M" or "1" everywhere would garble the line, not protect anyone
            yield text
            for part in text.split("^"):  # a person name's components appear on their own too
                if len(part.strip()) >= 3:
                    yield part.strip()


def _without_phi(value: object, secrets: list[str], allowed: frozenset[str] = frozenset()) -> object:
    """``value`` without PHI keys at any depth, with ``secrets`` blanked in its strings."""
    if isinstance(value, dict):
        return {k: _without_phi(v, secrets, allowed) for k, v in value.items() if not is_phi_key(k, allowed)}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_without_phi(v, secrets, allowed) for v in value]
    if isinstance(value, str):
        return _blank(value, secrets)
    return value


def _blank(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


class _Scrubbed:
    """A record's message and fields as one formatter may print them."""

    def __init__(self, record: logging.LogRecord, patient_names: bool, accession_numbers: bool = False) -> None:
        fields: dict[str, object] = getattr(record, "fields", None) or {}
        message = record.getMessage()
        if patient_names:
            self.message, self.fields = message, dict(fields)
            return
        allowed = ACCESSION_KEYS if accession_numbers else frozenset()
        secrets = sorted(set(_phi_values(fields, allowed=allowed)), key=len, reverse=True)
        extra = {k: v for k, v in vars(record).items() if is_phi_key(k, allowed)}  # logger.info(..., extra={...})
        secrets += sorted(set(_phi_values(extra, under_phi=True, allowed=allowed)), key=len, reverse=True)
        if not record.name.startswith("cxrtriage"):
            # pynetdicom and friends may print dataset values: scrub them like an exception message
            message = scrub_text(message)
        self.message = _blank(message, secrets)
        cleaned = _without_phi(fields, secrets, allowed)
        self.fields = cleaned if isinstance(cleaned, dict) else {}


def _safe_exception(exc_info: tuple[type[BaseException], BaseException, object] | object) -> str:
    """A traceback whose exception lines are scrubbed: the stack (code locations) and :func:`safe_error`."""
    if not isinstance(exc_info, tuple) or len(exc_info) != 3 or not isinstance(exc_info[1], BaseException):
        return ""
    exc = exc_info[1]
    stack = "".join(traceback.format_tb(exc.__traceback__))
    return f"Traceback (most recent call last):\n{stack}{safe_error(exc)}"


def _text_value(value: object) -> str:
    """``value`` in a ``key=value`` pair: a one-word string as it is, anything else as JSON."""
    if isinstance(value, str) and value and not any(c.isspace() or c in "=\"\\" for c in value):
        return value
    return json.dumps(value, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``<time> <LEVEL> <logger> <message> key=value ...``: the event's fields follow the message."""

    def __init__(self, patient_names: bool, accession_numbers: bool = False) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")
        self.patient_names = patient_names
        self.accession_numbers = accession_numbers

    def format(self, record: logging.LogRecord) -> str:
        scrubbed = _Scrubbed(record, self.patient_names, self.accession_numbers)
        record.message = scrubbed.message
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        pairs = "".join(f" {k}={_text_value(v)}" for k, v in scrubbed.fields.items())
        line = self.formatMessage(record) + pairs
        if record.exc_info:
            exc = self.formatException(record.exc_info) if self.patient_names else _safe_exception(record.exc_info)
            line = f"{line}\n{exc}"
        return line


class JsonFormatter(logging.Formatter):
    def __init__(self, patient_names: bool, accession_numbers: bool = False) -> None:
        super().__init__()
        self.patient_names = patient_names
        self.accession_numbers = accession_numbers

    def format(self, record: logging.LogRecord) -> str:
        scrubbed = _Scrubbed(record, self.patient_names, self.accession_numbers)
        payload: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": scrubbed.message,
        }
        payload.update(scrubbed.fields)
        if record.exc_info:
            payload["exc"] = (self.formatException(record.exc_info) if self.patient_names
                              else _safe_exception(record.exc_info))
        return json.dumps(payload, default=str)


def setup_logging(settings: LoggingSettings) -> None:
    handler: logging.Handler
    # WatchedFileHandler reopens the file after logrotate (or an administrator) renames it.
    handler = logging.handlers.WatchedFileHandler(settings.file) if settings.file else logging.StreamHandler(sys.stderr)
    formatter = JsonFormatter if settings.json_lines else TextFormatter
    handler.setFormatter(formatter(settings.patient_names, settings.accession_numbers))
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
        self.associations_rejected = Counter(
            "cxrtriage_associations_rejected", "Associations refused or dropped by the node, by reason",
            ["reason"], registry=r,
        )
        self.tls_failures = Counter(
            "cxrtriage_tls_failures", "Failed DICOM TLS handshakes, by reason", ["reason"], registry=r
        )
        self.disk_free = Gauge("cxrtriage_disk_free_bytes", "Free bytes on the archive's file system", registry=r)
        self.resident_memory = Gauge(
            "cxrtriage_process_resident_memory_bytes", "Resident memory of the node process", registry=r
        )
        self.live_nodes = Gauge(
            "cxrtriage_node_last_seen_timestamp_seconds",
            "Last heartbeat of each live node sharing this node's database (several nodes: docs/deploy.md)",
            ["node", "roles", "version"], registry=r,
        )

    def association_rejected(self, reason: str) -> None:
        """Count one refused or dropped association (``reason``: a label of scp.guard/scp.server)."""
        self.associations_rejected.labels(reason=reason).inc()

    def tls_failure(self, reason: str) -> None:
        """Count one failed TLS handshake (``no_client_certificate``, ``bad_certificate``, ...)."""
        self.tls_failures.labels(reason=reason).inc()


class GaugeSampler:
    """Sets the node's gauges from the current state: queue depth, archive free space, memory.

    Every (kind, state) pair is set on each sample, 0 included: a gauge set only
    for the pairs that have rows would show a drained queue's last nonzero depth
    forever. Takes the depth query and the archive's free space as callables
    (``JobQueue.depth``, ``Archive.free_bytes``) because observability sits
    below storage in the import graph.
    """

    def __init__(self, metrics: Metrics, queue_depth: Callable[[], dict[tuple[str, str], int]],
                 disk_free: Callable[[], int], kinds: Iterable[str], states: Iterable[str]) -> None:
        self.metrics = metrics
        self.queue_depth = queue_depth
        self.disk_free = disk_free
        self.pairs = {(kind, state) for kind in kinds for state in states}
        self.process = psutil.Process()

    def sample(self) -> None:
        """One sample of every gauge (the node calls it every few seconds)."""
        depth = self.queue_depth()
        self.pairs |= set(depth)  # a kind or state not declared still goes back to 0 once drained
        for kind, state in self.pairs:
            self.metrics.queue_depth.labels(kind=kind, state=state).set(depth.get((kind, state), 0))
        self.metrics.disk_free.set(self.disk_free())
        self.metrics.resident_memory.set(self.process.memory_info().rss)
