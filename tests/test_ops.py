"""Operations commands against the real things: a database with real jobs, DCMTK storescp, Orthanc-free
DICOMweb endpoints served here, TLS files on disk."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select, text

from cxrtriage.storage.db import Database
from cxrtriage.storage.models import AuditEvent, Instance, Job, JobKind, JobState, ScoreResult
from cxrtriage.storage.queue import JobQueue

from .harness import StoreSCP, cli, free_port, make_pki

CR = "1.2.840.10008.5.1.4.1.1.1"
def write_config(folder: Path, database_url: str, **sections: object) -> Path:
    config = {"storage": {"database_url": database_url, "archive_dir": str(folder / "archive")}, **sections}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def add_scored_study(db: Database, study: str, *, scored_at: dt.datetime | None = None) -> list[int]:
    """One source image with a SEG and an SR derived from it, and its result; returns the derived rows' ids."""
    with db.session() as session:
        def row(suffix: str, kind: str, derived_from: int | None) -> Instance:
            instance = Instance(sop_instance_uid=f"{study}.{suffix}", sop_class_uid=CR,
                                transfer_syntax_uid="1.2.840.10008.1.2.1", study_instance_uid=study,
                                series_instance_uid=f"{study}.{suffix}.0", kind=kind,
                                path=f"{study}/{suffix}.dcm", sha256=f"{len(suffix):064x}", size=1,
                                derived_from_id=derived_from)
            session.add(instance)
            session.flush()
            return instance

        source = row("1", "source", None)
        derived = [row("2", "seg", source.id).id, row("3", "sr", source.id).id]
        session.add(ScoreResult(instance_id=source.id, study_instance_uid=study, status="scored",
                                seg_instance_id=derived[0], sr_instance_id=derived[1],
                                created_at=scored_at or dt.datetime.now(dt.UTC)))
    return derived


# --- jobs list / retry ------------------------------------------------------------------------------------------


def test_jobs_list_and_retry_failed(database: Database, tmp_path: Path) -> None:
    config = write_config(tmp_path, str(database.engine.url.render_as_string(hide_password=False)))
    seg, sr = add_scored_study(database, "1.2.826.0.1.3680043.10.999.1")
    queue = JobQueue(database)
    with database.session() as session:
        queue.enqueue(session, JobKind.SEND, seg, "PACS", max_attempts=1)
        queue.enqueue(session, JobKind.SEND, sr, "PACS", max_attempts=1)
    claimed = queue.claim(JobKind.SEND, "w1", 60)
    assert claimed is not None
    queue.fail(claimed, "w1", "association with PACS@10.0.0.9:104 failed (rejected, aborted or unreachable)")

    code, out = cli("jobs", "list", "-c", str(config), "--failed")
    assert code == 0, out
    rows = [line.split() for line in out.splitlines() if line.split()[:2] == [str(claimed.id), "send"]]  # cells wrap
    assert len(rows) == 1 and rows[0][:5] == [str(claimed.id), "send", "failed", "1/1", "PACS"], out
    assert "1 jobs" in out
    code, out = cli("jobs", "list", "-c", str(config), "--kind", "score")
    assert code == 0 and "0 jobs" in out
    assert cli("jobs", "list", "-c", str(config), "--kind", "bogus")[0] == 2

    code, out = cli("jobs", "retry", "-c", str(config), "--id", str(claimed.id))
    assert code == 0 and "1 failed jobs back to pending" in out, out
    with database.session() as session:
        job = session.get(Job, claimed.id)
        assert job is not None and (job.state, job.attempts) == (JobState.PENDING, 0)
    assert cli("jobs", "retry", "-c", str(config), "--failed")[1].startswith("0 failed jobs")
    assert cli("jobs", "retry", "-c", str(config))[0] == 2


# --- resend -----------------------------------------------------------------------------------------------------


