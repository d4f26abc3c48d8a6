"""The storage SCP's C-STORE handler: store durably, then acknowledge.

Order of work for every received dataset:

1. refuse with 0xA700 when free disk space is below the floor, or when the
   dataset is larger than ``dicom.max_dataset_mb`` (quarantined);
2. walk the dataset bytes element by element in their declared transfer
   syntax (a Deflated one inflated first, at most ``dicom.max_inflated_mb``:
   0xA700 beyond, quarantined); bytes that end inside an element, are
   encoded otherwise than declared, or cannot be parsed: 0xC000, quarantined;
3. check UIDs before any of them becomes a path (0xC001) and that the
   dataset matches its SOP class (0xA900); both quarantined;
4. keep the bytes in the archive under a name that holds their SHA-256
   (``<SOP>.<sha256[:16]>.dcm``), fsync'd; an existing file is never
   replaced, so acknowledged bytes cannot be overwritten;
5. in one transaction, serialised per SOP Instance UID (SQLite: ``BEGIN
   IMMEDIATE``; PostgreSQL: a transaction-scoped advisory lock on the UID),
   decide: the same UID with the same bytes is already stored -> success, no
   new row or job; the UID stored with other bytes -> a new row flagged
   ``duplicate_of_id``, not scored; otherwise the instance row and its
   scoring job. Integrity or serialisation errors retry the transaction;
6. only then answer 0x0000. A crash before step 6 loses nothing that was
   acknowledged; a crash after it finds the row and the job on restart.

Images that are stored but cannot be scored (lateral view, not a chest,
...) are not refused here: they are part of the study. The scoring worker
records why it did not score them.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
import time
import zlib
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from sqlalchemy import select
from sqlalchemy import text as sql_text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from ..dicom_header import (
    UNDEFINED_LENGTH,
    EncodingError,
    catalog_attributes,
    check_encoding,
    integer,
    requested_priority,
    text,
)
from ..observability import Metrics, event, hex_status, safe_error
from ..storage.archive import Archive, ArchiveConflictError, InvalidUIDError, check_uid
from ..storage.catalog import instance_row
from ..storage.db import Database, is_sqlite
from ..storage.models import Instance, JobKind
from ..storage.queue import JobQueue
from ..triage.priority import order_priority
from ..triage.study_rank import refresh_study
from .contexts import IMAGE_CLASSES, UNCOMPRESSED, Status

log = logging.getLogger(__name__)

MIB = 1024 * 1024
#: Transactions retried on integrity / serialisation errors before the C-STORE answers 0xA701.
CATALOG_ATTEMPTS = 8
#: First key of the PostgreSQL advisory locks that serialise ingest per SOP Instance UID ("CXRT").
_LOCK_SPACE = 0x43585254
#: Inflate in steps of this much: the most a refused "deflate bomb" ever holds in memory.
_INFLATE_STEP = 1 * MIB


class InflatedTooLargeError(ValueError):
    """A Deflated dataset that inflates beyond ``dicom.max_inflated_mb``."""


def _inflate(deflated: bytes | memoryview, limit: int, keep: bool) -> bytearray:
    """Inflate in steps of :data:`_INFLATE_STEP`; the output is kept only with ``keep`` (else just counted)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    size = 0
    pending: bytes | memoryview = deflated
    try:
        while pending or not inflater.eof:
            piece = inflater.decompress(pending, min(_INFLATE_STEP, limit + 1 - size)) if pending else b""
            if not piece and not pending:
                piece = inflater.flush(min(_INFLATE_STEP, limit + 1 - size))
                if not piece:
                    break
            size += len(piece)
            if size > limit:
                raise InflatedTooLargeError(f"the deflated dataset inflates to more than {limit // MIB} MiB")
            if keep:
                out += piece
            pending = inflater.unconsumed_tail
    except zlib.error as exc:
        raise EncodingError("malformed", f"the deflated dataset cannot be inflated: {exc}") from None
    if not inflater.eof:
        raise EncodingError("truncated", "the deflated dataset ends before its deflate stream does")
    return out


def inflate_bounded(deflated: bytes | memoryview, limit: int) -> bytes:
    """Inflate a Deflated transfer syntax body (PS3.5 A.5: raw deflate, no zlib header) of at most ``limit`` bytes.

    A first pass only counts (a "deflate bomb" of 1 MB that would inflate to
    1 GiB is refused holding one step of output, never the cap); the second
    keeps the bytes. Raises :class:`InflatedTooLargeError` beyond ``limit``,
    :class:`EncodingError` when the stream is broken or cut short.
    """
    _inflate(deflated, limit, keep=False)
    return bytes(_inflate(deflated, limit, keep=True))


