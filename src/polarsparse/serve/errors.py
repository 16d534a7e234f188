"""HTTP errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""
from __future__ import annotations

from pydantic import ValidationError

from polarsparse.errors import PolarsparseError
from polarsparse.serve.protocol import ErrorInfo, ErrorResponse


class APIError(PolarsparseError):
    """A request the server refuses; ``status`` is the HTTP status (4xx: the client's fault)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

    def body(self) -> dict:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)).model_dump()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(message, 400, param, code)


def unauthorized() -> APIError:
    return APIError("invalid or missing API key: send 'Authorization: Bearer <key>'", 401, code="invalid_api_key")


def model_not_found(name: str, served: list[str]) -> APIError:
    return APIError(f"the model {name!r} does not exist; this server serves {served}", 404, "model", "model_not_found")


def not_found(path: str) -> APIError:
    return APIError(f"no route {path}", 404, code="not_found")


def server_error(message: str, status: int = 500) -> APIError:
    return APIError(message, status, type="server_error" if status < 503 else "service_unavailable")


def from_validation(exc: ValidationError) -> APIError:
    """The first pydantic error; ``param`` is the top-level field (union member tags dropped)."""
    errors = exc.errors(include_url=False)
    err = errors[0]
    field = str(err["loc"][0]) if err["loc"] else None
    where = ".".join(str(p) for p in err["loc"] if isinstance(p, int) or p in _field_names(exc)) or field
    if err["type"] == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {err['msg']}", code="invalid_json")
    if err["type"] == "extra_forbidden":
        return bad_request(f"unrecognized request argument: {where}", field, "unknown_parameter")
    if err["type"] == "missing":
        return bad_request(f"missing required parameter: {where}", field, "missing_parameter")
    got = err.get("input")
    shown = type(got).__name__ if isinstance(got, (dict, list)) else repr(got)[:80]
    if sum(1 for e in errors if e["loc"][:1] == err["loc"][:1]) > 1:  # every member of a union failed
        return bad_request(f"invalid type for {where}: got {shown}", field, "invalid_type")
    return bad_request(f"invalid value for {where or 'body'}: {err['msg']} (got {shown})", field, "invalid_value")


def _field_names(exc: ValidationError) -> set[str]:
    """Names that can appear in an error location (fields of every request model), not union tags."""
    from polarsparse.serve import protocol

    names: set[str] = set()
    for obj in vars(protocol).values():
        if isinstance(obj, type) and issubclass(obj, protocol.BaseModel):
            names.update(obj.model_fields)
    return names
