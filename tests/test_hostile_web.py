"""The hostile web itself (tests/hostile_web.py): every route misbehaves as documented, and the server survives it.

These probe the server with urllib / http.client / socket only; the crawler's handling of each case is tested
elsewhere.
"""

import http.client
import io
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from hostile_web import ROUTES, HostileWeb
from PIL import Image

TIMEOUT = 5


@pytest.fixture(scope="module")
def web():
    with HostileWeb(drip_seconds=3) as w:  # big_bytes: the full 200 MiB (clients hang up long before)
        yield w
        assert w.errors == []


def get(url, timeout=TIMEOUT):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.status, dict(resp.headers), resp.read()


def conn(web, timeout=TIMEOUT):
    return http.client.HTTPConnection("127.0.0.1", web.port, timeout=timeout)


@pytest.mark.parametrize("path, mode, size", [
    ("ok.jpg", "RGB", (96, 64)),
    ("ok.png", "RGBA", (80, 80)),
    ("cmyk.jpg", "CMYK", (72, 56)),
    ("gray.jpg", "L", (64, 48)),
    ("optout.jpg", "RGB", (64, 64)),
    ("redirect-once.jpg", "RGB", (96, 64)),
])
def test_images_decode(web, path, mode, size):
    status, headers, body = get(web.url(path))
    assert status == 200
    assert headers["Content-Type"].startswith("image/")
    assert int(headers["Content-Length"]) == len(body)
    img = Image.open(io.BytesIO(body))
    img.load()
    assert (img.mode, img.size) == (mode, size)


@pytest.mark.parametrize("path", ["ok.jpg", "drip.jpg", "big.jpg"])
def test_head_sends_headers_only(web, path):
    c = conn(web)
    c.request("HEAD", "/" + path)
    r = c.getresponse()
    assert r.status == 200 and r.getheader("Content-Type") == "image/jpeg"
    assert r.read() == b""
    c.close()
    assert web.wait_idle(TIMEOUT)


def test_optout_header(web):
    _, headers, _ = get(web.url("optout.jpg"))
    assert headers["X-Robots-Tag"] == "noai, noimageai"
    _, headers, _ = get(web.url("ok.jpg"))
    assert "X-Robots-Tag" not in headers


@pytest.mark.parametrize("code", [404, 500])
def test_http_errors(web, code):
    with pytest.raises(urllib.error.HTTPError) as e:
        get(web.url(f"{code}.jpg"))
    assert e.value.code == code
    assert 0 < len(e.value.read()) < 100


def test_redirect_chain_goes_to_next(web):
    for n in (0, 1, 41):
        c = conn(web)
        c.request("GET", f"/redirect/{n}")
        r = c.getresponse()
        assert r.status == 302
        assert r.getheader("Location") == web.url(f"redirect/{n + 1}")
        r.read()
        c.close()
    before = web.requests["/redirect/1"]
    with pytest.raises(urllib.error.HTTPError) as e:  # urllib gives up after a bounded number of hops
        get(web.url("redirect/0"))
    assert e.value.code == 302
    assert web.requests["/redirect/1"] == before + 1


def test_html_is_not_an_image(web):
    _, headers, body = get(web.url("html.jpg"))
    assert headers["Content-Type"].startswith("text/html")
    assert body.lstrip().lower().startswith(b"<!doctype html>")


def test_truncated_jpeg_fails_to_decode(web):
    _, headers, body = get(web.url("truncated.jpg"))
    assert headers["Content-Type"] == "image/jpeg"
    assert int(headers["Content-Length"]) == len(body)
    img = Image.open(io.BytesIO(body))
    assert img.size == (256, 256)
    with pytest.raises(OSError):
        img.load()


def test_huge_pixels_png(web, monkeypatch):
    _, headers, body = get(web.url("huge-pixels.png"))
    assert headers["Content-Type"] == "image/png" and len(body) < 200
    with pytest.raises(Image.DecompressionBombError):  # Pillow's default guard refuses it outright
        Image.open(io.BytesIO(body))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    img = Image.open(io.BytesIO(body))  # the header alone: no decoding
    assert (img.format, img.size) == ("PNG", (40000, 40000))


def test_reset_aborts_the_connection(web):
    for _ in range(3):
        c = conn(web)
        c.request("GET", "/reset.jpg")
        with pytest.raises((ConnectionResetError, http.client.RemoteDisconnected, http.client.BadStatusLine)):
            c.getresponse()
        c.close()
    assert web.requests["/reset.jpg"] >= 3
    assert get(web.url("ok.jpg"))[0] == 200


