"""STOW-RS user agent: send stored DICOM files to a DICOMweb service, exactly as stored (PS3.18 10.5).

Each file's bytes go out as they are on disk, one part of a
``multipart/related; type="application/dicom"`` request body (PS3.18 8.6.1.2),
never decoded. dicomweb-client's ``store_instances`` takes pydicom Datasets
and encodes them again, which would re-encode what the node archived (and
parse every file just to send it), so the request is POSTed with a
``requests`` session here; dicomweb-client adds nothing else a single POST
needs. Retries are the job queue's (durable, with backoff and the
destination's circuit breaker), so the session retries nothing itself.

Outcomes, classified as for C-STORE (:mod:`.sender`) so the send stage
treats both kinds of destination alike:

* connection refused or reset, a connect timeout, HTTP 5xx (503 included):
  the destination is down, :class:`~.sender.SendError`
  (:class:`~.sender.SendTimeout` when it does not answer in time);
* HTTP 4xx without a per-instance answer (401, 403, 415...):
  :class:`StowRefused`: the destination is up and refuses the request;
* a response body (PS3.18 Table 10.5.3-1, ``application/dicom+json``): each
  file's status is 0x0000 when listed in the Referenced SOP Sequence (its
  Warning Reason if any), the Failure Reason when listed in the Failed SOP
  Sequence (0x0110 when it gives none), and 0x0110 when listed in neither
  although the request succeeded.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import requests
from pydicom.filereader import read_file_meta_info

from ..config import Peer
from .sender import SendError, SendTimeout

#: Processing failure (PS3.4 B.2.3): an instance the service refused without saying why.
PROCESSING_FAILURE = 0x0110
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_SEQUENCE = "00081199"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"


class StowRefused(RuntimeError):
    """The DICOMweb service answered, and refused the request as a whole (HTTP 4xx)."""


def dicomweb_root(peer: Peer) -> str:
    """The destination's DICOMweb root URL, without a trailing slash."""
    return (peer.url or "").rstrip("/")


def dicomweb_auth(peer: Peer) -> tuple[str, str] | None:
    """HTTP Basic credentials of a DICOMweb destination, or None."""
    return (peer.username, peer.password or "") if peer.username else None


def stow_files(
    peer: Peer, files: Sequence[Path], calling_ae: str, *, timeout: float = 30.0,
    connect_timeout: float | None = None,
) -> list[int | None]:
    """POST ``files`` to ``{peer.url}/studies`` in one STOW-RS request; returns each file's status.

    ``connect_timeout`` bounds the TCP connection, ``timeout`` the wait for
    the response (``workers.send_connect_timeout``, ``workers.send_dimse_timeout``).
    ``calling_ae`` is sent as the User-Agent's comment, so the service's log
    can name the node.
    """
    uids = [str(read_file_meta_info(f).MediaStorageSOPInstanceUID) for f in files]
    boundary = uuid.uuid4().hex
    url = f"{dicomweb_root(peer)}/studies"
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
        "User-Agent": f"cxrtriage ({calling_ae})",
    }
    auth = dicomweb_auth(peer)
    connect = timeout if connect_timeout is None else connect_timeout
    with requests.Session() as session:
        try:
            response = session.post(url, data=_multipart(files, boundary), headers=headers, auth=auth,
                                    timeout=(connect, timeout))
        except requests.ConnectTimeout as exc:
            raise SendError(f"{peer.ae_title}: no connection to {url} within {connect:g} s") from exc
        except requests.Timeout as exc:
            raise SendTimeout(f"{peer.ae_title} did not answer STOW-RS within {timeout:g} s") from exc
        except requests.RequestException as exc:
            raise SendError(f"{peer.ae_title}: STOW-RS to {url} failed: {type(exc).__name__}") from exc
    if response.status_code >= 500:
        raise SendError(f"{peer.ae_title} answered STOW-RS with HTTP {response.status_code} (unavailable)")
    answer = _json(response)
    if response.status_code >= 400 and not answer:
        raise StowRefused(f"{peer.ae_title} refused STOW-RS with HTTP {response.status_code}")
    return [_status(answer, uid) for uid in uids]


def _multipart(files: Sequence[Path], boundary: str) -> bytes:
    """The request body (PS3.18 8.6.1.2, RFC 2387), whole: sent with a Content-Length, since not every
    DICOMweb service takes a chunked request; a result object is a few megabytes."""
    out: list[bytes] = []
    for path in files:
        out += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), Path(path).read_bytes(), b"\r\n"]
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out)


def _json(response: requests.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _items(answer: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    return list((answer.get(tag) or {}).get("Value") or [])


def _value(item: dict[str, Any], tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value") or [None]
    return values[0]


def _status(answer: dict[str, Any], uid: str) -> int:
    for item in _items(answer, _FAILED_SOP_SEQUENCE):
        if _value(item, _REFERENCED_SOP_INSTANCE_UID) == uid:
            reason = _value(item, _FAILURE_REASON)
            return int(reason) if reason is not None else PROCESSING_FAILURE
    for item in _items(answer, _REFERENCED_SOP_SEQUENCE):
        if _value(item, _REFERENCED_SOP_INSTANCE_UID) == uid:
            warning = _value(item, _WARNING_REASON)
            return int(warning) if warning is not None else 0x0000
    return PROCESSING_FAILURE
