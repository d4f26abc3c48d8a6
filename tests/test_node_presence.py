"""A running node's presence: readiness, gauges at rest, its heartbeat and the scheduler lease it holds."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

from sqlalchemy import select

from cxrtriage.storage.cluster import SCHEDULER_LEASE, holder_of
from cxrtriage.storage.models import NodeRecord

from .harness import NodeProcess, call, wait_for


def test_a_node_is_ready_beats_leads_and_hands_over_when_it_stops(tmp_path: Path, database_url: str) -> None:
    node = NodeProcess(tmp_path / "node", database_url, workers={"scoring_workers": 0},
                       triage={"escalation": {"interval_seconds": 1}}).start()
    db = node.db()
    try:
        base = node.web_url()
        status, body = call(f"{base}/api/health")
        assert status == 200 and isinstance(body, dict) and body["status"] == "ready", body

        metrics_url = wait_for(lambda: re.search(r'"msg": "metrics", "url": "([^"]+)"', node.log), 30, "metrics")[1]

        def queue_gauge() -> str:
            text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
            found = re.search(r'cxrtriage_queue_depth\{kind="score",state="pending"\} (\S+)', text)
            disk = re.search(r"^cxrtriage_disk_free_bytes (\S+)", text, re.M)
            return found[1] if found and disk and float(disk[1]) > 0 else ""

        assert float(wait_for(queue_gauge, 30, "the queue gauge")) == 0.0  # set at rest, not left unset

        def beat() -> NodeRecord | None:
            with db.session() as session:
                return session.scalars(select(NodeRecord).where(NodeRecord.name == "testnode")).first()

        row = wait_for(beat, 30, "the node's heartbeat")
        assert row.roles == "receiver,sender,scheduler,web" and row.incarnation.startswith("testnode:")

        def leader() -> str | None:
            with db.session() as session:
                return holder_of(session, SCHEDULER_LEASE)

        assert wait_for(leader, 60, "the scheduler lease") == row.incarnation
        status, nodes = call(f"{base}/api/nodes")  # the web page's node list
        assert status == 200 and isinstance(nodes, list) and len(nodes) == 1, nodes
        assert (nodes[0]["name"], nodes[0]["roles"], nodes[0]["leader"]) == (
            "testnode", ["receiver", "sender", "scheduler", "web"], True)
        node.stop()
        assert node.process is not None and node.process.returncode == 0
        assert leader() is None  # given up on a clean stop: another node takes over at once
    finally:
        node.stop()
        db.dispose()
