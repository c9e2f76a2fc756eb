"""Where a webhook may go, and one POST there: the server-side request forgery guard.

`check_url` is the rule, run when an endpoint is registered or changed and again by `post` right before each send
(a name's addresses can change after it was registered): only http(s), and every address the host resolves to must
be public: never loopback (unless LORAPLEX_WEBHOOKS_ALLOW_LOOPBACK), private, link-local, multicast, reserved,
unspecified or a cloud metadata address. `post` then connects to an address it checked, not to a second lookup of
the name, follows no redirect (a 3xx is a failed delivery), reads at most MAX_ANSWER_BYTES of the answer, and gives
up after the timeout whatever the receiver does (a watchdog shuts the socket, so a receiver that drips bytes cannot
keep it longer). `exchange` is that one request, any method, whose answer the caller reads: a dataset import from an
https URL (functions/dataset_fetch.py) goes through it too, under the same rule.
"""

import contextlib
import http.client
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from app.errors import Invalid
from app.settings import get_settings

MAX_URL_CHARS = 2000
MAX_ANSWER_BYTES = 4096  # of a receiver's answer, kept for the delivery log
# Cloud metadata services (AWS, GCP, Azure, ...: 169.254.169.254; AWS over IPv6: fd00:ec2::254). Both are in the
# link-local or private ranges refused anyway; named so the refusal says what they are.
METADATA_ADDRESSES = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Target:
    """A checked URL: what to connect to and what to ask for."""

    scheme: str  # http | https
    host: str  # the name, for the Host header and TLS (SNI, certificate)
    netloc: str  # host[:port] as the URL wrote it: the Host header
    port: int
    path: str  # path and query, "/" at least
    addresses: tuple[tuple[socket.AddressFamily, str], ...]  # every address of `host`, all checked, in lookup order


@dataclass(frozen=True)
class Answer:
    status_code: int | None  # None: no answer (refused, timed out, unreachable)
    error: str | None  # None: a 2xx
    latency_ms: int


def check_url(url: str, *, allow_loopback: bool | None = None, reach: str = "webhooks go to") -> Target:
    """The URL's target, or Invalid naming `url` with what is wrong (scheme, host, an address it resolves to).

    `allow_loopback`: None reads the webhooks' setting; `reach` words the refusal ("webhooks go to public addresses
    only")."""
    if len(url) > MAX_URL_CHARS:
        raise Invalid(f"url: at most {MAX_URL_CHARS} characters", field="url", code="invalid_url")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise Invalid(f"url: not a valid URL ({exc})", field="url", code="invalid_url") from None
    if parts.scheme not in ("http", "https"):
        raise Invalid("url: only http and https URLs can receive webhooks", field="url", code="invalid_url_scheme")
    if not parts.hostname:
        raise Invalid("url: no host", field="url", code="invalid_url")
    if parts.username is not None or parts.password is not None:
        raise Invalid("url: credentials in the URL are not supported", field="url", code="invalid_url")
    port = port or (443 if parts.scheme == "https" else 80)
    addresses = _resolve(parts.hostname, port)
    if allow_loopback is None:
        allow_loopback = get_settings().webhooks.webhooks_allow_loopback
    for _, address in addresses:
        kind = forbidden_kind(ipaddress.ip_address(address), allow_loopback)
        if kind is not None:
            raise Invalid(
                f"url: {parts.hostname} resolves to {address} ({kind}); {reach} public addresses only",
                field="url",
                code="forbidden_address",
            )
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(parts.scheme, parts.hostname, parts.netloc, port, path, addresses)


