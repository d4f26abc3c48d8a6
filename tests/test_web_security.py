"""The worklist web server: token on every route but /api/health, Host allow-list, security headers.

The app runs in-process (Starlette's TestClient speaks ASGI to it); one test
drives the real ``cxrtriage serve`` over a socket with forged Host headers.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cxrtriage.storage.archive import Archive
from cxrtriage.storage.db import Database
from cxrtriage.triage.web import create_app, host_allowed, host_name
from cxrtriage.triage.worklist import Worklist

from .harness import NodeProcess

TOKEN = "s3cret-token"
#: Every route the app serves, documentation and static files included.
PROTECTED = ["/", "/docs", "/redoc", "/openapi.json", "/static/common.js", "/static/worklist.js", "/static/style.css",
             "/metrics", "/api/worklist", "/api/studies/1.2.3", "/studies/1.2.3", "/api/images/1.2.3/overlay.png",
             "/api/images/1.2.3/image.png", "/api/audit", "/api/me", "/api/destinations", "/static-docs/swagger-ui.css",
             "/no-such-page"]
READERS = {"dr_a": "token-of-a"}


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'web.db'}")
    database.migrate()
    yield database
    database.dispose()


def client(db: Database, tmp_path: Path, host: str = "127.0.0.1:8080", **kwargs: object) -> TestClient:
    app = create_app(Worklist(db), Archive(tmp_path / "archive"), **kwargs)  # type: ignore[arg-type]
    return TestClient(app, base_url=f"http://{host}")


@pytest.mark.parametrize("path", PROTECTED)
def test_every_route_but_health_needs_the_token(db: Database, tmp_path: Path, path: str) -> None:
    web = client(db, tmp_path, token=TOKEN)
    refused = web.get(path)
    assert refused.status_code == 401, path
    assert refused.headers["www-authenticate"].startswith("Basic")
    assert web.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    allowed = web.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert allowed.status_code != 401, path
    assert web.get(path, auth=("reader", TOKEN)).status_code == allowed.status_code  # HTTP Basic, token as password
    assert web.get("/api/health").status_code == 200 and web.get("/api/health/live").status_code == 200


@pytest.mark.parametrize("path", PROTECTED)
def test_a_readers_own_token_opens_every_route(db: Database, tmp_path: Path, path: str) -> None:
    web = client(db, tmp_path, token=TOKEN, readers=READERS)
    expected = web.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code
    assert expected != 401
    assert web.get(path, auth=("dr_a", "token-of-a")).status_code == expected
    assert web.get(path, headers={"Authorization": "Bearer token-of-a"}).status_code == expected
    assert web.get(path, auth=("dr_b", "token-of-a")).status_code == 401  # the token is dr_a's, not dr_b's
    assert web.get(path, auth=("dr_a", "token-of-")).status_code == 401


def test_docs_and_openapi_open_without_a_token(db: Database, tmp_path: Path) -> None:
    web = client(db, tmp_path)
    assert web.get("/openapi.json").status_code == 200
    assert web.get("/docs").status_code == 200 and web.get("/static/worklist.js").status_code == 200


@pytest.mark.parametrize("host", ["127.0.0.1:8080", "127.0.0.1", "localhost:8080", "LOCALHOST", "[::1]:8080",
                                  "[::1]", "localhost."])
def test_loopback_hosts_are_allowed_by_default(db: Database, tmp_path: Path, host: str) -> None:
    response = client(db, tmp_path).get("/api/worklist", headers={"Host": host})
    assert response.status_code == 200, (host, response.text)


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "127.0.0.1.evil.example", "[::2]:8080", ""])
def test_other_hosts_are_refused(db: Database, tmp_path: Path, host: str) -> None:
    """DNS rebinding: a page from evil.example resolved to 127.0.0.1 must not read the worklist."""
    for path in ("/", "/api/worklist", "/docs", "/static/common.js"):
        response = client(db, tmp_path).get(path, headers={"Host": host})
        assert response.status_code == 400, (host, path)
        assert "web.allowed_hosts" in response.json()["detail"]
        assert response.headers["x-frame-options"] == "DENY"  # refusals carry the security headers too


def test_health_answers_any_host(db: Database, tmp_path: Path) -> None:
    for probe in ("/api/health", "/api/health/live"):
        assert client(db, tmp_path).get(probe, headers={"Host": "pod-10-0-0-7"}).status_code == 200


def test_configured_names_and_the_wildcard(db: Database, tmp_path: Path) -> None:
    named = client(db, tmp_path, allowed_hosts=["triage.hospital.example"])
    assert named.get("/api/worklist", headers={"Host": "triage.hospital.example:8443"}).status_code == 200
    assert named.get("/api/worklist", headers={"Host": "127.0.0.1"}).status_code == 400  # only what is listed
    anyone = client(db, tmp_path, allowed_hosts=["*"])
    assert anyone.get("/api/worklist", headers={"Host": "whatever.example"}).status_code == 200


def test_host_parsing() -> None:
    assert host_name("127.0.0.1:8080") == "127.0.0.1"
    assert host_name("[::1]:8080") == "::1" and host_name("[::1]") == "::1"
    assert host_name("Example.ORG.") == "example.org"
    assert host_allowed("[::1]:1", ["::1"]) and host_allowed("[::1]:1", ["[::1]"])
    assert not host_allowed(None, ["localhost"]) and not host_allowed("[::1", ["::1"])


@pytest.mark.parametrize("path", ["/", "/api/worklist", "/api/health", "/static/style.css", "/openapi.json",
                                  "/no-such-page"])
def test_security_headers_on_every_response(db: Database, tmp_path: Path, path: str) -> None:
    response = client(db, tmp_path).get(path)
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "script-src 'self';" in csp and "unsafe-inline" not in csp  # the pages' scripts are files


def test_pages_have_no_inline_script(db: Database, tmp_path: Path) -> None:
    """The CSP allows only scripts from the node: every script of the pages must be a file it serves."""
    import re

    web = client(db, tmp_path)
    for page in ("/", "/static/study.html", "/docs"):
        html = web.get(page).text
        scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S)
        assert scripts and all('src="/static' in attrs and not body.strip() for attrs, body in scripts), page
        assert not re.search(r"\son[a-z]+=", html) and "style=" not in html  # no inline handlers or styles
        for src in re.findall(r'src="(/static[^"]+)"', html):
            assert web.get(src).status_code == 200


def _get(port: int, path: str, host: str, token: str | None = None) -> tuple[int, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest("GET", path, skip_host=True)
        conn.putheader("Host", host)
        if token:
            conn.putheader("Authorization", f"Bearer {token}")
        conn.endheaders()
        response = conn.getresponse()
        response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


def test_the_served_node_checks_host_and_token(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", f"sqlite:///{tmp_path / 'node.db'}", web={"token": TOKEN}).start()
    try:
        port = int(node.web_url().rsplit(":", 1)[1])
        assert _get(port, "/docs", f"127.0.0.1:{port}")[0] == 401
        assert _get(port, "/openapi.json", f"127.0.0.1:{port}")[0] == 401
        assert _get(port, "/static/common.js", f"127.0.0.1:{port}")[0] == 401
        status, headers = _get(port, "/api/worklist", f"127.0.0.1:{port}", TOKEN)
        assert status == 200 and headers["x-content-type-options"] == "nosniff"
        assert _get(port, "/api/worklist", f"rebound.example:{port}", TOKEN)[0] == 400
        assert _get(port, "/api/health", f"127.0.0.1:{port}")[0] == 200
    finally:
        node.stop()
