"""The worklist over HTTP: a REST API (OpenAPI at /docs) and a server-rendered page.

The page is plain HTML with a little JavaScript that polls the API every two
seconds, so new studies and re-ranking appear without a reload. URLs carry
Study Instance UIDs, never patient names. When ``web.token`` is set, every
request needs ``Authorization: Bearer <token>`` or HTTP Basic auth with the
token as password (what a browser prompts for).
"""

from __future__ import annotations

import base64
import hmac
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, TypeAdapter

from ..storage.archive import Archive, is_valid_uid
from .worklist import StudyDetail, StudyNotFound, Worklist, WorklistRow

PAGE = Path(__file__).parent / "static"
#: Serialises the worklist in one call (pydantic-core), without re-validating each row.
ROWS = TypeAdapter(list[WorklistRow])


class ReaderAction(BaseModel):
    reader: str


def _authorised(request: Request, token: str | None) -> None:
    if not token:
        return
    header = request.headers.get("authorization", "")
    given = ""
    if header.lower().startswith("bearer "):
        given = header[7:].strip()
    elif header.lower().startswith("basic "):
        try:
            given = base64.b64decode(header[6:]).decode().split(":", 1)[1]
        except (ValueError, IndexError):
            given = ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise HTTPException(401, "authentication required", headers={"WWW-Authenticate": 'Basic realm="cxrtriage"'})


def create_app(worklist: Worklist, archive: Archive, *, token: str | None = None, metrics: Any = None) -> FastAPI:
    app = FastAPI(title="cxrtriage worklist", version="1", description="Chest X-ray studies in reading order.")
    app.mount("/static", StaticFiles(directory=PAGE), name="static")

    @app.exception_handler(StudyNotFound)
    def no_such_study(_request: Request, _exc: StudyNotFound) -> JSONResponse:
        # Only "no such study" becomes a 404; any other lookup error stays a server error.
        return JSONResponse({"detail": "no such study"}, status_code=404)

    def auth(request: Request) -> None:
        _authorised(request, token)

    @app.get("/api/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/worklist", dependencies=[Depends(auth)], response_model=list[WorklistRow])
    def get_worklist(
        band: str | None = Query(None, description="critical, high, moderate, low, unscored, ai_failed"),
        modality: str | None = None,
        unread_only: bool = False,
        limit: int | None = Query(None, ge=1, description="only the first N in reading order (default: all)"),
    ) -> Response:
        rows = [e.row() for e in worklist.entries(band=band, modality=modality, unread_only=unread_only, limit=limit)]
        return Response(ROWS.dump_json(rows), media_type="application/json")

    @app.get("/api/studies/{uid}", dependencies=[Depends(auth)])
    def get_study(uid: str) -> StudyDetail:
        return worklist.study(uid)

    def transition(uid: str, action: ReaderAction, method: Callable[[str, str], bool]) -> StudyDetail:
        if not method(uid, action.reader):  # StudyNotFound -> 404 (handler above)
            raise HTTPException(409, "the study is claimed by another reader or already read")
        return worklist.study(uid)

    @app.post("/api/studies/{uid}/claim", dependencies=[Depends(auth)])
    def claim(uid: str, action: ReaderAction) -> StudyDetail:
        return transition(uid, action, worklist.claim)

    @app.post("/api/studies/{uid}/unclaim", dependencies=[Depends(auth)])
    def unclaim(uid: str, action: ReaderAction) -> StudyDetail:
        return transition(uid, action, worklist.unclaim)

    @app.post("/api/studies/{uid}/read", dependencies=[Depends(auth)])
    def read(uid: str, action: ReaderAction) -> StudyDetail:
        return transition(uid, action, worklist.mark_read)

    @app.get("/api/images/{sop_uid}/overlay.png", dependencies=[Depends(auth)])
    def overlay(sop_uid: str) -> FileResponse:
        if not is_valid_uid(sop_uid):
            raise HTTPException(400, "not a UID")
        path = archive.overlay_path(sop_uid)
        if not path.is_file():
            raise HTTPException(404, "no overlay for this image")
        return FileResponse(path, media_type="image/png")

    @app.get("/metrics", dependencies=[Depends(auth)])
    def prometheus() -> PlainTextResponse:
        from prometheus_client import generate_latest

        return PlainTextResponse(generate_latest(metrics.registry) if metrics else b"", media_type="text/plain")

    @app.get("/", response_class=HTMLResponse, dependencies=[Depends(auth)])
    def page() -> str:
        return (PAGE / "worklist.html").read_text()

    @app.get("/studies/{uid}", response_class=HTMLResponse, dependencies=[Depends(auth)])
    def study_page(uid: str) -> str:
        if not worklist.exists(uid):
            raise StudyNotFound(uid)  # -> 404
        return (PAGE / "study.html").read_text()

    return app