def test_resend_requeues_done_jobs_and_adds_new_destinations(database: Database, tmp_path: Path) -> None:
    url = database.engine.url.render_as_string(hide_password=False)
    destinations = [{"ae_title": "PACS", "host": "127.0.0.1", "port": 104},
                    {"ae_title": "ARCHIVE", "host": "127.0.0.1", "port": 105}]
    config = write_config(tmp_path, url, destinations=destinations)
    study, other = "1.2.826.0.1.3680043.10.999.2", "1.2.826.0.1.3680043.10.999.3"
    seg, sr = add_scored_study(database, study, scored_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    add_scored_study(database, other, scored_at=dt.datetime(2026, 3, 1, tzinfo=dt.UTC))
    queue = JobQueue(database)
    with database.session() as session:  # sent to PACS before ARCHIVE was configured
        queue.enqueue(session, JobKind.SEND, seg, "PACS")
        queue.enqueue(session, JobKind.SEND, sr, "PACS")
    for _ in range(2):
        job = queue.claim(JobKind.SEND, "w1", 60)
        assert job is not None
        with database.session() as session:
            assert queue.complete(session, job, "w1")

    code, out = cli("resend", "-c", str(config), "--study", study)
    assert code == 0, out
    assert "2 objects, 4 send jobs" in out
    with database.session() as session:
        jobs = {(j.instance_id, j.destination): (j.state, j.attempts) for j in session.scalars(select(Job))}
        audits = session.scalars(select(AuditEvent)).all()
    assert jobs == {(i, d): (JobState.PENDING, 0) for i in (seg, sr) for d in ("PACS", "ARCHIVE")}
    assert [(a.action, a.study_instance_uid) for a in audits] == [("resend", study)]
    assert audits[0].actor.startswith("cli:") and json.loads(audits[0].detail) == {
        "destinations": ["ARCHIVE", "PACS"], "objects": 2}

    code, out = cli("resend", "-c", str(config), "--since", "2026-02-01T00:00", "--destination", "ARCHIVE")
    assert code == 0 and other in out and study not in out, out
    with database.session() as session:
        assert session.scalar(select(text("count(*)")).select_from(Job)) == 6
    code, out = cli("resend", "-c", str(config), "--study", "1.2.3.4")
    assert code == 1 and "1 studies have no results to send: 1.2.3.4" in out, out
    code, out = cli("resend", "-c", str(config), "--since", "2099-01-01")
    assert code == 1 and "no study scored since 2099-01-01" in out, out
    assert cli("resend", "-c", str(config), "--study", study, "--destination", "NOPE")[0] == 2
    assert cli("resend", "-c", str(config))[0] == 2


# --- echo and check -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def storescp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path_factory.mktemp("storescp") / "in", ae_title="PACS").start()
    yield scp
    scp.stop()


class _DicomWeb(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        status = 500 if self.path.startswith("/broken") else 200
        self.send_response(status)
        self.end_headers()
        self.wfile.write(b"[]")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def dicomweb() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _DicomWeb)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_echo_a_configured_peer_and_an_address(storescp: StoreSCP, tmp_path: Path) -> None:
    config = write_config(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}",
                          destinations=[{"ae_title": "PACS", "host": "127.0.0.1", "port": storescp.port}])
    code, out = cli("echo", "PACS", "-c", str(config))
    assert code == 0 and "status 0x0000" in out and " ms" in out, out
    code, out = cli("echo", "--host", "127.0.0.1", "--port", str(storescp.port), "--aet", "PACS")
    assert code == 0, out
    code, out = cli("echo", "--host", "127.0.0.1", "--port", str(free_port()), "--aet", "GONE", "--timeout", "2")
    assert code == 1 and "unreachable" in out and len(out.strip().splitlines()) == 1, out
    assert cli("echo", "NOPE", "-c", str(config))[0] == 2


