"""Bad input sent over the network: each kind gets its status and a logged reason.

Files are sent raw (pynetdicom reads only the file meta of a path and sends
the dataset bytes as they are), so broken bytes reach the node unchanged.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import DigitalXRayImageStorageForPresentation, MRImageStorage, generate_uid
from sqlalchemy import func, select

from cxrtriage.inference.phantom import PhantomGenerator, write_cr
from cxrtriage.storage.models import Instance, Job, ScoreResult

from .bad_inputs import write_bad_corpus, write_encoding_corpus
from .harness import NO_CONTEXT, NodeProcess, send_raw, wait_for

pytestmark = pytest.mark.slow

#: Corpus name -> (C-STORE status, reason the node gives: in the refusal log or the scoring result).
EXPECTED: dict[str, tuple[int | str, str]] = {
    "no_pixel_data": (0xA900, "pixel_data_mismatch"),
    "no_sop_class": (0xA900, "sop_class_mismatch"),
    "huge_rows_columns": (0xA900, "pixel_data_mismatch"),
    "multi_frame": (0xA900, "pixel_data_mismatch"),
    "short_pixel_data": (0xA900, "pixel_data_mismatch"),
    "truncated_header": (0xC000, "truncated"),
    # PS3.4 Table B.2-1 "Cannot understand" (Cxxx): a dataset that ends inside an element is not whole, even
    # when the cut falls in Pixel Data: the element's declared length is not there, so the dataset is not whole.
    "truncated_pixels": (0xC000, "truncated"),
    "mr_sop_class": (0xA900, "sop_class_mismatch"),  # an MR dataset on a CR context
    "non_chest": (0x0000, "not_chest"),
    "lateral_ll": (0x0000, "lateral_view"),
    "lateral_rl": (0x0000, "lateral_view"),
    "one_by_one": (0x0000, "bad_image_size"),
    "rgb_not_chest": (0x0000, "unsupported_photometric"),
    "palette_colour": (0x0000, "unsupported_photometric"),
    "bits_stored_4": (0x0000, "unsupported_bit_depth"),
    # Network-only kinds, written below.
    "traversal_sop_uid": (0xC001, "invalid_uid"),
    "traversal_study_uid": (0xC001, "invalid_uid"),
    "letters_in_uid": (0xC001, "invalid_uid"),
    "cr_on_dx_context": (0xA900, "sop_class_mismatch"),
    # Found by bench/fuzz.py (seed 1, case 323): a dataset whose SOP Instance UID is not the
    # request's Affected SOP Instance UID was acknowledged and stored under the dataset's UID.
    "sop_instance_mismatch": (0xA900, "sop_instance_mismatch"),
    "mr_context": (NO_CONTEXT, ""),  # MR Image Storage is not negotiated at all
    "unsupported_transfer_syntax": (NO_CONTEXT, ""),
    # Bytes that do not match the declared transfer syntax (bad_inputs.write_encoding_corpus).
    "implicit_labelled_explicit": (0xC000, "encoding_mismatch"),
    "explicit_labelled_implicit": (0xC000, "encoding_mismatch"),
    "little_labelled_big": (0xC000, "encoding_mismatch"),
    "big_labelled_little": (0xC000, "encoding_mismatch"),
    "deflate_bomb": (0xA700, "inflated_too_large"),  # 1 MB on the wire, 1 GiB inflated: over dicom.max_inflated_mb
    "deflate_garbage": (0xC000, "unparseable"),
}


def write_network_corpus(good: Path, folder: Path) -> dict[str, Path]:
    files = {p.stem: p for p in write_bad_corpus(good, folder)}

    def variant(name: str, **changes: object) -> None:
        ds = pydicom.dcmread(good)
        for key, value in changes.items():
            if key.startswith("meta_"):
                setattr(ds.file_meta, key[5:], value)
            else:
                setattr(ds, key, value)
        path = folder / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=False)
        files[name] = path

    variant("traversal_sop_uid", SOPInstanceUID="../../../../etc/passwd", meta_MediaStorageSOPInstanceUID="1.2.3.4")
    variant("traversal_study_uid", StudyInstanceUID="1.2/../../../tmp/x")
    variant("letters_in_uid", SeriesInstanceUID="1.2.abc.4")
    variant("cr_on_dx_context", meta_MediaStorageSOPClassUID=DigitalXRayImageStorageForPresentation)
    variant("sop_instance_mismatch", meta_MediaStorageSOPInstanceUID=generate_uid())  # the request's UID
    variant("mr_context", SOPClassUID=MRImageStorage, meta_MediaStorageSOPClassUID=MRImageStorage)
    mpeg = pydicom.dcmread(good)
    mpeg.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG-2: nothing here decodes it
    mpeg.PixelData = encapsulate([mpeg.PixelData])
    mpeg.save_as(folder / "unsupported_transfer_syntax.dcm", enforce_file_format=False)
    files["unsupported_transfer_syntax"] = folder / "unsupported_transfer_syntax.dcm"
    files.update(write_encoding_corpus(good, folder / "encoding"))
    return files


def test_bad_input_corpus_over_the_network(tmp_path: Path, database_url: str, phantom_cr: Path) -> None:
    node = NodeProcess(tmp_path / "node", database_url).start()
    try:
        corpus = write_network_corpus(phantom_cr, tmp_path / "bad")
        assert set(EXPECTED) <= set(corpus)
        statuses = {name: send_raw(node.port, corpus[name]) for name in EXPECTED}
        assert statuses == {name: status for name, (status, _) in EXPECTED.items()}
        assert len(EXPECTED) >= 20

        # The node keeps serving: a good image is still stored and scored.
        good = write_cr(PhantomGenerator(448, 416)(4_300_000), tmp_path / "good.dcm")
        assert send_raw(node.port, good) == 0x0000

        db = node.db()
        stored_unscorable = [n for n, (s, _) in EXPECTED.items() if s == 0x0000]

        def results() -> dict[str, tuple[str, str]]:
            with db.session() as s:
                rows = s.execute(select(Instance.sop_instance_uid, ScoreResult.status, ScoreResult.reason)
                                 .join(ScoreResult, ScoreResult.instance_id == Instance.id)).all()
            return {uid: (status, reason) for uid, status, reason in rows}

        wait_for(lambda: len(results()) == len(stored_unscorable) + 1, 300, "every stored image processed")
        by_uid = results()
        for name in stored_unscorable:
            uid = pydicom.dcmread(corpus[name], stop_before_pixels=True).SOPInstanceUID
            assert by_uid[uid] == ("not_scorable", EXPECTED[name][1]), name
        assert by_uid[pydicom.dcmread(good, stop_before_pixels=True).SOPInstanceUID][0] == "scored"

        log = node.log
        for name, (_status, reason) in EXPECTED.items():
            if reason:
                assert f'"reason": "{reason}"' in log, f"no log line with reason {reason} ({name})"
        # Refused bytes are kept in quarantine with their reason, never in the archive proper.
        refused = [n for n, (s, _) in EXPECTED.items() if isinstance(s, int) and s != 0x0000]
        notes = list((tmp_path / "node/archive/quarantine").glob("*.json"))
        assert len(notes) == len(refused)
        assert sorted(json.loads(n.read_text())["reason"] for n in notes) == sorted(EXPECTED[n][1] for n in refused)
        # Every acknowledged file is whole and matches its row.
        verify = subprocess.run([sys.executable, "-m", "cxrtriage", "archive", "verify", "-c", str(node.config_path)],
                                capture_output=True, text=True, timeout=120)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert not list((tmp_path / "node/archive").rglob("passwd*"))
        db.dispose()
    finally:
        node.stop()


def test_duplicates_and_disk_floor(tmp_path: Path, database_url: str, phantom_cr: Path) -> None:
    node = NodeProcess(tmp_path / "node", database_url, workers={"scoring_workers": 0}).start()
    try:
        assert send_raw(node.port, phantom_cr) == 0x0000
        assert send_raw(node.port, phantom_cr) == 0x0000  # same bytes again: success, nothing new
        changed = pydicom.dcmread(phantom_cr)
        changed.ImageComments = "re-sent with a different header"
        other = tmp_path / "changed.dcm"
        changed.save_as(other)
        assert send_raw(node.port, other) == 0x0000  # same UID, different bytes: kept and flagged
        db = node.db()
        with db.session() as s:
            rows = s.scalars(select(Instance).where(Instance.sop_instance_uid == changed.SOPInstanceUID)).all()
            jobs = s.scalar(select(func.count()).select_from(Job).where(Job.kind == "score"))
        db.dispose()
        assert len(rows) == 2 and sum(r.duplicate_of_id is not None for r in rows) == 1
        assert jobs == 1
        assert "stored_duplicate_flagged" in node.log
    finally:
        node.stop()

    full = NodeProcess(tmp_path / "full", database_url, storage={"min_free_mb": 10**9}).start()
    try:
        assert send_raw(full.port, phantom_cr) == 0xA700
        assert '"reason": "disk_full"' in full.log
    finally:
        full.stop()
