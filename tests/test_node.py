"""The node against real DICOM peers (DCMTK), on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]
from sqlalchemy import func, select

from cxrtriage.inference.phantom import PhantomGenerator, write_cr
from cxrtriage.storage.models import Instance, Job, ScoreResult

from .harness import NodeProcess, StoreSCP, free_port, wait_for
from .tools import dciodvfy_errors, require

pytestmark = pytest.mark.slow


def write_crs(folder: Path, count: int, first_seed: int) -> list[Path]:
    generator = PhantomGenerator(448, 416)
    return [write_cr(generator(first_seed + i), folder / f"cr{i:03d}.dcm") for i in range(count)]


def count(node: NodeProcess, query) -> int:  # type: ignore[no-untyped-def]
    db = node.db()
    try:
        with db.session() as s:
            return s.scalar(query)
    finally:
        db.dispose()


def scored(node: NodeProcess) -> int:
    return count(node, select(func.count()).select_from(ScoreResult).where(ScoreResult.status == "scored"))


def sends_done(node: NodeProcess) -> int:
    return count(node, select(func.count()).select_from(Job).where(Job.kind == "send", Job.state == "done"))


def dcmtk(tool: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    exe = require(tool, "dcmtk")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_dcmtk_send_score_query_retrieve(tmp_path: Path, database_url: str, rg1: Path) -> None:
    pacs = StoreSCP(tmp_path / "pacs", "PACS").start()
    mover = StoreSCP(tmp_path / "moved", "MOVESCP").start()
    node = NodeProcess(
        tmp_path / "node", database_url,
        destinations=[{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
        dicom={"move_destinations": [{"ae_title": "MOVESCP", "host": "127.0.0.1", "port": mover.port}]},
    ).start()
    try:
        files = write_crs(tmp_path / "in", 50, 4_000_000) + [rg1]
        assert dcmtk("echoscu", "-aet", "MODALITY", "-aec", "CXRTRIAGE", "127.0.0.1", str(node.port)).returncode == 0
        sent = dcmtk("storescu", "-aet", "MODALITY", "-aec", "CXRTRIAGE", "127.0.0.1", str(node.port), *map(str, files))
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: scored(node) == 51, 600, "51 images scored")
        wait_for(lambda: sends_done(node) == 102, 300, "102 SEG/SR sent to the PACS")
        at_pacs = [pydicom.dcmread(p, stop_before_pixels=True) for p in pacs.received()]
        assert sorted(d.Modality for d in at_pacs).count("SEG") == 51
        assert sorted(d.Modality for d in at_pacs).count("SR") == 51

        rg1_study = pydicom.dcmread(rg1, stop_before_pixels=True).StudyInstanceUID
        found = dcmtk("findscu", "-v", "-aet", "VIEWER", "-aec", "CXRTRIAGE", "-S", "-k", "QueryRetrieveLevel=SERIES",
                      "-k", f"StudyInstanceUID={rg1_study}", "-k", "SeriesInstanceUID", "-k", "Modality",
                      "127.0.0.1", str(node.port))
        assert found.returncode == 0
        modalities = sorted(line.split("[")[1].split("]")[0].strip() for line in found.stderr.splitlines()
                            if "Modality" in line and "(0008,0060)" in line and "[" in line and "CS" in line)
        assert modalities == ["", "CR", "SEG", "SR"] or modalities == ["CR", "SEG", "SR"]

        severity = dcmtk("findscu", "-v", "-aet", "VIEWER", "-aec", "CXRTRIAGE", "-S", "-k", "QueryRetrieveLevel=STUDY",
                         "-k", f"StudyInstanceUID={rg1_study}", "-k", "(0032,4000)", "-k", "(0099,0010)",
                         "127.0.0.1", str(node.port))
        assert "cxrtriage SCORED: zone score" in severity.stderr  # Study Comments (0032,4000)
        assert "RESEARCH USE: models not trained on real radiographs" in severity.stderr  # the bundled models
        assert "CXRTRIAGE" in severity.stderr and "(0099,1004)" in severity.stderr  # the private block

        moved = dcmtk("movescu", "-aet", "VIEWER", "-aec", "CXRTRIAGE", "-aem", "MOVESCP", "-S",
                      "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={rg1_study}", "127.0.0.1", str(node.port))
        assert moved.returncode == 0 and "Failed" not in moved.stderr, moved.stderr
        kinds = {pydicom.dcmread(p, stop_before_pixels=True).Modality: p for p in mover.received()}
        assert set(kinds) == {"CR", "SEG", "SR"}
        assert dciodvfy_errors(kinds["SEG"]) == [] and dciodvfy_errors(kinds["SR"]) == []

        got_dir = tmp_path / "got"
        got_dir.mkdir()
        got = dcmtk("getscu", "-aet", "VIEWER", "-aec", "CXRTRIAGE", "-S", "-k", "QueryRetrieveLevel=STUDY",
                    "-k", f"StudyInstanceUID={rg1_study}", "127.0.0.1", str(node.port), cwd=got_dir)
        assert got.returncode == 0, got.stderr
        assert len(list(got_dir.iterdir())) == 3
    finally:
        node.stop()
        pacs.stop()
        mover.stop()


def _send_one(port: int, path: Path) -> int | None:
    """C-STORE one file on its own association; None when the node is not there."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ComputedRadiographyImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRTRIAGE")
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(path)
        return int(status.Status) if status and "Status" in status else None
    finally:
        assoc.release()


