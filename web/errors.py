"""Every error leaves the API in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None, **extra: Any
) -> JSONResponse:
    body = {"message": message, "type": TYPES.get(status, "api_error"), "param": param, "code": code} | extra
    return JSONResponse({"error": body}, status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """First error, with the user-facing field: ('rank: Input should be ...', 'rank')."""
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "form")]
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if not loc and ": " in msg:  # a cross-field check names its field at the start of the message
        field, _, rest = msg.partition(": ")
        return f"{field}: {rest}", field
    param = ".".join(loc) or None
    return (f"{param}: {msg}" if param else msg), param


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        response = error_response(exc.status, exc.message, exc.param, exc.code, **exc.extra)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(422, message, param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))
