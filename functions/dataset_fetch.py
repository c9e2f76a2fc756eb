"""A dataset's file fetched from a URL: s3://bucket/key, gs://bucket/key or https://host/path (plain http:// only to
loopback, under LORAPLEX_IMPORT_ALLOW_LOOPBACK: tests and one-machine setups).

`source_of` checks everything it can before a byte moves: the scheme, bucket and key, the extension (.jsonl, .json,
.csv, as an upload's file name), the credentials against the scheme, and for http(s) the webhooks' SSRF rule
(functions/webhook_http.py: every address the host resolves to must be public). `fetch` then copies the file into a
local path, blocking (the API runs it in a worker thread): s3:// and gs:// through fsspec (s3fs, gcsfs), http(s)
through webhook_http.exchange, connected to the address that was checked, no redirect followed, a deadline on the
whole transfer. At most limit + 1 bytes are ever read: one past the limit is refused (TooLarge).

Where S3 and GCS are comes from the server's settings only (LORAPLEX_S3_ENDPOINT_URL, LORAPLEX_GCS_ENDPOINT_URL),
never from a request, so a tenant cannot aim the server at an internal host. Credentials are the request's, else
none (an anonymous read); the server's own (its environment, an instance role) only under
LORAPLEX_IMPORT_SERVER_CREDENTIALS, since any tenant could then import what the server can read. They live for one
fetch: never stored, never logged (the cloud libraries' loggers are held at INFO: botocore's debug log prints request
headers, a session token among them), and every refusal's message is scrubbed of them.
"""

import http.client
import ipaddress
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr

from app.errors import Invalid, NotFound, Refusal, TooLarge
from app.settings import get_settings
from functions.datasets import FileFormat, detect_file_format
from functions.webhook_http import Target, check_url, exchange, failure_text

CHUNK = 4 * 1024 * 1024  # bytes read at a time (one ranged GET of an object)
BUCKET_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")  # S3's and GCS's bucket-name alphabet
GOOGLE_TOKEN_URIS = frozenset({"https://oauth2.googleapis.com/token", "https://accounts.google.com/o/oauth2/token"})
GCS_READ_ONLY = "https://www.googleapis.com/auth/devstorage.read_only"
SCRUBBED = "***"

for _name in ("botocore", "aiobotocore", "s3fs", "gcsfs", "fsspec", "google.auth", "urllib3"):
    logging.getLogger(_name).setLevel(logging.INFO)


def _json_text(value: Any) -> Any:
    """A service-account key may come as the key file's JSON object or as its text; kept as text (a SecretStr)."""
    return json.dumps(value) if isinstance(value, dict) else value


class Credentials(BaseModel):
    """Credentials for one import, used for it and forgotten. S3: an access key (and a session token for temporary
    ones); GCS: a service-account key. None given: an anonymous read."""

    model_config = ConfigDict(extra="forbid")

    aws_access_key_id: str | None = Field(default=None, min_length=1, max_length=128, description="s3:// only.")
    aws_secret_access_key: SecretStr | None = Field(default=None, min_length=1, max_length=256)
    aws_session_token: SecretStr | None = Field(default=None, min_length=1, max_length=8192)
    region: str | None = Field(default=None, pattern=r"^[a-z0-9-]{1,40}$", description="The bucket's AWS region.")
    token: Annotated[SecretStr | None, BeforeValidator(_json_text)] = Field(
        default=None,
        max_length=16384,
        description="gs:// only: a service-account key, the key file's JSON (as an object or as text).",
    )


@dataclass(frozen=True)
class Source:
    """A checked URL: where the bytes are and how to ask for them."""

    url: str  # as messages show it: no query or fragment (a presigned URL's signature is a credential)
    scheme: str  # s3 | gs | https | http
    path: str  # bucket/key for s3 and gs; "" for http(s)
    file_format: FileFormat
    stem: str  # the file name without extension: the dataset's default name
    credentials: Credentials | None
    google_credentials: Any = None  # gs:// with a token: google.oauth2 service-account credentials
    http: Target | None = None  # http(s): the checked address


