"""A safe HTTP fetch for a crawler that meets the hostile web: every request has hard bounds.

    fetch(url, FetchConfig(), limits) -> Fetched(body | None, error_class | None, message, ...)

Bounds, all enforced here rather than trusted to the server:
- a total deadline per URL (DNS + connect + TLS + headers + body, across every redirect hop). A watchdog
  thread shuts the socket down at the deadline and DNS lookups are waited for only until it, so a server that
  drips a byte a second is cut on time (a plain socket timeout is per read and never fires on a drip);
- a body-size cap enforced while streaming (a Content-Length above it is refused before reading a byte);
- a redirect limit, each hop re-checked like the first URL;
- http and https only; the resolved address must be public unless `allow_private_addresses` (loopback, private,
  link-local such as a cloud metadata endpoint, multicast, reserved are refused; the socket connects to the
  address that was checked, so a DNS answer cannot change between check and connect);
- a per-host concurrency limit and an optional per-host request rate, shared by the threads of one process;
- an identifiable user agent ("clipforge/VERSION (+CONTACT; TOKEN)"), and the X-Robots-Tag opt-out
  (noai, noimageai, noindex, noimageindex; for every agent or our token) checked on the headers, before the body.

Every failure has a stable error class (ERROR_CLASSES; a failed TLS handshake or certificate check is
`tls_error`) and the raw message; nothing raises out of fetch().
"""
from __future__ import annotations

import heapq
import http.client
import ipaddress
import itertools
import socket
import ssl
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import urljoin, urlsplit

from trainer.clip.flags import opt

VERSION = "0.1"
ERROR_CLASSES = ("invalid_input", "invalid_url", "private_address", "dns_error", "network_error", "tls_error",
                 "timeout", "http_error", "too_many_redirects", "opt_out", "too_large", "not_image",
                 "too_many_pixels", "decode_error")
OPT_OUT_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")
REDIRECTS = (301, 302, 303, 307, 308)
RETRYABLE = ("timeout", "network_error", "dns_error")
CHUNK = 64 * 1024


@dataclass
class FetchConfig:
    """How one URL is fetched: deadline, caps, politeness and address policy."""
    timeout: float = opt(10.0, help="total seconds per URL: connect + headers + body, all redirects included")
    max_body_bytes: int = opt(32 * 2**20, help="body-size cap, enforced while streaming")
    max_pixels: int = opt(64 * 2**20, help="largest width x height accepted, read from the image header "
                                           "before decoding")
    max_redirects: int = opt(5, help="redirect hops followed per URL")
    retries: int = opt(0, help="extra attempts per URL after a timeout / network / DNS error or HTTP 429 / 5xx")
    per_host_concurrency: int = opt(16, help="requests in flight to one host, per crawl worker process")
    per_host_rate: float = opt(0.0, help="request starts per second to one host, per worker process (0: no limit)")
    user_agent_token: str = opt("clipforge", help="the token robots rules and X-Robots-Tag can name")
    contact: str = opt("", help="URL or e-mail put in the user agent so site owners can reach the crawl's owner")
    ignore_opt_out: bool = opt(False, help="do not honour X-Robots-Tag noai / noimageai / noindex / noimageindex")
    allow_private_addresses: bool = opt(False, help="allow loopback / private / link-local targets (test servers "
                                                    "on 127.0.0.1; never on a cluster crawling scraped URLs)")

    def __post_init__(self):
        if self.timeout <= 0 or self.max_body_bytes <= 0 or self.max_pixels <= 0:
            raise ValueError("--timeout, --max-body-bytes and --max-pixels must be > 0")
        if self.max_redirects < 0 or self.retries < 0 or self.per_host_concurrency < 1 or self.per_host_rate < 0:
            raise ValueError("--max-redirects / --retries must be >= 0, --per-host-concurrency >= 1, "
                             "--per-host-rate >= 0")

    @property
    def user_agent(self) -> str:
        extra = "; ".join(x for x in (f"+{self.contact}" if self.contact else "", self.user_agent_token) if x)
        return f"clipforge/{VERSION} ({extra})" if extra else f"clipforge/{VERSION}"


