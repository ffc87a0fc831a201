"""Safe HTTP fetching of untrusted URLs, and the address policy it enforces.

Fetching is done here rather than with img2dataset's urllib downloader because a URL list
scraped from the web is untrusted input: URLs may point at cloud metadata endpoints or the
cluster's own services, redirect into them, or resolve to them only on the second DNS lookup.
So every hop is resolved once, checked, and connected to at exactly the address that was checked.

Failures carry a short machine-readable ``reason`` (counted in stats.json): bad_scheme, bad_url,
dns_error, refused_address, too_many_redirects, http_<status>, opted_out, too_large, empty_body,
timeout, connection_error, tls_error, bad_response.
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import math
import socket
import ssl
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

from pipeline.config import DownloadConfig
from pipeline.data import img2dataset_modules

# A request (all its redirect hops) may take this many per-operation timeouts in total:
# a server trickling a byte per second cannot hold a thread for long.
DEADLINE_FACTOR = 3
BACKOFF_S = 0.1  # first retry waits 0.1 s, then 0.2 s, ...: transient blips, not rate limits
_CHUNK = 64 * 1024
_REDIRECT_STATUSES = {301, 302, 303, 307, 308}
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def user_agent(token: str | None) -> str:
    """img2dataset's User-Agent, naming our token so sites can opt out by it."""
    agent = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
    if token:
        agent += f" (compatible; {token}; +https://github.com/rom1504/img2dataset)"
    return agent


# ---------------------------------------------------------------------------- address policy


@functools.lru_cache(maxsize=32)
def _networks(cidrs: tuple[str, ...]) -> tuple[Any, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def _reached_forms(addr: Any) -> list[Any]:
    """The addresses a packet to ``addr`` really reaches: IPv6 forms can embed an IPv4 one."""
    if addr.version == 6:
        if addr.ipv4_mapped is not None:
            return [addr.ipv4_mapped]
        if addr in _NAT64:  # DNS64/NAT64 networks translate these to the embedded IPv4
            return [ipaddress.IPv4Address(int(addr) & 0xFFFF_FFFF)]
        if addr.sixtofour is not None:
            return [addr, addr.sixtofour]
    return [addr]


def _is_public(addr: Any) -> bool:
    # is_global alone lets multicast (and IPv6 site-local) through, so those are explicit.
    return not (
        addr.is_private
        or addr.is_loopback
        or addr.is_link_local
        or addr.is_multicast
        or addr.is_reserved
        or addr.is_unspecified
        or (addr.version == 6 and addr.is_site_local)
        or not addr.is_global
    )


def address_allowed(ip: str, allowed_networks: tuple[str, ...] | list[str] = ()) -> bool:
    """Whether fetching from ``ip`` is allowed: public addresses, or ones inside an allowed CIDR."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    nets = _networks(tuple(allowed_networks))
    return all(_is_public(a) or any(a in n for n in nets) for a in _reached_forms(addr))


# ------------------------------------------------------------------------------ fetching


@dataclass(frozen=True)
class FetchResult:
    body: bytes | None = None
    reason: str | None = None  # short and machine-readable; None on success
    error: str | None = None  # human-readable detail
    transient: bool = False  # worth retrying: timeouts, 5xx, 429, connection errors


class _Failure(Exception):
    def __init__(self, reason: str, error: object, transient: bool = False):
        super().__init__(str(error))
        self.reason = reason
        self.transient = transient


class _DeadlineMixin:
    """Caps every receive by what is left of the request's deadline, not just per operation."""

    deadline = math.inf
    op_timeout: float | None = None

    def recv_into(self, *args, **kwargs):
        self.settimeout(_op_timeout(self.op_timeout, self.deadline))
        return super().recv_into(*args, **kwargs)


class _DeadlineSocket(_DeadlineMixin, socket.socket):
    pass


class _DeadlineSSLSocket(_DeadlineMixin, ssl.SSLSocket):
    pass


def _op_timeout(timeout: float | None, deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("request deadline exceeded")
    return left if timeout is None else min(timeout, left)


def _open_socket(addresses, timeout: float, deadline: float) -> socket.socket:
    """Connect to one of the checked addresses: the host name is never resolved again."""
    last_error: OSError = OSError("no address")
    for family, sockaddr in addresses:
        sock = _DeadlineSocket(family, socket.SOCK_STREAM)
        sock.op_timeout, sock.deadline = timeout, deadline
        try:
            sock.settimeout(_op_timeout(timeout, deadline))
            sock.connect(sockaddr)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as err:
            sock.close()
            last_error = err
    raise last_error


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host, port, addresses, timeout, deadline):
        super().__init__(host, port, timeout=timeout)
        self.addresses, self.deadline = addresses, deadline

    def connect(self):
        self.sock = _open_socket(self.addresses, self.timeout, self.deadline)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    # Made once, on first https use: loading the CA certificates takes a while.
    context = ssl.create_default_context()
    context.sslsocket_class = _DeadlineSSLSocket
    return context


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host, port, addresses, timeout, deadline):
        super().__init__(host, port, timeout=timeout, context=_tls_context())
        self.addresses, self.deadline = addresses, deadline

    def connect(self):
        sock = _open_socket(self.addresses, self.timeout, self.deadline)
        # SNI and the certificate check use the URL's host name, not the address connected to.
        tls = _tls_context().wrap_socket(sock, server_hostname=self.host)
        tls.op_timeout, tls.deadline = self.timeout, self.deadline
        self.sock = tls


