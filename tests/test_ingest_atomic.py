"""Ingest is atomic per SOP Instance UID (issue #11): one winner per UID, decided in the database;
acknowledged bytes are never replaced; deflate bombs and mislabelled encodings are refused;
``archive verify`` finds what changed; partial writes of a killed node are cleaned at start-up.

Runs on SQLite and, with CXRTRIAGE_TEST_DATABASE_URL, on PostgreSQL.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.uid import ComputedRadiographyImageStorage, DeflatedExplicitVRLittleEndian
from sqlalchemy import func, select

from cxrtriage.inference.phantom import PhantomGenerator, write_cr
from cxrtriage.observability import Metrics
from cxrtriage.scp.ingest import Ingest, parse_strictly
from cxrtriage.storage.archive import Archive
from cxrtriage.storage.models import Instance, Job
from cxrtriage.storage.queue import JobQueue

from .bad_inputs import deflate_bomb, encode_body, file_bytes
from .harness import NodeProcess, send_raw

CR = ComputedRadiographyImageStorage
MIB = 1 << 20


@pytest.fixture(scope="module")
def small_cr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 448x416 phantom CR (370 KB): 64 of them cross loopback in no time."""
    return write_cr(PhantomGenerator(448, 416)(2_000_123), tmp_path_factory.mktemp("small") / "small.dcm")


def make_ingest(database, root: Path, **caps: int) -> Ingest:  # type: ignore[no-untyped-def]
    return Ingest(database, Archive(root), JobQueue(database), Metrics(), 0, 3, **caps)


def variant(good: Path, n: int) -> bytes:
    """The same SOP Instance UID with different bytes (one header attribute differs)."""
    ds = pydicom.dcmread(good)
    ds.ImageComments = f"variant {n}"
    return file_bytes(ds, str(ds.file_meta.TransferSyntaxUID), encode_body(ds, implicit=False, little=True))


def concurrently(function, items: list) -> list:  # type: ignore[no-untyped-def]
    """``function`` over ``items`` on as many threads, all released at once."""
    start = threading.Barrier(len(items))

    def run(item):  # type: ignore[no-untyped-def]
        start.wait()
        return function(item)

    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(run, items))


def rows_of(database, uid: str) -> list[Instance]:  # type: ignore[no-untyped-def]
    with database.session() as s:
        return list(s.scalars(select(Instance).where(Instance.sop_instance_uid == uid).order_by(Instance.id)).all())


def score_jobs(database) -> int:  # type: ignore[no-untyped-def]
    with database.session() as s:
        return s.scalar(select(func.count()).select_from(Job).where(Job.kind == "score"))


def files_match_rows(archive: Archive, rows: list[Instance]) -> None:
    for row in rows:
        assert hashlib.sha256(archive.read(row.path)).hexdigest() == row.sha256, row.path


def test_64_concurrent_identical_stores_make_one_row_and_one_job(database, small_cr: Path, tmp_path: Path) -> None:
    ingest = make_ingest(database, tmp_path / "archive")
    data = small_cr.read_bytes()
    statuses = concurrently(lambda _: ingest.store(data, CR, "MODALITY", 2), list(range(64)))
    assert statuses == [0x0000] * 64  # no 0xA701 from the race
    rows = rows_of(database, pydicom.dcmread(small_cr, stop_before_pixels=True).SOPInstanceUID)
    assert len(rows) == 1 and rows[0].duplicate_of_id is None
    assert score_jobs(database) == 1
    files_match_rows(ingest.archive, rows)
    archived = [p for p in ingest.archive.root.rglob("*.dcm") if ingest.archive.quarantine_dir not in p.parents]
    assert len(archived) == 1 and not list(ingest.archive.tmp.iterdir())


def test_64_concurrent_different_bytes_never_replace_the_acknowledged_file(
    database, small_cr: Path, tmp_path: Path
) -> None:
    ingest = make_ingest(database, tmp_path / "archive")
    uid = pydicom.dcmread(small_cr, stop_before_pixels=True).SOPInstanceUID
    first = [variant(small_cr, n) for n in range(32)]
    # 32 different datasets under one new UID at once: one original, 31 flagged duplicates, each its own file.
    assert concurrently(lambda data: ingest.store(data, CR, "MODALITY", 2), first) == [0x0000] * 32
    acknowledged = {row.path: ingest.archive.read(row.path) for row in rows_of(database, uid)}
    assert sorted(acknowledged.values()) == sorted(first)
    # 32 newcomers and a resend of each acknowledged one, at once.
    more = [variant(small_cr, n) for n in range(32, 64)] + first
    assert concurrently(lambda data: ingest.store(data, CR, "MODALITY", 2), more) == [0x0000] * 64
    rows = rows_of(database, uid)
    assert len(rows) == 64 and len({r.path for r in rows}) == 64
    assert {path: ingest.archive.read(path) for path in acknowledged} == acknowledged  # never replaced
    [original] = [r for r in rows if r.duplicate_of_id is None]
    assert original.path in acknowledged
    assert {r.duplicate_of_id for r in rows if r.id != original.id} == {original.id}
    files_match_rows(ingest.archive, rows)
    assert score_jobs(database) == 1  # flagged duplicates are not scored again


