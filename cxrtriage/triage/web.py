"""The worklist over HTTP: a REST API (OpenAPI at /docs) and a server-rendered page.

The page is plain HTML with a little JavaScript that polls the API every two
seconds, so new studies and re-ranking appear without a reload. URLs carry
Study Instance UIDs, never patient names.

One ASGI middleware (:class:`Guard`) stands in front of every route:

* Host allow-list (``web.allowed_hosts``): a request whose Host header names
  another host gets 400. A page served under a name the attacker controls
  (DNS rebinding) could otherwise read the worklist from the reader's browser.
* When ``web.token`` is set, every request but ``/api/health`` (the
  documentation, the OpenAPI schema, static files and /metrics included)
  needs ``Authorization: Bearer <token>`` or HTTP Basic auth with the token as
  password (what a browser prompts for).
* Security headers on every response: a Content-Security-Policy that allows
  only the node's own scripts, styles, images and API (the pages have no
  inline script), X-Frame-Options DENY, X-Content-Type-Options nosniff,
  Referrer-Policy no-referrer, and Cache-Control no-store on everything
  but static files (the API carries accession numbers).
"""

from __future__ import annotations

import base64
import hmac
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, TypeAdapter
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import WebSettings
from ..storage.archive import Archive, is_valid_uid
from .worklist import StudyDetail, StudyNotFound, Worklist, WorklistRow

PAGE = Path(__file__).parent / "static"
#: Serialises the worklist in one call (pydantic-core), without re-validating each row.
ROWS = TypeAdapter(list[WorklistRow])


class ReaderAction(BaseModel):
    reader: str


#: Routes open without the token and under any Host name: a load balancer's liveness probe.
OPEN_PATHS = frozenset({"/api/health"})
#: The pages load only the node's own files and talk only to its own API.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
            "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
#: FastAPI's /docs and /redoc pages load Swagger UI / ReDoc from a CDN and start them with an inline script.
DOCS_CSP = ("default-src 'none'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
            "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com; "
            "font-src https://fonts.gstatic.com; "
            "img-src 'self' data: https://fastapi.tiangolo.com https://cdn.redoc.ly; "
            "connect-src 'self'; worker-src blob:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc"})
