"""The worklist over HTTP: a REST API (OpenAPI at /docs) and a server-rendered page.

The page is plain HTML with a little JavaScript that polls the API every two
seconds, so new studies and re-ranking appear without a reload. URLs carry
Study Instance UIDs, never patient names.

One ASGI middleware (:class:`Guard`) stands in front of every route:

* Host allow-list (``web.allowed_hosts``): a request whose Host header names
  another host gets 400. A page served under a name the attacker controls
  (DNS rebinding) could otherwise read the worklist from the reader's browser.
* When ``web.token`` or ``web.readers`` is set, every request but the two
  health probes (the documentation, the OpenAPI schema, static files and
  /metrics included) needs credentials: ``Authorization: Bearer <token>`` or
  HTTP Basic auth (what a browser prompts for), see :func:`authenticate`.
* Security headers on every response: a Content-Security-Policy that allows
  only the node's own scripts, styles, images and API (the pages have no
  inline script), X-Frame-Options DENY, X-Content-Type-Options nosniff,
  Referrer-Policy no-referrer, and Cache-Control no-store on everything
  but static files (the API carries accession numbers).

Who claims, unclaims and reads a study is the authenticated identity, never
free text: the audit trail (``audit_events``) names it. The request body's
``reader`` may be left out; when given it must be that identity (403
otherwise). Only with no authentication configured (the loopback default)
does the body name the reader, recorded as ``unauthenticated:<name>``.
"""

from __future__ import annotations

import base64
import hmac
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import fastapi_offline
from fastapi import Body, FastAPI, HTTPException, Query, Request
from fastapi.openapi.docs import get_redoc_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, TypeAdapter
from sqlalchemy import select
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import WebSettings
from ..inference.radiograph import RadiographError
from ..storage.archive import Archive, is_valid_uid
from ..storage.models import AuditEvent
from .health import Liveness, Readiness
from .nodes import NodeState, node_states
from .preview import NoOverlay, overlay_image, plain_image
from .worklist import StudyDetail, StudyNotFound, Worklist, WorklistRow

PAGE = Path(__file__).parent / "static"
#: Serialises the worklist in one call (pydantic-core), without re-validating each row.
ROWS = TypeAdapter(list[WorklistRow])


class ReaderAction(BaseModel):
    reader: str = Field("", description="optional: must be the authenticated reader when given; names the reader "
                        "only when the node has no authentication configured")


class Identity(BaseModel):
    """Who the node takes the request to come from (``GET /api/me``)."""

    reader: str = Field(description="the authenticated reader; empty when the credentials name none")
    authenticated: bool = Field(description="false when the node has no authentication configured")


class AuditEntry(BaseModel):
    """One row of the audit trail: who did what to which study, when (no patient data)."""

    at: str = Field(description="ISO 8601 UTC")
    actor: str = Field(description="a reader of web.readers, the HTTP Basic user, unauthenticated:<name>, "
                       "cli:<os user> or node:<name>")
    action: str = Field(description="claim, unclaim, read, resend or config_changed")
    study_instance_uid: str
    detail: dict[str, Any]


#: Routes open without the token and under any Host name: load balancers' readiness and liveness probes.
OPEN_PATHS = frozenset({"/api/health", "/api/health/live"})
#: The pages load only the node's own files and talk only to its own API.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
            "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
#: /docs and /redoc load Swagger UI / ReDoc from the node (the files fastapi-offline bundles: no CDN) and start
#: them from files too; only styles may be inline (ReDoc writes a <style> block, both set styles from script).
DOCS_CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "font-src 'self'; connect-src 'self'; worker-src blob:; base-uri 'none'; form-action 'self'; "
            "frame-ancestors 'none'")
DOCS_PATHS = frozenset({"/docs", "/redoc"})
#: Where the bundled Swagger UI / ReDoc files are served (cached like the pages' static files).
DOCS_STATIC = "/static-docs"
DOCS_ASSETS = Path(fastapi_offline.__file__).parent / "static"
#: The longest identity recorded (``readings.reader``).
READER_MAX = 64
#: The request scope key under which :class:`Guard` leaves the :class:`Caller`.
CALLER = "cxrtriage.caller"
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


