"""The one exception tree. Every error a client can see is a GatewayError with an HTTP status and a stable code.

It lives in `policies` (the lowest layer) so that the planner, synthesis and labeling functions can raise the
same errors the HTTP layer renders. Messages must depend only on public facts: the policy, the request text
and the budget, never on private rows.
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = {k: v for k, v in details.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.details}}


class BadRequest(GatewayError):
    status = 400
    code = "bad_request"


class QueryRejected(BadRequest):
    """The SQL (or an LF condition) is outside what Bastion can answer privately."""

    code = "query_rejected"

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        sql: str | None = None,
        start: int | None = None,
        end: int | None = None,
        hint: str | None = None,
    ) -> None:
        line = col = None
        highlight = None
        if sql is not None and start is not None:
            line = sql.count("\n", 0, start) + 1
            col = start - (sql.rfind("\n", 0, start) + 1) + 1
            highlight = sql[start:end] if end is not None else None
        located = f" (line {line}, column {col}: {highlight!r})" if line is not None else ""
        full = message + located + (f". {hint}" if hint else "")
        super().__init__(full, reason=reason, line=line, column=col, highlight=highlight, hint=hint)
        self.reason = reason


class SqlSyntaxError(QueryRejected):
    code = "sql_syntax_error"


class InvalidRequest(BadRequest):
    code = "invalid_request"


class Unauthorized(GatewayError):
    status = 401
    code = "unauthorized"


class Forbidden(GatewayError):
    status = 403
    code = "forbidden"


class NotFound(GatewayError):
    status = 404
    code = "not_found"


class DatasetNotFound(NotFound):
    code = "dataset_not_found"


class PublicTableNotFound(NotFound):
    code = "public_table_not_found"


class VersionNotFound(NotFound):
    """A pinned version that the dataset never had (GET /v1/datasets/{d}/versions lists its versions)."""

    code = "version_not_found"


class VersionRetired(GatewayError):
    """A pinned version that an admin retired: it is no longer read (a later version is)."""

    status = 410
    code = "version_retired"


class PayloadTooLarge(GatewayError):
    status = 413
    code = "payload_too_large"


class TooManyRequests(GatewayError):
    """Too many refusals before authentication from one source in the current window (no token is checked)."""

    status = 429
    code = "too_many_requests"


class BudgetExhausted(GatewayError):
    status = 429
    code = "budget_exhausted"


class Conflict(GatewayError):
    status = 409
    code = "conflict"


class ServiceUnavailable(GatewayError):
    status = 503
    code = "unavailable"


class LedgerUnavailable(ServiceUnavailable):
    code = "ledger_unavailable"


class AuditUnavailable(ServiceUnavailable):
    code = "audit_unavailable"
