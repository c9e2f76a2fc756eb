"""HTTP with retries: connection errors, 5xx answers and 429 are tried again with exponential backoff (a 429's or
503's Retry-After honoured), never other 4xx, which would fail the same way again. Also the server-sent events
parser the job events and LoRAX's token streams share."""

import email.utils
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from loraplex.errors import LoraplexError

MAX_RETRY_AFTER_SECONDS = 60.0  # a server asking for longer than this is waited for this long at most


class Transport:
    """One httpx client and its retry policy: `max_retries` retries after the first attempt, waiting
    `backoff_seconds * 2**n` before retry n (0-based)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        max_retries: int,
        backoff_seconds: float,
        timeout: float,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if max_retries < 0 or backoff_seconds < 0:
            raise ValueError("max_retries and backoff_seconds must not be negative")
        self.base_url, self.max_retries, self.backoff_seconds, self.timeout = (
            base_url,
            max_retries,
            backoff_seconds,
            timeout,
        )
        headers = {"User-Agent": "loraplex-python/0.1"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.http = httpx.Client(
            base_url=base_url, headers=headers, timeout=httpx.Timeout(timeout, connect=10.0), transport=transport
        )

    def request(
        self, method: str, path: str, *, upload: Path | None = None, timeout: httpx.Timeout | None = None, **kwargs: Any
    ) -> httpx.Response:
        """Send with retries; answer the 2xx response, read whole, or raise LoraplexError."""
        return self._send(method, path, upload, False, timeout or httpx.USE_CLIENT_DEFAULT, kwargs)

    def open_stream(self, method: str, path: str, *, timeout: httpx.Timeout, **kwargs: Any) -> httpx.Response:
        """A 2xx response whose body is not read yet (the caller closes it); an error answer before the body is
        retried as `request` does, so only what happens mid-stream is the caller's to handle."""
        return self._send(method, path, None, True, timeout, kwargs)

    def _send(
        self, method: str, path: str, upload: Path | None, stream: bool, timeout: Any, kwargs: dict[str, Any]
    ) -> httpx.Response:
        """The retry loop of both: connection errors as retryable_transport_error says, 429 and 5xx answers as
        retry_delay says; any other answer is final."""
        attempt = 0
        while True:
            try:
                response = self._attempt(method, path, upload, stream, timeout, kwargs)
            except httpx.TransportError as exc:
                if not retryable_transport_error(exc, method) or attempt >= self.max_retries:
                    raise LoraplexError(0, f"{method} {self.base_url}{path}: {exc!r}") from exc
                time.sleep(self.backoff(attempt))
                attempt += 1
                continue
            if response.is_success:
                return response
            if stream:  # the error's body, for LoraplexError, then the connection back to the pool
                try:
                    response.read()
                finally:
                    response.close()
            delay = self.retry_delay(response, attempt)
            if delay is None:
                raise LoraplexError.from_response(response)
            time.sleep(delay)
            attempt += 1

    def _attempt(
        self, method: str, path: str, upload: Path | None, stream: bool, timeout: Any, kwargs: dict[str, Any]
    ) -> httpx.Response:
        if upload is None:
            return self.http.send(self.http.build_request(method, path, timeout=timeout, **kwargs), stream=stream)
        with upload.open("rb") as f:  # reopened per attempt: a retry sends the whole file again
            files = {"file": (upload.name, f)}
            return self.http.send(
                self.http.build_request(method, path, files=files, timeout=timeout, **kwargs), stream=stream
            )

    def retry_delay(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before retrying this answer, or None when it is final."""
        if attempt >= self.max_retries or not (response.status_code == 429 or response.status_code >= 500):
            return None
        retry_after = retry_after_seconds(response.headers.get("Retry-After"))
        if retry_after is not None and response.status_code in (429, 503):
            return min(retry_after, MAX_RETRY_AFTER_SECONDS)
        return self.backoff(attempt)

    def backoff(self, attempt: int) -> float:
        return self.backoff_seconds * 2**attempt

    def close(self) -> None:
        self.http.close()


def retryable_transport_error(exc: httpx.TransportError, method: str) -> bool:
    """A request that never reached the server is always safe to send again; one that may have (a read timeout, a
    reset mid-answer) only when repeating it changes nothing (GET)."""
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout) or method == "GET"


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After is either seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def parse_sse(lines: Iterator[str]) -> Iterator[tuple[str, str, str | None]]:
    """(event, data, id) per server-sent event, as the EventSource spec reads them: comments skipped, data lines
    joined, an event dispatched at each blank line."""
    event: str = "message"
    data: list[str] = []
    event_id: str | None = None
    for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data), event_id
            event, data, event_id = "message", [], None
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            event = value
        elif field == "data":
            data.append(value)
        elif field == "id":
            event_id = value
