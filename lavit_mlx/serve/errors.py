"""The server's errors, in OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`.

Every failure a request can meet ends as one `APIError` with an HTTP status and a one-line
message that names the problem (and, where one field is at fault, that field as `param`).
"""

from __future__ import annotations

from typing import Optional


class APIError(Exception):
    """An error answered to the client: an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    """A 400 for a request the client can fix."""
    return APIError(400, message, param=param, code=code)


def server_error(message: str = "the server failed on this request; it is logged and the server goes on") -> APIError:
    return APIError(500, message, type="server_error", code="internal_error")


def from_validation(errors: list) -> APIError:
    """FastAPI's validation errors (`RequestValidationError.errors()`) as one line naming the field."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        where = first["loc"][-1] if len(first["loc"]) > 1 else "?"
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"the body is not valid JSON ({detail} at character {where})", code="invalid_json")
    loc = [part for part in first.get("loc", ()) if part != "body"]
    # pydantic names union branches in the location (str, list[...]): drop them
    loc = [part for part in loc if not (isinstance(part, str) and ("[" in part or part in ("str", "int")))]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    message = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        return APIError(400, f"missing required field {param}", param=param, code="missing_field")
    return APIError(400, f"{param or 'body'}: {message}", param=param, code="invalid_value")