def test_kill_9_while_receiving_loses_nothing(tmp_path: Path, database_url: str) -> None:
    pacs = StoreSCP(tmp_path / "pacs", "PACS").start()
    settings = dict(destinations=[{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}])
    node = NodeProcess(tmp_path / "node", database_url, **settings).start()
    files = write_crs(tmp_path / "in", 60, 4_100_000)
    acked: list[str] = []

    def stream() -> None:
        for path in files:
            if _send_one(node.port, path) == 0x0000:
                acked.append(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)

    sender = threading.Thread(target=stream)
    sender.start()
    wait_for(lambda: len(acked) >= 20, 300, "20 acknowledged images")
    node.kill()
    sender.join(timeout=600)
    assert 20 <= len(acked) < 60  # the kill really interrupted the stream

    restarted = NodeProcess(tmp_path / "node", database_url, port=node.port, **settings).start()
    try:
        db = restarted.db()
        with db.session() as s:
            stored = set(s.scalars(select(Instance.sop_instance_uid).where(Instance.kind == "source")))
        assert set(acked) <= stored  # every acknowledged image survived
        for uid in acked:
            with db.session() as s:
                row = s.scalars(select(Instance).where(Instance.sop_instance_uid == uid)).one()
            assert (Path(tmp_path / "node/archive") / row.path).stat().st_size == row.size
        wait_for(lambda: scored(restarted) == len(stored), 600, "every stored image scored")
        wait_for(lambda: sends_done(restarted) == 2 * len(stored), 300, "every SEG and SR sent")
        with db.session() as s:
            expected = set(s.scalars(select(Instance.sop_instance_uid).where(Instance.kind.in_(["seg", "sr"]))))
            per_source = s.execute(
                select(Instance.derived_from_id, func.count()).where(Instance.kind.in_(["seg", "sr"]))
                .group_by(Instance.derived_from_id)
            ).all()
        db.dispose()
        assert len(expected) == 2 * len(stored) and all(n == 2 for _, n in per_source)
        at_pacs = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in pacs.received()]
        assert sorted(at_pacs) == sorted(expected)  # one SEG and one SR per image, no extra object
    finally:
        restarted.stop()
        pacs.stop()