@dataclass
class Fetched:
    url: str
    body: bytes | None = None
    error_class: str | None = None
    message: str | None = None
    status: int | None = None
    content_type: str = ""
    final_url: str = ""
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.error_class is None


class FetchError(Exception):
    def __init__(self, error_class: str, message: str, status: int | None = None):
        super().__init__(message)
        self.error_class, self.status = error_class, status


class Watchdog:
    """One thread per process that shuts sockets down at their deadline (cuts drips, slow headers, slow TLS)."""

    def __init__(self):
        self._heap: list[tuple[float, int]] = []
        self._socks: dict[int, list[socket.socket]] = {}
        self._ids = itertools.count()
        self._cv = threading.Condition()
        threading.Thread(target=self._loop, name="fetch-watchdog", daemon=True).start()

    @contextmanager
    def watch(self, sock: socket.socket, deadline: float) -> Iterator[list[socket.socket]]:
        """Yields [sock]; replace its item when the socket object changes (a TLS wrap detaches the old one)."""
        guard = [sock]
        with self._cv:
            i = next(self._ids)
            self._socks[i] = guard
            heapq.heappush(self._heap, (deadline, i))
            self._cv.notify()
        try:
            yield guard
        finally:
            with self._cv:
                self._socks.pop(i, None)

    def _loop(self) -> None:
        with self._cv:
            while True:
                while self._heap and self._heap[0][1] not in self._socks:
                    heapq.heappop(self._heap)  # finished in time
                if not self._heap:
                    self._cv.wait()
                    continue
                wait = self._heap[0][0] - time.monotonic()
                if wait > 0:
                    self._cv.wait(wait)
                    continue
                _, i = heapq.heappop(self._heap)
                guard = self._socks.pop(i, None)
                if guard is not None:
                    try:
                        guard[0].shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass


class HostLimits:
    """What the fetch threads of one process share: per-host concurrency (a semaphore per host), optional per-host
    rate (minimum spacing of request starts), the socket watchdog and the DNS resolver."""

    def __init__(self, concurrency: int, rate: float):
        self._sems: dict[str, threading.BoundedSemaphore] = defaultdict(lambda: threading.BoundedSemaphore(concurrency))
        self._next: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()
        self._gap = 1.0 / rate if rate > 0 else 0.0
        self.watchdog = Watchdog()
        self.resolver = Resolver()

    @contextmanager
    def slot(self, host: str, deadline: float) -> Iterator[None]:
        with self._lock:
            sem = self._sems[host]
        if not sem.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise FetchError("timeout", f"waited past the deadline for a free connection slot to {host}")
        try:
            if self._gap:
                with self._lock:
                    start = max(time.monotonic(), self._next[host])
                    self._next[host] = start + self._gap
                if start > deadline:
                    raise FetchError("timeout", f"per-host rate limit for {host} leaves no time before the deadline")
                time.sleep(max(0.0, start - time.monotonic()))
            yield
        finally:
            sem.release()


def _target(url: str) -> tuple[str, str, int, str]:
    """-> (scheme, host, port, path+query), or FetchError('invalid_url')."""
    try:
        u = urlsplit(url.strip())
        port = u.port
    except ValueError as e:
        raise FetchError("invalid_url", f"unparsable URL: {e}") from None
    if u.scheme not in ("http", "https"):
        raise FetchError("invalid_url", f"scheme {u.scheme!r} is not http(s)" if u.scheme else "no scheme")
    if not u.hostname:
        raise FetchError("invalid_url", "no host")
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    if any(c in path for c in " \r\n\t"):
        path = path.replace(" ", "%20")
        if any(c in path for c in "\r\n\t"):
            raise FetchError("invalid_url", "control characters in the path")
    return u.scheme, u.hostname, port or (443 if u.scheme == "https" else 80), path