def test_reset_is_a_real_rst(web):
    """With the raw socket: the client sees ECONNRESET (not a clean FIN) once the partial status line is read."""
    with socket.create_connection(("127.0.0.1", web.port), timeout=TIMEOUT) as s:
        s.sendall(b"GET /reset.jpg HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        with pytest.raises(ConnectionResetError):
            for _ in range(100):
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
        assert got in (b"", b"HTTP/1.1 20")


def test_closed_port_refuses(web):
    host, port = web.closed_port_url.split("/")[2].split(":")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=TIMEOUT).close()
    with pytest.raises(urllib.error.URLError) as e:
        get(web.closed_port_url)
    assert isinstance(e.value.reason, ConnectionRefusedError)


def test_drip_is_slow_and_ends_by_itself(web):
    assert web.wait_idle(TIMEOUT)
    t0 = time.monotonic()
    c = conn(web, timeout=10)
    c.request("GET", "/drip.jpg")
    r = c.getresponse()
    assert r.status == 200 and r.getheader("Content-Length") == "100000"
    assert r.read(2) == b"\xff\xd8"
    assert time.monotonic() - t0 >= 0.9  # one byte a second
    assert web.active() == 1
    assert web.wait_idle(timeout=web.drip_seconds + 3)  # the handler gives up after drip_seconds, client or not
    assert time.monotonic() - t0 >= web.drip_seconds - 0.5
    with pytest.raises(http.client.IncompleteRead):
        r.read()
    c.close()


@pytest.mark.parametrize("path", ["big.jpg", "big-chunked.jpg"])
def test_big_body_client_hangs_up(web, path):
    c = conn(web)
    c.request("GET", "/" + path)
    r = c.getresponse()
    assert r.status == 200
    if path == "big.jpg":
        assert r.getheader("Content-Length") == str(web.big_bytes)
    else:
        assert r.getheader("Transfer-Encoding") == "chunked" and r.getheader("Content-Length") is None
    got = r.read(2**20)
    assert len(got) == 2**20 and got[:2] == b"\xff\xd8"
    c.close()
    r.close()
    assert web.wait_idle(TIMEOUT)  # the handler noticed the hang-up instead of blocking
    assert get(web.url("ok.jpg"))[0] == 200


@pytest.mark.parametrize("path", ["big.jpg", "big-chunked.jpg"])
def test_big_body_is_exactly_big_bytes(path):
    with HostileWeb(big_bytes=300_000) as w:
        status, _, body = get(w.url(path))
        assert status == 200 and len(body) == 300_000 and body[:2] == b"\xff\xd8"
        assert w.errors == []


def test_requests_are_counted(web):
    before = web.requests["/ok.png"]
    threads = [threading.Thread(target=get, args=(web.url("ok.png?x=1"),)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert web.requests["/ok.png"] == before + 8
    with pytest.raises(urllib.error.HTTPError):
        get(web.url("no-such-route.jpg"))
    assert web.requests["/no-such-route.jpg"] == 1


def test_cases_cover_every_route(web):
    cases = web.cases()
    assert all(c["caption"].startswith("a test image: ") for c in cases)
    by_url = {c["url"]: c["expect"] for c in cases}
    assert len(by_url) == len(cases)
    for path, expect in ROUTES.items():
        assert by_url[web.url(path)] == expect
    assert by_url[web.closed_port_url] == "network_error"
    for bad in ("http://[::1", "ftp://127.0.0.1/x.jpg", "not a url"):
        assert by_url[bad] == "invalid_url"
    assert {c["expect"] for c in cases} == {
        "success", "http_error", "network_error", "timeout", "too_many_redirects", "not_image", "decode_error",
        "too_many_pixels", "too_large", "opt_out", "invalid_url"}


def test_exit_is_prompt_with_a_drip_in_progress():
    w = HostileWeb(drip_seconds=60)
    w.__enter__()
    c = http.client.HTTPConnection("127.0.0.1", w.port, timeout=10)
    c.request("GET", "/drip.jpg")
    r = c.getresponse()
    assert r.read(1) == b"\xff"
    assert w.active() == 1
    t0 = time.monotonic()
    w.__exit__(None, None, None)
    assert time.monotonic() - t0 < 5
    assert w.active() == 0
    with pytest.raises(http.client.IncompleteRead):  # the server side was shut down: EOF, not a hang
        r.read()
    c.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", w.port), timeout=TIMEOUT).close()
    assert w.errors == []


def test_exit_is_prompt_with_a_big_body_stalled():
    """A client that stops reading (without closing) blocks the server's write; __exit__ must still be prompt."""
    with HostileWeb() as w:  # the full 200 MiB default
        c = http.client.HTTPConnection("127.0.0.1", w.port, timeout=10)
        c.request("GET", "/big.jpg")
        r = c.getresponse()
        assert r.read(1000)[:2] == b"\xff\xd8"
        time.sleep(0.3)  # let the socket buffers fill: the handler now blocks in sendall
        assert w.active() == 1
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 5
    assert w.active() == 0
    c.close()
