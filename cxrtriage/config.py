"""config.yaml and ``CXRTRIAGE_*`` environment variables, validated with pydantic.

Every setting has a default, so the node and ``cxrtriage score`` run with no
config file at all; config.yaml in the repository lists them with comments.
Any key can be set from the environment (containers, systemd credentials):
see :func:`environment_overrides`; the environment wins over the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ScoringSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The defaults of both live in inference/scoring.py (DEFAULT_ZONE_THRESHOLD, DEFAULT_BRIXIA_CUTOFFS);
    # inference/presets.py resolves a null here to them.
    zone_threshold: float | None = Field(
        None, ge=0.0, le=1.0,
        description="T; null = the disease model's own (per-architecture) T, else the paper's default",
    )
    brixia_cutoffs: tuple[float, float, float] | None = Field(
        None,
        description="three increasing fractions of a zone: grades 1, 2, 3 above each; "
        "null = the scoring module's default",
    )

    @field_validator("brixia_cutoffs")
    @classmethod
    def _increasing_fractions(cls, value: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if value is None:
            return value
        if list(value) != sorted(value) or not all(0.0 <= v <= 1.0 for v in value):
            raise ValueError(f"must be three increasing fractions between 0 and 1, got {list(value)}")
        return value


class InferenceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    preset: Literal["bundled", "danilov2022"] = Field("bundled", description="bundled | danilov2022")
    lungs: dict[str, Any] = Field(
        default_factory=dict, description="ModelSpec fields overriding the preset (inference.presets.model_specs)"
    )
    disease: dict[str, Any] = Field(default_factory=dict)
    backend: str = Field(
        "auto", pattern="^(auto|torch|onnx)$",
        description="auto (ONNX Runtime for fp32 on the CPU, else torch), torch, or onnx (ONNX Runtime)",
    )
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$", description="auto, cpu, cuda, cuda:N or mps")
    precision: str = Field(
        "fp32", pattern="^(fp32|bf16)$",
        description="fp32, or bf16 weights and inputs (torch backend; CPUs with AVX512-BF16/AMX, CUDA)",
    )
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = all cores")
    batch_size: int = Field(1, ge=1)
    max_batch: int = Field(8, ge=1, description="scoring engine: images per network batch, at most")
    max_wait_ms: float = Field(
        10.0, ge=0, description="scoring engine: how long a batch waits for more images once it has one"
    )
    device_lanes: int = Field(
        1, ge=1, le=4, description="scoring engine on a GPU: batches in flight at once, each on its own CUDA "
        "streams, so that one batch's host work overlaps another's networks"
    )
    stage1_on_device: bool = Field(
        False, description="scoring engine on a GPU: make Stage I's input there, from Stage II's image (one upload "
        "instead of a resize per image in the CPU workers); Stage I then waits for the full-resolution upload"
    )
    lung_blobs_on_device: bool = Field(
        False, description="scoring engine on a GPU: find each image's lung blobs (opening, closing, small-blob "
        "removal, the two largest) on the device, the same values as on the host, instead of on host threads"
    )
    compile: bool = Field(
        False, description="torch.compile the networks (torch backend): on CUDA CUDA graphs per batch size, on the "
        "CPU C++ kernels with frozen weights (needs a C++ compiler); the first batch of each size compiles, a minute "
        "or more; if compiling fails the node logs why and runs the models uncompiled",
    )
    fold_batch_norm: bool = Field(
        True, description="fold each BatchNorm into the convolution before it when a torch model loads (checked "
        "against the unfolded outputs; 4-12 % less CPU per network call); false runs the models as saved",
    )
    min_lung_blob_fraction: float = Field(0.01, ge=0.0, lt=0.5, description="smaller lung blobs are dropped")
    crop_margin: float = Field(0.02, ge=0.0, lt=0.5, description="margin around the lung box, fraction of image")
    scoring: ScoringSettings = Field(default_factory=ScoringSettings)


class TLSSettings(BaseModel):
    """DICOM TLS (PS3.15 B.1): server certificate and, for mutual auth, the CA of client certificates."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = Field(None, description="CA bundle; set to require and verify peer certificates")


