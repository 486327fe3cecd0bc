"""The SSRF guard of `image_url` (`pipeline.url_fetch`), against a real HTTP server on loopback.

No traffic leaves loopback, not even to prove a refusal: refusals are proven at the address
check, with a resolver injected by the test that maps `.test` names to private addresses. An
audit hook watches every `socket.connect` and `getaddrinfo` the process makes while these tests
run: it fails any connect to a non-loopback address and any lookup of a name (so no DNS query
is sent), and it counts connects to prove that a refused URL was never connected to.

A few tests need a first hop that passes the check while loopback is NOT allowed: the resolver
maps `cdn.test` to `PUBLIC_STAND_IN`, a public address, and the test's socket opener (the one
TCP connect of the module) turns a connection to that address into one to the loopback server.
The stand-in never receives a packet: the audit hook would fail the test first.
"""

from __future__ import annotations

import datetime
import io
import ipaddress
import socket
import socketserver
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from pipeline import url_fetch
from pipeline.errors import ImageInputError
from pipeline.image_input import load_reference_image
from pipeline.url_fetch import fetch_url, system_resolve

PUBLIC_STAND_IN = "93.184.215.14"  # passes check_address; never connected to (see above)

# ---------------------------------------------------------------- network guard (audit hook)

_GUARD: dict = {"connects": None, "lookups": None, "thread": None}


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _audit(event: str, args: tuple) -> None:
    connects, lookups = _GUARD["connects"], _GUARD["lookups"]
    if connects is None:
        return
    thread = threading.current_thread()  # the test's thread and the fetcher's resolver thread
    if thread is not _GUARD["thread"] and thread.name != "resolve":
        return  # other tests' background threads (servers, health checks) are not ours
    if event == "socket.connect" and isinstance(args[1], tuple):
        if not _is_loopback(str(args[1][0])):
            raise RuntimeError(f"test tried to connect to {args[1]!r}, outside loopback")
        connects.append(args[1])
    elif event in ("socket.gethostbyname", "socket.gethostbyaddr"):
        raise RuntimeError(f"test tried a host lookup: {event}{args!r}")
    elif event == "socket.getaddrinfo" and args[0] is not None:
        host = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
        try:
            ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            raise RuntimeError(f"test tried to look up the name {host!r}") from None
        lookups.append(host)


sys.addaudithook(_audit)  # hooks cannot be removed: it only acts while _GUARD is armed


@pytest.fixture(autouse=True)
def connects():
    """Every TCP connect made during the test (all to loopback, or the test fails)."""
    _GUARD.update(connects=[], lookups=[], thread=threading.current_thread())
    yield _GUARD["connects"]
    _GUARD.update(connects=None, lookups=None, thread=None)


# ---------------------------------------------------------------- the loopback server


