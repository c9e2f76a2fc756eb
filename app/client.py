"""A small Python client for the Loraplex REST API (datasets, fine-tuning jobs, live events, usage, balance).

It needs httpx only, so scripts and the CLI's client commands can use it without torch. Inference needs no
client of ours: the official `openai` SDK talks to `/v1/chat/completions` as it is.

    from app.client import Loraplex

    lp = Loraplex()  # LORAPLEX_API_URL (default http://127.0.0.1:8000) and LORAPLEX_API_KEY
    lp.upload_dataset("tickets.jsonl", base_model="smollm2-135m")
    job = lp.create_job(base_model="smollm2-135m", dataset="tickets", repo="triage")
    for event, data in lp.stream_events(job["id"]):
        print(event, data)
"""

import email.utils
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
FINAL_STATUSES = ("completed", "failed", "cancelled")
MAX_RETRY_AFTER_SECONDS = 60.0  # a server asking for longer than this is waited for this long at most
UPLOAD_READ_TIMEOUT = 660.0  # an upload waits server-side for validation (LORAPLEX_UPLOAD_WAIT_SECONDS)
STREAM_READ_TIMEOUT = 60.0  # the event stream sends a keep-alive every 15 s; silence past this means it is gone


class LoraplexError(Exception):
    """An error answer of the API (its `{"error": {...}}` body), or a request that could not be made at all
    (status 0). `param` names the field at fault, as the API does; `body` keeps the whole error object, so
    extras such as a dataset's row `errors` are not lost."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = error_type  # the API's "type", e.g. invalid_request_error
        self.body = body or {}

    @classmethod
    def from_response(cls, response: httpx.Response) -> "LoraplexError":
        try:
            error = response.json()["error"]
            if not isinstance(error, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):  # not our shape: a proxy's page, a crash
            text = response.text.strip()[:500] or response.reason_phrase
            return cls(response.status_code, text or f"HTTP {response.status_code}")
        return cls(
            response.status_code,
            str(error.get("message") or f"HTTP {response.status_code}"),
            error.get("param"),
            error.get("code"),
            error.get("type"),
            error,
        )


class Loraplex:
    """One API key against one server. Retries what is worth retrying: connection errors, 5xx answers and
    429 (waiting as long as Retry-After says), with exponential backoff `backoff_seconds * 2**n`; never other
    4xx, which would fail the same way again. `max_retries=0` turns retries off. Unset, they are read from
    LORAPLEX_MAX_RETRIES (3) and LORAPLEX_RETRY_BACKOFF_SECONDS (0.5), which is how the CLI is configured."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        max_retries: int | None = None,
        backoff_seconds: float | None = None,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if max_retries is None:
            max_retries = int(os.environ.get("LORAPLEX_MAX_RETRIES") or 3)
        if backoff_seconds is None:
            backoff_seconds = float(os.environ.get("LORAPLEX_RETRY_BACKOFF_SECONDS") or 0.5)
        if max_retries < 0 or backoff_seconds < 0:
            raise ValueError("max_retries and backoff_seconds must not be negative")
        url = (base_url or os.environ.get("LORAPLEX_API_URL") or DEFAULT_URL).rstrip("/")
        self.base_url = url.removesuffix("/v1")  # the openai SDK's base_url works here too
        self.api_key = api_key if api_key is not None else os.environ.get("LORAPLEX_API_KEY")
        self.max_retries, self.backoff_seconds, self.timeout = max_retries, backoff_seconds, timeout
        headers = {"User-Agent": "loraplex-python/0.1"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=httpx.Timeout(timeout, connect=10.0), transport=transport
        )

    # ---- resources ------------------------------------------------------------------------------------

    def upload_dataset(
        self, path: str | Path, name: str | None = None, base_model: str = "smollm2-135m", wait: bool = True
    ) -> dict[str, Any]:
        """Upload a JSONL or CSV file. With `wait` the server answers once a worker validated it and counted
        its tokens (status `ready`), or raises with every bad row in `error.body["errors"]`."""
        path = Path(path)
        data = {"base_model": base_model, "wait": str(wait).lower()} | ({"name": name} if name else {})
        timeout = httpx.Timeout(self.timeout, connect=10.0, read=max(self.timeout, UPLOAD_READ_TIMEOUT))
        return self._request("POST", "/v1/datasets", data=data, upload=path, timeout=timeout).json()

    def list_datasets(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/datasets").json()

    def create_job(self, **config: Any) -> dict[str, Any]:
        """Start a fine-tuning job; `config` is the API's (base_model, dataset, repo, epochs, ...). Unset
        options take the server's defaults."""
        return self._request("POST", "/v1/finetuning/jobs", json=config).json()

    def list_jobs(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/finetuning/jobs").json()

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/finetuning/jobs/{job_id}").json()

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/finetuning/jobs/{job_id}/cancel").json()

    def metrics(self, job_id: str, after_step: int = -1) -> list[dict[str, Any]]:
        return self._request("GET", f"/v1/finetuning/jobs/{job_id}/metrics", params={"after_step": after_step}).json()

    def usage(self, since: str | None = None) -> dict[str, Any]:
        return self._request("GET", "/v1/usage", params={"since": since} if since else None).json()

    def balance(self) -> dict[str, Any]:
        return self._request("GET", "/v1/billing/balance").json()

    # ---- API keys -------------------------------------------------------------------------------------

    def create_api_key(
        self, name: str, scope: str = "all", expires_in_days: int | None = None, expires_at: str | None = None
    ) -> dict[str, Any]:
        """A new key of `scope` (all, inference or read); its secret is `["key"]`, in this answer only."""
        body: dict[str, Any] = {"name": name, "scope": scope}
        body |= {k: v for k, v in (("expires_in_days", expires_in_days), ("expires_at", expires_at)) if v is not None}
        return self._request("POST", "/v1/api_keys", json=body).json()

    def list_api_keys(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/api_keys").json()

    def revoke_api_key(self, key_id: str) -> dict[str, Any]:
        return self._request("DELETE", f"/v1/api_keys/{key_id}").json()

    # ---- deployments and inference -------------------------------------------------------------------

    def create_deployment(self, name: str, base_model: str, **config: Any) -> dict[str, Any]:
        """A private deployment; `config`: min_replicas, max_replicas, scale_up_threshold, cooldown_time,
        accelerator, engine, preloaded_adapters (the server's defaults for those left out)."""
        return self._request("POST", "/v1/deployments", json={"name": name, "base_model": base_model} | config).json()

    def list_deployments(self, include_deleted: bool = False) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/deployments", params={"include_deleted": include_deleted}).json()

    def get_deployment(self, name: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/deployments/{name}").json()

    def update_deployment(self, name: str, **changes: Any) -> dict[str, Any]:
        return self._request("PATCH", f"/v1/deployments/{name}", json=changes).json()

    def stop_deployment(self, name: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/deployments/{name}/stop").json()

    def standby_deployment(self, name: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/deployments/{name}/standby").json()

    def delete_deployment(self, name: str, wait: float = 60.0) -> dict[str, Any]:
        """Drains the replicas (requests in flight finish) and answers once Deleted, or after `wait` seconds."""
        timeout = httpx.Timeout(self.timeout, connect=10.0, read=wait + 30)
        return self._request("DELETE", f"/v1/deployments/{name}", params={"wait": wait}, timeout=timeout).json()

    def deployment_metrics(self, name: str, minutes: float = 15) -> dict[str, Any]:
        return self._request("GET", f"/v1/deployments/{name}/metrics", params={"minutes": minutes}).json()

    def deployment_transitions(self, name: str) -> list[dict[str, Any]]:
        return self._request("GET", f"/v1/deployments/{name}/transitions").json()

    # ---- the event feed -------------------------------------------------------------------------------

    def list_events(self, after: int = 0, limit: int = 100, type: str | None = None) -> list[dict[str, Any]]:
        """The tenant's events after `after` (a `seq`), oldest first: page on with the last one's `seq`."""
        params: dict[str, Any] = {"after": after, "limit": limit} | ({"type": type} if type else {})
        return self._request("GET", "/v1/events", params=params).json()

    def chat(
        self, model: str, messages: list[dict[str, str]], deployment: str | None = None, **params: Any
    ) -> dict[str, Any]:
        """One chat completion (not streamed), on a shared endpoint or on a private deployment, with the same
        retries as every call (a 429 over a limit waits for its Retry-After; a 503 is tried again)."""
        path = f"/v1/deployments/{deployment}/chat/completions" if deployment else "/v1/chat/completions"
        return self._request("POST", path, json={"model": model, "messages": messages} | params).json()

    def stream_events(self, job_id: str, after_step: int = -1) -> Iterator[tuple[str, dict[str, Any]]]:
        """(event, data) pairs from the job's server-sent events: ("status", job) and ("metric", row), ending
        after the status that says completed, failed or cancelled. A dropped connection is resumed where it
        stopped (Last-Event-ID), with the same retries and backoff as any request."""
        last_id: str | None = None
        failures = 0
        timeout = httpx.Timeout(self.timeout, connect=10.0, read=STREAM_READ_TIMEOUT)
        while True:
            headers = {"Accept": "text/event-stream"} | ({"Last-Event-ID": last_id} if last_id else {})
            params = {"after_step": after_step}
            try:
                with self._http.stream(
                    "GET", f"/v1/finetuning/jobs/{job_id}/events", params=params, headers=headers, timeout=timeout
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        delay = self._retry_delay(response, failures)
                        if delay is None:
                            raise LoraplexError.from_response(response)
                        failures += 1
                        time.sleep(delay)
                        continue
                    for event, data, event_id in _parse_sse(response.iter_lines()):
                        failures = 0  # progress made: a later drop starts its retries afresh
                        if event_id is not None:
                            last_id = event_id
                        payload = json.loads(data) if data else {}
                        yield event, payload
                        if event == "status" and payload.get("status") in FINAL_STATUSES:
                            return
            except httpx.TransportError as exc:  # refused, reset, or silent for STREAM_READ_TIMEOUT
                if failures >= self.max_retries:
                    raise LoraplexError(0, f"event stream of job {job_id} lost: {exc!r}") from exc
                time.sleep(self._backoff(failures))
                failures += 1
                continue
            # The server ended the stream without a final status (it is restarting): reconnect and resume.
            if failures >= self.max_retries:
                raise LoraplexError(0, f"event stream of job {job_id} ended before the job did")
            time.sleep(self._backoff(failures))
            failures += 1

    # ---- plumbing -------------------------------------------------------------------------------------

    def _request(
        self, method: str, path: str, *, upload: Path | None = None, timeout: httpx.Timeout | None = None, **kwargs: Any
    ) -> httpx.Response:
        """Send with retries; answer the 2xx response or raise LoraplexError."""
        attempt = 0
        while True:
            try:
                if upload is not None:
                    with upload.open("rb") as f:  # reopened per attempt: a retry sends the whole file again
                        response = self._http.request(
                            method,
                            path,
                            files={"file": (upload.name, f)},
                            timeout=timeout or httpx.USE_CLIENT_DEFAULT,
                            **kwargs,
                        )
                else:
                    response = self._http.request(method, path, timeout=timeout or httpx.USE_CLIENT_DEFAULT, **kwargs)
            except httpx.TransportError as exc:
                if not self._retryable_transport_error(exc, method) or attempt >= self.max_retries:
                    raise LoraplexError(0, f"{method} {self.base_url}{path}: {exc!r}") from exc
                time.sleep(self._backoff(attempt))
                attempt += 1
                continue
            if response.is_success:
                return response
            delay = self._retry_delay(response, attempt)
            if delay is None:
                raise LoraplexError.from_response(response)
            time.sleep(delay)
            attempt += 1

    def _retryable_transport_error(self, exc: httpx.TransportError, method: str) -> bool:
        """A request that never reached the server is always safe to send again; one that may have (a read
        timeout, a reset mid-answer) only when repeating it changes nothing (GET)."""
        return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout) or method == "GET"

    def _retry_delay(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before retrying this answer, or None when it is final."""
        if attempt >= self.max_retries or not (response.status_code == 429 or response.status_code >= 500):
            return None
        retry_after = _retry_after_seconds(response.headers.get("Retry-After"))
        if retry_after is not None and response.status_code in (429, 503):
            return min(retry_after, MAX_RETRY_AFTER_SECONDS)
        return self._backoff(attempt)

    def _backoff(self, attempt: int) -> float:
        return self.backoff_seconds * 2**attempt

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Loraplex":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _retry_after_seconds(value: str | None) -> float | None:
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


def _parse_sse(lines: Iterator[str]) -> Iterator[tuple[str, str, str | None]]:
    """(event, data, id) per server-sent event, as the EventSource spec reads them: comments skipped, data
    lines joined, an event dispatched at each blank line."""
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
