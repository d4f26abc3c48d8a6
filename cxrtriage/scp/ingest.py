"""The storage SCP's C-STORE handler: store durably, then acknowledge.

Order of work for every received dataset:

1. refuse with 0xA700 when free disk space is below the floor;
2. parse the header; unparseable bytes go to quarantine (0xC000);
3. check UIDs before any of them becomes a path (0xC001) and that the
   dataset matches its SOP class (0xA900); both quarantined;
4. a SOP Instance UID already stored with the same bytes is a success with
   no new job; with different bytes both are kept and the new one flagged;
5. write the encoded bytes to the archive and fsync, then commit the
   instance row and its scoring job in one transaction;
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
import time
from typing import Any

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from sqlalchemy import select

from ..dicom_header import catalog_attributes, integer, requested_priority, text, truncated_element
from ..observability import Metrics, event, hex_status
from ..storage.archive import Archive, InvalidUIDError, check_uid
from ..storage.catalog import instance_row
from ..storage.db import Database
from ..storage.models import Instance, JobKind
from ..storage.queue import JobQueue
from ..triage.priority import order_priority
from .contexts import IMAGE_CLASSES, UNCOMPRESSED, Status

log = logging.getLogger(__name__)


def encode_file(file_meta: FileMetaDataset, dataset_bytes: bytes) -> bytes:
    """Preamble + File Meta Information + the dataset exactly as received."""
    buffer = DicomBytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, file_meta, enforce_standard=True)
    buffer.write(dataset_bytes)
    return buffer.getvalue()


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
    actual = len(ds.PixelData)
    if rows <= 0 or cols <= 0 or bits not in (1, 8, 16, 32):
        return f"invalid image geometry: {rows}x{cols}, {bits} bits allocated"
    if actual < expected:
        return f"Pixel Data is {actual} bytes; {rows}x{cols}x{samples}x{frames} at {bits} bits needs {expected}"
    return None


class Ingest:
    """Everything the C-STORE handler needs, bound once to the node."""

    def __init__(self, db: Database, archive: Archive, queue: JobQueue, metrics: Metrics, min_free_bytes: int,
                 max_attempts: int) -> None:
        self.db = db
        self.archive = archive
        self.queue = queue
        self.metrics = metrics
        self.min_free_bytes = min_free_bytes
        self.max_attempts = max_attempts

    def _refuse(self, status: int, reason: str, detail: str, data: bytes | None, calling: str) -> int:
        where = None
        if data is not None:
            where = self.archive.quarantine(data, reason, detail, calling)
        self.metrics.received.labels(status=hex_status(status)).inc()
        event(log, logging.WARNING, "store refused", status=hex_status(status), reason=reason, detail=detail,
              calling_aet=calling, quarantined=str(where) if where else None)
        return status

    def store(self, data: bytes, sop_class_in_context: str, calling: str, dimse_priority: int | None) -> int:
        """Store one received file (preamble, File Meta, dataset as received); returns the C-STORE status."""
        t0 = time.perf_counter()
        if self.archive.free_bytes() < self.min_free_bytes:
            return self._refuse(
                Status.OUT_OF_RESOURCES, "disk_full", "free space below the configured floor", None, calling
            )
        try:
            ds = pydicom.dcmread(io.BytesIO(data), defer_size="256 KB")
            if (cut := truncated_element(ds)) is not None:
                raise ValueError(f"the dataset ends inside {cut}: truncated")
            transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
            sop_class = str(ds.get("SOPClassUID", ""))
            _ = ds.get("PixelData")  # force the parse to the end of the dataset
        except Exception as exc:  # pydicom raises many error types on bad bytes
            return self._refuse(Status.CANNOT_UNDERSTAND, "unparseable", f"{type(exc).__name__}: {exc}", data, calling)
        try:
            sop_uid = check_uid(ds.get("SOPInstanceUID"), "SOP Instance UID")
            relative = self.archive.relative_path(ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID"), sop_uid)
        except InvalidUIDError as exc:
            return self._refuse(Status.INVALID_UID, "invalid_uid", str(exc), data, calling)
        if sop_class != sop_class_in_context:
            detail = f"SOP Class UID {sop_class or '(none)'} sent on a {sop_class_in_context} context"
            return self._refuse(Status.DATASET_MISMATCH, "sop_class_mismatch", detail, data, calling)
        is_image = sop_class in IMAGE_CLASSES
        if is_image and (problem := pixel_data_problem(ds, transfer_syntax)):
            return self._refuse(Status.DATASET_MISMATCH, "pixel_data_mismatch", problem, data, calling)

        sha = hashlib.sha256(data).hexdigest()
        with self.db.session() as session:
            existing = session.scalars(select(Instance).where(Instance.sop_instance_uid == sop_uid)).all()
        same = next((i for i in existing if i.sha256 == sha), None)
        if same is not None:
            self.metrics.received.labels(status="duplicate").inc()
            event(log, logging.INFO, "duplicate instance, same bytes", sop_instance_uid=sop_uid, calling_aet=calling)
            return Status.SUCCESS
        flagged = existing[0].id if existing else None
        if flagged is not None:
            relative = self.archive.relative_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, sop_uid, sha[:12])
        try:
            self.archive.write(relative, data, sha256=sha)
            kind = "source" if is_image else ("seg" if text(ds, "Modality") == "SEG" else "sr")
            priority = order_priority(requested_priority(ds), dimse_priority)
            with self.db.session() as session:
                row = instance_row(
                    catalog_attributes(ds), dimse_priority=dimse_priority, calling_aet=calling, path=relative,
                    sha256=sha, size=len(data), kind=kind, duplicate_of_id=flagged,
                )
                session.add(row)
                session.flush()
                if is_image and flagged is None:
                    self.queue.enqueue(
                        session, JobKind.SCORE, row.id, priority=priority, max_attempts=self.max_attempts
                    )
        except Exception as exc:  # disk or database failure: not acknowledged, the sender retries
            event(log, logging.ERROR, "store failed", sop_instance_uid=sop_uid, error=f"{type(exc).__name__}: {exc}")
            self.metrics.received.labels(status=hex_status(Status.STORAGE_FAILED)).inc()
            return Status.STORAGE_FAILED
        self.metrics.received.labels(status=hex_status(Status.SUCCESS)).inc()
        self.metrics.latency.labels(stage="receive").observe(time.perf_counter() - t0)
        reason = "stored_duplicate_flagged" if flagged else "stored"
        event(log, logging.WARNING if flagged else logging.INFO, reason, sop_instance_uid=sop_uid,
              study_instance_uid=str(ds.StudyInstanceUID), sop_class=sop_class, calling_aet=calling,
              patient_name=text(ds, "PatientName"), bytes=len(data))
        return Status.SUCCESS

    def handle(self, evt: Any) -> int:
        """pynetdicom EVT_C_STORE handler."""
        data = encode_file(evt.file_meta, evt.request.DataSet.getvalue())
        ae_title = evt.assoc.requestor.ae_title
        calling = ae_title.strip() if isinstance(ae_title, str) else str(ae_title)
        priority = getattr(evt.request, "Priority", None)
        return self.store(data, str(evt.context.abstract_syntax), calling, priority)
