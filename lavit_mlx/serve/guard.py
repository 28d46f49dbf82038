"""ASGI middleware in front of the routes: the API key and the body size limit."""

from __future__ import annotations

import hmac
from typing import Optional

from fastapi.responses import JSONResponse

from .errors import APIError

OPEN_PATHS = {"/health", "/"}  # no API key: the liveness probe and the page (which asks for the key)


class Guard:
    """ASGI middleware run before routing: the API key (every path but /health and the
    page) and the body size limit (the body is read here, at most `max_body` bytes)."""

    def __init__(self, app, api_key: Optional[str], max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and scope["path"] not in OPEN_PATHS:
            problem = self._key_problem(headers.get("authorization"))
            if problem:
                error = APIError(401, problem, code="invalid_api_key")
                return await JSONResponse(error.body(), status_code=401,
                                          headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        if scope["method"] in ("POST", "PUT", "PATCH"):
            too_large = APIError(413, f"the request body is larger than {self.max_body // 2**20} MiB",
                                 code="request_too_large")
            declared = headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_body:
                return await JSONResponse(too_large.body(), status_code=413)(scope, receive, send)
            chunks, size, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                more = message.get("more_body", False)
                if size > self.max_body:
                    return await JSONResponse(too_large.body(), status_code=413)(scope, receive, send)
            receive = _replay(b"".join(chunks), receive)
        await self.app(scope, receive, send)

    def _key_problem(self, header: Optional[str]) -> Optional[str]:
        if not header:
            return "missing API key: send the header 'Authorization: Bearer KEY'"
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return "the Authorization header must be 'Bearer KEY'"
        if not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            return "incorrect API key"
        return None


def _replay(body: bytes, receive):
    """A receive that gives the body read by `Guard` once, then the connection's own messages."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
