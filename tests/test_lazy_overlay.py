"""The overlay PNG is drawn when the study page first asks for it, not while scoring.

A CR is received through the real C-STORE core and scored by the real score
stage (pipeline, SEG, SR, catalog rows); the worklist app (in-process, over
the same database and archive) then draws the overlay from the archived
source image, SEG and result record, keeps it, and says why when it cannot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi.testclient import TestClient
from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]
from sqlalchemy import update

from cxrtriage.inference.overlay import overlay_png
from cxrtriage.inference.phantom import PhantomGenerator, write_cr
from cxrtriage.inference.radiograph import load_dicom
from cxrtriage.observability import Metrics
from cxrtriage.scp.contexts import Status
from cxrtriage.scp.ingest import Ingest
from cxrtriage.stages.score import LocalScorer, ScoreStage
from cxrtriage.storage.archive import Archive
from cxrtriage.storage.db import Database
from cxrtriage.storage.models import Job, JobKind, JobState, utcnow
from cxrtriage.storage.queue import JobQueue
from cxrtriage.triage.web import create_app
from cxrtriage.triage.worklist import Worklist


@pytest.fixture(scope="module")
def crs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two small CRs with opacity in some zones; the second is never scored."""
    folder = tmp_path_factory.mktemp("crs")
    return [write_cr(PhantomGenerator(448, 416)(2_700_000 + i, affected_zones=(0, 4)), folder / f"{i}.dcm")
            for i in range(2)]


def uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def score_next(db: Database, archive: Archive, queue: JobQueue, pipeline: Any) -> None:
    """Claim the next score job and run the node's score stage on it."""
    stage = ScoreStage(db, archive, queue, Metrics(), LocalScorer(pipeline.settings, pipeline=pipeline),
                       destinations=(), ae_title="CXRTRIAGE", max_attempts=2)
    job = queue.claim(JobKind.SCORE, "w", 60)
    assert job is not None
    stage(job, "w")


def test_the_overlay_is_drawn_on_first_request_kept_and_redrawn_after_a_rescore(
    database: Database, tmp_path: Path, crs: list[Path], pipeline: Any
) -> None:
    archive = Archive(tmp_path / "archive")
    queue = JobQueue(database)
    ingest = Ingest(database, archive, queue, Metrics(), 0, max_attempts=2)
    assert ingest.store(crs[0].read_bytes(), ComputedRadiographyImageStorage, "MODALITY", None) == Status.SUCCESS
    scored, unscored = uid(crs[0]), uid(crs[1])
    score_next(database, archive, queue, pipeline)
    cached = archive.overlay_path(scored)
    assert not cached.exists()  # scoring drew nothing

    web = TestClient(create_app(Worklist(database), archive), base_url="http://127.0.0.1")
    response = web.get(f"/api/images/{scored}/overlay.png")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    # The same picture as drawing the pipeline's own result: the SEG and the record hold all it shows.
    radiograph = load_dicom(crs[0])
    assert response.content == overlay_png(radiograph.pixels, pipeline(radiograph))
    assert cached.read_bytes() == response.content  # kept in the archive ...
    before = cached.stat().st_mtime_ns
    assert web.get(f"/api/images/{scored}/overlay.png").content == response.content
    assert cached.stat().st_mtime_ns == before  # ... and the second request reads it, not redraws it

    with database.session() as session:  # scored again (as after a model change): its score job pending again
        session.execute(update(Job).where(Job.kind == JobKind.SCORE).values(state=JobState.PENDING,
                                                                            available_at=utcnow()))
    score_next(database, archive, queue, pipeline)
    assert not cached.exists()  # the picture kept for the earlier result is gone
    assert web.get(f"/api/images/{scored}/overlay.png").content == response.content  # same models, same picture

    assert ingest.store(crs[1].read_bytes(), ComputedRadiographyImageStorage, "MODALITY", None) == Status.SUCCESS
    not_scored = web.get(f"/api/images/{unscored}/overlay.png")
    assert not_scored.status_code == 409 and "not scored" in not_scored.json()["detail"]
    assert not archive.overlay_path(unscored).exists()
    assert web.get("/api/images/1.2.3.4.5/overlay.png").status_code == 404
    assert web.get("/api/images/not-a-uid/overlay.png").status_code == 400


def test_an_image_that_could_not_be_scored_has_no_overlay_and_says_why(
    database: Database, tmp_path: Path, crs: list[Path], pipeline: Any
) -> None:
    archive = Archive(tmp_path / "archive")
    queue = JobQueue(database)
    ingest = Ingest(database, archive, queue, Metrics(), 0, max_attempts=2)
    ds = pydicom.dcmread(crs[1])
    ds.BodyPartExamined = "KNEE"  # refused by the reader: recorded not_scorable
    path = tmp_path / "knee.dcm"
    ds.save_as(path)
    assert ingest.store(path.read_bytes(), ComputedRadiographyImageStorage, "MODALITY", None) == Status.SUCCESS
    score_next(database, archive, queue, pipeline)
    web = TestClient(create_app(Worklist(database), archive), base_url="http://127.0.0.1")
    response = web.get(f"/api/images/{ds.SOPInstanceUID}/overlay.png")
    assert response.status_code == 409 and "not_scorable" in response.json()["detail"]
    assert "not_chest" in response.json()["detail"]


@pytest.mark.parametrize("jpeg2000", [False, True])
def test_the_masks_read_back_from_the_seg_are_the_pipelines(crs: list[Path], pipeline: Any, jpeg2000: bool) -> None:
    """Uncompressed or JPEG 2000 (results.jpeg2000), the SEG gives back every mask the overlay draws."""
    import io

    import numpy as np

    from cxrtriage.inference.instance import encode_result
    from cxrtriage.inference.overlay import seg_masks

    radiograph = load_dicom(crs[0])
    result = pipeline(radiograph)
    encoded = encode_result(radiograph.dataset, radiograph.pixels, result, jpeg2000=jpeg2000)
    masks = seg_masks(pydicom.dcmread(io.BytesIO(encoded.seg.data)))
    expected = [result.zones.right, result.zones.left, result.disease, *result.zones.zones]
    assert sorted(masks) == list(range(1, len(expected) + 1))
    for number, mask in enumerate(expected, start=1):
        np.testing.assert_array_equal(masks[number], mask)
