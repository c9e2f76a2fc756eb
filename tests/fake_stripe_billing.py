"""Stand-ins for Stripe in tests: Stripe itself cannot be reached from the machines these tests run on.

- `localstripe_server()`: the real localstripe (a stateful fake of Stripe's core API: customers, payment methods,
  invoices, webhooks), started as a subprocess on a free port.
- `FakeStripeBilling`: a small HTTP server for what localstripe lacks: billing meter events, credit grants,
  Checkout sessions and customer-portal sessions. It checks the form-encoded fields Stripe requires and the
  bearer key, records every request with its Idempotency-Key, replays a repeated Idempotency-Key like Stripe,
  refuses a meter event whose identifier it has seen like Stripe, and can be switched "down".

Both are fakes: what they accept was written from Stripe's API reference, not observed from Stripe.
"""

import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

import httpx

from conftest import free_port

API_KEY = "sk_test_loraplex_fake"
METER_EVENT_NAME = "loraplex_usage"
DAY = 24 * 3600

Mode = Literal["up", "error", "refuse", "lose_response"]


def wait_until_up(url: str, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@contextmanager
def localstripe_server() -> Iterator[str]:
    """Run localstripe (`localstripe --port N --from-scratch`) and yield its base URL.

    --from-scratch: start empty instead of loading the state localstripe pickles to /tmp after every write.
    """
    exe = shutil.which("localstripe") or os.path.join(os.path.dirname(sys.executable), "localstripe")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--from-scratch"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/v1/customers", proc=proc)  # any answer (401 without a key) means it is up
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def localstripe_get(base: str, path: str, **params: Any) -> dict[str, Any]:
    response = httpx.get(f"{base}{path}", params=params, auth=(API_KEY, ""), timeout=10)
    response.raise_for_status()
    return dict(response.json())


@dataclass
class Recorded:
    method: str
    path: str
    form: dict[str, str]  # flat Stripe form keys: "payload[value]" -> "129"
    idempotency_key: str | None
    status: int


class StripeRefusal(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"type": self.kind, "message": self.message, "param": self.param}}