# getaddrinfo has no timeout of its own: lookups run here, and a caller waits at most what is
# left of its request's deadline. A lookup that hangs holds one of these threads, not the row.
_RESOLVER = ThreadPoolExecutor(32, thread_name_prefix="dns")


class DnsCache:
    """Per-process cache of getaddrinfo answers (and of names that do not exist), so a list
    with thousands of URLs per host asks the resolver once per host, not once per image.

    Only the lookup is cached: every use checks the cached addresses against the policy again
    (_resolve), so a cached answer can never let a refused address through.
    """

    def __init__(self, ttl: float = 300.0, size: int = 65_536):
        self.ttl, self.size = ttl, size
        self._entries: OrderedDict[tuple[str, int], tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> Any:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] < time.monotonic():
                return None
            self._entries.move_to_end(key)
            return entry[1]

    def put(self, key: tuple[str, int], value: Any) -> None:
        with self._lock:
            self._entries[key] = (time.monotonic() + self.ttl, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


DNS_CACHE = DnsCache()


def _lookup(host: str, port: int, deadline: float) -> list:
    """getaddrinfo through the cache; a name that does not exist is cached as its error."""
    cached = DNS_CACHE.get((host, port))
    if isinstance(cached, socket.gaierror):
        raise cached
    if cached is not None:
        return cached
    lookup = _RESOLVER.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    left = None if deadline == math.inf else _op_timeout(None, deadline)
    try:
        infos = lookup.result(timeout=left)
    except FutureTimeout as err:
        lookup.cancel()
        raise TimeoutError(f"DNS lookup of {host} exceeded the request deadline") from err
    except socket.gaierror as err:
        if err.errno != socket.EAI_AGAIN:  # a temporary failure is asked again next time
            DNS_CACHE.put((host, port), err)
        raise
    DNS_CACHE.put((host, port), infos)
    return infos


def _resolve(
    host: str, port: int, allowed_networks: tuple[str, ...], deadline: float = math.inf
) -> list[tuple[int, Any]]:
    try:
        ipaddress.ip_address(host)
        literal = True  # an address: nothing to look up, no thread to hand it to
    except ValueError:
        literal = False
    try:
        if literal:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        else:
            infos = _lookup(host, port, deadline)
    except socket.gaierror as err:
        raise _Failure("dns_error", err, transient=err.errno == socket.EAI_AGAIN) from err
    except (UnicodeError, ValueError) as err:  # not a valid host name at all
        raise _Failure("dns_error", err) from err
    addresses = [(f, sa) for f, _, _, _, sa in infos if f in (socket.AF_INET, socket.AF_INET6)]
    if not addresses:
        raise _Failure("dns_error", f"no IP address for {host}")
    # A name resolving to any non-public address is refused outright, even if it has public
    # ones too: that mix is what a DNS-rebinding attacker serves.
    for _, sockaddr in addresses:
        if not address_allowed(sockaddr[0], allowed_networks):
            raise _Failure("refused_address", f"{host} resolves to {sockaddr[0]}")
    return addresses


def _get(url: str, cfg: DownloadConfig, deadline: float) -> tuple[bytes | None, str | None]:
    """One hop: the body, or the Location to follow."""
    try:
        parts = urlsplit(url)
    except ValueError as err:  # e.g. "http://a]b/": an unbalanced IPv6 bracket
        raise _Failure("bad_url", err) from err
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise _Failure("bad_scheme", f"scheme {scheme or '(none)'!r} is not http or https")
    try:
        host, port = parts.hostname, parts.port or (443 if scheme == "https" else 80)
    except ValueError as err:
        raise _Failure("bad_url", err) from err
    if not host:
        raise _Failure("bad_url", "no host in URL")
    addresses = _resolve(host, port, cfg.allowed_networks, deadline)
    # Percent-encode what http.client refuses (spaces, non-ASCII, controls); keep the rest as is.
    target = quote(parts.path or "/", safe="/%:@!$&'()*+,;=~") + (
        "?" + quote(parts.query, safe="/%:@!$&'()*+,;=~?") if parts.query else ""
    )
    cls = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
    conn = cls(host, port, addresses, cfg.timeout, deadline)
    try:
        conn.request("GET", target, headers={"User-Agent": user_agent(cfg.user_agent_token)})
        resp = conn.getresponse()
        location = resp.getheader("Location")
        if resp.status in _REDIRECT_STATUSES and location:
            return None, location
        if not 200 <= resp.status < 300:
            transient = resp.status >= 500 or resp.status == 429
            raise _Failure(f"http_{resp.status}", f"{resp.status} {resp.reason}", transient)
        directives = cfg.disallowed_header_directives
        if directives and "X-Robots-Tag" in resp.headers:  # is_disallowed's only input
            token = (cfg.user_agent_token or "").strip().lower() or None
            wanted = {d.strip().lower() for d in directives}
            if img2dataset_modules.downloader().is_disallowed(resp.headers, token, wanted):
                raise _Failure("opted_out", "use disallowed by an X-Robots-Tag directive")
        if resp.length is not None and resp.length > cfg.max_bytes:
            raise _Failure("too_large", f"Content-Length {resp.length} > {cfg.max_bytes}")
        chunks, size = [], 0
        while chunk := resp.read1(_CHUNK):  # read1: one socket read, so deadlines bite
            size += len(chunk)
            if size > cfg.max_bytes:
                raise _Failure("too_large", f"body exceeds {cfg.max_bytes} bytes")
            chunks.append(chunk)
        if resp.length:  # the server closed before sending all it announced
            raise http.client.IncompleteRead(b"".join(chunks), resp.length)
        return b"".join(chunks), None
    finally:
        conn.close()


def _fetch_once(url: str, cfg: DownloadConfig) -> FetchResult:
    deadline = time.monotonic() + DEADLINE_FACTOR * cfg.timeout
    try:
        for _ in range(cfg.max_redirects + 1):
            body, location = _get(url, cfg, deadline)
            if location is None:
                if not body:
                    return FetchResult(reason="empty_body", error="empty response body")
                return FetchResult(body=body)
            try:
                url = urljoin(url, location)  # the next hop is checked like the first
            except ValueError as err:
                raise _Failure("bad_url", f"redirect to {location!r}: {err}") from err
        raise _Failure("too_many_redirects", f"more than {cfg.max_redirects} redirects")
    except _Failure as err:
        return FetchResult(reason=err.reason, error=str(err), transient=err.transient)
    except TimeoutError as err:
        return FetchResult(reason="timeout", error=str(err) or "timed out", transient=True)
    except ssl.SSLError as err:
        return FetchResult(reason="tls_error", error=str(err))
    except (ConnectionError, http.client.IncompleteRead) as err:
        return FetchResult(reason="connection_error", error=repr(err), transient=True)
    except http.client.HTTPException as err:  # a malformed response
        return FetchResult(reason="bad_response", error=repr(err))
    except OSError as err:  # unreachable network or host
        return FetchResult(reason="connection_error", error=str(err), transient=True)


def fetch(url: str, cfg: DownloadConfig) -> FetchResult:
    """GET ``url`` safely (see the module docstring); transient failures are retried."""
    attempt = 0
    while True:
        result = _fetch_once(url, cfg)
        if not result.transient or attempt >= cfg.retries:
            return result
        time.sleep(BACKOFF_S * 2**attempt)
        attempt += 1
