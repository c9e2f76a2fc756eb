"""Every error leaves the API in OpenAI's shape: {"error": {"message", "type", "param", "code"}}; on LoRAX's routes,
in LoRAX's (web/lorax_replies.py), which they ask for through `request.state.error_body`."""

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import errors as domain

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "payment_required",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


# The OpenAI-compatible routes (shared and per deployment, and OpenAI's fine-tuning jobs): a body they refuse is a
# 400, as OpenAI's own (the openai SDK's BadRequestError); the rest of the API answers a bad field with a 422.
OPENAI_BODIES = ("/chat/completions", "/completions", "/fine_tuning/jobs")


# The one place a domain refusal (app/errors.py) becomes an HTTP status.
STATUS_OF_KIND: dict[type[domain.Refusal], int] = {
    domain.Invalid: 422,
    domain.TooLarge: 413,
    domain.NotFound: 404,
    domain.Conflict: 409,
    domain.PaymentRequired: 402,
    domain.Busy: 429,
    domain.Unavailable: 503,
    domain.Failed: 500,
}


def status_of(refusal: domain.Refusal) -> int:
    return STATUS_OF_KIND[domain.kind_of(refusal)]


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,  # e.g. Retry-After on a 429
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.extra = status, message, param, code, extra
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None, **extra: Any) -> dict:
    """{"error": {...}}: a response's body, or a stream's last event (OpenAI's streaming error)."""
    return {"error": {"message": message, "type": TYPES.get(status, "api_error"), "param": param, "code": code} | extra}


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code, **extra), status_code=status)


ErrorBody = Callable[..., dict[str, Any]]  # error_body's signature: (status, message, param, code, **extra)


def _response_for(
    request: Request, status: int, message: str, param: str | None = None, code: str | None = None, **extra: Any
) -> JSONResponse:
    """The error in the shape the route's clients parse: OpenAI's, unless the route set `request.state.error_body`
    (LoRAX's routes do: web/routers/lorax.py)."""
    render: ErrorBody = getattr(request.state, "error_body", error_body)
    return JSONResponse(render(status, message, param, code, **extra), status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """First error, with the user-facing field: ('rank: Input should be ...', 'rank')."""
    errors = exc.errors()
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    members = [i for i, part in enumerate(loc) if _union_member(part)]
    if members:  # one error per member of a union: the member that got furthest says the most ("stop.1: ...")
        prefix = loc[: members[0]]
        first = max((e for e in errors if tuple(e["loc"])[: len(prefix)] == prefix), key=lambda e: len(e["loc"]))
    if tuple(first.get("loc", ())) == ("body",):  # the body as a whole (a cross-field check's error is a value_error)
        if first.get("type") == "missing":
            return "the body is empty; send a JSON object", None
        if str(first.get("type", "")).endswith("_type"):
            return "the body must be a JSON object, sent with 'Content-Type: application/json'", None
    where = ("body", "query", "path", "form")
    fields = [str(p) for p in first.get("loc", ()) if p not in where and not _union_member(p)]
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":  # pydantic's "Extra inputs are not permitted" names no reason
        msg = "not a field of this request (unknown, or not implemented here)"
    if not fields and ": " in msg:  # a cross-field check names its field at the start of the message
        field, _, rest = msg.partition(": ")
        return f"{field}: {rest}", field
    param = ".".join(fields) or None
    return (f"{param}: {msg}" if param else msg), param


def _union_member(part: object) -> bool:
    """pydantic puts the union member it tried into an error's location ('stop', 'list[str]', 1): no field of ours."""
    if not isinstance(part, str):
        return False
    return part in ("str", "int", "float", "bool") or "[" in part or part.startswith("constrained-")


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        response = _response_for(request, exc.status, exc.message, exc.param, exc.code, **exc.extra)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(domain.Refusal)
    async def _refused(request: Request, exc: domain.Refusal) -> JSONResponse:
        response = _response_for(request, status_of(exc), exc.message, exc.field, exc.code)
        if exc.retry_after is not None:
            response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        status = 400 if request.url.path.endswith(OPENAI_BODIES) else 422
        return _response_for(request, status, message, param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _response_for(request, exc.status_code, str(exc.detail))