def _refused(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(ip, "ipv4_mapped", None)
    ip = mapped or ip
    return not ip.is_global or ip.is_multicast


class Resolver:
    """getaddrinfo with a deadline and a per-process cache. The system resolver cannot be interrupted, so lookups
    run on a small pool and the caller stops waiting at its deadline (a hung lookup costs a pool thread, not the
    crawl); answers are kept `ttl_s` seconds, failures `ttl_s / 10`, so a list with many URLs per host resolves
    each host once."""

    def __init__(self, workers: int = 16, ttl_s: float = 300.0):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="dns")
        self._cache: dict[tuple[str, int], tuple[float, list | BaseException]] = {}
        self._lock = threading.Lock()
        self.ttl = ttl_s

    def lookup(self, host: str, port: int, deadline: float) -> list:
        from concurrent.futures import TimeoutError as Late

        now = time.monotonic()
        with self._lock:
            hit = self._cache.get((host, port))
        if hit is None or hit[0] < now:
            future = self._pool.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
            try:
                hit = (now + self.ttl, future.result(timeout=max(0.0, deadline - now)))
            except Late:
                raise FetchError("timeout", f"DNS lookup of {host!r} passed the deadline") from None
            except (OSError, UnicodeError) as e:
                hit = (now + self.ttl / 10, e)
            with self._lock:
                self._cache[(host, port)] = hit
        if isinstance(hit[1], BaseException):
            raise FetchError("dns_error", f"cannot resolve {host!r}: {hit[1]}")
        return hit[1]


def resolve(host: str, port: int, allow_private: bool, resolver: Resolver, deadline: float) -> tuple[int, str]:
    """-> (address family, the first acceptable address of host), or FetchError(dns_error / private_address)."""
    infos = resolver.lookup(host, port, deadline)
    for family, _, _, _, sockaddr in infos:
        ip = ipaddress.ip_address(sockaddr[0].split("%")[0])
        if allow_private or not _refused(ip):
            return family, sockaddr[0]
    raise FetchError("private_address", f"{host!r} resolves to a non-public address ({infos[0][4][0]}); "
                                        "pass --allow-private-addresses to crawl it")


def opted_out(headers: http.client.HTTPMessage, token: str) -> str | None:
    """The X-Robots-Tag value that forbids use by every agent or by `token`, else None."""
    for value in headers.get_all("X-Robots-Tag") or []:
        agent, _, rest = value.partition(":") if ":" in value.split(",")[0] else ("", "", value)
        if agent and agent.strip().lower() != token.lower():
            continue
        if any(d.strip().lower() in OPT_OUT_DIRECTIVES for d in rest.split(",")):
            return value
    return None


_TLS = ssl.create_default_context()


def _open(host: str, port: int, deadline: float, cfg: FetchConfig, resolver: Resolver
          ) -> tuple[socket.socket, str]:
    """A not yet connected socket for a checked address of host."""
    family, ip = resolve(host, port, cfg.allow_private_addresses, resolver, deadline)
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise FetchError("timeout", "deadline passed during DNS resolution")
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(remaining)
    return sock, ip


def _request(url: str, cfg: FetchConfig, limits: HostLimits, deadline: float) -> tuple[int, dict, bytes | None, str]:
    """One hop: -> (status, headers, body or None for a redirect, location)."""
    scheme, host, port, path = _target(url)
    with limits.slot(host, deadline):
        sock, ip = _open(host, port, deadline, cfg, limits.resolver)
        with limits.watchdog.watch(sock, deadline) as guard:
            try:
                sock.connect((ip, port))
                if scheme == "https":
                    sock = guard[0] = _TLS.wrap_socket(sock, server_hostname=host)
                conn = http.client.HTTPConnection(host, port)
                conn.sock = sock
                conn.putrequest("GET", path, skip_accept_encoding=True)
                for k, v in (("User-Agent", cfg.user_agent), ("Accept", "image/*,*/*;q=0.8"),
                             ("Accept-Encoding", "identity"), ("Connection", "close")):
                    conn.putheader(k, v)
                conn.endheaders()
                resp = conn.getresponse()
                return _response(resp, cfg, deadline)
            finally:
                sock.close()


