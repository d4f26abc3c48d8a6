"""The worklist's admin view of sending: /api/destinations shows each destination's circuit."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from cxrtriage.stages.circuit import Circuits
from cxrtriage.storage.archive import Archive
from cxrtriage.storage.db import Database
from cxrtriage.triage.web import create_app
from cxrtriage.triage.worklist import Worklist


def test_an_open_circuit_is_shown_with_its_retry(tmp_path: Path, database: Database) -> None:
    now = [1000.0]
    circuits = Circuits(["PACS", "VNA"], failures=2, open_seconds=60, clock=lambda: now[0])
    client = TestClient(create_app(Worklist(database), Archive(tmp_path), destinations=circuits.states),
                        base_url="http://127.0.0.1")
    assert [d["state"] for d in client.get("/api/destinations").json()] == ["closed", "closed"]
    circuits["VNA"].failed()
    circuits["VNA"].failed()  # the second consecutive failure opens it
    now[0] += 15
    pacs, vna = client.get("/api/destinations").json()
    assert (pacs["destination"], pacs["state"]) == ("PACS", "closed")
    assert (vna["destination"], vna["state"], vna["consecutive_failures"]) == ("VNA", "open", 2)
    assert vna["retry_in_seconds"] == 45.0 and vna["opened_at"]
    now[0] += 50
    assert client.get("/api/destinations").json()[1]["state"] == "half_open"
    schema = client.get("/openapi.json").json()
    assert "DestinationState" in schema["components"]["schemas"]  # typed in the OpenAPI schema


def test_no_destinations_configured(tmp_path: Path, database: Database) -> None:
    client = TestClient(create_app(Worklist(database), Archive(tmp_path)), base_url="http://127.0.0.1")
    assert client.get("/api/destinations").json() == []