def test_destination_down_for_a_while(tmp_path: Path, database_url: str) -> None:
    up = StoreSCP(tmp_path / "up", "ARCHIVE").start()
    down_port = free_port()
    node = NodeProcess(
        tmp_path / "node", database_url,
        destinations=[
            {"ae_title": "PACS", "host": "127.0.0.1", "port": down_port},
            {"ae_title": "ARCHIVE", "host": "127.0.0.1", "port": up.port},
        ],
        workers={"breaker_open_seconds": 1},
    ).start()
    pacs = StoreSCP(tmp_path / "pacs", "PACS", port=down_port)
    try:
        files = write_crs(tmp_path / "in", 5, 4_200_000)
        assert dcmtk("storescu", "-aet", "MODALITY", "-aec", "CXRTRIAGE", "127.0.0.1", str(node.port),
                     *map(str, files)).returncode == 0
        wait_for(lambda: scored(node) == 5, 300, "5 images scored")
        # The reachable destination is not held up by the unreachable one.
        wait_for(lambda: len(up.received()) == 10, 120, "SEG/SR at the destination that is up")
        # Every job towards the unreachable destination was tried; its circuit then backs off without
        # spending attempts, so none fails for good however long the outage lasts.
        wait_for(lambda: count(node, select(func.count()).select_from(Job).where(
            Job.destination == "PACS", Job.last_error.like("%association with PACS%"))) == 10, 120,
            "every job towards the destination that is down tried")
        assert "destination circuit open" in node.log
        pacs.start()
        wait_for(lambda: sends_done(node) == 20, 300, "everything delivered once PACS is back")
        received = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in pacs.received()]
        assert len(received) == len(set(received)) == 10
        assert "association with PACS" in node.log  # the outage was logged
    finally:
        node.stop()
        up.stop()
        pacs.stop()


def test_access_control(tmp_path: Path, database_url: str) -> None:
    node = NodeProcess(
        tmp_path / "node", database_url,
        dicom={"allowed_calling_aets": ["MODALITY"], "require_called_aet": True},
        workers={"scoring_workers": 0},
    ).start()
    try:
        ok = dcmtk("echoscu", "-aet", "MODALITY", "-aec", "CXRTRIAGE", "127.0.0.1", str(node.port))
        assert ok.returncode == 0
        stranger = dcmtk("echoscu", "-aet", "STRANGER", "-aec", "CXRTRIAGE", "127.0.0.1", str(node.port))
        assert stranger.returncode != 0 and "Calling AE Title Not Recognized" in stranger.stderr
        wrong_called = dcmtk("echoscu", "-aet", "MODALITY", "-aec", "SOMEONEELSE", "127.0.0.1", str(node.port))
        assert wrong_called.returncode != 0 and "Called AE Title Not Recognized" in wrong_called.stderr
        assert "association rejected" in node.log
    finally:
        node.stop()


def _worker_pids(parent: int) -> list[int]:
    """The node's scoring worker processes (multiprocessing spawn children)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and b"spawn_main" in cmdline:
            pids.append(int(stat.parent.name))
    return pids


def test_scoring_in_worker_processes_survives_a_killed_worker(
    tmp_path: Path, database_url: str, pipeline
) -> None:
    import os
    import signal

    pacs = StoreSCP(tmp_path / "pacs", "PACS").start()
    node = NodeProcess(
        tmp_path / "node", database_url,
        destinations=[{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
        workers={"scoring_processes": 2},
    ).start()
    try:
        files = write_crs(tmp_path / "in", 8, 4_300_000)
        workers = wait_for(lambda: len(_worker_pids(node.process.pid)) == 2 and _worker_pids(node.process.pid),
                           120, "two scoring worker processes")
        sent = dcmtk("storescu", "-aet", "MODALITY", "-aec", "CXRTRIAGE", "127.0.0.1", str(node.port), *map(str, files))
        assert sent.returncode == 0, sent.stderr
        os.kill(workers[0], signal.SIGKILL)  # as the kernel's OOM killer would
        wait_for(lambda: scored(node) == 8, 300, "8 images scored despite the killed worker")
        wait_for(lambda: sends_done(node) == 16, 300, "16 SEG/SR sent to the PACS")
        at_pacs = [pydicom.dcmread(p, stop_before_pixels=True).Modality for p in pacs.received()]
        assert sorted(at_pacs) == ["SEG"] * 8 + ["SR"] * 8
        db = node.db()
        try:
            with db.session() as s:
                rows = s.execute(select(Instance.sop_instance_uid, ScoreResult.total_score)
                                 .join(ScoreResult, ScoreResult.instance_id == Instance.id)).all()
        finally:
            db.dispose()
        from cxrtriage.inference.radiograph import load_radiograph

        expected = {}
        for path in files:
            radiograph = load_radiograph(path)
            expected[radiograph.sop_instance_uid] = pipeline(radiograph).scores.total
        assert dict(rows) == expected  # the same scores as in-process scoring
        assert workers[0] not in _worker_pids(node.process.pid)
    finally:
        node.stop()
        pacs.stop()
