"""Webhooks: endpoints over /v1/webhooks, deliveries sent by `functions.webhooks.flush` to real HTTP receivers on
loopback that verify every request with the standardwebhooks library, retries on the Standard Webhooks schedule
driven by an injected clock, the SSRF guard, secret rotation, the delivery log, re-sends and test events.
"""

import base64
import http.server
import ipaddress
import json
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from app import events
from app.db import session_scope
from app.event_tables import TenantEvent, WebhookAttempt, WebhookDelivery, WebhookEndpoint
from app.models import utcnow
from app.settings import get_settings
from conftest import free_port, make_tenant
from functions import webhooks
from functions.webhook_http import forbidden_kind

TIMEOUT_SECONDS = 1.5  # LORAPLEX_WEBHOOK_TIMEOUT_SECONDS in these tests: a slow receiver is cut off quickly
SECOND, MINUTE, HOUR, DAY = (timedelta(seconds=1), timedelta(minutes=1), timedelta(hours=1), timedelta(days=1))


@dataclass
class Received:
    webhook_id: str
    headers: dict[str, str]
    body: bytes
    answered: int  # the status the receiver answered
    verified_by: list[str]  # the receiver's secrets whose signature is in the request

    @property
    def event(self) -> dict[str, Any]:
        return json.loads(self.body)


class Receiver:
    """A webhook receiver: a real HTTP server on loopback that verifies each request against its secrets with
    standardwebhooks, as a tenant's would (401 when no secret verifies), and answers `status` after `delay` s."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/hooks/loraplex?source=test"
        self.secrets: list[str] = []
        self.status = 200
        self.delay = 0.0
        self.answer_headers: dict[str, str] = {}
        self.answer_body = b"ok"
        self.received: list[Received] = []
        self.released = threading.Event()  # ends a delay early (teardown)
        self.tls: ssl.SSLContext | None = None  # set: it serves https
        self._server: http.server.ThreadingHTTPServer | None = None

    def start(self) -> "Receiver":
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["content-length"]))
                headers = {key.lower(): value for key, value in self.headers.items()}
                verified_by = [secret for secret in receiver.secrets if _verifies(secret, body, headers)]
                answered = receiver.status if verified_by else 401
                receiver.received.append(Received(headers["webhook-id"], headers, body, answered, verified_by))
                receiver.released.wait(receiver.delay)
                self.send_response(answered)
                for key, value in receiver.answer_headers.items():
                    self.send_header(key, value)
                self.send_header("content-length", str(len(receiver.answer_body)))
                self.end_headers()
                self.wfile.write(receiver.answer_body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        if self.tls is not None:
            self._server.socket = self.tls.wrap_socket(self._server.socket, server_side=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.released.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def accepted(self) -> list[Received]:
        return [r for r in self.received if 200 <= r.answered < 300]


def _verifies(secret: str, body: bytes, headers: dict[str, str]) -> bool:
    try:
        Webhook(secret).verify(body, headers)
        return True
    except WebhookVerificationError:
        return False


@pytest.fixture
def loopback(platform: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Receivers run on this machine's loopback, which webhooks may reach only under this setting."""
    monkeypatch.setenv("LORAPLEX_WEBHOOKS_ALLOW_LOOPBACK", "true")
    monkeypatch.setenv("LORAPLEX_WEBHOOK_TIMEOUT_SECONDS", str(TIMEOUT_SECONDS))
    get_settings.cache_clear()


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    """Receivers a test makes, stopped after it."""
    made: list[Receiver] = []
    yield made
    for receiver in made:
        receiver.stop()


def receiver(made: list[Receiver], start: bool = True) -> Receiver:
    r = Receiver()
    made.append(r)
    return r.start() if start else r


def register(client: TestClient, headers: dict[str, str], r: Receiver, types: list[str] | None = None) -> str:
    """An endpoint for the receiver; it learns the secret, shown this once. Its id."""
    body = {"url": r.url, "event_types": types or ["billing.charge"], "description": "test receiver"}
    answer = client.post("/v1/webhooks", json=body, headers=headers)
    assert answer.status_code == 201, answer.text
    r.secrets = [answer.json()["secret"]]
    return answer.json()["id"]