SECURITY_HEADERS = {
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def host_name(header: str | None) -> str:
    """The host name of a Host header, without port, brackets or a trailing dot, in lower case.

    ``127.0.0.1:8080`` -> ``127.0.0.1``; ``[::1]:8080`` -> ``::1``; ``Example.org.`` -> ``example.org``.
    """
    text = (header or "").strip().lower()
    if text.startswith("["):  # an IPv6 literal (RFC 3986 3.2.2), maybe followed by :port
        return text[1:text.find("]")] if "]" in text else ""
    if text.count(":") == 1:
        text = text.split(":", 1)[0]
    return text.rstrip(".")


def host_allowed(header: str | None, allowed: Iterable[str]) -> bool:
    """Whether the Host header names one of ``allowed`` (``"*"`` allows any)."""
    names = {name.strip().strip("[]").lower().rstrip(".") for name in allowed}
    if "*" in names:
        return True
    name = host_name(header)
    return bool(name) and name in names


def token_given(headers: Headers) -> str:
    """The token a request carries: Bearer, or the password of HTTP Basic auth; empty when none."""
    header = headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    if header.lower().startswith("basic "):
        try:
            return base64.b64decode(header[6:], validate=True).decode().split(":", 1)[1]
        except (ValueError, IndexError):  # binascii.Error and UnicodeDecodeError are ValueErrors
            return ""
    return ""


def _authorised(headers: Headers, token: str | None) -> bool:
    if not token:
        return True
    return hmac.compare_digest(token_given(headers).encode(), token.encode())


class Guard:
    """Host allow-list, token and security headers in front of the whole app (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, token: str | None, allowed_hosts: Iterable[str]) -> None:
        self.app = app
        self.token = token
        self.allowed_hosts = list(allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        csp = DOCS_CSP if path in DOCS_PATHS else PAGE_CSP

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["content-security-policy"] = csp
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
                if not path.startswith("/static/"):
                    headers["cache-control"] = "no-store"
            await send(message)

        headers = Headers(scope=scope)
        refusal: Response | None = None
        if path in OPEN_PATHS:
            pass
        elif not host_allowed(headers.get("host"), self.allowed_hosts):
            refusal = JSONResponse({"detail": "Host header not allowed: add this host name to web.allowed_hosts"},
                                   status_code=400)
        elif not _authorised(headers, self.token):
            refusal = JSONResponse({"detail": "authentication required"}, status_code=401,
                                   headers={"WWW-Authenticate": 'Basic realm="cxrtriage"'})
        if refusal is not None:
            await refusal(scope, receive, send_secured)
            return
        await self.app(scope, receive, send_secured)


class DestinationState(BaseModel):
    """One destination's send circuit (stages/circuit.py): is the node sending to it, or backing off?"""

    destination: str
    state: str = Field(description="closed (sending), open (backing off after failures) or half_open (one trial)")
    consecutive_failures: int
    opened_at: str | None = Field(None, description="when the circuit last opened, ISO 8601 UTC")
    retry_in_seconds: float = Field(description="until the next trial send; 0 unless open")


def create_app(worklist: Worklist, archive: Archive, *, token: str | None = None, metrics: Any = None,
               allowed_hosts: Iterable[str] | None = None,
               destinations: Callable[[], list[dict[str, object]]] | None = None) -> FastAPI:
    """The worklist app; ``allowed_hosts`` defaults to ``web.allowed_hosts``'s default (the loopback names);
    ``destinations`` gives each destination's send circuit (the node's ``circuits.states``)."""
    app = FastAPI(title="cxrtriage worklist", version="1", description="Chest X-ray studies in reading order.")
    hosts = list(allowed_hosts) if allowed_hosts is not None else WebSettings().allowed_hosts
    app.add_middleware(Guard, token=token, allowed_hosts=hosts)
    app.mount("/static", StaticFiles(directory=PAGE), name="static")

    @app.exception_handler(StudyNotFound)
    def no_such_study(_request: Request, _exc: StudyNotFound) -> JSONResponse:
        # Only "no such study" becomes a 404; any other lookup error stays a server error.
        return JSONResponse({"detail": "no such study"}, status_code=404)

    @app.get("/api/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/destinations")
    def get_destinations() -> list[DestinationState]:
        return [DestinationState.model_validate(d) for d in (destinations() if destinations else [])]

    @app.get("/api/worklist", response_model=list[WorklistRow])
    def get_worklist(
        band: str | None = Query(None, description="critical, high, moderate, low, unscored, ai_failed"),
        modality: str | None = None,
        unread_only: bool = False,
        limit: int | None = Query(None, ge=1, description="only the first N in reading order (default: all)"),
    ) -> Response:
        rows = [e.row() for e in worklist.entries(band=band, modality=modality, unread_only=unread_only, limit=limit)]
        return Response(ROWS.dump_json(rows), media_type="application/json")

    @app.get("/api/studies/{uid}")
    def get_study(uid: str) -> StudyDetail:
        return worklist.study(uid)

    def transition(uid: str, action: ReaderAction, method: Callable[[str, str], bool]) -> StudyDetail:
        if not method(uid, action.reader):  # StudyNotFound -> 404 (handler above)
            raise HTTPException(409, "the study is claimed by another reader or already read")
        return worklist.study(uid)

    @app.post("/api/studies/{uid}/claim")
    def claim(uid: str, action: ReaderAction) -> StudyDetail:
        return transition(uid, action, worklist.claim)

    @app.post("/api/studies/{uid}/unclaim")
    def unclaim(uid: str, action: ReaderAction) -> StudyDetail:
        return transition(uid, action, worklist.unclaim)

    @app.post("/api/studies/{uid}/read")
    def read(uid: str, action: ReaderAction) -> StudyDetail:
        return transition(uid, action, worklist.mark_read)

    @app.get("/api/images/{sop_uid}/overlay.png")
    def overlay(sop_uid: str) -> FileResponse:
        if not is_valid_uid(sop_uid):
            raise HTTPException(400, "not a UID")
        path = archive.overlay_path(sop_uid)
        if not path.is_file():
            raise HTTPException(404, "no overlay for this image")
        return FileResponse(path, media_type="image/png")

    @app.get("/metrics")
    def prometheus() -> PlainTextResponse:
        from prometheus_client import generate_latest

        return PlainTextResponse(generate_latest(metrics.registry) if metrics else b"", media_type="text/plain")

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return (PAGE / "worklist.html").read_text()

    @app.get("/studies/{uid}", response_class=HTMLResponse)
    def study_page(uid: str) -> str:
        if not worklist.exists(uid):
            raise StudyNotFound(uid)  # -> 404
        return (PAGE / "study.html").read_text()

    return app
