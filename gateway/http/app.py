"""HTTP layer (FastAPI): the app, its middleware and error handlers. Routes live in one module per capability
(query, audit, lf, synth, evaluate, access); each parses the request, calls one Bastion method, renders the result."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from audit.record import Event
from gateway.http.access import router as access_router
from gateway.http.audit import router as audit_router
from gateway.http.dependencies import CONTEXT, REQUEST_ID, caller_if_any, correlation_id, request_id, source_of
from gateway.http.docs import router as docs_router
from gateway.http.docs import static_files
from gateway.http.errors import http_error, validation_error, validation_problems
from gateway.http.evaluate import router as evaluate_router
from gateway.http.headers import SecurityHeaders, security_headers
from gateway.http.lf import router as lf_router
from gateway.http.lfsets import catch_up_quietly
from gateway.http.lfsets import router as lfsets_router
from gateway.http.limits import BodyLimits
from gateway.http.monitoring import router as monitoring_router
from gateway.http.query import router as query_router
from gateway.http.sessions import SessionStore
from gateway.http.synth import jobs_of
from gateway.http.synth import router as synth_router
from gateway.service import Bastion, Context
from gateway.settings import Settings
from policies.errors import GatewayError, InvalidRequest

log = logging.getLogger("bastion")


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
        try:
            jobs_of(app.state, app.state.bastion)  # unfinished synthesis jobs go on without a request
        except GatewayError as exc:  # the job store out of reach: serve, and try again on the first synth request
            log.error("synthesis jobs not resumed at start (%s)", exc.code)
        # LF sets catch up on the versions published while no gateway ran (once per set and version over replicas).
        following = threading.Thread(target=catch_up_quietly, args=(app.state.bastion,), name="bastion-lf-sets")
        following.start()
        yield
        following.join()
        jobs = getattr(app.state, "synth_jobs", None)
        if jobs is not None:
            jobs.close()
        app.state.bastion.close()

    app = FastAPI(
        title="Bastion",
        version="0.1.0",
        description="Privacy-preserving data exploration gateway: differentially private SQL aggregates, "
        "synthetic proxies and labeling-function statistics; every access audited.",
        lifespan=lifespan,
        docs_url=None,  # served by gateway.http.docs from packaged assets, with its own CSP
        redoc_url=None,
    )
    core = bastion or Bastion(settings)
    try:
        core.check_consistency()
    except BaseException:
        if bastion is None:
            core.close()
        raise
    app.state.bastion = core
    app.state.sessions = SessionStore(settings.workspace / "sessions")
    app.add_middleware(BodyLimits, bastion=core, limits=settings.limits)
    app.add_middleware(RequestIds)  # every answer, a refusal of BodyLimits included, carries the id
    app.add_middleware(SecurityHeaders)  # outermost: every answer carries the headers

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content=exc.to_dict())

    def audit_invalid(request: Request, error: GatewayError, problems: list[str]) -> GatewayError:
        """Record an invalid request before its 400: with the caller's identity when its bearer token is valid
        (the body is read before the route's token check, so that check may not have run), else as a refusal
        before authentication, counted with its source. The error to answer (503 if the log cannot be written,
        or the token store cannot be read)."""
        ctx = getattr(request.state, CONTEXT, None)
        if not isinstance(ctx, Context):
            try:
                ctx = caller_if_any(request, core)
            except GatewayError as unavailable:  # the token store (PostgreSQL) cannot be reached
                return unavailable
        try:
            if ctx is not None:
                core.audit(
                    ctx,
                    Event.INVALID_REQUEST,
                    request={"path": request.url.path, "problems": problems},
                    decision="denied",
                    reason=error.code,
                )
            else:
                core.refuse_unauthenticated(
                    error, source_of(request), request.url.path, request_id(request), correlation_id(request)
                )
        except GatewayError as unavailable:  # the log cannot be written
            return unavailable
        return error

    @app.exception_handler(HTTPException)
    async def refused(request: Request, exc: HTTPException) -> JSONResponse:
        # Starlette's own refusals (no such route, wrong method, a body it cannot decode) in the one error shape;
        # a body it cannot decode is an invalid request, audited as such.
        error = http_error(request, exc)
        if isinstance(error, InvalidRequest):
            error = audit_invalid(request, error, [error.message])
        headers = {"Allow": exc.headers["Allow"]} if exc.headers and "Allow" in exc.headers else None
        return JSONResponse(status_code=error.status, content=error.to_dict(), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        # The one error shape, naming the fields and what is wrong (never echoing the values: NaN is not JSON).
        shown = validation_problems(request, exc)
        error = audit_invalid(request, validation_error(request, exc, shown), shown)
        return JSONResponse(status_code=error.status, content=error.to_dict())

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Never a message or a traceback in the log or the answer: either could quote a value from the rows.
        log.error("%s %s failed (%s)", request.method, request.url.path, type(exc).__name__)
        error = GatewayError("internal error")
        # This answer is made outside the app's middleware (Starlette's ServerErrorMiddleware), so it carries the
        # security headers itself.
        return JSONResponse(status_code=error.status, content=error.to_dict(), headers=security_headers())

    @app.get("/healthz", include_in_schema=False)
    def health() -> dict[str, str]:
        return {"status": "ok"}

    routers = (docs_router, query_router, synth_router, lf_router, lfsets_router, evaluate_router, access_router)
    for r in (*routers, audit_router, monitoring_router):
        app.include_router(r)
    app.mount("/static", static_files(), name="static")

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