def publish(tenant_id: str, type_: str = "billing.charge", **data: Any) -> str:
    """An event as the domain publishes it (with its deliveries, in one transaction); its public id."""
    with session_scope() as s:
        return events.publish(s, tenant_id, type_, "", data or {"amount_micro_usd": 1_000}).uid


def log_of(client: TestClient, headers: dict[str, str], endpoint_id: str) -> list[dict[str, Any]]:
    answer = client.get(f"/v1/webhooks/{endpoint_id}/deliveries", headers=headers)
    assert answer.status_code == 200, answer.text
    return answer.json()


def count(model: Any) -> int:
    with session_scope() as s:
        return s.scalar(select(func.count()).select_from(model)) or 0


# ---- endpoints --------------------------------------------------------------------------------------------


def test_endpoint_crud_shows_the_secret_once(client: TestClient, loopback: None, receivers: list[Receiver]) -> None:
    tenant_id, headers = make_tenant("acme")
    r = receiver(receivers)
    created = client.post(
        "/v1/webhooks",
        json={"url": r.url, "event_types": ["dataset.ready", "finetune.job.succeeded", "dataset.ready"]},
        headers=headers,
    )
    assert created.status_code == 201, created.text
    endpoint = created.json()
    secret = endpoint.pop("secret")
    assert secret.startswith("whsec_") and len(base64.b64decode(secret.removeprefix("whsec_"))) >= 24
    assert endpoint["event_types"] == ["dataset.ready", "finetune.job.succeeded"]  # each once
    assert endpoint["enabled"] is True and endpoint["disabled_reason"] is None

    shown = client.get(f"/v1/webhooks/{endpoint['id']}", headers=headers).json()
    assert shown == endpoint and "whsec_" not in client.get("/v1/webhooks", headers=headers).text
    assert [e["id"] for e in client.get("/v1/webhooks", headers=headers).json()] == [endpoint["id"]]

    changed = client.patch(
        f"/v1/webhooks/{endpoint['id']}",
        json={"event_types": ["billing.charge"], "description": "finance", "enabled": False},
        headers=headers,
    ).json()
    assert (changed["event_types"], changed["description"], changed["enabled"]) == (
        ["billing.charge"],
        "finance",
        False,
    )
    publish(tenant_id)  # a disabled endpoint gets no delivery
    assert count(WebhookDelivery) == 0

    client.patch(f"/v1/webhooks/{endpoint['id']}", json={"enabled": True}, headers=headers)
    publish(tenant_id)
    assert count(WebhookDelivery) == 1
    assert client.delete(f"/v1/webhooks/{endpoint['id']}", headers=headers).status_code == 204
    assert client.get(f"/v1/webhooks/{endpoint['id']}", headers=headers).status_code == 404
    assert count(WebhookDelivery) == 0  # its deliveries went with it


