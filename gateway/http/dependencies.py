"""Request dependencies shared by every router: the core object, the caller's context, the error responses.

Nothing a client sends becomes an identity or a path. The request id is always made by the gateway (a uuid4 hex,
set per request by the app's middleware and echoed in the `X-Request-Id` response header); it names the request's
audit records and ledger charge. A client's own `X-Request-Id` is kept only as `correlation_id` in the audit
records, and only if it matches `CORRELATION_ID` (1 to 64 letters, digits, `.`, `_`, `-`); any other value is
ignored, never an error, so the header cannot change an answer.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from gateway.service import Bastion, Context
from gateway.stores.tokens import Principal
from policies.errors import GatewayError, Unauthorized


class ErrorBody(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. query_rejected, budget_exhausted")
    message: str
    model_config = ConfigDict(extra="allow")


class ErrorResponse(BaseModel):
    error: ErrorBody


def _finite(value: float | int) -> float:
    """A JSON number as a float; an integer too large for a float (10**309, say) is refused, not an overflow."""
    try:
        return float(value)
    except OverflowError:
        raise ValueError("must be a finite number") from None


# A JSON number, never a string or a boolean coerced into one (true would otherwise be read as ε = 1).
Number = Annotated[StrictFloat | StrictInt, AfterValidator(_finite)]

# Request bodies take JSON's own types only: no "yes" or "1" read as true, no "5" as a number.
REQUEST_CONFIG = ConfigDict(extra="forbid", strict=True)

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "invalid request or rejected SQL (with line, column, highlight)"},
    401: {"model": ErrorResponse, "description": "missing or invalid bearer token, or one revoked, rotated or expired"},
    403: {"model": ErrorResponse, "description": "role or column not granted"},
    404: {"model": ErrorResponse, "description": "unknown dataset, or a version the dataset never had"},
    410: {"model": ErrorResponse, "description": "version_retired: the pinned dataset version was retired"},
    413: {"model": ErrorResponse, "description": "payload_too_large: the body is over the declared limit"},
    429: {
        "model": ErrorResponse,
        "description": "budget_exhausted: the privacy budget would be exceeded; too_many_requests: too many "
        "refused requests from this address in the current window",
    },
    503: {"model": ErrorResponse, "description": "the ledger or the audit log cannot be written; nothing released"},
}


REQUEST_ID = "bastion.request_id"  # the ASGI scope key under which the middleware puts the request id
CORRELATION_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def get_bastion(request: Request) -> Bastion:
    return request.app.state.bastion


def request_id(request: Request) -> str:
    """The gateway's id of this request (made here if no middleware made one)."""
    rid = request.scope.get(REQUEST_ID)
    if not isinstance(rid, str):
        rid = request.scope[REQUEST_ID] = uuid.uuid4().hex
    return rid


def correlation_id(request: Request) -> str | None:
    """The client's `X-Request-Id` if it is a valid correlation id, else None."""
    value = request.headers.get("x-request-id")
    return value if value is not None and CORRELATION_ID.fullmatch(value) else None


CONTEXT = "bastion_context"  # the attribute of `request.state` holding the authenticated caller's Context


def source_of(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def refuse_authentication(request: Request, bastion: Bastion, error: GatewayError, **request_fields: Any) -> None:
    """Record a refusal made before the caller was authenticated (counted per source and window after the first:
    see `gateway.refusals`), before the caller answers with `error`."""
    bastion.refuse_unauthenticated(
        error, source_of(request), request.url.path, request_id(request), correlation_id(request), **request_fields
    )


def authenticated(request: Request, bastion: Bastion, check: Callable[[], Principal]) -> Context:
    """The context of the principal `check` returns (a token or a session lookup). A source with too many
    refusals in its window gets 429 before `check` runs; a refusal is audited (counted, after the first of a
    window) before the 401 or 429."""
    source, path = source_of(request), request.url.path
    rid, cid = request_id(request), correlation_id(request)
    bastion.check_source(source, path, rid, cid)
    try:
        principal = check()
    except Unauthorized as exc:
        bastion.refuse_unauthenticated(exc, source, path, rid, cid)
        raise
    ctx = Context(principal, source=source, request_id=rid, correlation_id=cid)
    setattr(request.state, CONTEXT, ctx)
    return ctx


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else None


def caller_if_any(request: Request, bastion: Bastion) -> Context | None:
    """The context of a request's valid bearer token, or None; nothing is recorded or counted either way (for
    requests refused before their route checked the token)."""
    try:
        principal = bastion.authenticate(bearer_token(request))
    except Unauthorized:
        return None
    return Context(
        principal, source=source_of(request), request_id=request_id(request), correlation_id=correlation_id(request)
    )


def context_for(request: Request, bastion: Bastion, token: str | None) -> Context:
    """Authenticate a token for this request (see `authenticated`)."""
    return authenticated(request, bastion, lambda: bastion.authenticate(token))


# Declares the bearer scheme in OpenAPI (the Authorize button of /docs); a missing token is refused by
# `context_for`, audited, not by FastAPI.
bearer = HTTPBearer(auto_error=False, description="an API token from `bastion token create`")


def get_context(
    request: Request,
    bastion: Annotated[Bastion, Depends(get_bastion)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Context:
    return context_for(request, bastion, credentials.credentials.strip() if credentials else None)


Ctx = Annotated[Context, Depends(get_context)]
Core = Annotated[Bastion, Depends(get_bastion)]
