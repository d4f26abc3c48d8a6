"""Roles (issue #14): a receiver-only node loads no models, a scorer-only node opens no DICOM port, and
the two, sharing one database and archive, score what the receiver acknowledged."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from cxrtriage.inference.phantom import PhantomGenerator, write_cr
from cxrtriage.storage.models import Instance, NodeRecord, ScoreResult

from .harness import NodeProcess, port_open, wait_for
from .test_node import dcmtk


def _roles(db, name: str) -> str | None:  # type: ignore[no-untyped-def]
    with db.session() as session:
        row = session.scalars(select(NodeRecord).where(NodeRecord.name == name)).first()
        return row.roles if row else None


def test_a_receiver_and_a_scorer_split_the_work(tmp_path: Path, database_url: str) -> None:
    archive = str(tmp_path / "shared-archive")
    storage = {"database_url": database_url, "archive_dir": archive, "min_free_mb": 1}
    receiver = NodeProcess(tmp_path / "receiver", database_url, node_name="receiver", storage=storage,
                           node={"roles": ["receiver"]})
    scorer = NodeProcess(tmp_path / "scorer", database_url, node_name="scorer", storage=storage,
                         node={"roles": "scorer,sender"})
    image = write_cr(PhantomGenerator(320, 288)(3, affected_zones=(0, 4)), tmp_path / "image.dcm")
    db = receiver.db()
    try:
        receiver.start()
        sent = dcmtk("storescu", "-aet", "MODALITY", "-aec", "CXRTRIAGE", "127.0.0.1", str(receiver.port),
                     str(image))
        assert sent.returncode == 0, sent.stderr
        with db.session() as session:
            assert session.scalars(select(Instance.sop_instance_uid)).all()  # acknowledged and recorded
        assert wait_for(lambda: _roles(db, "receiver"), 30, "the receiver's heartbeat") == "receiver"
        assert "scoring ready" not in receiver.log  # no models loaded: nothing scores here
        assert '"msg": "worklist"' not in receiver.log  # no web role, no web server

        scorer.start()
        assert not port_open(scorer.port)  # a scorer opens no DICOM port
        assert wait_for(lambda: _roles(db, "scorer"), 30, "the scorer's heartbeat") == "scorer,sender"

        def scored() -> list[ScoreResult]:
            with db.session() as session:
                return list(session.scalars(select(ScoreResult)))

        results = wait_for(scored, 120, "the scorer to score the received image")
        assert [r.status for r in results] == ["scored"]
        assert "scoring ready" in scorer.log
    finally:
        receiver.stop()
        scorer.stop()
        db.dispose()