def test_bad_input_is_a_4xx_naming_the_field_and_writes_nothing(client: TestClient, loopback: None) -> None:
    _, headers = make_tenant("acme")
    url = f"http://127.0.0.1:{free_port()}/hook"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"url": "not a url", "event_types": ["dataset.ready"]}, "url"),
        ({"url": "http://exa mple.com:port/", "event_types": ["dataset.ready"]}, "url"),
        ({"url": url, "event_types": ["dataset.exploded"]}, "event_types.0"),
        ({"url": url, "event_types": ["dataset.ready", "webhook.test"]}, "event_types.1"),  # only on request
        ({"url": url, "event_types": []}, "event_types"),
        ({"url": url}, "event_types"),
        ({"event_types": ["dataset.ready"]}, "url"),
        ({"url": url, "event_types": ["dataset.ready"], "secret": "whsec_mine"}, "secret"),
        ({"url": url, "event_types": ["dataset.ready"], "description": "x" * 501}, "description"),
        ({"url": "http://user:pw@127.0.0.1/", "event_types": ["dataset.ready"]}, "url"),
    ]
    for body, param in cases:
        answer = client.post("/v1/webhooks", json=body, headers=headers)
        assert answer.status_code == 422, (body, answer.text)
        assert answer.json()["error"]["param"] == param, (body, answer.json())
    assert count(WebhookEndpoint) == 0

    endpoint_id = client.post("/v1/webhooks", json={"url": url, "event_types": ["dataset.ready"]}, headers=headers)
    endpoint_id = endpoint_id.json()["id"]
    before = client.get(f"/v1/webhooks/{endpoint_id}", headers=headers).json()
    for body, param in [
        ({"url": "http://10.1.2.3/"}, "url"),
        ({"event_types": ["nope"]}, "event_types.0"),
        ({"enabled": "maybe"}, "enabled"),
        ({"colour": "red"}, "colour"),
    ]:
        answer = client.patch(f"/v1/webhooks/{endpoint_id}", json=body, headers=headers)
        assert (answer.status_code, answer.json()["error"]["param"]) == (422, param), answer.text
    rotate = client.post(f"/v1/webhooks/{endpoint_id}/rotate_secret", json={"overlap_seconds": -1}, headers=headers)
    assert (rotate.status_code, rotate.json()["error"]["param"]) == (422, "overlap_seconds")
    assert client.get(f"/v1/webhooks/{endpoint_id}", headers=headers).json() == before
    listed = client.get(f"/v1/webhooks/{endpoint_id}/deliveries?status=lost", headers=headers)
    assert (listed.status_code, listed.json()["error"]["param"]) == (422, "status")


def test_another_tenants_endpoint_and_delivery_are_not_found(
    client: TestClient, loopback: None, receivers: list[Receiver]
) -> None:
    alice_id, alice = make_tenant("alice")
    _, bob = make_tenant("bob")
    r = receiver(receivers)
    theirs = register(client, alice, r)
    publish(alice_id)
    webhooks.flush()
    delivery_id = log_of(client, alice, theirs)[0]["id"]
    mine = register(client, bob, receiver(receivers))

    for method, path, body in [
        ("GET", f"/v1/webhooks/{theirs}", None),
        ("PATCH", f"/v1/webhooks/{theirs}", {"enabled": False}),
        ("DELETE", f"/v1/webhooks/{theirs}", None),
        ("POST", f"/v1/webhooks/{theirs}/rotate_secret", None),
        ("GET", f"/v1/webhooks/{theirs}/deliveries", None),
        ("POST", f"/v1/webhooks/{theirs}/deliveries/{delivery_id}/resend", None),
        ("POST", f"/v1/webhooks/{theirs}/test", None),
    ]:
        answer = client.request(method, path, json=body, headers=bob)
        assert (answer.status_code, answer.json()["error"]["param"]) == (404, "id"), (method, path, answer.text)
    # their delivery under bob's own endpoint is not found either
    answer = client.post(f"/v1/webhooks/{mine}/deliveries/{delivery_id}/resend", headers=bob)
    assert (answer.status_code, answer.json()["error"]["param"]) == (404, "delivery_id")

    assert [e["id"] for e in client.get("/v1/webhooks", headers=bob).json()] == [mine]
    assert client.get(f"/v1/webhooks/{theirs}", headers=alice).json()["enabled"] is True
    assert [d["attempt_count"] for d in log_of(client, alice, theirs)] == [1]  # no re-send happened
    assert len(r.received) == 1


# ---- delivery -----------------------------------------------------------------------------------------------