class Peer(BaseModel):
    """A remote application entity; as a destination, also a DICOMweb (STOW-RS) service."""

    model_config = ConfigDict(extra="forbid")

    ae_title: str = Field(max_length=16, description="the AE title; for a dicomweb destination, its name")
    type: Literal["dimse", "dicomweb"] = Field("dimse", description="dimse (C-STORE) or dicomweb (STOW-RS)")
    host: str = ""
    port: int = Field(104, ge=1, le=65535)
    url: str | None = Field(None, description="dicomweb: the DICOMweb root, e.g. http://pacs:8042/dicom-web")
    username: str | None = Field(None, description="dicomweb: HTTP Basic user")
    password: str | None = Field(None, description="dicomweb: HTTP Basic password (or set it from a secret file)")
    tls: TLSSettings = Field(default_factory=TLSSettings)

    @model_validator(mode="after")
    def _addressed(self) -> Peer:
        if self.type == "dimse" and not self.host:
            raise ValueError(f"{self.ae_title}: a dimse peer needs host (and port)")
        if self.type == "dicomweb" and not (self.url or "").startswith(("http://", "https://")):
            raise ValueError(f"{self.ae_title}: a dicomweb destination needs url: http(s)://.../dicom-web")
        return self


class DicomSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ae_title: str = Field("CXRTRIAGE", max_length=16)
    host: str = Field("127.0.0.1", description="address to listen on; 0.0.0.0 for all interfaces")
    port: int = Field(11112, ge=1, le=65535)
    max_associations: int = Field(16, ge=1)
    maximum_pdu_size: int = Field(1048576, ge=0, description="0 = unlimited; pynetdicom's 16 KiB default is slow")
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 120.0
    handshake_timeout: float = Field(
        10.0, gt=0, description="seconds from TCP accept to a whole A-ASSOCIATE-RQ (the TLS handshake included)"
    )
    pdu_timeout: float = Field(
        30.0, gt=0, description="seconds a PDU may take to arrive once its first byte came (slow-drip peers)"
    )
    max_associations_per_host: int = Field(8, ge=0, description="concurrent associations from one IP; 0 = no limit")
    max_dataset_mb: int = Field(
        128, ge=1, description="largest dataset accepted (a 43x43 cm DX at 0.1 mm, 16 bit, is about 37 MB)"
    )
    max_inflated_mb: int = Field(128, ge=1, description="largest inflated size of a Deflated transfer syntax dataset")
    allowed_calling_aets: list[str] = Field(default_factory=list, description="empty = accept any calling AE")
    require_called_aet: bool = Field(False, description="reject associations not addressed to our AE title")
    tls: TLSSettings = Field(default_factory=TLSSettings)
    move_destinations: list[Peer] = Field(default_factory=list, description="AEs C-MOVE may send to")


class StorageSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    database_url: str = "sqlite:///cxrtriage-data/cxrtriage.db"
    archive_dir: str = "cxrtriage-data/archive"
    min_free_mb: int = Field(500, ge=0, description="below this free space, C-STORE answers 0xA700")


class WorkerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scoring_workers: int = Field(1, ge=0, description="scoring threads in the node process")
    scoring_processes: int = Field(0, ge=0, description="score in this many worker processes instead (0 = in the node)")
    scoring_engine: bool = Field(
        False, description="one process owns the device and batches both networks across jobs; scoring_processes "
        "CPU workers (0 = one per core) decode and write SEG/SR around it",
    )
    send_workers: int = Field(2, ge=0, description="send workers per destination (each destination has its own)")
    lease_seconds: float = Field(300.0, gt=0)
    max_attempts: int = Field(8, ge=1)
    backoff_seconds: float = Field(5.0, gt=0)
    backoff_max_seconds: float = Field(600.0, gt=0)
    poll_seconds: float = Field(0.2, gt=0)
    seg_jpeg2000: bool = Field(False, description="JPEG 2000 lossless SEG (about 100x smaller)")
    send_connect_timeout: float = Field(10.0, gt=0, description="seconds to open an association to a destination")
    send_dimse_timeout: float = Field(30.0, gt=0, description="seconds a destination may take to answer a C-STORE")
    breaker_failures: int = Field(3, ge=1, description="consecutive failures that open a destination's circuit")
    breaker_open_seconds: float = Field(
        60.0, gt=0, description="an open circuit sends nothing for this long, then tries one object"
    )


class LoggingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value
    json_lines: bool = Field(True, description="one JSON object per line")
    patient_names: bool = Field(False, description="log patient names (off by default)")
    accession_numbers: bool = Field(False, description="log accession numbers in the node's events (PHI policy)")
    file: str | None = None


class MetricsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9110, ge=0, le=65535, description="Prometheus /metrics; 0 = pick a free port")


class WebSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    host: str = Field("127.0.0.1", description="bound to loopback by default; set a token before exposing it")
    port: int = Field(8080, ge=0, le=65535, description="0 = pick a free port")
    token: str | None = Field(None, description="when set: Bearer token, or the password of HTTP Basic auth")
    readers: dict[str, str] = Field(
        default_factory=dict,
        description="reader name -> that reader's token (HTTP Basic user and password); the name is the "
        "identity recorded in the audit trail",
    )
    show_patient_identity: bool = Field(True, description="patient name and ID on the worklist and study page")
    allowed_hosts: list[str] = Field(
        default_factory=lambda: ["127.0.0.1", "localhost", "::1"],
        description="Host header names accepted (DNS rebinding); add the node's DNS name when exposing it; '*' = any",
    )


#: Worklist bands, most severe first; ``unscored`` and ``ai_failed`` have no AI result.
BANDS = ("critical", "high", "moderate", "low", "unscored", "ai_failed")


class PrioritySettings(BaseModel):
    """The priority model's parameters (config.yaml ``triage.priority``)."""

    model_config = ConfigDict(extra="forbid")

    critical_total: int = Field(5, ge=0, le=6, description="zone score (0-6) from which a study is critical")
    high_total: int = Field(3, ge=0, le=6)
    moderate_total: int = Field(1, ge=0, le=6)
    moderate_p_disease: float = Field(0.5, ge=0, le=1, description="P(disease) that makes a study at least moderate")
    base: dict[str, float] = Field(
        default_factory=lambda: {"critical": 80.0, "high": 60.0, "moderate": 40.0, "low": 20.0,
                                 "unscored": 40.0, "ai_failed": 40.0},
        description="starting priority of each band (below TOP = 100)",
    )
    max_wait_minutes: dict[str, float] = Field(
        default_factory=lambda: {"critical": 30.0, "high": 120.0, "moderate": 360.0, "low": 720.0,
                                 "unscored": 240.0, "ai_failed": 240.0},
        description="at this wait a study of the band has reached the top of the list",
    )
    #: Base given by the order's own priority; the AI can only raise it.
    order_base: dict[str, float] = Field(
        default_factory=lambda: {"STAT": 90.0, "HIGH": 60.0, "ROUTINE": 0.0, "MEDIUM": 0.0, "LOW": 0.0}
    )
    missing_lung_zones_affected: bool = Field(
        True, description="rank the zones of a lung the AI did not find as affected (never as clear)"
    )

    @field_validator("base", "max_wait_minutes")
    @classmethod
    def _every_band(cls, value: dict[str, float]) -> dict[str, float]:
        missing, unknown = [b for b in BANDS if b not in value], [b for b in value if b not in BANDS]
        if missing or unknown:
            raise ValueError(f"needs exactly the bands {list(BANDS)}; missing {missing}, unknown {unknown}")
        return value

    @field_validator("max_wait_minutes")
    @classmethod
    def _positive_waits(cls, value: dict[str, float]) -> dict[str, float]:
        if any(v <= 0 for v in value.values()):
            raise ValueError(f"every maximum wait must be above 0 minutes, got {value}")
        return value

    @model_validator(mode="after")
    def _ordered_bands(self) -> PrioritySettings:
        if not self.critical_total >= self.high_total >= self.moderate_total:
            raise ValueError(
                f"band thresholds must satisfy critical_total >= high_total >= moderate_total, got "
                f"{self.critical_total}, {self.high_total}, {self.moderate_total}"
            )
        return self


class EscalationSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    deadline_minutes: dict[str, float] = Field(
        default_factory=lambda: {"critical": 15.0, "high": 60.0},
        description="bands that escalate, and after how long unread",
    )
    webhook_url: str | None = Field(None, description="POSTed a JSON summary once per escalated study")
    webhook_timeout_seconds: float = 5.0
    interval_seconds: float = Field(30.0, gt=0)


class TriageSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    priority: PrioritySettings = Field(default_factory=PrioritySettings)
    escalation: EscalationSettings = Field(default_factory=EscalationSettings)
    retry_failed_minutes: float = Field(60.0, gt=0, description="failed scoring/sending jobs get new attempts")
    retention_days: float = Field(0.0, ge=0, description="purge read, fully sent studies older than this; 0 = never")
    purge_interval_hours: float = Field(24.0, gt=0)


class ResultsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    secondary_capture: bool = Field(
        False, description="also send a Secondary Capture image per scored radiograph (overlay, scores and the "
        "research-use notice burned in) for PACS that do not render SEG",
    )


#: What a node can do (issue #14); a node runs the roles in ``node.roles``, all of them by default.
Role = Literal["receiver", "scorer", "sender", "scheduler", "web"]
ROLES: tuple[Role, ...] = ("receiver", "scorer", "sender", "scheduler", "web")


class NodeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    roles: list[Role] = Field(
        default_factory=lambda: list(ROLES),
        description="receiver (DICOM listener: storage and query/retrieve), scorer (loads the models, scores), "
        "sender (sends results to destinations), scheduler (escalation, retries, purge: run by one node at a time), "
        "web (worklist page and API)",
    )

    @field_validator("roles", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    @field_validator("roles")
    @classmethod
    def _some_distinct_roles(cls, value: list[Role]) -> list[Role]:
        if not value:
            raise ValueError(f"name at least one role of {', '.join(ROLES)}")
        return [role for role in ROLES if role in value]  # canonical order, duplicates dropped

    def runs(self, role: Role) -> bool:
        return role in self.roles


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    node_name: str = Field("cxrtriage", description="names this node's workers in the job table; unique per node")
    node: NodeSettings = Field(default_factory=NodeSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    dicom: DicomSettings = Field(default_factory=DicomSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    workers: WorkerSettings = Field(default_factory=WorkerSettings)
    destinations: list[Peer] = Field(default_factory=list, description="where SEG and SR are sent (PACS)")
    results: ResultsSettings = Field(default_factory=ResultsSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    web: WebSettings = Field(default_factory=WebSettings)
    triage: TriageSettings = Field(default_factory=TriageSettings)


class ConfigError(ValueError):
    """config.yaml cannot be used; the message names the file, the key, the value and what is allowed."""


def _describe(error: Any) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "(top level)"
    message = error["msg"].removeprefix("Value error, ")
    value = error.get("input")
    shown = "" if isinstance(value, dict) or error["type"] == "missing" else f" (got {value!r})"
    return f"{where}: {message}{shown}"


#: Environment variables that set keys start with this; ``__`` separates nested keys.
ENV_PREFIX = "CXRTRIAGE_"
#: A variable ending in this names a file holding the value (Docker/Kubernetes secrets, systemd credentials).
FILE_SUFFIX = "_FILE"
#: Key names whose values are never shown in an error message.
SECRET_KEYS = frozenset({"token", "password", "readers", "database_url", "webhook_url"})
MASK = "<secret>"


class EnvValue:
    """One key set from the environment: which variable set it, and whether its value may be shown."""

    def __init__(self, variable: str, value: str, secret: bool) -> None:
        self.variable, self.value, self.secret = variable, value, secret

    def shown(self) -> str:
        return MASK if self.secret else repr(self.value)


def _is_config_variable(rest: str, top_level: Mapping[str, Any]) -> bool:
    """Only ``CXRTRIAGE_A__B`` (a nested key) or ``CXRTRIAGE_<top-level key>`` are config.

    Others with the prefix belong to tools and tests (``CXRTRIAGE_TEST_DATABASE_URL``, ``CXRTRIAGE_CT_DIR``).
    """
    name = rest.lower()
    return "__" in rest or name in top_level or (
        rest.endswith(FILE_SUFFIX) and name.removesuffix(FILE_SUFFIX.lower()) in top_level
    )


def _resolve(parts: list[str]) -> tuple[Any, str] | str:
    """The pydantic field the key path ``parts`` ends at and its dotted name, or why there is none.

    Keys of a dict-valued setting (``web.readers``, ``triage.priority.base``) may follow its name.
    """
    model: type[BaseModel] = Settings
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:i]) or "the top level"
            return f"no setting {'.'.join(parts[: i + 1])}; {where} has: {', '.join(fields)}"
        field = fields[part]
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and i < len(parts) - 1:
            model = annotation
            continue
        if i < len(parts) - 1 and get_origin(annotation) is not dict:
            return f"{'.'.join(parts[: i + 1])} has no keys below it"
        return field, ".".join(parts)
    return "empty key"


def _parse(value: str, field: Any) -> Any:
    """A string setting as it is; for others, JSON when it starts with ``[`` or ``{`` (lists, dicts)."""
    if field.annotation in (str, str | None) or not value.lstrip().startswith(("[", "{")):
        return value  # pydantic converts "8080", "true", "1.5" itself
    return json.loads(value)


def environment_overrides(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, EnvValue]]:
    """The settings the ``CXRTRIAGE_*`` variables set, as nested data, and where each came from.

    ``CXRTRIAGE_WEB__TOKEN=x`` sets ``web.token``; ``CXRTRIAGE_WEB__TOKEN_FILE=/run/secrets/t``
    sets it to that file's content (one trailing newline stripped); lists and dicts are JSON
    (``CXRTRIAGE_DESTINATIONS='[{"ae_title": "PACS", "host": "pacs"}]'``). A variable that looks
    like a key (see :func:`_is_config_variable`) but names none is an error: a typo must not be
    silently ignored. Raises :class:`ConfigError`, one line per problem.
    """
    data: dict[str, Any] = {}
    origins: dict[str, EnvValue] = {}
    problems: list[str] = []
    for variable in sorted(environ):
        if not variable.startswith(ENV_PREFIX):
            continue
        rest = variable[len(ENV_PREFIX):]
        if not _is_config_variable(rest, Settings.model_fields):
            continue
        raw = environ[variable]
        resolved = _resolve(rest.lower().split("__"))
        from_file = isinstance(resolved, str) and rest.endswith(FILE_SUFFIX)
        if from_file:
            resolved = _resolve(rest[: -len(FILE_SUFFIX)].lower().split("__"))
        if isinstance(resolved, str):
            problems.append(f"{variable}: {resolved}")
            continue
        field, dotted = resolved
        parts = dotted.split(".")
        secret = from_file or bool(SECRET_KEYS & set(parts))
        if from_file:
            try:
                raw = Path(raw).read_text().removesuffix("\n")
            except OSError as error:
                problems.append(f"{variable}: cannot read the file {raw}: {error.strerror or error}")
                continue
        origin = EnvValue(variable, raw, secret)
        try:
            value = _parse(raw, field)
        except json.JSONDecodeError as error:
            problems.append(f"{variable}={origin.shown()}: {dotted} must be JSON here ({error.msg})")
            continue
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        origins[dotted] = origin
    if problems:
        raise ConfigError("\n".join(problems))
    return data, origins


def merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` on top; mappings merge key by key, anything else is replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _env_origin(error: Any, origins: dict[str, EnvValue]) -> EnvValue | None:
    """The variable that set the key of a validation error (or a key above it), if one did."""
    loc = [str(p) for p in error["loc"]]
    for end in range(len(loc), 0, -1):
        if ".".join(loc[:end]) in origins:
            return origins[".".join(loc[:end])]
    return None


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def load_settings(path: str | Path | None = None, *, environ: Mapping[str, str] | None = None) -> Settings:
    """Read config.yaml (``None``: no file) with the ``CXRTRIAGE_*`` environment on top.

    Precedence: environment (and ``*_FILE``) > config.yaml > defaults; nested keys merge.
    ``environ`` defaults to ``os.environ``. Raises :class:`ConfigError` with one line per
    problem, each naming the key (or the variable), the value (secrets masked) and what is
    allowed, before anything else starts.
    """
    data = _read_file(Path(path)) if path is not None else {}
    overrides, origins = environment_overrides(os.environ if environ is None else environ)
    try:
        return Settings.model_validate(merge(data, overrides))
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            origin = _env_origin(error, origins)
            if origin is None:
                lines.append(f"{path or 'defaults'}: {_describe(error)}")
                continue
            where = ".".join(str(p) for p in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            lines.append(f"{origin.variable}={origin.shown()}: {where}: {message}")
        raise ConfigError("\n".join(lines)) from None
