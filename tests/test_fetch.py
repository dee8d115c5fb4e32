"""pipeline.fetch + pipeline.crawl_shard.probe against the hostile web (tests/hostile_web.py): every way a URL can
go wrong ends in its error class, within the deadline and the caps; address policy, user agent, per-host limits."""

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hostile_web import HostileWeb

from pipeline.crawl_shard import probe
from pipeline.fetch import ERROR_CLASSES, FetchConfig, FetchError, HostLimits, fetch, opted_out

CFG = FetchConfig(timeout=3, max_body_bytes=4 * 2**20, allow_private_addresses=True)


def classify(url: str, cfg: FetchConfig = CFG) -> tuple[str, str]:
    got = fetch(url, cfg, HostLimits(cfg.per_host_concurrency, cfg.per_host_rate))
    if not got.ok:
        return got.error_class, got.message
    try:
        info = probe(got, cfg.max_pixels)
    except FetchError as e:
        return e.error_class, str(e)
    return "success", f"{info['format']} {info['width']}x{info['height']}"


@pytest.fixture(scope="module")
def web():
    with HostileWeb(drip_seconds=30) as w:
        yield w


def test_every_hostile_case_gets_its_class(web):
    cases = web.cases()
    assert {c["expect"] for c in cases} - {"success"} <= set(ERROR_CLASSES)
    got = {c["url"]: classify(c["url"]) for c in cases}
    wrong = {url: (c["expect"], got[url]) for url, c in zip(got, cases) if got[url][0] != c["expect"]}
    assert not wrong


def test_the_drip_is_cut_at_the_deadline(web):
    t0 = time.monotonic()
    cls, msg = classify(web.url("drip.jpg"), FetchConfig(timeout=2, allow_private_addresses=True))
    elapsed = time.monotonic() - t0
    assert cls == "timeout" and 1.9 <= elapsed < 3.0, (cls, msg, elapsed)


def test_big_bodies_stop_at_the_cap_while_streaming(web):
    cfg = FetchConfig(timeout=10, max_body_bytes=2**20, allow_private_addresses=True)
    cls, msg = classify(web.url("big-chunked.jpg"), cfg)  # no Content-Length: only the streaming cap can stop it
    assert cls == "too_large" and "while streaming" in msg
    cls, msg = classify(web.url("big.jpg"), cfg)  # a Content-Length over the cap: refused before the body
    assert cls == "too_large" and "Content-Length" in msg


def test_private_and_metadata_addresses_are_refused_by_default(web):
    strict = FetchConfig(timeout=2)
    before = web.requests["/ok.jpg"]
    for url in (web.url("ok.jpg"), f"http://localhost:{web.port}/ok.jpg", "http://169.254.169.254/latest/meta-data/",
                "http://10.1.2.3/a.jpg", "http://[::1]/a.jpg", "http://[::ffff:127.0.0.1]/a.jpg", "http://0.0.0.0/"):
        assert classify(url, strict)[0] == "private_address", url
    assert web.requests["/ok.jpg"] == before  # refused before connecting
    assert classify(web.url("ok.jpg"))[0] == "success"  # allowed with allow_private_addresses


def test_redirect_limit_counts_hops(web):
    assert classify(web.url("redirect/0"), FetchConfig(max_redirects=3, allow_private_addresses=True))[0] == \
        "too_many_redirects"
    before = web.requests["/redirect/0"]
    classify(web.url("redirect/0"), FetchConfig(max_redirects=2, allow_private_addresses=True))
    assert web.requests["/redirect/0"] == before + 1 and web.requests["/redirect/2"] >= 1


def test_opt_out_parsing():
    from email.message import Message

    def headers(*values):
        m = Message()
        for v in values:
            m["X-Robots-Tag"] = v
        return m

    assert opted_out(headers("noai"), "clipforge") == "noai"
    assert opted_out(headers("otherbot: noimageai"), "clipforge") is None
    assert opted_out(headers("clipforge: noimageindex, nofollow"), "clipforge")
    assert opted_out(headers("nofollow", "noarchive"), "clipforge") is None
    assert classify("http://127.0.0.1:1/x.jpg", FetchConfig(timeout=2, allow_private_addresses=True))[0] == \
        "network_error"