def test_a_receiver_down_then_up_gets_every_event_once_per_webhook_id(
    client: TestClient, loopback: None, receivers: list[Receiver]
) -> None:
    tenant_id, headers = make_tenant("acme")
    r = receiver(receivers, start=False)  # down: nothing listens on its port yet
    endpoint_id = register(client, headers, r, ["billing.charge", "dataset.ready"])
    sent = [publish(tenant_id, amount_micro_usd=n) for n in (1, 2, 3)]
    publish(tenant_id, "billing.credit_low", balance=0)  # a type it did not ask for
    t0 = utcnow()

    assert webhooks.flush(now=t0) == webhooks.FlushResult(delivered=0, failed=3)
    log = log_of(client, headers, endpoint_id)
    assert {d["event"]["id"] for d in log} == set(sent)
    for delivery in log:
        assert (delivery["status"], delivery["attempt_count"], delivery["last_error"]) == (
            "pending",
            1,
            "connection refused",
        )
        assert datetime.fromisoformat(delivery["next_attempt_at"]) == t0 + 5 * SECOND
    assert client.get(f"/v1/webhooks/{endpoint_id}", headers=headers).json()["failing_since"] == t0.isoformat()
    assert webhooks.flush(now=t0 + 4 * SECOND) == webhooks.FlushResult()  # not due yet

    r.start()
    r.status = 503  # up, but not ready
    assert webhooks.flush(now=t0 + 5 * SECOND).failed == 3
    r.status = 200
    assert webhooks.flush(now=t0 + 5 * SECOND + 4 * MINUTE) == webhooks.FlushResult()
    assert webhooks.flush(now=t0 + 5 * SECOND + 5 * MINUTE).delivered == 3
    assert webhooks.flush(now=t0 + 2 * DAY) == webhooks.FlushResult()  # nothing left to send

    ids = {d["id"] for d in log_of(client, headers, endpoint_id)}
    assert sorted(x.webhook_id for x in r.accepted()) == sorted(ids)  # each accepted exactly once
    assert {x.webhook_id for x in r.received if x.answered == 503} == ids  # the retry carried the same id
    assert all(x.verified_by == r.secrets for x in r.received)
    assert sorted(x.event["data"]["amount_micro_usd"] for x in r.accepted()) == [1, 2, 3]
    first = r.accepted()[0]
    assert set(first.event) == {"id", "type", "timestamp", "data"} and first.event["type"] == "billing.charge"
    assert first.headers["content-type"] == "application/json"
    for delivery in log_of(client, headers, endpoint_id):
        assert (delivery["status"], delivery["attempt_count"], delivery["next_attempt_at"]) == ("delivered", 3, None)
        assert [a["status_code"] for a in delivery["attempts"]] == [None, 503, 200]
        assert all(a["latency_ms"] >= 0 for a in delivery["attempts"])
    assert client.get(f"/v1/webhooks/{endpoint_id}", headers=headers).json()["failing_since"] is None


def test_retries_follow_the_standard_webhooks_schedule_then_fail(
    client: TestClient, loopback: None, receivers: list[Receiver]
) -> None:
    tenant_id, headers = make_tenant("acme")
    r = receiver(receivers)
    r.status = 500
    endpoint_id = register(client, headers, r)
    publish(tenant_id)
    at = utcnow()
    waits = []
    for _ in range(8):
        assert webhooks.flush(now=at).failed == 1
        [delivery] = log_of(client, headers, endpoint_id)
        if delivery["next_attempt_at"] is not None:
            next_at = datetime.fromisoformat(delivery["next_attempt_at"])
            waits.append(next_at - at)
            assert webhooks.flush(now=next_at - SECOND) == webhooks.FlushResult()
            at = next_at
    assert waits == [5 * SECOND, 5 * MINUTE, 30 * MINUTE, 2 * HOUR, 5 * HOUR, 10 * HOUR, 10 * HOUR]
    assert (delivery["status"], delivery["attempt_count"]) == ("failed", 8)
    assert len({x.webhook_id for x in r.received}) == 1 and len(r.received) == 8
    assert webhooks.flush(now=at + 30 * DAY) == webhooks.FlushResult()


