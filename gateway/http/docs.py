"""The API's own pages: `GET /` (where to go), `/docs` (Swagger UI) and the Swagger UI assets it loads.

Swagger UI is served from the package (`static/swagger-ui`, see its README), so `/docs` works without internet.
The page's one inline script (FastAPI's documented Swagger UI set-up) is allowed by its SHA-256 in the page's
Content-Security-Policy; nothing else runs, and nothing is loaded from another origin.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
ASSETS = "/static/swagger-ui"
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)

router = APIRouter(include_in_schema=False)


def static_files() -> StaticFiles:
    """The packaged static assets, to mount at `/static`."""
    return StaticFiles(directory=STATIC)


def docs_csp(html: str) -> str:
    """A CSP for the Swagger UI page: its scripts and styles from this origin, plus the hashes of its inline
    scripts; the API it calls on this origin only."""
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
        for s in _INLINE_SCRIPT.findall(html)
    )
    return (
        f"default-src 'none'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "connect-src 'self'; font-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    )


@router.get("/docs", response_class=HTMLResponse)
def swagger_ui(request: Request) -> HTMLResponse:
    app = request.app
    page = get_swagger_ui_html(
        openapi_url=app.openapi_url,
        title=f"{app.title} API",
        swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{ASSETS}/favicon-32x32.png",
        swagger_ui_parameters={"persistAuthorization": False, "tryItOutEnabled": False},
    )
    html = bytes(page.body).decode()
    return HTMLResponse(html, headers={"Content-Security-Policy": docs_csp(html), "Cache-Control": "no-store"})


@router.get("/")
def index() -> dict[str, Any]:
    """Where to go: the API's documentation and the auditor's page."""
    return {
        "name": "Bastion",
        "description": "privacy-preserving data exploration gateway",
        "docs": "/docs",
        "openapi": "/openapi.json",
        "audit": "/audit",
        "health": "/healthz",
    }
