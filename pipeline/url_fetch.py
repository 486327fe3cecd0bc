"""Fetching an untrusted reference-image URL without letting it reach our own network.

`image_url` is chosen by whoever sends the request, and the worker runs inside a cloud network
(metadata services, private subnets, the host's loopback). So every fetch:

- accepts only `http`/`https` URLs (`image_input` decodes inline `data:` URIs, no I/O);
- resolves the host once, refuses it when ANY address is private, loopback, link-local,
  multicast, reserved, unspecified, carrier-grade NAT or a cloud-metadata address (IPv4, IPv6,
  and IPv4 embedded in IPv4-mapped, 6to4 and NAT64 addresses), then connects to exactly the
  addresses it checked (pinned: no second lookup a rebinding DNS server could answer
  differently), sending the original `Host` header and, for https, SNI plus certificate
  verification against the host name;
- follows at most `MAX_REDIRECTS` redirects, each one checked the same way;
- bounds every connect and read (`FETCH_TIMEOUT_S`), the whole fetch (`FETCH_DEADLINE_S`, a
  watchdog shuts the socket down when it passes) and the body size (`MAX_IMAGE_BYTES`, enforced
  while streaming);
- ignores proxy settings in the environment (http.client never reads them).

Loopback addresses are allowed only when a caller passes `allow_loopback=True` (tests).
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

from pipeline import cancel
from pipeline.addresses import (  # noqa: F401  (re-exported: image_input and tests use them)
    address_problem,
    check_address,
)
from pipeline.errors import ImageInputError, shorten

log = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 20 * 1024 * 1024  # body of a fetched image, upload or decoded data: URI
FETCH_TIMEOUT_S = 10.0  # each connect and each read
FETCH_DEADLINE_S = 30.0  # the whole fetch, redirects included
MAX_REDIRECTS = 3
USER_AGENT = "character-faceswap/0.1 (reference image fetch)"

Resolver = Callable[[str, int], list[str]]

_CHUNK = 64 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST_NAME = re.compile(r"[a-z0-9_.-]+")
_LEGACY_IPV4 = re.compile(r"[0-9a-fx.]+")  # 0x7f.1, 2130706433, 127.1: what inet_aton accepts

def human_size(n: int) -> str:
    """A byte count as people read it: 20 MB, 256 KB, 900 bytes (binary multiples)."""
    for unit, size in (("MB", 1024**2), ("KB", 1024)):
        if n >= size:
            return f"{n / size:.1f}".removesuffix(".0") + f" {unit}"
    return f"{n} bytes"


def system_resolve(host: str, port: int) -> list[str]:
    """The addresses the system resolver gives for `host`, in its preference order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class Fetched:
    """A fetched body and what the server said about it."""

    data: bytes
    content_type: str  # the media type the server declared ("" when none)
    url: str  # the final URL, without its query (safe to log)


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str  # ASCII host name, or an IP address without brackets
    port: int
    path: str  # request target: path and query
    ip: str | None  # the address, when the host is an IP literal


def display_url(url: str) -> str:
    """`url` without credentials, query or fragment (signed URLs carry secrets there)."""
    try:
        parts = urlsplit(url)
        text = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
    except ValueError:
        text = url.partition("?")[0]
    return text if len(text) <= 120 else text[:117] + "..."


class _Deadline:
    """The whole fetch's time budget."""

    def __init__(self, seconds: float, field: str):
        self.seconds, self.field = seconds, field
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def error(self) -> ImageInputError:
        return ImageInputError(self.field, f"took longer than {self.seconds:g} s to download")

    def timeout(self, per_step: float) -> float:
        """The timeout for the next step: `per_step`, or less when the deadline is closer."""
        left = self.remaining()
        if left <= 0:
            raise self.error()
        return min(per_step, left)


