"""Request bodies at the edge, before any route reads them: a size limit by kind of body, and JSON the routes can
trust.

- A multipart body (an upload) may hold LORAPLEX_MAX_UPLOAD_BYTES plus the form's own fields and boundaries. It is
  counted as it streams through to the form parser, which spools it to disk, so it is never held in memory here.
- Any other body (JSON) may hold LORAPLEX_MAX_JSON_BODY_BYTES. It is read whole here, as the route would read it
  anyway, and a JSON body is parsed once to refuse what Python's json lets through but JSON has not: a string
  with a lone UTF-16 surrogate ("\\ud800", not a character: the first encode of it, in the database driver or the
  tokenizer, would fail far from the request), and NaN, Infinity or a number beyond a float's range.
Both limits hold for bodies sent without a Content-Length (chunked): the count stops reading at the limit.
"""

import json
import math
from collections import deque
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.settings import get_settings
from web.errors import error_response

MULTIPART_OVERHEAD = 64 * 1024  # bytes of form fields and boundaries allowed beside the uploaded file itself


class RequestBodies:
    """ASGI middleware: the limits and checks above, answered in the API's error shape."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type.startswith("multipart/"):
            await self._upload(scope, receive, send, _declared_length(headers))
        else:
            await self._whole(scope, receive, send, _declared_length(headers), _is_json(media_type))

    async def _upload(self, scope: Scope, receive: Receive, send: Send, declared: int | None) -> None:
        limit = get_settings().limits.max_upload_bytes
        allowed = limit + MULTIPART_OVERHEAD
        refusal = error_response(
            413,
            f"file: larger than the {size_text(limit)} limit (LORAPLEX_MAX_UPLOAD_BYTES)",
            param="file",
            code="file_too_large",
        )
        if declared is not None and declared > allowed:  # refused before a byte is read
            await refusal(scope, receive, send)
            return
        received, over, started = 0, False, False

        async def counted() -> Message:
            nonlocal received, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                # Past the limit the route is told the client left: it stops reading, and its answer is replaced.
                over = received > allowed
                if over:
                    return {"type": "http.disconnect"}
            return message

        async def unless_over(message: Message) -> None:
            nonlocal started
            if over and not started:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted, unless_over)
        if over and not started:
            await refusal(scope, receive, send)

    async def _whole(self, scope: Scope, receive: Receive, send: Send, declared: int | None, is_json: bool) -> None:
        limit = get_settings().limits.max_json_body_bytes
        refusal = error_response(
            413,
            f"the request body is larger than the {size_text(limit)} allowed for a JSON body "
            "(LORAPLEX_MAX_JSON_BODY_BYTES)",
            code="body_too_large",
        )
        if declared is not None and declared > limit:
            await refusal(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before its body was complete
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await refusal(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        problem = _json_problem(body) if is_json and body else None
        if problem is not None:
            await problem(scope, receive, send)
            return
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body only the disconnect is left, which streaming answers watch for

        await self.app(scope, replay, send)


def _declared_length(headers: Headers) -> int | None:
    declared = headers.get("content-length", "")
    return int(declared) if declared.isascii() and declared.isdigit() else None  # ("²".isdigit() is true)


def _is_json(media_type: str) -> bool:
    """As FastAPI decides to parse a body as JSON (application/json, application/*+json)."""
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


def _json_problem(body: bytes) -> Response | None:
    """The error answer for a body that is not JSON, or holds a value that JSON has not; None when it is sound."""
    try:
        document = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return _not_json(f"the body is not valid UTF-8: byte {exc.start} cannot start or continue a character")
    except json.JSONDecodeError as exc:
        return _not_json(f"the body is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}")
    except RecursionError:
        return _not_json("the body is not valid JSON here: it is nested too deeply")
    except ValueError:  # the only other refusal of json.loads: an integer longer than Python converts (4300 digits)
        return _not_json("the body is not valid JSON here: it holds a number with too many digits")
    found = _first_invalid(document)
    if found is None:
        return None
    path, problem = found
    param = ".".join(str(part).encode("utf-8", "backslashreplace").decode() for part in path) or None
    return error_response(422, f"{param}: {problem}" if param else problem, param=param, code="invalid_value")


def _not_json(message: str) -> Response:
    return error_response(400, message, code="invalid_json")


def _first_invalid(document: Any) -> tuple[tuple[str | int, ...], str] | None:
    """(path, problem) of the first value, in document order, that Python's json accepts and JSON has not."""
    todo: deque[tuple[tuple[str | int, ...], Any]] = deque([((), document)])
    while todo:  # breadth first, without recursion: the nesting depth is the sender's choice
        path, value = todo.popleft()
        if isinstance(value, str) and not _is_text(value):
            return path, "not valid Unicode: it holds a lone UTF-16 surrogate (\\ud800 to \\udfff), no character"
        if isinstance(value, float) and not math.isfinite(value):
            return path, "must be a finite number (NaN, Infinity and numbers beyond ±1.8e308 are not JSON numbers)"
        if isinstance(value, dict):
            for key, item in value.items():
                if not _is_text(key):
                    return (*path, key), "this field name is not valid Unicode: it holds a lone UTF-16 surrogate"
                todo.append(((*path, key), item))
        elif isinstance(value, list):
            todo.extend(((*path, index), item) for index, item in enumerate(value))
    return None


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def size_text(n: int) -> str:
    """A byte count for people: '50 MiB', or exact bytes when not a whole number of MiB (no '0 MiB limit')."""
    mib = 1024 * 1024
    return f"{n // mib} MiB" if n >= mib and n % mib == 0 else f"{n} bytes"
