"""Client errors that FastAPI and Starlette raise before a route runs, turned into the one error shape.

A body or parameter that does not validate is a 400 `invalid_request` whose message names each field and what is
allowed (never the value sent: it may be NaN, which JSON cannot encode, or megabytes long); an unknown route is a
404 `not_found`, a wrong method a 405 `method_not_allowed` naming the allowed ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from policies.errors import BadRequest, GatewayError, InvalidRequest, NotFound


class MethodNotAllowed(GatewayError):
    status = 405
    code = "method_not_allowed"


class HttpRefusal(BadRequest):
    """Any other refusal Starlette raises itself, with its status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


NUMBER_TYPES = {"float_type", "int_type", "float_parsing", "int_parsing", "int_from_float"}
WHERE = {"query": "query parameter ", "path": "path parameter ", "header": "header ", "cookie": "cookie "}


def http_error(request: Request, exc: HTTPException) -> GatewayError:
    path = request.url.path
    if exc.status_code == 404:
        return NotFound(f"no route {request.method} {path}; the routes are listed at /docs", path=path)
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        return MethodNotAllowed(f"{request.method} is not allowed on {path}; allowed: {allowed}", path=path)
    if exc.status_code == 400:  # a body Starlette cannot decode (not UTF-8, say)
        return InvalidRequest("invalid request: the body must be JSON in UTF-8")
    return HttpRefusal(exc.status_code, exc.detail if isinstance(exc.detail, str) else "request refused")


def _body_fields(request: Request) -> list[str]:
    """The fields of the route's JSON body model, if it has one."""
    field = getattr(request.scope.get("route"), "body_field", None)
    model = getattr(getattr(field, "field_info", None), "annotation", None)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return [info.alias or name for name, info in model.model_fields.items()]
    return []


def _name(err: dict[str, Any]) -> tuple[str, str]:
    """(where, field) of an error: union member tags (`float`, `function-after[...]`) are dropped, and a JSON
    syntax error is the body's (its location holds a character position, not a field)."""
    loc: Sequence[Any] = err.get("loc", ())
    if err.get("type") == "json_invalid":
        return "body", ""
    where, *rest = loc if loc else ("body",)
    parts = [str(p) for p in rest if not (isinstance(p, str) and ("[" in p or p in {"float", "int", "str", "bool"}))]
    return str(where), ".".join(parts)


def _problem(err: dict[str, Any], request: Request, fields: list[str]) -> str:
    kind, msg = err.get("type", ""), err.get("msg", "invalid")
    if kind == "json_invalid":
        reason = (err.get("ctx") or {}).get("error", "")
        return f"the body is not valid JSON ({reason})" if reason else "the body is not valid JSON"
    if kind in {"model_attributes_type", "dict_type", "model_type"} and tuple(err.get("loc", ())) == ("body",):
        if "json" not in request.headers.get("content-type", "").lower():
            return "the body must be JSON sent with the header 'Content-Type: application/json'"
        return "the body must be a JSON object" + (f" with the fields {', '.join(fields)}" if fields else "")
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "is not a known field" + (f"; the fields are {', '.join(fields)}" if fields else "")
    if kind in {"float_type", "float_parsing"}:
        return "must be a number"
    if kind in {"int_type", "int_parsing", "int_from_float"}:
        return "must be an integer"
    return str(msg)


MAX_PROBLEMS = 5  # fields of an invalid request named in the answer and its audit record


def validation_problems(request: Request, exc: RequestValidationError) -> list[str]:
    """One problem per field, naming it and what is allowed: at most MAX_PROBLEMS, then how many more."""
    fields = _body_fields(request)
    found: dict[tuple[str, str], list[str]] = {}
    kinds: dict[tuple[str, str], set[str]] = {}
    for err in exc.errors():
        key = _name(err)
        problem = _problem(err, request, fields)
        found.setdefault(key, [])
        if problem not in found[key]:
            found[key].append(problem)
        kinds.setdefault(key, set()).add(err.get("type", ""))
    parts = []
    for (where, field), problems in list(found.items())[:MAX_PROBLEMS]:
        if len(problems) > 1 and kinds[(where, field)] <= NUMBER_TYPES:
            problems = ["must be a JSON number (not a string or a boolean)"]
        label = WHERE.get(where, "") + field[:64]
        text = " or ".join(problems)
        parts.append(f"{label} {text}" if field else text)
    if len(found) > MAX_PROBLEMS:
        parts.append(f"and {len(found) - MAX_PROBLEMS} more")
    return parts


def validation_error(request: Request, exc: RequestValidationError, problems: list[str]) -> InvalidRequest:
    """One message for all the problems of a request; `field` names the first."""
    first = next((_name(err) for err in exc.errors()), ("body", ""))
    return InvalidRequest("invalid request: " + "; ".join(problems), field=first[1] or None)
