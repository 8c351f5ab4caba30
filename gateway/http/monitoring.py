"""HTTP route for DP monitoring reports (the core is `gateway.monitoring`).

GET /v1/datasets/{dataset}/versions/{version}/report   a version's monitoring report (JSON, or ?format=html)
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any, Literal

import jinja2
from fastapi import APIRouter
from fastapi.responses import HTMLResponse, JSONResponse, Response

from gateway.http.dependencies import ERRORS, Core, Ctx
from gateway.monitoring import chart, report_for

router = APIRouter(tags=["monitoring"], responses=ERRORS)

_templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=jinja2.select_autoescape(["html", "svg"]),
    trim_blocks=True,
    lstrip_blocks=True,
)


@router.get(
    "/v1/datasets/{dataset}/versions/{version}/report",
    summary="A version's DP monitoring report: missing, clamped and out-of-domain shares, histograms and alerts "
    "(needs the query grant; JSON, or an HTML page with charts with format=html)",
    responses={200: {"content": {"application/json": {}, "text/html": {}}}},
)
def get_report(
    dataset: str, version: str, ctx: Ctx, bastion: Core, format: Literal["json", "html"] = "json"
) -> Response:
    report: dict[str, Any] = report_for(bastion, ctx, dataset, version)
    if format == "json":
        return JSONResponse(report)
    nonce = secrets.token_urlsafe(16)
    charts = [chart(c) for c in report.get("columns", [])]
    html = _templates.get_template("monitoring_report.html").render(nonce=nonce, report=report, charts=charts)
    return HTMLResponse(
        html,
        headers={
            "Content-Security-Policy": f"default-src 'none'; style-src 'nonce-{nonce}'; frame-ancestors 'none'; "
            "base-uri 'none'; form-action 'none'"
        },
    )
