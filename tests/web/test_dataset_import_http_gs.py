"""POST /v1/datasets/import from http(s):// URLs, against a real local HTTP(S) server on loopback (which imports may
reach only under LORAPLEX_IMPORT_ALLOW_LOOPBACK), and from gs:// URLs: no GCS server runs here, so gs:// is tested
against a stand-in of GCS's JSON API (anonymous reads, as gcsfs makes them) and up to the key checks that come before
any fetch (a service-account key is exchanged for a token at Google's token endpoint, which tests cannot reach)."""

import http.server
import json
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from fastapi.testclient import TestClient
from test_dataset_import import QA, import_url, same_as_upload, use_settings
from test_datasets_api import CSV_DATA, assert_nothing_stored, error_of, stored_files, upload

from conftest import InProcessWorker, Platform, free_port

# --- http(s):// from a real local server ------------------------------------------------------------------------


class Files:
    """An HTTP(S) server on 127.0.0.1 serving `files` by path; a few paths answer otherwise (see do_GET)."""

    def __init__(self, files: dict[str, bytes], tls: ssl.SSLContext | None = None) -> None:
        self.files = files
        self.requests: list[str] = []  # the paths asked for, query included
        served = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                served.requests.append(self.path)
                path = self.path.split("?", 1)[0]
                if path == "/moved.jsonl":
                    return self._answer(302, b"", {"Location": "/qa.jsonl?X-Amz-Signature=REDIRECTSECRET"})
                if path == "/private.jsonl":
                    return self._answer(403, b"no")
                if path == "/chunked.jsonl":  # no Content-Length: only the reader's count stops it
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for _ in range(64):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(QA), QA))
                    self.wfile.write(b"0\r\n\r\n")
                    return None
                if path not in served.files:
                    return self._answer(404, b"not found")
                return self._answer(200, served.files[path])

            def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def files() -> Iterator[Files]:
    served = Files({"/qa.jsonl": QA, "/data/sheet.csv": CSV_DATA})
    yield served
    served.stop()


def test_http_on_loopback_when_allowed_no_redirects_and_the_limit(
    client: TestClient,
    alice: dict[str, str],
    worker: InProcessWorker,
    platform: Platform,
    files: Files,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = f"http://127.0.0.1:{files.port}"
    err = error_of(import_url(client, alice, f"{base}/qa.jsonl"), 422)  # loopback is not allowed by default
    assert (err["param"], err["code"]) == ("url", "invalid_url")
    use_settings(monkeypatch, import_allow_loopback="true")

    # A presigned URL's query string is a credential: it is sent, and never shown.
    r = import_url(client, alice, f"{base}/qa.jsonl?X-Amz-Signature=QUERYSECRET")
    assert r.status_code == 201, r.text
    uploaded = upload(client, alice, "qa.jsonl", QA, name="qa-uploaded").json()
    same_as_upload(r.json(), uploaded)
    assert r.json()["name"] == "qa" and files.requests[-1] == "/qa.jsonl?X-Amz-Signature=QUERYSECRET"
    r = import_url(client, alice, f"{base}/data/sheet.csv")
    assert (r.status_code, r.json()["file_format"], r.json()["name"]) == (201, "csv", "sheet"), r.text
    before = stored_files(platform)

    err = error_of(import_url(client, alice, f"{base}/missing.jsonl?sig=QUERYSECRET"), 404)
    assert (err["param"], err["code"], err["message"]) == (
        "url",
        "url_not_found",
        f"url: {base}/missing.jsonl does not exist (HTTP 404)",
    )
    r = import_url(client, alice, f"{base}/moved.jsonl?sig=QUERYSECRET")
    err = error_of(r, 422)
    assert (err["param"], err["code"]) == ("url", "redirect_not_followed")
    assert "HTTP 302" in err["message"] and "SECRET" not in r.text
    assert files.requests[-1].startswith("/moved.jsonl")  # the redirect's target was never asked for
    err = error_of(import_url(client, alice, f"{base}/private.jsonl"), 422)
    assert (err["param"], err["code"]) == ("url", "access_denied")
    use_settings(monkeypatch, max_upload_bytes=str(10 * len(QA)))
    err = error_of(import_url(client, alice, f"{base}/chunked.jsonl"), 413)
    assert (err["param"], err["code"]) == ("url", "file_too_large")
    files.stop()
    err = error_of(import_url(client, alice, f"{base}/qa.jsonl", name="down"), 422)
    assert (err["code"], err["message"]) == (
        "fetch_failed",
        f"url: {base}/qa.jsonl could not be fetched (connection refused)",
    )
    assert stored_files(platform) == before  # every refusal above left nothing


def test_https_is_verified_against_the_urls_host(
    client: TestClient,
    alice: dict[str, str],
    worker: InProcessWorker,
    platform: Platform,
    certificate: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(*certificate)
    served = Files({"/qa.jsonl": QA}, tls=tls)
    try:
        use_settings(monkeypatch, import_allow_loopback="true")
        url = f"https://localhost:{served.port}/qa.jsonl"
        err = error_of(import_url(client, alice, url), 422)  # a self-signed certificate is not trusted
        assert (err["code"], err["message"]) == (
            "fetch_failed",
            f"url: {url} could not be fetched (TLS: CERTIFICATE_VERIFY_FAILED)",
        )
        monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))  # now it is, for the name in the certificate
        err = error_of(import_url(client, alice, f"https://127.0.0.1:{served.port}/qa.jsonl"), 422)
        assert "CERTIFICATE_VERIFY_FAILED" in err["message"] or "IP address mismatch" in err["message"]
        r = import_url(client, alice, url)
        assert r.status_code == 201 and r.json()["status"] == "ready", r.text
    finally:
        served.stop()


