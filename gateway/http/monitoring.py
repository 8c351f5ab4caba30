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
from pydantic import BaseModel, Field

from gateway.http.dependencies import ERRORS, Core, Ctx
from gateway.monitoring import chart, report_for

router = APIRouter(tags=["monitoring"], responses=ERRORS)


class ReportCell(BaseModel):
    kind: str = Field(
        description="missing, below / above (clamped at a bound), outside (the domain), bin, value, present"
    )
    label: str = Field(description="the bound, the bin's range or the domain value")
    count: int = Field(description="the noisy count (discrete Laplace)")
    share: float = Field(description="share of the batch's rows (of: rows) or of its valid values (of: valid)")
    half_width: float = Field(description="half-width of the share's 95% noise interval")
    of: str


class ReportColumn(BaseModel):
    name: str
    type: str
    rows: int
    valid: int
    cells: list[ReportCell]


class ReportAlert(BaseModel):
    column: str
    kind: str = Field(description="drift (the column's histogram), or the flagged cell's kind")
    cell: str
    share: float
    was: float = Field(description="the share in the baseline report")
    message: str


class MonitoringReport(BaseModel):
    report_id: str
    dataset: str
    version: str
    status: str = Field(
        description="ok, or skipped (with reason: the monitoring budget was spent, an engine without monitoring, or "
        "interrupted: charged, nothing released)"
    )
    reason: str | None = None
    time: str
    baseline: str | None = Field(default=None, description="the version whose report the alerts compare with")
    epsilon: float
    sensitivity: int | None = None
    scale: float | None = None
    alpha: float | None = None
    alert_rate: float | None = None
    tests: int | None = None
    columns: list[ReportColumn] = []
    alerts: list[ReportAlert]


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
    responses={200: {"model": MonitoringReport, "content": {"text/html": {}}}},
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
