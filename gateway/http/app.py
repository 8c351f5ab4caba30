"""HTTP layer (FastAPI). Thin: each route parses the request, calls one Bastion method, renders the result."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.http.audit import router as audit_router
from gateway.http.dependencies import ERRORS, REQUEST_ID, Core, Ctx, Number
from gateway.http.lf import router as lf_router
from gateway.http.synth import router as synth_router
from gateway.service import Bastion
from gateway.settings import Settings
from policies.errors import GatewayError, InvalidRequest

log = logging.getLogger("bastion")


class QueryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sql: str = Field(description="one aggregate SELECT over one dataset")
    epsilon: Number | None = Field(
        default=None, description="privacy loss to spend, 0.001 to 1000 (give this or accuracy)"
    )
    accuracy: Number | dict[str, Number] | None = Field(
        default=None,
        description="target half-width of the confidence interval of the first COUNT/SUM output column, or "
        "{column: half-width}; Bastion derives epsilon",
    )
    alpha: Number | None = Field(default=None, description="1 - confidence level, in [1e-9, 1) (default 0.05)")
    delta: Number | None = Field(default=None, description="δ for private key selection, 1e-30 to 0.1")
    dry_run: bool = Field(default=False, description="report cost and accuracy without spending")


class Budget(BaseModel):
    dataset: str
    spent: dict[str, float]
    limit: dict[str, float]
    remaining: dict[str, float]


class QueryResponse(BaseModel):
    model_config = ConfigDict(extra="allow")
    query_id: str
    dataset: str
    columns: list[str]
    rows: list[list[Any]] | None = None
    intervals: list[list[list[float] | None]] | None = Field(
        default=None, description="per cell [low, high] at confidence 1-alpha, null for exact or keys"
    )
    alpha: float
    epsilon: float = Field(description="cost of this query")
    delta: float
    epsilon_spent: float = Field(description="what this request actually spent (0 when cached or dry run)")
    delta_spent: float
    cached: bool
    dry_run: bool
    budget: Budget
    accuracy: dict[str, float | None] | None = None
    measurements: list[dict[str, Any]] = []
    notes: list[str] = []


router = APIRouter(prefix="/v1", responses=ERRORS)


@router.get("/datasets", summary="Datasets you may use, with their public schema (never a count)")
def list_datasets(ctx: Ctx, bastion: Core) -> list[dict[str, Any]]:
    return bastion.datasets(ctx)


@router.post("/query", response_model=QueryResponse, summary="Differentially private answer to one SQL query")
def run_query(body: QueryRequest, ctx: Ctx, bastion: Core) -> Response:
    answer = bastion.query(
        ctx,
        body.sql,
        epsilon=body.epsilon,
        accuracy=body.accuracy,
        alpha=body.alpha,
        delta=body.delta,
        dry_run=body.dry_run,
    )
    # The answer is built by Bastion in the documented shape; encode it directly instead of re-validating it.
    return Response(json.dumps(answer, separators=(",", ":"), allow_nan=False), media_type="application/json")


@router.get("/budget", response_model=list[Budget], summary="Your spend and remaining budget per dataset")
def budget(ctx: Ctx, bastion: Core) -> list[dict[str, Any]]:
    return bastion.budgets(ctx)


class RequestIds:
    """ASGI middleware: every HTTP request gets a fresh request id from the gateway (never the client's), which
    the routes read from the scope and every response carries in `X-Request-Id`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = uuid.uuid4().hex
        scope[REQUEST_ID] = rid
        header = (b"x-request-id", rid.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, header]}
            await send(message)

        await self.app(scope, receive, send_with_id)


def create_app(settings: Settings, bastion: Bastion | None = None) -> FastAPI:
    """App factory: one Settings object in, one app out; no module-level state.

    The ledger is checked against the audit log first (`Bastion.check_consistency`): orphan charges are recorded,
    and a ledger behind the log raises LedgerBehind instead of serving.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        app.state.bastion.close()

    app = FastAPI(
        title="Bastion",
        version="0.1.0",
        description="Privacy-preserving data exploration gateway: differentially private SQL aggregates, "
        "synthetic proxies and labeling-function statistics; every access audited.",
        lifespan=lifespan,
    )
    core = bastion or Bastion(settings)
    try:
        core.check_consistency()
    except BaseException:
        if bastion is None:
            core.close()
        raise
    app.state.bastion = core
    app.add_middleware(RequestIds)

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content=exc.to_dict())

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        # The one error shape, naming the fields and what is wrong (never echoing the values: NaN is not JSON).
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body') or 'body'}: {err.get('msg', 'invalid')}"
            for err in exc.errors()
        )
        error = InvalidRequest(f"invalid request: {problems}")
        return JSONResponse(status_code=error.status, content=error.to_dict())

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Never a message or a traceback in the log or the answer: either could quote a value from the rows.
        log.error("%s %s failed (%s)", request.method, request.url.path, type(exc).__name__)
        error = GatewayError("internal error")
        return JSONResponse(status_code=error.status, content=error.to_dict())

    @app.get("/healthz", include_in_schema=False)
    def health() -> dict[str, str]:
        return {"status": "ok"}

    for r in (router, synth_router, lf_router, audit_router):
        app.include_router(r)

    def openapi() -> dict[str, Any]:
        # Invalid bodies and parameters answer 400 invalid_request in the one error shape, not FastAPI's 422.
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    if isinstance(operation, dict):
                        operation.get("responses", {}).pop("422", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def app_from_environment() -> FastAPI:
    """App factory for multi-worker servers: the workspace comes from BASTION_WORKSPACE (set by `bastion serve`)."""
    return create_app(Settings.load())
