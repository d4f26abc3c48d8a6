"""The local cache of published checkpoints: download, import, verify, resolve.

Files live in ``$CXRTRIAGE_CACHE/models`` (default ``~/.cache/cxrtriage/models``)
under their registry name (``covid/MAnet_timm-regnetx_064.pth``). A file gets
there only after its size and SHA-256 matched the registry, by an atomic
rename of a fully written, fsynced temporary file, so a file in the cache is
either complete and checked or absent.

Downloads resume: the bytes received so far stay in ``<name>.pth.part`` and the
next request asks for the rest with an HTTP ``Range`` header. Only the standard
library is used (``urllib``); the base URL is GitHub's LFS media host by
default, a hospital mirror via ``--base-url`` or ``$CXRTRIAGE_MODELS_URL``.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from . import registry
from .registry import RegistryEntry

#: GitHub serves Git LFS objects by path at this host (raw.githubusercontent.com
#: would return the small LFS pointer file instead of the checkpoint).
DEFAULT_BASE_URL = f"https://media.githubusercontent.com/media/{registry.REPOSITORY}/{registry.BRANCH}"
BASE_URL_ENV = "CXRTRIAGE_MODELS_URL"
CHUNK = 1 << 20
TIMEOUT_S = 60.0
ATTEMPTS = 4  #: requests per pull; each one resumes where the last stopped

#: ``progress(done_bytes, total_bytes)``, called as data arrives.
Progress = Callable[[int, int], None]


class ModelCacheError(Exception):
    """Base of the errors below; the message always names the reason."""


class ModelNotCached(ModelCacheError, FileNotFoundError):
    """A published checkpoint is needed but not in the cache."""

    def __init__(self, entries: Iterable[RegistryEntry], command_name: str | None = None, reason: str = "") -> None:
        self.entries = list(entries)
        self.command_name, self.reason = command_name, reason
        target = command_name or " ".join(e.name for e in self.entries)
        names = ", ".join(e.name for e in self.entries)
        super().__init__(
            f"published model{'s' if len(self.entries) > 1 else ''} {names} not in the model cache "
            f"{models_dir()}{': ' + reason if reason else ''}. Run `cxrtriage models pull {target}`, "
            f"or on a site without internet access copy the weights.pth file(s) over and run "
            f"`cxrtriage models import FILE`"
        )

    def __str__(self) -> str:  # OSError would prefix an errno
        return str(self.args[0])

    def __reduce__(self) -> tuple[Any, ...]:  # crosses the scoring pool's process boundary intact
        return (ModelNotCached, (self.entries, self.command_name, self.reason))


class IntegrityError(ModelCacheError, ValueError):
    """A file's size or SHA-256 is not the registry's."""


class DownloadError(ModelCacheError, OSError):
    """The server could not deliver the file."""

    def __str__(self) -> str:
        return str(self.args[0])


def models_dir() -> Path:
    """``$CXRTRIAGE_CACHE/models``, default ``~/.cache/cxrtriage/models``."""
    return Path(os.environ.get("CXRTRIAGE_CACHE", Path.home() / ".cache" / "cxrtriage")).expanduser() / "models"


def cached_path(entry: RegistryEntry) -> Path:
    """Where ``entry`` lives in the cache (whether or not it is there)."""
    return models_dir() / entry.cache_name


def base_url(explicit: str | None = None) -> str:
    """``explicit``, else ``$CXRTRIAGE_MODELS_URL``, else GitHub's LFS media URL."""
    return (explicit or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")


def file_url(entry: RegistryEntry, base: str | None = None) -> str:
    """``<base>/<path in the repository>``, the path percent-encoded ('+' kept as GitHub shows it)."""
    return base_url(base) + "/" + urllib.parse.quote(entry.path, safe="/+")


# --- hashing and atomic writes -------------------------------------------------------------


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    total, done = path.stat().st_size, 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if progress:
                progress(done, total)
    return digest.hexdigest()


def check(entry: RegistryEntry, size: int, digest: str | None, what: str) -> None:
    """Raise :class:`IntegrityError` naming expected vs actual size / SHA-256."""
    if size != entry.size:
        raise IntegrityError(
            f"{what} is not {entry.name}: size {size} bytes, expected {entry.size} bytes"
        )
    if digest is not None and digest != entry.sha256:
        raise IntegrityError(
            f"{what} is not {entry.name}: sha256 {digest}, expected {entry.sha256} (size {size} bytes matches)"
        )


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable: fsync the directory entry too (POSIX)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _commit(temporary: Path, entry: RegistryEntry) -> Path:
    """fsync ``temporary`` and rename it atomically into the cache."""
    with open(temporary, "rb+") as handle:
        os.fsync(handle.fileno())
    final = cached_path(entry)
    os.replace(temporary, final)
    _fsync_dir(final.parent)
    return final


def _part_path(entry: RegistryEntry) -> Path:
    return cached_path(entry).with_name(cached_path(entry).name + ".part")


# --- resolve --------------------------------------------------------------------------------


def resolve(entry: RegistryEntry, command_name: str | None = None) -> Path:
    """The cached file of ``entry``, or :class:`ModelNotCached` with the command that fetches it.

    Checks the size only (cheap at every start); ``cxrtriage models verify``
    re-hashes. Files enter the cache only after a full SHA-256 check.
    """
    path = cached_path(entry)
    if not path.is_file():
        raise ModelNotCached([entry], command_name)
    size = path.stat().st_size
    if size != entry.size:
        raise ModelNotCached(
            [entry], command_name, reason=f"{path} has {size} bytes, expected {entry.size}; it is damaged"
        )
    return path


def is_cached(entry: RegistryEntry) -> bool:
    """Present with the right size (the cheap test ``list`` shows)."""
    path = cached_path(entry)
    return path.is_file() and path.stat().st_size == entry.size


# --- pull -----------------------------------------------------------------------------------


def pull(entry: RegistryEntry, base: str | None = None, progress: Progress | None = None,
         timeout: float = TIMEOUT_S, attempts: int = ATTEMPTS) -> Path:
    """Download ``entry`` into the cache and return its path.

    Resumes a ``.part`` left by an earlier try with ``Range: bytes=<n>-``; a
    server that answers 200 instead of 206 is read from the start again. The
    file is renamed into the cache only once size and SHA-256 match. A
    ``.part`` known to be wrong (too large, or full size with the wrong hash)
    is deleted; a shorter one is kept so that the next pull resumes it.
    """
    final = cached_path(entry)
    if final.is_file() and final.stat().st_size == entry.size and sha256_file(final) == entry.sha256:
        if progress:
            progress(entry.size, entry.size)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    part = _part_path(entry)
    url = file_url(entry, base)
    last_error = ""
    for _ in range(max(1, attempts)):
        have = part.stat().st_size if part.exists() else 0
        if have > entry.size:
            part.unlink()
            have = 0
        if have < entry.size:
            try:
                _fetch(url, part, have, entry, progress, timeout)
            except _Transient as error:  # connection dropped: resume from what arrived
                last_error = str(error)
                continue
        return _finish(part, entry, url)
    size = part.stat().st_size if part.exists() else 0
    raise DownloadError(
        f"download of {entry.name} from {url} stopped at {size} of {entry.size} bytes after "
        f"{attempts} tries ({last_error}); run the command again to resume from {part}"
    )


def _finish(part: Path, entry: RegistryEntry, url: str) -> Path:
    """Check a downloaded ``.part`` and move it into the cache, or refuse it."""
    size = part.stat().st_size
    if size < entry.size:  # the server ended the file early: keep it for a resume
        raise IntegrityError(
            f"download of {entry.name} from {url} is truncated: size {size} bytes, expected {entry.size} "
            f"bytes; kept {part} to resume from"
        )
    digest = sha256_file(part)
    try:
        check(entry, size, digest, f"the file downloaded from {url}")
    except IntegrityError:
        part.unlink(missing_ok=True)
        raise
    return _commit(part, entry)


class _Transient(Exception):
    """A connection that broke mid-transfer; worth resuming."""


def _fetch(url: str, part: Path, have: int, entry: RegistryEntry, progress: Progress | None, timeout: float) -> None:
    """One HTTP request: append the missing bytes of ``entry`` to ``part`` (or rewrite it)."""
    request = urllib.request.Request(url, headers={"User-Agent": "cxrtriage-models"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:  # the .part is not a prefix the server knows: start over
            part.unlink(missing_ok=True)
            raise _Transient(f"HTTP 416 for bytes={have}-, restarting from 0") from error
        raise DownloadError(f"cannot download {entry.name}: HTTP {error.code} {error.reason} from {url}") from error
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        if isinstance(reason, (ConnectionResetError, ConnectionAbortedError, TimeoutError)):
            raise _Transient(f"{reason!r} before the first byte") from error
        raise DownloadError(f"cannot download {entry.name} from {url}: {reason}") from error
    with response:
        start = _start_offset(response, have)
        mode = "ab" if start else "wb"  # 200 to a ranged request: the server ignored Range
        with open(part, mode) as out:
            if start:
                out.truncate(start)
            _copy_body(response, out, start, entry, part, progress)


def _start_offset(response: http.client.HTTPResponse, have: int) -> int:
    """Where the body starts: ``have`` for a matching 206, 0 for a full answer."""
    status = getattr(response, "status", None) or 200
    if status != 206:
        return 0
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    if not match or int(match.group(1)) != have:
        raise DownloadError(
            f"server answered bytes={have}- with Content-Range {response.headers.get('Content-Range')!r}"
        )
    return have


def _copy_body(response: http.client.HTTPResponse, out: IO[bytes], done: int, entry: RegistryEntry, part: Path,
               progress: Progress | None) -> None:
    """Stream the body into ``out``; never let it grow past the expected size.

    http.client's ``read(n)`` returns ``b""`` when the peer closes early, so a
    body shorter than its Content-Length is detected here and treated as a
    dropped connection (resumable); one that ends at its Content-Length but
    short of the file is a truncated file, judged by the caller.
    """
    announced = response.headers.get("Content-Length")
    expected_end = done + int(announced) if announced and announced.isdigit() else None
    if progress:
        progress(done, entry.size)
    while True:
        try:
            chunk = response.read(CHUNK)
        except (http.client.IncompleteRead, ConnectionError, TimeoutError, OSError) as error:
            out.flush()
            raise _Transient(f"connection lost after {done} bytes: {error!r}") from error
        if not chunk:
            if expected_end is not None and done < expected_end:
                out.flush()
                raise _Transient(f"connection closed after {done} of {expected_end} bytes")
            return
        if done + len(chunk) > entry.size:
            out.close()
            part.unlink(missing_ok=True)
            raise IntegrityError(
                f"download of {entry.name} is larger than expected: more than {entry.size} bytes "
                f"(size {entry.size} expected); deleted {part}"
            )
        out.write(chunk)
        done += len(chunk)
        if progress:
            progress(done, entry.size)


# --- import ---------------------------------------------------------------------------------


def import_file(path: str | Path, name: str | None = None, progress: Progress | None = None) -> RegistryEntry:
    """Copy a local ``weights.pth`` into the cache once it matches the registry.

    The entry is found by SHA-256, or given by ``name``; the copy is hashed as
    it is written and renamed into place only if it matches.
    """
    source = Path(path).expanduser()
    if not source.is_file():
        raise ModelCacheError(f"cannot import {source}: no such file")
    wanted = registry.get(name) if name else None
    folder = models_dir()
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".import-{os.getpid()}.tmp"  # same file system as the cache: rename is atomic
    try:
        digest, size = _copy_hashing(source, temporary, progress)
        entry = wanted or registry.by_sha256(digest)
        if entry is None:
            raise IntegrityError(
                f"{source} matches no published checkpoint: sha256 {digest}, size {size} bytes "
                f"(`cxrtriage models list` shows the expected files; give --name to compare with one)"
            )
        check(entry, size, digest, str(source))
        cached_path(entry).parent.mkdir(parents=True, exist_ok=True)
        _commit(temporary, entry)
        return entry
    finally:
        temporary.unlink(missing_ok=True)


def _copy_hashing(source: Path, target: Path, progress: Progress | None) -> tuple[str, int]:
    digest, done = hashlib.sha256(), 0
    total = source.stat().st_size
    with open(source, "rb") as src, open(target, "wb") as dst:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            dst.write(chunk)
            done += len(chunk)
            if progress:
                progress(done, total)
    return digest.hexdigest(), done


# --- verify ---------------------------------------------------------------------------------

Status = Literal["ok", "missing", "corrupt"]


@dataclass(frozen=True)
class Verified:
    """The state of one registry entry in the cache."""

    entry: RegistryEntry
    status: Status
    detail: str = ""


def verify(entries: Iterable[RegistryEntry] | None = None) -> list[Verified]:
    """Re-hash every cached file against the registry: ok, missing or corrupt (with the reason)."""
    results = []
    for entry in entries if entries is not None else registry.REGISTRY.values():
        path = cached_path(entry)
        if not path.is_file():
            results.append(Verified(entry, "missing"))
            continue
        size = path.stat().st_size
        digest = sha256_file(path) if size == entry.size else None
        try:
            check(entry, size, digest, str(path))
        except IntegrityError as error:
            results.append(Verified(entry, "corrupt", str(error)))
        else:
            results.append(Verified(entry, "ok"))
    return results


__all__ = [
    "DEFAULT_BASE_URL", "DownloadError", "IntegrityError", "ModelCacheError", "ModelNotCached", "Verified",
    "base_url", "cached_path", "file_url", "import_file", "is_cached", "models_dir", "pull",
    "resolve", "sha256_file", "verify",
]
