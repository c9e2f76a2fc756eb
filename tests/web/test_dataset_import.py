"""POST /v1/datasets/import from s3:// through the real app, against a real S3-compatible server (moto's, on loopback,
with IAM authentication on: wrong credentials are refused as AWS refuses them): the upload's size limit and
validation, credentials never echoed nor logged, and nothing left behind (row or file) by a refused import; and every
refusal that comes before a byte is fetched (scheme, extension, the webhooks' SSRF rule, credentials against the
scheme). http(s):// and gs:// are in test_dataset_import_http_gs.py."""

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from fastapi.testclient import TestClient
from moto.core.authorization import disable_iam_authentication, enable_iam_authentication
from moto.server import ThreadedMotoServer
from test_datasets_api import CSV_DATA, PC_ROWS, assert_nothing_stored, error_of, jsonl, stored_files, upload

from app.settings import get_settings
from conftest import TINY_MODEL, InProcessWorker, Platform

QA = jsonl(PC_ROWS)
BAD = jsonl([{"prompt": "fine", "completion": "ok"}, "{not json", {"prompt": "fine", "completion": 7}])
SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYzzSECRET"  # a wrong secret key, looked for in every answer


@dataclass
class S3:
    endpoint: str
    key_id: str
    secret: str

    def credentials(self, **changes: str) -> dict[str, str]:
        return {"aws_access_key_id": self.key_id, "aws_secret_access_key": self.secret, "region": "us-east-1"} | changes


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    """moto's S3 on 127.0.0.1 (a random port): bucket `data` (private; a user `reader` may read it) and bucket
    `open` (public-read). Objects are written before IAM authentication is switched on, for the module."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    setup = {"endpoint_url": endpoint, "region_name": "us-east-1"}
    setup |= {"aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
    bucket = boto3.client("s3", **setup)
    bucket.create_bucket(Bucket="data")
    for key, body in {"qa.jsonl": QA, "sheet.csv": CSV_DATA, "bad.jsonl": BAD, "empty.jsonl": b""}.items():
        bucket.put_object(Bucket="data", Key=key, Body=body)
    bucket.put_object(Bucket="data", Key="deep/dir/rows.json", Body=QA)
    bucket.create_bucket(Bucket="open", ACL="public-read")
    bucket.put_object(Bucket="open", Key="qa.jsonl", Body=QA, ACL="public-read")
    iam = boto3.client("iam", **setup)
    iam.create_user(UserName="reader")
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    resources = ["arn:aws:s3:::data", "arn:aws:s3:::data/*", "arn:aws:s3:::open", "arn:aws:s3:::open/*"]
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": resources}]}
    iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps(policy))
    with enable_iam_authentication():
        yield S3(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    server.stop()


@pytest.fixture(autouse=True)
def server_env(platform: Platform, s3: S3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The server's S3 endpoint is moto's; the server has no AWS credentials of its own unless a test gives it some
    (no shared files, no instance metadata)."""
    monkeypatch.setenv("LORAPLEX_S3_ENDPOINT_URL", s3.endpoint)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    get_settings.cache_clear()


def import_url(client: TestClient, headers: dict[str, str], url: str, **fields: Any) -> httpx.Response:
    return client.post("/v1/datasets/import", headers=headers, json={"url": url, "base_model": TINY_MODEL} | fields)