def source_of(url: str, credentials: Credentials | None) -> Source:
    """The URL checked (Invalid naming `url` or `credentials.<field>`); no byte fetched. Resolves an http(s) host."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise Invalid(f"url: not a valid URL ({exc})", field="url", code="invalid_url") from None
    scheme = parts.scheme.lower()
    if scheme not in ("s3", "gs", "https", "http"):
        message = "url: only s3://, gs:// and https:// URLs can be imported"
        raise Invalid(message, field="url", code="invalid_url_scheme")
    _check_credentials(scheme, credentials)
    if scheme in ("s3", "gs"):
        shown, path, name = _object_parts(url, parts.netloc, parts.path, parts.query, parts.fragment)
    else:
        shown = f"{scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"  # no user:password@ either
        path, name = "", unquote(PurePosixPath(parts.path).name)
    file_format = detect_file_format(name)
    if file_format is None:
        message = f"url: {shown} does not end in .jsonl, .json or .csv (the file format is read from the extension)"
        raise Invalid(message, field="url", code="unsupported_format")
    google = _service_account(credentials.token) if credentials and credentials.token else None
    http_target = _http_target(url, scheme) if scheme in ("https", "http") else None
    return Source(shown, scheme, path, file_format, PurePosixPath(name).stem, credentials, google, http_target)


def fetch(source: Source, target: Path, limit: int) -> int:
    """Copy the file into `target`; its size in bytes. TooLarge past `limit`, NotFound for a missing file, Invalid
    naming `url` or `credentials` for the rest (denied, unreachable, too slow, empty), each message scrubbed of the
    request's credentials."""
    timeout = get_settings().imports.import_timeout_seconds
    deadline = time.monotonic() + timeout
    try:
        if source.http is not None:
            size = _fetch_http(source, source.http, target, limit, timeout)
        else:
            size = _fetch_object(source, target, limit, deadline)
    except TimeoutError:
        message = f"url: {source.url} was not read in full within {timeout:g} s (LORAPLEX_IMPORT_TIMEOUT_SECONDS)"
        raise _scrubbed(Invalid(message, field="url", code="fetch_timeout"), source.credentials) from None
    except Refusal as refused:
        raise _scrubbed(refused, source.credentials) from None
    if size == 0:
        raise Invalid("url: the file is empty", field="url", code="empty_file")
    return size


# ---- checks -------------------------------------------------------------------------------------------------


def _check_credentials(scheme: str, credentials: Credentials | None) -> None:
    if credentials is None:
        return
    given = credentials.model_dump(exclude_none=True)
    allowed = {"s3": {"aws_access_key_id", "aws_secret_access_key", "aws_session_token", "region"}, "gs": {"token"}}
    for field in given:
        if field not in allowed.get(scheme, set()):
            kind = "an s3://" if field != "token" else "a gs://"
            message = f"credentials.{field}: only for {kind} URL; this one is {scheme}://"
            raise Invalid(message, field=f"credentials.{field}", code="invalid_credentials")
    key_id, secret = credentials.aws_access_key_id, credentials.aws_secret_access_key
    if (key_id is None) != (secret is None) or (credentials.aws_session_token and key_id is None):
        missing = "aws_access_key_id" if key_id is None else "aws_secret_access_key"
        message = f"credentials.{missing}: aws_access_key_id and aws_secret_access_key go together"
        raise Invalid(message, field=f"credentials.{missing}", code="invalid_credentials")


def _object_parts(url: str, bucket: str, key: str, query: str, fragment: str) -> tuple[str, str, str]:
    """(URL as shown, bucket/key for fsspec, the file name) of s3://bucket/key or gs://bucket/key."""
    if query or fragment:
        message = "url: '?' and '#' are not supported in an object URL (no versions, no options)"
        raise Invalid(message, field="url", code="invalid_url")
    if not (3 <= len(bucket) <= 222 and set(bucket) <= BUCKET_CHARS and bucket[0].isalnum() and bucket[-1].isalnum()):
        message = f"url: {bucket!r} is not a bucket name (3 to 222 of a-z, 0-9, '.', '-', '_')"
        raise Invalid(message, field="url", code="invalid_url")
    key = key.lstrip("/")
    if not key or key.endswith("/"):
        raise Invalid(f"url: {url} names no object (s3://bucket/key)", field="url", code="invalid_url")
    return url, f"{bucket}/{key}", PurePosixPath(key).name


def _http_target(url: str, scheme: str) -> Target:
    """The webhooks' SSRF rule (webhook_http.check_url); plain http:// only where every address is loopback."""
    allow_loopback = get_settings().imports.import_allow_loopback
    if scheme == "http" and not allow_loopback:
        raise Invalid("url: only https:// (not plain http://) URLs can be imported", field="url", code="invalid_url")
    target = check_url(url, allow_loopback=allow_loopback, reach="datasets are fetched from")
    if scheme == "http" and not all(ipaddress.ip_address(address).is_loopback for _, address in target.addresses):
        raise Invalid("url: plain http:// reaches loopback only; use https://", field="url", code="invalid_url")
    return target


