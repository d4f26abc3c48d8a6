"""The archive on disk: fsync'd, atomic writes under validated UID paths.

Layout: ``<root>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>[.<hash>].dcm``.
Every UID is checked against the UID grammar (PS3.5 9.1: digits and dots,
no leading zeros, at most 64 characters) before it becomes part of a path,
so no UID can escape the archive (``..``, ``/``, ``\\`` are never valid).
Unreadable datasets go to ``<root>/quarantine`` with a JSON note of why.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class InvalidUIDError(ValueError):
    pass


def check_uid(value: object, name: str) -> str:
    uid = str(value or "").strip().rstrip("\x00")
    if not uid or len(uid) > 64 or not UID_PATTERN.match(uid):
        raise InvalidUIDError(f"{name} {uid[:80]!r} is not a valid DICOM UID")
    return uid


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Archive:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.tmp = self.root / ".tmp"
        self.quarantine_dir = self.root / "quarantine"
        for folder in (self.root, self.tmp, self.quarantine_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def relative_path(self, study: str, series: str, sop: str, suffix: str = "") -> str:
        parts = [check_uid(study, "Study Instance UID"), check_uid(series, "Series Instance UID")]
        name = check_uid(sop, "SOP Instance UID") + (f".{suffix}" if suffix else "") + ".dcm"
        return "/".join([*parts, name])

    def path(self, relative: str) -> Path:
        full = (self.root / relative).resolve()
        if self.root not in full.parents:
            raise InvalidUIDError(f"path {relative!r} is outside the archive")
        return full

    def write(self, relative: str, data: bytes) -> tuple[str, int]:
        """Write ``data`` durably (temp file, fsync, rename, fsync dir); returns (sha256, size)."""
        target = self.path(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / f"{target.name}.{os.getpid()}.{id(data)}.part"
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        return hashlib.sha256(data).hexdigest(), len(data)

    def read(self, relative: str) -> bytes:
        return self.path(relative).read_bytes()

    def remove(self, relative: str) -> None:
        self.path(relative).unlink(missing_ok=True)

    def quarantine(self, data: bytes, reason: str, detail: str, calling_aet: str = "") -> Path:
        """Keep bytes that could not be stored normally, with the reason beside them."""
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        digest = hashlib.sha256(data).hexdigest()[:16]
        target = self.quarantine_dir / f"{stamp}-{digest}.dcm"
        with open(target, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        note = {"reason": reason, "detail": detail, "calling_aet": calling_aet, "sha256_16": digest, "received": stamp}
        target.with_suffix(".json").write_text(json.dumps(note, indent=2))
        _fsync_dir(self.quarantine_dir)
        return target

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free