def test_a_slow_receiver_does_not_hold_up_another_endpoint(
    client: TestClient, loopback: None, receivers: list[Receiver]
) -> None:
    tenant_id, headers = make_tenant("acme")
    slow, fast = receiver(receivers), receiver(receivers)
    slow.delay = 30.0  # far past the timeout
    slow_id = register(client, headers, slow)
    fast_id = register(client, headers, fast)
    for n in range(3):
        publish(tenant_id, amount_micro_usd=n)  # three deliveries to each endpoint

    started = time.monotonic()
    result = webhooks.flush()
    took = time.monotonic() - started

    # The fast endpoint got all three; the slow one's first timed out, and its other two wait for the next pass.
    assert result == webhooks.FlushResult(delivered=3, failed=1, left=2)
    assert took < TIMEOUT_SECONDS * 1.5 + 1, took
    fast_log = log_of(client, headers, fast_id)
    assert [d["status"] for d in fast_log] == ["delivered"] * 3 and len(fast.accepted()) == 3
    assert all(d["attempts"][0]["latency_ms"] < 1000 for d in fast_log)
    slow_log = log_of(client, headers, slow_id)
    [attempt] = [a for d in slow_log for a in d["attempts"]]
    assert attempt["status_code"] is None and attempt["error"] == f"timed out after {TIMEOUT_SECONDS:g} s"
    assert TIMEOUT_SECONDS * 1000 <= attempt["latency_ms"] < TIMEOUT_SECONDS * 1000 + 1000
    assert [d["status"] for d in slow_log] == ["pending"] * 3 and len(slow.received) == 1


def test_answers_are_not_followed_and_read_only_in_part(
    client: TestClient, loopback: None, receivers: list[Receiver]
) -> None:
    tenant_id, headers = make_tenant("acme")
    target, redirecting, chatty = receiver(receivers), receiver(receivers), receiver(receivers)
    redirecting.status, redirecting.answer_headers = 307, {"location": target.url}
    chatty.status, chatty.answer_body = 500, b"x" * 200_000
    redirect_id = register(client, headers, redirecting)
    chatty_id = register(client, headers, chatty)
    publish(tenant_id)

    assert webhooks.flush().failed == 2
    assert log_of(client, headers, redirect_id)[0]["last_error"] == "HTTP 307: ok"
    assert target.received == []  # the redirect was not followed
    error = log_of(client, headers, chatty_id)[0]["last_error"]
    assert error == "HTTP 500: " + "x" * 4096  # at most 4 KB of an answer is read


