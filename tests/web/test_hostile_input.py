"""Hostile and careless input at the edge (issue 10, findings 3, 8 and 10).

Every inference route and dialect, streamed or not, answers out-of-range and wrong-typed numbers, invalid Unicode,
unknown fields and broken bodies with a 4xx in the API's error shape whose `param` names the field, never a 5xx,
and another tenant is served in full meanwhile. Names are matched in full (no trailing newline), and request bodies
have their own limits, counted while they are read.

Every request of the table is refused before any work, so the module shares one platform (SQLite) and one app.
"""

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi.testclient import TestClient

from app.names import DEPLOYMENT_NAME, NAME
from conftest import TINY_MODEL, _make_platform, make_tenant
from lora_helpers import build_lora

DEPLOYMENT = "hostile"
ROUTES = [
    ("/v1/chat/completions", "chat"),
    ("/v1/completions", "completion"),
    (f"/v1/deployments/{DEPLOYMENT}/chat/completions", "chat"),
    (f"/v1/deployments/{DEPLOYMENT}/completions", "completion"),
]
VALID = {
    "chat": {"model": TINY_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    "completion": {"model": TINY_MODEL, "prompt": "Hi", "max_tokens": 4},
}
ENV = {
    "LORAPLEX_SHARED_REQUESTS_PER_SECOND": "0",  # the table sends hundreds of requests a second
    "LORAPLEX_DEPLOYMENT_PREWARM": "false",  # no spare interpreter: no replica is ever needed here
    "LORAPLEX_MAX_UPLOAD_BYTES": str(4 * 1024 * 1024),  # above the JSON limit (1 MiB, the default)
}
BIG = 2**64
SURROGATE = "@surrogate@"  # replaced by the JSON escape \ud800 in the raw body: json.dumps cannot write it


def said(content: Any, **extra: Any) -> dict[str, Any]:
    """`messages` of one user message."""
    return {"messages": [{"role": "user", "content": content} | extra]}


# Numeric fields of both dialects, each with values out of range or of the wrong type (the default max_tokens
# limit is 2048; min_tokens may not exceed max_tokens, 4 here).
NUMBERS: dict[str, list[Any]] = {
    "max_tokens": [0, -1, 2049, BIG, 1.5, "4", True, [4]],
    "temperature": [-0.1, 2.01, BIG, "0.5", True, None, {}],
    "top_p": [0, -1, 1.01, "1", None],
    "top_k": [-1, 1001, BIG, 2.5, "5", False],
    "repetition_penalty": [0, -1, 10.01, "1.1"],
    "seed": [-1, 2**63, BIG, -BIG, 1.5, "42", True],
    "min_tokens": [-1, 5, BIG, "1"],
    "num_beams": [0, 9, BIG, 1.5, "2"],
    "n": [0, 9, BIG, "1"],
    "frequency_penalty": [2.5, -2.5, BIG, "0.5"],
    "presence_penalty": [2.5, -2.5, BIG, "0.5"],
    "stream": ["true", 1, None],
}
DIALECT_NUMBERS: dict[str, dict[str, list[Any]]] = {
    "chat": {"max_completion_tokens": [0, 2049, BIG, "4"], "top_logprobs": [-1, 21, BIG, "2"], "logprobs": ["yes", 1]},
    "completion": {"logprobs": [-1, 6, BIG, True, "2"]},
}
# Where each dialect has strings: (change to the valid body, the param named).
STRINGS: dict[str, list[tuple[dict[str, Any], str]]] = {
    "chat": [
        (said(SURROGATE), "messages.0.content"),
        (said([{"type": "text", "text": "a" + SURROGATE}]), "messages.0.content.0.text"),
        ({"messages": [{"role": SURROGATE, "content": "Hi"}]}, "messages.0.role"),
    ],
    "completion": [
        ({"prompt": SURROGATE}, "prompt"),
        ({"prompt": ["Hi " + SURROGATE]}, "prompt.0"),
    ],
}
COMMON_STRINGS: list[tuple[dict[str, Any], str]] = [
    ({"model": SURROGATE}, "model"),
    ({"stop": SURROGATE}, "stop"),
    ({"stop": ["ok", SURROGATE]}, "stop.1"),
    ({"user": SURROGATE}, "user"),
    ({SURROGATE: 1}, "\\ud800"),  # a field name: named with the escape, as the text itself cannot be sent back
]
# Fields OpenAI has and we do not implement, or nobody has: refused by name, never silently ignored.
UNKNOWN: dict[str, list[tuple[dict[str, Any], str]]] = {
    "chat": [
        (said("Hi", name="x"), "messages.0.name"),
        (said([{"type": "text", "text": "Hi", "x": 1}]), "messages.0.content.0.x"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ],
    "completion": [({"suffix": "!"}, "suffix"), ({"echo": True}, "echo"), ({"best_of": 2}, "best_of")],
}
COMMON_UNKNOWN: list[tuple[dict[str, Any], str]] = [
    ({"stream_options": {"include_usage": True, "x": 1}}, "stream_options.x"),
    ({"surprise": 1}, "surprise"),
]
# Values of the right type but the wrong shape.
SHAPES: dict[str, list[tuple[dict[str, Any], str]]] = {
    "chat": [
        ({"messages": "Hi"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "Hi"}]}, "messages.0"),  # tool calling is refused
        (said(5), "messages.0.content"),
        (said([{"type": "image_url", "text": "x"}]), "messages.0.content.0.type"),
    ],
    "completion": [({"prompt": 5}, "prompt"), ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": ["a", 5]}, "prompt.1")],
}
COMMON_SHAPES: list[tuple[dict[str, Any], str]] = [
    ({"model": 5}, "model"),
    ({"stop": 5}, "stop"),
    ({"stop": ["a", 5]}, "stop.1"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stream_options": 5}, "stream_options"),
]
# JSON that Python's json reads and JSON has not: a number that is not finite.
NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e999"]


def hostile_bodies(dialect: str, stream: bool) -> list[tuple[bytes, str]]:
    """(raw body, the param it must be refused for) of the table, for one dialect, streamed or not."""
    changes = [({field: value}, field) for field, values in NUMBERS.items() for value in values]
    changes += [({field: value}, field) for field, values in DIALECT_NUMBERS[dialect].items() for value in values]
    changes += STRINGS[dialect] + COMMON_STRINGS + UNKNOWN[dialect] + COMMON_UNKNOWN + SHAPES[dialect] + COMMON_SHAPES
    valid = VALID[dialect] | {"stream": stream}
    bodies = [(json.dumps(valid | change).replace(SURROGATE, "\\ud800").encode(), param) for change, param in changes]
    for literal in NON_FINITE:
        for field in ("temperature", "top_p"):
            bodies.append((json.dumps(valid | {field: 0.5}).replace("0.5", literal).encode(), field))
    return bodies


@dataclass
class Api:
    client: TestClient
    alice: dict[str, str]
    bob: dict[str, str]

    @property
    def json_headers(self) -> dict[str, str]:
        return self.alice | {"Content-Type": "application/json"}

    def post(self, path: str, raw: bytes | Iterator[bytes]) -> Any:
        """alice's raw body (bytes or, sent chunked, an iterator of them) as JSON."""
        return self.client.post(path, content=raw, headers=self.json_headers)

    def post_all(self, path: str, bodies: list[bytes]) -> list[httpx.Response]:
        """alice's raw JSON bodies one after the other, from one event loop straight into the app (the test client
        hops threads several times a request: ten times slower, for the same app)."""

        async def run() -> list[httpx.Response]:
            transport = httpx.ASGITransport(app=self.client.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
                return [await http.post(path, content=raw, headers=self.json_headers) for raw in bodies]

        return asyncio.run(run())


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Any) -> Iterator[Api]:
    """One SQLite platform and one app for the module, with alice's Standby deployment (it never needs a replica:
    every request to it here is refused before one would be woken)."""
    from web.main import create_app

    with pytest.MonkeyPatch.context() as monkeypatch:
        for key, value in ENV.items():
            monkeypatch.setenv(key, value)
        for _ in _make_platform(tmp_path_factory.mktemp("hostile"), "sqlite", monkeypatch, tiny_model_dir):
            with TestClient(create_app()) as client:
                api = Api(client, make_tenant("alice")[1], make_tenant("bob")[1])
                deployment = {"name": DEPLOYMENT, "base_model": TINY_MODEL}
                r = client.post("/v1/deployments", headers=api.alice, json=deployment)
                assert r.status_code == 201, r.text
                yield api


def refused(r: Any, param: str | None, status: int | None = None) -> dict[str, Any]:
    """A 4xx (exactly `status` if given) in the API's error shape naming `param`."""
    assert 400 <= r.status_code < 500 and (status is None or r.status_code == status), (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["param"] == param, error
    assert error["type"] and error["message"], error
    return dict(error)


# ---- the table: every route and dialect, streamed or not ------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize(("path", "dialect"), ROUTES, ids=[path for path, _ in ROUTES])
def test_hostile_fields_are_refused_naming_them(api: Api, path: str, dialect: str, stream: bool) -> None:
    """Each body of the table: a 4xx invalid_request_error naming its field. Every failing body is reported."""
    bodies = hostile_bodies(dialect, stream)
    wrong = []
    for (raw, param), r in zip(bodies, api.post_all(path, [raw for raw, _ in bodies]), strict=True):
        try:
            error = refused(r, param)
            assert error["type"] == "invalid_request_error" and error["message"].startswith(f"{param}: "), error
        except AssertionError as exc:
            wrong.append(f"{raw.decode(errors='replace')[:300]}\n    -> {exc}")
    assert not wrong, f"{len(wrong)} of {len(bodies)} bodies:\n" + "\n".join(wrong)


@pytest.mark.parametrize(("path", "dialect"), ROUTES)
def test_broken_bodies_are_refused_in_words(api: Api, path: str, dialect: str) -> None:
    # OpenAI's routes answer every body they refuse with a 400, as OpenAI does (web/errors.OPENAI_BODIES)
    valid = json.dumps(VALID[dialect]).encode()
    for raw, problem in (
        (b'{"model": "x" "max_tokens": 4}', "Expecting ',' delimiter at line 1, column 15"),
        (b'{\n  "model": "x",\n  "messages": [\n', "Expecting value at line 4, column 1"),
        (b"{'model': 'x'}", "Expecting property name enclosed in double quotes at line 1, column 2"),
        (b"   ", "Expecting value at line 1, column 4"),
    ):
        error = refused(api.post(path, raw), None, 400)
        assert (error["code"], error["message"]) == ("invalid_json", f"the body is not valid JSON: {problem}")
    assert refused(api.post(path, b""), None, 400)["message"] == "the body is empty; send a JSON object"
    not_object = "the body must be a JSON object, sent with 'Content-Type: application/json'"
    assert refused(api.post(path, b"[1, 2]"), None, 400)["message"] == not_object
    assert refused(api.post(path, b"null"), None, 400)["message"] == not_object
    form = api.client.post(path, headers=api.alice, data={"model": TINY_MODEL})  # a form: not JSON
    assert refused(form, None, 400)["message"] == not_object
    # Bytes that are no UTF-8 (a stray byte, or a surrogate encoded as UTF-8 bytes) are not JSON text.
    for bad in (b"\xff", b"\xed\xa0\x80"):
        error = refused(api.post(path, valid.replace(b"Hi", bad)), None, 400)
        assert error["message"].startswith("the body is not valid UTF-8: byte "), error
    nested = b"[" * 100_000 + b"]" * 100_000
    assert "nested too deeply" in refused(api.post(path, nested), None, 400)["message"]
    digits = b'{"model": "x", "seed": ' + b"9" * 5000 + b"}"
    assert "too many digits" in refused(api.post(path, digits), None, 400)["message"]


def test_another_tenant_is_served_in_full_meanwhile(api: Api) -> None:
    """While alice sends the whole table to the shared endpoints, bob's streamed chat and plain completion finish,
    as if alone."""
    answers: dict[str, Any] = {}

    def bob() -> None:
        chat = VALID["chat"] | {"max_tokens": 24, "temperature": 0.7, "seed": 2**63 - 1, "stream": True}
        answers["chat"] = api.client.post("/v1/chat/completions", headers=api.bob, json=chat)
        text = VALID["completion"] | {"max_tokens": 24, "temperature": 0, "min_tokens": 24}
        answers["completion"] = api.client.post("/v1/completions", headers=api.bob, json=text)

    thread = threading.Thread(target=bob)
    thread.start()
    for path, dialect in ROUTES[:2]:  # the shared endpoints, which bob's requests use too
        for stream in (False, True):
            bodies = hostile_bodies(dialect, stream)
            for (_, param), r in zip(bodies, api.post_all(path, [raw for raw, _ in bodies]), strict=True):
                refused(r, param)
    thread.join(timeout=120)
    assert not thread.is_alive()
    chat = answers["chat"]
    assert chat.status_code == 200, chat.text
    events = [block.removeprefix("data: ") for block in chat.text.strip().split("\n\n")]
    assert events[-1] == "[DONE]"
    finish = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1] if json.loads(e)["choices"]]
    assert finish[-1] in ("stop", "length") and all(f is None for f in finish[:-1])
    completion = answers["completion"]
    assert completion.status_code == 200, completion.text
    assert completion.json()["choices"][0]["finish_reason"] == "length"
    assert completion.json()["usage"]["completion_tokens"] == 24


# ---- the same edge for every other JSON route ----------------------------------------------------------------


def test_other_json_routes_refuse_the_same_input(api: Api) -> None:
    """The checks are the body's, not the inference routes': fine-tuning jobs and deployments refuse the same."""
    job = {"base_model": TINY_MODEL, "dataset": "d", "repo": "r"}
    for change, param in (
        ({"dataset": SURROGATE}, "dataset"),
        ({"repo": "r" + SURROGATE}, "repo"),
        ({"learning_rate": "NaN"}, "learning_rate"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),
        ({"eval_steps": BIG}, "eval_steps"),
        ({"checkpoint_every": BIG}, "checkpoint_every"),
        ({"epochs": BIG}, "epochs"),
        ({"surprise": 1}, "surprise"),
    ):
        raw = json.dumps(job | change).replace(SURROGATE, "\\ud800").replace('"NaN"', "NaN").encode()
        refused(api.post("/v1/finetuning/jobs", raw), param)
    deployment = {"name": "other", "base_model": TINY_MODEL}
    for change, param in (
        ({"description": SURROGATE}, "description"),
        ({"cooldown_time": "Infinity"}, "cooldown_time"),
        ({"cooldown_time": 1e9}, "cooldown_time"),
        ({"scale_up_threshold": 2**31}, "scale_up_threshold"),
        ({"min_replicas": BIG}, "min_replicas"),
        ({"max_replicas": BIG}, "max_replicas"),
        ({"replicas": 2}, "replicas"),
    ):
        raw = json.dumps(deployment | change).replace(SURROGATE, "\\ud800").replace('"Infinity"', "Infinity").encode()
        refused(api.post("/v1/deployments", raw), param)
        raw = json.dumps(change).replace(SURROGATE, "\\ud800").replace('"Infinity"', "Infinity").encode()
        r = api.client.patch(
            f"/v1/deployments/{DEPLOYMENT}", content=raw, headers=api.alice | {"Content-Type": "application/json"}
        )
        refused(r, param)
    assert [d["name"] for d in api.client.get("/v1/deployments", headers=api.alice).json()] == [DEPLOYMENT]


def test_numbers_in_paths_queries_and_headers_are_bounded(api: Api) -> None:
    """Past what can exist they would overflow the database's integers (a 500): a 422 naming them instead."""
    for path, param in (
        (f"/v1/repos/repo/versions/{BIG}/download", "version"),
        (f"/v1/repos/repo/versions/{BIG}/checkpoints", "version"),
        (f"/v1/repos/repo/versions/1/checkpoints/{BIG}/download", "checkpoint"),
        ("/v1/repos/repo/versions/0/download", "version"),
        (f"/v1/finetuning/jobs/ft_x/metrics?after_step={BIG}", "after_step"),
        (f"/v1/finetuning/jobs/ft_x/events?after_step={BIG}", "after_step"),
        ("/v1/finetuning/jobs/ft_x/metrics?after_step=-2", "after_step"),
    ):
        refused(api.client.get(path, headers=api.alice), param, 422)
    for event_id in (str(BIG).encode(), "\u00b2".encode("latin-1")):  # "²": a digit to str.isdigit, not to int()
        r = api.client.get("/v1/finetuning/jobs/ft_x/events", headers=api.alice | {"Last-Event-ID": event_id})
        refused(r, "Last-Event-ID", 422)


# ---- names: matched in full -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["x\n", "x\r\n", "\nx", "x y", "x/y", ".x", "x" * 101])
def test_names_are_matched_in_full(api: Api, name: str) -> None:
    """Datasets, repos and a job's repo share one rule, deployments their DNS-like one: each is matched in full, so
    a name ending in a newline (which `re.match("^...$")` took) is refused like any other bad name."""
    upload = api.client.post(
        "/v1/datasets",
        headers=api.alice,
        data={"name": name, "base_model": TINY_MODEL, "wait": "false"},
        files={"file": ("rows.jsonl", b'{"prompt": "a", "completion": "b"}\n')},
    )
    assert refused(upload, "name", 422)["message"] == f"name: {NAME.rule}"
    job = {"base_model": TINY_MODEL, "dataset": "rows", "repo": name}
    assert refused(api.client.post("/v1/finetuning/jobs", headers=api.alice, json=job), "repo", 422)["message"] == (
        f"repo: {NAME.rule}"
    )
    deployment = {"name": name, "base_model": TINY_MODEL}
    r = api.client.post("/v1/deployments", headers=api.alice, json=deployment)
    assert refused(r, "name", 422)["message"] == f"name: {DEPLOYMENT_NAME.rule}"
    if "/" not in name:  # a repo's name is one segment of the path: "x/y" is another route
        files = {"files": ("adapter_config.json", b"{}")}
        path = f"/v1/repos/{quote(name, safe='')}/versions"
        r = api.client.post(path, headers=api.alice, data={"base_model": TINY_MODEL}, files=files)
        assert refused(r, "repo", 422)["message"] == f"repo: {NAME.rule}"
    assert api.client.get("/v1/datasets", headers=api.alice).json() == []
    assert api.client.get("/v1/repos", headers=api.alice).json() == []


def test_a_version_reference_ending_in_a_newline_names_nothing(api: Api, tiny_model_dir: Path, tmp_path: Path) -> None:
    """'repo/1' exists; 'repo/1\n' is no model, no version to continue from, and no repo to import into."""
    lora = build_lora(tiny_model_dir, tmp_path / "lora")
    files = [("files", (n, (lora / n).read_bytes())) for n in ("adapter_config.json", "adapter_model.safetensors")]
    r = api.client.post("/v1/repos/repo/versions", headers=api.bob, data={"base_model": TINY_MODEL}, files=files)
    assert r.status_code == 201, r.text
    chat = VALID["chat"] | {"max_tokens": 1}
    assert api.client.post("/v1/chat/completions", headers=api.bob, json=chat | {"model": "repo/1"}).status_code == 200
    for model in ("repo/1\n", "repo\n"):
        r = api.client.post("/v1/chat/completions", headers=api.bob, json=chat | {"model": model})
        refused(r, "model", 404)
    job = {"base_model": TINY_MODEL, "dataset": "rows", "repo": "next", "continue_from_version": "repo/1\n"}
    refused(api.client.post("/v1/finetuning/jobs", headers=api.bob, json=job), "continue_from_version", 422)
    r = api.client.post("/v1/repos/repo%0A/versions", headers=api.bob, data={"base_model": TINY_MODEL}, files=files)
    refused(r, "repo", 422)
    models = api.client.get("/v1/models", headers=api.bob).json()["data"]
    assert [m["id"] for m in models if "/" in m["id"]] == ["repo/1"]


# ---- body limits ----------------------------------------------------------------------------------------------


def test_json_bodies_have_their_own_limit(api: Api) -> None:
    """1 MiB by default, with or without a Content-Length; a body just within it is served as usual."""
    limit = 1024 * 1024
    over = json.dumps(VALID["chat"] | {"messages": [{"role": "user", "content": "x" * limit}]}).encode()
    for r in (
        api.post("/v1/chat/completions", over),
        api.post("/v1/chat/completions", iter([over[:1000], over[1000:]])),  # chunked: no Content-Length
        api.post(f"/v1/deployments/{DEPLOYMENT}/chat/completions", over),
        api.post("/v1/finetuning/jobs", over),
    ):
        error = refused(r, None, 413)
        assert error["code"] == "body_too_large"
        assert error["message"] == (
            "the request body is larger than the 1 MiB allowed for a JSON body (LORAPLEX_MAX_JSON_BODY_BYTES)"
        )
    within = json.dumps({"base_model": TINY_MODEL, "dataset": "d" * (limit - 100), "repo": "r"}).encode()
    assert len(within) <= limit
    r = api.post("/v1/finetuning/jobs", within)  # read whole and handed on to the route, which looks for the dataset
    refused(r, "dataset", 404)


def test_uploads_keep_the_upload_limit(api: Api) -> None:
    """A 2 MiB dataset (over the JSON limit) is taken; past LORAPLEX_MAX_UPLOAD_BYTES (4 MiB here) it is refused,
    naming the file and the configured figure."""
    rows = b'{"prompt": "a", "completion": "b"}\n'
    big = rows * (2 * 1024 * 1024 // len(rows))
    upload = {"data": {"name": "big", "base_model": TINY_MODEL, "wait": "false"}, "files": {"file": ("b.jsonl", big)}}
    r = api.client.post("/v1/datasets", headers=api.alice, **upload)
    assert r.status_code == 202, r.text
    upload["files"] = {"file": ("b.jsonl", big * 3)}
    upload["data"]["name"] = "bigger"
    error = refused(api.client.post("/v1/datasets", headers=api.alice, **upload), "file", 413)
    assert error["code"] == "file_too_large" and "4 MiB" in error["message"], error


MULTIPART_START = (
    b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="rows.jsonl"\r\n'
    b"Content-Type: application/octet-stream\r\n\r\n"
)


@pytest.mark.parametrize(
    ("content_type", "start", "limit", "param"),
    [
        (b"application/json", b'{"model": "', 1024 * 1024, None),
        (b"multipart/form-data; boundary=xyz", MULTIPART_START, 4 * 1024 * 1024 + 64 * 1024, "file"),
    ],
)
def test_streamed_bodies_are_cut_while_read(
    api: Api, content_type: bytes, start: bytes, limit: int, param: str | None
) -> None:
    """A body without a Content-Length, twice the limit, straight into the app (ASGI, no server to buffer it): it is
    refused once past the limit, having read no more than one chunk beyond it."""
    chunk = b"x" * 65536
    read, sent = 0, []

    async def receive() -> dict[str, Any]:
        nonlocal read
        body = start if read == 0 else chunk
        read += len(body)
        return {"type": "http.request", "body": body, "more_body": read < 2 * limit}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    path = "/v1/chat/completions" if param is None else "/v1/datasets"
    headers = [(b"content-type", content_type), *((k.lower().encode(), v.encode()) for k, v in api.alice.items())]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }
    asyncio.run(api.client.app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413, sent
    assert json.loads(b"".join(m.get("body", b"") for m in sent[1:]))["error"]["param"] == param
    assert limit < read <= limit + len(chunk)