@dataclass
class FakeStripeBilling:
    """Meter events, credit grants, Checkout and portal sessions, the way Stripe's v1 API takes them."""

    api_key: str = API_KEY
    mode: Mode = "up"
    requests: list[Recorded] = field(default_factory=list)
    meter_events: list[dict[str, Any]] = field(default_factory=list)  # accepted, in arrival order
    credit_grants: list[dict[str, Any]] = field(default_factory=list)
    checkout_sessions: list[dict[str, Any]] = field(default_factory=list)
    portal_sessions: list[dict[str, Any]] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    _idempotency: dict[str, tuple[str, dict[str, str], int, dict[str, Any]]] = field(default_factory=dict)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> "FakeStripeBilling":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                fake._serve(self, "POST")

            def do_GET(self) -> None:  # noqa: N802
                fake._serve(self, "GET")

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def go_down(self, how: Literal["error", "refuse", "lose_response"] = "error") -> None:
        """error: every call answers 500 having done nothing. refuse: nothing listens on the port (connection
        refused). lose_response: the call takes effect but the answer is a 500, as if the reply was lost."""
        self.mode = how
        if how == "refuse":
            self.stop()

    def come_back(self) -> None:
        if self._server is None:
            self.start()
        self.mode = "up"

    # ---- request handling -------------------------------------------------------------------------------

    def _serve(self, http: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(http.path)
        length = int(http.headers.get("Content-Length") or 0)
        raw = http.rfile.read(length).decode() if length else ""
        query = raw if method == "POST" else parts.query
        form = dict(parse_qsl(query, keep_blank_values=True))
        key = http.headers.get("Idempotency-Key")
        with self._lock:
            status, body = self._respond(http, method, parts.path, form, key)
            self.requests.append(Recorded(method, parts.path, form, key, status))
        payload = json.dumps(body).encode()
        http.send_response(status)
        http.send_header("Content-Type", "application/json")
        http.send_header("Content-Length", str(len(payload)))
        http.end_headers()
        http.wfile.write(payload)

    def _respond(
        self, http: BaseHTTPRequestHandler, method: str, path: str, form: dict[str, str], key: str | None
    ) -> tuple[int, dict[str, Any]]:
        if self.mode == "error":
            return 500, {"error": {"type": "api_error", "message": "fake outage"}}
        auth = http.headers.get("Authorization", "")
        if auth != f"Bearer {self.api_key}":
            return 401, StripeRefusal(401, "Invalid API Key provided", kind="invalid_request_error").body()
        if method == "POST" and http.headers.get("Content-Type") != "application/x-www-form-urlencoded":
            return 400, StripeRefusal(400, "Stripe v1 takes form-encoded bodies").body()
        if method == "POST" and key is not None and key in self._idempotency:
            first_path, first_form, status, body = self._idempotency[key]
            if (first_path, first_form) != (path, form):
                return 400, StripeRefusal(
                    400,
                    "Keys for idempotent requests can only be used with the same parameters they were first used with.",
                    kind="idempotency_error",
                ).body()
            return status, body  # Stripe replays the saved answer
        routes = {
            ("POST", "/v1/billing/meter_events"): self._meter_event,
            ("POST", "/v1/billing/credit_grants"): self._credit_grant,
            ("GET", "/v1/billing/credit_grants"): self._list_credit_grants,
            ("POST", "/v1/checkout/sessions"): self._checkout_session,
            ("POST", "/v1/billing_portal/sessions"): self._portal_session,
        }
        route = routes.get((method, path))
        if route is None:
            return 404, StripeRefusal(404, f"Unrecognized request URL ({method}: {path})").body()
        try:
            status, body = 200, route(form)
        except StripeRefusal as refusal:
            status, body = refusal.status, refusal.body()
        if method == "POST" and key is not None:
            self._idempotency[key] = (path, form, status, body)
        if self.mode == "lose_response":
            return 500, {"error": {"type": "api_error", "message": "fake outage after the call took effect"}}
        return status, body

    # ---- endpoints ------------------------------------------------------------------------------------

    def _meter_event(self, form: dict[str, str]) -> dict[str, Any]:
        event_name = _required(form, "event_name")
        customer = _required(form, "payload[stripe_customer_id]")
        value = _required(form, "payload[value]")
        if not customer.startswith("cus_"):
            raise StripeRefusal(400, f"No such customer: '{customer}'", "payload[stripe_customer_id]")
        if not value.lstrip("-").isdigit():
            raise StripeRefusal(400, "payload[value] must be a whole number", "payload[value]")
        identifier = form.get("identifier") or f"fake_{secrets.token_hex(8)}"
        if len(identifier) > 100:
            raise StripeRefusal(400, "identifier: at most 100 characters", "identifier")
        now = int(time.time())
        timestamp = int(form.get("timestamp") or now)
        if not now - 35 * DAY <= timestamp <= now + 300:
            raise StripeRefusal(
                400, "Timestamp must be within the past 35 calendar days or up to 5 minutes in the future", "timestamp"
            )
        if any(e["identifier"] == identifier for e in self.meter_events):
            raise StripeRefusal(400, f"An event already exists with identifier {identifier}.", "identifier")
        event = {
            "object": "billing.meter_event",
            "created": now,
            "event_name": event_name,
            "identifier": identifier,
            "livemode": False,
            "payload": {"stripe_customer_id": customer, "value": value},
            "timestamp": timestamp,
        }
        self.meter_events.append(event)
        return event

    def _credit_grant(self, form: dict[str, str]) -> dict[str, Any]:
        customer = _required(form, "customer")
        if _required(form, "amount[type]") != "monetary":
            raise StripeRefusal(400, "amount[type] must be monetary", "amount[type]")
        currency = _required(form, "amount[monetary][currency]")
        value = _required(form, "amount[monetary][value]")
        if not value.isdigit() or int(value) <= 0:
            raise StripeRefusal(400, "amount[monetary][value] must be a positive integer (cents)", "amount")
        if _required(form, "applicability_config[scope][price_type]") != "metered":
            raise StripeRefusal(400, "only metered prices can be credited", "applicability_config")
        category = form.get("category", "paid")
        if category not in ("paid", "promotional"):
            raise StripeRefusal(400, f"Invalid category: {category}", "category")
        expires_at = int(form["expires_at"]) if form.get("expires_at") else None
        if expires_at is not None and expires_at <= time.time():
            raise StripeRefusal(400, "expires_at must be in the future", "expires_at")
        grant = {
            "id": f"credgr_test_{secrets.token_hex(8)}",
            "object": "billing.credit_grant",
            "amount": {"type": "monetary", "monetary": {"currency": currency, "value": int(value)}},
            "applicability_config": {"scope": {"price_type": "metered"}},
            "category": category,
            "created": int(time.time()),
            "customer": customer,
            "expires_at": expires_at,
            "livemode": False,
            "metadata": _sub(form, "metadata"),
            "name": form.get("name"),
        }
        self.credit_grants.append(grant)
        return grant

    def _list_credit_grants(self, form: dict[str, str]) -> dict[str, Any]:
        grants = [g for g in self.credit_grants if g["customer"] == form.get("customer", g["customer"])]
        return {"object": "list", "url": "/v1/billing/credit_grants", "has_more": False, "data": grants[::-1]}

    def _checkout_session(self, form: dict[str, str]) -> dict[str, Any]:
        mode = _required(form, "mode")
        _required(form, "success_url")
        metadata = _sub(form, "metadata")
        amount_total = None
        if mode == "setup":
            if "payment_method_types[0]" not in form:
                _required(form, "currency")  # chooses the payment methods offered
        elif mode == "payment":
            if "line_items[0][quantity]" not in form:
                raise StripeRefusal(400, "line_items: required in payment mode", "line_items")
            amount_total = 0
            i = 0
            while f"line_items[{i}][quantity]" in form:
                item = f"line_items[{i}]"
                quantity = int(form[f"{item}[quantity]"])
                unit = _required(form, f"{item}[price_data][unit_amount]")
                _required(form, f"{item}[price_data][currency]")
                _required(form, f"{item}[price_data][product_data][name]")
                if quantity <= 0 or not unit.isdigit() or int(unit) <= 0:
                    raise StripeRefusal(400, "quantity and unit_amount must be positive integers", item)
                amount_total += quantity * int(unit)
                i += 1
        else:
            raise StripeRefusal(400, f"Invalid mode: {mode}", "mode")
        session_id = f"cs_test_{secrets.token_hex(12)}"
        session = {
            "id": session_id,
            "object": "checkout.session",
            "mode": mode,
            "customer": form.get("customer"),
            "client_reference_id": form.get("client_reference_id"),
            "currency": form.get("currency") or form.get("line_items[0][price_data][currency]"),
            "amount_total": amount_total,
            "metadata": metadata,
            "status": "open",
            "payment_status": "unpaid" if mode == "payment" else "no_payment_required",
            "success_url": form["success_url"],
            "cancel_url": form.get("cancel_url"),
            "url": f"https://checkout.stripe.com/c/pay/{session_id}",
        }
        self.checkout_sessions.append(session)
        return session

    def _portal_session(self, form: dict[str, str]) -> dict[str, Any]:
        customer = _required(form, "customer")
        session_id = f"bps_{secrets.token_hex(12)}"
        session = {
            "id": session_id,
            "object": "billing_portal.session",
            "customer": customer,
            "return_url": form.get("return_url"),
            "url": f"https://billing.stripe.com/p/session/test_{session_id}",
        }
        self.portal_sessions.append(session)
        return session


def _required(form: dict[str, str], name: str) -> str:
    value = form.get(name)
    if not value:
        raise StripeRefusal(400, f"Missing required param: {name}.", name)
    return value


def _sub(form: dict[str, str], prefix: str) -> dict[str, str]:
    """{"metadata[purpose]": "topup"} -> {"purpose": "topup"}."""
    start = f"{prefix}["
    return {k[len(start) : -1]: v for k, v in form.items() if k.startswith(start) and k.endswith("]")}
