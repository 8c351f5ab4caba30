"""HTTP routes for DP model evaluation (the core they call is `gateway.evaluation`).

POST /v1/evaluate              per slice value and model: a DP confusion matrix (gold × predicted) and accuracy,
                               precision, recall, F1 with intervals; charged, audited and cached like queries
GET  /v1/evaluate/{id}/card    the DP model card of one of your evaluations (HTML, or ?format=markdown)
GET  /v1/models                the models whose predictions are attached, per dataset you may evaluate on
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any, Literal

import jinja2
from fastapi import APIRouter
from fastapi.responses import HTMLResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field

from gateway.card import card, markdown
from gateway.evaluation import evaluate, models_listing, released_evaluation
from gateway.http.dependencies import ERRORS, REQUEST_CONFIG, Core, Ctx, Number


class EvaluateRequest(BaseModel):
    model_config = REQUEST_CONFIG
    dataset: str
    model: str | None = Field(default=None, description="one model whose predictions are attached")
    models: list[str] | None = Field(default=None, description="several models, compared in one release")
    slices: list[str] = Field(
        default_factory=list,
        description="column names or row expressions (validated like GROUP BY keys; each needs a public set of "
        "values, e.g. sex or CASE WHEN age >= 65 THEN 'senior' ELSE 'adult' END); none: all rows",
    )
    metrics: list[str] | None = Field(
        default=None, description="any of accuracy, precision, recall, f1 (default: all four)"
    )
    per_class: bool = Field(default=True, description="precision, recall and F1 per class as well as macro-averaged")
    epsilon: Number | None = Field(default=None, description="privacy loss of the one release (0.001 to 1000)")
    accuracy: Number | None = Field(
        default=None, description="instead of epsilon: the half-width of each count's interval at alpha"
    )
    alpha: Number | None = Field(default=None, description="1 - confidence level (default 0.05)")
    dry_run: bool = Field(default=False, description="report cost and half-widths without spending")


router = APIRouter(tags=["evaluation"], responses=ERRORS)


@router.post("/v1/evaluate", summary="DP confusion matrices and metrics of models' predictions, per slice")
def post_evaluate(body: EvaluateRequest, ctx: Ctx, bastion: Core) -> dict[str, Any]:
    return evaluate(bastion, ctx, body.model_dump(exclude_none=True))


@router.get("/v1/models", summary="Models whose predictions are attached, per dataset you may evaluate on")
def get_models(ctx: Ctx, bastion: Core) -> list[dict[str, Any]]:
    return models_listing(bastion, ctx)


_templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=jinja2.select_autoescape(["html", "svg"]),
    trim_blocks=True,
    lstrip_blocks=True,
)


@router.get(
    "/v1/evaluate/{evaluation_id}/card",
    summary="The DP model card of one of your evaluations (HTML, or Markdown with format=markdown)",
    response_class=HTMLResponse,
    responses={200: {"content": {"text/html": {}, "text/markdown": {}}}},
)
def get_card(evaluation_id: str, ctx: Ctx, bastion: Core, format: Literal["html", "markdown"] = "html") -> Response:
    answer = released_evaluation(bastion, ctx, evaluation_id, format)
    if format == "markdown":
        return PlainTextResponse(markdown(answer), media_type="text/markdown; charset=utf-8")
    nonce = secrets.token_urlsafe(16)
    html = _templates.get_template("model_card.html").render(nonce=nonce, card=card(answer))
    return HTMLResponse(
        html,
        headers={
            "Content-Security-Policy": f"default-src 'none'; style-src 'nonce-{nonce}'; frame-ancestors 'none'; "
            "base-uri 'none'; form-action 'none'"
        },
    )