def _service_account(token: SecretStr) -> Any:
    """google.oauth2 credentials from a service-account key, read-only. Only that kind: the other kinds of Google
    credentials read files or URLs that the key names, on this server; and its token_uri must be Google's, since the
    server sends a signed request there."""
    try:
        info = json.loads(token.get_secret_value())
    except ValueError:
        message = "credentials.token: not JSON (give the key file's JSON)"
        raise Invalid(message, field="credentials.token", code="invalid_credentials") from None
    if not isinstance(info, dict) or info.get("type") != "service_account":
        message = 'credentials.token: only a service-account key ("type": "service_account") is accepted'
        raise Invalid(message, field="credentials.token", code="invalid_credentials")
    if info.setdefault("token_uri", min(GOOGLE_TOKEN_URIS)) not in GOOGLE_TOKEN_URIS:
        message = "credentials.token: token_uri must be Google's (https://oauth2.googleapis.com/token)"
        raise Invalid(message, field="credentials.token", code="invalid_credentials")
    from google.oauth2 import service_account  # heavy; only gs:// imports need it

    try:
        return service_account.Credentials.from_service_account_info(info, scopes=[GCS_READ_ONLY])
    except (ValueError, KeyError, TypeError) as exc:  # a malformed key; the message names a field, never a value
        reason = f"missing {exc}" if isinstance(exc, KeyError) else type(exc).__name__
        message = f"credentials.token: not a usable service-account key ({reason})"
        raise Invalid(message, field="credentials.token", code="invalid_credentials") from None


# ---- fetching -----------------------------------------------------------------------------------------------