# ---- SSRF -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("169.254.169.254", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"),
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("10.0.0.7", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("::ffff:192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("169.254.10.10", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.251", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "non-public"),
        ("93.184.216.34", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_which_addresses_are_refused(address: str, kind: str | None) -> None:
    assert forbidden_kind(ipaddress.ip_address(address), allow_loopback=False) == kind
    loopback_allowed = None if kind == "loopback" else kind
    assert forbidden_kind(ipaddress.ip_address(address), allow_loopback=True) == loopback_allowed


def test_ssrf_refusals_at_registration_and_at_each_send(
    client: TestClient, loopback: None, receivers: list[Receiver], monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant_id, headers = make_tenant("acme")
    refused = [
        ("http://10.0.0.5/hook", "forbidden_address", "(private)"),
        ("http://169.254.169.254/latest/meta-data/", "forbidden_address", "(cloud metadata)"),
        ("http://[fd00:ec2::254]/", "forbidden_address", "(cloud metadata)"),
        ("http://169.254.1.1/", "forbidden_address", "(link-local)"),
        ("https://[fe80::1]/", "forbidden_address", "(link-local)"),
        ("http://[::ffff:192.168.0.1]:8080/", "forbidden_address", "(private)"),
        ("http://0.0.0.0:8080/", "forbidden_address", "(unspecified)"),
        ("ftp://example.com/hook", "invalid_url_scheme", "only http and https"),
        ("file:///etc/passwd", "invalid_url_scheme", "only http and https"),
        ("gopher://127.0.0.1:6379/_FLUSHALL", "invalid_url_scheme", "only http and https"),
        ("http://no-such-host.invalid/hook", "unresolvable_host", "does not resolve"),
    ]
    for url, code, says in refused:
        answer = client.post("/v1/webhooks", json={"url": url, "event_types": ["dataset.ready"]}, headers=headers)
        error = answer.json()["error"]
        assert (answer.status_code, error["param"], error["code"]) == (422, "url", code), (url, answer.text)
        assert says in error["message"], (url, error["message"])

    r = receiver(receivers)
    endpoint_id = register(client, headers, r)  # allowed now: loopback is on

    monkeypatch.setenv("LORAPLEX_WEBHOOKS_ALLOW_LOOPBACK", "false")
    get_settings.cache_clear()
    for url in (r.url, f"http://localhost:{r.port}/", "http://[::1]/", "http://127.1.2.3/"):
        answer = client.post("/v1/webhooks", json={"url": url, "event_types": ["dataset.ready"]}, headers=headers)
        assert (answer.status_code, answer.json()["error"]["param"]) == (422, "url"), answer.text
        assert "(loopback)" in answer.json()["error"]["message"]
    assert count(WebhookEndpoint) == 1

    publish(tenant_id)  # the endpoint registered earlier: checked again right before the send
    assert webhooks.flush().failed == 1
    [delivery] = log_of(client, headers, endpoint_id)
    assert delivery["last_error"].startswith("refused: url: 127.0.0.1 resolves to 127.0.0.1 (loopback)")
    assert r.received == []


# ---- secrets, log, re-send, test events ----------------------------------------------------------------------


def test_rotation_signs_with_both_secrets_during_the_overlap(
    client: TestClient, loopback: None, receivers: list[Receiver]
) -> None:
    tenant_id, headers = make_tenant("acme")
    r = receiver(receivers)
    endpoint_id = register(client, headers, r)
    [old] = r.secrets
    rotated = client.post(f"/v1/webhooks/{endpoint_id}/rotate_secret", json={"overlap_seconds": 3600}, headers=headers)
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["secret"]
    assert new != old and rotated.json()["previous_secret_expires_at"] is not None
    r.secrets = [old, new]

    publish(tenant_id)
    assert webhooks.flush().delivered == 1
    assert r.received[-1].verified_by == [old, new]  # each secret alone verifies it
    assert len(r.received[-1].headers["webhook-signature"].split(" ")) == 2

    publish(tenant_id)
    assert webhooks.flush(now=utcnow() + 2 * HOUR).delivered == 1  # after the overlap
    assert r.received[-1].verified_by == [new]
    assert len(r.received[-1].headers["webhook-signature"].split(" ")) == 1

    at_once = client.post(f"/v1/webhooks/{endpoint_id}/rotate_secret", json={"overlap_seconds": 0}, headers=headers)
    newest = at_once.json()["secret"]
    assert at_once.json()["previous_secret_expires_at"] is None
    r.secrets = [new, newest]
    publish(tenant_id)
    assert webhooks.flush().delivered == 1
    assert r.received[-1].verified_by == [newest]


def test_delivery_log_resend_and_test_event(client: TestClient, loopback: None, receivers: list[Receiver]) -> None:
    tenant_id, headers = make_tenant("acme")
    r, other = receiver(receivers), receiver(receivers)
    endpoint_id = register(client, headers, r)
    register(client, headers, other, ["billing.charge", "webhook.endpoint_disabled"])
    event_id = publish(tenant_id)
    assert webhooks.flush().delivered == 2

    [delivery] = log_of(client, headers, endpoint_id)
    assert (delivery["event"]["id"], delivery["status"], delivery["attempt_count"]) == (event_id, "delivered", 1)
    assert delivery["delivered_at"] is not None and delivery["attempts"][0]["status_code"] == 200

    resent = client.post(f"/v1/webhooks/{endpoint_id}/deliveries/{delivery['id']}/resend", headers=headers)
    assert resent.status_code == 200, resent.text
    assert (resent.json()["status"], resent.json()["attempt_count"]) == ("delivered", 2)
    assert [x.webhook_id for x in r.received] == [delivery["id"], delivery["id"]]  # the same webhook-id

    r.status = 500  # a re-send that fails is shown, and then retried on the schedule
    resent = client.post(f"/v1/webhooks/{endpoint_id}/deliveries/{delivery['id']}/resend", headers=headers).json()
    assert (resent["status"], resent["last_status_code"], resent["attempt_count"]) == ("pending", 500, 3)
    assert resent["next_attempt_at"] is not None and resent["last_error"] == "HTTP 500: ok"
    r.status = 200

    tested = client.post(f"/v1/webhooks/{endpoint_id}/test", headers=headers)
    assert tested.status_code == 201, tested.text
    assert (tested.json()["status"], tested.json()["event"]["type"]) == ("delivered", "webhook.test")
    assert r.received[-1].event["type"] == "webhook.test" and r.received[-1].verified_by == r.secrets
    assert all(x.event["type"] != "webhook.test" for x in other.received)  # only the endpoint asked
    assert webhooks.flush(now=utcnow() + HOUR).delivered == 1  # the failed re-send's retry
    assert len(other.received) == 1

    log = log_of(client, headers, endpoint_id)
    assert [d["event"]["type"] for d in log] == ["webhook.test", "billing.charge"]  # newest first
    failed_only = client.get(f"/v1/webhooks/{endpoint_id}/deliveries?status=failed", headers=headers).json()
    assert failed_only == []
    with session_scope() as s:
        assert s.scalar(select(func.count()).where(TenantEvent.type == "webhook.test")) == 1
        assert s.scalar(select(func.count()).select_from(WebhookAttempt)) == 2 + 4


def test_an_endpoint_failing_for_days_is_disabled_and_the_tenant_told(
    client: TestClient, loopback: None, receivers: list[Receiver]
) -> None:
    tenant_id, headers = make_tenant("acme")
    down = receiver(receivers, start=False)
    watcher = receiver(receivers)
    down_id = register(client, headers, down)
    watcher_id = register(client, headers, watcher, ["webhook.endpoint_disabled"])
    publish(tenant_id)
    t0 = utcnow()

    webhooks.flush(now=t0)
    webhooks.flush(now=t0 + 4 * DAY)  # the retry fails: failing for 4 days, under the 5 of the setting
    assert client.get(f"/v1/webhooks/{down_id}", headers=headers).json()["enabled"] is True
    publish(tenant_id)
    webhooks.flush(now=t0 + 5 * DAY + MINUTE)  # the new event's first attempt fails too: 5 days
    endpoint = client.get(f"/v1/webhooks/{down_id}", headers=headers).json()
    assert endpoint["enabled"] is False
    assert endpoint["disabled_reason"].startswith("disabled by Loraplex: every delivery failed for 5 days since")
    assert endpoint["failing_since"] == t0.isoformat()

    with session_scope() as s:
        [told] = s.scalars(select(TenantEvent).where(TenantEvent.type == "webhook.endpoint_disabled")).all()
        assert (told.subject_id, told.data["id"], told.data["enabled"]) == (down_id, down_id, False)
    assert webhooks.flush(now=t0 + 5 * DAY + 2 * MINUTE).delivered == 1  # to the watcher; the disabled one waits
    [notice] = watcher.accepted()
    assert notice.event["type"] == "webhook.endpoint_disabled" and notice.event["data"]["id"] == down_id
    assert log_of(client, headers, watcher_id)[0]["status"] == "delivered"
    assert webhooks.flush(now=t0 + 6 * DAY) == webhooks.FlushResult()  # nothing sent to a disabled endpoint

    down.start()
    enabled = client.patch(f"/v1/webhooks/{down_id}", json={"enabled": True}, headers=headers).json()
    assert (enabled["enabled"], enabled["disabled_reason"], enabled["failing_since"]) == (True, None, None)
    assert webhooks.flush(now=t0 + 6 * DAY).delivered == 2  # what waited goes out
    assert len(down.accepted()) == 2


def test_https_receivers_are_verified_against_the_urls_host(
    client: TestClient,
    loopback: None,
    receivers: list[Receiver],
    certificate: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tenant_id, headers = make_tenant("acme")
    r = receiver(receivers, start=False)
    r.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    r.tls.load_cert_chain(*certificate)
    r.url = f"https://localhost:{r.port}/hook"
    r.start()
    endpoint_id = register(client, headers, r)
    publish(tenant_id)

    assert webhooks.flush().failed == 1  # the sender does not trust a self-signed certificate
    [delivery] = log_of(client, headers, endpoint_id)
    assert delivery["last_error"] == "TLS: CERTIFICATE_VERIFY_FAILED" and r.received == []

    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))  # now it does: the name in the URL must match
    resent = client.post(f"/v1/webhooks/{endpoint_id}/deliveries/{delivery['id']}/resend", headers=headers).json()
    assert resent["status"] == "delivered" and r.accepted()[0].verified_by == r.secrets
