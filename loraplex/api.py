"""The REST API, one method per route: `Api.create_job(...)` posts /v1/finetuning/jobs and answers its JSON. The
Predibase-style namespaces (loraplex/client.py) are built on these."""

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import httpx

from loraplex.errors import LoraplexError
from loraplex.transport import Transport, parse_sse

DEFAULT_URL = "http://127.0.0.1:8000"
FINAL_STATUSES = ("completed", "failed", "cancelled")
UPLOAD_READ_TIMEOUT = 660.0  # an upload waits server-side for validation (LORAPLEX_UPLOAD_WAIT_SECONDS)
STREAM_READ_TIMEOUT = 60.0  # the event stream sends a keep-alive every 15 s; silence past this means it is gone


class Api:
    """The REST calls, one method per route, answering the API's JSON. Retries what is worth retrying: connection
    errors, 5xx answers and 429 (waiting as long as Retry-After says), with exponential backoff
    `backoff_seconds * 2**n`; never other 4xx. `max_retries=0` turns retries off. Unset, they are read from
    LORAPLEX_MAX_RETRIES (3) and LORAPLEX_RETRY_BACKOFF_SECONDS (0.5), which is how the CLI is configured.
    `api_token` is Predibase's name for `api_key`."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        api_token: str | None = None,
        max_retries: int | None = None,
        backoff_seconds: float | None = None,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if max_retries is None:
            max_retries = int(os.environ.get("LORAPLEX_MAX_RETRIES") or 3)
        if backoff_seconds is None:
            backoff_seconds = float(os.environ.get("LORAPLEX_RETRY_BACKOFF_SECONDS") or 0.5)
        url = (base_url or os.environ.get("LORAPLEX_API_URL") or DEFAULT_URL).rstrip("/")
        self.base_url = url.removesuffix("/v1")  # the openai SDK's base_url works here too
        key = api_key if api_key is not None else api_token
        self.api_key = key if key is not None else os.environ.get("LORAPLEX_API_KEY")
        self.timeout = timeout
        self._transport = Transport(self.base_url, self.api_key, max_retries, backoff_seconds, timeout, transport)

    @property
    def max_retries(self) -> int:
        return self._transport.max_retries

    @property
    def backoff_seconds(self) -> float:
        return self._transport.backoff_seconds

    # ---- datasets, repos, models ------------------------------------------------------------------------------

    def upload_dataset(
        self, path: str | Path, name: str | None = None, base_model: str = "smollm2-135m", wait: bool = True
    ) -> dict[str, Any]:
        """Upload a JSONL or CSV file. With `wait` the server answers once a worker validated it and counted its
        tokens (status `ready`), or raises with every bad row in `error.body["errors"]`."""
        path = Path(path)
        data = {"base_model": base_model, "wait": str(wait).lower()} | ({"name": name} if name else {})
        timeout = httpx.Timeout(self.timeout, connect=10.0, read=max(self.timeout, UPLOAD_READ_TIMEOUT))
        return self._request("POST", "/v1/datasets", data=data, upload=path, timeout=timeout).json()

    def import_dataset(
        self,
        url: str,
        name: str | None = None,
        base_model: str = "smollm2-135m",
        credentials: dict[str, Any] | None = None,
        wait: bool = True,
    ) -> dict[str, Any]:
        """Create a dataset from `s3://`, `gs://` or `https://` instead of an upload; `credentials` (S3:
        aws_access_key_id, aws_secret_access_key, aws_session_token, region; GCS: a service-account key as `token`)
        are used for this one read and never stored. Answers as upload_dataset."""
        body = {"url": url, "base_model": base_model, "wait": wait, "name": name, "credentials": credentials}
        timeout = httpx.Timeout(self.timeout, connect=10.0, read=max(self.timeout, UPLOAD_READ_TIMEOUT))
        fields = {key: value for key, value in body.items() if value is not None}
        return self._request("POST", "/v1/datasets/import", json=fields, timeout=timeout).json()

    def list_datasets(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/datasets").json()

    def get_dataset(self, name: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/datasets/{name}").json()

    def list_repos(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/repos").json()

    def create_repo(self, name: str, description: str = "") -> dict[str, Any]:
        """An empty repo (409 naming `name` when it exists); a job or an import also creates its repo."""
        return self._request("POST", "/v1/repos", json={"name": name, "description": description}).json()

    def get_repo(self, name: str) -> dict[str, Any]:
        """The repo with its versions and checkpoints."""
        return self._request("GET", f"/v1/repos/{name}").json()

    def download_version(self, repo: str, version: int, target: Path) -> Path:
        """Write version `repo/version` as a .tar.gz to `target` (written whole or not at all)."""
        partial = target.with_name(target.name + ".part")
        timeout = httpx.Timeout(self.timeout, connect=10.0, read=max(self.timeout, UPLOAD_READ_TIMEOUT))
        response = self._transport.open_stream("GET", f"/v1/repos/{repo}/versions/{version}/download", timeout=timeout)
        try:
            with partial.open("wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
            partial.replace(target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        finally:
            response.close()
        return target

    def list_models(self) -> list[dict[str, Any]]:
        """GET /v1/models: the catalog's base models (no `root`) and your adapter versions (`root`: their base)."""
        return self._request("GET", "/v1/models").json()["data"]

    # ---- fine-tuning jobs -------------------------------------------------------------------------------------

    def create_job(self, **config: Any) -> dict[str, Any]:
        """Start a fine-tuning job; `config` is the API's (base_model, dataset, repo, epochs, ...). Unset options
        take the server's defaults."""
        return self._request("POST", "/v1/finetuning/jobs", json=config).json()

    def quote_job(self, **config: Any) -> dict[str, Any]:
        """The price and resolved config of the job `config` would start, without starting it (refused as the job
        would be)."""
        return self._request("POST", "/v1/finetuning/jobs/quote", json=config).json()

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

    # ---- API keys ---------------------------------------------------------------------------------------------

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

    # ---- deployments and inference ----------------------------------------------------------------------------

    def create_deployment(self, name: str, base_model: str, **config: Any) -> dict[str, Any]:
        """A private deployment; `config`: min_replicas, max_replicas, scale_up_threshold, cooldown_time,
        accelerator, engine, preloaded_adapters, description (the server's defaults for those left out)."""
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

    def chat(
        self, model: str, messages: list[dict[str, str]], deployment: str | None = None, **params: Any
    ) -> dict[str, Any]:
        """One chat completion (not streamed), on a shared endpoint or on a private deployment, with the same
        retries as every call (a 429 over a limit waits for its Retry-After; a 503 is tried again)."""
        path = f"/v1/deployments/{deployment}/chat/completions" if deployment else "/v1/chat/completions"
        return self._request("POST", path, json={"model": model, "messages": messages} | params).json()

    # ---- the event feed and a job's live events ---------------------------------------------------------------

    def list_events(self, after: int = 0, limit: int = 100, type: str | None = None) -> list[dict[str, Any]]:
        """The tenant's events after `after` (a `seq`), oldest first: page on with the last one's `seq`."""
        params: dict[str, Any] = {"after": after, "limit": limit} | ({"type": type} if type else {})
        return self._request("GET", "/v1/events", params=params).json()

    def stream_events(self, job_id: str, after_step: int = -1) -> Iterator[tuple[str, dict[str, Any]]]:
        """(event, data) pairs from the job's server-sent events: ("status", job) and ("metric", row), ending after
        the status that says completed, failed or cancelled. A dropped connection is resumed where it stopped
        (Last-Event-ID), with the same retries and backoff as any request."""
        last_id: str | None = None
        failures = 0
        timeout = httpx.Timeout(self.timeout, connect=10.0, read=STREAM_READ_TIMEOUT)
        http, retries = self._transport.http, self._transport
        while True:
            headers = {"Accept": "text/event-stream"} | ({"Last-Event-ID": last_id} if last_id else {})
            params = {"after_step": after_step}
            try:
                with http.stream(
                    "GET", f"/v1/finetuning/jobs/{job_id}/events", params=params, headers=headers, timeout=timeout
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        delay = retries.retry_delay(response, failures)
                        if delay is None:
                            raise LoraplexError.from_response(response)
                        failures += 1
                        time.sleep(delay)
                        continue
                    for event, data, event_id in parse_sse(response.iter_lines()):
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
                time.sleep(retries.backoff(failures))
                failures += 1
                continue
            # The server ended the stream without a final status (it is restarting): reconnect and resume.
            if failures >= self.max_retries:
                raise LoraplexError(0, f"event stream of job {job_id} ended before the job did")
            time.sleep(retries.backoff(failures))
            failures += 1

    # ---- plumbing ---------------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self._transport.request(method, path, **kwargs)

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