def test_deflate_bomb_is_refused_without_inflating_it(database, small_cr: Path, tmp_path: Path) -> None:
    cap = 16 * MIB
    ingest = make_ingest(database, tmp_path / "archive", max_inflated_bytes=cap)
    ds = pydicom.dcmread(small_cr)
    bomb = file_bytes(ds, DeflatedExplicitVRLittleEndian, deflate_bomb(ds, 1 << 30))
    assert len(bomb) < 2 * MIB
    tracemalloc.start()
    try:
        status = ingest.store(bomb, CR, "MODALITY", 2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 0xA700
    # Counted in steps, never held: less than half the cap, let alone the 1 GiB it inflates to.
    assert peak < cap // 2, f"{peak / MIB:.0f} MiB allocated for a {cap / MIB:.0f} MiB cap"
    [note] = ingest.archive.quarantine_dir.glob("*.json")
    assert json.loads(note.read_text())["reason"] == "inflated_too_large"
    assert note.with_suffix(".dcm").read_bytes() == bomb  # the received bytes, kept
    assert rows_of(database, ds.SOPInstanceUID) == []

    # A real Deflated dataset under the cap is stored as received and reads back strictly.
    import zlib

    deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = deflater.compress(encode_body(ds, implicit=False, little=True)) + deflater.flush()
    good = file_bytes(ds, DeflatedExplicitVRLittleEndian, body)
    assert ingest.store(good, CR, "MODALITY", 2) == 0x0000
    [row] = rows_of(database, ds.SOPInstanceUID)
    assert row.transfer_syntax_uid == DeflatedExplicitVRLittleEndian and ingest.archive.read(row.path) == good
    assert pydicom.dcmread(ingest.archive.path(row.path)).PixelData == ds.PixelData

    # The second line: a dataset over dicom.max_dataset_mb is refused before it is parsed.
    small = make_ingest(database, tmp_path / "small", max_dataset_bytes=len(good) - 1)
    assert small.store(good, CR, "MODALITY", 2) == 0xA700
    [note] = small.archive.quarantine_dir.glob("*.json")
    assert json.loads(note.read_text())["reason"] == "dataset_too_large"


def _with_pixel_element(ds: pydicom.Dataset, element: bytes) -> bytes:
    """``ds`` in Explicit VR Little Endian, its Pixel Data replaced by ``element``'s raw bytes (tag onwards)."""
    header = pydicom.Dataset()
    header.update({tag: ds[tag] for tag in ds.keys() if tag != 0x7FE00010})
    header.file_meta = ds.file_meta
    body = encode_body(header, implicit=False, little=True) + element
    return file_bytes(ds, "1.2.840.10008.1.2.1", body)


def test_pixel_data_is_checked_without_reading_a_deferred_value(database, small_cr: Path, tmp_path: Path) -> None:
    """Pixel Data over 256 KB stays unread while parsing; its declared length still has to fit the geometry, its
    VR has to be OB or OW, and an uncompressed transfer syntax cannot carry it encapsulated."""
    ingest = make_ingest(database, tmp_path / "archive")
    ds = pydicom.dcmread(small_cr)
    pixels = ds.PixelData
    assert len(pixels) > 256 * 1024
    parsed = parse_strictly(small_cr.read_bytes(), MIB)
    assert parsed.ds.get_item("PixelData", keep_deferred=True).value is None  # deferred by the parse, not read
    short = pydicom.dcmread(small_cr)
    short.Rows = 2 * short.Rows
    tag = struct.pack("<HH", 0x7FE0, 0x0010)
    item, delimiter = struct.pack("<HHL", 0xFFFE, 0xE000, 0), struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    fragment = struct.pack("<HHL", 0xFFFE, 0xE000, len(pixels)) + pixels
    cases = {
        "twice the rows the Pixel Data holds": (
            f"Pixel Data is {len(pixels)} bytes",
            file_bytes(short, "1.2.840.10008.1.2.1", encode_body(short, implicit=False, little=True))),
        "encapsulated, undefined length": (
            "undefined length",
            _with_pixel_element(ds, tag + b"OB\0\0" + struct.pack("<L", 0xFFFFFFFF) + item + fragment + delimiter)),
        "VR OF": ("has VR OF", _with_pixel_element(ds, tag + b"OF\0\0" + struct.pack("<L", len(pixels)) + pixels)),
    }
    for name, (detail, data) in cases.items():
        assert ingest.store(data, CR, "MODALITY", 2) == 0xA900, name
        notes = [json.loads(n.read_text()) for n in ingest.archive.quarantine_dir.glob("*.json")]
        assert any(n["reason"] == "pixel_data_mismatch" and detail in n["detail"] for n in notes), name
    assert rows_of(database, ds.SOPInstanceUID) == []
    assert ingest.store(small_cr.read_bytes(), CR, "MODALITY", 2) == 0x0000  # the real geometry fits


def test_archive_verify_finds_a_changed_byte_and_a_missing_file(database_url: str, small_cr: Path,
                                                                tmp_path: Path) -> None:
    from cxrtriage.storage.db import Database

    db = Database(database_url)
    db.migrate()
    try:
        ingest = make_ingest(db, tmp_path / "archive")
        datas = [variant(small_cr, n) for n in range(3)]
        for n in range(len(datas)):
            ds = pydicom.dcmread(small_cr)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.77.{n + 1}"
            ds.PatientName = "SECRET^PATIENT"
            datas[n] = file_bytes(ds, str(ds.file_meta.TransferSyntaxUID), encode_body(ds, implicit=False, little=True))
            assert ingest.store(datas[n], CR, "MODALITY", 2) == 0x0000
        with db.session() as s:
            rows = list(s.scalars(select(Instance).order_by(Instance.id)).all())
    finally:
        db.dispose()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"storage": {"database_url": database_url,
                                                  "archive_dir": str(tmp_path / "archive")}}))

    from typer.testing import CliRunner

    from cxrtriage.cli import app

    def verify():  # type: ignore[no-untyped-def]
        return CliRunner().invoke(app, ["archive", "verify", "--config", str(config)])

    clean = verify()
    assert clean.exit_code == 0, clean.stdout
    assert "3 files checked: 0 changed, 0 missing" in clean.stdout
    changed = ingest.archive.path(rows[0].path)
    raw = bytearray(changed.read_bytes())
    raw[-1] ^= 0x01  # one bit of the last pixel
    changed.write_bytes(bytes(raw))
    ingest.archive.path(rows[2].path).unlink()
    found = verify()
    assert found.exit_code == 1
    assert f"mismatch {rows[0].sop_instance_uid} {rows[0].path}" in found.stdout
    assert f"missing {rows[2].sop_instance_uid} {rows[2].path}" in found.stdout
    assert rows[1].sop_instance_uid not in found.stdout
    assert "1 changed, 1 missing" in found.stdout
    assert "SECRET" not in found.stdout