@dataclass(frozen=True)
class Parsed:
    """A received file, checked: its dataset (values over 256 KB, such as Pixel Data, left unread) and
    declared transfer syntax."""

    ds: pydicom.Dataset
    transfer_syntax: str


def parse_strictly(data: bytes, max_inflated: int) -> Parsed:
    """Parse a received file only after its dataset bytes walked cleanly in the declared transfer syntax.

    pydicom, left to itself, guesses: an implicit VR body labelled explicit is
    read as implicit without complaint, and the stored file then fails any
    strict reader (C-GET, a PACS). Raises :class:`EncodingError`,
    :class:`InflatedTooLargeError`, or pydicom's errors.
    """
    fp = io.BytesIO(data)
    read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    transfer_syntax = UID(str(meta.get("TransferSyntaxUID", "")).strip().rstrip("\x00"))
    if not transfer_syntax.is_transfer_syntax:
        raise EncodingError("malformed", f"transfer syntax {transfer_syntax[:64]!r} is not known")
    body: bytes | memoryview = memoryview(data)[fp.tell():]
    deflated = transfer_syntax == DeflatedExplicitVRLittleEndian
    if deflated:
        body = inflate_bounded(body, max_inflated)
    check_encoding(body, implicit=transfer_syntax.is_implicit_VR, little=transfer_syntax.is_little_endian)
    ds: pydicom.Dataset
    if deflated:  # parse what was inflated here, not a second, unbounded inflation by pydicom
        ds = FileDataset("", read_dataset(io.BytesIO(body), False, True), file_meta=meta, preamble=data[:128])
    else:
        # Every element's header is read here, to the end of the dataset; values over 256 KB (Pixel Data)
        # stay unread: check_encoding has walked their bytes, and the archive keeps ``data`` itself.
        ds = pydicom.dcmread(io.BytesIO(data), defer_size="256 KB")
    return Parsed(ds, str(transfer_syntax))


def encode_file(file_meta: FileMetaDataset, dataset_bytes: bytes) -> bytes:
    """Preamble + File Meta Information + the dataset exactly as received."""
    buffer = DicomBytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, file_meta, enforce_standard=True)
    buffer.write(dataset_bytes)
    return buffer.getvalue()


#: Pixel Data's VR as read: explicit OB or OW (UN from a peer that did not know it), None when implicit.
_PIXEL_DATA_VRS = frozenset({None, "OB", "OW", "UN", "OB or OW"})


def pixel_data_problem(ds: pydicom.Dataset, transfer_syntax: str) -> str | None:
    """Why an image dataset does not match its SOP class, or None."""
    if "PixelData" not in ds:
        return "image without Pixel Data (7FE0,0010)"
    if transfer_syntax not in UNCOMPRESSED:
        return None
    rows, cols = integer(ds, "Rows") or 0, integer(ds, "Columns") or 0
    bits = integer(ds, "BitsAllocated") or 0
    samples = integer(ds, "SamplesPerPixel") or 1
    frames = integer(ds, "NumberOfFrames") or 1
    expected = rows * cols * samples * frames * bits // 8
    element = ds.get_item("PixelData", keep_deferred=True)  # as read: a deferred value stays unread
    if element.VR not in _PIXEL_DATA_VRS:
        return f"Pixel Data (7FE0,0010) has VR {element.VR}; an image's is OB or OW"
    actual = element.length if isinstance(element, RawDataElement) else len(element.value)
    if actual == UNDEFINED_LENGTH:  # PS3.5 A.4: encapsulated Pixel Data belongs to compressed transfer syntaxes
        return "Pixel Data (7FE0,0010) of undefined length (encapsulated) in an uncompressed transfer syntax"
    if rows <= 0 or cols <= 0 or bits not in (1, 8, 16, 32):
        return f"invalid image geometry: {rows}x{cols}, {bits} bits allocated"
    if actual < expected:
        return f"Pixel Data is {actual} bytes; {rows}x{cols}x{samples}x{frames} at {bits} bits needs {expected}"
    return None