def _parse(url: str, field: str, subject: str) -> _Target:
    def refuse(rule: str) -> ImageInputError:
        return ImageInputError(field, f"{subject}{rule}")

    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise refuse("must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise refuse(f"is not a valid URL ({exc})") from exc
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        got = f"scheme {scheme!r}" if scheme else "no scheme"
        raise refuse(f"must be an http or https URL (or a data: URI), got {got}")
    if parts.username is not None or parts.password is not None:
        raise refuse("must not contain credentials (user:password@)")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise refuse("has no host name")
    ip: str | None = None
    try:
        ip = str(ipaddress.ip_address(host))
    except ValueError:
        if not host.isascii():
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError as exc:
                raise refuse(f"has an invalid host name {shorten(host)}") from exc
        if not _HOST_NAME.fullmatch(host):
            raise refuse(f"has an invalid host name {shorten(host)}")
        if _LEGACY_IPV4.fullmatch(host):
            try:  # the numeric forms every resolver also accepts: check what they mean
                ip = str(ipaddress.IPv4Address(socket.inet_aton(host)))
            except OSError:
                pass
    path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    if parts.query:
        path += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    return _Target(scheme, host, port or _DEFAULT_PORTS[scheme], path, ip)


def _run_with_timeout(call: Callable[[], list[str]], timeout: float) -> list[str] | None:
    """`call()` in a daemon thread (getaddrinfo cannot time out); None when it is too slow."""
    box: dict[str, object] = {}

    def work() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # noqa: BLE001  (re-raised in the caller's thread)
            box["error"] = exc

    thread = threading.Thread(target=work, name="resolve", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return None
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def _checked_addresses(target: _Target, resolve: Resolver, allow_loopback: bool,
                       deadline: _Deadline, timeout_s: float, subject: str) -> list[str]:
    field = deadline.field
    if target.ip is not None:
        addresses = [target.ip]
    else:
        try:
            found = _run_with_timeout(lambda: resolve(target.host, target.port),
                                      deadline.timeout(timeout_s))
        except (OSError, UnicodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise ImageInputError(field, f"{subject}host {target.host} could not be resolved "
                                         f"({reason})") from exc
        if found is None:
            if deadline.remaining() <= 0:
                raise deadline.error()
            raise ImageInputError(field, f"{subject}host {target.host} did not resolve within "
                                         f"{timeout_s:g} s")
        addresses = list(dict.fromkeys(found))
        if not addresses:
            raise ImageInputError(field, f"{subject}host {target.host} resolves to no address")
    for address in addresses:  # every one: a mix of public and private is refused too
        problem = address_problem(address, allow_loopback=allow_loopback)
        if problem is not None:
            raise ImageInputError(field, f"{subject}{problem}")
    return addresses


def _open_socket(address: str, port: int, timeout: float) -> socket.socket:
    """The one place a TCP connection is made (to an address already checked)."""
    return socket.create_connection((address, port), timeout)


class _PinnedConnection(http.client.HTTPConnection):
    """HTTP(S) to the checked addresses only; `Host`, SNI and the certificate use the name."""

    def __init__(self, target: _Target, addresses: list[str], timeout: float,
                 tls: ssl.SSLContext | None):
        super().__init__(target.host, target.port, timeout=timeout)
        self.addresses, self.tls = addresses, tls
        self.default_port = _DEFAULT_PORTS[target.scheme]  # the Host header omits it then
        self.live_sock: socket.socket | None = None  # kept after http.client drops `sock`

    def connect(self) -> None:
        error: OSError | None = None
        for address in self.addresses:  # e.g. an AAAA record the container cannot route
            try:
                self.live_sock = self.sock = _open_socket(address, self.port, self.timeout)
                break
            except OSError as exc:
                error = exc
        else:
            assert error is not None
            raise error
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            self.live_sock = self.sock = self.tls.wrap_socket(
                self.sock, server_hostname=self.host, do_handshake_on_connect=False)
            self.sock.do_handshake()  # after `live_sock` is set, so the watchdog can stop it

    def abort(self) -> None:
        """Unblock any read on this connection (called by the deadline watchdog)."""
        if self.live_sock is not None:
            try:  # the plain socket call, also on an SSLSocket: shut the descriptor down
                socket.socket.shutdown(self.live_sock, socket.SHUT_RDWR)
            except OSError:
                pass


@functools.cache
def default_tls_context() -> ssl.SSLContext:
    """Verifying TLS context: the system's CA store plus certifi's bundle when installed."""
    context = ssl.create_default_context()
    try:
        import certifi

        context.load_verify_locations(certifi.where())
    except (ImportError, OSError):
        pass
    return context


def _network_error(exc: BaseException, target: _Target, field: str, subject: str,
                   timeout_s: float) -> ImageInputError:
    where = f"{target.host}:{target.port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = f"TLS certificate of {target.host} could not be verified ({exc.verify_message})"
    elif isinstance(exc, ssl.SSLError):
        why = f"TLS handshake with {where} failed ({exc.reason or exc})"
    elif isinstance(exc, TimeoutError):
        why = f"{where} did not answer within {timeout_s:g} s"
    elif isinstance(exc, ConnectionRefusedError):
        why = f"could not connect to {where} (connection refused)"
    elif isinstance(exc, (http.client.RemoteDisconnected, http.client.IncompleteRead,
                          ConnectionResetError)):
        why = f"{where} closed the connection before the whole answer arrived"
    else:
        why = f"could not be fetched from {where} ({type(exc).__name__}: {shorten(str(exc))})"
    return ImageInputError(field, f"{subject}{why}")


def _read_body(response: http.client.HTTPResponse, conn: _PinnedConnection, max_bytes: int,
               timeout_s: float, deadline: _Deadline, subject: str) -> bytes:
    field = deadline.field
    encoding = (response.getheader("Content-Encoding") or "identity").strip().lower()
    if encoding != "identity":
        raise ImageInputError(field, f"{subject}answered with Content-Encoding "
                                     f"{shorten(encoding)}; only uncompressed bodies are accepted")
    declared = (response.getheader("Content-Length") or "").strip()
    if declared.isdigit() and int(declared) > max_bytes:
        raise ImageInputError(field, f"{subject}is larger than {human_size(max_bytes)} "
                                     f"(Content-Length {declared})")
    body = bytearray()
    while True:
        conn.live_sock.settimeout(deadline.timeout(timeout_s))
        chunk = response.read1(_CHUNK)
        if not chunk:
            cancel.check("reference download")  # an aborted socket reads as the end
            if declared.isdigit() and len(body) < int(declared):  # read1 does not check
                raise http.client.IncompleteRead(bytes(body), int(declared) - len(body))
            return bytes(body)
        body += chunk
        if len(body) > max_bytes:
            raise ImageInputError(field, f"{subject}is larger than {human_size(max_bytes)}")


def fetch(url: str, *, field: str = "image_url", max_bytes: int = MAX_IMAGE_BYTES,
          timeout_s: float = FETCH_TIMEOUT_S, deadline_s: float = FETCH_DEADLINE_S,
          resolve: Resolver | None = None, allow_loopback: bool = False,
          ssl_context: ssl.SSLContext | None = None) -> Fetched:
    """Fetch an untrusted http(s) URL under every rule of this module.

    `resolve(host, port) -> [ip, ...]` defaults to the system resolver; `allow_loopback`
    (tests only) lets loopback addresses through; `ssl_context` defaults to a verifying one.
    """
    url = url.strip()
    resolve = resolve or system_resolve
    allow = allow_loopback
    deadline = _Deadline(deadline_s, field)
    started, subject, current = time.monotonic(), "", url
    for _hop in range(MAX_REDIRECTS + 1):
        target = _parse(current, field, subject)
        addresses = _checked_addresses(target, resolve, allow, deadline, timeout_s, subject)
        tls = (ssl_context or default_tls_context()) if target.scheme == "https" else None
        conn = _PinnedConnection(target, addresses, deadline.timeout(timeout_s), tls)
        watchdog = threading.Timer(max(deadline.remaining(), 0.0), conn.abort)
        watchdog.daemon = True
        watchdog.start()
        response: http.client.HTTPResponse | None = None
        # A stop of the request (`pipeline.cancel`) aborts the socket, as the watchdog does.
        with cancel.on_cancel(conn.abort):
            try:
                conn.request("GET", target.path, headers={
                    "User-Agent": USER_AGENT, "Accept": "image/*", "Connection": "close"})
                response = conn.getresponse()
                if response.status in _REDIRECTS:
                    location = (response.getheader("Location") or "").strip()
                    if not location:
                        raise ImageInputError(field, f"{subject}answered HTTP {response.status} "
                                                     f"without a Location header")
                    current = urljoin(current, location)
                    subject = f"redirect to {display_url(current)} "
                    continue
                if response.status != 200:
                    reason = "".join(c for c in (response.reason or "")[:40] if c.isprintable())
                    raise ImageInputError(field, f"{subject}answered HTTP {response.status} {reason}"
                                          .rstrip())
                data = _read_body(response, conn, max_bytes, timeout_s, deadline, subject)
                media = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
                log.info("fetched %s: %d bytes, %s, %.2f s", display_url(current), len(data),
                         media or "no content type", time.monotonic() - started)
                return Fetched(data, media, display_url(current))
            except (OSError, http.client.HTTPException) as exc:
                cancel.check("reference download")
                if deadline.remaining() <= 0:
                    raise deadline.error() from exc
                raise _network_error(exc, target, field, subject, timeout_s) from exc
            finally:
                watchdog.cancel()
                if response is not None:  # it owns the socket (`Connection: close`): close it now,
                    response.close()  # not when the error and its traceback are freed
                conn.close()
    raise ImageInputError(field, f"redirected more than {MAX_REDIRECTS} times "
                                 f"(last to {display_url(current)})")


def fetch_url(url: str, *, field: str = "image_url", max_bytes: int = MAX_IMAGE_BYTES,
              timeout_s: float = FETCH_TIMEOUT_S, deadline_s: float = FETCH_DEADLINE_S,
              resolve: Resolver | None = None, allow_loopback: bool = False,
              ssl_context: ssl.SSLContext | None = None) -> bytes:
    """The body of an untrusted URL (see `fetch`), whatever its declared content type."""
    return fetch(url, field=field, max_bytes=max_bytes, timeout_s=timeout_s,
                 deadline_s=deadline_s, resolve=resolve, allow_loopback=allow_loopback,
                 ssl_context=ssl_context).data
