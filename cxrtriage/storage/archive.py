"""The archive on disk: fsync'd, atomic writes under validated UID paths.

Layout: ``<root>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>[.<hash>].dcm``.
Every UID is checked against the UID grammar (PS3.5 9.1: digits and dots,
no leading zeros, at most 64 characters) before it becomes part of a path,
so no UID can escape the archive (``..``, ``/``, ``\\`` are never valid).
Unreadable datasets go to ``<root>/quarantine`` with a JSON note of why.

Received instances are kept with :meth:`Archive.keep`: the file name holds
the hash of its bytes and an existing file is never replaced, so bytes that
were acknowledged cannot be overwritten by a later arrival under the same
UID. Writes go through ``<root>/.tmp``; a ``.part`` file there whose writer
is gone (``kill -9``, power cut) is removed when the archive is opened
(:meth:`Archive.clean_tmp`). Several nodes may share the archive folder
(NFS): a ``.part`` name carries its writer's host and PID, and a node judges
by PID only its own host's files; another host's are removed only once stale.

The UID grammar lives here, at the bottom of the import graph, because the
archive is where a UID becomes a path; :mod:`cxrtriage.dicom_header` offers
the same check to the rest of the node.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
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


#: A ``.part`` file older than this is debris even if a process with its writer's PID runs (PID reuse):
#: no archive write (at most ``dicom.max_dataset_mb``, then fsync) takes anywhere near this long.
STALE_PART_SECONDS = 15 * 60


class ArchiveConflictError(OSError):
    """A file with other bytes already holds the name :meth:`Archive.keep` was asked to use."""


@dataclass(frozen=True)
class FileProblem:
    """One archived file that does not match its catalog row (:func:`verify_files`)."""

    kind: str  # missing | mismatch | outside
    sop_instance_uid: str
    path: str


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file, read in chunks (archived files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


#: This host in ``.part`` names (dots would confuse the name's parsing): ``<name>.<pid>@<host>.<random>.part``.
HOST = socket.gethostname().replace(".", "_") or "localhost"


def _process_running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
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
        self.clean_tmp()

    def clean_tmp(self, stale_seconds: float = STALE_PART_SECONDS) -> int:
        """Remove partial writes left in ``.tmp`` by a writer that died; returns how many.

        A ``.part`` file names its writer's PID and host. It is debris when it
        is older than ``stale_seconds`` (the PID may have been reused), or when
        it was written on this host by a process that no longer runs. A write
        in progress in a live process (another process opening the archive
        while the node runs), or on another host sharing the folder, is left
        alone. (Names without a host, from older versions, are this host's.)
        """
        removed = 0
        now = time.time()
        for part in self.tmp.glob("*.part"):
            writer, _, host = part.name.rsplit(".", 3)[-3].partition("@") if part.name.count(".") >= 3 else ("", "", "")
            try:
                pid = int(writer)
            except ValueError:
                pid = -1
            try:
                stale = now - part.stat().st_mtime > stale_seconds
                ours = host in ("", HOST)
                if stale or (ours and (pid <= 0 or not _process_running(pid))):
                    part.unlink()
                    removed += 1
            except FileNotFoundError:  # its writer finished meanwhile
                continue
        return removed

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

    def _temp_copy(self, name: str, data: bytes) -> Path:
        """``data`` in a fsync'd ``.tmp/<name>.<pid>@<host>.<random>.part`` (:meth:`clean_tmp` reads its writer)."""
        tmp = self.tmp / f"{name}.{os.getpid()}@{HOST}.{uuid.uuid4().hex[:8]}.part"
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return tmp

    def _write_durably(self, target: Path, data: bytes) -> None:
        """Temp file, fsync, rename over ``target``, fsync the folder: all of ``data`` or nothing survives a crash."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._temp_copy(target.name, data)
        os.replace(tmp, target)
        _fsync_dir(target.parent)

    def keep(self, relative: str, data: bytes, sha256: str) -> bool:
        """Write ``data`` durably under ``relative`` unless that file exists; never replaces a file.

        Returns True when this call created the file, False when a file with
        these very bytes (``sha256``) was already there (an identical resend,
        possibly still arriving on another association). A file with other
        bytes under that name raises :class:`ArchiveConflictError`.
        The temp file is hard-linked to its name, which fails when the name
        exists: of concurrent writers exactly one creates it, whole.
        """
        target = self.path(relative)
        if target.exists():
            return self._same_file(target, sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._temp_copy(target.name, data)
        try:
            os.link(tmp, target)
        except FileExistsError:
            return self._same_file(target, sha256)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(target.parent)
        return True

    def _same_file(self, target: Path, sha256: str) -> bool:
        if sha256_file(target) != sha256:
            raise ArchiveConflictError(errno.EEXIST, "another file holds this archive name", str(target))
        return False

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

    def verify(self, rows: Iterable[tuple[str, str, str]]) -> Iterator[FileProblem]:
        """Hash the archived file of every ``(sop_instance_uid, path, sha256)`` row; yields each one that is
        missing or differs from its row."""
        for sop_uid, relative, sha in rows:
            try:
                full = self.path(relative)
            except InvalidUIDError:
                yield FileProblem("outside", sop_uid, relative)
                continue
            if not full.is_file():
                yield FileProblem("missing", sop_uid, relative)
            elif sha256_file(full) != sha:
                yield FileProblem("mismatch", sop_uid, relative)

    def free_bytes(self) -> int:
        """Free space on the archive's filesystem."""
        return shutil.disk_usage(self.root).free