def png(size=(96, 80), color=(200, 30, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


HTML = b"<!doctype html>\n<html><body>not a face</body></html>\n"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        headers = {key.lower(): value for key, value in self.headers.items()}
        self.server.seen.append({"path": self.path, **headers})
        route = self.server.routes.get(self.path.partition("?")[0])
        if route is None:
            self.send_error(404)
            return
        try:
            route(self)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass  # the client gave up, as the test wanted

    def send(self, body: bytes, content_type: str = "image/png", status: int = 200,
             headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:  # HTTPServer's own does a reverse lookup (getfqdn)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "localhost", self.server_address[1]


class LoopbackServer:
    """http.server on 127.0.0.1 in a thread; tests set `routes[path] = handler -> None`."""

    def __init__(self, tls: ssl.SSLContext | None = None):
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.httpd.routes, self.httpd.seen = {}, []
        self.stop = self.httpd.stop = threading.Event()
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def routes(self) -> dict:
        return self.httpd.routes

    @property
    def seen(self) -> list[dict]:
        return self.httpd.seen

    def url(self, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def module_server():
    server = LoopbackServer()
    yield server
    server.close()


@pytest.fixture
def server(module_server):
    module_server.routes.clear()
    module_server.seen.clear()
    return module_server


class FakeDNS:
    """The injected resolver: `.test` names to fixed addresses, every lookup counted."""

    def __init__(self, **table: str | list[str]):
        self.table = {k.replace("_", "-") + ".test": [v] if isinstance(v, str) else v
                      for k, v in table.items()}
        self.calls: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(self.table[host])


@pytest.fixture
def via_stand_in(monkeypatch):
    """Route connections to PUBLIC_STAND_IN to loopback; returns the addresses asked for."""
    asked: list[str] = []
    real = url_fetch._open_socket

    def open_socket(address: str, port: int, timeout: float) -> socket.socket:
        asked.append(address)
        return real("127.0.0.1" if address == PUBLIC_STAND_IN else address, port, timeout)

    monkeypatch.setattr(url_fetch, "_open_socket", open_socket)
    return asked


def refused(excinfo) -> str:
    return str(excinfo.value)


# ---------------------------------------------------------------- refused before any connection


@pytest.mark.parametrize(("url", "expected"), [
    ("ftp://cdn.test/face.png", "got scheme 'ftp'"),
    ("file:///etc/passwd", "got scheme 'file'"),
    ("gopher://cdn.test:70/_x", "got scheme 'gopher'"),
    ("javascript:alert(1)", "got scheme 'javascript'"),
    ("//cdn.test/face.png", "got no scheme"),
    ("http://user:secret@cdn.test/face.png", "must not contain credentials"),
    ("http://cdn.test:99999/face.png", "is not a valid URL"),
    ("http://cdn.test/a b.png", "spaces or control characters"),
    ("http:///face.png", "has no host name"),
    ("http://internal.test/face.png", "private address (10.0.0.5)"),
    ("http://metadata.test/latest/meta-data/", "cloud-metadata address (169.254.169.254)"),
    ("http://metadata6.test/", "cloud-metadata address (fd00:ec2::254)"),
    ("http://mixed.test/face.png", "private address (10.0.0.5)"),
    ("http://cgnat.test/face.png", "carrier-grade NAT address (100.64.1.2)"),
    ("http://169.254.169.254/latest/meta-data/", "cloud-metadata address (169.254.169.254)"),
    ("http://[::ffff:a00:5]/face.png", "IPv4-mapped form of 10.0.0.5"),
    ("http://[fd00:ec2::254]/", "cloud-metadata address"),
    ("http://2130706433/face.png", "loopback address (127.0.0.1)"),
    ("http://0x7f.1/face.png", "loopback address (127.0.0.1)"),
    ("http://127.1/face.png", "loopback address (127.0.0.1)"),
    ("http://0/face.png", "unspecified address (0.0.0.0)"),
    ("http://012.0.0.5/face.png", "private address (10.0.0.5)"),
    ("http://nowhere.test/face.png", "could not be resolved (Name or service not known)"),
    ("http://empty.test/face.png", "resolves to no address"),
])
def test_refused_before_connecting(url, expected, connects):
    dns = FakeDNS(internal="10.0.0.5", metadata="169.254.169.254", metadata6="fd00:ec2::254",
                  mixed=[PUBLIC_STAND_IN, "10.0.0.5"], cgnat="100.64.1.2", empty=[])
    with pytest.raises(ImageInputError) as excinfo:
        fetch_url(url, resolve=dns, allow_loopback=False)
    assert expected in refused(excinfo)
    assert refused(excinfo).startswith("`image_url` ")
    assert connects == []
    host = url.split("/")[2] if url.count("/") >= 2 else ""
    assert dns.calls in ([], [host])  # literals are never looked up


def test_secret_query_is_not_echoed():
    with pytest.raises(ImageInputError) as excinfo:
        fetch_url("http://user:hunter2@cdn.test/x.png?sig=hunter2", resolve=FakeDNS())
    assert "hunter2" not in refused(excinfo)


def test_loopback_is_refused_unless_the_caller_allows_it(server, monkeypatch, connects):
    """No environment switch turns the SSRF guard off: only a caller (a test) can allow
    loopback, and only loopback."""
    server.routes["/face.png"] = lambda h: h.send(png())
    monkeypatch.setenv("PIPELINE_ALLOW_LOOPBACK_URLS", "1")  # the removed switch does nothing
    with pytest.raises(ImageInputError, match=r"loopback address \(127\.0\.0\.1\)"):
        fetch_url(server.url("/face.png"))
    assert connects == []
    assert fetch_url(server.url("/face.png"), allow_loopback=True) == png()
    assert len(connects) == 1
    with pytest.raises(ImageInputError, match="private address"):  # loopback only
        fetch_url("http://internal.test/face.png", resolve=FakeDNS(internal="10.0.0.5"),
                  allow_loopback=True)


def test_system_resolver_reads_numeric_hosts_without_lookups():
    assert system_resolve("127.0.0.1", 80) == ["127.0.0.1"]


def test_slow_resolver_hits_the_deadline(connects):
    release, answered = threading.Event(), threading.Event()

    def stuck(host: str, port: int) -> list[str]:
        release.wait(30)  # only bounds the thread if the fetch never gives up
        answered.set()
        return ["10.0.0.5"]

    with pytest.raises(ImageInputError, match="took longer than 0.3 s"):
        fetch_url("http://slow-dns.test/x.png", resolve=stuck, deadline_s=0.3)
    assert not answered.is_set()  # the fetch gave up while the lookup was still stuck
    release.set()
    assert connects == []


# ---------------------------------------------------------------- served over loopback


def test_ipv6_literal_gets_a_bracketed_host_header():
    class V6(_Server):
        address_family = socket.AF_INET6

    try:
        httpd = V6(("::1", 0), _Handler)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    httpd.routes, httpd.seen = {"/face.png": lambda h: h.send(png())}, []
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://[::1]:{httpd.server_address[1]}/face.png"
        assert fetch_url(url, allow_loopback=True) == png()
        assert httpd.seen[0]["host"] == f"[::1]:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_fetch_sends_host_header_and_returns_body(server):
    server.routes["/face.png"] = lambda h: h.send(png())
    assert fetch_url(server.url("/face.png?size=1"), allow_loopback=True) == png()
    request = server.seen[0]
    assert request["host"] == f"127.0.0.1:{server.port}"
    assert request["accept-encoding"] == "identity"
    assert request["path"] == "/face.png?size=1"


def test_png_served_as_html_is_accepted(server, monkeypatch):
    server.routes["/face"] = lambda h: h.send(png((120, 90)), "text/html; charset=utf-8")
    image = load_reference_image(url=server.url("/face"), allow_loopback=True)
    assert (image.mode, image.size, image.getpixel((5, 5))) == ("RGB", (120, 90), (200, 30, 40))


@pytest.mark.parametrize("content_type", ["image/png", "text/html"])
def test_html_is_refused_whatever_its_content_type(server, monkeypatch, content_type):
    server.routes["/face.png"] = lambda h: h.send(HTML, content_type)
    with pytest.raises(ImageInputError) as excinfo:
        load_reference_image(url=server.url("/face.png"), allow_loopback=True)
    assert refused(excinfo).startswith(f"`image_url` is not an image (got {content_type} "
                                       f"content starting with '<!doctype')")


def test_redirects_are_followed_up_to_the_limit(server):
    server.routes["/face.png"] = lambda h: h.send(png())
    for n in range(1, 5):  # /r1 -> /r2 -> ... -> /face.png, relative and absolute Locations
        target = "/face.png" if n == 1 else (f"/r{n - 1}" if n % 2 else server.url(f"/r{n - 1}"))
        server.routes[f"/r{n}"] = lambda h, t=target: h.send(b"", headers={"Location": t},
                                                            status=302)
    assert fetch_url(server.url("/r3"), allow_loopback=True) == png()  # 3 redirects
    with pytest.raises(ImageInputError, match="redirected more than 3 times"):
        fetch_url(server.url("/r4"), allow_loopback=True)


@pytest.mark.parametrize(("location", "expected"), [
    ("http://internal.test/face.png",
     "redirect to http://internal.test/face.png resolves to a private address (10.0.0.5)"),
    ("http://metadata.test/latest/meta-data/iam",
     "resolves to a cloud-metadata address (169.254.169.254)"),
    ("http://[::ffff:a9fe:a9fe]/", "IPv4-mapped form of 169.254.169.254"),
    ("http://0.0.0.0:{port}/face.png", "unspecified address (0.0.0.0)"),
    ("file:///etc/passwd", "redirect to file:///etc/passwd must be an http or https URL"),
    ("data:image/png;base64,AAAA", "must be an http or https URL"),
])
def test_redirect_targets_are_checked_before_connecting(server, connects, location, expected):
    server.routes["/go"] = lambda h: h.send(
        b"", status=307, headers={"Location": location.format(port=server.port)})
    dns = FakeDNS(internal="10.0.0.5", metadata="169.254.169.254")
    with pytest.raises(ImageInputError) as excinfo:
        fetch_url(server.url("/go"), resolve=dns, allow_loopback=True)
    assert expected in refused(excinfo)
    assert len(connects) == 1  # the loopback server only


@pytest.mark.parametrize("location", [
    "http://127.0.0.1:{port}/face.png", "http://localhost.test:{port}/face.png",
    "http://[::ffff:127.0.0.1]:{port}/face.png", "http://[::1]:{port}/face.png",
    "http://2130706433:{port}/face.png",
])
def test_redirect_to_loopback_is_refused_when_loopback_is_not_allowed(
        server, connects, via_stand_in, location):
    server.routes["/go"] = lambda h: h.send(
        b"", status=302, headers={"Location": location.format(port=server.port)})
    server.routes["/face.png"] = lambda h: h.send(png())
    dns = FakeDNS(cdn=PUBLIC_STAND_IN, localhost="127.0.0.1")
    with pytest.raises(ImageInputError, match="loopback address") as excinfo:
        fetch_url(f"http://cdn.test:{server.port}/go", resolve=dns, allow_loopback=False)
    assert "redirect to " in refused(excinfo)
    assert via_stand_in == [PUBLIC_STAND_IN] and len(connects) == 1
    assert [r["path"] for r in server.seen] == ["/go"]


def test_connection_is_pinned_to_the_checked_address(server, via_stand_in):
    """A rebinding resolver answers a private address the second time: never asked again."""
    answers = iter([[PUBLIC_STAND_IN], ["10.0.0.5"], ["10.0.0.5"]])
    calls: list[str] = []

    def rebinding(host: str, port: int) -> list[str]:
        calls.append(host)
        return next(answers)

    server.routes["/face.png"] = lambda h: h.send(png())
    assert fetch_url(f"http://cdn.test:{server.port}/face.png", resolve=rebinding,
                     allow_loopback=False) == png()
    assert calls == ["cdn.test"] and via_stand_in == [PUBLIC_STAND_IN]
    assert server.seen[0]["host"] == f"cdn.test:{server.port}"  # the name, not the address


def test_unroutable_address_falls_back_to_the_next_checked_one(server, monkeypatch):
    real = url_fetch._open_socket

    def open_socket(address: str, port: int, timeout: float) -> socket.socket:
        if address == "::1":
            raise OSError(101, "Network is unreachable")
        return real(address, port, timeout)

    monkeypatch.setattr(url_fetch, "_open_socket", open_socket)
    server.routes["/face.png"] = lambda h: h.send(png())
    dns = FakeDNS(dual=["::1", "127.0.0.1"])
    assert fetch_url(f"http://dual.test:{server.port}/face.png", resolve=dns,
                     allow_loopback=True) == png()


def _drip(handler, *, length: int, pause: float, headers: bool = True) -> None:
    if headers:
        handler.send_response(200)
        handler.send_header("Content-Type", "image/png")
        handler.send_header("Content-Length", str(length))
        handler.end_headers()
        data = b"x" * length
    else:
        data = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n" + b"X-Pad: y\r\n" * 500
    for i in range(len(data)):
        if handler.server.stop.is_set() and i:
            return
        handler.wfile.write(data[i:i + 1])
        handler.wfile.flush()
        time.sleep(pause)


@pytest.mark.parametrize("headers", [True, False], ids=["slow-body", "slow-headers"])
def test_slow_answers_hit_the_total_deadline(server, headers):
    server.routes["/slow"] = lambda h: _drip(h, length=10_000, pause=0.05, headers=headers)
    with pytest.raises(ImageInputError, match="took longer than 0.6 s to download"):
        fetch_url(server.url("/slow"), allow_loopback=True, timeout_s=2, deadline_s=0.6)


def test_silent_server_hits_the_read_timeout(server):
    server.routes["/stall"] = lambda h: h.server.stop.wait(5)
    with pytest.raises(ImageInputError, match=r"127\.0\.0\.1:\d+ did not answer within 0.3 s"):
        fetch_url(server.url("/stall"), allow_loopback=True, timeout_s=0.3, deadline_s=5)


ENDLESS_CAP = 50_000_000  # the endless server's own stop: far beyond any socket buffering


def _endless(handler, served: dict, ended: threading.Event) -> None:
    """Writes until the client hangs up (or ENDLESS_CAP); counts the bytes it got out."""
    handler.send_response(200)
    handler.send_header("Content-Type", "image/png")
    handler.send_header("Connection", "close")
    handler.end_headers()
    block = png() + b"\0" * 60_000
    try:
        while served["sent"] < ENDLESS_CAP:
            handler.wfile.write(block)
            served["sent"] += len(block)
        served["ended_by"] = "cap"
    except OSError as exc:
        served["ended_by"] = type(exc).__name__
    finally:
        ended.set()


class _CountingSocket(socket.socket):
    """The fetcher's TCP socket, counting every byte it receives (http.client reads through
    `recv_into` for the status line, the headers and the body alike)."""

    received = 0

    def recv_into(self, buffer, nbytes=0, flags=0):
        count = super().recv_into(buffer, nbytes, flags)
        self.received += count
        return count


@pytest.fixture
def counting_sockets(monkeypatch) -> list[_CountingSocket]:
    """Every socket the fetcher opens, as a _CountingSocket (loopback addresses only)."""
    opened: list[_CountingSocket] = []

    def open_socket(address: str, port: int, timeout: float) -> socket.socket:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = _CountingSocket(family, socket.SOCK_STREAM)
        opened.append(sock)
        sock.settimeout(timeout)
        sock.connect((address, port))
        return sock

    monkeypatch.setattr(url_fetch, "_open_socket", open_socket)
    return opened


def test_endless_body_stops_at_the_byte_limit(server, counting_sockets):
    served, ended = {"sent": 0, "ended_by": None}, threading.Event()
    server.routes["/endless"] = lambda h: _endless(h, served, ended)
    max_bytes = 256 * 1024
    with pytest.raises(ImageInputError) as excinfo:
        fetch_url(server.url("/endless"), allow_loopback=True, max_bytes=max_bytes)
    assert refused(excinfo) == "`image_url` is larger than 256 KB"
    [sock] = counting_sockets
    # The body is read one chunk at a time and the first chunk past the limit ends it; before
    # the body, one buffer fill held the status line and headers (and maybe the body's start).
    assert max_bytes < sock.received <= max_bytes + url_fetch._CHUNK + io.DEFAULT_BUFFER_SIZE
    # Closed on the way out, while the error (and its traceback) is still alive: the server's
    # next write fails, so it was cut off rather than drained or left blocked.
    assert sock.fileno() == -1
    assert ended.wait(60), "the server is still writing"  # a hang guard, not a measurement
    assert served["ended_by"] in ("BrokenPipeError", "ConnectionResetError")
    assert served["sent"] < ENDLESS_CAP


def test_declared_length_over_the_limit_is_refused_before_the_body(server):
    def huge(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(10**10))
        handler.end_headers()
        handler.server.stop.wait(5)

    server.routes["/huge"] = huge
    with pytest.raises(ImageInputError, match=r"is larger than 20 MB \(Content-Length 10000"):
        fetch_url(server.url("/huge"), allow_loopback=True)


def _cut_short(handler) -> None:
    handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\nshort")
    handler.close_connection = True


@pytest.mark.parametrize(("route", "expected"), [
    (lambda h: h.send(b"gone", "text/plain", status=404), "answered HTTP 404 Not Found"),
    (lambda h: h.send(b"", status=302), "answered HTTP 302 without a Location header"),
    (lambda h: h.send(png(), headers={"Content-Encoding": "gzip"}), "Content-Encoding 'gzip'"),
    (lambda h: _cut_short(h), "closed the connection before the whole answer arrived"),
])
def test_bad_answers_are_refused(server, route, expected):
    server.routes["/x"] = route
    with pytest.raises(ImageInputError, match=expected):
        fetch_url(server.url("/x"), allow_loopback=True)


def test_closed_port_is_reported():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ImageInputError, match=f"could not connect to 127.0.0.1:{port}"):
        fetch_url(f"http://127.0.0.1:{port}/x.png", allow_loopback=True)


# ---------------------------------------------------------------- https: SNI and certificates


def _certificates(tmp_path, name: str):
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def build(subject, issuer, key, signer, ca: bool):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(hours=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                                  critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       signer.public_key()), critical=False))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False), critical=True)
        else:
            builder = (builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]),
                                             critical=False)
                       .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                                      critical=False))
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = build(ca_name, ca_name, ca_key, ca_key, True)
    leaf = build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), ca_name, leaf_key,
                 ca_key, False)
    pem = serialization.Encoding.PEM
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(pem))
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(pem))
    (tmp_path / "leaf.key").write_bytes(leaf_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return tmp_path / "ca.pem", tmp_path / "leaf.pem", tmp_path / "leaf.key"


@pytest.mark.parametrize(("cert_name", "ok"), [("images.test", True), ("other.test", False)])
def test_https_uses_sni_and_verifies_the_host_name(tmp_path, cert_name, ok):
    ca, leaf, key = _certificates(tmp_path, cert_name)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(leaf, key)
    sni: list[str | None] = []
    server_tls.sni_callback = lambda sock, name, ctx: sni.append(name)
    server = LoopbackServer(server_tls)
    try:
        server.routes["/face.png"] = lambda h: h.send(png())
        client_tls = ssl.create_default_context(cafile=str(ca))
        url = server.url("/face.png", host="images.test", scheme="https")

        def call() -> bytes:
            return fetch_url(url, resolve=FakeDNS(images="127.0.0.1"), allow_loopback=True,
                             ssl_context=client_tls, timeout_s=5)

        if ok:
            assert call() == png()
            assert server.seen[0]["host"] == f"images.test:{server.port}"
        else:
            with pytest.raises(ImageInputError, match="TLS certificate of images.test could "
                                                      "not be verified"):
                call()
            assert server.seen == []
        assert sni == ["images.test"]
    finally:
        server.close()
