"""The worklist API: who acts (reader identity and the audit trail), patient identity on or off,
the plain radiograph, /docs without a CDN and a typed OpenAPI schema.

The app runs in-process (Starlette's TestClient speaks ASGI to it) over a real
database; a study is received through the real C-STORE core (``Ingest``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]

from cxrtriage.inference.phantom import PhantomGenerator, write_cr
from cxrtriage.observability import Metrics
from cxrtriage.scp.contexts import Status
from cxrtriage.scp.ingest import Ingest
from cxrtriage.storage.archive import Archive
from cxrtriage.storage.db import Database
from cxrtriage.storage.queue import JobQueue
from cxrtriage.triage.preview import plain_path
from cxrtriage.triage.web import create_app
from cxrtriage.triage.worklist import Worklist

READERS = {"dr_a": "token-of-a", "dr_b": "token-of-b"}


@pytest.fixture(scope="module")
def radiograph(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, str, str]:
    """One CR (bytes, Study Instance UID, SOP Instance UID) with a patient name to show or hide."""
    path = write_cr(PhantomGenerator(448, 416)(7), tmp_path_factory.mktemp("cr") / "cr.dcm")
    ds = pydicom.dcmread(path)
    ds.PatientName, ds.PatientID = "DOE^Jane", "PID-7"
    ds.save_as(path)
    return path.read_bytes(), str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)


class Node:
    """A database and archive holding the one study, and apps over them."""

    def __init__(self, db: Database, archive: Archive, study: str, sop: str) -> None:
        self.db, self.archive, self.study, self.sop = db, archive, study, sop

    def client(self, **kwargs: Any) -> TestClient:
        return TestClient(create_app(Worklist(self.db), self.archive, **kwargs), base_url="http://127.0.0.1")

    def audit(self, web: TestClient, **auth: Any) -> list[tuple[str, str]]:
        rows = web.get("/api/audit", params={"study": self.study}, **auth).json()
        return [(row["action"], row["actor"]) for row in rows]


@pytest.fixture
def node(database: Database, tmp_path: Path, radiograph: tuple[bytes, str, str]) -> Iterator[Node]:
    data, study, sop = radiograph
    archive = Archive(tmp_path / "archive")
    ingest = Ingest(database, archive, JobQueue(database), Metrics(), 0, max_attempts=2)
    assert ingest.store(data, ComputedRadiographyImageStorage, "MODALITY", None) == Status.SUCCESS
    yield Node(database, archive, study, sop)


def test_two_readers_act_as_themselves_and_the_audit_names_them(node: Node) -> None:
    web = node.client(readers=READERS)
    a, b = {"auth": ("dr_a", READERS["dr_a"])}, {"headers": {"Authorization": f"Bearer {READERS['dr_b']}"}}
    url = f"/api/studies/{node.study}"
    assert web.get("/api/me", **a).json() == {"reader": "dr_a", "authenticated": True}
    assert web.get("/api/me", **b).json()["reader"] == "dr_b"  # a reader's own token as Bearer
    claimed = web.post(f"{url}/claim", **a)  # no body: the identity is the authenticated one
    assert claimed.status_code == 200 and claimed.json()["reader"] == "dr_a"
    assert web.post(f"{url}/read", **b).status_code == 409  # B cannot read A's study
    assert web.post(f"{url}/unclaim", **b).status_code == 409
    assert web.post(f"{url}/read", json={"reader": "dr_b"}, **a).status_code == 403  # A cannot act as B
    assert web.post(f"{url}/unclaim", json={"reader": "dr_a"}, **a).status_code == 200  # a matching name is fine
    assert web.post(f"{url}/claim", **b).json()["reader"] == "dr_b"
    read = web.post(f"{url}/read", **b)
    assert read.status_code == 200 and read.json()["reading_state"] == "read"
    assert node.audit(web, **a) == [("read", "dr_b"), ("claim", "dr_b"), ("unclaim", "dr_a"), ("claim", "dr_a")]


@pytest.mark.parametrize("auth", [("dr_a", "token-of-b"), ("dr_a", "wrong"), ("dr_c", "token-of-a"), ("", "")])
def test_a_wrong_password_gets_401(node: Node, auth: tuple[str, str]) -> None:
    web = node.client(readers=READERS, token="shared")
    response = web.post(f"/api/studies/{node.study}/claim", auth=auth)
    assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Basic")
    assert web.get("/api/worklist", headers={"Authorization": "Bearer token-of-c"}).status_code == 401
    assert node.audit(web, headers={"Authorization": "Bearer shared"}) == []


def test_the_shared_token_identifies_by_basic_user_name(node: Node) -> None:
    web = node.client(token="shared")
    url = f"/api/studies/{node.study}"
    assert web.post(f"{url}/claim", headers={"Authorization": "Bearer shared"}).status_code == 403  # no name
    assert web.post(f"{url}/claim", auth=("", "shared")).status_code == 403
    assert web.post(f"{url}/claim", auth=("dr_c", "shared")).json()["reader"] == "dr_c"
    # With readers configured the shared token still opens the pages, but acting needs a reader's own token.
    with_readers = node.client(token="shared", readers=READERS)
    assert with_readers.get("/api/worklist", auth=("dr_a", "shared")).status_code == 200
    assert with_readers.post(f"{url}/unclaim", auth=("dr_c", "shared")).status_code == 403
    assert node.audit(web, auth=("dr_c", "shared")) == [("claim", "dr_c")]


def test_without_authentication_the_audit_says_so(node: Node) -> None:
    web = node.client()
    url = f"/api/studies/{node.study}"
    assert web.get("/api/me").json() == {"reader": "", "authenticated": False}
    assert web.post(f"{url}/claim").status_code == 422  # a name is needed
    assert web.post(f"{url}/claim", json={"reader": "x" * 49}).status_code == 422  # longer than readings.reader
    assert web.post(f"{url}/claim", json={"reader": "dr_x"}).json()["reader"] == "unauthenticated:dr_x"
    assert node.audit(web) == [("claim", "unauthenticated:dr_x")]
    assert web.get("/api/audit", params={"study": "x' OR 1=1"}).status_code == 400
    assert len(web.get("/api/audit", params={"limit": 1}).json()) == 1


def test_configuration_changes_are_served_by_key_without_their_hashes(node: Node) -> None:
    from cxrtriage.config import Settings
    from cxrtriage.config_audit import record_config_change

    changed = record_config_change(node.db, Settings.model_validate({"web": {"token": "weak"}}))
    assert "web.token" in changed
    rows = [r for r in node.client().get("/api/audit").json() if r["action"] == "config_changed"]
    assert len(rows) == 1 and rows[0]["detail"] == {"changed": changed}  # no salt, no per-key hashes


@pytest.mark.parametrize("show", [True, False])
def test_patient_identity_shown_or_left_out(node: Node, show: bool) -> None:
    web = node.client(show_patient_identity=show)
    row = web.get("/api/worklist").json()[0]
    study = web.get(f"/api/studies/{node.study}").json()
    expected = ("DOE^Jane", "PID-7") if show else ("", "")
    assert (row["patient_name"], row["patient_id"]) == expected
    assert (study["patient_name"], study["patient_id"]) == expected
    claimed = web.post(f"/api/studies/{node.study}/claim", json={"reader": "dr_x"}).json()
    assert (claimed["patient_name"], claimed["patient_id"]) == expected


def test_the_plain_radiograph(node: Node) -> None:
    web = node.client()
    response = web.get(f"/api/images/{node.sop}/image.png")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    image = cv2.imdecode(np.frombuffer(response.content, np.uint8), cv2.IMREAD_UNCHANGED)
    assert image.ndim == 2 and image.shape == (448, 416) and image.std() > 10  # a picture, not a blank
    assert plain_path(node.archive, node.sop).read_bytes() == response.content  # cached beside the overlays
    assert web.get(f"/api/images/{node.sop}/image.png").content == response.content
    assert web.get("/api/images/1.2.3.4.5/image.png").status_code == 404
    assert web.get(f"/api/images/{node.study}/image.png").status_code == 404  # a UID, but of no image
    assert web.get("/api/images/..%2Fetc/image.png").status_code in (400, 404)
    assert web.get("/api/images/not-a-uid/image.png").status_code == 400


def test_docs_are_served_by_the_node_without_a_cdn(node: Node) -> None:
    web = node.client()
    for page in ("/docs", "/redoc"):
        response = web.get(page)
        assert response.status_code == 200
        hosts = re.findall(r"https?://([^/\"' ]+)", response.text)
        assert hosts == [], (page, hosts)
        assets = re.findall(r"(?:src|href)=[\"']?(/[^\"' >]+)", response.text) + re.findall(r"url: ?'(/[^']+)'",
                                                                                            response.text)
        assert any(a.endswith(".js") for a in assets), page
        for asset in assets:
            assert web.get(asset).status_code == 200, asset
        csp = response.headers["content-security-policy"]
        assert "http" not in csp and "script-src 'self';" in csp  # no CDN, no inline script
        scripts = re.findall(r"<script([^>]*)>(.*?)</script>", response.text, re.S)
        assert scripts and all("src=" in attrs and not body.strip() for attrs, body in scripts), page


def _typed(schema: dict[str, Any]) -> bool:
    if "$ref" in schema:
        return True
    if schema.get("type") == "array":
        return "$ref" in schema.get("items", {}) or "type" in schema.get("items", {})
    return False


def test_every_route_has_a_typed_200_response(node: Node) -> None:
    spec = node.client().get("/openapi.json").json()
    untyped = []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            content = operation["responses"]["200"]["content"]
            if path.startswith("/api/") and not path.endswith(".png"):
                if not _typed(content["application/json"]["schema"]):
                    untyped.append(f"{method} {path}")
            else:
                assert set(content) & {"text/html", "image/png", "text/plain"}, (path, content)
    assert untyped == []
    assert {"Readiness", "AuditEntry", "StudyDetail", "WorklistRow", "DestinationState", "Identity"} <= set(
        spec["components"]["schemas"])
    assert "503" in spec["paths"]["/api/health"]["get"]["responses"]
