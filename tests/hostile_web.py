"""A "hostile web" for crawler tests: one loopback HTTP server whose routes misbehave in the ways real hosts do.

    with HostileWeb() as web:
        web.url("ok.jpg")   # -> "http://127.0.0.1:PORT/ok.jpg"
        web.cases()         # [{"url": ..., "caption": ..., "expect": "success" | an error class}, ...]

Routes (path -> behaviour -> the error class a crawler should record):
    /ok.jpg /ok.png /cmyk.jpg /gray.jpg   valid RGB / RGBA / CMYK / L images               -> success
    /redirect-once.jpg                    302 to /ok.jpg                                   -> success
    /404.jpg /500.jpg                     that status, a small text body                   -> http_error
    /reset.jpg                            a partial status line, then a TCP RST            -> network_error
    /drip.jpg                             200, Content-Length 100000, then 1 byte/s        -> timeout
    /redirect/N                           302 to /redirect/N+1 (one redirect per request)  -> too_many_redirects
    /html.jpg                             200 text/html                                    -> not_image
    /truncated.jpg                        the first 60% of a valid JPEG                    -> decode_error
    /huge-pixels.png                      a tiny PNG whose IHDR claims 40000 x 40000 px    -> too_many_pixels
    /big.jpg /big-chunked.jpg             big_bytes of body (Content-Length / chunked)     -> too_large
    /optout.jpg                           a valid JPEG with X-Robots-Tag: noai, noimageai  -> opt_out
plus URLs that never reach the server: a closed port (network_error) and malformed / non-http URLs (invalid_url).

Standard library only (http.server, socket, threading) plus Pillow/numpy to make the images. Every handler is bounded:
the drip stops after drip_seconds (or when a write fails), the big bodies after big_bytes (or when a write fails),
and each /redirect/N request answers a single redirect. `__exit__` aborts every connection still open.
"""

from __future__ import annotations

import collections
import functools
import io
import socket
import struct
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from typing_extensions import Self

SUCCESS = "success"
HTTP_ERROR = "http_error"
NETWORK_ERROR = "network_error"
TIMEOUT = "timeout"
TOO_MANY_REDIRECTS = "too_many_redirects"
NOT_IMAGE = "not_image"
DECODE_ERROR = "decode_error"
TOO_MANY_PIXELS = "too_many_pixels"
TOO_LARGE = "too_large"
OPT_OUT = "opt_out"
INVALID_URL = "invalid_url"

# path served by the hostile web -> what a crawler should record for it
ROUTES: dict[str, str] = {
    "/ok.jpg": SUCCESS,
    "/ok.png": SUCCESS,
    "/cmyk.jpg": SUCCESS,
    "/gray.jpg": SUCCESS,
    "/redirect-once.jpg": SUCCESS,
    "/404.jpg": HTTP_ERROR,
    "/500.jpg": HTTP_ERROR,
    "/reset.jpg": NETWORK_ERROR,
    "/drip.jpg": TIMEOUT,
    "/redirect/0": TOO_MANY_REDIRECTS,
    "/html.jpg": NOT_IMAGE,
    "/truncated.jpg": DECODE_ERROR,
    "/huge-pixels.png": TOO_MANY_PIXELS,
    "/big.jpg": TOO_LARGE,
    "/big-chunked.jpg": TOO_LARGE,
    "/optout.jpg": OPT_OUT,
}
# URLs no crawler may fetch at all
INVALID_URLS = ["http://[::1", "ftp://127.0.0.1/x.jpg", "not a url"]

