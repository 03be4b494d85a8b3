"""The dashboard: one HTML page served by the API (no build step), reading `/cluster` live.

Parts:
- `DASHBOARD_HTML`: `api/static/dashboard.html` (plain HTML, inline CSS and JS). Every second it
  fetches `/cluster` and `/cluster/requests` and draws each device's layer range as a bar along
  the model's layers, the pipelines, live tokens/s (from `tokens_processed` deltas) and KV usage,
  the plan's predicted tokens/s and each usable pipeline's predicted ms per token, the links the
  workers measured (round trip, bandwidth), workers that failed and why, and plots (inline SVG) of tokens/s,
  time to first token and KV use over the last minutes from `/cluster/history` (api/load_history.py).
  With an API key set the page asks for it once (or takes `#key=...`) and keeps it in
  localStorage; the HTML itself is public (see `api.cluster_routes.PUBLIC_PATHS`).
- `dashboard_router()`: `GET /dashboard` (the page).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

DASHBOARD_PATH = Path(__file__).resolve().parent / "static" / "dashboard.html"


def dashboard_html() -> str:
    return DASHBOARD_PATH.read_text(encoding="utf-8")


def dashboard_router() -> APIRouter:
    router = APIRouter(tags=["dashboard"])
    page = dashboard_html()

    @router.get("/dashboard", summary="Live cluster dashboard (HTML)", response_class=HTMLResponse)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    return router
