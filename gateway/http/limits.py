"""ASGI middleware enforcing the declared size limits of a request body (`Settings.limits`) before any route,
and so before authentication reads the token: a body over `max_body_bytes` is refused with 413 from its
Content-Length, or as soon as more than that has arrived, and never read in full; a JSON body with more than
`max_json_items` members and elements, or nested deeper than `max_json_depth`, is refused with 400 without being
parsed. Each refusal is audited as a refusal before authentication (counted per source and window)."""

from __future__ import annotations

import json
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.http.dependencies import REQUEST_ID
from gateway.service import Bastion
from gateway.settings import Limits
from policies.errors import GatewayError, InvalidRequest, PayloadTooLarge

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_STRUCTURE = re.compile(rb"[\[\]{},]")


def json_shape(body: bytes, max_items: int, max_depth: int) -> str | None:
    """What is wrong with the size or nesting of a JSON text, or None. Strings are skipped without being decoded;
    the count of members and elements is an upper bound (commas plus containers), exact enough for a limit."""
    depth = items = 0
    for token in _STRUCTURE.findall(_STRING.sub(b'""', body)):
        if token in b"[{":
            depth += 1
            items += 1
            if depth > max_depth:
                return f"the JSON body nests objects and arrays more than {max_depth} deep"
        elif token in b"]}":
            depth -= 1
        else:
            items += 1
        if items > max_items:
            return f"the JSON body has more than {max_items:,} members and elements"
    return None


class BodyLimits:
    def __init__(self, app: ASGIApp, bastion: Bastion, limits: Limits) -> None:
        self.app, self.bastion, self.limits = app, bastion, limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limits.max_body_bytes):
            await self._refuse(scope, send, self._too_large())
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limits.max_body_bytes:
                await self._refuse(scope, send, self._too_large())
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if body and b"json" in headers.get(b"content-type", b"").lower():
            problem = json_shape(body, self.limits.max_json_items, self.limits.max_json_depth)
            if problem is not None:
                await self._refuse(scope, send, InvalidRequest(f"{problem}; send a smaller request"))
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"the request body is over the limit of {self.limits.max_body_bytes:,} bytes")

    async def _refuse(self, scope: Scope, send: Send, error: GatewayError) -> None:
        client = scope.get("client")
        source = client[0] if client else "unknown"
        rid = scope.get(REQUEST_ID) or ""
        try:
            self.bastion.refuse_unauthenticated(error, source, scope.get("path", ""), rid)
        except GatewayError as exc:  # the log cannot be written: refuse with that instead
            error = exc
        payload = json.dumps(error.to_dict(), separators=(",", ":")).encode()
        await send(
            {
                "type": "http.response.start",
                "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": payload})
