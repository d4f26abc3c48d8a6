"""``cxrtriage check``: everything the node needs, tested before it starts (or while it runs).

Each check returns :class:`Check` lines (ok or not, and what) instead of
raising, so one run reports every problem at once. Nothing is changed:
no database or archive is created, no model is loaded.
"""

from __future__ import annotations

import os
import shutil
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..config import Peer, Settings, TLSSettings
from ..storage.backup import sqlite_path


@dataclass(frozen=True)
class Check:
    ok: bool
    what: str


def check_all(settings: Settings, *, timeout: float = 5.0) -> Iterator[Check]:
    """Every check, in the order an operator fixes things: storage, TLS, models, peers."""
    yield check_database(settings.storage.database_url)
    yield check_archive(Path(settings.storage.archive_dir), settings.storage.min_free_mb)
    yield from check_tls(settings)
    yield from check_models(settings)
    for peer in [*settings.destinations, *settings.dicom.move_destinations]:
        yield check_peer(peer, settings.dicom.ae_title, timeout=timeout)


def check_database(url: str) -> Check:
    """Reachable, and its schema: current, migrations pending, or newer than this code."""
    from ..storage.db import Database

    shown = _without_password(url)
    path = sqlite_path(url)
    if path is not None and not path.exists():
        parent = _existing_parent(path.parent)
        if os.access(parent, os.W_OK):
            return Check(True, f"database {path} does not exist yet: the node creates it")
        return Check(False, f"database {path} does not exist and {parent} is not writable")
    db = Database(url)
    try:
        state = db.schema_state()
    except Exception as exc:  # noqa: BLE001 - any driver error is the one line the operator needs
        return Check(False, f"database {shown} unreachable: {_first_line(exc)}")
    finally:
        db.dispose()
    if not state.known:
        return Check(False, f"database {shown} schema {state.current} is newer than this cxrtriage ({state.head})")
    if state.current is None:
        return Check(True, f"database {shown} reachable, no schema yet: the node creates it ({state.head})")
    if state.pending:
        return Check(True, f"database {shown} reachable, migrations pending {state.current} -> {state.head}: "
                           "applied when the node starts")
    return Check(True, f"database {shown} reachable, schema current ({state.current})")


def check_archive(root: Path, min_free_mb: int) -> Check:
    """The archive exists (or can be created), is writable, and has ``storage.min_free_mb`` free."""
    existing = _existing_parent(root)
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == root else f"cannot be created ({existing} is not writable)"
        return Check(False, f"archive {root} {what}")
    free_mb = shutil.disk_usage(existing).free // 2**20
    if free_mb < min_free_mb:
        return Check(False, f"archive {root}: {free_mb} MB free, below storage.min_free_mb {min_free_mb}")
    state = "writable" if existing == root else "can be created"
    return Check(True, f"archive {root} {state}, {free_mb} MB free (min_free_mb {min_free_mb})")


def check_tls(settings: Settings) -> Iterator[Check]:
    """Each enabled TLS setting: files readable and loadable into an :class:`ssl.SSLContext`."""
    if settings.dicom.tls.enabled:
        yield _tls_check("dicom.tls", settings.dicom.tls, server=True)
    for peer in [*settings.destinations, *settings.dicom.move_destinations]:
        if peer.tls.enabled:
            yield _tls_check(f"TLS of {peer.ae_title}", peer.tls, server=False)


def _tls_check(what: str, tls: TLSSettings, *, server: bool) -> Check:
    files = [f for f in (tls.certificate, tls.private_key, tls.ca_certificates) if f]
    for name in files:
        if not os.access(name, os.R_OK):
            return Check(False, f"{what}: {name} {'is not readable' if Path(name).exists() else 'does not exist'}")
    if server and not (tls.certificate and tls.private_key):
        return Check(False, f"{what}: enabled without certificate and private_key")
    try:
        if server:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(tls.certificate), tls.private_key)
            if tls.ca_certificates:
                context.load_verify_locations(tls.ca_certificates)
        else:
            from ..scp.sender import client_tls

            client_tls(tls, "localhost")
    except (OSError, ssl.SSLError) as exc:
        return Check(False, f"{what}: cannot load into an SSL context: {_first_line(exc)}")
    return Check(True, f"{what}: {', '.join(files)} load")


def check_models(settings: Settings) -> Iterator[Check]:
    """The configured models resolve to files that exist (nothing is loaded)."""
    try:
        from ..inference.models import resolve_weights
        from ..inference.presets import model_specs

        specs = model_specs(settings.inference)
    except (OSError, ValueError, ImportError) as exc:
        yield Check(False, f"models: {_first_line(exc)}")
        return
    for role, spec in zip(("lungs", "disease"), specs):
        if not spec.weights:
            yield Check(False, f"{role} model {spec.display_name}: no weights configured")
            continue
        try:
            yield Check(True, f"{role} model {spec.display_name}: {resolve_weights(spec.weights)}")
        except FileNotFoundError as exc:
            yield Check(False, f"{role} model: {exc}")


def check_peer(peer: Peer, calling_ae: str, *, timeout: float = 5.0) -> Check:
    """C-ECHO a DIMSE peer; GET ``{url}/studies?limit=1`` of a DICOMweb one (any answer below 500 is up)."""
    if peer.type == "dicomweb":
        return _check_dicomweb(peer, timeout)
    from ..scp.echo import EchoFailed, echo

    try:
        result = echo(peer, calling_ae, timeout=timeout)
    except EchoFailed as exc:
        return Check(False, f"C-ECHO {peer.ae_title}: {exc}")
    ok = result.status == 0
    return Check(ok, f"C-ECHO {peer.ae_title}@{peer.host}:{peer.port}: status 0x{result.status:04X}, "
                     f"{result.milliseconds:.0f} ms")


def _check_dicomweb(peer: Peer, timeout: float) -> Check:
    import requests

    from ..scp.stow import dicomweb_auth, dicomweb_root

    url = f"{dicomweb_root(peer)}/studies?limit=1"
    try:
        status = requests.get(url, headers={"Accept": "application/dicom+json"}, auth=dicomweb_auth(peer),
                              timeout=timeout).status_code
    except requests.RequestException as exc:
        return Check(False, f"DICOMweb {peer.ae_title} {url}: {_first_line(exc)}")
    return Check(status < 500, f"DICOMweb {peer.ae_title} {url}: HTTP {status}")


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _without_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _first_line(exc: object) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