def test_node_over_the_network(tmp_path: Path, database_url: str, small_cr: Path) -> None:
    """64 associations at once with one UID; a deflate bomb while good images flow; debris gone at start-up."""
    archive = tmp_path / "node/archive"
    (archive / ".tmp").mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    debris = archive / ".tmp" / f"1.2.3.4.dcm.{int(dead.stdout)}.0badc0de.part"  # its writer was killed
    debris.write_bytes(b"half a file")
    old = archive / ".tmp" / f"1.2.3.5.dcm.{os.getpid()}.0ldc0de0.part"  # a live PID, but hours old: reused PID
    old.write_bytes(b"half another")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    node = NodeProcess(tmp_path / "node", database_url, workers={"scoring_workers": 0},
                       dicom={"max_associations": 80, "max_associations_per_host": 0}).start()
    try:
        assert not debris.exists() and not old.exists()
        statuses = concurrently(lambda _: send_raw(node.port, small_cr), list(range(64)))
        assert statuses == [0x0000] * 64
        different = []
        for n in range(16):
            path = tmp_path / f"variant{n}.dcm"
            path.write_bytes(variant(small_cr, n))
            different.append(path)
        assert concurrently(lambda p: send_raw(node.port, p), different) == [0x0000] * 16

        ds = pydicom.dcmread(small_cr)
        bomb = tmp_path / "bomb.dcm"
        bomb.write_bytes(file_bytes(ds, DeflatedExplicitVRLittleEndian, deflate_bomb(ds, 1 << 30)))
        goods = []
        for n in range(4):
            other = pydicom.dcmread(small_cr)
            other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.88.{n + 1}"
            goods.append(tmp_path / f"good{n}.dcm")
            other.save_as(goods[-1])
        results = concurrently(lambda p: send_raw(node.port, p), [bomb, *goods])
        assert results == [0xA700, 0x0000, 0x0000, 0x0000, 0x0000]
        assert '"reason": "inflated_too_large"' in node.log

        db = node.db()
        try:
            rows = rows_of(db, ds.SOPInstanceUID)
            assert len(rows) == 17 and sum(r.duplicate_of_id is None for r in rows) == 1
            assert score_jobs(db) == 1 + len(goods)
            files_match_rows(Archive(archive), rows)
        finally:
            db.dispose()
    finally:
        node.stop()
