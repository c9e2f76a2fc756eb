"""The SDK's one error type: an error answer of the API, or a request that could not be made at all."""

from typing import Any

import httpx


class LoraplexError(Exception):
    """An error answer of the API (its `{"error": {...}}` body, or LoRAX's `{"error": "...", "error_type"}` on the
    LoRAX routes), or a request that could not be made at all (status 0). `param` names the field at fault, as the
    API does; `body` keeps the whole error object, so extras such as a dataset's row `errors` are not lost."""

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
            payload = response.json()
            error = payload["error"]
        except (ValueError, KeyError, TypeError):  # not our shape: a proxy's page, a crash
            text = response.text.strip()[:500] or response.reason_phrase
            return cls(response.status_code, text or f"HTTP {response.status_code}")
        return cls.from_body(response.status_code, payload if isinstance(error, str) else error)

    @classmethod
    def from_body(cls, status: int, error: Any) -> "LoraplexError":
        """From the error object: OpenAI's `{"message", "type", "param", "code"}`, or LoRAX's whole body, whose
        `error` is the message (the LoRAX routes add our type, param and code beside it)."""
        if not isinstance(error, dict):
            return cls(status, str(error) or f"HTTP {status}")
        message = error.get("error") if isinstance(error.get("error"), str) else error.get("message")
        return cls(
            status,
            str(message or f"HTTP {status}"),
            error.get("param"),
            error.get("code"),
            error.get("type"),
            error,
        )


class JobFailedError(LoraplexError):
    """A fine-tuning job that ended failed or cancelled, raised by the blocking `adapters.create`; `job` is the job
    as it ended, and the message its error."""

    def __init__(self, job: dict[str, Any]) -> None:
        reason = job.get("error") or ("cancelled on request" if job.get("status") == "cancelled" else "no reason given")
        super().__init__(0, f"fine-tuning job {job.get('id')} {job.get('status')}: {reason}", body=job)
        self.job = job
