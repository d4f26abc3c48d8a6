"""A short seeded fuzz of the receive path against the real node (bench/fuzz.py runs it longer).

Mutated A-ASSOCIATE-RQ PDUs and mutated datasets alternate with good
C-STOREs. Good traffic keeps flowing (every good image is stored), the node
stays up, and nothing acknowledged is lost or altered: every fuzzed dataset
the node answered with Success is in the database, and every archived file
still matches its row's SHA-256.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from sqlalchemy import select

from cxrtriage.inference.phantom import PhantomGenerator, write_cr
from cxrtriage.storage.models import Instance

from . import fuzz
from .harness import NodeProcess

pytestmark = pytest.mark.slow


def check_nothing_lost(node: NodeProcess, report: fuzz.Report) -> None:
    """Every good and every acknowledged fuzzed instance is held, and every archived file matches its row."""
    db = node.db()
    try:
        with db.session() as session:
            rows = session.execute(select(Instance.sop_instance_uid, Instance.path, Instance.sha256)).all()
    finally:
        db.dispose()
    held = {uid for uid, _, _ in rows}
    for outcome in report.good + report.acknowledged():
        assert outcome.sop_instance_uid in held, outcome
    archive = node.workdir / "archive"
    for uid, path, sha256 in rows:
        assert hashlib.sha256((archive / path).read_bytes()).hexdigest() == sha256, uid


def test_fuzzed_pdus_and_datasets_leave_good_traffic_flowing(tmp_path: Path) -> None:
    # SQLite only: the receive path is under test, not the database (the ingest tests cover both).
    generator = PhantomGenerator(256, 224)
    good_cr = write_cr(generator(5_100_000), tmp_path / "seed.dcm")
    node = NodeProcess(tmp_path / "node", f"sqlite:///{tmp_path}/node.db", workers={"scoring_workers": 0},
                       dicom={"handshake_timeout": 2, "pdu_timeout": 2, "network_timeout": 5}).start()
    try:
        report = fuzz.run(node.port, good_cr, lambda case: write_cr(generator(5_200_000 + case),
                                                                   tmp_path / f"good-{case}.dcm"),
                          seed=11, count=60, good_every=10, timeout=5.0)
        assert node.process is not None and node.process.poll() is None, "the node died"
        assert len(report.good) == 6 and all(o.answer == 0 for o in report.good), report.summary()
        pdu_answers = {o.answer for o in report.outcomes if o.kind == "pdu"}
        assert "A-ASSOCIATE-AC" not in pdu_answers or len(pdu_answers) > 1  # mutations reached the parser
        check_nothing_lost(node, report)
    finally:
        node.stop()