def use_settings(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    for name, value in values.items():
        monkeypatch.setenv(f"LORAPLEX_{name.upper()}", value)
    get_settings.cache_clear()


def same_as_upload(imported: dict[str, Any], uploaded: dict[str, Any]) -> None:
    keys = ("status", "file_format", "data_format", "base_model", "size_bytes", "stats", "errors")
    assert {k: imported[k] for k in keys} == {k: uploaded[k] for k in keys}


# --- s3:// ------------------------------------------------------------------------------------------------------


def test_s3_jsonl_and_csv_are_ready_with_the_stats_of_the_same_upload(
    client: TestClient, alice: dict[str, str], worker: InProcessWorker, platform: Platform, s3: S3
) -> None:
    r = import_url(client, alice, "s3://data/qa.jsonl", credentials=s3.credentials())
    assert r.status_code == 201, r.text
    imported = r.json()
    assert (imported["name"], imported["status"], imported["size_bytes"]) == ("qa", "ready", len(QA))
    uploaded = upload(client, alice, "qa.jsonl", QA, name="qa-uploaded").json()
    same_as_upload(imported, uploaded)
    assert imported["stats"]["rows"] == 5 and imported["stats"]["total_tokens"] > 0

    r = import_url(client, alice, "s3://data/sheet.csv", name="sheet-v1", credentials=s3.credentials())
    assert r.status_code == 201, r.text
    sheet = r.json()
    assert (sheet["name"], sheet["file_format"], sheet["data_format"]) == ("sheet-v1", "csv", "prompt_completion")
    same_as_upload(sheet, upload(client, alice, "sheet.csv", CSV_DATA, name="sheet-uploaded").json())

    # A .json key is JSON Lines, as an upload's; the name is the file name's, whatever the key's folders.
    r = import_url(client, alice, "s3://data/deep/dir/rows.json", credentials=s3.credentials())
    assert r.status_code == 201 and (r.json()["name"], r.json()["file_format"]) == ("rows", "jsonl"), r.text

    # The volume holds the bytes of the object, byte for byte, named by dataset id, as an upload's.
    files = {f.name: f.read_bytes() for f in stored_files(platform)}
    assert files[f"{imported['id']}.jsonl"] == QA and files[f"{sheet['id']}.csv"] == CSV_DATA
    names = [d["name"] for d in client.get("/v1/datasets", headers=alice).json()]
    assert names == ["qa", "qa-uploaded", "sheet-v1", "sheet-uploaded", "rows"]


def test_s3_import_without_waiting_then_validated_by_the_worker(
    client: TestClient, alice: dict[str, str], platform: Platform, s3: S3
) -> None:
    r = import_url(client, alice, "s3://data/qa.jsonl", wait=False, credentials=s3.credentials())
    assert r.status_code == 202 and r.json()["status"] == "validating", r.text
    InProcessWorker().drain()
    assert client.get("/v1/datasets/qa", headers=alice).json()["status"] == "ready"
    # The same name again is a conflict found before anything is fetched.
    err = error_of(import_url(client, alice, "s3://data/qa.jsonl", credentials=s3.credentials()), 409)
    assert (err["param"], err["code"]) == ("name", "already_exists")


def test_s3_rows_are_validated_as_an_upload_and_a_bad_file_leaves_nothing(
    client: TestClient, alice: dict[str, str], worker: InProcessWorker, platform: Platform, s3: S3
) -> None:
    imported = import_url(client, alice, "s3://data/bad.jsonl", credentials=s3.credentials())
    uploaded = upload(client, alice, "bad.jsonl", BAD)
    assert imported.status_code == uploaded.status_code == 422
    assert imported.json() == uploaded.json()  # the same message, param, code and row errors
    assert imported.json()["error"]["errors"][0]["line"] == 2
    err = error_of(import_url(client, alice, "s3://data/empty.jsonl", credentials=s3.credentials()), 422)
    assert (err["param"], err["code"]) == ("url", "empty_file")
    assert_nothing_stored(platform)


def test_s3_credentials_are_used_refused_when_wrong_and_never_echoed_or_logged(
    client: TestClient,
    alice: dict[str, str],
    worker: InProcessWorker,
    platform: Platform,
    s3: S3,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = [
        s3.credentials(aws_secret_access_key=SECRET),
        s3.credentials(aws_access_key_id="AKIANOSUCHKEY0000000", aws_secret_access_key=SECRET),
    ]
    for credentials in wrong:
        r = import_url(client, alice, "s3://data/qa.jsonl", credentials=credentials)
        err = error_of(r, 422)
        assert (err["param"], err["code"]) == ("credentials", "access_denied"), err
        assert "s3://data/qa.jsonl" in err["message"] and "denied with the credentials given" in err["message"]
        assert SECRET not in r.text
    # A session token S3 cannot read is a 400 without a body (for the HEAD asked first): a failed read of the URL.
    r = import_url(client, alice, "s3://data/qa.jsonl", credentials=s3.credentials(aws_session_token=SECRET + "-t"))
    assert error_of(r, 422)["param"] in ("url", "credentials") and SECRET not in r.text
    # No credentials: an anonymous read, which the private bucket refuses, saying so, and a public one allows (moto
    # answers unsigned requests by the buckets' ACLs only with its IAM simulation off).
    with disable_iam_authentication():
        err = error_of(import_url(client, alice, "s3://data/qa.jsonl"), 422)
        assert (err["param"], err["code"]) == ("credentials", "access_denied")
        assert "no credentials were given, so it used none (an anonymous read)" in err["message"]
        assert_nothing_stored(platform)
        assert import_url(client, alice, "s3://open/qa.jsonl", name="public").status_code == 201

    # The server's own credentials serve an import without any only where the operator allows it.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret)
    err = error_of(import_url(client, alice, "s3://data/qa.jsonl"), 422)
    assert err["code"] == "access_denied"
    use_settings(monkeypatch, import_server_credentials="true")
    r = import_url(client, alice, "s3://data/qa.jsonl")
    assert r.status_code == 201 and r.json()["status"] == "ready", r.text

    # At DEBUG, botocore's loggers included; moto's own are the S3 server's (it logs what it was sent, as AWS may).
    ours = [r for r in caplog.records if not r.name.startswith(("moto", "werkzeug"))]
    assert ours and not [r.name for r in ours if SECRET in r.getMessage() or s3.secret in r.getMessage()]


def test_a_missing_object_or_bucket_is_a_404_naming_the_url(
    client: TestClient, alice: dict[str, str], platform: Platform, s3: S3
) -> None:
    def missing(url: str) -> None:
        err = error_of(import_url(client, alice, url, credentials=s3.credentials()), 404)
        assert (err["type"], err["param"], err["code"]) == ("not_found_error", "url", "url_not_found"), err
        assert err["message"] == f"url: {url} does not exist"

    missing("s3://data/missing.jsonl")
    # A bucket the reader has no right to is a 403 (as on AWS: it does not tell whether it exists); without IAM, 404.
    err = error_of(import_url(client, alice, "s3://no-such-bucket/qa.jsonl", credentials=s3.credentials()), 422)
    assert (err["param"], err["code"]) == ("credentials", "access_denied")
    with disable_iam_authentication():
        missing("s3://no-such-bucket/qa.jsonl")
    assert_nothing_stored(platform)


def test_the_upload_size_limit_holds_byte_for_byte(
    client: TestClient, alice: dict[str, str], worker: InProcessWorker, platform: Platform, s3: S3, monkeypatch: Any
) -> None:
    use_settings(monkeypatch, max_upload_bytes=str(len(QA) - 1))
    err = error_of(import_url(client, alice, "s3://data/qa.jsonl", credentials=s3.credentials()), 413)
    assert (err["param"], err["code"]) == ("url", "file_too_large")
    assert err["message"].startswith("url: larger than the ") and "LORAPLEX_MAX_UPLOAD_BYTES" in err["message"]
    assert_nothing_stored(platform)
    use_settings(monkeypatch, max_upload_bytes=str(len(QA)))
    assert import_url(client, alice, "s3://data/qa.jsonl", credentials=s3.credentials()).status_code == 201


# --- refused before a byte is fetched ---------------------------------------------------------------------------

BAD_CREDENTIALS = "invalid_credentials"


def given(url: str, **credentials: str) -> dict[str, Any]:
    return {"url": url, "credentials": credentials}


# (body, param, code), each answered 422.
REFUSED: list[tuple[dict[str, Any], str, str | None]] = [
    ({"url": "ftp://example.com/qa.jsonl"}, "url", "invalid_url_scheme"),
    ({"url": "file:///etc/passwd.jsonl"}, "url", "invalid_url_scheme"),
    ({"url": "s3://data/notes.txt"}, "url", "unsupported_format"),
    ({"url": "https://example.com/download?id=3"}, "url", "unsupported_format"),
    ({"url": "s3://data/"}, "url", "invalid_url"),
    ({"url": "s3://Data_Bucket!/qa.jsonl"}, "url", "invalid_url"),
    ({"url": "s3://user@data/qa.jsonl"}, "url", "invalid_url"),
    ({"url": "s3://data/qa.jsonl?versionId=1"}, "url", "invalid_url"),
    ({"url": "https://10.0.0.7/qa.jsonl"}, "url", "forbidden_address"),
    ({"url": "https://169.254.169.254/latest/qa.jsonl"}, "url", "forbidden_address"),
    ({"url": "https://[fd00:ec2::254]/qa.jsonl"}, "url", "forbidden_address"),
    ({"url": "https://127.0.0.1:9/qa.jsonl"}, "url", "forbidden_address"),  # loopback: not by default
    ({"url": "https://localhost/qa.jsonl"}, "url", "forbidden_address"),
    ({"url": "http://127.0.0.1:9/qa.jsonl"}, "url", "invalid_url"),  # plain http: not by default
    ({"url": "https://user:pw@example.com/qa.jsonl"}, "url", "invalid_url"),
    ({"url": f"https://user:{SECRET}@example.com/download"}, "url", "unsupported_format"),  # not shown either
    ({"url": "s3://data/qa.jsonl", "endpoint_url": "http://10.0.0.7"}, "endpoint_url", "invalid_value"),
    ({"url": "s3://data/qa.jsonl", "credentials": {"endpoint_url": "x"}}, "credentials.endpoint_url", "invalid_value"),
    (given("s3://data/qa.jsonl", token="{}"), "credentials.token", BAD_CREDENTIALS),
    (given("gs://data/qa.jsonl", aws_access_key_id="A"), "credentials.aws_access_key_id", BAD_CREDENTIALS),
    (given("https://example.com/qa.jsonl", region="eu-west-1"), "credentials.region", BAD_CREDENTIALS),
    (given("s3://data/a.csv", aws_access_key_id="A"), "credentials.aws_secret_access_key", BAD_CREDENTIALS),
    (given("s3://data/a.csv", aws_secret_access_key=SECRET), "credentials.aws_access_key_id", BAD_CREDENTIALS),
    (given("s3://data/qa.jsonl", region="../x"), "credentials.region", "invalid_value"),
    ({"url": "s3://data/qa.jsonl", "name": "bad name!"}, "name", None),
    ({"url": "s3://data/qa.jsonl", "base_model": "gpt-17"}, "base_model", None),
    ({"base_model": TINY_MODEL}, "url", "invalid_value"),
]  # fmt: skip


def test_bad_urls_and_credentials_are_refused_naming_the_field(
    client: TestClient, alice: dict[str, str], platform: Platform
) -> None:
    for body, param, code in REFUSED:
        r = client.post("/v1/datasets/import", headers=alice, json={"base_model": TINY_MODEL} | body)
        err = error_of(r, 422)
        assert (err["param"], err["code"]) == (param, code), (body, err)
        assert err["message"].startswith(f"{param}: "), err
        assert SECRET not in r.text
    assert_nothing_stored(platform)