def test_check_reports_every_problem(storescp: StoreSCP, dicomweb: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    good = [{"ae_title": "PACS", "host": "127.0.0.1", "port": storescp.port},
            {"ae_title": "WEB", "type": "dicomweb", "url": f"{dicomweb}/dicom-web"}]
    config = write_config(tmp_path, url, destinations=good)
    code, out = cli("check", "-c", str(config), "--timeout", "2")
    assert code == 0, out
    assert "C-ECHO PACS" in out and "DICOMweb WEB" in out and "HTTP 200" in out and "FAIL" not in out

    Database(url).migrate()
    code, out = cli("check", "-c", str(config))
    assert code == 0 and "schema current" in out, out

    bad_tls = {"enabled": True, "certificate": str(tmp_path / "missing.pem"), "private_key": str(tmp_path / "k.pem")}
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    config = write_config(
        tmp_path, url, destinations=[*good, {"ae_title": "GONE", "host": "127.0.0.1", "port": free_port()},
                                     {"ae_title": "BROKEN", "type": "dicomweb", "url": f"{dicomweb}/broken"}],
        dicom={"tls": bad_tls, "move_destinations": [
            {"ae_title": "WS", "host": "127.0.0.1", "port": storescp.port,
             "tls": {"enabled": True, "ca_certificates": str(tmp_path / "garbage.pem")}}]},
    )
    db = Database(url)
    with db.engine.begin() as conn:  # a newer cxrtriage migrated this database
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    db.dispose()
    code, out = cli("check", "-c", str(config), "--timeout", "2")
    assert code == 1, out
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert any("newer than this cxrtriage" in f for f in fails)
    assert any("dicom.tls" in f and "missing.pem does not exist" in f for f in fails)
    assert any("TLS of WS" in f and "SSL context" in f for f in fails)
    assert any("C-ECHO GONE" in f for f in fails)
    assert any("DICOMweb BROKEN" in f and "HTTP 500" in f for f in fails)
    assert len(fails) >= 5 and "C-ECHO PACS" in out

    gone = f"postgresql://postgres@127.0.0.1:{free_port()}/cxrtriage"
    code, out = cli("check", "-c", str(write_config(tmp_path, gone)), "--timeout", "2")
    assert code == 1 and any(line.startswith("FAIL database") and "unreachable" in line for line in out.splitlines())
    assert "postgres@127.0.0.1" in out

    (tmp_path / "bad.yaml").write_text("storage: {min_free_mb: -1}\n")
    assert cli("check", "-c", str(tmp_path / "bad.yaml"))[0] == 1


def test_check_archive_short_of_space_and_unwritable(tmp_path: Path) -> None:
    config = write_config(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}",
                          inference={"lungs": {"weights": "nope.safetensors"}})
    data = yaml.safe_load(config.read_text())
    data["storage"]["min_free_mb"] = 10**9
    config.write_text(yaml.safe_dump(data))
    code, out = cli("check", "-c", str(config))
    assert code == 1
    assert any("archive" in line and "below storage.min_free_mb" in line for line in out.splitlines())
    assert any(line.startswith("FAIL") and "nope.safetensors" in line for line in out.splitlines()), out
    if subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() != "0":
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        data["storage"]["archive_dir"] = str(locked / "archive")
        config.write_text(yaml.safe_dump(data))
        assert "cannot be created" in cli("check", "-c", str(config))[1]


def test_echo_and_check_over_tls(tmp_path: Path) -> None:
    import ssl

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    pki = make_pki(tmp_path / "pki")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki["ca.pem"]))
    server_context.verify_mode = ssl.CERT_REQUIRED
    server_context.load_cert_chain(str(pki["server.pem"]), str(pki["server.key"]))
    ae = AE(ae_title="SECURE")
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, ssl_context=server_context)
    try:
        tls = {"enabled": True, "certificate": str(pki["client.pem"]), "private_key": str(pki["client.key"]),
               "ca_certificates": str(pki["ca.pem"])}
        config = write_config(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", destinations=[
            {"ae_title": "SECURE", "host": "127.0.0.1", "port": port, "tls": tls},
            {"ae_title": "PLAIN", "host": "127.0.0.1", "port": port}])
        code, out = cli("echo", "SECURE", "-c", str(config))
        assert code == 0 and "status 0x0000" in out, out
        code, out = cli("echo", "PLAIN", "-c", str(config), "--timeout", "3")
        assert code == 1 and "aborted the association" in out, out  # plain TCP to a TLS port
        code, out = cli("check", "-c", str(config), "--timeout", "3")
        assert "ok   TLS of SECURE" in out and "ok   C-ECHO SECURE" in out and "FAIL C-ECHO PLAIN" in out, out
    finally:
        server.shutdown()