# --- gs:// --------------------------------------------------------------------------------------------------------

PRIVATE_KEY = (
    "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwSECRETKEYBYTES\n-----END PRIVATE KEY-----\n"
)
SERVICE_ACCOUNT = {
    "type": "service_account",
    "project_id": "p",
    "private_key_id": "0123456789abcdef",
    "private_key": PRIVATE_KEY,
    "client_email": "reader@p.iam.gserviceaccount.com",
    "client_id": "1",
}


def test_gs_keys_are_checked_before_any_fetch_and_never_echoed(
    client: TestClient, alice: dict[str, str], platform: Platform
) -> None:
    cases: list[tuple[Any, str]] = [
        ("not json", "not JSON"),
        ({"type": "authorized_user", "refresh_token": "x"}, "only a service-account key"),
        ({"type": "external_account", "credential_source": {"file": "/etc/shadow"}}, "only a service-account key"),
        (SERVICE_ACCOUNT | {"token_uri": "http://169.254.169.254/token"}, "token_uri must be Google's"),
        (SERVICE_ACCOUNT, "not a usable service-account key"),  # the private key does not parse
        (json.dumps(SERVICE_ACCOUNT), "not a usable service-account key"),  # the key file's text: the same
        ({k: v for k, v in SERVICE_ACCOUNT.items() if k != "client_email"}, "not a usable service-account key"),
    ]
    for token, fragment in cases:
        r = import_url(client, alice, "gs://data/qa.jsonl", credentials={"token": token})
        err = error_of(r, 422)
        assert (err["param"], err["code"]) == ("credentials.token", "invalid_credentials")
        assert fragment in err["message"], err
        assert "SECRETKEYBYTES" not in r.text and "0123456789abcdef" not in r.text
    assert_nothing_stored(platform)


class GcsStandIn:
    """GCS's JSON API as gcsfs reads one object (its metadata, then a ranged download), over plain http on loopback:
    a stand-in for the cloud, which tests cannot reach. `objects` maps "bucket/key" to bytes; the bucket `locked`
    refuses every request (403), as a private bucket refuses an anonymous caller."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.requests: list[tuple[str, str | None]] = []  # (path, Authorization header)
        served = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                url = urlsplit(self.path)
                served.requests.append((url.path, self.headers.get("Authorization")))
                if url.path.startswith(("/storage/v1/b/locked/", "/download/storage/v1/b/locked/")):
                    return self._answer(403, {"error": {"code": 403, "message": "anonymous caller has no access"}})
                if "/o/" not in url.path:  # a listing: gcsfs looks for a "directory" of the name too
                    return self._answer(200, {"kind": "storage#objects"})
                head, _, key = url.path.partition("/o/")
                bucket, key = head.rsplit("/b/", 1)[1], unquote(key)
                if f"{bucket}/{key}" not in objects:
                    return self._answer(404, {"error": {"code": 404, "message": "No such object"}})
                data = objects[f"{bucket}/{key}"]
                if url.path.startswith("/download/"):
                    first, _, last = self.headers.get("Range", "bytes=0-").removeprefix("bytes=").partition("-")
                    return self._answer(200, data[int(first) : int(last) + 1 if last else None])
                metadata = {"kind": "storage#object", "bucket": bucket, "name": key, "size": str(len(data))}
                return self._answer(200, metadata | {"generation": "1", "updated": "2026-01-01T00:00:00Z"})

            def _answer(self, status: int, body: dict[str, Any] | bytes) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header(
                    "Content-Type", "application/octet-stream" if isinstance(body, bytes) else "application/json"
                )
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_gs_reads_through_gcsfs_from_the_servers_endpoint_anonymously(
    client: TestClient, alice: dict[str, str], worker: InProcessWorker, platform: Platform, monkeypatch: Any
) -> None:
    gcs = GcsStandIn({"data/qa.jsonl": QA, "data/sheets/sheet.csv": CSV_DATA})
    try:
        use_settings(monkeypatch, gcs_endpoint_url=gcs.url)
        r = import_url(client, alice, "gs://data/qa.jsonl")
        assert r.status_code == 201, r.text
        same_as_upload(r.json(), upload(client, alice, "qa.jsonl", QA, name="qa-uploaded").json())
        r = import_url(client, alice, "gs://data/sheets/sheet.csv")
        assert (r.status_code, r.json()["name"], r.json()["file_format"]) == (201, "sheet", "csv"), r.text
        assert {auth for _, auth in gcs.requests} == {None}  # anonymous: the server's own credentials stay unused
        before = stored_files(platform)

        err = error_of(import_url(client, alice, "gs://data/missing.jsonl"), 404)
        assert (err["param"], err["code"], err["message"]) == (
            "url",
            "url_not_found",
            "url: gs://data/missing.jsonl does not exist",
        )
        err = error_of(import_url(client, alice, "gs://locked/qa.jsonl", name="locked"), 422)
        assert (err["param"], err["code"]) == ("credentials", "access_denied"), err
        use_settings(monkeypatch, max_upload_bytes=str(len(QA) - 1))
        err = error_of(import_url(client, alice, "gs://data/qa.jsonl", name="big"), 413)
        assert (err["param"], err["code"]) == ("url", "file_too_large")
        assert stored_files(platform) == before
    finally:
        gcs.stop()