def forbidden_kind(address: IPAddress, allow_loopback: bool) -> str | None:
    """Why a webhook may not go to `address` ("private", "cloud metadata", ...), or None when it may."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
    if address in METADATA_ADDRESSES:
        return "cloud metadata"
    if address.is_loopback:
        return None if allow_loopback else "loopback"
    kinds = (
        ("unspecified", address.is_unspecified),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),
        ("private", address.is_private),
        ("non-public", not address.is_global),  # the rest of the special ranges (100.64.0.0/10, ...)
    )
    return next((kind for kind, matches in kinds if matches), None)


def post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> Answer:
    """POST `body` to `url` after checking it again; every failure is an Answer, never an exception."""
    started = time.monotonic()
    try:
        target = check_url(url)  # again: what the name resolves to now is where the request goes
        status, answer = _exchange(target, body, headers, timeout)
    except Invalid as refused:
        return Answer(None, f"refused: {refused.message}", _ms_since(started))
    except TimeoutError:
        return Answer(None, f"timed out after {timeout:g} s", _ms_since(started))
    except (OSError, http.client.HTTPException) as exc:
        return Answer(None, failure_text(exc), _ms_since(started))
    if 200 <= status < 300:
        return Answer(status, None, _ms_since(started))
    text = answer.decode("utf-8", errors="replace").strip()
    return Answer(status, f"HTTP {status}" + (f": {text}" if text else ""), _ms_since(started))


# ---- helpers ----------------------------------------------------------------------------------------------------


def _resolve(host: str, port: int) -> tuple[tuple[socket.AddressFamily, str], ...]:
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise Invalid(f"url: the host {host} does not resolve ({exc})", field="url", code="unresolvable_host") from None
    addresses: dict[str, socket.AddressFamily] = {}
    for family, _, _, _, sockaddr in found:
        address = str(sockaddr[0]).split("%", 1)[0]  # an IPv6 zone ("fe80::1%eth0") is not part of the address
        addresses.setdefault(address, family)
    return tuple((family, address) for address, family in addresses.items())


def _exchange(target: Target, body: bytes, headers: dict[str, str], timeout: float) -> tuple[int, bytes]:
    """(status, at most MAX_ANSWER_BYTES of the answer). TimeoutError once `timeout` s have passed."""
    with exchange(target, "POST", body, headers, timeout) as response:
        return response.status, response.read(MAX_ANSWER_BYTES)


@contextlib.contextmanager
def exchange(
    target: Target, method: str, body: bytes | None, headers: dict[str, str], timeout: float
) -> Iterator[http.client.HTTPResponse]:
    """One request to a checked target; its response is read inside the block. No redirect is followed. Reading
    past `timeout` s from the start (connect, send, answer) raises TimeoutError, whatever the other side does."""
    deadline = time.monotonic() + timeout
    held: list[socket.socket] = []  # the socket in use now, for the watchdog
    expired = threading.Event()

    def cut() -> None:
        expired.set()
        for sock in held:
            with contextlib.suppress(OSError):  # closed meanwhile
                sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked connect, recv or send in the sending thread

    watchdog = threading.Timer(timeout, cut)
    watchdog.daemon = True
    watchdog.start()
    try:
        sock = _connect(target, deadline, held)
        if target.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=target.host)
            held[:] = [sock]
        connection = http.client.HTTPConnection(target.host, target.port, timeout=timeout)
        connection.sock = sock  # already connected to the checked address: http.client does no lookup of its own
        connection.request(method, target.path, body, {"Host": target.netloc, **headers})
        yield connection.getresponse()
    except (OSError, http.client.HTTPException):
        if expired.is_set():
            raise TimeoutError from None
        raise
    finally:
        watchdog.cancel()
        for sock in held:
            sock.close()


def _connect(target: Target, deadline: float, held: list[socket.socket]) -> socket.socket:
    """A socket connected to the first checked address that answers, in lookup order (as create_connection)."""
    failure: OSError = ConnectionError(f"{target.host} has no address")
    for family, address in target.addresses:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock = socket.socket(family, socket.SOCK_STREAM)
        held[:] = [sock]
        sock.settimeout(left)
        try:
            sock.connect((address, target.port))
            return sock
        except OSError as exc:
            sock.close()
            failure = exc
    raise failure


def failure_text(exc: BaseException) -> str:
    """A failed exchange in a few words ("connection refused", "TLS: CERTIFICATE_VERIFY_FAILED")."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _ms_since(started: float) -> int:
    return round((time.monotonic() - started) * 1000)