def _response(resp: http.client.HTTPResponse, cfg: FetchConfig, deadline: float
              ) -> tuple[int, dict, bytes | None, str]:
    ctype = resp.headers.get("Content-Type", "")
    if resp.status in REDIRECTS:
        return resp.status, {"content_type": ctype}, None, resp.headers.get("Location", "")
    if resp.status != 200:
        raise FetchError("http_error", f"HTTP {resp.status} {resp.reason}".strip(), resp.status)
    if not cfg.ignore_opt_out and (tag := opted_out(resp.headers, cfg.user_agent_token)):
        raise FetchError("opt_out", f"X-Robots-Tag: {tag}", resp.status)
    length = resp.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > cfg.max_body_bytes:
        raise FetchError("too_large", f"Content-Length {length} > cap {cfg.max_body_bytes}", resp.status)
    parts, size = [], 0
    while chunk := resp.read1(CHUNK):
        size += len(chunk)
        if size > cfg.max_body_bytes:
            raise FetchError("too_large", f"body passed the cap of {cfg.max_body_bytes} bytes while streaming",
                             resp.status)
        parts.append(chunk)
    if time.monotonic() >= deadline:  # the watchdog shut the socket: what arrived is a cut-off body
        raise FetchError("timeout", f"deadline of {cfg.timeout} s reached after {size} body bytes", resp.status)
    if length and length.isdigit() and size != int(length):
        raise FetchError("network_error", f"body ended at {size} of {length} bytes", resp.status)
    return resp.status, {"content_type": ctype}, b"".join(parts), ""


def _classify(e: BaseException, deadline: float) -> FetchError:
    late = time.monotonic() >= deadline - 0.01
    if isinstance(e, FetchError) and not (late and e.error_class == "network_error"):
        return e
    if late or isinstance(e, (TimeoutError, socket.timeout)):
        return FetchError("timeout", f"deadline reached ({type(e).__name__}: {e})")
    if isinstance(e, ssl.SSLError):  # before ValueError: a failed certificate check is also a ValueError
        return FetchError("tls_error", f"{type(e).__name__}: {e}")
    if isinstance(e, (http.client.InvalidURL, UnicodeError, ValueError)):
        return FetchError("invalid_url", f"{type(e).__name__}: {e}")
    return FetchError("network_error", f"{type(e).__name__}: {e}")


def fetch_once(url: str, cfg: FetchConfig, limits: HostLimits) -> Fetched:
    """One attempt at a URL, following redirects, all within cfg.timeout."""
    deadline = time.monotonic() + cfg.timeout
    current, status = url, None
    try:
        for _ in range(cfg.max_redirects + 1):
            status, headers, body, location = _request(current, cfg, limits, deadline)
            if body is not None:
                return Fetched(url, body=body, status=status, content_type=headers["content_type"],
                               final_url=current)
            if not location:
                raise FetchError("http_error", f"HTTP {status} without a Location header", status)
            current = urljoin(current, location)
        raise FetchError("too_many_redirects", f"more than {cfg.max_redirects} redirects (last: {current})", status)
    except Exception as e:  # noqa: BLE001 -- every failure becomes a classified row, never an escaped exception
        err = _classify(e, deadline)
        return Fetched(url, error_class=err.error_class, message=str(err), status=err.status, final_url=current)


def fetch(url: str, cfg: FetchConfig, limits: HostLimits) -> Fetched:
    """fetch_once, retried cfg.retries times (0.5 s, 1 s, 2 s ... apart) on transient errors, 429 and 5xx."""
    for attempt in range(cfg.retries + 1):
        got = fetch_once(url, cfg, limits)
        got.attempts = attempt + 1
        transient = got.error_class in RETRYABLE or (got.status or 0) == 429 or (got.status or 0) >= 500
        if got.ok or not transient or attempt == cfg.retries:
            return got
        time.sleep(0.5 * 2**attempt)
    return got