class Ingest:
    """Everything the C-STORE handler needs, bound once to the node."""

    def __init__(self, db: Database, archive: Archive, queue: JobQueue, metrics: Metrics, min_free_bytes: int,
                 max_attempts: int, *, max_dataset_bytes: int = 128 * MIB, max_inflated_bytes: int = 128 * MIB) -> None:
        self.db = db
        self.archive = archive
        self.queue = queue
        self.metrics = metrics
        self.min_free_bytes = min_free_bytes
        self.max_attempts = max_attempts
        self.max_dataset_bytes = max_dataset_bytes
        self.max_inflated_bytes = max_inflated_bytes

    def _refuse(self, status: int, reason: str, detail: str, data: bytes | None, calling: str) -> int:
        where = None
        if data is not None:
            where = self.archive.quarantine(data, reason, detail, calling)
        self.metrics.received.labels(status=hex_status(status)).inc()
        event(log, logging.WARNING, "store refused", status=hex_status(status), reason=reason, detail=detail,
              calling_aet=calling, quarantined=str(where) if where else None)
        return status

    def store(self, data: bytes, sop_class_in_context: str, calling: str, dimse_priority: int | None, *,
              affected_sop_instance: str | None = None) -> int:
        """Store one received file (preamble, File Meta, dataset as received); returns the C-STORE status.

        ``affected_sop_instance`` is the request's Affected SOP Instance UID (0000,1000): the dataset
        must carry the same SOP Instance UID, or the peer would be told one instance was stored
        while another was (PS3.7 9.1.1.1.2).
        """
        t0 = time.perf_counter()
        if self.archive.free_bytes() < self.min_free_bytes:
            return self._refuse(
                Status.OUT_OF_RESOURCES, "disk_full", "free space below the configured floor", None, calling
            )
        if len(data) > self.max_dataset_bytes:
            detail = f"{len(data)} bytes; dicom.max_dataset_mb allows {self.max_dataset_bytes // MIB} MiB"
            return self._refuse(Status.OUT_OF_RESOURCES, "dataset_too_large", detail, data, calling)
        try:
            parsed = parse_strictly(data, self.max_inflated_bytes)
        except InflatedTooLargeError as exc:
            return self._refuse(Status.OUT_OF_RESOURCES, "inflated_too_large", str(exc), data, calling)
        except EncodingError as exc:
            reason = exc.reason if exc.reason != "malformed" else "unparseable"
            return self._refuse(Status.CANNOT_UNDERSTAND, reason, str(exc), data, calling)
        except Exception as exc:  # pydicom raises many error types on bad bytes
            return self._refuse(Status.CANNOT_UNDERSTAND, "unparseable", safe_error(exc), data, calling)
        ds, transfer_syntax = parsed.ds, parsed.transfer_syntax
        sop_class = str(ds.get("SOPClassUID", ""))
        try:
            sop_uid = check_uid(ds.get("SOPInstanceUID"), "SOP Instance UID")
            study_uid = check_uid(ds.get("StudyInstanceUID"), "Study Instance UID")
            series_uid = check_uid(ds.get("SeriesInstanceUID"), "Series Instance UID")
        except InvalidUIDError as exc:
            return self._refuse(Status.INVALID_UID, "invalid_uid", str(exc), data, calling)
        if sop_class != sop_class_in_context:
            detail = f"SOP Class UID {sop_class or '(none)'} sent on a {sop_class_in_context} context"
            return self._refuse(Status.DATASET_MISMATCH, "sop_class_mismatch", detail, data, calling)
        if affected_sop_instance is not None and sop_uid != affected_sop_instance.strip():
            detail = "the dataset's SOP Instance UID is not the request's Affected SOP Instance UID"
            return self._refuse(Status.DATASET_MISMATCH, "sop_instance_mismatch", detail, data, calling)
        is_image = sop_class in IMAGE_CLASSES
        if is_image and (problem := pixel_data_problem(ds, transfer_syntax)):
            return self._refuse(Status.DATASET_MISMATCH, "pixel_data_mismatch", problem, data, calling)

        sha = hashlib.sha256(data).hexdigest()
        try:
            if self._stored_already(sop_uid, sha):  # an identical resend: nothing to write
                return self._identical(sop_uid, calling)
            relative = self._keep(study_uid, series_uid, sop_uid, data, sha)
            outcome = self._catalog(ds, sop_uid, relative, sha, len(data), is_image, calling, dimse_priority)
        except Exception as exc:  # disk or database failure: not acknowledged, the sender retries
            event(log, logging.ERROR, "store failed", sop_instance_uid=sop_uid, error=safe_error(exc))
            self.metrics.received.labels(status=hex_status(Status.STORAGE_FAILED)).inc()
            return Status.STORAGE_FAILED
        if outcome == "identical":
            return self._identical(sop_uid, calling)
        self.metrics.received.labels(status=hex_status(Status.SUCCESS)).inc()
        self.metrics.latency.labels(stage="receive").observe(time.perf_counter() - t0)
        flagged = outcome == "flagged"
        reason = "stored_duplicate_flagged" if flagged else "stored"
        event(log, logging.WARNING if flagged else logging.INFO, reason, sop_instance_uid=sop_uid,
              study_instance_uid=study_uid, sop_class=sop_class, calling_aet=calling,
              patient_name=text(ds, "PatientName"), bytes=len(data))
        return Status.SUCCESS

    def _identical(self, sop_uid: str, calling: str) -> int:
        self.metrics.received.labels(status="duplicate").inc()
        event(log, logging.INFO, "duplicate instance, same bytes", sop_instance_uid=sop_uid, calling_aet=calling)
        return Status.SUCCESS

    def _stored_already(self, sop_uid: str, sha: str) -> bool:
        with self.db.session() as session:
            found = session.scalar(
                select(Instance.id).where(Instance.sop_instance_uid == sop_uid, Instance.sha256 == sha).limit(1)
            )
        return found is not None

    def _keep(self, study: str, series: str, sop: str, data: bytes, sha: str) -> str:
        """Keep the bytes under a name unique to them; never replaces an archived file."""
        relative = self.archive.relative_path(study, series, sop, sha[:16])
        try:
            self.archive.keep(relative, data, sha)
        except ArchiveConflictError:  # other bytes under the short name (bit rot, or a 64-bit prefix collision)
            event(log, logging.ERROR, "archive file differs from the hash in its name", path=relative)
            relative = self.archive.relative_path(study, series, sop, sha)
            self.archive.keep(relative, data, sha)
        return relative

    def _lock_uid(self, session: Session, sop_uid: str) -> None:
        """Serialise ingest of one SOP Instance UID until the transaction ends.

        SQLite needs nothing: every transaction begins with ``BEGIN IMMEDIATE``
        (storage.db), so only one writes at a time. PostgreSQL's READ COMMITTED
        would let two arrivals both see no row and both insert an unflagged
        original; a transaction-scoped advisory lock on the UID prevents it.
        """
        if not is_sqlite(self.db.engine):
            session.execute(sql_text("SELECT pg_advisory_xact_lock(:space, hashtext(:uid))"),
                            {"space": _LOCK_SPACE, "uid": sop_uid})

    def _catalog(self, ds: pydicom.Dataset, sop_uid: str, relative: str, sha: str, size: int, is_image: bool,
                 calling: str, dimse_priority: int | None) -> str:
        """Decide, in one transaction per try, what the bytes are: ``stored``, ``flagged`` or ``identical``."""
        kind = "source" if is_image else ("seg" if text(ds, "Modality") == "SEG" else "sr")
        priority = order_priority(requested_priority(ds), dimse_priority)
        attributes = catalog_attributes(ds)
        attributes["sop_instance_uid"] = sop_uid
        for attempt in range(1, CATALOG_ATTEMPTS + 1):
            try:
                with self.db.session() as session:
                    self._lock_uid(session, sop_uid)
                    existing = session.execute(
                        select(Instance.id, Instance.sha256, Instance.path, Instance.duplicate_of_id)
                        .where(Instance.sop_instance_uid == sop_uid).order_by(Instance.id)
                    ).all()
                    same = next((row for row in existing if row.sha256 == sha), None)
                    if same is not None:
                        if same.path != relative:  # stored before names held the hash: ours is an orphan
                            self.archive.remove(relative)
                        return "identical"
                    original = next((row.id for row in existing if row.duplicate_of_id is None),
                                    existing[0].id if existing else None)
                    row = instance_row(
                        attributes, dimse_priority=dimse_priority, calling_aet=calling, path=relative,
                        sha256=sha, size=size, kind=kind, duplicate_of_id=original,
                    )
                    session.add(row)
                    session.flush()
                    if is_image and original is None:
                        self.queue.enqueue(
                            session, JobKind.SCORE, row.id, priority=priority, max_attempts=self.max_attempts
                        )
                        refresh_study(session, row.study_instance_uid)  # the worklist ranks it from now on
                return "stored" if original is None else "flagged"
            except (IntegrityError, OperationalError) as exc:  # a concurrent arrival or a busy database: try again
                if attempt == CATALOG_ATTEMPTS:
                    raise
                event(log, logging.INFO, "ingest transaction retried", sop_instance_uid=sop_uid, attempt=attempt,
                      error=type(exc).__name__)
                time.sleep(random.uniform(0, 0.02 * 2**attempt))
        raise AssertionError("unreachable")

    def handle(self, evt: Any) -> int:
        """pynetdicom EVT_C_STORE handler."""
        data = encode_file(evt.file_meta, evt.request.DataSet.getvalue())
        ae_title = evt.assoc.requestor.ae_title
        calling = ae_title.strip() if isinstance(ae_title, str) else str(ae_title)
        priority = getattr(evt.request, "Priority", None)
        affected = getattr(evt.request, "AffectedSOPInstanceUID", None)
        return self.store(data, str(evt.context.abstract_syntax), calling, priority,
                          affected_sop_instance=str(affected) if affected else None)