def credentials(headers: Headers) -> tuple[str | None, str]:
    """(HTTP Basic user, secret): Bearer gives (None, token), Basic (user, password); (None, "") when none."""
    header = headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return None, header[7:].strip()
    if header.lower().startswith("basic "):
        try:
            user, password = base64.b64decode(header[6:], validate=True).decode().split(":", 1)
        except ValueError:  # binascii.Error, UnicodeDecodeError and a missing colon are ValueErrors
            return None, ""
        return user, password
    return None, ""


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())  # constant time


@dataclass(frozen=True)
class Caller:
    """The outcome of authentication: ``reader`` is the identity reader actions are recorded under."""

    reader: str
    authenticated: bool


def authenticate(headers: Headers, token: str | None, readers: Mapping[str, str]) -> Caller | None:
    """Who sent the request; None when credentials are needed and these are wrong (401).

    * No ``token`` and no ``readers``: anyone, unauthenticated.
    * A reader of ``readers``: HTTP Basic with the reader's name and token, or ``Bearer <that reader's token>``.
    * The shared ``token`` (Bearer, or HTTP Basic password): access; the identity is the Basic user name only
      when no ``readers`` are configured (with readers, each must use their own token to act).

    Every configured secret is compared, in constant time, so the time taken does not say which one nearly matched.
    """
    if not token and not readers:
        return Caller("", authenticated=False)
    user, secret = credentials(headers)
    if not secret:
        return None
    found: Caller | None = None
    for name, reader_token in readers.items():
        if _same(secret, reader_token) and (user is None or _same(user, name)) and found is None:
            found = Caller(name, authenticated=True)
    shared = bool(token) and _same(secret, token or "")
    if found is None and shared:
        found = Caller((user or "").strip() if not readers else "", authenticated=True)
    return found