def _fetch_http(source: Source, checked: Target, target: Path, limit: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    headers = {"Accept": "*/*", "User-Agent": "loraplex-dataset-import"}  # no Accept-Encoding: the bytes as stored
    try:
        with exchange(checked, "GET", None, headers, timeout) as answer:
            _check_answer(source, answer, limit)
            return _copy(answer.read, target, limit, deadline)
    except TimeoutError:
        raise
    except (OSError, http.client.HTTPException) as exc:
        message = f"url: {source.url} could not be fetched ({failure_text(exc)})"
        raise Invalid(message, field="url", code="fetch_failed") from None


def _check_answer(source: Source, answer: http.client.HTTPResponse, limit: int) -> None:
    status = answer.status
    if 300 <= status < 400:
        location = (answer.getheader("Location") or "").split("?", 1)[0]
        to = f" to {location}" if location else ""
        message = f"url: {source.url} answered HTTP {status}, a redirect{to}; redirects are not followed"
        raise Invalid(message + ": import the final URL", field="url", code="redirect_not_followed")
    if status in (404, 410):
        raise NotFound(f"url: {source.url} does not exist (HTTP {status})", field="url", code="url_not_found")
    if status in (401, 403):
        message = f"url: {source.url} answered HTTP {status}: access denied (an https import sends no credentials)"
        raise Invalid(message, field="url", code="access_denied")
    if status != 200:
        raise Invalid(f"url: {source.url} answered HTTP {status}", field="url", code="fetch_failed")
    length = answer.getheader("Content-Length") or ""
    if length.isdigit() and int(length) > limit:
        raise TooLarge("url: over the size limit", field="url", code="file_too_large")


def _fetch_object(source: Source, target: Path, limit: int, deadline: float) -> int:
    try:
        fs = _s3(source) if source.scheme == "s3" else _gcs(source)
        with fs.open(source.path, "rb", block_size=CHUNK, cache_type="none") as remote:
            if remote.size is not None and remote.size > limit:
                raise TooLarge("url: over the size limit", field="url", code="file_too_large")
            return _copy(remote.read, target, limit, deadline)
    except (Refusal, TimeoutError):
        raise
    except FileNotFoundError:
        raise NotFound(f"url: {source.url} does not exist", field="url", code="url_not_found") from None
    except Exception as exc:  # noqa: BLE001 - any failure of the remote library is this URL's: told, never raised
        raise _read_failure(source, exc) from None


def _read_failure(source: Source, exc: Exception) -> Refusal:
    """What a failed object read tells the tenant. A 403 is PermissionError from s3fs, and from gcsfs an OSError
    worded "Forbidden: ..."; another OSError is the store's answer as they word it ("Bad Request"); any other text
    may name the server's own endpoint, which tenants are not told."""
    if isinstance(exc, PermissionError) or (isinstance(exc, OSError) and str(exc).startswith("Forbidden")):
        return Invalid(_denied(source), field="credentials", code="access_denied")
    reason = f"{type(exc).__name__}: {exc}" if isinstance(exc, OSError) and str(exc) else type(exc).__name__
    return Invalid(f"url: {source.url} could not be read ({reason})", field="url", code="fetch_failed")


def _denied(source: Source) -> str:
    if source.credentials is not None:
        return f"credentials: access to {source.url} was denied with the credentials given"
    how = "the server's own" if get_settings().imports.import_server_credentials else "none (an anonymous read)"
    return f"credentials: access to {source.url} was denied; no credentials were given, so it used {how}"


def _s3(source: Source) -> Any:
    import s3fs  # heavy; only s3:// imports need it

    settings = get_settings().imports
    creds = source.credentials or Credentials()
    seconds = settings.import_timeout_seconds
    options: dict[str, Any] = {
        "endpoint_url": settings.s3_endpoint_url,  # the server's, never the request's
        "config_kwargs": {"connect_timeout": seconds, "read_timeout": seconds, "retries": {"max_attempts": 2}},
        "skip_instance_cache": True,  # fsspec would keep the instance, the credentials with it, for the next caller
    }
    if creds.aws_access_key_id and creds.aws_secret_access_key:
        options["key"] = creds.aws_access_key_id
        options["secret"] = creds.aws_secret_access_key.get_secret_value()
        if creds.aws_session_token:
            options["token"] = creds.aws_session_token.get_secret_value()
    elif not settings.import_server_credentials:
        options["anon"] = True
    if creds.region:
        options["client_kwargs"] = {"region_name": creds.region}
    return s3fs.S3FileSystem(**options)


def _gcs(source: Source) -> Any:
    # Not tested against a real GCS server (none runs in the tests); tests reach only the key checks above.
    from gcsfs.core import GCSFileSystem  # heavy; only gs:// imports need it

    # gcsfs.GCSFileSystem is, by default, an extended class that first asks the storage control API (gRPC) what kind
    # of bucket it is, waiting up to 60 s where that API does not answer; one object read needs only the JSON API.
    settings = get_settings().imports
    token: Any = source.google_credentials or (None if settings.import_server_credentials else "anon")
    return GCSFileSystem(
        token=token,  # a credentials object, never a string: gcsfs would read a string naming a file on this server
        access="read_only",
        endpoint_url=settings.gcs_endpoint_url,  # the server's, never the request's
        requests_timeout=settings.import_timeout_seconds,
        skip_instance_cache=True,
    )


def _copy(read: Any, target: Path, limit: int, deadline: float) -> int:
    """Copy what `read(n)` gives into `target`, at most limit + 1 bytes read; TooLarge past `limit`."""
    size = 0
    with target.open("wb") as out:
        while chunk := read(min(CHUNK, limit + 1 - size)):
            size += len(chunk)
            if size > limit:
                raise TooLarge("url: over the size limit", field="url", code="file_too_large")
            if time.monotonic() > deadline:
                raise TimeoutError
            out.write(chunk)
    return size


def _scrubbed(refused: Refusal, credentials: Credentials | None) -> Refusal:
    """The same refusal, its message with every credential value of the request replaced by ***."""
    message = refused.message
    for secret in _secrets(credentials):
        message = message.replace(secret, SCRUBBED)
    return type(refused)(message, field=refused.field, code=refused.code, retry_after=refused.retry_after)


def _secrets(credentials: Credentials | None) -> list[str]:
    """Every credential value of the request, and the parts of a service-account key (its private key, its id)."""
    if credentials is None:
        return []
    values = [credentials.aws_secret_access_key, credentials.aws_session_token, credentials.token]
    found = [value.get_secret_value() for value in values if value is not None]
    if credentials.token is not None:
        try:
            info = json.loads(credentials.token.get_secret_value())
        except ValueError:
            info = None
        if isinstance(info, dict):
            found += [str(info[part]) for part in ("private_key", "private_key_id") if part in info]
    return [secret for secret in found if len(secret) >= 4]