DRIP_LENGTH = 100_000  # the Content-Length the drip announces (it never sends that much)
CHUNK = 64 * 2**10  # the big bodies are written in chunks of this size
HUGE_SIDE = 40_000  # the width and height /huge-pixels.png claims
IO_TIMEOUT = 30.0  # seconds a blocked read or write on a connection may wait (a client that stalls without closing)
DISCONNECTS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _gradient(w: int, h: int, channels: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    planes = [x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 255 // max(w + h - 2, 1), 255 - x % 256]
    return np.stack(planes[:channels], axis=-1).astype(np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_pixels_png(width: int = HUGE_SIDE, height: int = HUGE_SIDE) -> bytes:
    """A ~70-byte PNG with a valid signature and IHDR (8-bit RGB, width x height) but only a few bytes of IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # bit depth 8, colour type 2 (RGB), no interlace
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


@functools.cache
def bodies() -> dict[str, tuple[str, bytes]]:
    """Static routes: path -> (Content-Type, body). Built once per process."""
    rng = np.random.default_rng(0)
    noisy = _encode(Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)), "JPEG", quality=90)
    html = (b"<!doctype html>\n<html><head><title>Not an image</title></head>\n"
            b"<body><h1>Sorry</h1><p>This page is HTML, whatever its name says.</p></body></html>\n")
    return {
        "/ok.jpg": ("image/jpeg", _encode(Image.fromarray(_gradient(96, 64, 3), "RGB"), "JPEG", quality=90)),
        "/ok.png": ("image/png", _encode(Image.fromarray(_gradient(80, 80, 4), "RGBA"), "PNG")),
        "/cmyk.jpg": ("image/jpeg", _encode(Image.fromarray(_gradient(72, 56, 4), "CMYK"), "JPEG", quality=90)),
        "/gray.jpg": ("image/jpeg", _encode(Image.fromarray(_gradient(64, 48, 1)[..., 0], "L"), "JPEG", quality=90)),
        "/optout.jpg": ("image/jpeg", _encode(Image.fromarray(_gradient(64, 64, 3), "RGB"), "JPEG", quality=90)),
        "/html.jpg": ("text/html; charset=utf-8", html),
        "/truncated.jpg": ("image/jpeg", noisy[: len(noisy) * 6 // 10]),
        "/huge-pixels.png": ("image/png", huge_pixels_png()),
        "/404.jpg": ("text/plain; charset=utf-8", b"404 not found\n"),
        "/500.jpg": ("text/plain; charset=utf-8", b"500 internal server error\n"),
    }


def _closed_port() -> int:
    """A loopback port where nothing listens: bind one, note it, close it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 so that /big-chunked.jpg may use chunked transfer-coding; every response says Connection: close,
    # so each connection carries exactly one request (and `requests` counts connections too).
    protocol_version = "HTTP/1.1"
    server_version = "HostileWeb/1.0"
    sys_version = ""
    timeout = IO_TIMEOUT
    server: _Server

    def log_message(self, format, *args):
        pass

    def setup(self):
        super().setup()
        self.server.web._opened(self)

    def finish(self):
        self.server.web._closed(self)
        try:
            super().finish()
        except OSError:
            pass

    def handle(self):
        try:
            super().handle()
        except DISCONNECTS:
            pass  # the client went away (or stalled past IO_TIMEOUT): nothing to do
        except OSError as e:
            if not self.server.web._stop.is_set():  # __exit__ shuts sockets down under us: expected then
                self.server.web.errors.append(f"{self.path!r}: {e!r}")

    # --- dispatch -----------------------------------------------------------------------------------------------

    def do_GET(self):
        self._dispatch(head=False)

    def do_HEAD(self):
        self._dispatch(head=True)

    def _dispatch(self, head: bool):
        web: HostileWeb = self.server.web
        path = urlsplit(self.path).path
        web._count(path)
        if path in ("/404.jpg", "/500.jpg"):
            return self._static(path, status=int(path[1:4]), head=head)
        if path == "/optout.jpg":
            return self._static(path, head=head, extra={"X-Robots-Tag": "noai, noimageai"})
        if path in bodies():
            return self._static(path, head=head)
        if path == "/redirect-once.jpg":
            return self._redirect("/ok.jpg")
        if path.startswith("/redirect/") and path[len("/redirect/"):].isdigit():
            return self._redirect(f"/redirect/{int(path[len('/redirect/'):]) + 1}")
        if path == "/reset.jpg":
            return self._reset()
        if path == "/drip.jpg":
            return self._drip(head)
        if path == "/big.jpg":
            return self._big(head, chunked=False)
        if path == "/big-chunked.jpg":
            return self._big(head, chunked=True)
        body = b"no such route\n"
        self._headers(404, "text/plain; charset=utf-8", len(body))
        if not head:
            self.wfile.write(body)

    # --- behaviours ---------------------------------------------------------------------------------------------

    def _headers(self, status: int, content_type: str | None, length: int | None, extra: dict | None = None):
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        if length is not None:
            self.send_header("Content-Length", str(length))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.send_header("Connection", "close")  # also sets self.close_connection
        self.end_headers()

    def _static(self, path: str, status: int = 200, head: bool = False, extra: dict | None = None):
        content_type, body = bodies()[path]
        self._headers(status, content_type, len(body), extra)
        if not head:
            self.wfile.write(body)

    def _redirect(self, target: str):
        self._headers(302, None, 0, {"Location": f"http://127.0.0.1:{self.server.server_port}{target}"})

    def _reset(self):
        """A partial status line, then close with SO_LINGER (on, 0): the kernel aborts the connection with a RST."""
        self.close_connection = True
        self.wfile.write(b"HTTP/1.1 20")
        self.server.web._closed(self)  # unregister before the fd goes, so __exit__ never touches a reused fd
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # close the descriptor now: socket.close() would wait for self.rfile, and shutdown_request() would send a
        # FIN first. After detach() the socket object holds no fd, so finish()/shutdown_request() are harmless.
        socket.close(self.connection.detach())

    def _drip(self, head: bool):
        """Announce DRIP_LENGTH bytes of JPEG, then send one byte a second for at most drip_seconds."""
        web: HostileWeb = self.server.web
        self._headers(200, "image/jpeg", DRIP_LENGTH)
        if head:
            return
        deadline = time.monotonic() + web.drip_seconds
        payload = b"\xff\xd8" + b"\xff" * (DRIP_LENGTH - 2)
        for i in range(DRIP_LENGTH):  # bounded twice: by the length and by the deadline
            if web._stop.is_set() or time.monotonic() >= deadline:
                break
            self.wfile.write(payload[i:i + 1])  # raises when the client has gone: the drip ends
            remaining = deadline - time.monotonic()
            if remaining <= 0 or web._stop.wait(min(1.0, remaining)):
                break

    def _big(self, head: bool, chunked: bool):
        """big_bytes of JPEG-ish bytes in CHUNK pieces, never held in memory; stops at the first failed write."""
        web: HostileWeb = self.server.web
        total = web.big_bytes
        if chunked:
            self._headers(200, "image/jpeg", None, {"Transfer-Encoding": "chunked"})
        else:
            self._headers(200, "image/jpeg", total)
        if head:
            return
        fill = b"\xff" * CHUNK
        sent = 0
        for _ in range(-(-total // CHUNK)):  # bounded: ceil(total / CHUNK) writes at most
            if web._stop.is_set():
                break
            n = min(CHUNK, total - sent)
            data = (b"\xff\xd8\xff\xe0" + fill)[:n] if sent == 0 else fill[:n]
            self.wfile.write(b"%x\r\n%s\r\n" % (n, data) if chunked else data)
            sent += n
        if chunked and sent == total:
            self.wfile.write(b"0\r\n\r\n")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, addr, web: HostileWeb):
        self.web = web
        super().__init__(addr, _Handler)

    def handle_error(self, request, client_address):  # quiet: record instead of printing a traceback
        self.web.errors.append(repr(sys.exc_info()[1]))


class HostileWeb:
    """with HostileWeb() as web: web.url('ok.jpg') -> 'http://127.0.0.1:PORT/ok.jpg'"""

    def __init__(self, port: int = 0, drip_seconds: float = 60.0, big_bytes: int = 200 * 2**20):
        self.port = port
        self.drip_seconds = float(drip_seconds)
        self.big_bytes = int(big_bytes)
        self.requests: collections.Counter = collections.Counter()  # path -> requests served
        self.errors: list[str] = []  # unexpected handler exceptions (client disconnects are expected, not here)
        self.closed_port_url = ""
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._open: dict[_Handler, socket.socket] = {}
        self._stop = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ----------------------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        bodies()  # build the images before the first request
        self._stop.clear()
        self._server = _Server(("127.0.0.1", self.port), self)
        self.port = self._server.server_port
        self.closed_port_url = f"http://127.0.0.1:{_closed_port()}/x.jpg"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"hostile-web-{self.port}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()  # drips and big bodies stop at their next step
        self.abort_connections()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.wait_idle(timeout=2)
        self._server = self._thread = None

    def abort_connections(self) -> int:
        """Shut down every connection a handler still serves (the handlers then end at their next write)."""
        with self._lock:
            for sock in self._open.values():
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            return len(self._open)

    # --- introspection ------------------------------------------------------------------------------------------

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def cases(self) -> list[dict]:
        """Every route and invalid URL, with the caption "a test image: <path>" and the expected outcome."""
        out = [{"url": self.url(p), "caption": f"a test image: {p.lstrip('/')}", "expect": e} for p, e in ROUTES.items()]
        out.append({"url": self.closed_port_url, "caption": f"a test image: {urlsplit(self.closed_port_url).path.lstrip('/')}",
                    "expect": NETWORK_ERROR})
        out += [{"url": u, "caption": f"a test image: {u}", "expect": INVALID_URL} for u in INVALID_URLS]
        return out

    def active(self) -> int:
        """Connections a handler is serving right now."""
        with self._lock:
            return len(self._open)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no handler is running; False if some still are after `timeout` seconds."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._open, timeout=timeout)

    # --- called by the handlers ---------------------------------------------------------------------------------

    def _count(self, path: str) -> None:
        with self._lock:
            self.requests[path] += 1

    def _opened(self, handler: _Handler) -> None:
        with self._lock:
            self._open[handler] = handler.connection
        if self._stop.is_set():  # accepted while __exit__ was aborting: abort this one too
            self.abort_connections()

    def _closed(self, handler: _Handler) -> None:
        with self._idle:
            if self._open.pop(handler, None) is not None and not self._open:
                self._idle.notify_all()