class Guard:
    """Host allow-list, token and security headers in front of the whole app (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, token: str | None, allowed_hosts: Iterable[str],
                 readers: Mapping[str, str] | None = None) -> None:
        self.app = app
        self.token = token
        self.readers = dict(readers or {})
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
                if not path.startswith(("/static/", DOCS_STATIC + "/")):
                    headers["cache-control"] = "no-store"
            await send(message)

        headers = Headers(scope=scope)
        refusal: Response | None = None
        if path in OPEN_PATHS:
            pass
        elif not host_allowed(headers.get("host"), self.allowed_hosts):
            refusal = JSONResponse({"detail": "Host header not allowed: add this host name to web.allowed_hosts"},
                                   status_code=400)
        elif (caller := authenticate(headers, self.token, self.readers)) is None:
            refusal = JSONResponse({"detail": "authentication required"}, status_code=401,
                                   headers={"WWW-Authenticate": 'Basic realm="cxrtriage"'})
        else:
            scope[CALLER] = caller
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


Row = TypeVar("Row", bound=WorklistRow)


def pn_hidden(row: Row, show_identity: bool) -> Row:
    """``row`` as served: without patient name and ID when ``web.show_patient_identity`` is off."""
    return row if show_identity else row.model_copy(update={"patient_name": "", "patient_id": ""})


#: Bookkeeping in a config_changed event's detail (config_audit.py: salted hashes of each setting, by which the
#: next start sees what changed): not served, so that the API is no way to test guesses of a setting's value.
HIDDEN_DETAIL = frozenset({"salt", "fingerprint"})


def _shown(detail: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in detail.items() if k not in HIDDEN_DETAIL}


def audit_entries(worklist: Worklist, study: str | None, limit: int) -> list[AuditEntry]:
    """The newest ``limit`` audit rows, of one study or of all."""
    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if study:
        query = query.where(AuditEvent.study_instance_uid == study)
    with worklist.db.session() as session:
        return [AuditEntry(at=e.at.isoformat(), actor=e.actor, action=e.action,
                           study_instance_uid=e.study_instance_uid, detail=_shown(json.loads(e.detail or "{}")))
                for e in session.scalars(query)]


def actor(request: Request, action: ReaderAction) -> str:
    """The identity a reader action is recorded under (see the module docstring)."""
    caller: Caller = request.scope.get(CALLER, Caller("", authenticated=False))
    named = action.reader.strip()
    if not caller.authenticated:
        if not named:
            raise HTTPException(422, "give your name as reader")
        identity = f"unauthenticated:{named}"
    elif not caller.reader:
        raise HTTPException(403, "these credentials name no reader: sign in with your own name and token")
    elif named and named != caller.reader:
        raise HTTPException(403, "reader is not the authenticated reader")
    else:
        identity = caller.reader
    if len(identity) > READER_MAX:
        raise HTTPException(422, f"reader names are at most {READER_MAX} characters")
    return identity


def create_app(worklist: Worklist, archive: Archive, *, token: str | None = None, metrics: Any = None,
               allowed_hosts: Iterable[str] | None = None,
               destinations: Callable[[], list[dict[str, object]]] | None = None,
               readers: Mapping[str, str] | None = None, show_patient_identity: bool = True,
               readiness: Callable[[], Readiness] | None = None) -> FastAPI:
    """The worklist app; ``allowed_hosts`` defaults to ``web.allowed_hosts``'s default (the loopback names);
    ``destinations`` gives each destination's send circuit (the node's ``circuits.states``); ``readers`` is
    ``web.readers``; ``readiness`` computes the readiness probe (:func:`cxrtriage.triage.health.readiness`),
    without it ``/api/health`` checks only the database."""
    app = FastAPI(title="cxrtriage worklist", version="1", description="Chest X-ray studies in reading order.",
                  docs_url=None, redoc_url=None, swagger_ui_oauth2_redirect_url=None)
    hosts = list(allowed_hosts) if allowed_hosts is not None else WebSettings().allowed_hosts
    app.add_middleware(Guard, token=token, allowed_hosts=hosts, readers=readers)
    app.mount("/static", StaticFiles(directory=PAGE), name="static")
    app.mount(DOCS_STATIC, StaticFiles(directory=DOCS_ASSETS), name="static-docs")
    if readiness is None:
        from .health import readiness as compute

        def readiness() -> Readiness:
            return compute(worklist.db, archive, 0)

    @app.exception_handler(StudyNotFound)
    def no_such_study(_request: Request, _exc: StudyNotFound) -> JSONResponse:
        # Only "no such study" becomes a 404; any other lookup error stays a server error.
        return JSONResponse({"detail": "no such study"}, status_code=404)

    @app.get("/api/health", response_model=Readiness, responses={503: {"model": Readiness}})
    def health() -> JSONResponse:
        """Readiness: 200 when the node can take studies, 503 with the reasons when not (no patient data)."""
        state = readiness()
        return JSONResponse(state.model_dump(mode="json"), status_code=200 if state.status == "ready" else 503)

    @app.get("/api/health/live")
    def live() -> Liveness:
        """Liveness: 200 while the process serves HTTP."""
        return Liveness()

    @app.get("/api/me")
    def me(request: Request) -> Identity:
        caller: Caller = request.scope.get(CALLER, Caller("", authenticated=False))
        return Identity(reader=caller.reader, authenticated=caller.authenticated)

    @app.get("/api/audit")
    def get_audit(study: str | None = Query(None, description="one study's Study Instance UID"),
                  limit: int = Query(100, ge=1, le=10000)) -> list[AuditEntry]:
        """Who claimed, unclaimed and read which study (newest first): the QA view of the audit trail."""
        if study is not None and not is_valid_uid(study):
            raise HTTPException(400, "not a UID")
        return audit_entries(worklist, study, limit)

    @app.get("/api/destinations")
    def get_destinations() -> list[DestinationState]:
        return [DestinationState.model_validate(d) for d in (destinations() if destinations else [])]

    @app.get("/api/nodes")
    def get_nodes() -> list[NodeState]:
        """The live nodes sharing this database (heartbeats), and which one runs the periodic jobs."""
        return node_states(worklist.db)

    @app.get("/api/worklist", response_model=list[WorklistRow])
    def get_worklist(
        band: str | None = Query(None, description="critical, high, moderate, low, unscored, ai_failed"),
        modality: str | None = None,
        unread_only: bool = False,
        limit: int | None = Query(None, ge=1, description="only the first N in reading order (default: all)"),
    ) -> Response:
        rows = [pn_hidden(e.row(), show_patient_identity)
                for e in worklist.entries(band=band, modality=modality, unread_only=unread_only, limit=limit)]
        return Response(ROWS.dump_json(rows), media_type="application/json")

    def detail(uid: str) -> StudyDetail:
        return pn_hidden(worklist.study(uid), show_patient_identity)

    @app.get("/api/studies/{uid}")
    def get_study(uid: str) -> StudyDetail:
        return detail(uid)

    def transition(uid: str, request: Request, action: ReaderAction, method: Callable[[str, str], bool]) -> StudyDetail:
        if not method(uid, actor(request, action)):  # StudyNotFound -> 404 (handler above)
            raise HTTPException(409, "the study is claimed by another reader or already read")
        return detail(uid)

    no_body = ReaderAction()

    @app.post("/api/studies/{uid}/claim")
    def claim(uid: str, request: Request, action: ReaderAction = Body(no_body)) -> StudyDetail:
        return transition(uid, request, action, worklist.claim)

    @app.post("/api/studies/{uid}/unclaim")
    def unclaim(uid: str, request: Request, action: ReaderAction = Body(no_body)) -> StudyDetail:
        return transition(uid, request, action, worklist.unclaim)

    @app.post("/api/studies/{uid}/read")
    def read(uid: str, request: Request, action: ReaderAction = Body(no_body)) -> StudyDetail:
        return transition(uid, request, action, worklist.mark_read)

    @app.get("/api/images/{sop_uid}/overlay.png", response_class=FileResponse,
             responses={200: {"content": {"image/png": {}}}})
    def overlay(sop_uid: str) -> FileResponse:
        """The overlay of a scored image, drawn on the first request and kept (404: no such image; 409: an
        image without scores, or whose source or SEG has left the archive)."""
        if not is_valid_uid(sop_uid):
            raise HTTPException(400, "not a UID")
        try:
            path = overlay_image(worklist.db, archive, sop_uid)
        except NoOverlay as exc:
            raise HTTPException(exc.status, exc.reason) from None
        except RadiographError:
            raise HTTPException(409, "the source image cannot be shown") from None
        return FileResponse(path, media_type="image/png")

    @app.get("/api/images/{sop_uid}/image.png", response_class=FileResponse,
             responses={200: {"content": {"image/png": {}}}})
    def plain(sop_uid: str) -> FileResponse:
        """The received radiograph without the overlay, downsampled (a preview, not the diagnostic image)."""
        if not is_valid_uid(sop_uid):
            raise HTTPException(400, "not a UID")
        try:
            path = plain_image(worklist.db, archive, sop_uid)
        except RadiographError:
            raise HTTPException(404, "this image cannot be shown") from None
        if path is None:
            raise HTTPException(404, "no such image")
        return FileResponse(path, media_type="image/png")

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        from prometheus_client import generate_latest

        return PlainTextResponse(generate_latest(metrics.registry) if metrics else b"", media_type="text/plain")

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def swagger_ui() -> str:
        return (PAGE / "docs.html").read_text()

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title="cxrtriage API", with_google_fonts=False,
                              redoc_js_url=f"{DOCS_STATIC}/redoc.standalone.js",
                              redoc_favicon_url=f"{DOCS_STATIC}/favicon.png")

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return (PAGE / "worklist.html").read_text()

    @app.get("/studies/{uid}", response_class=HTMLResponse)
    def study_page(uid: str) -> str:
        if not worklist.exists(uid):
            raise StudyNotFound(uid)  # -> 404
        return (PAGE / "study.html").read_text()

    return app