class _Recorder(BaseHTTPRequestHandler):
    """Records user agents and the most requests in flight at once; each answer takes 0.2 s."""
    agents, lock, active, peak = [], threading.Lock(), [0], [0]

    def do_GET(self):
        with self.lock:
            self.agents.append(self.headers.get("User-Agent"))
            self.active[0] += 1
            self.peak[0] = max(self.peak[0], self.active[0])
        time.sleep(0.2)
        with self.lock:
            self.active[0] -= 1
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def _concurrently(n: int, fn) -> None:
    threads = [threading.Thread(target=fn) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_user_agent_and_per_host_concurrency():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = FetchConfig(timeout=10, per_host_concurrency=2, contact="mailto:crawl@example.org",
                          user_agent_token="examplebot", allow_private_addresses=True)
        limits = HostLimits(cfg.per_host_concurrency, cfg.per_host_rate)
        url = f"http://127.0.0.1:{server.server_port}/x.jpg"
        t0 = time.monotonic()
        _concurrently(8, lambda: fetch(url, cfg, limits))
        assert _Recorder.peak[0] == 2 and time.monotonic() - t0 >= 0.75  # 8 requests, 2 at a time, 0.2 s each
        assert set(_Recorder.agents) == {"clipforge/0.1 (+mailto:crawl@example.org; examplebot)"}
        rated = FetchConfig(timeout=10, per_host_rate=5, allow_private_addresses=True)
        limits, t0 = HostLimits(16, rated.per_host_rate), time.monotonic()
        _concurrently(5, lambda: fetch(url, rated, limits))
        assert time.monotonic() - t0 >= 0.8 + 0.2 - 0.05  # 5 starts 0.2 s apart, the last answer takes 0.2 s
    finally:
        server.shutdown()
        server.server_close()


def test_config_is_validated():
    with pytest.raises(ValueError):
        FetchConfig(timeout=0)
    with pytest.raises(ValueError):
        FetchConfig(per_host_concurrency=0)


def test_dns_lookups_obey_the_deadline_and_are_cached(monkeypatch):
    import socket

    from pipeline.fetch import Resolver

    real, calls = socket.getaddrinfo, []

    def slow(host, *a, **k):
        calls.append(host)
        if host == "hung.example":
            time.sleep(3)
        return real("127.0.0.1", *a, **k)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    cfg = FetchConfig(timeout=1, allow_private_addresses=True)
    limits = HostLimits(4, 0)
    t0 = time.monotonic()
    got = fetch("http://hung.example:1/x.jpg", cfg, limits)
    assert got.error_class == "timeout" and "DNS" in got.message and time.monotonic() - t0 < 1.5
    r = Resolver()
    for _ in range(3):
        r.lookup("cached.example", 80, time.monotonic() + 5)
    assert calls.count("cached.example") == 1


def _self_signed(tmp_path):
    """A key + certificate for 127.0.0.1 / localhost, valid for a day."""
    x509 = pytest.importorskip("cryptography.x509")
    import datetime
    import ipaddress

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    return tmp_path / "cert.pem", tmp_path / "key.pem"


class _Tls(BaseHTTPRequestHandler):
    def do_GET(self):
        import io

        from PIL import Image

        if self.path == "/drip.jpg":  # bounded: 10 bytes at most, one a second
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(10):
                try:
                    self.wfile.write(b"\xff")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(1)
            return
        buf = io.BytesIO()
        Image.new("RGB", (32, 24), "red").save(buf, "JPEG")
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(buf.getvalue())))
        self.end_headers()
        self.wfile.write(buf.getvalue())

    def log_message(self, *args):
        pass


def test_https_fetch_verifies_the_certificate_and_keeps_the_deadline(tmp_path, monkeypatch):
    import ssl

    import pipeline.fetch as fetch_mod

    cert, key = _self_signed(tmp_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Tls)
    server.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"https://127.0.0.1:{server.server_port}"
    cfg = FetchConfig(timeout=1.5, allow_private_addresses=True)
    try:
        cls, msg = classify(f"{base}/ok.jpg", cfg)
        assert cls == "tls_error" and "CERTIFICATE_VERIFY_FAILED" in msg  # an untrusted certificate is refused
        monkeypatch.setattr(fetch_mod, "_TLS", ssl.create_default_context(cafile=str(cert)))
        assert classify(f"{base}/ok.jpg", cfg) == ("success", "JPEG 32x24")
        t0 = time.monotonic()
        assert classify(f"{base}/drip.jpg", cfg)[0] == "timeout" and time.monotonic() - t0 < 2.5
    finally:
        server.shutdown()
        server.server_close()
