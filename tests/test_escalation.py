"""Escalation: a severe study unread past its deadline is POSTed to the webhook exactly once."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from cxrtriage.inference.phantom import PhantomGenerator, write_cr

from .harness import NodeProcess, call, send_raw, wait_for

pytestmark = pytest.mark.slow


class Receiver(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        length = int(self.headers["Content-Length"])
        Receiver.received.append(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_escalation_fires_once(tmp_path: Path, database_url: str) -> None:
    Receiver.received = []
    server = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{server.server_address[1]}/hook"
    node = NodeProcess(tmp_path / "node", database_url, triage={
        "escalation": {"deadline_minutes": {"critical": 0.01}, "webhook_url": hook, "interval_seconds": 0.5}})
    node.start()
    try:
        generator = PhantomGenerator(448, 416)
        severe = write_cr(generator(4_600_000, affected_zones=(0, 1, 2, 3, 4, 5)), tmp_path / "severe.dcm")
        mild = write_cr(generator(4_600_001, affected_zones=(2,)), tmp_path / "mild.dcm")
        assert send_raw(node.port, severe) == 0x0000 and send_raw(node.port, mild) == 0x0000
        wait_for(lambda: Receiver.received, 300, "the escalation webhook")
        time.sleep(3)  # several more scheduler runs
        assert len(Receiver.received) == 1
        sent = Receiver.received[0]
        # The bundled models score the six-zone phantom 6, its truth (disease round 13 at T = 0.30;
        # docs/model-card.md): critical from 5, so it escalates; the mild one does not.
        assert sent["band"] == "critical" and sent["total_score"] == 6 and sent["event"] == "cxrtriage.escalation"
        worklist = call(f"{node.web_url()}/api/worklist")[1]
        flagged = [e for e in worklist if "escalated" in e["flags"]]
        assert [e["study_instance_uid"] for e in flagged] == [sent["study_instance_uid"]]
        assert node.log.count('"msg": "escalated"') == 1
    finally:
        node.stop()
        server.shutdown()


def test_purge_keeps_unread_and_unsent_studies(tmp_path: Path, database_url: str) -> None:
    from cxrtriage.config import load_settings
    from cxrtriage.triage.jobs import purge

    from .harness import StoreSCP

    pacs = StoreSCP(tmp_path / "pacs").start()
    node = NodeProcess(tmp_path / "node", database_url,
                       destinations=[{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}])
    node.start()
    try:
        generator = PhantomGenerator(448, 416)
        paths = [write_cr(generator(4_700_000 + i), tmp_path / f"p{i}.dcm") for i in range(2)]
        for path in paths:
            assert send_raw(node.port, path) == 0x0000
        base = node.web_url()
        studies = wait_for(lambda: (lambda b: b if len(b) == 2 and all(e["band"] != "unscored" for e in b) else None)(
            call(f"{base}/api/worklist")[1]), 300, "two scored studies")
        wait_for(lambda: len(pacs.received()) == 4, 120, "SEG and SR of both at the PACS")
        read_uid = studies[0]["study_instance_uid"]
        assert call(f"{base}/api/studies/{read_uid}/read", "POST", {"reader": "dr_a"})[0] == 200
        settings = load_settings(node.config_path).model_copy(deep=True)
        settings.triage.retention_days = 1e-5  # about one second
        time.sleep(1.5)
        assert purge(settings) == 1
        remaining = call(f"{base}/api/worklist")[1]
        assert [e["study_instance_uid"] for e in remaining] == [studies[1]["study_instance_uid"]]
        assert call(f"{base}/api/studies/{read_uid}")[0] == 404
        assert purge(settings) == 0  # the unread study stays
    finally:
        node.stop()
        pacs.stop()
