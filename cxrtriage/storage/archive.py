"""The archive on disk: fsync'd, atomic writes under validated UID paths.

Layout: ``<root>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>[.<hash>].dcm``.
Every UID is checked against the UID grammar (PS3.5 9.1: digits and dots,
no leading zeros, at most 64 characters) before it becomes part of a path,
so no UID can escape the archive (``..``, ``/``, ``\\`` are never valid).
Unreadable datasets go to ``<root>/quarantine`` with a JSON note of why.

The UID grammar lives here, at the bottom of the import graph, because the
archive is where a UID becomes a path; :mod:`cxrtriage.dicom_header` offers
the same check to the rest of the node.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path

UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class InvalidUIDError(ValueError):
    """A UID that is missing or breaks the UID grammar of PS3.5 9.1."""


def check_uid(value: object, name: str) -> str:
    """``value`` as a UID (trailing space / NUL padding removed), or :class:`InvalidUIDError` naming ``name``."""
    uid = str(value or "").strip().rstrip("\x00")
    if not uid or len(uid) > 64 or not UID_PATTERN.match(uid):
        raise InvalidUIDError(f"{name} {uid[:80]!r} is not a valid DICOM UID")
    return uid


def is_valid_uid(value: object) -> bool:
    """Whether ``value`` is a valid UID (PS3.5 9.1: digits and dots, no leading zeros, at most 64 characters)."""
    try:
        check_uid(value, "UID")
    except InvalidUIDError:
        return False
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Archive:
    """The archive folder: stored instances by UID path, quarantine, and a temp folder on the same filesystem."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.tmp = self.root / ".tmp"
        self.quarantine_dir = self.root / "quarantine"
        for folder in (self.root, self.tmp, self.quarantine_dir):
            folder.mkdir(parents=True, exist_ok=True)

    @property
    def overlays(self) -> Path:
        """The folder of overlay PNGs (created by the first overlay written)."""
        return self.root / "overlays"

    def overlay_path(self, sop_instance_uid: str) -> Path:
        """Where the overlay PNG of a scored image lives (``sop_instance_uid``: a checked UID, stored or validated)."""
        return self.overlays / f"{sop_instance_uid}.png"

    def relative_path(self, study: str, series: str, sop: str, suffix: str = "") -> str:
        """``<Study>/<Series>/<SOP>[.<suffix>].dcm`` from checked UIDs (:class:`InvalidUIDError` otherwise)."""
        parts = [check_uid(study, "Study Instance UID"), check_uid(series, "Series Instance UID")]
        name = check_uid(sop, "SOP Instance UID") + (f".{suffix}" if suffix else "") + ".dcm"
        return "/".join([*parts, name])

    def path(self, relative: str) -> Path:
        """The absolute path of a relative archive path; refuses anything that resolves outside the archive."""
        full = (self.root / relative).resolve()
        if self.root not in full.parents:
            raise InvalidUIDError(f"path {relative!r} is outside the archive")
        return full

    def _write_durably(self, target: Path, data: bytes) -> None:
        """Temp file, fsync, rename over ``target``, fsync the folder: all of ``data`` or nothing survives a crash."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / f"{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part"
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)

    def write(self, relative: str, data: bytes, *, sha256: str | None = None) -> tuple[str, int]:
        """Write ``data`` durably under ``relative``; returns (sha256, size).

        ``sha256``: the digest when the caller has it already (ingest hashes before it writes).
        """
        self._write_durably(self.path(relative), data)
        return sha256 or hashlib.sha256(data).hexdigest(), len(data)

    def read(self, relative: str) -> bytes:
        return self.path(relative).read_bytes()

    def remove(self, relative: str) -> None:
        self.path(relative).unlink(missing_ok=True)

    def quarantine(self, data: bytes, reason: str, detail: str, calling_aet: str = "") -> Path:
        """Keep bytes that could not be stored normally, with the reason beside them."""
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
        digest = hashlib.sha256(data).hexdigest()[:16]
        target = self.quarantine_dir / f"{stamp}-{digest}.dcm"
        self._write_durably(target, data)
        note = {"reason": reason, "detail": detail, "calling_aet": calling_aet, "sha256_16": digest, "received": stamp}
        self._write_durably(target.with_suffix(".json"), json.dumps(note, indent=2).encode())
        return target

    def free_bytes(self) -> int:
        """Free space on the archive's filesystem."""
        return shutil.disk_usage(self.root).free
